"""Write models in the official ChatGLM on-disk layouts (sharded safetensors or .bin, official names).

Used by ``glmtune export --format official`` and by the tests, which build tiny random checkpoints in
every official format and load them back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .atomic import atomic_dir
from .errors import GlmtuneError
from .specs import REGISTRY

AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}


def _shards(items: Iterator[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard, size = {}, 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = t.contiguous()
        size += nbytes
    if shard:
        yield shard


def write_state_dict(
    items: Iterator[tuple[str, torch.Tensor]],
    out_dir: Path,
    safe: bool = True,
    max_shard_bytes: int = 2 << 30,
) -> list[str]:
    """Write tensors as one file or shards + index (transformers' names); returns the file names."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    base, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    shards = list(_shards(items, max_shard_bytes))
    names = (
        [f"{base}.{ext}"]
        if len(shards) == 1
        else [f"{base}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        if safe:
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        else:
            torch.save(shard, out_dir / name)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return names


def _write_v1(model, folder: Path, generation: str, safe: bool, max_shard_bytes: int) -> None:
    from .models.chatglm_v1 import save_official_v1

    save_official_v1(model, folder, safe=safe)


def _write_glm(model, folder: Path, generation: str, safe: bool, max_shard_bytes: int) -> None:
    """A native GlmForCausalLM in the official ChatGLM2/3 / GLM-4 layout (fused q/k/v, official names)."""
    from .models.glm_official import native_to_official, official_config_from_glm

    cfg = official_config_from_glm(model.config, generation)
    cfg["auto_map"] = AUTO_MAP
    if getattr(model.config, "pre_seq_len", None):
        cfg["pre_seq_len"] = model.config.pre_seq_len
        cfg["prefix_projection"] = bool(getattr(model.config, "prefix_projection", False))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    write_state_dict(native_to_official(state), folder, safe=safe, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")


# ModelSpec.loader (the layout the spec reads) -> the writer of that same layout.
_WRITERS = {"chatglm_v1": _write_v1, "glm_official": _write_glm}


def save_official(
    model,
    out_dir: str | os.PathLike,
    generation: str,
    *,
    safe: bool = True,
    max_shard_bytes: int = 2 << 30,
    tokenizer=None,
) -> Path:
    """Save a glmtune model in the official ChatGLM format of ``generation``, atomically.

    The folder is written under a temporary name beside ``out_dir`` and moved into place by
    :func:`glmtune.atomic.atomic_dir`, replacing an existing ``out_dir`` only once the new one is complete.
    """
    spec = REGISTRY.get(generation)
    if spec is None or not spec.official_format:
        raise GlmtuneError(f"no official format for {generation!r} models")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        _WRITERS[spec.loader](model, tmp, generation, safe, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir

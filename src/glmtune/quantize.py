"""Quantized models for inference.

Modes:

- ``"int8-cpu"``: weight-only int8. Every ``nn.Linear`` except the output layer (and a P-Tuning prefix
  encoder) keeps its weight as int8 with one absmax scale per output row; the matmul runs in the activations'
  float dtype on the weight converted on the fly, so activations are never quantized. The Linear weights
  take a quarter of their float32 memory and the outputs stay close to the float model (the mode to fit a
  model into RAM). Any device and float dtype work; on the CPU it is not faster than float32.
- ``"int8-dynamic"``: PyTorch dynamic quantization kernels (fbgemm / oneDNN / qnnpack, the ones
  ``torch.ao.quantization.quantize_dynamic`` uses): int8 weights with per-row scales, and the activations
  quantized on the fly to (7-bit on x86) int8 for int8 GEMMs: ~3x faster Linear layers than float32 on x86,
  a quarter of the memory, but lossier: the activations are quantized too. glmtune scales every token row to
  the same range before the kernel quantizes the whole input with one scale (per-token quantization), which
  clearly beats plain ``quantize_dynamic`` on models with outlier tokens; still prefer int8-cpu where output
  quality matters. CPU only, float32 compute.
- ``"8bit"`` / ``"4bit"``: bitsandbytes LLM.int8 (outlier threshold 6.0) / NF4 with double quantization, on a
  CUDA GPU. The output layer stays in the compute dtype (bfloat16 where supported, else float16).

Measured on SmolLM2-135M-Instruct (the embedded default model, real trained weights; logits up to ~40),
4 prompts x 16 greedy tokens, max |dlogit| / greedy agreement teacher-forced / free-running:
int8-cpu 1.9-2.1 / 0.94 / 0.73 (three continuations 94-100% identical, one diverged at its first token);
int8-dynamic 8.7-13.8 / 0.78 / 0.05; plain ``quantize_dynamic`` (per-tensor activations) 25-40 / 0.55 / 0.03.
Tiny random ChatGLM3 models are far more fragile (near-tied logits): see tests/test_quantize.py.

A LoRA adapter is merged into the float weights before quantizing (one quantization of the merged weights);
a P-Tuning v2 prefix encoder stays float32. The quantized layers are an in-memory form for inference: the
model cannot be saved with ``save_pretrained`` and loaded back quantized.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import merge_lora
from .errors import ConfigError
from .weights import quantized_modules

log = logging.getLogger(__name__)

MODES = ("int8-cpu", "int8-dynamic", "8bit", "4bit")
_ALIASES = {
    "int8-cpu": "int8-cpu",
    "int8_cpu": "int8-cpu",
    "int8-dynamic": "int8-dynamic",
    "int8_dynamic": "int8-dynamic",
    "8bit": "8bit",
    "4bit": "4bit",
    "nf4": "4bit",
}


def check_mode(mode: str) -> str:
    """The canonical mode name; for 8bit/4bit, raise ConfigError naming what this machine lacks."""
    canonical = _ALIASES.get(str(mode).lower())
    if canonical is None:
        raise ConfigError(f"quantization mode {mode!r}: expected one of {', '.join(MODES)}")
    if canonical in ("8bit", "4bit"):
        missing = []
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            missing.append("the bitsandbytes package (pip install bitsandbytes; not installed)")
        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
        if missing:
            raise ConfigError(
                f"quantization mode {canonical} (bitsandbytes) needs {' and '.join(missing)}. "
                "On a CPU use mode int8-cpu."
            )
    return canonical


# ----------------------------------------------------------------------------------------- layers
def _row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric absmax scale of every output row (1 for an all-zero row), float32."""
    scale = weight.detach().float().abs().amax(dim=1) / 127.0
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight and one float32 scale per output row (weight-only quantization).

    ``y = (x @ q.T) * scale + bias`` computed in ``x``'s dtype: only the weight is rounded.
    """

    glmtune_quantized = "int8-cpu"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = _row_scales(linear.weight)
        q = torch.round(linear.weight.detach().float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


@contextmanager
def _quiet_torch_quantized():
    """torch >= 2.10 warns that torch.ao.quantization and quantized tensors are deprecated (still working)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        yield


class DynamicInt8Linear(nn.Module):
    """``nn.Linear`` on PyTorch's dynamic int8 kernels (``quantized::linear_dynamic``), per-token.

    The kernel quantizes the whole input with one scale; dividing every token row by its absmax first (and
    multiplying the output rows back) gives each token the full int8 range. Weights: int8, per-row scales.
    """

    glmtune_quantized = "int8-dynamic"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = _row_scales(weight)
        with _quiet_torch_quantized():
            q = torch.quantize_per_channel(
                weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
            )
            self._packed = torch.ops.quantized.linear_prepack(q, None)
        # What the packed weight holds: int8 values plus a float32 scale and an int32 zero point per row.
        self.weight_bytes = q.numel() + 8 * len(scale)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        peak = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)
        y = torch.ops.quantized.linear_dynamic(x / peak, self._packed, True) * peak
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            "dynamic int8"
        )


# ----------------------------------------------------------------------------------- inspection
def _float_layer_names(model: nn.Module) -> set[str]:
    """Module names kept in float: the output layer (``lm_head``) and P-Tuning prefix encoders."""
    keep = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] == "prefix_encoder":
            keep.add(name)
    return keep


def _kept(name: str, keep: set[str]) -> bool:
    return any(name == k or name.startswith(k + ".") for k in keep)


def _linear_targets(model: nn.Module) -> list[str]:
    keep = _float_layer_names(model)
    return [
        name for name, module in model.named_modules() if type(module) is nn.Linear and not _kept(name, keep)
    ]


def linear_weight_bytes(model: nn.Module, include_output: bool = False) -> int:
    """Bytes held by the weights of the model's Linear layers (quantized ones: int8 values + scales), without
    the output layer unless ``include_output``."""
    keep = set() if include_output else _float_layer_names(model)
    total = 0
    for name, module in model.named_modules():
        if _kept(name, keep):
            continue
        if getattr(module, "glmtune_quantized", None):
            total += module.weight_bytes
        elif isinstance(module, nn.Linear) and isinstance(module.weight, torch.Tensor):
            total += module.weight.numel() * module.weight.element_size()
    return total


# ------------------------------------------------------------------------------------ quantizing
def _replace_linears(model: nn.Module, make) -> int:
    targets = set(_linear_targets(model))
    if not targets:
        raise ConfigError(f"{type(model).__name__}: no nn.Linear layers to quantize")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if (f"{parent_name}.{child_name}" if parent_name else child_name) in targets:
                setattr(parent, child_name, make(child))
    return len(targets)


def _int8_dynamic(model: nn.Module) -> nn.Module:
    if not hasattr(torch.ops.quantized, "linear_dynamic") or not torch.backends.quantized.supported_engines:
        raise ConfigError(
            f"quantization mode int8-dynamic: torch {torch.__version__} has no dynamic int8 kernels "
            "(quantized::linear_dynamic); use int8-cpu"
        )
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ConfigError(
            f"quantization mode int8-dynamic runs on the CPU; the model is on {', '.join(sorted(devices))}"
        )
    if torch.backends.quantized.engine == "none":
        engines = torch.backends.quantized.supported_engines
        torch.backends.quantized.engine = next(
            (e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in engines), engines[0]
        )
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        log.info(
            "int8-dynamic: converting the model to float32 first (the dynamic kernels compute in float32)"
        )
        model.to(torch.float32)
    _replace_linears(model, DynamicInt8Linear)
    return model


def _bnb(model: nn.Module, bits: int, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    def make(child: nn.Linear) -> nn.Module:
        bias = child.bias is not None
        weight = child.weight.data
        if bits == 4:
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=bias,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                weight.to(compute_dtype), requires_grad=False, quant_type="nf4", compress_statistics=True
            )
        else:
            q = bnb.nn.Linear8bitLt(
                child.in_features, child.out_features, bias=bias, has_fp16_weights=False, threshold=6.0
            )
            q.weight = bnb.nn.Int8Params(
                weight.to(torch.float16), requires_grad=False, has_fp16_weights=False
            )
        if bias:
            q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
        return q

    _replace_linears(model, make)
    model.to("cuda")  # moving the bitsandbytes parameters to the GPU is what quantizes them
    return model


def _default_compute_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def quantize_for_inference(
    model: nn.Module, mode: str, *, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """Quantize ``model`` in place for inference and return it (see the module docstring for the modes).

    The output layer (and a P-Tuning prefix encoder) stays float. A peft LoRA model is merged first (in
    float), so the result is a plain model. ``compute_dtype`` applies to 8bit/4bit. Raises ConfigError for an
    unknown mode, for 8bit/4bit without bitsandbytes or CUDA, and for a model that is already quantized.
    """
    mode = check_mode(mode)
    found = quantized_modules(model)
    if found:
        raise ConfigError(
            f"the model is already quantized ({', '.join(n or 'model' for n in found[:3])} ...)"
        )
    model = merge_lora(model)
    if mode == "int8-cpu":
        _replace_linears(model, Int8Linear)
    elif mode == "int8-dynamic":
        _int8_dynamic(model)
    else:
        _bnb(model, 4 if mode == "4bit" else 8, compute_dtype or _default_compute_dtype())
    model.eval()
    model.glmtune_quantization = mode
    return model


def load_quantized(
    path: str | os.PathLike,
    mode: str,
    adapter: str | os.PathLike | None = None,
    *,
    generation: str | None = None,
    trust_remote_code: bool = False,
    compute_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """``load_model`` + ``quantize_for_inference``: a quantized model ready for ``generate``.

    int8-cpu computes in ``compute_dtype`` (default float32) on ``device``; int8-dynamic in float32 on the
    CPU; 8bit/4bit in ``compute_dtype`` (default bfloat16, float16 on GPUs without bf16) and end on the GPU.
    The mode is checked before any weight is read.
    """
    from .loading import load_model

    mode = check_mode(mode)
    if mode == "int8-cpu":
        dtype = compute_dtype or torch.float32
    elif mode == "int8-dynamic":
        dtype = torch.float32
    else:
        dtype = compute_dtype or _default_compute_dtype()
    model = load_model(
        path, adapter=adapter, dtype=dtype, generation=generation, trust_remote_code=trust_remote_code
    )
    model = quantize_for_inference(model, mode, compute_dtype=dtype)
    if mode == "int8-cpu":
        model.to(device)
    return model


__all__ = [
    "MODES",
    "DynamicInt8Linear",
    "Int8Linear",
    "check_mode",
    "linear_weight_bytes",
    "load_quantized",
    "quantize_for_inference",
    "quantized_modules",
]

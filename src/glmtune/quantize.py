"""Quantized models: Linear layers quantized as their weights stream in, for inference and QLoRA.

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
- ``"8bit"`` / ``"4bit"``: bitsandbytes LLM.int8 (outlier threshold 6.0) / NF4 with double quantization, in
  the model's dtype (the compute dtype), on a CUDA GPU or on the CPU. The layers QLoRA trains over and the
  ones inference runs: :func:`replace_linears` makes both. On the CPU, bitsandbytes casts 8-bit layers'
  inputs to float16 for the int8 matmul, and in eval mode (no gradients) its 4-bit layers repack their
  weights for a fused kernel that computes in bfloat16 on CPUs with AVX512-BF16.

Memory: ``glmtune.load_model(..., quantization=MODE)`` replaces the Linear layers of the empty (meta-device)
model before any weight is read and quantizes each weight as its tensor arrives (:class:`StreamQuantizer`,
a block of rows at a time), so the peak is the quantized model plus about one float tensor, never the
float model; transformers-format folders too, when their safetensors names are the model's own (else
transformers' ``BitsAndBytesConfig`` loading quantizes them, or for int8 modes they load in float first).

Measured on SmolLM2-135M-Instruct (the embedded default model, real trained weights; logits up to ~40),
4 prompts x 16 greedy tokens, max |dlogit| / greedy agreement teacher-forced / free-running:
int8-cpu 1.9-2.1 / 0.94 / 0.73 (three continuations 94-100% identical, one diverged at its first token);
int8-dynamic 8.7-13.8 / 0.78 / 0.05; plain ``quantize_dynamic`` (per-tensor activations) 25-40 / 0.55 / 0.03.
Tiny random ChatGLM3 models are far more fragile (near-tied logits): see tests/test_quantize.py.

A LoRA adapter over an int8-cpu / int8-dynamic base is merged into the float weights before quantizing (one
quantization of the merged weights, so that base loads in float first); over a bitsandbytes base it stays a
separate peft layer (as QLoRA trained it). A P-Tuning v2 prefix encoder stays float32. glmtune's int8 layers
are an in-memory form for inference: such a model cannot be saved with ``save_pretrained`` and loaded back
quantized.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import merge_lora
from .errors import ConfigError, ModelLoadError
from .weights import quantized_modules

log = logging.getLogger(__name__)

MODES = ("int8-cpu", "int8-dynamic", "8bit", "4bit")
BNB_MODES = ("8bit", "4bit")
_ALIASES = {
    "int8-cpu": "int8-cpu",
    "int8_cpu": "int8-cpu",
    "int8-dynamic": "int8-dynamic",
    "int8_dynamic": "int8-dynamic",
    "8bit": "8bit",
    "4bit": "4bit",
    "nf4": "4bit",
}
# bitsandbytes settings of both k-bit modes (QLoRA's): NF4 + double quantization, LLM.int8 outliers >= 6.
NF4 = dict(quant_type="nf4", compress_statistics=True)
INT8_THRESHOLD = 6.0


class _Int8CastToDebug(logging.Filter):
    """LLM.int8 casts float32/bfloat16 inputs to float16 for its int8 matmul and logs a warning saying so on
    every forward call: that is how the 8-bit layers work (the README says so), not something a user can act
    on, so the record becomes a debug message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.getMessage().startswith(
            "MatMul8bitLt: inputs will be cast"
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Int8CastToDebug())


def check_mode(mode: str) -> str:
    """The canonical mode name; for 8bit/4bit, raise ConfigError when bitsandbytes is missing."""
    canonical = _ALIASES.get(str(mode).lower())
    if canonical is None:
        raise ConfigError(f"quantization mode {mode!r}: expected one of {', '.join(MODES)}")
    if canonical in BNB_MODES:
        _bitsandbytes(canonical)
    return canonical


def _bitsandbytes(mode: str):
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            f"quantization mode {mode} needs the bitsandbytes package (pip install 'glmtune[qlora]'; "
            "not installed). On a CPU without it use mode int8-cpu."
        ) from None
    return bitsandbytes


# ----------------------------------------------------------------------------------------- layers
# Weights are quantized a block of rows at a time, about this many values each (~20 MB of temporaries):
# the quantizers make several float32 temporaries of their input (bitsandbytes' 4-bit CPU quantizer ~16-20
# bytes a weight), which for a whole ChatGLM3-6B MLP weight ([27392, 4096]) would be ~2 GB on top of the
# model being loaded.
_CHUNK_VALUES = 1 << 20


def _row_chunks(weight: torch.Tensor, multiple: int = 1):
    """Consecutive row blocks of a [out, in] weight, each ~_CHUNK_VALUES values and (all but the last) a
    multiple of ``multiple`` values, so blockwise quantization of the blocks equals that of the whole."""
    rows, cols = weight.shape
    step = multiple // math.gcd(cols, multiple)
    per = max(step, _CHUNK_VALUES // max(cols, 1) // step * step)
    for start in range(0, rows, per):
        yield weight[start : start + per]


def _row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric absmax scale of every output row (1 for an all-zero row), float32."""
    scale = weight.detach().float().abs().amax(dim=1) / 127.0
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _frozen_bias(linear: nn.Linear) -> nn.Parameter | None:
    """The bias of ``linear`` as a frozen parameter (still on the meta device when the weights stream in)."""
    if linear.bias is None:
        return None
    return nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight and one float32 scale per output row (weight-only quantization).

    ``y = (x @ q.T) * scale + bias`` computed in ``x``'s dtype: only the weight is rounded. Built from a
    float ``nn.Linear``, or from one on the meta device and then filled by :meth:`load_weight`.
    """

    glmtune_quantized = "int8-cpu"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # [out, in] int8 and [out] float32; meta placeholders until the weight streams in.
        self.register_buffer(
            "qweight", torch.empty(self.out_features, self.in_features, dtype=torch.int8, device="meta")
        )
        self.register_buffer("scale", torch.empty(self.out_features, dtype=torch.float32, device="meta"))
        self.bias = _frozen_bias(linear)
        if not linear.weight.is_meta:
            self.load_weight(linear.weight)

    @property
    def loaded(self) -> bool:
        return not self.qweight.is_meta

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float [out, in] weight into this layer."""
        weight = weight.detach()
        qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales, done = [], 0
        for rows in _row_chunks(weight):
            scale = _row_scales(rows)
            q = torch.round(rows.float() / scale[:, None]).clamp_(-127, 127)
            qweight[done : done + len(rows)] = q.to(torch.int8)
            scales.append(scale)
            done += len(rows)
        self.qweight, self.scale = qweight, torch.cat(scales)

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
    Built from a float ``nn.Linear``, or from one on the meta device and then filled by :meth:`load_weight`.
    """

    glmtune_quantized = "int8-dynamic"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed = None
        self.weight_bytes = 0
        self.bias = _frozen_bias(linear)
        if not linear.weight.is_meta:
            self.load_weight(linear.weight)

    @property
    def loaded(self) -> bool:
        return self._packed is not None

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float [out, in] weight into this layer (packed for the CPU kernels)."""
        weight = weight.detach().float().cpu()
        scale = _row_scales(weight)
        with _quiet_torch_quantized():
            q = torch.quantize_per_channel(
                weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
            )
            self._packed = torch.ops.quantized.linear_prepack(q, None)
        # What the packed weight holds: int8 values plus a float32 scale and an int32 zero point per row.
        self.weight_bytes = q.numel() + 8 * len(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        peak = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)
        y = torch.ops.quantized.linear_dynamic(x / peak, self._packed, True) * peak
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            "dynamic int8"
        )


def _bnb_layer(mode: str, linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """An empty (meta-device) bitsandbytes layer of ``linear``'s shape; its bias is ``linear``'s."""
    bnb = _bitsandbytes(mode)
    shape = (linear.in_features, linear.out_features)
    if mode == "4bit":
        layer = bnb.nn.Linear4bit(
            *shape, bias=linear.bias is not None, compute_dtype=compute_dtype, device="meta", **NF4
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            *shape,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
    if linear.bias is not None:
        layer.bias = _frozen_bias(linear)
    if mode == "4bit" and (linear.out_features % 32 or linear.in_features % layer.weight.blocksize):
        # In eval mode without gradients bitsandbytes (0.50) repacks a 4-bit weight for its AVX512-BF16 CPU
        # kernel, which assumes out_features % 32 == 0 and in_features % blocksize (64) == 0 and fails
        # otherwise; such a layer keeps the plain layout (dequantized, computed in the compute dtype).
        layer.support_avx512bf16_for_cpu = False
    return layer


def _load_bnb_weight(layer: nn.Module, weight: torch.Tensor, compute_dtype: torch.dtype, device) -> None:
    """Quantize a float [out, in] weight into a bitsandbytes layer, on ``device``, a block of rows at a time.

    bitsandbytes quantizes a parameter whole when it moves to a device (``Params4bit._quantize``,
    ``Int8Params._quantize``); this does the same with its own functions on row blocks (_row_chunks) and
    joins them, giving the same values (tests/test_quantize.py compares them bit for bit) with a bounded
    transient: 4-bit blocks are whole multiples of its block size, so the packed values and per-block
    absmax are those of the whole tensor, and the double quantization of the absmax is bitsandbytes'
    (``quantize_4bit`` with ``compress_statistics``) over all of them; LLM.int8 scales each row.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    weight = weight.detach()
    if isinstance(layer, bnb.nn.Linear4bit):
        old = layer.weight
        packed, absmax, state = [], [], None
        for rows in _row_chunks(weight, old.blocksize):
            q, state = bnbf.quantize_4bit(
                rows.to(device=device, dtype=compute_dtype),
                blocksize=old.blocksize,
                compress_statistics=False,
                quant_type=old.quant_type,
                quant_storage=old.quant_storage,
            )
            packed.append(q)
            absmax.append(state.absmax)
        absmax = torch.cat(absmax)
        common = dict(
            shape=weight.shape,
            dtype=compute_dtype,
            blocksize=old.blocksize,
            code=state.code,
            quant_type=old.quant_type,
        )
        if old.compress_statistics:  # as quantize_4bit(compress_statistics=True) does it
            offset = absmax.mean()
            qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
            state = bnbf.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)
        else:
            state = bnbf.QuantState(absmax=absmax, **common)
        layer.weight = bnb.nn.Params4bit(
            torch.cat(packed),
            requires_grad=False,
            quant_state=state,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=layer,
            bnb_quantized=True,
        )
        layer.quant_state = state
        return
    cb = torch.empty(weight.shape, dtype=torch.int8, device=device)
    scb, done = [], 0
    for rows in _row_chunks(weight):
        # Int8Params quantizes the float16 weight (LLM.int8: int8 values and one float32 scale per row).
        q, row_scale, _ = bnbf.int8_vectorwise_quant(rows.to(device=device, dtype=torch.float16))
        cb[done : done + len(rows)] = q
        scb.append(row_scale)
        done += len(rows)
    layer.weight = bnb.nn.Int8Params(
        cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=torch.cat(scb)
    )


def _bnb_classes() -> tuple[type, ...]:
    import sys

    bnb = sys.modules.get("bitsandbytes")  # never imported just to ask: no bitsandbytes layer without it
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()


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


def _quantized_weight_bytes(module: nn.Module) -> int | None:
    """Bytes a quantized Linear layer's weight takes (values + scales), None for any other module."""
    if getattr(module, "glmtune_quantized", None):
        return module.weight_bytes
    if isinstance(module, _bnb_classes()):
        weight = module.weight
        total = weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:  # 4-bit: absmax (8-bit when nested) + the nested absmax and code
            total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values())
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is not None:  # 8-bit: one float32 scale per row
            total += scb.numel() * scb.element_size()
        return total
    return None


def linear_weight_bytes(model: nn.Module, include_output: bool = False) -> int:
    """Bytes held by the weights of the model's Linear layers (quantized ones: their values + scales), without
    the output layer unless ``include_output``."""
    keep = set() if include_output else _float_layer_names(model)
    total = 0
    for name, module in model.named_modules():
        if _kept(name, keep):
            continue
        quantized = _quantized_weight_bytes(module)
        if quantized is not None:
            total += quantized
        elif type(module) is nn.Linear and isinstance(module.weight, torch.Tensor):
            total += module.weight.numel() * module.weight.element_size()
    return total


# ------------------------------------------------------------------------------------ quantizing
def replace_linears(
    model: nn.Module, mode: str, *, compute_dtype: torch.dtype = torch.float32, device="cpu"
) -> list[str]:
    """Replace every ``nn.Linear`` except the output layer and P-Tuning prefix encoders by ``mode``'s
    quantized layer; returns the names replaced. The one replacement QLoRA training and inference share.

    A Linear still on the meta device (an empty model about to be streamed into) becomes an empty quantized
    layer that :meth:`StreamQuantizer.load` fills when its weight arrives; a materialised one is quantized at
    once. bitsandbytes layers quantize on ``device`` and compute in ``compute_dtype``.
    """
    mode = check_mode(mode)
    targets = set(_linear_targets(model))
    if not targets:
        raise ConfigError(f"{type(model).__name__}: no nn.Linear layers to quantize")
    if mode == "int8-dynamic":
        _check_dynamic_kernels()

    def make(linear: nn.Linear) -> nn.Module:
        if mode == "int8-cpu":
            return Int8Linear(linear)
        if mode == "int8-dynamic":
            return DynamicInt8Linear(linear)
        layer = _bnb_layer(mode, linear, compute_dtype)
        if not linear.weight.is_meta:
            _load_bnb_weight(layer, linear.weight, compute_dtype, device)
            if layer.bias is not None:
                layer.bias = nn.Parameter(
                    layer.bias.data.to(device=device, dtype=compute_dtype), requires_grad=False
                )
        return layer

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if (f"{parent_name}.{child_name}" if parent_name else child_name) in targets:
                setattr(parent, child_name, make(child))
    return sorted(targets)


class StreamQuantizer:
    """Quantize a model's Linear layers while its weights stream in (``glmtune.loading`` drives it).

    ``prepare(model)`` on the empty model (parameters on the meta device) replaces the layers
    (:func:`replace_linears`); ``load(module, name, tensor, source)`` takes each arriving tensor and quantizes
    it when it is the weight of such a layer (True), so at most one float weight is alive at a time;
    ``pending(model)`` names the weights that never arrived.
    """

    def __init__(self, mode: str, *, compute_dtype: torch.dtype = torch.float32, device="cpu"):
        self.mode = check_mode(mode)
        if self.mode == "int8-dynamic":
            if str(device) != "cpu":
                raise ConfigError(f"quantization mode int8-dynamic runs on the CPU, not on {device}")
            compute_dtype = torch.float32
        self.compute_dtype = compute_dtype
        # glmtune's int8 layers quantize on the CPU (the model moves afterwards); bitsandbytes on the device.
        self.device = torch.device(device) if self.mode in BNB_MODES else torch.device("cpu")

    def prepare(self, model: nn.Module) -> list[str]:
        return replace_linears(model, self.mode, compute_dtype=self.compute_dtype, device=self.device)

    def load(self, module: nn.Module, name: str, tensor: torch.Tensor, source: Path) -> bool:
        if not name.endswith(".weight"):
            return False
        glmtune_layer = isinstance(module, (Int8Linear, DynamicInt8Linear))
        if not glmtune_layer and not isinstance(module, _bnb_classes()):
            return False
        expected = (module.out_features, module.in_features)
        if tuple(tensor.shape) != expected:
            raise ModelLoadError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, the model expects {expected} "
                "(config.json does not match the weights)"
            )
        if not tensor.is_floating_point():
            raise ModelLoadError(
                f"{source}: weight {name!r} is {tensor.dtype}, expected a float tensor to quantize"
            )
        if glmtune_layer:
            module.load_weight(tensor)
        else:
            _load_bnb_weight(module, tensor, self.compute_dtype, self.device)
        return True

    def pending(self, model: nn.Module) -> list[str]:
        """``<layer>.weight`` of every glmtune quantized layer still empty (bitsandbytes layers keep a meta
        parameter, which the loader's missing-weights check already sees)."""
        return [
            f"{name}.weight"
            for name, module in model.named_modules()
            if isinstance(module, (Int8Linear, DynamicInt8Linear)) and not module.loaded
        ]


def mark_quantized(model: nn.Module, mode: str) -> nn.Module:
    """Record ``mode`` on a quantized model: ``glmtune_quantization``, and for bitsandbytes modes
    transformers' ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` (what transformers sets on the models it
    quantizes): peft picks its bitsandbytes LoRA layers and its k-bit training set-up by them."""
    model.glmtune_quantization = mode
    if mode in BNB_MODES:
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = mode == "4bit", mode == "8bit"
    return model


def hf_quantization_config(mode: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for a bitsandbytes mode (the same settings as
    :func:`replace_linears`: transformers keeps the output layer float by itself), None for glmtune's modes."""
    mode = check_mode(mode)
    if mode not in BNB_MODES:
        return None
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=NF4["quant_type"],
            bnb_4bit_use_double_quant=NF4["compress_statistics"],
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)


def _check_dynamic_kernels() -> None:
    if not hasattr(torch.ops.quantized, "linear_dynamic") or not torch.backends.quantized.supported_engines:
        raise ConfigError(
            f"quantization mode int8-dynamic: torch {torch.__version__} has no dynamic int8 kernels "
            "(quantized::linear_dynamic); use int8-cpu"
        )
    if torch.backends.quantized.engine == "none":
        engines = torch.backends.quantized.supported_engines
        torch.backends.quantized.engine = next(
            (e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in engines), engines[0]
        )


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def quantize_for_inference(
    model: nn.Module, mode: str, *, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """Quantize an already loaded ``model`` in place for inference and return it (see the module docstring).

    For a model still to be loaded, ``glmtune.load_model(..., quantization=mode)`` is the way: it never
    holds the float model. Here the output layer (and a P-Tuning prefix encoder) stays float; a peft LoRA
    model is merged first (in float), so the result is a plain model. bitsandbytes layers quantize where
    the model is and compute in ``compute_dtype`` (default: the model's dtype). Raises ConfigError for an
    unknown mode, for 8bit/4bit without bitsandbytes, and for a model that is already quantized.
    """
    mode = check_mode(mode)
    found = quantized_modules(model)
    if found:
        raise ConfigError(
            f"the model is already quantized ({', '.join(n or 'model' for n in found[:3])} ...)"
        )
    model = merge_lora(model)
    device = _model_device(model)
    if mode == "int8-dynamic":
        if device.type != "cpu":
            raise ConfigError(f"quantization mode int8-dynamic runs on the CPU; the model is on {device}")
        if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
            log.info(
                "int8-dynamic: converting the model to float32 first (the dynamic kernels compute in float32)"
            )
            model.to(torch.float32)
    dtype = compute_dtype or getattr(model, "dtype", None) or torch.float32
    replace_linears(model, mode, compute_dtype=dtype, device=device)
    model.eval()
    return mark_quantized(model, mode)


__all__ = [
    "BNB_MODES",
    "MODES",
    "DynamicInt8Linear",
    "Int8Linear",
    "StreamQuantizer",
    "check_mode",
    "hf_quantization_config",
    "linear_weight_bytes",
    "mark_quantized",
    "quantize_for_inference",
    "quantized_modules",
    "replace_linears",
]

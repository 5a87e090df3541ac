"""``glmtune plan``: the peak memory a run config needs, predicted before any weight is read.

Only the model's ``config.json`` is read (through :func:`glmtune.resolve.resolve_model`). The model is
built on the meta device from it, with the same class and config the loader would use (no memory, no
weights), so the parameter counts are exact: weights by dtype and quantization, the LoRA matrices on the
spec's targets, a P-Tuning prefix encoder, the layers a full fine-tune trains. The rest is counted per
token from the model's sizes (hidden, ffn, heads, kv groups, head dim, vocabulary):

- activations: the tensors autograd keeps for the backward pass in one decoder layer, tensor by
  tensor, for the two layer layouts glmtune trains (``ModelSpec.activation_layout``): "gated"
  (transformers' GlmForCausalLM for ChatGLM2/3 and GLM-4; Llama-like models) and "chatglm_v1"
  (glmtune's ChatGLM-6B class). Each term below names the tensor it counts; ``tests/test_plan.py``
  checks the sums against the bytes autograd really saves. With gradient checkpointing only each
  layer's input is kept, plus one layer's activations while it is recomputed.
- logits: glmtune computes the output layer at labelled positions only, fused with the cross-entropy
  in chunks of ``train.loss_chunk_size`` rows (:mod:`glmtune.train.fast_loss`), so at most a chunk x
  vocabulary of logits exists at a time; the unfused and full-vocabulary paths are counted too.
- gradients and optimizer states in the trainable parameters' dtype (transformers' Trainer keeps no
  float32 master copy: with ``train.precision`` bf16/fp16 it runs autocast over the weights as loaded).
- serving: weights, the KV cache (layers x 2 x kv heads x head dim x tokens x batch) and the prefill.
- on the CPU under glibc's default policy, the free space its heap keeps resident at the peak (a measured
  share of every layer's activations; none when ``MALLOC_MMAP_THRESHOLD_`` is 256 KiB or less).

The peak is not the sum of everything: during the forward and backward pass the activations are alive
and the gradients appear as they are freed; at the optimizer step the gradients and the step's
temporaries are alive and the activations are gone. :class:`Plan` keeps both phases and reports the
larger. Constants that come from measurement rather than from reading the code (the backward pass's
transient gradients, the runtime's own memory, the free space glibc keeps) are named as such;
``benchmarks/plan_accuracy.py`` compares the predictions with measured peaks (results in
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, GlmtuneError, ModelLoadError
from .resolve import ResolvedModel, resolve_model

__all__ = [
    "GiB",
    "Line",
    "Plan",
    "Settings",
    "Shape",
    "Suggestion",
    "device_capacity",
    "format_bytes",
    "glibc_keeps_freed_memory",
    "model_shape",
    "parse_memory",
    "plan_config",
    "plan_serving",
    "plan_training",
    "render",
    "report",
    "settings_of",
    "suggestions",
]

GiB = 1 << 30

# Template tokens around the prompt and the reply ([gMASK], sop, role tokens, newlines, eos) that
# data.max_source_length / max_target_length do not count: at most this many in glmtune's templates.
TEMPLATE_TOKENS = 8

# Memory that is not the model's: on a GPU the CUDA context and kernels (typically 0.3-0.6 GiB; PyTorch's
# caching allocator keeps some slack on top), on the CPU the Python process with torch, transformers,
# the tokenizer and the tokenized data (measured: ~0.5 GiB, benchmarks/plan_accuracy.py).
RUNTIME_BYTES = {"cuda": GiB // 2, "cpu": GiB // 2}

# The backward pass holds, besides what is saved, the gradients of one layer's intermediate tensors
# while that layer is differentiated: measured at about this share of one layer's saved activations
# (benchmarks/plan_accuracy.py).
BACKWARD_TRANSIENT = 1.0

# glibc's malloc (Linux) serves every block under its mmap threshold from the process heap and keeps
# freed blocks there for reuse instead of returning them to the system; the threshold starts at 128 KiB
# and rises to the largest block freed so far, up to 32 MiB, so after the first step nearly every
# activation tensor of a CPU run lives in the heap. Each layer leaves the tensors it keeps (saved
# activations, or the checkpointed layer input) between the blocks of its freed temporaries, which the
# next layers reuse only where their sizes fit: at the peak the heap also holds free space that grows with
# depth, measured as a share of every layer's activations (``_Layout.glibc_heap_share``;
# benchmarks/plan_accuracy.py: 31 shapes and methods). With MALLOC_MMAP_THRESHOLD_ set to 256 KiB or less
# glibc maps every large block on its own and the free space goes, at a cost in speed (37 % fewer
# examples/s here, benchmarks/RESULTS.md), which is why glmtune does not set it.
LIVE_MMAP_THRESHOLD = 256 << 10
# glibc's dynamic mmap threshold stops rising here (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): larger blocks
# are always mapped on their own. Once a layer's residual-stream tensor (tokens x hidden) is larger, the
# bulk of its activations never enters the heap: measured 0.10 of every layer's activations kept at 47
# MiB, against 0.63 at 24 MiB (benchmarks/plan_accuracy.py, big-tensors and mid-tensors), so none is
# counted past it.
GLIBC_MMAP_CEILING = 32 << 20


@functools.cache
def _libc() -> str:
    # platform.libc_ver() reads the Python executable's bytes: once per process, not once per plan
    # (glmtune plan makes a plan for every suggestion it tries).
    return platform.libc_ver()[0]


def glibc_keeps_freed_memory(environ=None) -> bool:
    """Whether this process's CPU allocations keep freed memory resident (glibc's default policy)."""
    if _libc() != "glibc":
        return False  # not measured with other allocators: the plan counts live tensors only
    value = (os.environ if environ is None else environ).get("MALLOC_MMAP_THRESHOLD_", "")
    try:
        return int(value) > LIVE_MMAP_THRESHOLD
    except ValueError:
        return True


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------------ shape
@dataclass(frozen=True)
class Shape:
    """The sizes of a model as built from its config.json (parameter counts are exact)."""

    layout: str  # ModelSpec.activation_layout
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rotary_dim: int  # rotated dims of each head (GLM rotates half of them)
    params: int  # every parameter once (tied embeddings once), without a P-Tuning prefix encoder
    linear_params: int  # weights of the nn.Linear layers quantization replaces (not the output layer)
    linear_rows: int  # their output rows (int8 keeps one scale per row)
    output_params: int  # the output layer's weight, 0 when tied to the embeddings
    layer_params: int  # one decoder layer
    prefix_params: int  # the P-Tuning v2 prefix encoder asked for (0 without)
    largest_param: int  # elements of the largest parameter tensor
    # (module name, in_features, out_features) of every nn.Linear that quantization or LoRA can target
    linears: tuple[tuple[str, int, int], ...] = field(repr=False, default=())
    # (name inside one decoder layer, in_features) of the same layers in the first decoder layer
    layer_linears: tuple[tuple[str, int], ...] = field(repr=False, default=())


def _empty(cls, config) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return cls(config)


def _glm_skeleton(model: ResolvedModel, cfg: dict, prefix):
    from transformers import GlmForCausalLM

    from .models.glm_official import glm_config_from_official
    from .models.glm_prefix import GlmPrefixForCausalLM

    config = glm_config_from_official(cfg, str(model.path / "config.json"))
    if prefix:
        config.pre_seq_len, config.prefix_projection = prefix
        return _empty(GlmPrefixForCausalLM, config)
    return _empty(GlmForCausalLM, config)


def _v1_skeleton(model: ResolvedModel, cfg: dict, prefix):
    from .models.chatglm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM

    config = ChatGLMv1Config.from_official(cfg)
    if prefix:
        config.pre_seq_len, config.prefix_projection = prefix
    return _empty(ChatGLMv1ForCausalLM, config)


def _hf_skeleton(model: ResolvedModel, cfg: dict, prefix):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model.gguf is not None:  # the sizes are in the file's metadata
        config = AutoConfig.from_pretrained(str(model.gguf.parent), gguf_file=model.gguf.name)
    elif cfg.get("model_type") in CONFIG_MAPPING:  # from the config.json resolve_model read
        config = CONFIG_MAPPING[cfg["model_type"]].from_dict(dict(cfg))
    else:  # a model with its own code (trust_remote_code)
        config = AutoConfig.from_pretrained(str(model.path), trust_remote_code=model.trust_remote_code)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)


# ModelSpec.loader (the official layout a folder is read in; "hf" for any other) -> the model class and
# config the loader builds, on the meta device (glmtune.loading._OFFICIAL_LOADERS reads the same layouts).
_SKELETONS = {"glm_official": _glm_skeleton, "chatglm_v1": _v1_skeleton, "hf": _hf_skeleton}


def _decoder_layers(model: nn.Module, layers: int) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return module
    raise ModelLoadError(f"{type(model).__name__}: no stack of {layers} decoder layers found")


# (folder or GGUF file, config.json as read, generation, prefix) -> Shape: a plan's what-ifs re-plan the
# same model several times, and building it (reading a GGUF file's metadata) takes seconds.
_SHAPES: dict[tuple, Shape] = {}


def model_shape(model: ResolvedModel, prefix: tuple[int, bool] | None = None) -> Shape:
    """The :class:`Shape` of a resolved model, from its config.json alone (built on the meta device).

    ``prefix=(pre_seq_len, prefix_projection)`` adds a P-Tuning v2 prefix encoder, as training one does.
    """
    key = (
        str(model.gguf or model.path),
        json.dumps(dict(model.config), sort_keys=True),
        model.spec.name,
        prefix,
    )
    if key not in _SHAPES:
        _SHAPES[key] = _build_shape(model, prefix)
    return _SHAPES[key]


def _build_shape(model: ResolvedModel, prefix: tuple[int, bool] | None) -> Shape:
    cfg = dict(model.config)
    layout = model.spec.loader if model.spec.is_official_folder(cfg) else "hf"
    if not prefix and cfg.get("pre_seq_len") and layout != "hf":  # a folder that holds its own prefix
        prefix = (int(cfg["pre_seq_len"]), bool(cfg.get("prefix_projection", False)))
    where = model.gguf or (model.path / "config.json")
    try:
        skeleton = _SKELETONS[layout](model, cfg, prefix)
    except GlmtuneError:
        raise
    except (KeyError, TypeError, ValueError, OSError, NotImplementedError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{where}: cannot build the model from it: {e}") from None
    config = (
        skeleton.config.get_text_config() if hasattr(skeleton.config, "get_text_config") else skeleton.config
    )
    try:
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        layers = int(config.num_hidden_layers)
        vocab = int(config.vocab_size)
    except (AttributeError, TypeError) as e:
        raise ModelLoadError(f"{where}: the model's config lacks a size glmtune plan needs: {e}") from None
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    ffn = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    rope = getattr(config, "rope_parameters", None) or {}
    partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)

    output = skeleton.get_output_embeddings()
    embedding = skeleton.get_input_embeddings()
    tied = output is not None and (
        output.weight is embedding.weight or bool(getattr(config, "tie_word_embeddings", False))
    )
    prefix_modules = [m for name, m in skeleton.named_modules() if name.split(".")[-1] == "prefix_encoder"]
    prefix_ids = {id(p) for m in prefix_modules for p in m.parameters()}
    seen: set[int] = set()
    params = prefix_params = 0
    for p in skeleton.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in prefix_ids:
            prefix_params += p.numel()
        else:
            params += p.numel()
    output_params = 0
    if output is not None:
        if tied and output.weight is not embedding.weight:
            params -= output.weight.numel()  # the loader ties it to the embeddings
        elif not tied:
            output_params = output.weight.numel()
    prefix_names = [n for n, m in skeleton.named_modules() if any(m is p for p in prefix_modules)]
    linears = [
        (name, module.in_features, module.out_features)
        for name, module in skeleton.named_modules()
        if type(module) is nn.Linear
        and module is not output
        and not any(name.startswith(p + ".") for p in prefix_names)
    ]
    stack = _decoder_layers(skeleton, layers)
    first = stack[0]
    layer_linears = tuple((name, m.in_features) for name, m in first.named_modules() if type(m) is nn.Linear)
    return Shape(
        layout=model.spec.activation_layout,
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ffn=ffn,
        rotary_dim=int(head_dim * partial),
        params=params,
        linear_params=sum(i * o for _, i, o in linears),
        linear_rows=sum(o for _, _, o in linears),
        output_params=output_params,
        layer_params=sum(p.numel() for p in first.parameters()),
        prefix_params=prefix_params,
        largest_param=max(p.numel() for p in skeleton.parameters()),
        linears=tuple(linears),
        layer_linears=layer_linears,
    )


# --------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """What a plan depends on, taken from a run config (:func:`settings_of`); what-ifs replace fields."""

    method: str = "lora"
    dtype: str = "float32"  # the base weights' dtype (model.dtype)
    # None, "8bit", "4bit" (training); also "int8-cpu", "int8-dynamic" (serving)
    quantization: str | None = None
    precision: str = "fp32"  # train.precision: fp16/bf16 = autocast
    batch_size: int = 1
    grad_accum: int = 1
    seq_len: int = 512  # tokens of the longest example (the padded row length)
    labelled: int = 512  # labelled tokens of one example, at most
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] | None = None  # None: the spec's
    pre_seq_len: int = 128
    prefix_projection: bool = False
    freeze_layers_except_last: int | None = None
    optimizer: str = "adamw_torch"
    logits_at_labels_only: bool = True
    loss_chunk_size: int = 1024
    padding_free: bool = True
    packing: bool = False
    # serving: prompt tokens and generated tokens of each sequence
    prompt_len: int = 512
    max_new_tokens: int = 256
    # where the cut-off comes from ("max_length" or "pair"), to word the suggestion
    length_keys: tuple[str, ...] = ("data.max_length",)
    deepspeed: bool = False  # train.deepspeed is set (the plan is for one device without it)


def settings_of(cfg) -> Settings:
    """The :class:`Settings` of a run config (:class:`glmtune.config.RunConfig`, its public groups)."""
    m, d, t, meth, e = cfg.model, cfg.data, cfg.train, cfg.method, cfg.eval
    if d.max_length is not None:
        seq, labelled, prompt = d.max_length, d.max_length, d.max_length
        keys: tuple[str, ...] = ("data.max_length",)
    else:
        seq = d.max_source_length + d.max_target_length + TEMPLATE_TOKENS
        labelled = d.max_target_length + 1  # the reply and its eos
        prompt = d.max_source_length + TEMPLATE_TOKENS
        keys = ("data.max_source_length", "data.max_target_length")
    if d.train_on_prompt:
        labelled = seq
    quant = None if m.quantization in (None, "none") else m.quantization
    targets = meth.lora_target_modules
    return Settings(
        method=meth.name,
        dtype=m.dtype,
        quantization=quant,
        precision=t.precision,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        seq_len=seq,
        labelled=min(labelled, seq),
        gradient_checkpointing=t.gradient_checkpointing,
        lora_r=meth.lora_r,
        lora_dropout=meth.lora_dropout,
        lora_targets=tuple(targets) if targets else None,
        pre_seq_len=meth.pre_seq_len,
        prefix_projection=meth.prefix_projection,
        freeze_layers_except_last=meth.freeze_layers_except_last,
        optimizer=t.optimizer,
        logits_at_labels_only=t.logits_at_labels_only,
        loss_chunk_size=t.loss_chunk_size,
        padding_free=d.padding_free,
        packing=d.packing,
        prompt_len=prompt,
        max_new_tokens=e.max_new_tokens,
        length_keys=keys,
        deepspeed=bool(t.deepspeed),
    )


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Line:
    """One row of the breakdown: what it counts, bytes, and how it was counted."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """A predicted peak: the breakdown, and which lines are alive at the peak."""

    mode: str  # "train" or "serve"
    device: str  # "cuda" or "cpu": the kernels the estimate assumes
    settings: Settings
    shape: Shape
    lines: tuple[Line, ...]
    total: int  # the predicted peak, runtime included
    phase: str  # when the peak happens
    trainable: int = 0  # trainable parameters (training)
    # The numbers the lines are made of (bytes; per_layer and head per token), for tests and benchmarks.
    detail: dict = field(default_factory=dict, compare=False)

    def line(self, name: str) -> Line:
        return next(line for line in self.lines if line.name == name)

    @property
    def model_bytes(self) -> int:
        """The peak without the runtime line (what the benchmark compares with peak RSS - baseline)."""
        return self.total - self.line("runtime").bytes

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "device": self.device,
            "total_bytes": self.total,
            "phase": self.phase,
            "trainable_parameters": self.trainable,
            "parameters": self.shape.params,
            "lines": [dataclasses.asdict(line) for line in self.lines],
            "settings": dataclasses.asdict(self.settings),
        }


def _bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ConfigError(f"model.dtype {dtype!r}: expected float32, bfloat16 or float16") from None


def _quantized_linear_bytes(shape: Shape, quantization: str | None, dtype_bytes: int) -> tuple[int, str]:
    """Bytes of the quantizable Linear weights under ``quantization``, and how they are stored."""
    n, rows = shape.linear_params, shape.linear_rows
    if quantization == "4bit":
        # bitsandbytes NF4 with double quantization (glmtune's 4bit): 4 bits a weight, one 8-bit absmax
        # per block of 64, and one float32 scale per 256 of those blocks.
        return n // 2 + n // 64 + 4 * (n // (64 * 256)), "NF4 0.52 B/param"
    if quantization == "8bit":
        return n + 4 * rows, "LLM.int8 1 B/param + fp32 row scales"  # int8 weights, SCB per row
    if quantization == "int8-cpu":
        return n + 4 * rows, "int8 1 B/param + fp32 row scales"
    if quantization == "int8-dynamic":
        return n + 8 * rows, "int8 packed 1 B/param + scale and zero point per row"
    return n * dtype_bytes, ""


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of target names: the module's name is one of them or ends in ``.name``."""
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass(frozen=True)
class _Act:
    """What the per-token activation terms depend on (bytes per element and which tensors exist)."""

    c: int  # bytes of an activation element (the compute dtype)
    ca: int  # bytes of the attention's saved tensors (autocast runs SDPA in bf16/fp16 even over float32)
    full: bool  # the layer's own weights train (their inputs are saved)
    lora_inputs: tuple[int, ...]  # in_features of each LoRA-wrapped Linear of one layer
    lora_r: int
    lora_dropout: float
    # bytes of a saved LoRA input element: float32 adapters, the autocast dtype under autocast
    lora_saved: int
    mask_bytes: int  # dropout mask element: bool on CUDA, the input's dtype on the CPU
    key_ratio: float  # keys per query token: (tokens + prefix) / tokens
    masked: bool  # an attention mask goes to every layer (padded batches, prefix, prefix-LM)
    mask_len: int  # keys per query row of that mask
    inputs_kept: bool  # frozen Linear layers keep their input anyway (bitsandbytes' 8-bit matmul does)
    rope_rows: int  # rows sharing one rotary table


def _lora_bytes(k: _Act) -> float:
    """Per token, the LoRA branches of one layer: dropout mask and output (or the input itself when
    dropout is 0), and the r-dimensional lora_A output, for each wrapped Linear."""
    total = 0.0
    for n in k.lora_inputs:
        total += k.lora_r * k.lora_saved
        if k.lora_dropout > 0:
            total += n * (k.mask_bytes + k.lora_saved)
        elif not (k.full and k.lora_saved == k.c):
            total += n * k.lora_saved
    return total


def _gated_layer(s: Shape, k: _Act) -> float:
    """Bytes per token autograd saves in one GlmDecoderLayer (RMSNorm, GQA attention, SwiGLU MLP)."""
    c, h, f = k.c, s.hidden, s.ffn
    q = s.heads * s.head_dim
    # Each RMSNorm upcasts its input to float32 (saved by pow) and saves rsqrt (1 float); with trainable
    # weights also the normalized input (cast back) and the output the next Linear reads.
    norms = 2 * (4 * h + 4 + (2 * c * h if k.full else 0))
    # GLM repeats the cos/sin tables per layer for its interleaved partial rotary: 2 x rotary_dim.
    rope = 2 * s.rotary_dim * c / k.rope_rows
    # SDPA keeps q, k and v (k, v repeated to every query head: glmtune's per-example attention and
    # masked batches repeat them), its output and a float32 logsumexp per head.
    ca = k.ca
    attention = 2 * q * ca + 2 * q * ca * k.key_ratio + 4 * s.heads
    if k.full:
        attention += q * ca  # o_proj's input: the output transposed to [tokens, heads x dim] (a copy)
    if k.masked:
        attention += k.mask_len * ca  # the mask, converted to the query dtype in every layer
    # gate_up (2 ffn, kept by SiLU and the product), SiLU's output; down_proj's input when it trains.
    mlp = 3 * f * c + (f * c if k.full else 0)
    return norms + rope + attention + mlp + _lora_bytes(k)


def _v1_layer(s: Shape, k: _Act) -> float:
    """Bytes per token autograd saves in one ChatGLMv1Block (LayerNorm, fused QKV, GELU MLP)."""
    c, h, f = k.c, s.hidden, s.ffn
    # LayerNorm keeps its input and a float32 mean and rstd; with trainable weights the output too.
    norms = 2 * (c * h + 8 + (c * h if k.full else 0))
    # SDPA keeps the rotated q and k, v (k, v with the prefix), its output (dense reads it in place), the
    # logsumexp, and the prefix-LM mask converted to the query dtype in every layer.
    ca = k.ca
    attention = ca * h + 2 * ca * h * k.key_ratio + ca * h + 4 * s.heads + k.mask_len * ca
    # dense_h_to_4h's output (kept by GELU); GELU's output when dense_4h_to_h trains.
    mlp = f * c + (f * c if k.full else 0)
    return norms + attention + mlp + _lora_bytes(k)


def _gated_head(s: Shape, k: _Act) -> float:
    """Bytes per token outside GLM's layers: the final RMSNorm (as in a layer)."""
    return 4 * s.hidden + 4 + (k.c * s.hidden if k.full else 0)


def _v1_head(s: Shape, k: _Act) -> float:
    """Bytes per token outside ChatGLM-6B's layers: the final LayerNorm, the 2D rotary cos/sin tables
    (float32, head_dim each) every layer reads, and the bool prefix-LM mask."""
    c, h = k.c, s.hidden
    return c * h + 8 + (c * h if k.full else 0) + 2 * 4 * s.head_dim + k.mask_len


@dataclass(frozen=True)
class _Layout:
    """The per-token terms of one ``ModelSpec.activation_layout``."""

    layer: Callable[[Shape, _Act], float]  # one decoder layer
    # the distinct inputs of one layer's Linear layers (q/k/v share one), in elements per token
    linear_inputs: Callable[[Shape], tuple[int, ...]]
    head: Callable[[Shape, _Act], float]  # the final norm and what the layers share
    first_norm: Callable[[Shape, _Act], float]  # the first norm's input and statistics
    prefix_keeps_mask: bool  # the P-Tuning prefix goes through a dropout that keeps its mask
    # Free heap space glibc keeps at the peak of a CPU run, as a share of every layer's saved activations
    # (measured, benchmarks/plan_accuracy.py: 0.25-0.67 over 25 gated cases below the mmap ceiling,
    # 0.82-1.06 over 5 ChatGLM-6B ones, whose fused QKV and GELU temporaries are larger beside what they
    # keep; the values were fixed before the held-out cases ran).
    glibc_heap_share: float


_LAYOUTS = {
    "gated": _Layout(
        _gated_layer,
        lambda s: (s.hidden, s.heads * s.head_dim, s.hidden, s.ffn),  # q/k/v, o_proj, gate_up, down
        _gated_head,
        lambda s, k: 4 * s.hidden + 4,
        True,
        0.45,
    ),
    "chatglm_v1": _Layout(
        _v1_layer,
        lambda s: (s.hidden, s.hidden, s.hidden, s.ffn),  # qkv, dense, h_to_4h, 4h_to_h
        _v1_head,
        lambda s, k: k.c * s.hidden + 8,
        False,
        0.85,
    ),
}


def _optimizer_state_bytes(optimizer: str, trainable: int, param_bytes: int) -> tuple[int, str]:
    name = optimizer.lower()
    if "8bit" in name:
        return 2 * trainable, "2 x int8 states (bitsandbytes)"
    if "adafactor" in name:
        return 0, "factored second moments (negligible)"
    if name.startswith("sgd"):
        return 0, "no state"
    if "lion" in name or "adagrad" in name:
        return trainable * param_bytes, "1 state per parameter"
    return 2 * trainable * param_bytes, f"AdamW: 2 x {param_bytes} B per trainable parameter"


def _positive(n: int, what: str) -> int:
    if n < 1:
        raise ConfigError(f"{what} must be at least 1, got {n}")
    return n


def plan_training(
    model: ResolvedModel, settings: Settings, device: str = "cuda", *, glibc_heap: bool | None = None
) -> Plan:
    """The predicted peak memory of ``glmtune train`` with ``settings`` on one ``device`` ("cuda"/"cpu").

    ``glibc_heap``: count the free space glibc's heap keeps on the CPU (default: whether this process's
    allocator does, :func:`glibc_keeps_freed_memory`); ignored on CUDA.
    """
    st = settings
    if device not in RUNTIME_BYTES:
        raise ConfigError(f"device kind {device!r}: expected cuda or cpu")
    _positive(st.batch_size, "train.batch_size")
    _positive(st.seq_len, "the sequence length")
    ptuning = st.method == "ptuning_v2"
    shape = model_shape(model, (st.pre_seq_len, st.prefix_projection) if ptuning else None)
    wb = _bytes(st.dtype)
    quant = st.quantization
    # Activations: the compute dtype. peft's prepare_model_for_kbit_training (glmtune's QLoRA path)
    # upcasts every non-quantized weight to float32, and bitsandbytes returns outputs in the input's
    # dtype, so a quantized base computes its residual stream in float32.
    autocast = st.precision in ("bf16", "fp16")
    c = 4 if quant else (2 if autocast else wb)
    other_bytes = 4 if quant else wb  # embeddings, norms, output layer, biases

    # -- weights
    lin_bytes, how = _quantized_linear_bytes(shape, quant, wb)
    other = shape.params - shape.linear_params
    weights = lin_bytes + other * other_bytes
    wnote = (
        f"{shape.params:,} params in {st.dtype}"
        if not quant
        else (f"{shape.params:,} params: Linear layers {how}, the rest float32 (peft's k-bit preparation)")
    )

    # -- trainable parameters
    layer_inputs: tuple[int, ...] = ()
    trainable_note = ""
    adapter_params = 0
    if st.method == "lora":
        targets = st.lora_targets or model.spec.lora_targets
        wrapped = [(i, o) for name, i, o in shape.linears if _matches(name, targets)]
        if not wrapped:
            raise ConfigError(
                f"method.lora_target_modules {list(targets)}: no Linear layer of {model.source} has such a name"
            )
        adapter_params = sum(st.lora_r * (i + o) for i, o in wrapped)
        layer_inputs = tuple(i for name, i in shape.layer_linears if _matches(name, targets))
        trainable = adapter_params
        trainable_note = f"LoRA r={st.lora_r} on {', '.join(targets)}: {adapter_params:,} params, float32"
        tbytes = 4  # peft keeps adapters in float32 over a bf16/fp16 base (autocast_adapter_dtype)
    elif ptuning:
        if not model.spec.supports_ptuning:
            raise ConfigError(f"method.name=ptuning_v2: not supported for {model.spec.name} models")
        adapter_params = trainable = shape.prefix_params
        trainable_note = (
            f"P-Tuning v2 prefix encoder ({st.pre_seq_len} tokens): {trainable:,} params, float32"
        )
        tbytes = 4
    elif st.method == "full":
        if quant:
            raise ConfigError("method.name full with a quantized base: quantized weights cannot be trained")
        keep = st.freeze_layers_except_last
        trainable = keep * shape.layer_params if keep else shape.params
        trainable_note = f"{trainable:,} params" + (f" (the last {keep} layers)" if keep else " (all)")
        tbytes = wb
    else:
        raise ConfigError(f"method.name {st.method!r}: expected lora, ptuning_v2 or full")
    adapter = adapter_params * 4
    grads = trainable * tbytes
    opt_state, opt_note = _optimizer_state_bytes(st.optimizer, trainable, tbytes)
    # The step's temporaries: torch's foreach AdamW (the default on CUDA) makes the square root of every
    # second moment at once; the per-tensor loop (the CPU) the root and the quotient of one tensor at a time.
    name = st.optimizer.lower()
    if "8bit" in name or "fused" in name or not opt_state:
        step_tmp = 0  # bitsandbytes and fused kernels update in place
    elif device == "cuda":
        step_tmp = trainable * tbytes
    else:
        step_tmp = 2 * min(trainable, shape.largest_param) * tbytes

    # -- activations
    full = st.method == "full"
    rows = st.batch_size
    tokens = rows * st.seq_len
    layout = _LAYOUTS[shape.layout]
    # glmtune's padding-free rows (no mask, per-example attention) where the model allows them
    flat = model.spec.supports_packing and st.padding_free and not st.packing and not ptuning
    prefix = st.pre_seq_len if ptuning else 0
    masked = not flat  # padded rows, a prefix, ChatGLM-6B's prefix-LM: a mask in every layer
    k = _Act(
        c=c,
        ca=2 if autocast else c,
        full=full,
        lora_inputs=layer_inputs,
        lora_r=st.lora_r,
        lora_dropout=st.lora_dropout,
        lora_saved=2 if autocast else 4,
        mask_bytes=1 if device == "cuda" else 4,
        key_ratio=(st.seq_len + prefix) / st.seq_len,
        masked=masked,
        mask_len=st.seq_len + prefix if masked else 0,
        rope_rows=1 if (flat or ptuning) else rows,
        inputs_kept=quant == "8bit" and not full,
    )
    per_layer = layout.layer(shape, k)
    if k.inputs_kept:  # LLM.int8's autograd function keeps each layer's input for the input gradient
        per_layer += sum(layout.linear_inputs(shape)) * c
    # Layers that keep activations: all of them, but with only the last N layers training, nothing below
    # them needs a gradient, so nothing is saved there.
    grad_layers = st.freeze_layers_except_last if (full and st.freeze_layers_except_last) else shape.layers
    # Without trainable embeddings the first of those layers gets an input that needs no gradient: its
    # first norm keeps no input or statistics, and its LoRA dropouts keep no mask.
    first_less = 0.0
    if grad_layers < shape.layers or not full:
        first_less = layout.first_norm(shape, k) + (
            sum(layer_inputs) * k.mask_bytes if st.lora_dropout > 0 else 0
        )
    embed_trains = full and not st.freeze_layers_except_last
    # + the labelled-position mask (bool) and, when the embeddings train, their int64 indices
    head = (layout.head(shape, k) + 1 + (8 if embed_trains else 0)) * tokens
    if st.gradient_checkpointing:
        # Each layer keeps its input hidden states; one layer's activations exist while it is recomputed.
        kept = grad_layers * tokens * c * shape.hidden + per_layer * tokens
        act_note = (
            f"checkpointed: {grad_layers} layer inputs + 1 layer recomputed, "
            f"{tokens:,} tokens x {per_layer / 1024:.1f} KiB/token/layer"
        )
    else:
        kept = (grad_layers * per_layer - first_less) * tokens
        act_note = f"{grad_layers} layers x {tokens:,} tokens x {per_layer / 1024:.1f} KiB/token/layer"
    activations = int(kept + head)
    backward_transient = int(BACKWARD_TRANSIENT * per_layer * tokens)

    # -- P-Tuning prefix keys/values: [layers x 2, batch, kv heads, prefix, head_dim] made by the float32
    # encoder for the whole forward pass (and a copy in the compute dtype). GLM's prefix dropout keeps its
    # mask for the backward pass; ChatGLM-6B's encoder output is only read (the layers concatenate it).
    prefix_kv = prefix_saved = 0
    if ptuning:
        elems = shape.layers * 2 * rows * shape.kv_heads * st.pre_seq_len * shape.head_dim
        if layout.prefix_keeps_mask:
            prefix_saved = elems * (1 if device == "cuda" else 4)
        prefix_kv = elems * (4 + (c if c != 4 else 0)) + prefix_saved

    # -- logits and loss
    labelled = rows * st.labelled
    head_trains = full and not st.freeze_layers_except_last
    V, h = shape.vocab, shape.hidden
    if st.logits_at_labels_only and st.loss_chunk_size > 0:
        chunk = min(labelled, st.loss_chunk_size)
        # saved: the hidden-state gradient of the labelled rows; the output layer's weight gradient when
        # it trains. Transient: one chunk of logits, logsumexp's float32 temporary of the same size (and
        # the chunk's float32 copy under bf16/fp16).
        loss_saved = labelled * h * c + (V * h * wb if head_trains else 0)
        loss_tmp = chunk * V * (c + 4 + (4 if c != 4 else 0)) + (V * h * 4 if head_trains and wb != 4 else 0)
        loss_note = f"fused, {chunk:,} of {labelled:,} labelled positions x {V:,} vocab at a time"
    elif st.logits_at_labels_only:
        # logits of the labelled rows, their float32 log-softmax kept for the backward pass; its gradient.
        loss_saved = labelled * V * 4 + (labelled * h * c if head_trains else 0)
        loss_tmp = labelled * V * (c + 4)
        loss_note = f"{labelled:,} labelled positions x {V:,} vocab"
    else:
        # transformers' loss: logits at every position, upcast to float32, log-softmax kept; gradient.
        loss_saved = tokens * V * 4 + (tokens * h * c if head_trains else 0)
        loss_tmp = tokens * V * (c + 4)
        loss_note = f"every position: {tokens:,} x {V:,} vocab"
    logits = loss_saved + loss_tmp

    # -- autocast over float32 weights: a bf16/fp16 copy of every Linear weight lives through the forward
    # and backward pass (trainable ones in autocast's cache; frozen ones saved for the backward pass,
    # which checkpointing recomputes one layer at a time).
    cast_copies = 0
    if autocast and wb == 4 and not quant:
        cast_copies = 2 * shape.linear_params * grad_layers // shape.layers
        if st.gradient_checkpointing and not full:
            cast_copies = 2 * shape.linear_params // shape.layers

    runtime = RUNTIME_BYTES[device]
    # Phases: forward/backward (activations, loss, transients; gradients of the accumulation window when
    # grad_accum > 1) and the optimizer step (gradients and the step's temporaries).
    resident = weights + adapter + opt_state
    fwd = activations + prefix_kv + cast_copies + max(loss_saved + loss_tmp, loss_saved + backward_transient)
    if st.grad_accum > 1:
        fwd += grads
    step = grads + step_tmp
    phase = "forward/backward" if fwd >= step else "optimizer step"
    if glibc_heap is None:
        glibc_heap = glibc_keeps_freed_memory()
    heap, heap_note = 0, ""
    residual = tokens * shape.hidden * c  # bytes of one residual-stream tensor of the batch
    if device == "cpu" and glibc_heap and residual <= GLIBC_MMAP_CEILING:
        heap = int(layout.glibc_heap_share * per_layer * tokens * shape.layers)
        heap_note = (
            f"{layout.glibc_heap_share:g} x every layer's activations, free but resident; "
            "MALLOC_MMAP_THRESHOLD_=262144 returns it (slower)"
        )
    elif device == "cpu" and glibc_heap:
        heap_note = (
            f"none: a layer's tensors ({residual / 2**20:.1f} MiB and up) pass glibc's 32 MiB mmap ceiling"
        )
    total = resident + max(fwd, step) + heap + runtime
    lines = [
        Line("weights", weights, wnote),
        Line("trainable parameters", adapter, trainable_note),
        Line(
            "gradients",
            grads,
            f"{trainable:,} x {tbytes} B"
            + ("" if st.grad_accum > 1 else "; alive at the optimizer step, not with the activations"),
        ),
        Line("optimizer states", opt_state, f"{st.optimizer}: {opt_note}"),
        Line("optimizer step temporaries", step_tmp, "foreach AdamW" if device == "cuda" else "per tensor"),
        Line("activations", activations, act_note),
        Line("backward transients", backward_transient, "one layer's activation gradients"),
        Line("logits and loss", logits, loss_note),
    ]
    if prefix_kv:
        lines.append(Line("prefix keys/values", prefix_kv, f"{st.pre_seq_len} prefix tokens per layer"))
    if cast_copies:
        lines.append(
            Line("autocast weight copies", cast_copies, f"{st.precision} copies of float32 Linear weights")
        )
    if heap_note:
        lines.append(Line("freed memory glibc keeps", heap, heap_note))
    lines.append(Line("runtime", runtime, "CUDA context" if device == "cuda" else "Python, torch, data"))
    detail = {
        "per_layer": per_layer,
        "head": head / tokens,
        "tokens": tokens,
        "loss_saved": loss_saved,
        "loss_tmp": loss_tmp,
        "prefix_kv": prefix_kv,
        "prefix_saved": prefix_saved,
        "forward_backward": fwd,
        "step": step,
        "resident": resident,
        "glibc_heap": heap,
    }
    return Plan("train", device, st, shape, tuple(lines), int(total), phase, trainable, detail)


def plan_serving(
    model: ResolvedModel, settings: Settings, device: str = "cuda", *, glibc_heap: bool | None = None
) -> Plan:
    """The predicted peak memory of generating for ``batch_size`` sequences of ``prompt_len`` +
    ``max_new_tokens`` tokens (``glmtune serve`` / ``chat`` / ``predict``); ``glibc_heap`` as in
    :func:`plan_training`."""
    st = settings
    if device not in RUNTIME_BYTES:
        raise ConfigError(f"device kind {device!r}: expected cuda or cpu")
    _positive(st.batch_size, "the batch size")
    ptuning = st.method == "ptuning_v2"
    shape = model_shape(model, (st.pre_seq_len, st.prefix_projection) if ptuning else None)
    wb = _bytes(st.dtype)
    quant = st.quantization
    # bitsandbytes layers compute in the model's dtype (glmtune.quantize.StreamQuantizer's compute_dtype:
    # bf16/fp16 on a GPU, float32 by default on the CPU), int8-cpu too; int8-dynamic in float32. The
    # layers that stay float (embeddings, norms, output layer) are in the model's dtype.
    c = 4 if quant == "int8-dynamic" else wb
    lin_bytes, how = _quantized_linear_bytes(shape, quant, wb)
    other_b = c
    weights = lin_bytes + (shape.params - shape.linear_params) * other_b + shape.prefix_params * 4
    adapter = 0
    if (
        st.method == "lora" and not quant
    ):  # a LoRA adapter stays beside unquantized weights (merged otherwise)
        targets = st.lora_targets or model.spec.lora_targets
        adapter = 4 * sum(st.lora_r * (i + o) for name, i, o in shape.linears if _matches(name, targets))
    rows = st.batch_size
    prefix = st.pre_seq_len if ptuning else 0
    context = st.prompt_len + st.max_new_tokens + prefix
    kv_heads = shape.kv_heads
    kv_cache = shape.layers * 2 * kv_heads * shape.head_dim * context * rows * c
    # Prefill: one layer's working set over the prompt (hidden states, the MLP's intermediates, the
    # left-padding mask in the query dtype) and the last position's logits (float32 scores too).
    t = st.prompt_len + prefix
    prefill = rows * st.prompt_len * (3 * shape.hidden + 4 * shape.ffn) * c + rows * st.prompt_len * t * c
    logits = rows * shape.vocab * (c + 8)
    runtime = RUNTIME_BYTES[device]
    # On the CPU under glibc's default policy the prefill's freed working set stays in the heap while the
    # decoding steps allocate the growing KV cache elsewhere: measured at 1.0x the prefill line
    # (benchmarks/plan_accuracy.py --serve); none when the prefill's tensors pass the mmap ceiling.
    if glibc_heap is None:
        glibc_heap = glibc_keeps_freed_memory()
    residual = rows * st.prompt_len * shape.hidden * c
    heap = prefill if device == "cpu" and glibc_heap and residual <= GLIBC_MMAP_CEILING else 0
    total = weights + adapter + kv_cache + prefill + heap + logits + runtime
    lines = (
        Line(
            "weights",
            weights,
            f"{shape.params:,} params in {st.dtype}" + (f", Linear layers {how}" if how else ""),
        ),
        Line("trainable parameters", adapter, "LoRA adapter kept beside the weights" if adapter else ""),
        Line(
            "KV cache",
            kv_cache,
            f"{shape.layers} layers x 2 x {kv_heads} kv heads x {shape.head_dim} x "
            f"{context:,} tokens x {rows} sequences",
        ),
        Line("prefill working set", prefill, f"one layer over {rows} x {st.prompt_len:,} prompt tokens"),
        Line("logits", logits, f"last position x {shape.vocab:,} vocab, float32 scores"),
    )
    if heap:
        lines += (Line("freed memory glibc keeps", heap, "the prefill's working set, free but resident"),)
    lines += (Line("runtime", runtime, "CUDA context" if device == "cuda" else "Python, torch"),)
    return Plan("serve", device, st, shape, lines, int(total), "generation", 0)


# ---------------------------------------------------------------------------------------- capacity
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}


def parse_memory(text: str) -> int:
    """``"24GiB"`` / ``"24G"`` (binary), ``"24GB"`` (decimal), ``"80 GiB"``, ``"16000MiB"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ConfigError(f"--memory {text!r}: expected a size such as 24GiB, 80GB or 16000MiB")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"--memory {text!r}: must be more than 0")
    return int(value)


def device_capacity(device: str) -> tuple[int, str]:
    """(total memory in bytes, description) of ``cuda``, ``cuda:N`` or ``cpu``."""
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: no CUDA GPU here; give its size with --memory (e.g. 24GiB)"
            )
        index = int(device.partition(":")[2] or 0)
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), f"{device} ({props.name})"
    if device == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total), "this machine's RAM"
    raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N")


# ------------------------------------------------------------------------------------- suggestions
@dataclass(frozen=True)
class Suggestion:
    """A change to the config (the overrides to type) and the plan it gives."""

    what: str
    overrides: tuple[str, ...]
    plan: Plan


def _what_ifs(plan: Plan) -> list[tuple[str, tuple[str, ...], Settings]]:
    st = plan.settings
    out = []
    if plan.mode == "train":
        if st.quantization is None and st.method in ("lora", "ptuning_v2"):
            out.append(
                (
                    "4-bit base" + (" (QLoRA)" if st.method == "lora" else ""),
                    ("model.quantization=4bit",),
                    dataclasses.replace(st, quantization="4bit"),
                )
            )
        if st.method == "full":
            out.append(
                (
                    "LoRA instead of full fine-tuning",
                    ("method.name=lora",),
                    dataclasses.replace(st, method="lora"),
                )
            )
            out.append(
                (
                    "4-bit base with LoRA (QLoRA) instead of full fine-tuning",
                    ("method.name=lora", "model.quantization=4bit"),
                    dataclasses.replace(st, method="lora", quantization="4bit"),
                )
            )
            if "8bit" not in st.optimizer:
                out.append(
                    (
                        "8-bit AdamW (bitsandbytes)",
                        ("train.optimizer=paged_adamw_8bit",),
                        dataclasses.replace(st, optimizer="paged_adamw_8bit"),
                    )
                )
        if not st.gradient_checkpointing:
            out.append(
                (
                    "gradient checkpointing",
                    ("train.gradient_checkpointing=true",),
                    dataclasses.replace(st, gradient_checkpointing=True),
                )
            )
    else:
        if st.quantization != "4bit":
            out.append(
                ("4-bit weights", ("model.quantization=4bit",), dataclasses.replace(st, quantization="4bit"))
            )
        if st.dtype == "float32" and st.quantization is None:
            out.append(("bf16 weights", ("model.dtype=bfloat16",), dataclasses.replace(st, dtype="bfloat16")))
    if st.batch_size > 1:
        half = st.batch_size // 2
        accum = st.grad_accum * st.batch_size // half if plan.mode == "train" else st.grad_accum
        ov = (f"train.batch_size={half}",) + ((f"train.grad_accum={accum}",) if plan.mode == "train" else ())
        what = "batch halved" + (
            " (grad_accum doubled: same examples per step)" if plan.mode == "train" else ""
        )
        out.append((what, ov, dataclasses.replace(st, batch_size=half, grad_accum=accum)))
    if st.length_keys == ("data.max_length",) and st.seq_len >= 64:
        n = st.seq_len // 2
        out.append(
            (
                "shorter cut-off",
                (f"data.max_length={n}",),
                dataclasses.replace(
                    st, seq_len=n, labelled=min(st.labelled, n), prompt_len=min(st.prompt_len, n)
                ),
            )
        )
    elif st.length_keys != ("data.max_length",):
        src = max(1, (st.prompt_len - TEMPLATE_TOKENS) // 2)
        tgt = max(1, (st.labelled - 1) // 2)
        if src + tgt >= 32:
            seq = src + tgt + TEMPLATE_TOKENS
            out.append(
                (
                    "shorter cut-off",
                    (f"data.max_source_length={src}", f"data.max_target_length={tgt}"),
                    dataclasses.replace(st, seq_len=seq, labelled=tgt + 1, prompt_len=src + TEMPLATE_TOKENS),
                )
            )
    return out


def suggestions(model: ResolvedModel, plan: Plan, capacity: int | None = None) -> list[Suggestion]:
    """Each single change with its predicted total, then (when ``capacity`` is given and none of them
    fits alone) the changes combined, biggest saving first, until the plan fits or none is left."""
    replan = plan_training if plan.mode == "train" else plan_serving
    singles = []
    for what, overrides, st in _what_ifs(plan):
        candidate = replan(model, st, plan.device)
        if candidate.total < plan.total:  # only changes that lower the peak
            singles.append(Suggestion(what, overrides, candidate))
    singles.sort(key=lambda s: s.plan.total)
    if capacity is None or any(s.plan.total <= capacity for s in singles) or len(singles) < 2:
        return singles
    # Combine: apply the changes in order of saving, re-planning each time.
    current, names, overrides = plan, [], ()
    for s in singles:
        merged = _merge(current.settings, s.plan.settings, plan.settings)
        candidate = replan(model, merged, plan.device)
        if candidate.total < current.total:
            current, names, overrides = candidate, names + [s.what], overrides + s.overrides
        if current.total <= capacity:
            break
    if names:
        singles.append(Suggestion(" + ".join(names), overrides, current))
    return singles


def _merge(current: Settings, changed: Settings, base: Settings) -> Settings:
    """``current`` with the fields ``changed`` differs in from ``base``."""
    updates = {
        f.name: getattr(changed, f.name)
        for f in dataclasses.fields(Settings)
        if getattr(changed, f.name) != getattr(base, f.name)
    }
    return dataclasses.replace(current, **updates)


# ---------------------------------------------------------------------------------------- display
def format_bytes(n: float) -> str:
    """Bytes as GiB with one decimal (MiB below 1 GiB)."""
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"


def render(plan: Plan, *, capacity: int | None = None, where: str = "", tips: list[Suggestion] = ()) -> str:
    """The breakdown table, the total, whether it fits ``capacity`` and the suggestions, as text."""
    st = plan.settings
    s = plan.shape
    what = (
        f"training, method {st.method}"
        + (f" r={st.lora_r}" if st.method == "lora" else "")
        + (f" on a {st.quantization} base" if st.quantization else "")
        if plan.mode == "train"
        else "serving" + (f" with {st.quantization} weights" if st.quantization else "")
    )
    if plan.mode == "train":
        shape = f"batch {st.batch_size} x {st.seq_len:,} tokens, {st.dtype} weights, precision {st.precision}"
        if st.gradient_checkpointing:
            shape += ", gradient checkpointing"
    else:
        shape = f"{st.batch_size} sequences x ({st.prompt_len:,} prompt + {st.max_new_tokens:,} new tokens), {st.dtype}"
    head = [
        f"{what}: {s.params / 1e9:.2f}B parameters, {s.layers} layers, hidden {s.hidden}, vocab {s.vocab:,}",
        f"{shape}; estimated for {'a CUDA GPU' if plan.device == 'cuda' else 'the CPU'}",
        "",
    ]
    width = max(len(line.name) for line in plan.lines) + 2
    rows = [
        f"  {line.name:<{width}}{format_bytes(line.bytes):>10}   {line.note}"
        for line in plan.lines
        if line.bytes or line.note
    ]
    rows.append("  " + "-" * (width + 10))
    rows.append(f"  {'predicted peak':<{width}}{format_bytes(plan.total):>10}   (at the {plan.phase})")
    if plan.mode == "train":
        rows += [
            "  (only what is alive at once is added up: the loss's temporaries and the backward transients",
            "   come one after the other; at the optimizer step the gradients replace the activations)",
        ]
    out = head + rows
    if plan.mode == "train" and st.deepspeed:
        out.append("  (train.deepspeed: ZeRO splits optimizer states, gradients and, with stage 3, weights")
        out.append("   across the GPUs and keeps float32 master weights; the plan is for one GPU without it)")
    if capacity is not None:
        out.append("")
        if plan.total <= capacity:
            out.append(
                f"fits {where or 'the device'} ({format_bytes(capacity)}): {format_bytes(capacity - plan.total)} to spare"
            )
        else:
            out.append(
                f"does NOT fit {where or 'the device'} ({format_bytes(capacity)}): "
                f"{format_bytes(plan.total - capacity)} short"
            )
    if tips:
        out.append("")
        out.append("what would change it (predicted peak after the change):")
        for tip in tips:
            mark = ""
            if capacity is not None:
                mark = "  fits" if tip.plan.total <= capacity else "  does not fit"
            out.append(f"  {format_bytes(tip.plan.total):>10}{mark}: {tip.what}: {' '.join(tip.overrides)}")
    return "\n".join(out) + "\n"


def _hub_configs(model_id: str) -> str:
    """A hub id's config files alone (the hub cache's snapshot folder), or the id itself when they cannot
    be fetched (resolve_model then reports why). ``resolve_model`` would fetch the whole snapshot."""
    from .resolve import is_hub_id

    if Path(model_id).exists() or model_id == "default" or not is_hub_id(model_id):
        return model_id
    repo, _, revision = model_id.partition("@")
    if repo.startswith("modelscope:") or os.environ.get("USE_MODELSCOPE_HUB"):
        return model_id
    try:
        from huggingface_hub import snapshot_download

        # Read at call time, as resolve.hub_snapshot does (huggingface_hub reads them once, at import).
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        cache = os.environ.get("HF_HUB_CACHE") or (
            str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None
        )
        return snapshot_download(
            repo,
            revision=revision or None,
            cache_dir=cache,
            allow_patterns=["config.json", "tokenizer_config.json"],
            local_files_only=offline,
        )
    except Exception:  # noqa: BLE001  (any failure: resolve_model's own error names the cause)
        return model_id


def plan_config(
    cfg, *, serve: bool = False, device: str = "cuda", glibc_heap: bool | None = None
) -> tuple[ResolvedModel, Plan]:
    """Resolve the config's model (config.json only; a hub id fetches its config files, not the
    weights) and plan training or serving it (``glibc_heap``: see :func:`plan_training`)."""
    m = cfg.model
    quant = None if m.quantization in (None, "none") else m.quantization
    resolved = resolve_model(
        _hub_configs(str(m.path)),
        generation=m.generation,
        dtype=m.dtype,
        device="cpu",  # nothing is loaded; the device only decides defaults glmtune plan does not use
        quantization=quant,
        trust_remote_code=m.trust_remote_code,
    )
    settings = settings_of(cfg)
    if serve:
        return resolved, plan_serving(resolved, settings, device, glibc_heap=glibc_heap)
    return resolved, plan_training(resolved, settings, device, glibc_heap=glibc_heap)


def report(
    cfg,
    *,
    serve: bool = False,
    device: str | None = None,
    memory: str | int | None = None,
    as_json: bool = False,
) -> tuple[str, bool | None]:
    """What ``glmtune plan`` prints for a run config, and whether it fits (None: no capacity given).

    ``device`` (cuda, cuda:N, cpu) picks the kernels the estimate assumes and, without ``memory``, the
    capacity (the device's total memory); ``memory`` (24GiB, 80GB, or bytes) alone means a CUDA GPU of
    that size.
    """
    kind = "cpu" if device == "cpu" else "cuda"
    capacity, where = None, ""
    if memory is not None:
        capacity = memory if isinstance(memory, int) else parse_memory(memory)
        where = device or "a CUDA GPU"
    elif device is not None:
        capacity, where = device_capacity(device)
    resolved, plan = plan_config(cfg, serve=serve, device=kind)
    fits = None if capacity is None else plan.total <= capacity
    tips = [] if fits else suggestions(resolved, plan, capacity)
    if as_json:
        out = plan.to_dict()
        out.update(
            capacity_bytes=capacity,
            fits=fits,
            suggestions=[
                {"change": t.what, "overrides": list(t.overrides), "total_bytes": t.plan.total} for t in tips
            ],
        )
        return json.dumps(out, indent=2), fits
    return render(plan, capacity=capacity, where=where, tips=tips), fits

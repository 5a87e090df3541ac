"""Load models, tokenizers and adapters from local folders without running the folder's code.

Official ChatGLM checkpoints are streamed shard by shard, tensor by tensor, into a model whose
parameters start on the meta device, so peak memory stays near one copy of the weights. With a
quantization, the Linear layers of that empty model are replaced first and each weight is quantized as
it arrives (``glmtune.quantize.StreamQuantizer``): the float model is never held. Every failure names
the file and the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .adapters import PREFIX_KEY, adapter_kind, apply_lora, init_prefix, load_prefix, ptuning_settings
from .atomic import atomic_dir
from .errors import ConfigError, ModelLoadError
from .quantize import (
    BNB_MODES,
    StreamQuantizer,
    hf_quantization_config,
    mark_quantized,
    quantize_for_inference,
)
from .resolve import ResolvedModel, resolve_model
from .specs import GLMTUNE_GENERATION_KEY, find_gguf, read_json
from .weights import WEIGHT_FILES, WEIGHT_INDEXES, check_folder, index_shards, iter_tensors, weight_files

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- assignment
def _owner(model: nn.Module, name: str, source: Path) -> tuple[nn.Module, str]:
    """The module a weight name belongs to, and the attribute."""
    module_name, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(module_name) if module_name else model), attr
    except AttributeError:
        raise ModelLoadError(f"{source}: unexpected weight {name!r} (no such module in the model)") from None


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, source: Path) -> None:
    module, attr = _owner(model, name, source)
    if attr in module._parameters:
        current = module._parameters[attr]
        # A ZeRO-3 partitioned parameter holds an empty tensor; ds_shape is its full shape.
        shape = getattr(current, "ds_shape", None) or (current.shape if current is not None else None)
        if current is None or tuple(shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(shape) if current is not None else None} (config.json does not match the weights)"
            )
        if hasattr(current, "ds_id"):
            _load_partitioned(current, tensor)
        else:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=current.requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise ModelLoadError(f"{source}: unexpected weight {name!r}")


def stream_into(
    model: nn.Module,
    files: list[Path],
    mapper: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]],
    dtype: torch.dtype,
    skip: Callable[[str], bool] = lambda name: False,
    keep_fp32: Callable[[str], bool] = lambda name: False,
    inspect: Callable[[Path, str, torch.Tensor], None] | None = None,
    quantizer: StreamQuantizer | None = None,
) -> set[str]:
    """Read every tensor of ``files``, map its name, cast floats to ``dtype``, put it into ``model``.

    ``inspect(file, key, tensor)`` sees every stored tensor as read, skipped ones included.
    ``quantizer`` (its ``prepare`` already run on ``model``) takes the weights of its quantized layers as
    they arrive, uncast: each is quantized and dropped before the next tensor is read.
    """
    from .progress import Progress

    loaded: set[str] = set()
    # Progress in MiB read of the files' total (a count and an ETA on stderr for a long load).
    total_mib = max(1, sum(f.stat().st_size for f in files) >> 20)
    read = shown = 0
    with Progress(total_mib, "loading weights", "MiB") as bar:
        for file in files:
            for key, tensor in iter_tensors(file):
                read += tensor.numel() * tensor.element_size()
                bar.update(min(read >> 20, total_mib) - shown)
                shown = min(read >> 20, total_mib)
                _stream_one(
                    model, file, key, tensor, mapper, dtype, skip, keep_fp32, inspect, quantizer, loaded
                )
        bar.update(total_mib - shown)  # every file read (headers and rounding are not counted above)
    return loaded


def _stream_one(model, file, key, tensor, mapper, dtype, skip, keep_fp32, inspect, quantizer, loaded) -> None:
    """One stored tensor into ``model`` (see :func:`stream_into`)."""
    if inspect is not None:
        inspect(file, key, tensor)
    for name, t in mapper(key, tensor) if not skip(key) else []:
        if name in loaded:
            raise ModelLoadError(f"{file}: weight {name!r} appears twice")
        loaded.add(name)
        if quantizer is not None and quantizer.load(_owner(model, name, file)[0], name, t, file):
            continue
        if t.is_floating_point():
            t = t.to(torch.float32 if keep_fp32(name) else dtype)
        _set_tensor(model, name, t, file)


def _check_missing(
    model: nn.Module,
    path: Path,
    allowed_missing: Callable[[str], bool] = lambda n: False,
    quantizer: StreamQuantizer | None = None,
) -> None:
    missing = [
        n
        for n, p in model.named_parameters()
        if (p.is_meta or (hasattr(p, "ds_id") and not getattr(p, _ZERO3_LOADED, False)))
        and not allowed_missing(n)
    ]
    missing += [n for n in (quantizer.pending(model) if quantizer else ()) if not allowed_missing(n)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelLoadError(f"{path}: weights missing from the checkpoint: {shown}")


# The most parameters one byte of a weight file can hold (1-bit quantized exports): a config.json that
# asks for more parameters than that is refused before anything is built.
_MAX_PARAMS_PER_BYTE = 8


def _dim(cfg, *names: str, required: bool = False) -> int | None:
    """A size field of a config (object or dict): a positive int, None when absent, else an error."""
    for name in names:
        value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelLoadError(f"config field {name}={value!r}: expected a positive integer")
        return value
    if required:
        raise ModelLoadError(f"config field {names[0]} is missing or null: expected a positive integer")
    return None


def _check_size(config_file: Path, estimate: Callable[[], int], files: list[Path]) -> None:
    """Refuse a config.json that describes a model far larger than its weight files hold.

    Runs before the model is built: an absurd config (hidden_size 10**7, a million layers) would
    otherwise allocate buffers or spend minutes building modules before any weight is read.
    ``estimate()``: a lower bound on the parameter count (the large matrices only).
    """
    try:
        params = estimate()
    except ModelLoadError as e:
        raise ModelLoadError(f"{config_file}: {e}") from None
    held = sum(f.stat().st_size for f in files)
    if params > _MAX_PARAMS_PER_BYTE * (held + (1 << 20)):  # integers: params may exceed any float
        raise ModelLoadError(
            f"{config_file}: describes a model of at least {params:,} parameters, but the weight files "
            f"hold only {held:,} bytes ({', '.join(f.name for f in files[:4])}"
            f"{', ...' if len(files) > 4 else ''}); config.json does not match the weights, refused "
            "before building the model"
        )


def _tensor_count(files: list[Path]) -> int | None:
    """How many tensors the weight files hold, from the safetensors headers alone (None: unknown)."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for file in files:
        if file.suffix != ".safetensors":
            return None
        try:
            with safe_open(str(file), framework="pt") as f:
                total += len(f.keys())
        except (SafetensorError, OSError):
            return None  # the load reports the corrupt file itself
    return total


def _check_layers(config_file: Path, layers: int | None, files: list[Path]) -> None:
    """Every layer holds at least one weight: more layers than tensors is a config that does not match
    the weights (and building a million layers, even without memory, would take minutes)."""
    tensors = _tensor_count(files) if layers else None
    if tensors is not None and layers > tensors:
        raise ModelLoadError(
            f"{config_file}: {layers:,} layers, but the weight files hold only {tensors:,} tensors; "
            "config.json does not match the weights, refused before building the model"
        )


def _glm_params(config) -> int:
    vocab, hidden, layers, ffn, heads, kv, head_dim = (
        _dim(config, name, required=True)
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
    )
    attention = hidden * head_dim * (2 * heads + 2 * kv)  # q, o; k, v
    return 2 * vocab * hidden + layers * (attention + 3 * hidden * ffn)


def _v1_params(config) -> int:
    vocab, hidden, layers, inner = (
        _dim(config, name, required=True)
        for name in ("vocab_size", "hidden_size", "num_layers", "inner_hidden_size")
    )
    return vocab * hidden + layers * (4 * hidden * hidden + 2 * hidden * inner)


def _hf_params(cfg: dict) -> int:
    """A lower bound for any transformers causal LM: the embedding and one hidden x hidden per layer.

    Lenient: a field that is absent or not a positive integer counts as unknown (transformers checks
    its own configs); only sizes that are plainly given are compared with the weight files.
    """
    cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg

    def dim(*names: str) -> int:
        try:
            return _dim(cfg, *names) or 0
        except ModelLoadError:
            return 0

    # A hidden size of 0 must not hide a billion layers: each layer counts for at least one parameter.
    hidden = max(dim("hidden_size", "d_model", "n_embd"), 1)
    return hidden * dim("vocab_size") + dim("num_hidden_layers", "num_layers", "n_layer") * hidden * hidden


def _hf_layers(cfg: dict) -> int | None:
    cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    try:
        return _dim(cfg, "num_hidden_layers", "num_layers", "n_layer")
    except ModelLoadError:
        return None


def _hf_meta_params(path: Path, trust_remote_code: bool) -> int:
    """The parameter count of a transformers folder's model, built on the meta device (no memory).

    0 when it cannot be built: ``from_pretrained`` then reports what is wrong with the folder.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"), _outside_zero3():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:
        return 0
    return sum(p.numel() for p in model.parameters())


def _empty_model(cls, config) -> nn.Module:
    from accelerate import init_empty_weights

    if _zero3():
        return _zero3_model(cls, config)
    # Parameters on the meta device (no memory); buffers such as rotary tables are real.
    with init_empty_weights(include_buffers=False):
        return cls(config)


# -------------------------------------------------------------------------------- DeepSpeed ZeRO-3
# Under ZeRO-3 (a live HfDeepSpeedConfig: the Trainer's TrainingArguments with a ZeRO-3 config, or
# accelerate's DeepSpeed plugin with zero3_init_flag) the official-layout readers build the model
# already partitioned across the ranks and load each tensor into its partition, as transformers'
# from_pretrained does for its own models: no rank ever holds the whole model.
_ZERO3_LOADED = "_glmtune_loaded"  # set on a partitioned parameter once its tensor is in


def _zero3() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _zero3_model(cls, config) -> nn.Module:
    """``cls(config)`` built under ``deepspeed.zero.Init``: each parameter is partitioned as it is made
    (this rank keeps 1/world of it), with transformers' weight init skipped (every weight is loaded)."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import deepspeed_config, prevent_arange_dtype_change

    # prevent_arange_dtype_change must come before zero.Init (rotary tables keep their dtype).
    with no_init_weights(), prevent_arange_dtype_change():
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
            return cls(config)


def _outside_zero3():
    """A context in which transformers builds models as without ZeRO-3: under ZeRO-3 ``from_config``
    would build a partitioned, randomly initialised model (collectively), not a meta-device one.
    transformers' own flag for "zero.Init already entered" (its nested from_pretrained calls use it)."""
    if not _zero3():
        return contextlib.nullcontext()
    from transformers.modeling_utils import set_zero3_state

    return set_zero3_state()


def _load_partitioned(param: nn.Parameter, tensor: torch.Tensor) -> None:
    """Copy ``tensor`` (the full weight, read by every rank) into a ZeRO-3 partitioned ``param``.

    DeepSpeed's pattern (``GatheredParameters`` docs, transformers' ``_load_state_dict_into_zero3_model``):
    the parameter is gathered whole for the moment, rank 0 writes it, and on leaving the block rank 0's
    copy is broadcast and re-partitioned. Collective: every rank loads the same tensors in the same order.
    """
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if deepspeed.comm.get_rank() == 0:
            with torch.no_grad():
                param.data.copy_(tensor)
    setattr(param, _ZERO3_LOADED, True)


def _tie_if_needed(model: nn.Module) -> None:
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


# ----------------------------------------------------------------------------------------- models
def _load_glm_official(
    path: Path,
    cfg: dict,
    dtype: torch.dtype,
    ptuning: tuple[int, bool] | None,
    quantizer: StreamQuantizer | None = None,
):
    from transformers import GlmForCausalLM

    from .models.glm_official import glm_config_from_official, official_to_native
    from .models.glm_prefix import GlmPrefixForCausalLM

    config_file = path / "config.json"
    try:
        config = glm_config_from_official(cfg, str(config_file))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ModelLoadError(f"{config_file}: cannot build the model from it: {e}") from None
    files = weight_files(path)
    _check_size(config_file, lambda: _glm_params(config), files)
    _check_layers(config_file, config.num_hidden_layers, files)
    # As for ChatGLM-6B: a prefix comes from the adapter (or starts fresh) when one is given; otherwise a
    # folder whose own config.json has pre_seq_len (save_official of a prefixed model) holds its prefix
    # encoder (float32) among its weights.
    own_prefix = not ptuning and bool(cfg.get("pre_seq_len"))
    if own_prefix:
        try:
            ptuning = (_dim(cfg, "pre_seq_len"), bool(cfg.get("prefix_projection", False)))
        except ModelLoadError as e:
            raise ModelLoadError(f"{config_file}: {e}") from None
    cls = GlmForCausalLM
    if ptuning:
        config.pre_seq_len, config.prefix_projection = ptuning
        cls = GlmPrefixForCausalLM
    model = _empty_model(cls, config)
    if quantizer is not None:
        quantizer.prepare(model)
    stream_into(
        model,
        files,
        lambda k, t: official_to_native(k, t, config),
        dtype,
        skip=lambda k: k.startswith(PREFIX_KEY) and not own_prefix,
        keep_fp32=lambda n: n.startswith("prefix_encoder."),
        quantizer=quantizer,
    )
    _check_missing(
        model,
        path,
        allowed_missing=lambda n: not own_prefix and n.startswith("prefix_encoder."),
        quantizer=quantizer,
    )
    return model


def _load_chatglm_v1(
    path: Path,
    cfg: dict,
    dtype: torch.dtype,
    ptuning: tuple[int, bool] | None,
    quantizer: StreamQuantizer | None = None,
):
    from .models.chatglm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM

    config_file = path / "config.json"
    try:
        # Either spelling of the model_type ("chatglm" official, "chatglm6b" glmtune's own save).
        config = ChatGLMv1Config.from_official(cfg)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, NotImplementedError) as e:
        raise ModelLoadError(f"{config_file}: cannot build the model from it: {e}") from None
    files = weight_files(path)
    _check_size(config_file, lambda: _v1_params(config), files)
    _check_layers(config_file, config.num_layers, files)
    # A P-Tuning v2 prefix comes from the adapter (or starts fresh) when one is given; otherwise a folder
    # whose own config.json has pre_seq_len holds its prefix encoder (float32) among its weights.
    own_prefix = not ptuning and config.pre_seq_len is not None
    if ptuning:
        config.pre_seq_len, config.prefix_projection = ptuning
    model = _empty_model(ChatGLMv1ForCausalLM, config)
    if quantizer is not None:
        quantizer.prepare(model)
    tied = getattr(config, "tie_word_embeddings", True)
    stream_into(
        model,
        files,
        lambda k, t: [(k, t)],
        dtype,
        # inv_freq is recomputed (the original ignores the stored copy); a tied lm_head is the embedding.
        skip=lambda k: (
            k.endswith("rotary_emb.inv_freq")
            or (k.startswith(PREFIX_KEY) and not own_prefix)
            or (tied and k == _V1_HEAD)
        ),
        keep_fp32=lambda n: n.startswith(PREFIX_KEY),
        inspect=_TiedHeadCheck() if tied else None,
        quantizer=quantizer,
    )
    _tie_if_needed(model)
    _check_missing(
        model, path, allowed_missing=lambda n: not own_prefix and ".prefix_encoder." in n, quantizer=quantizer
    )
    return model


_V1_HEAD, _V1_EMBED = "lm_head.weight", "transformer.word_embeddings.weight"


class _TiedHeadCheck:
    """A stored ``lm_head.weight`` of a tied ChatGLM-6B must equal the word embeddings.

    The official model ties its output layer to ``transformer.word_embeddings.weight`` (its config.json
    has no ``tie_word_embeddings``, so transformers' default, true, applies), and official checkpoints
    may or may not store ``lm_head.weight``, equal to the embeddings. An equal copy is skipped; a
    different one is refused naming the file and key: glmtune's model ties the two, so loading would
    silently drop a trained lm_head. Streaming: whichever of the two is read first is held until the
    other is read (no extra memory when it is the tensor put into the model, or memory-mapped).
    """

    def __init__(self) -> None:
        self.pending: dict[str, tuple[Path, torch.Tensor]] = {}
        self.head_seen = False

    def __call__(self, file: Path, key: str, tensor: torch.Tensor) -> None:
        if key not in (_V1_HEAD, _V1_EMBED):
            return
        if key == _V1_HEAD:
            if self.head_seen:
                raise ModelLoadError(f"{file}: weight {_V1_HEAD!r} appears twice")
            self.head_seen = True
        self.pending[key] = (file, tensor)
        if len(self.pending) < 2:
            return
        (head_file, head), (embed_file, embed) = self.pending.pop(_V1_HEAD), self.pending.pop(_V1_EMBED)
        where = "" if embed_file == head_file else f" (in {embed_file.name})"
        if tuple(head.shape) != tuple(embed.shape):
            differs = f"has shape {tuple(head.shape)}, {_V1_EMBED!r}{where} {tuple(embed.shape)}"
        else:
            common = torch.promote_types(head.dtype, embed.dtype)
            if torch.equal(head.to(common), embed.to(common)):
                return
            differs = f"differs from {_V1_EMBED!r}{where}"
        raise ModelLoadError(
            f"{head_file}: weight {_V1_HEAD!r} {differs}, but this ChatGLM-6B ties its output layer to "
            "the word embeddings, so loading would silently drop the stored lm_head; refused. Set "
            '"tie_word_embeddings": false in config.json to load the two untied.'
        )


# ModelSpec.loader -> reader of that official layout: (folder, config.json, dtype, P-Tuning settings,
# StreamQuantizer or None).
_OFFICIAL_LOADERS: dict[str, Callable] = {
    "chatglm_v1": _load_chatglm_v1,
    "glm_official": _load_glm_official,
}


def cache_dir() -> Path:
    return Path(os.environ.get("GLMTUNE_CACHE", Path.home() / ".cache" / "glmtune"))


def gguf_as_hf_folder(gguf: Path) -> Path:
    """A transformers folder converted from a GGUF file, made once and reused.

    Reading GGUF means de-quantizing every tensor and rebuilding the tokenizer from its metadata
    (~40 s for a 135M model on 2 cores); the converted safetensors folder loads in about a second.
    The key is the file's path, size and mtime, so a changed file is converted again.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    log.info("converting %s to a transformers folder in %s (once)", gguf, out)
    try:
        # overwrite: a folder without config.json here is no conversion; another process converting the
        # same file at once swaps in an identical folder.
        with atomic_dir(out, overwrite=True) as tmp:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            # The tensors are already de-quantized to float32; drop the GGUF "quantizer" marker so the
            # result saves (and later loads) as a plain float model.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(tmp))
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
    except Exception as e:
        raise ModelLoadError(f"{gguf}: cannot read the GGUF file: {e}") from None
    return out


def _stream_hf(path: Path, files: list[Path], dtype: torch.dtype, trust_remote_code: bool, quantizer):
    """A transformers folder streamed as the official layouts are, each Linear weight quantized as it
    arrives; None when its safetensors names are not exactly the model's own (renamed or fused weights,
    .bin files, a class transformers builds differently): transformers loads those.

    Written by hand because transformers' own quantized loading keeps every tensor it read mapped and
    resident to the end of the load (and after it: the float layers still view the mapping): measured
    on the CPU, it held more than the float model at its peak.
    """
    from accelerate import init_empty_weights
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
        stored: set[str] = set()
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                stored.update(h.keys())
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError):
        return None  # transformers' from_pretrained reports what is wrong
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    expected = set(model.state_dict())
    if not stored <= expected or not expected - stored <= set(tied):
        return None
    quantizer.prepare(model)
    stream_into(model, files, lambda k, t: [(k, t)], dtype, quantizer=quantizer)
    if tied:
        model.tie_weights()
    _check_missing(model, path, quantizer=quantizer)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def _load_hf(path: Path, dtype: torch.dtype, trust_remote_code: bool, quantizer=None, device=None):
    """(model, how): "float"; "streamed" (``quantizer`` quantized each Linear weight as it arrived, see
    _stream_hf); or "transformers" (not streamable: transformers' BitsAndBytesConfig loading quantized it,
    on ``device``). An int8 mode that could not stream comes back "float", to be quantized after."""
    from transformers import AutoModelForCausalLM

    gguf = find_gguf(path)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    files: list[Path] = []
    if gguf is not None:
        path = gguf_as_hf_folder(gguf)  # glmtune's own conversion: its weights need no checks
        files = [
            f for index in WEIGHT_INDEXES if (path / index).exists() for f in index_shards(path, path / index)
        ] or [path / n for n in WEIGHT_FILES if (path / n).exists()]
    else:
        cfg = read_json(path / "config.json")
        # transformers joins the index's shard names to the folder as they are: "../x.safetensors"
        # would be read from outside it. And a config far larger than the weights is refused unbuilt.
        files = [
            f for index in WEIGHT_INDEXES if (path / index).exists() for f in index_shards(path, path / index)
        ]
        files = files or [path / n for n in WEIGHT_FILES if (path / n).exists()]
        if cfg.get("auto_map") and not trust_remote_code:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            if cfg.get("model_type") not in CONFIG_MAPPING:
                raise ModelLoadError(
                    f"{path / 'config.json'}: model_type {cfg.get('model_type')!r} is not known to glmtune or "
                    "transformers; the folder ships its own code (auto_map). Pass --trust-remote-code "
                    "(or the trust_remote_code argument) to run it, only if you trust its author."
                )
        if files:
            # A cheap lower bound first (a million layers would take minutes to build even on the meta
            # device), then the exact count of the model built on the meta device: transformers
            # allocates a parameter whose shape differs from the checkpoint's before it reports the
            # mismatch, so e.g. num_key_value_heads=10**6 would allocate gigabytes.
            _check_size(path / "config.json", lambda: _hf_params(cfg), files)
            _check_layers(path / "config.json", _hf_layers(cfg), files)
            _check_size(path / "config.json", lambda: _hf_meta_params(path, trust_remote_code), files)
    how = "float"
    if quantizer is not None:
        streamed = _stream_hf(path, files, dtype, trust_remote_code, quantizer)
        if streamed is not None:
            return streamed, "streamed"
        hf_config = hf_quantization_config(quantizer.mode, dtype)
        if hf_config is not None:
            log.info(
                "%s: weight names differ from the model's; transformers quantizes it while loading", path
            )
            kwargs.update(quantization_config=hf_config, device_map={"": device or "cpu"})
            how = "transformers"
    from huggingface_hub.errors import StrictDataclassError

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    # A config transformers' own validation refuses (StrictDataclassError), or weights whose shapes do
    # not match it (RuntimeError), is a bad folder too.
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        ArithmeticError,
        RuntimeError,
        StrictDataclassError,
    ) as e:
        if "ignore_mismatched_sizes" in str(e):  # transformers' "see the report above" message
            raise ModelLoadError(
                f"{path / 'config.json'}: does not match the weights: tensor shapes differ "
                "(transformers' loading report above lists them); refused"
            ) from None
        raise ModelLoadError(f"{path}: {e}") from None
    # transformers only warns about weights the checkpoint lacks and initialises them at random: a
    # config.json with more layers than the weights would silently give a broken model.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelLoadError(f"{path}: weights missing from the checkpoint: {shown}")
    return model, how


def load_model(
    model: str | os.PathLike | ResolvedModel,
    *,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    generation: str | None = None,
    prefix: tuple[int, bool] | None = None,
    trainable_adapter: bool = False,
    quantization: str | None = None,
):
    """Load a causal LM, optionally with a LoRA / P-Tuning adapter, optionally quantized.

    ``model`` is a :class:`ResolvedModel` (its adapter, dtype, device, quantization and generation are used
    and the keyword arguments of the same names are ignored), or a folder / GGUF file / "default" / hub id,
    resolved here with those keyword arguments (dtype/device None: the machine's defaults, float32 on the
    CPU). Returns a transformers ``PreTrainedModel`` in eval mode; ``model.config.glmtune_generation``
    names the ModelSpec entry it was loaded with.
    ``prefix=(pre_seq_len, prefix_projection)`` adds a freshly initialised P-Tuning v2 prefix encoder (to
    train one); ``trainable_adapter`` loads a LoRA adapter with its weights trainable (to continue).
    ``quantization`` (``glmtune.quantize.MODES``: int8-cpu, int8-dynamic, 8bit, 4bit) quantizes every Linear
    layer but the output layer and a P-Tuning prefix encoder as its weight streams in, in the model's dtype
    (the compute dtype): the float model is never held (except int8-cpu / int8-dynamic of a transformers
    folder, or under a LoRA adapter: loaded in float, merged, then quantized).
    """
    ref = resolve_model(
        model,
        generation=generation,
        adapter=adapter,
        dtype=dtype,
        device=device,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
    )
    path, spec, adapter = ref.path, ref.spec, ref.adapter
    if path.is_dir():
        check_folder(path)
    kind = None
    if adapter is not None:
        check_folder(adapter)
        kind = adapter_kind(adapter)
        if kind == "ptuning" and not spec.supports_ptuning:
            raise ModelLoadError(f"{adapter}: P-Tuning v2 is not supported for {spec.name} models")
    ptuning = ptuning_settings(adapter) if kind == "ptuning" else prefix
    if ptuning and not spec.supports_ptuning:
        raise ModelLoadError(f"P-Tuning v2 is not supported for {spec.name} models ({path})")
    if ptuning and _zero3():
        raise ModelLoadError(
            f"{adapter or path}: P-Tuning v2 does not run under DeepSpeed ZeRO-3 (its prefix encoder is made "
            "and loaded outside the partitioned model); use DDP or ZeRO-2 (configs/accelerate/ddp.yaml, "
            "configs/accelerate/deepspeed_zero2.yaml)"
        )

    cfg = dict(ref.config)
    # The spec names how its official layout is read; any other folder (a native -hf export, a GGUF
    # file) goes through transformers.
    layout = spec.loader if spec.is_official_folder(cfg) else "hf"
    # Quantized while streaming (the quantizer), by transformers while loading (a transformers folder whose
    # weight names are not the model's), or, where neither applies, after loading in float (quantize_after).
    quantizer = quantize_after = None
    placed = False  # transformers placed the model it quantized (device_map)
    dtype = ref.dtype
    if ref.quantization:
        if _zero3():
            raise ConfigError(
                f"quantization {ref.quantization}: not supported under DeepSpeed ZeRO-3 (partitioned weights); "
                "use DDP or ZeRO-2"
            )
        quantizer = StreamQuantizer(ref.quantization, compute_dtype=ref.dtype, device=ref.device)
        dtype = quantizer.compute_dtype
        # peft has no LoRA layer over glmtune's int8 layers: such an adapter is merged in float first.
        if kind == "lora" and quantizer.mode not in BNB_MODES:
            quantizer, quantize_after = None, quantizer.mode
    if layout == "hf":
        if ptuning:
            raise ModelLoadError(
                f"{adapter}: P-Tuning v2 checkpoints apply to official-format ChatGLM folders only"
            )
        loaded, how = _load_hf(path, dtype, ref.trust_remote_code, quantizer, ref.device)
        placed = how == "transformers"
        if quantizer is not None and how == "float":
            quantizer, quantize_after = None, quantizer.mode
    else:
        loaded = _OFFICIAL_LOADERS[layout](path, cfg, dtype, ptuning, quantizer)
    if quantizer is not None:  # before peft wraps it: it picks its layers by it
        mark_quantized(loaded, ref.quantization)
    if kind == "ptuning":
        load_prefix(loaded, adapter)
    elif ptuning:
        init_prefix(loaded)
    setattr(loaded.config, GLMTUNE_GENERATION_KEY, spec.name)
    if kind == "lora":
        loaded = apply_lora(loaded, adapter, spec, is_trainable=trainable_adapter)
    if quantize_after:
        loaded = quantize_for_inference(loaded, quantize_after, compute_dtype=dtype)
    # ZeRO-3 parameters are partitions already placed by DeepSpeed; transformers placed a model it
    # quantized (device_map).
    if not _zero3() and not placed:
        loaded.to(ref.device)
    loaded.eval()
    return loaded


# ------------------------------------------------------------------------------------- tokenizers
def load_tokenizer(
    model: str | os.PathLike | ResolvedModel,
    *,
    generation: str | None = None,
    trust_remote_code: bool = False,
):
    """A transformers tokenizer for the model, never importing the folder's Python files.

    ``model`` is a :class:`ResolvedModel` (its generation and trust setting are used), or a folder /
    GGUF file resolved here with ``generation`` and ``trust_remote_code``.
    """
    ref = resolve_model(model, generation=generation, trust_remote_code=trust_remote_code)
    path, spec, trust_remote_code = ref.path, ref.spec, ref.trust_remote_code
    vocab = path / spec.vocab_file if spec.vocab_file and path.is_dir() else None
    # The sentencepiece file is authoritative for ChatGLM-6B/2/3 (an exported folder also carries a
    # tokenizer.json for plain transformers; glmtune's own class keeps the template helpers, and export
    # re-exporting such a folder needs it for the templates and the official layout).
    if spec.tokenizer_loader in ("chatglm_v1", "chatglm_spm") and vocab is not None and vocab.exists():
        from .tokenization import load_chatglm_tokenizer

        return load_chatglm_tokenizer(path, spec.name)
    if (
        spec.tokenizer_loader == "glm4_tiktoken"
        and vocab is not None
        and vocab.exists()
        and not (path / "tokenizer.json").exists()
    ):
        from .tokenization.glm4 import load_glm4_tiktoken

        tok_cfg = path / "tokenizer_config.json"
        template = read_json(tok_cfg).get("chat_template") if tok_cfg.exists() else None
        return load_glm4_tiktoken(path, template if isinstance(template, str) else None)
    from transformers import AutoTokenizer

    gguf = find_gguf(path)
    if gguf is not None:
        path = gguf_as_hf_folder(gguf)
    try:
        tok_cfg = path / "tokenizer_config.json"
        if tok_cfg.exists() and (path / "tokenizer.json").exists() and not trust_remote_code:
            cls_name = read_json(tok_cfg).get("tokenizer_class", "")
            if cls_name.startswith("ChatGLM"):
                # A remote-code tokenizer class with a tokenizer.json beside it: use the json directly.
                from transformers import PreTrainedTokenizerFast

                return PreTrainedTokenizerFast(
                    tokenizer_file=str(path / "tokenizer.json"), **_special_tokens(read_json(tok_cfg))
                )
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load the tokenizer: {e}") from None


def _special_tokens(tok_cfg: dict) -> dict:
    keys = ("bos_token", "eos_token", "unk_token", "pad_token")
    out = {k: tok_cfg[k] for k in keys if isinstance(tok_cfg.get(k), str)}
    if isinstance(tok_cfg.get("chat_template"), str):
        out["chat_template"] = tok_cfg["chat_template"]
    return out


def model_info(model: str | os.PathLike | ResolvedModel) -> dict:
    """A JSON-able summary of what glmtune resolves for a model (for ``glmtune info``)."""
    ref = resolve_model(model)
    info = {"path": str(ref.path), "generation": ref.generation, "description": ref.spec.description}
    if ref.generation_forced:
        info["generation_forced"] = True
    if ref.config:
        info["config"] = dict(ref.config)
    return info

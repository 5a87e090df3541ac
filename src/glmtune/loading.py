"""Load models, tokenizers and adapters from local folders without running the folder's code.

Official ChatGLM checkpoints are streamed shard by shard, tensor by tensor, into a model whose
parameters start on the meta device, so peak memory stays near one copy of the weights. Every
failure names the file and the key.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .adapters import PREFIX_KEY, adapter_kind, apply_lora, init_prefix, load_prefix, ptuning_settings
from .atomic import atomic_dir
from .errors import ModelLoadError
from .resolve import ResolvedModel, resolve_model
from .specs import GLMTUNE_GENERATION_KEY, find_gguf, read_json
from .weights import WEIGHT_FILES, WEIGHT_INDEXES, check_folder, index_shards, iter_tensors, weight_files

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- assignment
def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, source: Path) -> None:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise ModelLoadError(f"{source}: unexpected weight {name!r} (no such module in the model)") from None
    if attr in module._parameters:
        current = module._parameters[attr]
        if current is None or tuple(current.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(current.shape) if current is not None else None} (config.json does not match the weights)"
            )
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
) -> set[str]:
    """Read every tensor of ``files``, map its name, cast floats to ``dtype``, put it into ``model``.

    ``inspect(file, key, tensor)`` sees every stored tensor as read, skipped ones included.
    """
    loaded: set[str] = set()
    for file in files:
        for key, tensor in iter_tensors(file):
            if inspect is not None:
                inspect(file, key, tensor)
            for name, t in mapper(key, tensor) if not skip(key) else []:
                if name in loaded:
                    raise ModelLoadError(f"{file}: weight {name!r} appears twice")
                if t.is_floating_point():
                    t = t.to(torch.float32 if keep_fp32(name) else dtype)
                _set_tensor(model, name, t, file)
                loaded.add(name)
    return loaded


def _check_missing(
    model: nn.Module, path: Path, allowed_missing: Callable[[str], bool] = lambda n: False
) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta and not allowed_missing(n)]
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
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:
        return 0
    return sum(p.numel() for p in model.parameters())


def _empty_model(cls, config) -> nn.Module:
    from accelerate import init_empty_weights

    # Parameters on the meta device (no memory); buffers such as rotary tables are real.
    with init_empty_weights(include_buffers=False):
        return cls(config)


def _tie_if_needed(model: nn.Module) -> None:
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


# ----------------------------------------------------------------------------------------- models
def _load_glm_official(path: Path, cfg: dict, dtype: torch.dtype, ptuning: tuple[int, bool] | None):
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
    stream_into(
        model,
        files,
        lambda k, t: official_to_native(k, t, config),
        dtype,
        skip=lambda k: k.startswith(PREFIX_KEY) and not own_prefix,
        keep_fp32=lambda n: n.startswith("prefix_encoder."),
    )
    _check_missing(model, path, allowed_missing=lambda n: not own_prefix and n.startswith("prefix_encoder."))
    return model


def _load_chatglm_v1(path: Path, cfg: dict, dtype: torch.dtype, ptuning: tuple[int, bool] | None):
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
    )
    _tie_if_needed(model)
    _check_missing(model, path, allowed_missing=lambda n: not own_prefix and ".prefix_encoder." in n)
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


# ModelSpec.loader -> reader of that official layout: (folder, config.json, dtype, P-Tuning settings).
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


def _load_hf(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    gguf = find_gguf(path)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if gguf is not None:
        path = gguf_as_hf_folder(gguf)
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
    return model


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
):
    """Load a causal LM, optionally with a LoRA / P-Tuning adapter.

    ``model`` is a :class:`ResolvedModel` (its adapter, dtype, device and generation are used and the
    keyword arguments of the same names are ignored), or a folder / GGUF file / "default" / hub id,
    resolved here with those keyword arguments (dtype/device None: the machine's defaults, float32 on the
    CPU). Returns a transformers ``PreTrainedModel`` in eval mode; ``model.config.glmtune_generation``
    names the ModelSpec entry it was loaded with.
    ``prefix=(pre_seq_len, prefix_projection)`` adds a freshly initialised P-Tuning v2 prefix encoder (to
    train one); ``trainable_adapter`` loads a LoRA adapter with its weights trainable (to continue).
    """
    ref = resolve_model(
        model,
        generation=generation,
        adapter=adapter,
        dtype=dtype,
        device=device,
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

    cfg = dict(ref.config)
    # The spec names how its official layout is read; any other folder (a native -hf export, a GGUF
    # file) goes through transformers.
    layout = spec.loader if spec.is_official_folder(cfg) else "hf"
    if layout == "hf":
        if ptuning:
            raise ModelLoadError(
                f"{adapter}: P-Tuning v2 checkpoints apply to official-format ChatGLM folders only"
            )
        loaded = _load_hf(path, ref.dtype, ref.trust_remote_code)
    else:
        loaded = _OFFICIAL_LOADERS[layout](path, cfg, ref.dtype, ptuning)
    if kind == "ptuning":
        load_prefix(loaded, adapter)
    elif ptuning:
        init_prefix(loaded)
    setattr(loaded.config, GLMTUNE_GENERATION_KEY, spec.name)
    if kind == "lora":
        loaded = apply_lora(loaded, adapter, spec, is_trainable=trainable_adapter)
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

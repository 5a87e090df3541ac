"""Export a fine-tuned model as a standalone folder: LoRA merged into the base weights.

``export(source, out_dir)`` takes

- a training run folder (``glmtune_config.yaml`` + ``final/``): the base is the run's ``model.path`` and the
  weights are ``final/`` (a LoRA adapter, a P-Tuning v2 checkpoint or a fully fine-tuned model); a
  ``checkpoint-N`` folder of a run, and the run's config YAML, work the same way (:class:`glmtune.runs.Run`);
- an adapter folder (peft LoRA, or an official P-Tuning v2 checkpoint): the base comes from ``base=``, or
  from ``base_model_name_or_path`` in ``adapter_config.json`` when that names an existing local folder;
- a model folder (official ChatGLM layout, transformers layout or a GGUF file): re-saved in the chosen layout.

Formats:

- ``"hf"`` (default): a standard transformers folder: sharded safetensors (``max_shard_size``), the
  tokenizer and a ``generation_config.json`` whose ``eos_token_id`` lists the chat template's stop tokens.
  ChatGLM2/3 and GLM-4 are written as transformers' native GLM (``model_type: glm``,
  ``architectures: ["GlmForCausalLM"]``), which plain ``AutoModelForCausalLM.from_pretrained`` (and vLLM)
  load without glmtune and without remote code; ``glmtune_generation`` stays in ``config.json`` so glmtune
  still picks the right chat template. The ChatGLM2/3 tokenizer is glmtune's own sentencepiece class, so
  the export also writes an equivalent fast tokenizer (``tokenizer.json``, command tokens at their ids,
  ``[gMASK] sop`` added by its post-processor, a chat template in ``tokenizer_config.json``) built from
  ``tokenizer.model``. It is written only after it reproduced the glmtune tokenizer's ids on a built-in
  text sample (Chinese, English, code, whitespace runs, newlines, emoji, byte fallback) and the chat
  template reproduced glmtune's prompt ids; otherwise the folder keeps only the glmtune tokenizer files and
  a warning says the tokenizer needs glmtune. (The fast tokenizer recognises the command tokens
  ``[gMASK]``, ``<|user|>`` ... -- and ``</s>``, ``<s>``, ``<unk>``, and ``sop``/``eop`` as whole words --
  when they are written in the text, as every transformers chat tokenizer does; glmtune's class keeps
  such text literal. Plain text encodes identically.) ``tokenizer.model`` stays in the folder for glmtune's
  class: ``glmtune.load_tokenizer(out)`` uses it whenever it is there (the ChatGLM3 template needs the
  sentencepiece class); plain transformers and vLLM read the ``tokenizer.json``.
  ChatGLM-6B (v1) has no transformers class: it is always written in the official layout (a warning says so).
- A run trained with a prompt template from YAML (``model.template``; ``template=`` / ``--template`` for
  any source) exports it: the YAML as ``glmtune_template.yaml`` beside the weights (glmtune uses it for
  the folder), its stop tokens in ``generation_config.json``, and in the ``"hf"`` layout the same layout as
  a Jinja ``chat_template`` in ``tokenizer_config.json``, written after the exported tokenizer, loaded as
  transformers loads it, reproduced the template's prompt and training ids on sample chats (otherwise
  the folder has no chat template and a warning says so).
- ``"official"``: the original ChatGLM layout of the generation (``save_official``): official weight names
  and ``config.json``, the official tokenizer files, for the ChatGLM family only. ``glmtune_generation`` is
  added to ``config.json`` (the official code ignores it) so detection never has to guess.

P-Tuning v2 prefixes are extra keys/values fed to every layer, not a change of any weight: they cannot be
merged. ``format="hf"`` refuses them; ``format="official"`` writes the base in the official layout and the
prefix checkpoint next to it in ``<out_dir>/ptuning/`` (load with
``glmtune.load_model(out_dir, adapter=out_dir / "ptuning")``, or with the official code: base + ``pre_seq_len``
+ the prefix state dict, as the official P-Tuning README does).

Merging refuses quantized bases: merging into quantized weights would round the update away or silently
dequantize. That covers a folder whose config.json holds ``quantization_config`` / ``quantization_bit`` (use
the float release of the model as ``base=``), a loaded model with quantized layers (``merge_lora``), and a
run trained with ``model.quantization`` 4bit/8bit (QLoRA): there, name the float base explicitly to merge
into a float copy -- ``export(run, out, base=FLOAT_BASE)``; the run's own ``model.path`` is such a float
checkpoint, since export loads it unquantized -- knowing the merged model differs slightly from the quantized
one the adapter was trained with. A GGUF base is fine: glmtune de-quantizes it to float on load and training
ran on those float weights.

Everything is written into a temporary folder beside ``out_dir`` and renamed into place at the end; an
existing non-empty ``out_dir`` is replaced only with ``overwrite=True``, and never when it is (inside) the
source or base folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import adapter_kind, merge_lora
from .atomic import atomic_dir
from .errors import ConfigError
from .resolve import resolve_model, resolve_model_path
from .runs import Run
from .specs import GLMTUNE_GENERATION_KEY, ModelSpec, find_gguf, read_json

log = logging.getLogger(__name__)

FORMATS = ("hf", "official")
PTUNING_DIR = "ptuning"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


# ------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class ExportSource:
    """What ``export`` reads: ``kind`` is "lora", "ptuning" or "model"."""

    kind: str
    weights: Path  # the adapter folder, or the model folder / GGUF file
    base: Path | None  # the base model for adapters
    generation: str | None  # from the run config (None: detected)
    quantization: str = "none"  # model.quantization of the run that trained the adapter
    trust_remote_code: bool = False
    run_config: Path | None = None
    template: Path | str | None = None  # the run's prompt template (glmtune.runs.Run.template)


def resolve_source(
    source: str | os.PathLike, base: str | os.PathLike | None = None, generation: str | None = None
) -> ExportSource:
    """Classify ``source`` (run, adapter or model folder) and find the base model of an adapter.

    ``generation`` overrides the run's ``model.generation`` and detection."""
    src = resolve_model_path(source)  # "default" = the embedded model
    if not src.exists():
        raise ConfigError(f"{src}: no such run, adapter or model folder")
    run = Run.find(src)  # a run folder, a checkpoint-<step> folder of one, or a run config YAML
    cfg = run.config if run is not None else None
    weights = (run.weights if run is not None else None) or src
    if weights.is_dir() and (weights / "adapter_config.json").exists():
        kind = "lora"
    elif (
        weights.is_dir()
        and (weights / "config.json").exists()
        and read_json(weights / "config.json").get("pre_seq_len")
    ):
        kind = adapter_kind(weights)  # "ptuning" (validates the folder)
    elif find_gguf(weights) is not None or (weights.is_dir() and (weights / "config.json").exists()):
        kind = "model"
    else:
        where = f"{src} (run folder: looked in {weights})" if weights != src else str(src)
        raise ConfigError(
            f"{where}: not a run, adapter or model folder (expected glmtune_config.yaml + final/, "
            "adapter_config.json, config.json with pre_seq_len, or a model's config.json / .gguf)"
        )

    base_path: Path | None = None
    if kind == "model":
        if base is not None:
            raise ConfigError(f"base={base}: {weights} is a complete model; base= is only for adapters")
    elif base is not None:
        base_path = resolve_model_path(base)
    elif cfg is not None:
        base_path = resolve_model_path(cfg.model.path)
    elif kind == "lora":
        named = read_json(weights / "adapter_config.json").get("base_model_name_or_path")
        if named and Path(named).exists():
            base_path = Path(named)
        else:
            raise ConfigError(
                f"{weights}: a LoRA adapter needs its base model: pass base= (--base); adapter_config.json's "
                f"base_model_name_or_path ({named!r}) is not a local folder"
            )
    else:
        raise ConfigError(f"{weights}: a P-Tuning v2 checkpoint needs its base model: pass base= (--base)")
    if base_path is not None and not base_path.exists():
        raise ConfigError(f"{base_path}: base model not found (pass base= / --base with its folder)")
    return ExportSource(
        kind=kind,
        weights=weights,
        base=base_path,
        generation=generation or (cfg.model.generation if cfg is not None else None),
        quantization=cfg.model.quantization if cfg is not None else "none",
        trust_remote_code=bool(cfg.model.trust_remote_code) if cfg is not None else False,
        run_config=run.config_file if run is not None else None,
        template=run.template if run is not None else None,
    )


# -------------------------------------------------------------------------------------- quantization
def check_float_base(folder: Path, what: str = "merge the adapter into") -> None:
    """Refuse a model folder stored quantized (bitsandbytes/GPTQ/AWQ ``quantization_config`` or the
    official ChatGLM ``quantization_bit``). A GGUF file is accepted: glmtune loads it as float."""
    if folder.is_file() or not (folder / "config.json").exists():
        return
    cfg = read_json(folder / "config.json")
    quant = cfg.get("quantization_config")
    bits = cfg.get("quantization_bit")
    if quant or bits:
        method = (quant or {}).get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        desc = f"quantization_config ({method})" if quant else f"quantization_bit={bits}"
        raise ConfigError(
            f"{folder / 'config.json'}: the model is stored quantized ({desc}); glmtune does not {what} "
            f"quantized weights{' (the update would be rounded away)' if 'merge' in what else ''}. Use the float "
            "(float16/bfloat16/float32) "
            "release of the same model as the base: export(adapter, out, base=FLOAT_BASE) / "
            "glmtune export ADAPTER OUT --base FLOAT_BASE."
        )


# --------------------------------------------------------------------------------------- small helpers
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes of a shard size written as transformers does: 2GB (10^9), 500MiB (2^20), 100KB, or an int."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(str(size))
    if not m:
        raise ConfigError(f"max_shard_size={size!r}: expected a size such as 2GB, 500MB or 1GiB")
    value, unit = float(m.group(1)), m.group(2).upper()
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    base = 1024 if "I" in unit else 1000
    return int(value * base**power)


def _target_dtype(dtype, model_path: Path) -> torch.dtype:
    """``dtype`` as a torch dtype; None = the dtype the base checkpoint is stored in (float32 for GGUF)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype={dtype}: expected float32, bfloat16 or float16")
        return dtype
    if dtype is not None:
        try:
            return _DTYPES[str(dtype).lower().removeprefix("torch.")]
        except KeyError:
            raise ConfigError(f"dtype={dtype!r}: expected float32, bfloat16 or float16") from None
    if model_path.is_dir() and (model_path / "config.json").exists():
        stored = read_json(model_path / "config.json")
        name = stored.get("dtype") or stored.get("torch_dtype")
        if isinstance(name, str) and name.lower().removeprefix("torch.") in _DTYPES:
            return _DTYPES[name.lower().removeprefix("torch.")]
    return torch.float32


def _is_within(path: Path, other: Path) -> bool:
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents


def _check_out_dir(out_dir: Path, protected: list[Path], overwrite: bool) -> None:
    for p in protected:
        if p is not None and (_is_within(out_dir, p) or _is_within(p, out_dir)):
            raise ConfigError(
                f"{out_dir}: the export folder must not be (inside) the source or base folder {p}"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"{out_dir}: folder exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )


def _update_json(path: Path, **values) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _generation_config(model, tokenizer, spec: ModelSpec, template=None) -> dict:
    template = template if template is not None else spec.template
    stops = [
        int(i) for i in dict.fromkeys(spec.stop_token_ids(tokenizer) + template.stop_token_ids(tokenizer))
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    out = {"eos_token_id": stops if len(stops) != 1 else stops[0], "pad_token_id": pad}
    bos = getattr(model.config, "bos_token_id", None)
    if bos is not None:
        out["bos_token_id"] = bos
    return out


# --------------------------------------------------------------------------------- the fast tokenizer
# Text the exported tokenizer.json must encode exactly like glmtune's tokenizer before it is written.
SELF_CHECK_TEXTS = (
    "你好，请介绍一下你自己。",
    "机器学习是人工智能的一个分支，深度学习是机器学习的一种方法。",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "混合 mixed 文本 text，数字 1234567890 和标点！？",
    "line one\nline two\n\nafter a blank line\r\nwindows",
    "  two leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs, many      spaces",
    'def add(a, b):\n    return a + b\n{"subject": "北京", "predicate": "位于"}',
    "emoji 😀🎉👍🏽 and symbols ©®™ ∑∫√ →",
    "rare characters 龘靐齉 ñ é ü ß Ω ж",
    " ",
    "\n",
    "",
    "a",
)

SELF_CHECK_CHATS = (
    [{"role": "user", "content": "你好"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "我是一个人工智能助手。"},
        {"role": "user", "content": "  spaces\nand newlines  "},
    ],
    [
        {"role": "system", "content": "", "tools": [{"name": "get_weather", "parameters": {"city": "北京"}}]},
        {"role": "user", "content": "天气怎么样？"},
    ],
)

CHATGLM3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop{% endif %}"
    "{% set role = 'observation' if message['role'] == 'tool' else message['role'] %}"
    "{% set content = message['content'] %}"
    "{% if role == 'system' and message['tools'] is defined and message['tools'] %}"
    "{% set content = content + '\\n' + (message['tools'] | tojson(indent=4)) %}{% endif %}"
    "<|{{ role }}|>{% if message['metadata'] is defined and message['metadata'] %}{{ message['metadata'] }}{% endif %}"
    "{{ '\\n' }}{% if content %} {{ content }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CHATGLM2_CHAT_TEMPLATE = (
    "[gMASK]sop{% set ns = namespace(i=1, system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] %}{% set ns.system = message['content'] + '\\n' %}{% endif %}"
    "{% elif message['role'] == 'user' %}[Round {{ ns.i }}]\n\n问：{{ ns.system }}{{ message['content'] }}\n\n答："
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n\n{% set ns.i = ns.i + 1 %}"
    "{% endif %}{% endfor %}"
)


def _spm_proto(tokenizer):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # needs protobuf
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.sp_model.serialized_model_proto())
    return proto


def build_fast_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` equivalent to glmtune's ChatGLM2/3 tokenizer, or None when the
    sentencepiece model is not a BPE one this conversion reproduces.

    Sentencepiece BPE merges the adjacent pair whose merged piece has the best score; a ``tokenizers`` BPE
    with the merges ranked by that score, the same dummy-prefix and space handling and byte fallback does
    the same. Command tokens are added after the vocabulary at their ids; the post-processor puts
    ``[gMASK] sop`` in front as ``encode`` does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    proto = _spm_proto(tokenizer)
    if proto is None or proto.trainer_spec.model_type != 2:  # 2 = BPE
        return None
    normal, unknown, user_defined = 1, 2, 4
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        return None
    mergeable = {i for i, p in enumerate(pieces) if p.type in (normal, user_defined)}
    merges = []
    for i, p in enumerate(pieces):
        if p.type != normal:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if vocab.get(left) in mergeable and vocab.get(right) in mergeable:
                merges.append((-p.score, i, left, right))
    merges.sort()
    unk = next((p.piece for p in pieces if p.type == unknown), None)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in merges],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=bool(proto.trainer_spec.byte_fallback),
        )
    )
    spec = proto.normalizer_spec
    norms = []
    if spec.precompiled_charsmap:
        norms.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        norms += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        norms.append(normalizers.Prepend("▁"))
    norms.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norms)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    user = [AddedToken(p.piece, normalized=True, special=False) for p in pieces if p.type == user_defined]
    if user:
        tok.add_tokens(user)
    commands = dict(sorted(tokenizer._command_ids.items(), key=lambda kv: kv[1]))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=t in ("sop", "eop")) for t in commands]
    )
    if any(tok.token_to_id(t) != i for t, i in commands.items()):
        return None
    eos = tokenizer.eos_token
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK]:0 sop:0 $A:0",
        pair=f"[gMASK]:0 sop:0 $A:0 $B:1 {eos}:1",
        special_tokens=[
            ("[gMASK]", commands["[gMASK]"]),
            ("sop", commands["sop"]),
            (eos, tokenizer.eos_token_id),
        ],
    )
    return tok


def _fast_wrapper(tok, tokenizer, chat_template: str | None):
    from transformers import PreTrainedTokenizerFast

    specials = {
        k: getattr(tokenizer, k)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, k, None) is not None
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
        **specials,
    )


def _same_ids(fast, tokenizer) -> str | None:
    """The first text the fast tokenizer encodes differently (None: all equal)."""
    for text in SELF_CHECK_TEXTS:
        for special in (True, False):
            if fast.encode(text, add_special_tokens=special) != tokenizer.encode(
                text, add_special_tokens=special
            ):
                return text
        if fast.decode(fast.encode(text, add_special_tokens=False)) != tokenizer.decode(
            tokenizer.encode(text, add_special_tokens=False)
        ):
            return text
    return None


def _chat_template_matches(fast, tokenizer, spec: ModelSpec) -> bool:
    for chat in SELF_CHECK_CHATS:
        try:
            want = spec.template.encode_prompt(tokenizer, list(chat))
            got = fast.apply_chat_template(
                list(chat), tokenize=True, add_generation_prompt=True, return_dict=False
            )
        except Exception as e:  # a template error is a mismatch: the folder just ships no template
            log.debug("chat template check failed: %s", e)
            return False
        if list(got) != list(want):
            return False
    return True


def write_fast_tokenizer(tokenizer, spec: ModelSpec, out_dir: Path) -> bool:
    """Write ``tokenizer.json`` + a fast ``tokenizer_config.json`` for a ChatGLM2/3 tokenizer into ``out_dir``
    (beside its glmtune files) when an exact one can be built; returns whether it was written."""
    tok = build_fast_tokenizer(tokenizer)
    fast = _fast_wrapper(tok, tokenizer, None) if tok is not None else None
    bad = _same_ids(fast, tokenizer) if fast is not None else "(not a BPE sentencepiece model)"
    if bad is not None:
        log.warning(
            "no tokenizer.json written: a fast tokenizer equal to glmtune's could not be built (differs on "
            "%r); the exported tokenizer needs glmtune (glmtune.load_tokenizer)",
            bad,
        )
        return False
    template = {"chatglm3": CHATGLM3_CHAT_TEMPLATE, "chatglm2": CHATGLM2_CHAT_TEMPLATE}.get(spec.name)
    if template is not None:
        fast.chat_template = template
        if not _chat_template_matches(fast, tokenizer, spec):
            log.warning(
                "the %s chat template does not reproduce glmtune's prompt ids for this tokenizer; "
                "tokenizer_config.json gets no chat_template",
                spec.name,
            )
            template = None
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        # PreTrainedTokenizerFast: understood by transformers 4 (vLLM) and 5 (an alias of TokenizersBackend).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{
            k: str(getattr(tokenizer, k))
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if getattr(tokenizer, k, None) is not None
        },
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(min(getattr(tokenizer, "model_max_length", 10**30), 10**30)),
        # Read by glmtune's sentencepiece class (tokenizer.model stays in the folder).
        "do_lower_case": bool(getattr(tokenizer, "do_lower_case", False)),
        "remove_space": bool(getattr(tokenizer, "remove_space", False)),
    }
    if template is not None:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "special_tokens_map.json").unlink(missing_ok=True)
    return True


def _save_tokenizer(tokenizer, spec: ModelSpec, out_dir: Path, fmt: str) -> None:
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    if fmt == "hf" and spec.exports_fast_tokenizer and hasattr(tokenizer, "_command_ids"):
        write_fast_tokenizer(tokenizer, spec, out_dir)
    elif cfg_path.exists():
        cfg = read_json(cfg_path)
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            # transformers 5's name; transformers 4 (vLLM) knows the same class as PreTrainedTokenizerFast.
            _update_json(cfg_path, tokenizer_class="PreTrainedTokenizerFast")
        if fmt == "official" and spec.official_tokenizer_class:
            # As the official folder names it (how glmtune tells GLM-4 from ChatGLM3 by the files).
            _update_json(cfg_path, tokenizer_class=spec.official_tokenizer_class)


# ------------------------------------------------------------------------------------------- writing
def _user_template_matches(fast, tokenizer, template) -> bool:
    """Whether ``fast.apply_chat_template`` gives ``template``'s prompt ids (generation prompt) and
    training ids (a whole conversation) for glmtune's ``tokenizer`` on the sample chats."""
    chats = [list(c) for c in SELF_CHECK_CHATS if not any(m.get("tools") for m in c)]
    chats.append([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello! 我很好。"}])
    if template.supports_observation:
        chats.append([{"role": "user", "content": "天气？"}, {"role": "observation", "content": '{"t": 20}'}])
    for chat in chats:
        try:
            want = template.encode_prompt(tokenizer, chat)
            got = fast.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
            if list(got) != list(want):
                return False
            if chat[-1]["role"] == "assistant":
                want = template.encode_example(tokenizer, chat).input_ids
                got = fast.apply_chat_template(
                    chat, tokenize=True, add_generation_prompt=False, return_dict=False
                )
                if list(got) != list(want):
                    return False
        except Exception as e:  # a template or tokenizer error is a mismatch: the folder ships no template
            log.debug("chat template check failed: %s", e)
            return False
    return True


def _write_user_template(template, tokenizer, out: Path, fmt: str) -> None:
    """A prompt template from YAML: ``glmtune_template.yaml`` beside the weights and, in the hf layout, the
    Jinja ``chat_template`` of ``tokenizer_config.json`` when it reproduces the template's ids."""
    from transformers import AutoTokenizer

    from .user_templates import UserTemplate

    if not isinstance(template, UserTemplate):
        return
    template.save(out)
    if fmt != "hf":
        return
    cfg_path = out / "tokenizer_config.json"
    # transformers 5 reads chat_template.jinja before the config's key: the template lives in one place.
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    _update_json(cfg_path, chat_template=template.to_jinja(tokenizer))
    try:
        fast = AutoTokenizer.from_pretrained(str(out))
        ok = _user_template_matches(fast, tokenizer, template)
    except Exception as e:  # noqa: BLE001 - a tokenizer transformers cannot load alone gets no template
        log.debug("the exported tokenizer does not load with transformers: %s", e)
        ok = False
    if not ok:
        cfg = read_json(cfg_path)
        cfg.pop("chat_template", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log.warning(
            "the %s prompt template, as a Jinja chat template, does not reproduce glmtune's ids with the "
            "exported tokenizer; tokenizer_config.json gets no chat_template (glmtune uses %s)",
            template.name,
            out.name + "/glmtune_template.yaml",
        )


def _write_hf(model, tokenizer, spec: ModelSpec, out: Path, max_shard_size, template=None) -> None:
    from transformers import GenerationConfig

    setattr(model.config, GLMTUNE_GENERATION_KEY, spec.name)
    for key in ("pre_seq_len", "prefix_projection"):  # never on a merged model; dropped if a config had it
        if hasattr(model.config, key):
            delattr(model.config, key)
    if getattr(model, "generation_config", None) is None:
        model.generation_config = GenerationConfig()
    for key, value in _generation_config(model, tokenizer, spec, template).items():
        setattr(model.generation_config, key, value)
    # Not "derived from config.json": transformers would otherwise rebuild it from the config at generate()
    # time and lose the stop-token list.
    model.generation_config._from_model_config = False
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    cfg_path = out / "config.json"
    cfg = read_json(cfg_path)
    rope = cfg.get("rope_parameters")
    if spec.official_format and isinstance(rope, dict):
        # A native GlmForCausalLM export of the ChatGLM family: transformers 4 readers (vLLM) take the
        # RoPE settings from top-level keys.
        extra = {k: rope[k] for k in ("rope_theta", "partial_rotary_factor") if k in rope and k not in cfg}
        if extra:
            _update_json(cfg_path, **extra)
    _save_tokenizer(tokenizer, spec, out, "hf")
    _write_user_template(template, tokenizer, out, "hf")


def _write_official(model, tokenizer, spec: ModelSpec, out: Path, max_shard_size, template=None) -> None:
    from .official_format import save_official

    save_official(model, out, spec.name, max_shard_bytes=parse_size(max_shard_size))
    _update_json(out / "config.json", **{GLMTUNE_GENERATION_KEY: spec.name})
    _save_tokenizer(tokenizer, spec, out, "official")
    _write_user_template(template, tokenizer, out, "official")
    (out / "generation_config.json").write_text(
        json.dumps(_generation_config(model, tokenizer, spec, template), indent=2) + "\n", encoding="utf-8"
    )


def _tokenizer_source(src: ExportSource, spec: ModelSpec) -> Path:
    """Where the tokenizer is read: the model folder itself, or the base of an adapter / of a full run."""
    if src.kind == "model":
        w = src.weights
        names = ("tokenizer.json", "tokenizer_config.json", spec.vocab_file)
        has_tok = w.is_dir() and any(n and (w / n).exists() for n in names)
        if has_tok or src.run_config is None:
            return w
        from .config import load_config

        return resolve_model_path(load_config(src.run_config).model.path)
    return src.base


def export(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str = "hf",
    base: str | os.PathLike | None = None,
    max_shard_size: int | str = "2GB",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    generation: str | None = None,
    template=None,
    printer=None,
) -> Path:
    """Export ``source`` (run, adapter or model folder) to ``out_dir``; returns ``out_dir``.

    ``format``: "hf" (merged transformers folder; native GLM for ChatGLM2/3/GLM-4) or "official" (the
    original ChatGLM layout). ``base``: the base model of an adapter (default: the run's ``model.path`` or
    ``adapter_config.json``'s local ``base_model_name_or_path``). ``dtype``: float32 / bfloat16 / float16
    of the written weights (default: the base checkpoint's dtype); the LoRA update is merged in that dtype.
    ``overwrite``: replace an existing non-empty ``out_dir``. ``generation``: the model generation
    (default: the run's ``model.generation``, else detected). ``template``: a prompt template (shipped name
    or YAML file; default: the run's, else the model folder's ``glmtune_template.yaml``). ``printer``: where each stage's start and
    time go (``glmtune export`` prints them on stderr; default: the module logger at INFO). See the module
    docstring for details.
    """
    import time

    from .loading import load_model, load_tokenizer

    started = time.monotonic()

    def stage(text: str) -> None:
        (printer or log.info)(f"[{time.monotonic() - started:6.1f}s] {text}")

    if format not in FORMATS:
        raise ConfigError(f"format={format!r}: expected one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    src = resolve_source(source, base, generation)
    model_path = src.weights if src.kind == "model" else src.base
    assert model_path is not None
    # Resolved once: the generation (override, run config or detection) goes to the loader and tokenizer.
    resolved = resolve_model(
        model_path,
        generation=src.generation,
        trust_remote_code=src.trust_remote_code,
        template=template if template is not None else src.template,
    )
    spec = resolved.spec
    _check_out_dir(out_dir, [Path(source), src.weights, src.base], overwrite)
    parse_size(max_shard_size)  # a bad size fails before any weight is read

    if src.kind == "lora" and src.quantization not in (None, "none"):
        if base is None:
            raise ConfigError(
                f"{src.run_config}: this run trained LoRA over a base loaded with model.quantization="
                f"{src.quantization}; glmtune does not merge into quantized weights. To merge into a float copy "
                "of the base instead, name that float checkpoint explicitly (the run's model.path is one: "
                f"export loads it unquantized): export('{source}', OUT, base='{src.base}') / "
                f"glmtune export {source} OUT --base {src.base}. The merged float model differs slightly from "
                "the quantized model the adapter was trained with."
            )
        log.warning(
            "merging a LoRA adapter trained over a %s-quantized base into the float base %s",
            src.quantization,
            src.base,
        )
    check_float_base(model_path, "merge the adapter into" if src.kind == "lora" else "export")
    if src.kind == "ptuning" and src.quantization not in (None, "none"):
        log.info(
            "the prefix was trained over a %s-quantized base; the exported base is the float checkpoint",
            src.quantization,
        )

    fmt = format
    if src.kind == "ptuning" and fmt == "hf":
        raise ConfigError(
            f"{src.weights}: a P-Tuning v2 prefix cannot be merged into the weights (it feeds extra keys and "
            "values to every layer; no weight changes), so there is no plain transformers / vLLM export of it. "
            "Use format='official' (--format official): the base in the official ChatGLM layout with the prefix "
            f"checkpoint beside it in {PTUNING_DIR}/, loaded by glmtune.load_model(OUT, adapter=OUT/'{PTUNING_DIR}') "
            "or the official code. Or train LoRA to get a mergeable adapter."
        )
    if not spec.has_transformers_class and fmt == "hf":
        log.warning(
            "ChatGLM-6B (v1) has no transformers class, so there is no plain transformers layout for it: "
            "writing the official ChatGLM-6B layout instead (loads with glmtune.load_model or the "
            "official remote code)"
        )
        fmt = "official"
    if fmt == "official" and not spec.official_format:
        raise ConfigError(
            f"format='official': {spec.name} models have no official ChatGLM layout; use format='hf'"
        )

    target = _target_dtype(dtype, model_path)
    adapter = src.weights if src.kind == "lora" else None
    log.info(
        "exporting %s (%s, %s) to %s in the %s layout as %s",
        src.weights,
        src.kind,
        spec.name,
        out_dir,
        fmt,
        str(target).removeprefix("torch."),
    )
    stage(
        f"loading {model_path} ({str(target).removeprefix('torch.')})"
        + (f" with the adapter {adapter}" if adapter else "")
    )
    model = load_model(resolved.replace(adapter=adapter, dtype=target))
    if adapter is not None:
        stage("merging the LoRA update into the weights")
    model = merge_lora(model)
    # glmtune's class for the folder (for the ChatGLM family the sentencepiece one, which the templates
    # and the official layout need, even beside an earlier export's tokenizer.json).
    tokenizer = load_tokenizer(
        _tokenizer_source(src, spec), generation=spec.name, trust_remote_code=src.trust_remote_code
    )

    # _check_out_dir has refused a non-empty out_dir without overwrite, with the message users see.
    stage(f"writing the {fmt} layout to {out_dir} (shards up to {max_shard_size})")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if fmt == "hf":
            _write_hf(model, tokenizer, spec, tmp, max_shard_size, resolved.template)
        else:
            _write_official(model, tokenizer, spec, tmp, max_shard_size, resolved.template)
            if src.kind == "ptuning":
                dest = tmp / PTUNING_DIR
                dest.mkdir()
                for f in sorted(src.weights.iterdir()):
                    if f.is_file() and not f.is_symlink():
                        shutil.copy2(f, dest / f.name)
    stage(f"exported to {out_dir}")
    return out_dir


__all__ = [
    "FORMATS",
    "ExportSource",
    "build_fast_tokenizer",
    "check_float_base",
    "export",
    "merge_lora",
    "parse_size",
    "resolve_source",
    "write_fast_tokenizer",
]

"""The ModelSpec registry: everything that differs between model generations lives here.

One entry per generation (chatglm = ChatGLM-6B v1, chatglm2, chatglm3, glm4, hf = any other
transformers causal LM). Code elsewhere asks the spec; it never branches on a model type itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError
from .templates import (
    ChatGLM2Template,
    ChatGLM3Template,
    ChatGLMv1Template,
    GLM4Template,
    HFChatTemplate,
    Template,
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    template: Template
    # Module names LoRA wraps by default (on glmtune's native module names).
    lora_targets: tuple[str, ...]
    supports_ptuning: bool
    # True when the generation has an official ChatGLM layout that glmtune reads and writes.
    official_format: bool
    # Tokens that also end a reply, besides eos (names in the tokenizer's vocabulary).
    extra_stop_tokens: tuple[str, ...] = field(default=())
    # Official LoRA target names -> glmtune's native names (for adapters trained on the remote code).
    official_lora_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # How an official-layout folder is read and written: "glm_official" (renamed into GlmForCausalLM),
    # "chatglm_v1" (glmtune's own class, official names), "hf" (transformers from_pretrained; GGUF too).
    loader: str = "hf"
    # config.json model_type values of the official layout (other folders load through transformers).
    official_model_types: tuple[str, ...] = ()
    # The tokenizer: "chatglm_v1" / "chatglm_spm" (glmtune's sentencepiece classes, from vocab_file),
    # "glm4_tiktoken" (vocab_file is a tiktoken vocabulary, used when there is no tokenizer.json), or
    # "auto" (transformers' AutoTokenizer).
    tokenizer_loader: str = "auto"
    vocab_file: str | None = None
    # ChatGLM3 / GLM-4 role tokens (<|user|>, <|assistant|>, ...) in the vocabulary.
    chat_role_tokens: bool = False
    # An official-layout export names this tokenizer class (how detection tells GLM-4 from ChatGLM3).
    official_tokenizer_class: str | None = None
    # A plain transformers ("hf") export writes a tokenizer.json built from the sentencepiece model.
    exports_fast_tokenizer: bool = False
    # transformers has a class for it (otherwise an "hf" export writes the official layout).
    has_transformers_class: bool = True
    # Rows can be packed (restarted position ids separate the examples).
    supports_packing: bool = True
    # The official ROUGE/BLEU definition of the generation's fine-tuning scripts (glmtune.metrics), which
    # training logs with eval.predict_with_generate: "chatglm6b" (ChatGLM-6B / ChatGLM2-6B ptuning/main.py,
    # BLEU-4 on characters) or "chatglm3" (ChatGLM3 finetune_demo, BLEU-4 on words).
    rouge_bleu_definition: str = "chatglm3"
    # How a decoder layer keeps activations for the backward pass (glmtune.plan's memory estimate):
    # "gated" (RMSNorm, grouped-query attention, SwiGLU MLP: transformers' GlmForCausalLM and Llama-like
    # models) or "chatglm_v1" (LayerNorm, fused QKV with 2D rotary, prefix-LM mask, GELU MLP).
    activation_layout: str = "gated"

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids that end a reply: eos first, then ``extra_stop_tokens`` the vocabulary knows."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        unk = getattr(tokenizer, "unk_token_id", None)
        for token in self.extra_stop_tokens:
            i = tokenizer.convert_tokens_to_ids(token)
            if i is not None and i != unk:
                ids.append(i)
        return list(dict.fromkeys(ids))

    def is_official_folder(self, config: dict) -> bool:
        """Whether a folder with this config.json is in this generation's official layout."""
        return config.get("model_type") in self.official_model_types


_GLM_NATIVE_QKV = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "dense": ("o_proj",),
    "dense_h_to_4h": ("gate_up_proj",),
    "dense_4h_to_h": ("down_proj",),
}
# model_type of the official ChatGLM folders (ChatGLM-6B says "chatglm6b" in some releases).
_OFFICIAL_TYPES = ("chatglm", "chatglm6b")

REGISTRY: dict[str, ModelSpec] = {
    "chatglm": ModelSpec(
        name="chatglm",
        loader="chatglm_v1",
        description="ChatGLM-6B (v1): native glmtune implementation (2D RoPE, prefix-LM attention)",
        template=ChatGLMv1Template(),
        lora_targets=("query_key_value",),
        supports_ptuning=True,
        official_format=True,
        official_model_types=_OFFICIAL_TYPES,
        tokenizer_loader="chatglm_v1",
        vocab_file="ice_text.model",
        has_transformers_class=False,
        supports_packing=False,  # 2D positions and prefix-LM attention cannot be restarted per example
        rouge_bleu_definition="chatglm6b",
        activation_layout="chatglm_v1",
    ),
    "chatglm2": ModelSpec(
        name="chatglm2",
        loader="glm_official",
        description="ChatGLM2-6B: loaded into transformers' native GlmForCausalLM",
        template=ChatGLM2Template(),
        lora_targets=("q_proj", "k_proj", "v_proj"),
        supports_ptuning=True,
        official_format=True,
        official_lora_targets=_GLM_NATIVE_QKV,
        official_model_types=_OFFICIAL_TYPES,
        tokenizer_loader="chatglm_spm",
        vocab_file="tokenizer.model",
        exports_fast_tokenizer=True,
        rouge_bleu_definition="chatglm6b",
    ),
    "chatglm3": ModelSpec(
        name="chatglm3",
        loader="glm_official",
        description="ChatGLM3-6B: loaded into transformers' native GlmForCausalLM",
        template=ChatGLM3Template(),
        lora_targets=("q_proj", "k_proj", "v_proj"),
        supports_ptuning=True,
        official_format=True,
        extra_stop_tokens=("<|user|>", "<|observation|>"),
        official_lora_targets=_GLM_NATIVE_QKV,
        official_model_types=_OFFICIAL_TYPES,
        tokenizer_loader="chatglm_spm",
        vocab_file="tokenizer.model",
        chat_role_tokens=True,
        exports_fast_tokenizer=True,
    ),
    "glm4": ModelSpec(
        name="glm4",
        loader="glm_official",
        description="GLM-4-9B: official format mapped to GlmForCausalLM, or a -hf folder loaded directly",
        template=GLM4Template(),
        lora_targets=("q_proj", "k_proj", "v_proj"),
        supports_ptuning=True,
        official_format=True,
        extra_stop_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
        official_lora_targets=_GLM_NATIVE_QKV,
        official_model_types=_OFFICIAL_TYPES,
        tokenizer_loader="glm4_tiktoken",
        vocab_file="tokenizer.model",
        chat_role_tokens=True,
        official_tokenizer_class="ChatGLM4Tokenizer",
    ),
    "hf": ModelSpec(
        name="hf",
        description="any transformers AutoModelForCausalLM folder or GGUF file",
        template=HFChatTemplate(),
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        supports_ptuning=False,
        official_format=False,
    ),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelLoadError(f"unknown model generation {name!r} (known: {', '.join(REGISTRY)})") from None


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not valid UTF-8 ({e.reason})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def find_gguf(path: Path) -> Path | None:
    """The GGUF file a path names: the file itself, or the only ``*.gguf`` in a folder without config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise ModelLoadError(
                f"{path}: several .gguf files ({', '.join(f.name for f in files)}); name one"
            )
    return None


GLMTUNE_GENERATION_KEY = "glmtune_generation"


def detect_generation(path: str | Path) -> str:
    """Which registry entry a local model folder (or GGUF file) belongs to, from its files alone."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model folder")
    if find_gguf(path) is not None:
        return "hf"
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{path}: no config.json (and no .gguf file) in the model folder")
    cfg = read_json(cfg_path)
    if cfg.get(GLMTUNE_GENERATION_KEY) in REGISTRY:
        return cfg[GLMTUNE_GENERATION_KEY]
    model_type = cfg.get("model_type")
    if model_type == "chatglm6b":
        return "chatglm"
    if model_type == "glm":
        return "glm4"
    if model_type != "chatglm":
        return "hf"
    if "position_encoding_2d" in cfg or "inner_hidden_size" in cfg:
        return "chatglm"
    tok_cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
    if (
        tok_cfg.get("tokenizer_class") == "ChatGLM4Tokenizer"
        or int(cfg.get("padded_vocab_size", 0)) >= 150000
    ):
        return "glm4"
    names = " ".join(
        str(x).lower()
        for x in (cfg.get("_name_or_path"), tok_cfg.get("name_or_path"), path.resolve().name)
        if x
    )
    if "chatglm2" in names:
        return "chatglm2"
    # ChatGLM2 and ChatGLM3 share config and sentencepiece model; ChatGLM3 is the common case.
    return "chatglm3"


def spec_for(path_or_name: str | Path) -> ModelSpec:
    """The spec for a registry name ("chatglm3") or a model path."""
    if isinstance(path_or_name, str) and path_or_name in REGISTRY:
        return REGISTRY[path_or_name]
    return REGISTRY[detect_generation(path_or_name)]

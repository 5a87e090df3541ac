"""Tiny random models in every official on-disk format, built in seconds (tests, benchmarks, demos).

``make_tiny_model(out_dir, generation)`` writes a folder that looks like the real release of that
generation (official config fields and weight names, sharded safetensors or a .bin, the official
tokenizer files with a tiny vocabulary) and returns its path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .tokenization.glm4 import GLM4_SPECIAL_TOKENS

# A little bilingual text: enough for a few hundred sentencepiece pieces.
CORPUS = [
    "你好，请介绍一下你自己。我是一个人工智能助手，可以回答问题、写作和翻译。",
    "今天天气不错，我们去公园散步吧。北京的秋天很美，天空很蓝。",
    "机器学习是人工智能的一个分支，深度学习是机器学习的一种方法。",
    "请从下面的句子中抽取三元组，并以 JSON 格式输出。",
    "这件衣服的材质是牛仔布，颜色是蓝色，风格简约又时尚。",
    "Hello world! This is a tiny ChatGLM test with some English words.",
    "Instruction: classify the comment. Input: the apples are fresh and sweet. Answer: ",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    'def add(a, b):\n    return a + b\n{"subject": "北京", "predicate": "位于", "object": "中国"}',
    "水果 蔬菜 电脑 手机 衣服 书籍 酒店 旅游 音乐 电影 体育 新闻 教育 汽车",
]


def _glm_config(
    vocab_size: int,
    *,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=16,
    ffn=96,
    rope_ratio=1.0,
    eos=2,
    pad=0,
):
    from transformers import GlmConfig

    return GlmConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=True,
        pad_token_id=pad,
        eos_token_id=eos,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * rope_ratio,
            "partial_rotary_factor": 0.5,
        },
    )


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Weights large enough that logits differ clearly between tokens (a real-looking spread)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _glm4_tokenizer(out_dir: Path):
    """A byte-level BPE in a tokenizer.json with the GLM-4 special tokens (GLM-4 ships tiktoken files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(GLM4_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="left"
    )
    return fast


def _mark_tokenizer_class(out_dir: Path, cls: str) -> None:
    """Name the tokenizer class as the official folder does (and its remote-code entry, never run)."""
    cfg = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = cls
    cfg["auto_map"] = {"AutoTokenizer": [f"tokenization_chatglm.{cls}", None]}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")


def _tiny_v1(work: Path, spec, sizes: dict):
    """ChatGLM-6B: glmtune's own class and an ice_text.model sentencepiece vocabulary."""
    from .models.chatglm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM
    from .tokenization import ChatGLMv1Tokenizer
    from .tokenization.testing import train_tiny_spm_v1

    spm = train_tiny_spm_v1(work / spec.vocab_file, CORPUS, sizes.pop("spm_vocab", 600))
    tokenizer = ChatGLMv1Tokenizer(str(spm), num_image_tokens=0)
    cfg = ChatGLMv1Config(
        vocab_size=640,
        hidden_size=sizes.get("hidden", 64),
        num_layers=sizes.get("layers", 2),
        num_attention_heads=sizes.get("heads", 4),
        inner_hidden_size=sizes.get("ffn", 128),
        max_sequence_length=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return ChatGLMv1ForCausalLM(cfg), tokenizer


def _tiny_glm_spm(work: Path, spec, sizes: dict):
    """ChatGLM2/3: native GlmForCausalLM and a tokenizer.model sentencepiece vocabulary."""
    from transformers import GlmForCausalLM

    from .tokenization import ChatGLMTokenizer
    from .tokenization.testing import train_tiny_spm

    spm = train_tiny_spm(work / spec.vocab_file, CORPUS, sizes.pop("spm_vocab", 500))
    tokenizer = ChatGLMTokenizer(str(spm), chat_roles=spec.chat_role_tokens)
    return GlmForCausalLM(_glm_config(len(tokenizer) + 7, eos=tokenizer.eos_token_id, **sizes)), tokenizer


def _tiny_glm4(work: Path, spec, sizes: dict):
    """GLM-4: native GlmForCausalLM and a byte-level BPE standing in for the tiktoken vocabulary."""
    from transformers import GlmForCausalLM

    tokenizer = _glm4_tokenizer(work)
    model = GlmForCausalLM(
        _glm_config(len(tokenizer) + 8, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, **sizes)
    )
    return model, tokenizer


# ModelSpec.tokenizer_loader -> builder of a tiny random (model, tokenizer) of that generation.
_TINY_BUILDERS = {"chatglm_v1": _tiny_v1, "chatglm_spm": _tiny_glm_spm, "glm4_tiktoken": _tiny_glm4}


def make_tiny_model(
    out_dir: str | os.PathLike,
    generation: str = "chatglm3",
    *,
    seed: int = 0,
    safe: bool = True,
    max_shard_bytes: int = 2 << 30,
    **sizes,
) -> Path:
    """Write a tiny random model of ``generation`` in its official format into ``out_dir``."""
    from .official_format import save_official
    from .specs import get_spec

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.vocab"
    work.mkdir(exist_ok=True)
    spec = get_spec(generation)
    if not spec.official_format:
        raise ValueError(f"no official format for {generation!r}")
    model, tokenizer = _TINY_BUILDERS[spec.tokenizer_loader](work, spec, sizes)
    _randomize(model, seed)
    save_official(model, out_dir, generation, safe=safe, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)
    if spec.official_tokenizer_class:
        _mark_tokenizer_class(out_dir, spec.official_tokenizer_class)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["_name_or_path"] = f"tiny-{generation}"
    cfg_path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return out_dir

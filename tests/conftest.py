"""Shared test fixtures: where ../shared lives, tiny-model builders, GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach the network: a hub id resolves from a cache the test lays out, or fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLMTUNE_SHARED", REPO.parent / "shared"))


# A ChatML-like template over role markers the donor (tiny GLM-4) tokenizer already has as special tokens.
HF_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tiny_hf(out: Path, donor: Path, chat_template: str | None = HF_CHAT_TEMPLATE) -> Path:
    """A tiny LlamaForCausalLM folder (generation "hf": 2 layers, hidden 64) with the byte-level BPE
    tokenizer of ``donor`` (a tiny GLM-4 folder) and ``chat_template`` (None: the tokenizer has none)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(donor / "tokenizer.json"),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# A tiny classification task (instruction + input -> JSON label list) several tests train and score on.
# Eight short rows in Chinese, English and code (the distributed and multi-process training tests).
MIXED_ROWS = [
    {"context": "你好，请介绍一下你自己。", "target": "我是一个人工智能助手。"},
    {"context": "Hello world!", "target": "The quick brown fox jumps over the lazy dog."},
    {"context": "今天天气不错。", "target": "我们去公园散步吧。"},
    {"context": "机器学习是什么？", "target": "机器学习是人工智能的一个分支。"},
    {"context": "def add(a, b):", "target": "return a + b"},
    {"context": "水果 蔬菜 电脑", "target": "手机 衣服 书籍"},
    {"context": "请抽取三元组。", "target": '{"subject": "北京", "object": "中国"}'},
    {"context": "Instruction: classify the comment.", "target": "the apples are fresh and sweet."},
]

CLASSIFY_ROWS = [
    {"context": "Instruction: 分类\nInput: 苹果很甜\nAnswer: ", "target": '["水果"]'},
    {"context": "Instruction: 分类\nInput: 电脑很快\nAnswer: ", "target": '["电脑"]'},
    {"context": "Instruction: 分类\nInput: 衣服很好看\nAnswer: ", "target": '["衣服"]'},
    {"context": "Instruction: 分类\nInput: 这本书很有趣\nAnswer: ", "target": '["书籍"]'},
]


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test with the reason when it is absent (a user's clone)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(
            f"{p} is absent: ../shared (fixtures and datasets) is only present in CI and dev checkouts"
        )
    return p


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

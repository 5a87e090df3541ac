"""GLM-4's original tiktoken tokenizer, rebuilt as a fast tokenizer, against tiktoken itself."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

import glmtune
from glmtune.testing import CORPUS, make_tiny_model
from glmtune.tokenization.glm4 import GLM4_PATTERN, GLM4_SPECIAL_TOKENS

tiktoken = pytest.importorskip("tiktoken")

TEXTS = CORPUS + ["", " leading space", "tabs\tand\nnewlines\n\n", "emoji 😀 龘", "数字 12345 和 English"]


def _ranks() -> dict[bytes, int]:
    """A small byte-level BPE in tiktoken form: the 256 bytes, then 300 pair merges learned on the corpus."""
    import regex  # the pattern needs \p{L}; transformers depends on regex

    ranks = {bytes([i]): i for i in range(256)}
    seqs = [[bytes([b]) for b in w.encode()] for t in CORPUS for w in regex.findall(GLM4_PATTERN, t)]
    for _ in range(300):
        counts: dict[tuple[bytes, bytes], int] = {}
        for s in seqs:
            for a, b in zip(s, s[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), _n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        seqs = [_merge(s, a, b) for s in seqs]
    return ranks


def _merge(seq, a, b):
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    ranks = _ranks()
    root = tmp_path_factory.mktemp("glm4tk")
    tiny = make_tiny_model(root / "src", "glm4")
    folder = root / "glm4-original"
    shutil.copytree(tiny, folder)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()), encoding="utf-8"
    )
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    specials = {t: len(ranks) + i for i, t in enumerate(GLM4_SPECIAL_TOKENS)}
    reference = tiktoken.Encoding(
        "glm4-test", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return folder, reference, specials


def test_ids_equal_tiktoken(folder):
    path, reference, _ = folder
    tok = glmtune.load_tokenizer(path)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == reference.encode(text), text
        assert tok.decode(reference.encode(text)) == text


def test_special_tokens_follow_the_ranks(folder):
    path, _, specials = folder
    tok = glmtune.load_tokenizer(path)
    for token, idx in specials.items():
        assert tok.convert_tokens_to_ids(token) == idx
    assert tok.eos_token == "<|endoftext|>" and tok.padding_side == "left"


def test_glm4_template_on_the_tiktoken_tokenizer(folder):
    path, reference, specials = folder
    tok = glmtune.load_tokenizer(path)
    ids = glmtune.get_template("glm4").encode_prompt(tok, [{"role": "user", "content": "你好"}])
    assert ids == [
        specials["[gMASK]"],
        specials["<sop>"],
        specials["<|user|>"],
        *reference.encode("\n你好"),
        specials["<|assistant|>"],
    ]

"""Tiny sentencepiece models in the official ChatGLM layouts, for tests and tiny random checkpoints.

Training a few hundred pieces on a few lines takes milliseconds, so tests can build their own vocabulary
instead of downloading a real one.

- ChatGLM2/3 layout (:func:`train_tiny_spm` defaults): ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad piece,
  byte fallback, identity normalization with whitespace kept; :class:`ChatGLMTokenizer` appends the
  command tokens after it.
- ChatGLM-6B (v1) layout (:func:`train_tiny_spm_v1`): ``<unk> <s> </s> <pad>`` = 0..3, then
  :data:`CHATGLM_V1_USER_DEFINED_SYMBOLS` (``[MASK]``=4 ... ``<dBLOCK>``=11, ``<n>``=12, ``<|tab|>``=13,
  ``<|blank_2|>``=14 ... ``<|blank_80|>``=92), then bytes and merges.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from .chatglm import V1_MAX_BLANK_LENGTH, v1_preprocess_text

__all__ = [
    "CHATGLM_V1_SPECIAL_PIECES",
    "CHATGLM_V1_USER_DEFINED_SYMBOLS",
    "train_tiny_spm",
    "train_tiny_spm_v1",
]

CHATGLM_V1_SPECIAL_PIECES = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<unused_0>",
    "<sop>",
    "<eop>",
    "<ENC>",
    "<dBLOCK>",
)
CHATGLM_V1_USER_DEFINED_SYMBOLS = (
    CHATGLM_V1_SPECIAL_PIECES
    + ("<n>", "<|tab|>")
    + tuple(f"<|blank_{k}|>" for k in range(2, V1_MAX_BLANK_LENGTH + 1))
)


def train_tiny_spm(
    out_path: str | os.PathLike,
    text_lines: Iterable[str],
    vocab_size: int,
    user_defined_symbols: Sequence[str] = (),
    *,
    pad_id: int = -1,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 1.0,
) -> Path:
    """Train a sentencepiece model on ``text_lines`` and write it to ``out_path``; returns the path.

    Ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=``pad_id`` when >= 0, then ``user_defined_symbols``
    in order, then the 256 byte pieces (``byte_fallback``), then characters and merges. Identity
    normalization, no whitespace squeezing and whitespace-only pieces allowed, as the ChatGLM models.
    Each line is one training sentence; a line holding ``\\n`` is split there, as a corpus file would be,
    so newlines stay byte-fallback pieces. ``vocab_size`` must be reachable from the text (sentencepiece
    raises otherwise). Deterministic: one thread, no sampling.
    """
    sentences = [part for line in text_lines for part in line.split("\n") if part]
    if not sentences:
        raise ValueError("train_tiny_spm needs at least one non-empty line of text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=byte_fallback,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=pad_id,
        user_defined_symbols=list(user_defined_symbols),
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def train_tiny_spm_v1(
    out_path: str | os.PathLike, text_lines: Iterable[str], vocab_size: int, **kwargs
) -> Path:
    """A ChatGLM-6B (v1) ``ice_text.model``: the v1 id layout, trained on text after the v1 pre-processing.

    Newlines are kept inside a line here (they become ``<n>`` before training, as in the official model).
    """
    lines = [v1_preprocess_text(line) for line in text_lines]
    return train_tiny_spm(out_path, lines, vocab_size, CHATGLM_V1_USER_DEFINED_SYMBOLS, pad_id=3, **kwargs)

"""GLM-4's original tokenizer (a tiktoken ``tokenizer.model``) as a transformers fast tokenizer.

The original GLM-4-9B folders ship a tiktoken BPE file (one ``base64(token) rank`` per line) and their
own tokenization code. transformers' ``TikTokenConverter`` builds the equivalent byte-level BPE for the
``tokenizers`` library; GLM-4's special tokens follow the BPE ranks in a fixed order, and its
pre-tokenizer pattern is the cl100k one.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError

GLM4_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Appended after the mergeable ranks, in this order (ids len(ranks), len(ranks)+1, ...).
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)


def load_glm4_tiktoken(path: str | Path, chat_template: str | None = None):
    """A ``PreTrainedTokenizerFast`` from GLM-4's tiktoken ``tokenizer.model`` (left padding)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(path) / "tokenizer.model"
    if not vocab.exists():
        raise ModelLoadError(f"{path}: no tokenizer.json and no tiktoken tokenizer.model for GLM-4")
    try:
        backend = TikTokenConverter(vocab_file=str(vocab), pattern=GLM4_PATTERN).converted()
    except ValueError as e:  # tiktoken missing, or not a tiktoken file
        raise ModelLoadError(f"{vocab}: cannot read the GLM-4 tiktoken vocabulary: {e}") from None
    base = backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIAL_TOKENS])
    for offset, token in enumerate(GLM4_SPECIAL_TOKENS):
        if backend.token_to_id(token) != base + offset:
            raise ModelLoadError(
                f"{vocab}: special token {token} would get id {backend.token_to_id(token)}, "
                f"expected {base + offset}"
            )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=chat_template,
    )

"""``glmtune_sdpa``: transformers' SDPA attention that attends within each example of a padding-free row.

A padding-free batch (:class:`glmtune.data.collate.FlatCollator`) is one row holding every example of
the batch. transformers keeps the examples apart with a block-diagonal mask over the whole row, so
SDPA would still compute (and mask away) attention between every pair of examples: ``total²`` work
instead of the sum of each example's ``length²``. Given the examples' boundaries
(``cu_seq_lens_q``, as the collator passes them), this attention runs SDPA causally on each example's
slice instead. Anything else (padded batches with a mask, generation with a cache, several rows) goes
to transformers' own ``sdpa_attention_forward`` unchanged.

:func:`use_padding_free_attention` registers it and switches a model from ``sdpa`` to it for the
duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "glmtune_sdpa"

__all__ = ["NAME", "register", "segment_sdpa_attention", "use_padding_free_attention"]


def segment_sdpa_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if (
        cu is None
        or query.shape[0] != 1
        or key.shape[2] != query.shape[2]  # a cache (generation): not a padding-free training row
        or kwargs.get("cu_seq_lens_k") is not None
        and not torch.equal(kwargs["cu_seq_lens_k"], cu)
        or int(cu[-1]) != query.shape[2]
        or not getattr(module, "is_causal", True)
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
    # split, not slicing: the backward of a split is one concatenation, while each slice's backward
    # would fill a whole-row zero tensor.
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``glmtune_sdpa`` known to transformers (attention and mask functions: SDPA's mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, segment_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextlib.contextmanager
def use_padding_free_attention(model):
    """Within the block, a model on ``sdpa`` attention uses ``glmtune_sdpa``; other choices are kept
    (eager and flex keep the examples apart through the block-diagonal mask, flash attention reads the
    boundaries itself). The previous implementation is restored afterwards."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa" or not hasattr(base, "set_attn_implementation"):
        yield False
        return
    register()
    base.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        base.set_attn_implementation(before)

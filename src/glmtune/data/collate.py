"""Batching: dynamic padding, length-grouped batches, and packing several examples into one row.

- :class:`DataCollator` pads each batch to its own longest example (never to a fixed maximum); labels
  are padded with -100 and an ``attention_mask`` marks the real tokens.
- :func:`length_grouped_sampler`: transformers' ``LengthGroupedSampler``, so that a batch holds
  examples of similar length and little padding.
- :class:`FlatCollator` (padding-free batches): the batch's examples concatenated into one row, no
  padding at all; the same examples per step and the same loss as :class:`DataCollator`'s padded
  batch (each example's position ids restart at 0 and attention is kept apart as for packing below).
- :func:`pack_examples` + :class:`PackedCollator`: several examples share one row. Each example's
  ``position_ids`` restart at 0, which is how transformers (``masking_utils.find_packed_sequence_indices``)
  tells packed sequences apart and builds a block-diagonal causal mask, for sdpa, eager, flex and
  flash attention alike; so no example attends to another. The first label of every example is -100,
  so no example learns to predict the next one's first token.

Packing needs a model whose positions are one number per token and whose attention mask transformers
builds from them (GlmForCausalLM for ChatGLM2/3 and GLM-4, other transformers causal LMs). ChatGLM-6B
(v1) has 2D positions and a bidirectional prompt, and a P-Tuning v2 prefix is passed as a key/value
cache, which switches the packed-sequence detection off: :func:`check_packing` refuses both.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from glmtune.errors import ConfigError
from glmtune.templates import IGNORE_INDEX

__all__ = [
    "DataCollator",
    "FlatCollator",
    "PackedCollator",
    "check_packing",
    "length_grouped_sampler",
    "pack_examples",
]


def _field(example: Any, name: str) -> list[int]:
    """A column of an example given as a mapping (a dataset row) or an object (EncodedExample)."""
    value = example[name] if isinstance(example, Mapping) else getattr(example, name)
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


def _check_pad_args(pad_id: int | None, pad_to_multiple_of: int | None) -> None:
    if pad_id is None:
        raise ConfigError("pad_id is None: the tokenizer has no pad token; pass its eos id (or 0) instead")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ConfigError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")


class DataCollator:
    """Pad a list of ``{"input_ids", "labels"}`` examples to the longest one in the batch.

    ``padding_side="right"`` for training (the default); ``"left"`` keeps the ends of the rows aligned,
    as generation wants. ``pad_to_multiple_of`` rounds the batch length up (tensor-core friendly).
    Returns int64 ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask`` (1 = real token).
    """

    def __init__(self, pad_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        _check_pad_args(pad_id, pad_to_multiple_of)
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_id = int(pad_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, rows: list[torch.Tensor], value: int) -> torch.Tensor:
        out = pad_sequence(rows, batch_first=True, padding_value=value, padding_side=self.padding_side)
        extra = _round_up(out.shape[1], self.pad_to_multiple_of) - out.shape[1]
        if extra:
            out = F.pad(out, (0, extra) if self.padding_side == "right" else (extra, 0), value=value)
        return out

    def __call__(self, features: Sequence[Any]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids = [torch.tensor(_field(f, "input_ids"), dtype=torch.long) for f in features]
        batch = {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._pad([torch.ones(len(x), dtype=torch.long) for x in ids], 0),
        }
        first = features[0]
        if ("labels" in first) if isinstance(first, Mapping) else hasattr(first, "labels"):
            labels = [torch.tensor(_field(f, "labels"), dtype=torch.long) for f in features]
            for x, y in zip(ids, labels):
                if len(x) != len(y):
                    raise ValueError(f"labels ({len(y)}) and input_ids ({len(x)}) differ in length")
            batch["labels"] = self._pad(labels, IGNORE_INDEX)
        return batch


def length_grouped_sampler(lengths: Sequence[int], batch_size: int, seed: int = 0):
    """transformers' ``LengthGroupedSampler``: random mega-batches, sorted by length inside.

    Batches of ``batch_size`` consecutive indices then hold examples of similar length (little padding)
    while the order stays random from one mega-batch to the next; the longest batch comes first, so an
    out-of-memory error shows at the first step.
    """
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [int(n) for n in lengths]
    return LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- packing
def check_packing(model: Any) -> None:
    """Raise :class:`ConfigError` when ``model`` cannot be trained on packed rows.

    ``model``: a registry name ("chatglm", "chatglm3", ...), a model folder, a
    :class:`~glmtune.resolve.ResolvedModel`, or a loaded model. Its spec says whether packing works.
    """
    from glmtune.specs import GLMTUNE_GENERATION_KEY, get_spec, spec_for

    config = getattr(model, "config", None)
    if getattr(model, "spec", None) is not None:  # a ResolvedModel: already known
        spec = model.spec
    elif isinstance(model, str) or hasattr(model, "__fspath__"):
        spec = spec_for(model)
    else:
        # A loaded model: glmtune's loader records its generation in the config.
        spec = get_spec(getattr(config, GLMTUNE_GENERATION_KEY, None) or "hf")
        if getattr(config, "pre_seq_len", None):
            raise ConfigError(
                "packing is not supported with a P-Tuning v2 prefix: the prefix is passed to the model as "
                "past key values, which turns off transformers' packed-sequence masking, so packed "
                "examples would attend to each other; train without packing"
            )
    if not spec.supports_packing:
        raise ConfigError(
            f"packing is not supported for {spec.description.split(':')[0]}: its position ids and attention "
            "cannot be separated per example by restarting position ids (ChatGLM-6B's 2D positions and "
            "prefix-LM attention let the prompt attend both ways); train it without packing"
        )


def pack_examples(examples: Iterable[Any], max_length: int, *, model: Any = None) -> list[dict]:
    """Pack encoded examples into rows of at most ``max_length`` tokens (best-fit decreasing).

    ``examples``: :class:`EncodedExample` s or mappings with ``input_ids`` and ``labels`` (dataset
    rows). Each row is ``{"input_ids", "labels", "position_ids", "lengths"}``: the examples concatenated
    in their original order, ``position_ids`` restarting at 0 for each, the first label of each set to
    -100, and the examples' lengths (e.g. for flash attention's cumulative sequence lengths). Given
    ``model`` (name, folder or model), refuses models that cannot be trained packed (see
    :func:`check_packing`). An example longer than ``max_length`` is an error, never cut here: encode
    with ``max_length`` no larger than the packing length.
    """
    if model is not None:
        check_packing(model)
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    items = [(_field(e, "input_ids"), _field(e, "labels")) for e in examples]
    for i, (ids, labels) in enumerate(items):
        if len(ids) != len(labels):
            raise ValueError(
                f"example {i}: labels ({len(labels)}) and input_ids ({len(ids)}) differ in length"
            )
        if not ids:
            raise ValueError(f"example {i} is empty")
        if len(ids) > max_length:
            source = getattr(examples[i], "source", "") if isinstance(examples, Sequence) else ""
            raise ConfigError(
                f"example {i}{f' ({source})' if source else ''} has {len(ids)} tokens, more than the packing "
                f"length {max_length}; encode with max_length <= {max_length}"
            )
    # Best fit decreasing: the longest examples first, each into the fullest row it still fits in.
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row index), sorted
    for i in order:
        size = len(items[i][0])
        j = bisect.bisect_left(free, (size, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, r))
    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "position_ids": [], "lengths": []}
        for i in sorted(members):
            ids, labels = items[i]
            row["input_ids"] += ids
            # The previous example's last token would be trained to predict this one's first token.
            row["labels"] += [IGNORE_INDEX] + labels[1:]
            row["position_ids"] += range(len(ids))
            row["lengths"].append(len(ids))
        packed.append(row)
    return packed


class PackedCollator:
    """Batch packed rows (from :func:`pack_examples`): ``input_ids``, ``labels``, ``position_ids``.

    Rows are padded on the right to the longest row in the batch; the padding gets labels -100 and
    position ids of its own (0, 1, ...), so to the mask it is one more sequence that nothing attends
    to. No ``attention_mask`` is returned: transformers only derives the per-example mask from the
    position ids when there is none. The batch also carries ``use_cache=False``: a key/value cache
    (GlmForCausalLM creates one by default, even in training) switches that derivation off too, and the
    examples would then attend to each other.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None, *, model: Any = None):
        _check_pad_args(pad_id, pad_to_multiple_of)
        if model is not None:
            check_packing(model)
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Any]) -> dict[str, Any]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        width = _round_up(max(len(_field(r, "input_ids")) for r in rows), self.pad_to_multiple_of)
        ids, labels, positions = [], [], []
        for r in rows:
            row_ids = _field(r, "input_ids")
            pad = width - len(row_ids)
            ids.append(row_ids + [self.pad_id] * pad)
            labels.append(_field(r, "labels") + [IGNORE_INDEX] * pad)
            positions.append(_field(r, "position_ids") + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "use_cache": False,
        }


class FlatCollator:
    """Padding-free batches: the examples of a batch concatenated into a single row ``[1, total]``.

    Returns ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for every example),
    ``use_cache=False`` and no ``attention_mask`` (as :class:`PackedCollator`: transformers then keeps
    the examples apart by their position ids), plus the flash-attention style boundaries
    ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 ``[0, n1, n1+n2, ...]``) and ``max_length_q``/``_k``,
    which glmtune's ``glmtune_sdpa`` attention (:mod:`glmtune.train.fast_attention`) and flash
    attention use to attend within each example only, never over the whole row.

    The first label of every example is -100: in a padded batch the first position predicts nothing
    either, so the loss (mean over the labelled tokens) is the padded batch's loss.
    """

    def __init__(self, pad_id: int | None = None, *, model: Any = None):
        if model is not None:
            check_packing(model)
        self.pad_id = pad_id

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for f in features:
            row_ids = _field(f, "input_ids")
            row_labels = _field(f, "labels")
            if len(row_ids) != len(row_labels):
                raise ValueError(
                    f"labels ({len(row_labels)}) and input_ids ({len(row_ids)}) differ in length"
                )
            if not row_ids:
                raise ValueError("cannot collate an empty example")
            ids += row_ids
            labels += [IGNORE_INDEX] + row_labels[1:]
            positions += range(len(row_ids))
            bounds.append(bounds[-1] + len(row_ids))
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        cu = torch.tensor(bounds, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
            "use_cache": False,
        }

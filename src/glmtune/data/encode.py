"""Examples -> token ids and loss labels, with the truncation policies of the original tools, counted.

The chat template (:mod:`glmtune.templates`) decides the layout and where the loss goes; this module
decides what happens when an example is too long, and never does it silently: every example cut, every
token removed and every example dropped is counted in :class:`EncodeStats`.

Two policies (:class:`EncodeSettings`):

- ``max_source_length`` / ``max_target_length`` (the ChatGLM-6B / ChatGLM2-6B P-Tuning scripts):
  everything before the last reply is the source, the last reply the target. The source keeps its first
  ``max_source_length`` content tokens and the target its first ``max_target_length``; the template's
  special tokens (``[gMASK]``, ``sop``, role tokens, the closing ``eos`` / ``<eop>``) stay where they are.
  Content tokens are counted, not the special ones, so one limit means the same amount of text in every
  generation (the official scripts count 1 or 2 special tokens into one of the limits).
- ``max_length`` (one budget for the whole sequence): the oldest rounds of history go first (a system
  message stays); if the last exchange alone is still too long, its last user message is cut from the
  left (its beginning goes, the end of the question stays) while the prompt is longer than its share of
  the budget -- what the reply does not need, but at least half -- and then the reply's end is cut.

An example with no token of its reply left is dropped (and counted). Labels are aligned with input_ids
(-100 where there is no loss); the model shifts them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from glmtune.data.readers import DataError, Example
from glmtune.errors import ConfigError
from glmtune.templates import IGNORE_INDEX, Template

__all__ = [
    "ENCODING_VERSION",
    "EncodeSettings",
    "EncodeStats",
    "EncodedExample",
    "encode",
    "encode_all",
    "length_stats",
]

# Part of every cache key: bump it whenever encode() gives other ids or labels for the same input.
ENCODING_VERSION = 1

# How many dropped examples EncodeStats names (the count is always exact).
_MAX_LISTED = 20


@dataclass(frozen=True)
class EncodeSettings:
    """Length limits (None: no limit) and whether the prompt is trained on too."""

    max_source_length: int | None = None
    max_target_length: int | None = None
    max_length: int | None = None
    train_on_prompt: bool = False

    def __post_init__(self):
        for name in ("max_source_length", "max_target_length", "max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length is not None and (
            self.max_source_length is not None or self.max_target_length is not None
        ):
            raise ConfigError(
                "give either max_source_length / max_target_length (P-Tuning style, source and target "
                "cut separately) or max_length (history first), not both"
            )

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.max_source_length, self.max_target_length, self.max_length))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EncodedExample:
    """One encoded example.

    ``prompt_tokens``: tokens before the last reply (the whole prompt, template tokens included);
    ``reply_tokens``: the rest (the last reply, its closing token and anything the template puts after
    it), so ``prompt_tokens + reply_tokens == len(input_ids)``. ``target_tokens``: tokens of the last
    reply that carry a loss, its closing special token not counted (0: nothing of the reply is left,
    :func:`encode_all` drops the example). ``truncated_tokens``: how many tokens the limits removed.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    reply_tokens: int
    truncated_tokens: int = 0
    source: str = ""
    target_tokens: int = 0

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def truncated(self) -> bool:
        return self.truncated_tokens > 0


@dataclass
class EncodeStats:
    """What :func:`encode_all` did: examples in, kept, truncated, tokens removed, dropped, invalid."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    tokens_removed: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)
    invalid: list[DataError] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-able (invalid rows as their messages)."""
        out = asdict(self)
        out["invalid"] = [str(e) for e in self.invalid]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EncodeStats:
        data = dict(data)
        data["invalid"] = [DataError(str(m)) for m in data.get("invalid", [])]
        return cls(**data)


def _special_ids(tokenizer) -> frozenset[int]:
    """Ids the template writes itself: named special tokens plus added tokens marked special.

    Both are needed: ChatGLM's command tokens are among ``all_special_ids``, while a GLM-4 / Qwen
    ``tokenizer.json`` often marks its role tokens special only in ``added_tokens_decoder``.
    """
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return frozenset(ids)


def _reply_span(labels: Sequence[int]) -> tuple[int, int]:
    """[start, end) of the last run of labelled positions: the last reply and its closing token."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def _rounds_start(messages: list[dict]) -> tuple[list[dict], list[int]]:
    """(a leading system message or nothing, indexes of the user messages that start each round)."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    return messages[:first], [i for i in range(first, len(messages)) if messages[i]["role"] == "user"]


@dataclass
class _Seq:
    """An encoding being cut: ids, labels and the [start, end) of the last reply in them."""

    ids: list[int]
    labels: list[int]
    start: int
    end: int

    def __len__(self) -> int:
        return len(self.ids)

    def remove(self, positions: Iterable[int]) -> _Seq:
        gone = sorted(set(positions))
        if not gone:
            return self
        drop = set(gone)
        keep = [i for i in range(len(self.ids)) if i not in drop]
        # Tracked rather than recomputed from the labels: a cut may leave the reply with no label at all.
        before_start = sum(1 for i in gone if i < self.start)
        before_end = sum(1 for i in gone if i < self.end)
        return _Seq(
            [self.ids[i] for i in keep],
            [self.labels[i] for i in keep],
            self.start - before_start,
            self.end - before_end,
        )


class _Encoder:
    """Holds what every example of one run shares (tokenizer, template, limits, special ids)."""

    def __init__(self, tokenizer, template: Template, settings: EncodeSettings):
        self.tok = tokenizer
        self.template = template
        self.settings = settings
        self.specials = _special_ids(tokenizer)

    def _raw(self, messages: list[dict], source: str) -> _Seq:
        try:
            enc = self.template.encode_example(self.tok, messages, train_on_prompt=False)
        except ValueError as e:
            # The template refuses a conversation it cannot express (e.g. tool messages for ChatGLM2).
            raise DataError(f"cannot encode with the {self.template.name} template: {e}", source) from None
        labels = list(enc.labels)
        start, end = _reply_span(labels)
        if end == 0:
            raise DataError(f"the {self.template.name} template put no loss on this example", source)
        return _Seq(list(enc.input_ids), labels, start, end)

    def _content(self, seq: _Seq, start: int, end: int) -> list[int]:
        """Positions in [start, end) that hold text, not a token the template writes itself."""
        return [i for i in range(start, end) if seq.ids[i] not in self.specials]

    # ------------------------------------------------------------------------- P-Tuning style limits
    def _source_target(self, seq: _Seq) -> _Seq:
        drop: list[int] = []
        if self.settings.max_source_length is not None:
            # The source keeps its beginning, as the official scripts' prompt[:max_source_length] does.
            drop += self._content(seq, 0, seq.start)[self.settings.max_source_length :]
        if self.settings.max_target_length is not None:
            drop += self._content(seq, seq.start, seq.end)[self.settings.max_target_length :]
        return seq.remove(drop)

    # ----------------------------------------------------------------------- one max_length budget
    def _fit_history(self, messages: list[dict], seq: _Seq, source: str, limit: int):
        """Drop the oldest rounds until the example fits, or until only the last round is left.

        Returns (messages, encoding) of the longest history that fits, else of the last round alone.
        """
        system, starts = _rounds_start(messages)
        if len(starts) < 2:
            return messages, seq
        encoded: dict[int, _Seq] = {}

        def from_round(k: int) -> _Seq:
            if k not in encoded:
                encoded[k] = self._raw(system + messages[starts[k] :], source)
            return encoded[k]

        last = len(starts) - 1
        if len(from_round(last)) <= limit:
            # Fewer rounds are shorter, so the fewest rounds to drop are found by bisection.
            lo, hi = 1, last
            while lo < hi:
                mid = (lo + hi) // 2
                if len(from_round(mid)) <= limit:
                    hi = mid
                else:
                    lo = mid + 1
            last = hi
        return system + messages[starts[last] :], from_round(last)

    def _cut_last_query(self, messages: list[dict], seq: _Seq, source: str, limit: int) -> _Seq:
        """Cut the last user message from the left while the prompt is over its share of ``limit``.

        The prompt's share is what the reply leaves of the budget, but at least half of it.
        """
        budget = max(limit - (len(seq) - seq.start), limit // 2)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if seq.start <= budget or not users:
            return seq
        u = users[-1]
        text = messages[u]["content"]

        def without_first(chars: int) -> _Seq:
            changed = [dict(m) for m in messages]
            changed[u]["content"] = text[chars:]
            return self._raw(changed, source)

        # The fewest characters to drop so that the prompt fits its share (bisection); all of them when
        # even an empty question leaves the prompt over it.
        lo, hi, best = 1, len(text), None
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = without_first(mid)
            if trial.start <= budget:
                best, hi = trial, mid - 1
            else:
                lo = mid + 1
        return best if best is not None else without_first(len(text))

    def _cut_reply_end(self, seq: _Seq, limit: int) -> _Seq:
        excess = len(seq) - limit
        if excess <= 0:
            return seq
        content = self._content(seq, seq.start, seq.end)
        # The reply's end goes; its closing eos / <eop> (a special token) stays.
        return seq.remove(content[max(len(content) - excess, 0) :])

    def _max_length(self, messages: list[dict], seq: _Seq, source: str) -> _Seq:
        limit = self.settings.max_length
        if len(seq) <= limit:
            return seq
        messages, seq = self._fit_history(messages, seq, source, limit)
        if len(seq) > limit:
            seq = self._cut_last_query(messages, seq, source, limit)
            seq = self._cut_reply_end(seq, limit)
        return seq

    # --------------------------------------------------------------------------------------- public
    def encode(self, example: Example) -> EncodedExample:
        seq = self._raw(example.messages, example.source)
        full = len(seq)
        if self.settings.max_source_length is not None or self.settings.max_target_length is not None:
            seq = self._source_target(seq)
        elif self.settings.max_length is not None:
            seq = self._max_length(example.messages, seq, example.source)
        target = sum(
            1
            for i in range(seq.start, seq.end)
            if seq.labels[i] != IGNORE_INDEX and seq.ids[i] not in self.specials
        )
        return EncodedExample(
            input_ids=seq.ids,
            labels=list(seq.ids) if self.settings.train_on_prompt else seq.labels,
            prompt_tokens=seq.start,
            reply_tokens=len(seq) - seq.start,
            truncated_tokens=full - len(seq),
            source=example.source,
            target_tokens=target,
        )


def encode(
    tokenizer, template: Template, example: Example, settings: EncodeSettings | None = None
) -> EncodedExample:
    """Encode one example with ``template`` and cut it to ``settings``' limits (see the module doc).

    A conversation the template cannot express raises :class:`DataError` naming the example's source.
    The result may have ``target_tokens == 0`` (nothing of the reply left); :func:`encode_all` drops it.
    """
    return _Encoder(tokenizer, template, settings or EncodeSettings()).encode(example)


def encode_all(
    tokenizer,
    template: Template,
    examples: Iterable[Example],
    settings: EncodeSettings | None = None,
    skip_invalid: bool = False,
    progress: bool = False,
) -> tuple[list[EncodedExample], EncodeStats]:
    """Encode every example; drop (and count) those with no reply token left after truncation.

    ``skip_invalid``: an example the template cannot encode is left out and listed in
    ``stats.invalid`` instead of raising :class:`DataError`. ``progress``: a count and an ETA on stderr
    (:mod:`glmtune.progress`).
    """
    from glmtune.progress import track

    encoder = _Encoder(tokenizer, template, settings or EncodeSettings())
    stats = EncodeStats()
    out: list[EncodedExample] = []
    for example in track(examples, "tokenizing", "rows", enabled=None if progress else False):
        stats.examples += 1
        try:
            enc = encoder.encode(example)
        except DataError as err:
            if not skip_invalid:
                raise
            stats.invalid.append(err)
            continue
        if enc.truncated:
            stats.truncated += 1
            stats.tokens_removed += enc.truncated_tokens
        if enc.target_tokens == 0:
            stats.dropped += 1
            if len(stats.dropped_sources) < _MAX_LISTED:
                stats.dropped_sources.append(example.source)
            continue
        out.append(enc)
    stats.kept = len(out)
    return out, stats


STAT_KEYS = ("count", "mean", "std", "min", "p25", "p50", "p75", "p90", "p99", "max")


def length_stats(values: Iterable[int]) -> dict:
    """count, mean, std, min, 25/50/75/90/99th percentiles (linear interpolation) and max of lengths."""
    a = np.fromiter(values, dtype=np.float64)
    if a.size == 0:
        return {"count": 0, **dict.fromkeys(STAT_KEYS[1:])}
    p25, p50, p75, p90, p99 = np.percentile(a, [25, 50, 75, 90, 99])
    return {
        "count": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": int(a.min()),
        "p25": float(p25),
        "p50": float(p50),
        "p75": float(p75),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(a.max()),
    }

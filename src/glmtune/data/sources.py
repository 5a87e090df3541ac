"""Several data sources mixed into one training set: local files and hub datasets, weighted or counted.

A source is a local JSON/JSONL file or a Hugging Face **dataset** id (``org/name``, ``hub:org/name``
to force the hub where a local path of that shape exists, ``@revision`` allowed) with a ``split``.
Each source has its own format and columns, and at most one of:

- ``rows: N`` — exactly N rows: a seeded sample without replacement when N is at most the rows the
  source has, else every row ⌊N/n⌋ times plus a sample of the remainder (upsampling, reported);
- ``weight: w`` — the weighted sources share the rows they have between them in proportion to their
  weights: a source gets ``W_rows * w / W`` rows (``W_rows`` = the weighted sources' rows, ``W`` =
  their weights' sum; rounded so the counts add up to ``W_rows``), drawn the same way. Equal weights over sources of different sizes
  balance them without changing the total;
- neither — every row once.

Each source is tokenized through the on-disk cache on its own (:func:`glmtune.data.cache.tokenize_cached`):
changing one source re-tokenizes only that one. Mixing is deterministic under ``seed`` (one numpy
generator per source, seeded with ``(seed, source index)``). The mixed set keeps the rows grouped by
source; the Trainer's sampler shuffles it.

Hub datasets are fetched with :func:`huggingface_hub.snapshot_download` (``repo_type="dataset"``) into
the hub cache, the same cache and offline rules as model hub ids (``HF_HUB_OFFLINE=1``: the cache
only, and a clear error naming the id and the command that fetches it). The split's file is found in
the snapshot by name (``train.jsonl``, ``data/train-00000-of-00001.parquet``, ...); Parquet files are
converted once to JSONL beside the tokenized cache so the readers (and their file:line errors) work
unchanged. ``datasets.load_dataset`` is not used for the hub because its offline mode needs the
dataset to have been prepared by ``datasets`` itself before; the hub cache is what users share.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.data.readers import DataError

__all__ = [
    "DataSource",
    "MixReport",
    "SourceShare",
    "as_sources",
    "is_hub_source",
    "mix_indices",
    "source_file",
    "tokenize_sources",
]

_HUB_ID = re.compile(r"^(?:hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class DataSource:
    """One entry of ``data.train_file`` / ``data.eval_file``."""

    path: str
    split: str | None = None
    format: str = "auto"
    columns: Mapping[str, str | None] | None = None
    weight: float | None = None
    rows: int | None = None

    def __post_init__(self):
        if self.weight is not None and self.rows is not None:
            raise DataError(f"{self.path}: give a source either weight or rows, not both")
        if self.weight is not None and not self.weight > 0:
            raise DataError(f"{self.path}: weight must be positive, got {self.weight}")
        if self.rows is not None and self.rows < 1:
            raise DataError(f"{self.path}: rows must be at least 1, got {self.rows}")

    @property
    def name(self) -> str:
        """How reports name the source: the path, with the split for a hub dataset."""
        return f"{self.path}[{self.split}]" if self.split else self.path


def as_sources(value, *, fmt: str = "auto", columns: Mapping | None = None) -> list[DataSource]:
    """``data.train_file`` as written (a path, or a list of paths and mappings) -> sources.

    A plain path inherits the group's ``data.format`` / ``data.columns``; a mapping may set its own.
    """
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, DataSource):
            out.append(item)
        elif isinstance(item, (str, os.PathLike)):
            out.append(DataSource(str(item), format=fmt, columns=columns))
        elif isinstance(item, Mapping):
            known = {"path", "split", "format", "columns", "weight", "rows"}
            extra = sorted(set(item) - known)
            if extra or "path" not in item:
                why = f"unknown keys {', '.join(extra)}" if extra else "missing 'path'"
                raise DataError(f"data source [{i}]: {why} (keys: {', '.join(sorted(known))})")
            out.append(
                DataSource(
                    str(item["path"]),
                    split=item.get("split"),
                    format=item.get("format", fmt),
                    columns=item.get("columns", columns),
                    weight=item.get("weight"),
                    rows=item.get("rows"),
                )
            )
        else:
            raise DataError(f"data source [{i}]: expected a path or a mapping, got {type(item).__name__}")
    if not out:
        raise DataError("no data source given")
    return out


# ------------------------------------------------------------------------------------------- hub files
def _hub_id(path: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``path`` names a hub dataset, None for a local file."""
    m = _HUB_ID.match(path)
    if m is None or (not path.startswith("hub:") and Path(path).exists()):
        return None
    return m.group(1), m.group(2)


def is_hub_source(path: str) -> bool:
    """Whether a source path names a hub dataset (``org/name`` that is no local path, or ``hub:...``)."""
    return _hub_id(path) is not None


def _split_file(snapshot: Path, split: str, repo: str) -> list[Path]:
    files = sorted(
        p
        for p in snapshot.rglob("*")
        if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES and ".git" not in p.parts
    )
    # By preference: a file named after the split, then the hub's "data/<split>-00000-of-00001" shards.
    named = [p for p in files if p.stem.lower() == split.lower()]
    sharded = [p for p in files if re.match(rf"{re.escape(split)}[-_.]", p.name, flags=re.I)]
    in_folder = [
        p for p in files if split.lower() in (part.lower() for part in p.relative_to(snapshot).parts[:-1])
    ]
    chosen = named or sharded or in_folder
    if not chosen:
        listed = ", ".join(str(p.relative_to(snapshot)) for p in files[:10]) or "none"
        raise DataError(
            f"hub dataset {repo}: no file for split {split!r} in {snapshot} (data files: {listed}); "
            "name the split with `split:`"
        )
    return chosen


def _snapshot(repo: str, revision: str | None, label: str) -> Path:
    from glmtune.resolve import fetch_hub_snapshot

    patterns = [f"*{s}" for s in _DATA_SUFFIXES] + [f"**/*{s}" for s in _DATA_SUFFIXES]
    return fetch_hub_snapshot(
        repo, revision, repo_type="dataset", allow_patterns=patterns, label=label, error=DataError
    )


def _parquet_as_jsonl(files: Sequence[Path], cache: Path) -> Path:
    """The rows of Parquet shards as one JSONL file in ``cache``, keyed by the shards' bytes."""
    import pyarrow.parquet as pq

    from glmtune.atomic import write_jsonl

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    out = cache / "hub-parquet" / f"{files[0].stem}-{h.hexdigest()[:16]}.jsonl"
    if not out.exists():
        # Dates and bytes have no JSON form: written as their text, which is what a prompt would show.
        rows = [
            json.loads(json.dumps(row, default=str)) for f in files for row in pq.read_table(f).to_pylist()
        ]
        write_jsonl(out, rows)
    return out


def source_file(source: DataSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local JSON/JSONL file a source reads: the path itself, or the hub split's file."""
    hub = _hub_id(source.path)
    if hub is None:
        if source.split is not None:
            raise DataError(f"{source.path}: `split` is for hub datasets; a local file is read whole")
        return Path(source.path)
    repo, revision = hub
    snapshot = _snapshot(repo, revision, source.path)
    files = _split_file(snapshot, source.split or "train", repo)
    if files[0].suffix.lower() == ".parquet":
        from glmtune.data.cache import default_cache_dir

        return _parquet_as_jsonl(files, Path(cache_dir) if cache_dir else default_cache_dir())
    if len(files) > 1:
        raise DataError(
            f"hub dataset {repo}: several JSON files for split {source.split or 'train'!r}: "
            f"{', '.join(p.name for p in files)}; name one as a local path"
        )
    return files[0]


# ---------------------------------------------------------------------------------------------- mixing
@dataclass
class SourceShare:
    source: str
    format: str
    available: int
    used: int
    share: float = 0.0

    @property
    def repeats(self) -> float:
        return self.used / self.available if self.available else 0.0


@dataclass
class MixReport:
    """Rows each source has and gives to the mix, and its share of the mixed set."""

    seed: int
    sources: list[SourceShare] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(s.used for s in self.sources)

    def as_dict(self) -> dict:
        return {
            "seed": self.seed,
            "total": self.total,
            "sources": [
                {
                    "source": s.source,
                    "format": s.format,
                    "available": s.available,
                    "used": s.used,
                    "share": round(s.share, 6),
                    "repeats": round(s.repeats, 4),
                }
                for s in self.sources
            ],
        }

    def lines(self) -> list[str]:
        out = []
        for s in self.sources:
            note = f", upsampled {s.repeats:.2f}x" if s.used > s.available else ""
            out.append(f"  {s.source}: {s.used} of {s.available} rows ({100 * s.share:.1f}%{note})")
        return out


def _draw(n: int, k: int, rng) -> list[int]:
    """k row indices out of n: without replacement when k <= n, else every row k // n times + the rest."""
    whole, rest = divmod(k, n)
    picked = list(range(n)) * whole + sorted(rng.choice(n, size=rest, replace=False).tolist())
    return picked


def mix_indices(sources: Sequence[DataSource], available: Sequence[int], seed: int) -> list[list[int]]:
    """For each source, the indices of its (tokenized) rows that go into the mix, deterministically."""
    import numpy as np

    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    pool = sum(available[i] for i in weighted)
    weights = sum(sources[i].weight for i in weighted)
    # Largest remainders: the weighted counts add up to exactly `pool` (ties go to the earlier source).
    quota = {i: pool * sources[i].weight / weights for i in weighted}
    counts = {i: int(q) for i, q in quota.items()}
    by_remainder = sorted(weighted, key=lambda i: (-(quota[i] - counts[i]), i))
    for i in by_remainder[: pool - sum(counts.values())]:
        counts[i] += 1
    out = []
    for i, (s, n) in enumerate(zip(sources, available)):
        if n == 0:
            if s.rows or s.weight:
                raise DataError(f"{s.name}: no usable rows to draw from (all dropped or invalid)")
            out.append([])
            continue
        if s.rows is not None:
            k = s.rows
        elif s.weight is not None:
            k = max(1, counts[i])
        else:
            out.append(list(range(n)))
            continue
        out.append(_draw(n, k, np.random.default_rng([seed, i])))
    return out


def tokenize_sources(
    sources: Sequence[DataSource],
    model,
    *,
    seed: int,
    settings=None,
    cache_dir: str | os.PathLike | None = None,
    skip_invalid: bool = False,
):
    """Tokenize each source through the cache, then mix. Returns ``(dataset, infos, report, picked)``:
    the mixed ``datasets.Dataset`` (the columns of :func:`~glmtune.data.cache.tokenize_cached`), one
    :class:`~glmtune.data.cache.CacheInfo` per source, the :class:`MixReport` and, per source, the
    indices of its tokenized rows in the mix (in mix order)."""
    from datasets import concatenate_datasets

    from glmtune.data.cache import tokenize_cached

    parts, infos, files = [], [], []
    for s in sources:
        path = source_file(s, cache_dir)
        ds, info = tokenize_cached(
            path,
            model,
            settings=settings,
            cache_dir=cache_dir,
            fmt=s.format,
            columns=s.columns or None,
            skip_invalid=skip_invalid,
        )
        parts.append(ds)
        infos.append(info)
        files.append(path)
    picked = mix_indices(sources, [len(p) for p in parts], seed)
    report = MixReport(seed)
    for s, info, idx in zip(sources, infos, picked):
        report.sources.append(SourceShare(s.name, info.format, info.rows, len(idx)))
    for share in report.sources:
        share.share = share.used / report.total if report.total else 0.0
    chosen = [p.select(idx) if idx != list(range(len(p))) else p for p, idx in zip(parts, picked) if idx]
    if not chosen:
        raise DataError(f"no rows to train on in {', '.join(s.name for s in sources)}")
    mixed = chosen[0] if len(chosen) == 1 else concatenate_datasets(chosen)
    return mixed, infos, report, picked

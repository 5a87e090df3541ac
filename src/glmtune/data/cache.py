"""Pre-tokenized datasets cached on disk (Hugging Face ``datasets`` Arrow format), keyed by content.

:func:`tokenize_cached` reads and encodes a data file once; later calls with the same inputs load the
Arrow files memory-mapped instead. The key covers everything the token ids depend on:

- the data file's bytes (sha256), its format and column mapping, ``skip_invalid``;
- the tokenizer: the sha256 of each tokenizer file in the model folder, the tokenizer class named in
  ``tokenizer_config.json``, the model generation glmtune detects (which picks glmtune's own ChatGLM
  tokenizer or a transformers one), and the versions of glmtune and the tokenizer libraries;
- the template: a generation's by name, a YAML one (``model.template``) by the sha256 of its contents;
  the :class:`EncodeSettings` and :data:`ENCODING_VERSION`.

The tokenizer is identified from its files rather than by loading it, so a cache hit costs a few file
hashes and a memory map, not a tokenizer load. Entries are written to a temporary folder beside the
final one and renamed into place, so a reader never sees a half-written entry and two processes
tokenizing the same file at once both end with the same complete entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from glmtune.atomic import atomic_dir
from glmtune.data.encode import ENCODING_VERSION, EncodeSettings, EncodeStats, encode_all
from glmtune.data.readers import DataError, read_examples

if TYPE_CHECKING:  # the data package is imported without torch; the model types come with a model
    from glmtune.resolve import ResolvedModel

__all__ = ["CacheInfo", "TOKENIZER_FILES", "default_cache_dir", "tokenize_cached"]

# Files that define a tokenizer (sentencepiece models, tokenizer.json, its config and the chat template).
TOKENIZER_FILES = (
    "tokenizer.model",
    "ice_text.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_LIBRARIES = ("glmtune", "transformers", "tokenizers", "sentencepiece")
META_FILE = "glmtune_cache.json"
_CHUNK = 1 << 20


@dataclass
class CacheInfo:
    """What :func:`tokenize_cached` did: a hit or a miss, the key, the entry's folder and the stats."""

    hit: bool
    key: str
    path: Path
    stats: EncodeStats
    rows: int
    format: str
    seconds: float


def default_cache_dir() -> Path:
    """``$GLMTUNE_CACHE/datasets``, or ``~/.cache/glmtune/datasets``."""
    from glmtune.loading import cache_dir

    return cache_dir() / "datasets"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _tokenizer_identity(model_dir: Path, generation: str) -> dict:
    if model_dir.is_file():
        # A GGUF file carries its tokenizer inside; hashing gigabytes on every call would defeat the cache.
        st = model_dir.stat()
        return {"file": str(model_dir.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = {name: _sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()}
    if not files:
        raise DataError(f"{model_dir}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES[:3])})")
    cls = ""
    if "tokenizer_config.json" in files:
        try:
            cls = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get(
                "tokenizer_class", ""
            )
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            cls = ""
    return {"files": files, "class": cls, "generation": generation}


def cache_key(
    path: Path,
    model: ResolvedModel,
    settings: EncodeSettings,
    fmt: str = "auto",
    columns: Mapping[str, str | None] | None = None,
    skip_invalid: bool = False,
) -> tuple[str, dict]:
    """(sha256 hex key, the JSON-able description it is the hash of)."""
    spec = model.spec
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    described = {
        "encoding_version": ENCODING_VERSION,
        "data_sha256": _sha256_file(path),
        "format": fmt,
        "columns": dict(columns) if columns is not None else None,
        "skip_invalid": bool(skip_invalid),
        "tokenizer": _tokenizer_identity(model.gguf or model.path, spec.name),
        "libraries": {name: _version(name) for name in _LIBRARIES},
        "template": model.template.fingerprint,
        "settings": settings.as_dict(),
    }
    blob = json.dumps(described, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest(), described


def _entry_name(path: Path, key: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:60] or "data"
    return f"{stem}-{key[:20]}"


def _load_entry(entry: Path, key: str):
    """(Dataset, meta) of a complete entry with this key, or None."""
    from datasets import load_from_disk

    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        return load_from_disk(str(entry)), meta
    except (OSError, ValueError, KeyError):
        # A damaged entry (files deleted by hand) is rebuilt rather than trusted.
        return None


def _build(path, model: ResolvedModel, settings, fmt, columns, skip_invalid):
    from datasets import Dataset, Features, List, Value

    from glmtune.loading import load_tokenizer

    read = read_examples(path, fmt=fmt, columns=columns, skip_invalid=skip_invalid)
    tokenizer = load_tokenizer(model)
    encoded, stats = encode_all(
        tokenizer, model.template, read.examples, settings, skip_invalid=skip_invalid, progress=True
    )
    # Rows the reader skipped are invalid rows too; the stats list both.
    stats.invalid = list(read.skipped) + stats.invalid
    stats.examples += len(read.skipped)
    features = Features(
        {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32")}
    )
    columns_ = {
        "input_ids": [e.input_ids for e in encoded],
        "labels": [e.labels for e in encoded],
        "length": [e.length for e in encoded],
    }
    return Dataset.from_dict(columns_, features=features), stats, read.format


def _save(ds, entry: Path, meta: dict) -> None:
    """Write the entry through :func:`glmtune.atomic.atomic_dir`: a reader finds it complete or absent.

    A damaged entry with this key is replaced; when two processes write the same entry at once, either
    result is valid (they are identical)."""
    import datasets as hf_datasets

    quiet = not hf_datasets.are_progress_bars_disabled()
    written = False
    try:
        if quiet:
            hf_datasets.disable_progress_bars()
        with atomic_dir(entry, overwrite=True) as tmp:
            ds.save_to_disk(str(tmp))
            (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
            written = True
    except OSError:
        # Our complete entry could not be moved into place because another process's was moving in.
        if not written or not (entry / META_FILE).exists():
            raise
    finally:
        if quiet:
            hf_datasets.enable_progress_bars()


def tokenize_cached(
    path: str | os.PathLike,
    model: str | os.PathLike | ResolvedModel,
    settings: EncodeSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    fmt: str = "auto",
    columns: Mapping[str, str | None] | None = None,
    skip_invalid: bool = False,
):
    """Tokenize a data file for ``model``'s tokenizer and template, through an on-disk cache.

    ``model`` is a :class:`~glmtune.resolve.ResolvedModel` (its generation picks the tokenizer, its
    ``template`` the layout),
    or a model folder / GGUF file resolved here by detection.

    Returns ``(dataset, info)``: a ``datasets.Dataset`` with columns ``input_ids`` and ``labels``
    (int32 lists, labels -100 where there is no loss) and ``length``, and a :class:`CacheInfo`. The
    entry lives in ``cache_dir`` (default :func:`default_cache_dir`); any change to the data, the
    tokenizer, the template, the limits or glmtune's encoding makes a new entry.
    """
    started = time.perf_counter()
    from glmtune.resolve import resolve_model

    path, model = Path(path), resolve_model(model)
    settings = settings or EncodeSettings()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key, described = cache_key(path, model, settings, fmt, columns, skip_invalid)
    entry = root / _entry_name(path, key)
    found = _load_entry(entry, key) if entry.exists() else None
    if found is not None:
        ds, meta = found
        stats = EncodeStats.from_dict(meta["stats"])
        return ds, CacheInfo(True, key, entry, stats, len(ds), meta["format"], time.perf_counter() - started)
    ds, stats, read_format = _build(path, model, settings, fmt, columns, skip_invalid)
    if len(ds) == 0:
        # An empty Arrow dataset does not load back (datasets raises IndexError): say why it is empty.
        raise DataError(
            f"{path}: no example left after tokenizing: {stats.examples} read, {stats.dropped} dropped "
            f"(no reply token left within the length limits {settings.as_dict()}), {len(stats.invalid)} invalid"
        )
    meta = {
        "key": key,
        "source": str(path),
        "model": str(model.path),
        "generation": model.generation,
        "format": read_format,
        "rows": len(ds),
        "stats": stats.as_dict(),
        "described": described,
    }
    _save(ds, entry, meta)
    # Reopened from disk: the caller gets the memory-mapped table, the same object as on a hit.
    reopened = _load_entry(entry, key)
    if reopened is None:
        raise DataError(f"{entry}: the tokenized dataset was written but cannot be read back")
    ds = reopened[0]
    return ds, CacheInfo(False, key, entry, stats, len(ds), read_format, time.perf_counter() - started)

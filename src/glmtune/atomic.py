"""Atomic writes of files and folders: whoever reads the path, and whatever a crash, a kill or a power cut
interrupts, sees the old content or the new, never half of it.

Files (:func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`write_jsonl`): the content goes
to a fresh temporary file ``.NAME.XXXXXXXX.tmp`` in the target's folder (``os.replace`` is atomic only
within one file system), is flushed and fsync'd, renamed over the target, and then the folder is fsync'd.
Temporary names are unique (``tempfile.mkstemp``), so concurrent writers never write into each other's
file, and the temporary file is removed on any failure. Only a writer killed mid-write leaves one behind;
the ``.NAME.*.tmp`` pattern lets a writer that holds a lock on ``NAME`` sweep it (see ``glmtune.web.store``).

Folders (:func:`atomic_dir`, :func:`replace_dir`): the folder is built under a temporary name beside the
target, its files are fsync'd, and it is moved into place; an existing target is renamed aside first and
deleted only once the new folder is in, so the old folder is never deleted before the new one is complete.

Appending to a log (one line per event) is not a rewrite and does not come here.

Standard library only, and no glmtune imports: anything may import this, cheaply.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_dir", "replace_dir", "write_bytes", "write_json", "write_jsonl", "write_text"]

TEMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------- files
def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace the file ``path`` with ``data``, atomically (see the module docstring). Returns the path."""
    with _replacing(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace the file ``path`` with ``text`` in ``encoding``, atomically. Returns the path."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> Path:
    """Replace the file ``path`` with ``obj`` as JSON (``json.dumps(obj, **json_kwargs)`` and a newline),
    atomically, as UTF-8. Returns the path."""
    return write_text(path, json.dumps(obj, **json_kwargs) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Replace the file ``path`` with ``rows`` as JSON Lines (UTF-8), atomically: ``path`` holds either its
    old content or all the new rows, also when ``rows`` raises half-way. Returns the number of rows."""
    n = 0
    with _replacing(path) as f:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False)
            try:
                data = line.encode("utf-8")
            except UnicodeEncodeError:
                # An unpaired surrogate cannot be written as UTF-8; JSON's \\u escape can carry it.
                data = json.dumps(row).encode("ascii")
            f.write(data + b"\n")
            n += 1
    return n


@contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write; when the block succeeds it replaces ``path`` (see the module docstring)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                # mkstemp creates the file 0600; give it the mode the file had, or a plain open() gives.
                os.fchmod(f.fileno(), _file_mode(target))
            yield f
            f.flush()
            # Without this, a power cut after the rename can leave the new name on empty or partial data.
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _file_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # os.umask can only be read by setting it, which for a moment changes it for every thread of the
    # process (the web UI writes from many threads): read it from /proc where Linux shows it.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -------------------------------------------------------------------------------------------- folders
@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside ``path`` to fill; when the block succeeds it becomes ``path``.

    ``overwrite=True`` replaces an existing ``path`` through :func:`replace_dir`. Otherwise ``path`` may
    be absent or an empty folder: anything else raises ``FileExistsError`` before the block runs, and a
    non-empty ``path`` that appears while the block runs makes the final rename fail (POSIX renames a
    folder only over an empty one). When the block raises, or the final move fails, the temporary folder
    is removed and ``path`` is as it was.
    """
    target = Path(path)
    if not overwrite and _occupied(target):
        raise FileExistsError(
            errno.EEXIST, "exists and is not an empty folder; pass overwrite=True to replace it", str(target)
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp creates the folder 0700; give it the mode a plain mkdir() gives.
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if overwrite:
            replace_dir(tmp, target)
        else:
            _fsync_tree(tmp)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the complete folder ``src`` to ``dst`` (same file system), replacing what ``dst`` holds.

    ``src``'s files are fsync'd first. An existing ``dst`` is renamed aside into a fresh
    ``.NAME.old-XXXXXXXX/`` folder beside it, ``src`` is renamed to ``dst``, and only then is the old one
    deleted: the old folder is never deleted before the new one is in place. If renaming ``src`` fails,
    the old folder is renamed back to ``dst`` and the error raised. (A process killed between the two
    renames leaves the old folder in ``.NAME.old-XXXXXXXX/`` and no ``dst``.)
    """
    src, dst = Path(src), Path(dst)
    _fsync_tree(src)
    if not os.path.lexists(dst):
        os.replace(src, dst)
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        old = aside / dst.name
        try:
            os.replace(dst, old)
        except BaseException:
            aside.rmdir()
            raise
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            aside.rmdir()
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(dst.parent)


def _occupied(path: Path) -> bool:
    """True when ``path`` exists and is not an empty folder."""
    if not os.path.lexists(path):
        return False
    if not path.is_dir() or path.is_symlink():
        return True
    with os.scandir(path) as entries:
        return next(entries, None) is not None


# ---------------------------------------------------------------------------------------------- fsync
def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``: programs that fill a folder (``save_pretrained``,
    ``torch.save``) do not, and a folder renamed into place must not hold empty files after a power cut."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:  # a dangling link, a file we may not read: nothing of ours to flush
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    # A rename is recorded in the folder, not in the file: without this fsync a power cut shortly after
    # can bring back the old name. Best effort: not every platform opens a folder (Windows has no
    # O_DIRECTORY and needs nothing), nor can every file system fsync one.
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

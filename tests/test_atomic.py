"""glmtune.atomic: whole-file and whole-folder writes that leave the old content or the new, never half.

Failures are injected where real ones happen (a row iterator or a JSON encoder that raises half-way,
``os.replace`` refusing, the final folder rename failing) and each time the target must hold its previous
content and no temporary file or folder may be left beside it.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import glmtune.atomic as atomic
from glmtune.atomic import atomic_dir, replace_dir, write_bytes, write_json, write_jsonl, write_text


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


WRITERS = {
    "bytes": lambda p: write_bytes(p, b"new\x00bytes"),
    "text": lambda p: write_text(p, "néw text\n"),
    "json": lambda p: write_json(p, {"new": True}),
    "jsonl": lambda p: write_jsonl(p, [{"new": 1}, {"new": 2}]),
}


# ---------------------------------------------------------------------------------------------- files
def test_content_lands_and_the_folder_is_created(tmp_path):
    assert write_bytes(tmp_path / "a" / "b.bin", b"\x00\xff") == tmp_path / "a" / "b.bin"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\xff"
    write_text(tmp_path / "t.txt", "你好\n")
    assert (tmp_path / "t.txt").read_bytes() == "你好\n".encode()
    write_text(tmp_path / "latin.txt", "é", encoding="latin-1")
    assert (tmp_path / "latin.txt").read_bytes() == b"\xe9"
    write_json(tmp_path / "r.json", {"k": "值", "n": [1, 2]}, indent=2, ensure_ascii=False)
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"k": "值", "n": [1, 2]}
    assert "值" in (tmp_path / "r.json").read_text(encoding="utf-8")
    rows = [{"a": "你好"}, {"b": "\ud800"}, {"c": [1, None]}]  # an unpaired surrogate: \u-escaped
    assert write_jsonl(tmp_path / "rows.jsonl", iter(rows)) == 3
    lines = (tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows and "你好" in lines[0]
    assert listing(tmp_path) == ["a", "latin.txt", "r.json", "rows.jsonl", "t.txt"]


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_failed_rename_leaves_the_previous_file_and_no_temp_file(tmp_path, monkeypatch, kind):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        WRITERS[kind](target)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["f"]
    WRITERS[kind](target)
    assert target.read_bytes() != b"old" and listing(tmp_path) == ["f"]


def test_rows_that_raise_half_way_leave_the_previous_file(tmp_path):
    target = tmp_path / "data.jsonl"
    write_jsonl(target, [{"old": 1}, {"old": 2}])
    before = target.read_bytes()

    def rows():
        yield {"new": 1}
        yield {"new": 2}
        raise RuntimeError("the source went away")

    with pytest.raises(RuntimeError, match="went away"):
        write_jsonl(target, rows())
    with pytest.raises(TypeError):
        write_jsonl(target, [{"new": 1}, {"not json": object()}])
    with pytest.raises(TypeError):
        write_json(target, {"fine": 1, "not json": object()})
    assert target.read_bytes() == before
    assert listing(tmp_path) == ["data.jsonl"]


def test_every_write_has_its_own_temp_file(tmp_path, monkeypatch):
    made = []
    real_mkstemp = tempfile.mkstemp

    def recording_mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        made.append(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    target = tmp_path / "report.json"
    write_json(target, {"n": 1})
    write_text(target, "two")
    assert len(made) == 2 and made[0] != made[1]
    # Beside the target (a rename is atomic only within one file system), named for the sweep in
    # glmtune.web.store: .NAME.*.tmp
    assert all(p.parent == tmp_path and p.name.startswith(".report.json.") for p in made)
    assert all(p.name.endswith(".tmp") for p in made)


def test_concurrent_writers_of_one_file_never_mix(tmp_path):
    target = tmp_path / "shared.jsonl"
    errors = []

    def writer(i: int) -> None:
        try:
            for j in range(30):
                write_jsonl(target, [{"writer": i, "round": j, "row": r} for r in range(50)])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 50 and len({(r["writer"], r["round"]) for r in rows}) == 1
    assert listing(tmp_path) == ["shared.jsonl"]


def test_the_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "sub" / "f.json"
    write_json(target, {"a": 1})
    # The renamed temp file is the target's inode now: its data was flushed before the rename...
    t = target.stat()
    assert (t.st_dev, t.st_ino) in synced
    # ... and the folder was fsync'd after it, so the rename itself is durable.
    d = target.parent.stat()
    assert synced.index((d.st_dev, d.st_ino)) > synced.index((t.st_dev, t.st_ino))


def test_file_modes(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640  # as open() makes it
        (tmp_path / "kept.txt").write_text("x")
        (tmp_path / "kept.txt").chmod(0o604)
        write_text(tmp_path / "kept.txt", "y")
        assert stat.S_IMODE((tmp_path / "kept.txt").stat().st_mode) == 0o604  # an existing file's mode
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
        assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o750  # as mkdir() makes it
    finally:
        os.umask(old)


# -------------------------------------------------------------------------------------------- folders
def make_old(folder: Path) -> None:
    folder.mkdir()
    (folder / "old.txt").write_text("old")


def test_atomic_dir_moves_the_folder_into_place(tmp_path):
    out = tmp_path / "a" / "out"
    with atomic_dir(out) as tmp:
        assert tmp.is_dir() and tmp.parent == out.parent and tmp.name.startswith(".out.tmp-")
        assert not out.exists() and listing(tmp) == []
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
    assert (out / "sub" / "w.bin").read_bytes() == b"w"
    assert listing(out.parent) == ["out"]


def test_atomic_dir_keeps_the_old_folder_when_the_body_raises(tmp_path):
    out = tmp_path / "out"
    make_old(out)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "partial.bin").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert listing(out) == ["old.txt"]
    assert listing(tmp_path) == ["out"]


def test_atomic_dir_replaces_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    make_old(out)
    entered = []
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(out) as tmp:
            entered.append(tmp)
    assert entered == [] and listing(out) == ["old.txt"] and listing(tmp_path) == ["out"]
    (tmp_path / "file").write_text("a file")
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "file"):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(out) == ["new.txt"]
    assert listing(tmp_path) == ["file", "out"]
    (tmp_path / "empty").mkdir()  # an empty folder is no content to lose
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(tmp_path / "empty") == ["new.txt"]


def test_atomic_dir_refuses_content_that_appears_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OSError):
        with atomic_dir(out) as tmp:
            (tmp / "mine.txt").write_text("mine")
            make_old(out)  # another process got there first
    assert listing(out) == ["old.txt"] and listing(tmp_path) == ["out"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_old(out)
    real_replace = os.replace
    seen = {}

    def fail_moving_in(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".out.tmp-"):
            # The moment the new folder would go in: the old one is aside, complete, not deleted.
            seen["aside"] = [p for p in tmp_path.glob(".out.old-*/out") if (p / "old.txt").is_file()]
            seen["out_exists"] = out.exists()
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_moving_in)
    with pytest.raises(OSError, match="Input/output"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert len(seen["aside"]) == 1 and not seen["out_exists"]
    assert listing(out) == ["old.txt"] and (out / "old.txt").read_text() == "old"
    assert listing(tmp_path) == ["out"]  # neither the new folder nor the aside folder is left


def test_a_failed_move_aside_leaves_everything_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_old(out)
    real_replace = os.replace

    def fail_moving_aside(src, dst):
        if Path(src) == out:
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_moving_aside)
    with pytest.raises(PermissionError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert listing(out) == ["old.txt"] and listing(tmp_path) == ["out"]


def test_replace_dir_fsyncs_the_folder_before_moving_it(tmp_path, monkeypatch):
    src = tmp_path / ".staging" / "ckpt"
    (src / "inner").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"w")
    (src / "inner" / "state.json").write_text("{}")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        return real_fsync(fd)

    def key(p: Path):
        st = p.stat()
        return st.st_dev, st.st_ino

    files = [key(src / "weights.bin"), key(src / "inner" / "state.json"), key(src / "inner")]
    monkeypatch.setattr(os, "fsync", recording_fsync)
    replace_dir(src, tmp_path / "ckpt")
    assert all(k in synced for k in files)
    assert key(tmp_path) in synced  # the folder that records the rename
    assert listing(tmp_path / "ckpt") == ["inner", "weights.bin"]

    again = tmp_path / ".staging" / "ckpt"
    again.mkdir()
    (again / "newer.bin").write_bytes(b"n")
    replace_dir(again, tmp_path / "ckpt")
    assert listing(tmp_path / "ckpt") == ["newer.bin"]
    assert listing(tmp_path) == [".staging", "ckpt"] and listing(tmp_path / ".staging") == []


# ------------------------------------------------------------------------------------------ the module
def test_the_module_is_a_stdlib_leaf():
    tree = ast.parse(Path(atomic.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative (glmtune) imports"
            imported.add(node.module.split(".")[0])
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported


def test_the_former_names_still_write_atomically(tmp_path):
    from glmtune.data import write_jsonl_atomic
    from glmtune.evaluate import write_text_atomic

    assert write_jsonl_atomic is write_jsonl and write_text_atomic is write_text

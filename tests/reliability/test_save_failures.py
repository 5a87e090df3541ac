"""Disk full / read-only output while a checkpoint is written.

A 2-step run saves checkpoint-1, then writing checkpoint-2 fails the way the libraries really fail:

- ``torch.save`` on a full disk (optimizer.pt): a RuntimeError "[enforce fail at inline_container.cc]
  unexpected pos ..." that names neither the file nor the cause;
- safetensors on a full disk (adapter_model.safetensors): SafetensorError "... No space left on device";
- ``open().write`` on a full disk (trainer_state.json): OSError ENOSPC;
- a read-only output folder: ``chmod`` when not root, else an EROFS from the staging ``mkdir``;
- (slow, where this process may mount) a real 300 kB tmpfs that fills up.

Each time the run must stop with a CheckpointSaveError (an OSError) naming the step, the folder being
written and the last good checkpoint, and checkpoint-1 must stay complete and loadable.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import glmtune
from glmtune.train.trainer import CheckpointSaveError, GlmtuneTrainer

from .conftest import ROWS, run, run_config, write_jsonl

REQUIRED = (
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "rng_state.pth",
)


def _in_step2(path) -> bool:
    return "checkpoint-2" in str(path)


def _fail_torch_save(monkeypatch, out):
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and _in_step2(f) and Path(f).name == "optimizer.pt":
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _fail_safetensors(monkeypatch, out):
    import safetensors.torch
    from safetensors import SafetensorError

    original = safetensors.torch.serialize_file

    def serialize_file(tensors, filename, *args, **kwargs):
        if _in_step2(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)


def _fail_json_write(monkeypatch, out):
    from transformers import TrainerState

    original = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if _in_step2(json_path):
            Path(json_path).write_text('{"global_st')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)


class _AfterFirstSave(TrainerCallback):
    def __init__(self, action):
        self.action = action

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.action()


def _read_only(monkeypatch, out):
    """After checkpoint-1: chmod the folder read-only, or as root (whom chmod does not stop) fail the
    next mkdir under it with EROFS, the first write a read-only file system refuses."""
    if os.geteuid() != 0:
        action = lambda: out.chmod(0o555)  # noqa: E731
    else:
        state = {"read_only": False}
        original = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if state["read_only"] and Path(out) in (self, *self.parents):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        action = lambda: state.update(read_only=True)  # noqa: E731
    original_init = GlmtuneTrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(_AfterFirstSave(action))

    monkeypatch.setattr(GlmtuneTrainer, "__init__", init)


def _check_failure(info, out: Path, base: Path, what: str) -> None:
    err = info.value
    message = str(err)
    print(f"[figure] save failure ({what}): {type(err).__name__}: {message}")
    assert isinstance(err, OSError) and isinstance(err, CheckpointSaveError)
    assert "checkpoint-2" in message and str(out) in message
    assert str(out / "checkpoint-1") in message and "intact" in message
    assert not (out / "checkpoint-2").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1")
    assert all((out / "checkpoint-1" / f).is_file() for f in REQUIRED)
    model = glmtune.load_model(base, adapter=out / "checkpoint-1")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    print(f"[figure] save failure ({what}): checkpoint-1 intact and loadable")


FAST = {"torch_save_disk_full": _fail_torch_save, "read_only_output": _read_only}
SLOW = {"safetensors_disk_full": _fail_safetensors, "json_disk_full": _fail_json_write}


def _run_failing(tiny_model, data_cache, tmp_path, monkeypatch, make_fail, what):
    base = tiny_model("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    out = tmp_path / "out"
    out.mkdir()
    make_fail(monkeypatch, out)
    try:
        with pytest.raises(CheckpointSaveError) as info:
            run(run_config(base, out, data, data_cache, max_steps=2, save_steps=1))
    finally:
        out.chmod(0o755)
    monkeypatch.undo()
    _check_failure(info, out, base, what)


@pytest.mark.parametrize("what", list(FAST))
def test_failed_save_names_the_step_and_keeps_the_last_checkpoint(
    tiny_model, data_cache, tmp_path, monkeypatch, what
):
    _run_failing(tiny_model, data_cache, tmp_path, monkeypatch, FAST[what], what)


@pytest.mark.slow
@pytest.mark.parametrize("what", list(SLOW))
def test_failed_save_other_writers(tiny_model, data_cache, tmp_path, monkeypatch, what):
    _run_failing(tiny_model, data_cache, tmp_path, monkeypatch, SLOW[what], what)


@pytest.mark.slow
def test_real_disk_full_on_a_tiny_tmpfs(tiny_model, data_cache, tmp_path):
    """A real full disk: the run's output folder on a tmpfs too small for the second checkpoint.
    Needs mount rights (root with CAP_SYS_ADMIN); skipped elsewhere."""
    base = tiny_model("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    # One checkpoint of this run is ~60 kB (+ loss.png): 200 kB fits checkpoint-2 but not checkpoint-4.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(out)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        raw = run_config(base, out, data, data_cache, max_steps=8, save_steps=2)
        with pytest.raises(CheckpointSaveError) as info:
            run(raw)
        message = str(info.value)
        print(f"[figure] save failure (real tmpfs full): {message}")
        last = get_last_checkpoint(str(out))
        assert last is not None and last in message
        assert all((Path(last) / f).is_file() for f in REQUIRED)
        model = glmtune.load_model(base, adapter=last)
        del model  # its safetensors are memory-mapped from the tmpfs: unmapped before the umount
        print(f"[figure] save failure (real tmpfs full): {Path(last).name} intact and loadable")
    finally:
        import gc

        gc.collect()
        if subprocess.run(["umount", str(out)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(out)], check=False)  # detached once nothing uses it

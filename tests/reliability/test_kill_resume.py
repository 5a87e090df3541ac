"""Kill and resume: tests/reliability/kill_resume.py run as a subprocess.

Fast: K=2 kills (one during an evaluation, one while a checkpoint is written) of a 4-step run, the
runs forked from one launcher; started with the session by conftest.py (it overlaps the other tests)
and collected here. Slow: K=4 kills at mixed moments of a 12-step run, each run started as
``python -m glmtune.cli train`` the way users run it. Both: the resumed run's final LoRA weights
equal the uninterrupted run's (max |Δweight| <= 1e-6 on CPU), the logged losses too, and no partial
checkpoint-<step> folder was ever present (so none could be picked by train.resume=latest).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import FAST_KILL_ARGS, finish_kill_resume, start_kill_resume


def check(summary: dict, kills: int) -> None:
    assert summary["kills_delivered"] == summary["kills_survived"] == kills
    assert summary["max_abs_dweight"] <= 1e-6
    assert summary["max_abs_dloss"] <= 1e-5
    assert summary["logged_steps_match"]
    assert summary["partial_checkpoints_seen"] == []
    assert summary["launches"] == kills + 1


def test_kill_during_eval_and_checkpoint_write_then_resume(
    _fast_kill_resume_in_background, tiny_model, tmp_path
):
    started = _fast_kill_resume_in_background
    proc, summary_path = started or start_kill_resume(tmp_path, tiny_model("chatglm3"), *FAST_KILL_ARGS)
    summary = finish_kill_resume(proc, summary_path, timeout=300)
    check(summary, 2)
    # The kills landed where they were aimed: inside the evaluation and inside the checkpoint write.
    assert summary["landed"] == {"eval": 1, "checkpoint write": 1}


@pytest.mark.slow
def test_kill_resume_many_times_via_the_cli(tiny_model, tmp_path):
    proc, summary_path = start_kill_resume(
        tmp_path,
        tiny_model("chatglm3"),
        *("--kills", "4", "--steps", "12", "--save-every", "2", "--eval-every", "4", "--plan", "mixed"),
        *("--spawn", "exec", "--seed", "1"),
    )
    check(finish_kill_resume(proc, summary_path, timeout=1800), 4)


class _KilledMidDelete(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


@pytest.mark.slow
def test_resaving_a_step_never_leaves_it_partial(tiny_model, data_cache, tmp_path, monkeypatch):
    """train.resume=2 with checkpoint-4 on disk saves checkpoint-4 again. Whatever removes the old one
    may die half-way (here: a delete that stops after one file): checkpoint-4 must then be either the
    old complete folder or absent, never a partial one that train.resume=latest would pick."""
    import shutil

    from transformers.trainer_utils import get_last_checkpoint

    import glmtune.train.trainer as trainer_module

    from .conftest import ROWS, run, run_config, write_jsonl

    base = tiny_model("chatglm3")
    out = tmp_path / "out"
    raw = run_config(base, out, write_jsonl(tmp_path / "train.jsonl", ROWS[:4]), data_cache, max_steps=4)
    run(raw)
    real_rmtree = shutil.rmtree

    def dies_mid_delete(path, *args, **kwargs):
        path = Path(path)
        if path.name == "checkpoint-4" and path.parent == out:
            next(p for p in path.iterdir() if p.is_file()).unlink()
            raise _KilledMidDelete(path)
        return real_rmtree(path, *args, **kwargs)

    def dies_on_rename(src, dst):
        if Path(dst) == out / "checkpoint-4" and Path(src).parent.name == ".staging":
            raise _KilledMidDelete(dst)
        return real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(trainer_module.shutil, "rmtree", dies_mid_delete)
    monkeypatch.setattr(trainer_module.os, "replace", dies_on_rename)
    with pytest.raises(_KilledMidDelete):
        run(raw, "train.resume=2")
    monkeypatch.undo()
    latest = Path(get_last_checkpoint(str(out)))
    present = sorted(p.name for p in latest.iterdir())
    print(f"[figure] re-saving checkpoint-4 killed mid-way: latest is {latest.name} with {present}")
    for name in (
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state.pth",
    ):
        assert name in present

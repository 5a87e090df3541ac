"""Kill and resume: tests/reliability/kill_resume.py run as a subprocess.

Fast: K=2 kills (one during an evaluation, one while a checkpoint is written) of a 4-step run, the
runs forked from one launcher. Slow: K=4 kills at mixed moments of a 12-step run, each run started as
``python -m glmtune.cli train`` the way users run it. Both: the resumed run's final LoRA weights
equal the uninterrupted run's (max |Δweight| <= 1e-6 on CPU), the logged losses too, and no partial
checkpoint-<step> folder was ever present (so none could be picked by train.resume=latest).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("kill_resume.py")


def kill_resume(tmp_path: Path, model: Path, *args: str, timeout: int) -> dict:
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            str(model),
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    figure = [line for line in proc.stdout.splitlines() if line.startswith(("[figure]", "kill "))]
    print("\n".join(figure))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def check(summary: dict, kills: int) -> None:
    assert summary["kills_delivered"] == summary["kills_survived"] == kills
    assert summary["max_abs_dweight"] <= 1e-6
    assert summary["max_abs_dloss"] <= 1e-5
    assert summary["logged_steps_match"]
    assert summary["partial_checkpoints_seen"] == []
    assert summary["launches"] == kills + 1


def test_kill_during_eval_and_checkpoint_write_then_resume(tiny_model, tmp_path):
    summary = kill_resume(
        tmp_path,
        tiny_model("chatglm3"),
        *("--kills", "2", "--steps", "4", "--save-every", "2", "--eval-every", "3", "--plan", "eval,save"),
        timeout=300,
    )
    check(summary, 2)
    # The kills landed where they were aimed: inside the evaluation and inside the checkpoint write.
    assert summary["landed"] == {"eval": 1, "checkpoint write": 1}


@pytest.mark.slow
def test_kill_resume_many_times_via_the_cli(tiny_model, tmp_path):
    summary = kill_resume(
        tmp_path,
        tiny_model("chatglm3"),
        *("--kills", "4", "--steps", "12", "--save-every", "2", "--eval-every", "4", "--plan", "mixed"),
        *("--spawn", "exec", "--seed", "1"),
        timeout=1800,
    )
    check(summary, 4)

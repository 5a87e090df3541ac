"""Distributed data parallel training on CPU: two processes under torchrun (gloo), a tiny ChatGLM3, LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import glmtune
from glmtune.testing import make_tiny_model

from conftest import MIXED_ROWS as ROWS


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
def test_two_process_ddp_lora_run(tmp_path):
    base = make_tiny_model(tmp_path / "chatglm3", "chatglm3")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    out = tmp_path / "out"
    batch, steps = 2, 4
    config = {
        "model": {"path": str(base)},
        "data": {"train_file": str(data), "max_length": 64, "cache_dir": str(tmp_path / "cache")},
        "method": {"name": "lora", "lora_r": 4, "lora_dropout": 0.1},
        "train": {
            "output_dir": str(out),
            "max_steps": 1,
            "batch_size": batch,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": None,
            "report_to": [],
            "seed": 0,
        },
    }
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(config), encoding="utf-8")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "glmtune.cli",
        "train",
        str(cfg_file),
        f"train.max_steps={steps}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    # Both ranks ran the recipe ...
    assert log.count("train data: 8 examples") == 2, log[-3000:]
    # ... and both wrote their RNG state into every checkpoint, which is complete (atomic rename after
    # every rank's files are in).
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert sorted(p.name for p in ckpt.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
        assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "trainer_state.json").exists()
    assert not (out / ".staging").exists()

    # Each step consumed 2 x batch examples: 8 rows / (2 processes x 2) = 2 steps an epoch, so 4 steps
    # are 2 epochs (a single process would be at epoch 1).
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    assert state["epoch"] == pytest.approx(steps * 2 * batch / len(ROWS))
    assert len([h for h in state["log_history"] if "loss" in h]) == steps
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == steps and summary["epochs"] == pytest.approx(2.0)

    # The final adapter is the last checkpoint's weights and loads.
    final = load_file(str(out / "final" / "adapter_model.safetensors"))
    last = load_file(str(out / f"checkpoint-{steps}" / "adapter_model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    glmtune.load_model(base, adapter=out / "final")

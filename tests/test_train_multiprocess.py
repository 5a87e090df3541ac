"""Several processes under ``accelerate launch`` with the shipped configs (configs/accelerate/), on CPU:
two processes talking over gloo, a tiny ChatGLM3 (official layout, read by glmtune's own loader).

- DDP, DeepSpeed ZeRO-2 and ZeRO-3 train, checkpoint and save final/ (LoRA; full fine-tuning on ZeRO-3);
- a run resumed from checkpoint-2 ends with the same weights and loss history as the uninterrupted one;
- under ZeRO-3 the model is built partitioned (deepspeed.zero.Init): each rank reports holding half of it;
- final/ reloads in this process and gives the eval loss the sharded model logged at the last step.

Each launch takes ~15-25 s on two cores; the first DeepSpeed launch on a machine also compiles
DeepSpeed's CPU shared-memory communication op once (~30 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import glmtune
from glmtune.testing import make_tiny_model

from conftest import MIXED_ROWS as ROWS

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"

# The eval file holds this row twice: each of the two ranks scores one copy, so the logged eval loss is
# this row's loss whatever the split, and the test recomputes it from the reloaded weights.
EVAL_ROW = {"context": "请介绍一下北京。", "target": "北京是中国的首都。"}
STEPS = 4

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install deepspeed): the DeepSpeed ZeRO runs are not tested",
)


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mp_model") / "chatglm3", "chatglm3")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_data")
    for name, rows in (("train.jsonl", ROWS), ("eval.jsonl", [EVAL_ROW, EVAL_ROW])):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (root / name).write_text(text, encoding="utf-8")
    return root


def write_config(tmp: Path, base: Path, data: Path, out: Path, method: str) -> Path:
    """4 steps of 2 rows per process (8 rows: 2 steps an epoch), a checkpoint every 2 steps, one
    evaluation at the last step; LoRA dropout on, so resuming must restore every rank's RNG state."""
    method_cfg = {"name": "lora", "lora_r": 4, "lora_dropout": 0.1} if method == "lora" else {"name": "full"}
    config = {
        "model": {"path": str(base)},
        "data": {
            "train_file": str(data / "train.jsonl"),
            "eval_file": str(data / "eval.jsonl"),
            "max_length": 64,
            "cache_dir": str(tmp / "cache"),
        },
        "method": method_cfg,
        "train": {
            "output_dir": str(out),
            "max_steps": STEPS,
            "batch_size": 2,
            "learning_rate": 1e-2 if method == "lora" else 1e-3,
            "logging_steps": 1,
            "save_steps": 2,
            "eval_steps": STEPS,
            "save_total_limit": None,
            "report_to": [],
            "seed": 0,
        },
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(accelerate_config: str, run_config: Path, *overrides: str) -> str:
    """``accelerate launch --config_file configs/accelerate/<name>.yaml --num_processes 2`` of
    ``glmtune train``, as the README tells users (mixed precision off: float32 on the CPU); the log."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",  # `accelerate launch`, without relying on PATH
        "--config_file",
        str(ACCELERATE_CONFIGS / f"{accelerate_config}.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "glmtune.cli",
        "train",
        str(run_config),
        *overrides,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # CPU processes (gloo) on any machine
        "DS_ACCELERATOR": "cpu",
    }
    proc = subprocess.run(cmd, cwd=run_config.parent, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    return log


def weights(folder: Path) -> dict[str, torch.Tensor]:
    name = (
        "adapter_model.safetensors"
        if (folder / "adapter_model.safetensors").exists()
        else "model.safetensors"
    )
    return load_file(str(folder / name))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def history(out: Path) -> list[dict]:
    return json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in history(out) if "loss" in h]


def reloaded_eval_loss(base: Path, final: Path, method: str) -> float:
    """The eval row's loss under final/ loaded in this (single) process."""
    model = glmtune.load_model(base, adapter=final) if method == "lora" else glmtune.load_model(final)
    tok = glmtune.load_tokenizer(base)
    messages = [
        {"role": "user", "content": EVAL_ROW["context"]},
        {"role": "assistant", "content": EVAL_ROW["target"]},
    ]
    ids, labels = glmtune.get_template(base).encode_example(tok, messages)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()


def check_run(out: Path, base: Path, method: str) -> None:
    """Every step logged once, both ranks' RNG states in each checkpoint, no staging or temporary folder
    left, final/ = the last checkpoint = best/ (the one evaluation), and final/ reloads to the eval loss
    the sharded model logged at the last step."""
    assert [h["step"] for h in history(out) if "loss" in h] == list(range(1, STEPS + 1))
    for step in (2, STEPS):
        ckpt = out / f"checkpoint-{step}"
        assert sorted(p.name for p in ckpt.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
        assert (ckpt / "trainer_state.json").exists() and (ckpt / "scheduler.pt").exists()
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    final = weights(out / "final")
    assert max_diff(final, weights(out / f"checkpoint-{STEPS}")) == 0
    assert max_diff(final, weights(out / "best")) == 0
    assert json.loads((out / "best" / "best.json").read_text())["step"] == STEPS
    logged = [h["eval_loss"] for h in history(out) if "eval_loss" in h]
    assert len(logged) == 1
    assert reloaded_eval_loss(base, out / "final", method) == pytest.approx(logged[0], abs=1e-4)


def partitions(log: str) -> dict[int, tuple[int, int]]:
    """rank -> (parameters it holds, parameters of the model), from the recipe's ZeRO-3 report."""
    found = re.findall(
        r"DeepSpeed ZeRO-3: rank (\d) of 2 holds ([\d,]+) of the ([\d,]+) base parameters", log
    )
    return {int(r): (int(h.replace(",", "")), int(w.replace(",", ""))) for r, h, w in found}


def resume_from_checkpoint_2(tmp: Path, straight: Path, name: str) -> Path:
    """A copy of ``straight`` as a run killed after step 3 leaves it: checkpoint-2 and nothing later."""
    out = tmp / name
    shutil.copytree(straight, out)
    for later in ("checkpoint-4", "final", "best", "train_summary.json", "loss.png"):
        path = out / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    cfg = yaml.safe_load((tmp / f"{straight.name}.yaml").read_text(encoding="utf-8"))
    cfg["train"]["output_dir"] = str(out)
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return tmp / f"{name}.yaml"


def test_accelerate_deepspeed_launch_must_agree_with_the_run_config(base, data, tmp_path, monkeypatch):
    """What accelerate launch sets up for DeepSpeed (its environment) and the run config are checked
    against each other before anything is loaded, naming both sides."""
    from glmtune.config import load_config
    from glmtune.errors import ConfigError
    from glmtune.train.recipe import check_launcher

    raw = yaml.safe_load(
        write_config(tmp_path, base, data, tmp_path / "out", "lora").read_text(encoding="utf-8")
    )
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(
        ConfigError, match=r"train.precision=fp32, but accelerate launch was given mixed_precision bf16"
    ):
        check_launcher(load_config(raw))
    check_launcher(load_config(raw, ["train.precision=bf16"]))
    with pytest.raises(
        ConfigError, match=r"train.deepspeed=configs/deepspeed/zero3.json: .*train.deepspeed=null"
    ):
        check_launcher(
            load_config(raw, ["train.precision=bf16", "train.deepspeed=configs/deepspeed/zero3.json"])
        )
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # DDP or torchrun: the json is the Trainer's
    check_launcher(load_config(raw, ["train.deepspeed=configs/deepspeed/zero3.json"]))


# The loader alone under ZeRO-3, on every rank of a two-process group: a plain load first (the reference),
# then the same folder under a live HfDeepSpeedConfig; a JSON line per model into reports-<rank>.jsonl.
ZERO3_LOAD_WORKER = """
import json, sys
from pathlib import Path
import deepspeed, torch
from transformers.integrations import HfDeepSpeedConfig
import glmtune

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
out, paths = Path(sys.argv[1]), sys.argv[2:]
plain = {path: glmtune.load_model(path).state_dict() for path in paths}
zero3 = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
lines = []
for path in paths:
    model = glmtune.load_model(path)
    params = list(model.parameters())
    report = {
        "rank": rank,
        "path": path,
        "partitioned": all(hasattr(p, "ds_id") for p in params),
        "materialised": sum(p.data.numel() for p in params),  # elements of full tensors held: none
        "held": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
        "whole": sum(getattr(p, "ds_numel", p.numel()) for p in params),
    }
    with deepspeed.zero.GatheredParameters(params):
        state = model.state_dict()
        reference = plain[path]
        report["same_keys"] = sorted(state) == sorted(reference)
        report["max_diff"] = max((state[k].float() - reference[k].float()).abs().max().item() for k in state)
    lines.append(json.dumps(report))
(out / f"reports-{rank}.jsonl").write_text("\\n".join(lines) + "\\n")
"""


def make_tiny_llama(path: Path) -> Path:
    """A transformers-native folder (read by from_pretrained, which handles ZeRO-3 itself)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@needs_deepspeed
def test_zero3_loading_keeps_one_partition_per_rank(base, tmp_path):
    """Under ZeRO-3 glmtune's own readers (ChatGLM-6B with its tied output layer, the ChatGLM2/3 and GLM-4
    layout) and transformers' from_pretrained build the model partitioned: each rank holds half of every
    weight and no full tensor, and the partitions gathered are exactly the weights a plain load gives."""
    models = [
        make_tiny_model(tmp_path / "chatglm", "chatglm"),
        base,
        make_tiny_model(tmp_path / "glm4", "glm4"),
        make_tiny_llama(tmp_path / "llama"),
    ]
    worker = tmp_path / "zero3_load.py"
    worker.write_text(ZERO3_LOAD_WORKER, encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
    }
    proc = subprocess.run(
        [*cmd, str(tmp_path), *map(str, models)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    reports = [
        json.loads(line)
        for rank in (0, 1)
        for line in (tmp_path / f"reports-{rank}.jsonl").read_text().splitlines()
    ]
    assert sorted((r["rank"], r["path"]) for r in reports) == sorted(
        (k, str(m)) for k in (0, 1) for m in models
    )
    for r in reports:
        assert r["partitioned"] and r["materialised"] == 0, r
        assert r["whole"] // 2 <= r["held"] < 0.51 * r["whole"], r
        assert r["same_keys"] and r["max_diff"] == 0, r


@needs_deepspeed
def test_zero3_full_loads_partitioned_trains_and_reloads(base, data, tmp_path):
    """Full fine-tuning under ZeRO-3: glmtune's loader builds the model partitioned (each rank holds
    half), the loss falls, the gathered final/ model reloads to the logged eval loss."""
    out = tmp_path / "zero3_full"
    log = launch("deepspeed_zero3", write_config(tmp_path, base, data, out, "full"))

    held = partitions(log)
    assert sorted(held) == [0, 1], log[-4000:]
    for rank, (mine, whole) in held.items():
        # Half, plus at most one element of padding per parameter tensor; the whole model would be 2x.
        assert whole // 2 <= mine < 0.51 * whole, (rank, mine, whole)
    assert "DeepSpeed ZeRO-3" in log and (out / "checkpoint-2" / "global_step2").is_dir()
    trajectory = losses(out)
    assert trajectory[-1] < trajectory[0] - 0.5, trajectory
    check_run(out, base, "full")


RESUMES = [
    pytest.param("ddp", "lora", id="ddp-lora"),
    pytest.param("deepspeed_zero2", "lora", id="zero2-lora", marks=needs_deepspeed),
    pytest.param("deepspeed_zero3", "lora", id="zero3-lora", marks=needs_deepspeed),
]


@pytest.mark.slow
@pytest.mark.parametrize(("accelerate_config", "method"), RESUMES)
def test_resume_equals_uninterrupted(accelerate_config, method, base, data, tmp_path):
    """4 steps straight == steps 1-2, then a new launch resumed from checkpoint-2 (train.resume=latest):
    the same final weights and the same loss at every step (optimizer, scheduler, data order and both
    ranks' dropout RNG restored). The straight run also checks the run folder and the reload."""
    straight = tmp_path / "straight"
    log = launch(accelerate_config, write_config(tmp_path, base, data, straight, method))
    check_run(straight, base, method)
    assert bool(partitions(log)) == (accelerate_config == "deepspeed_zero3")
    trajectory = losses(straight)
    assert trajectory[-1] < trajectory[0], trajectory

    # The weights moved after step 2, so matching the straight run is not trivially true.
    assert max_diff(weights(straight / "checkpoint-2"), weights(straight / "final")) > 1e-4
    resumed = tmp_path / "resumed"
    log = launch(
        accelerate_config, resume_from_checkpoint_2(tmp_path, straight, "resumed"), "train.resume=latest"
    )
    assert f"resuming from {resumed / 'checkpoint-2'}" in log
    assert max_diff(weights(resumed / "final"), weights(straight / "final")) <= 1e-6
    assert losses(resumed) == pytest.approx(trajectory, abs=1e-6)
    check_run(resumed, base, method)

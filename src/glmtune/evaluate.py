"""Evaluation: eval loss / perplexity, generation metrics, before-vs-after reports, batch prediction.

Used by ``glmtune eval``, ``glmtune predict``, ``glmtune demo``. Prompts are an example's messages
without the final reply; references are the final replies.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_json, write_jsonl, write_text
from .inference import Engine, GenerationSettings
from .metrics import rouge_bleu_chatglm3, rouge_bleu_chatglm6b, task_metrics
from .progress import Progress
from .resolve import ResolvedModel, resolve_model_path
from .runs import Run, resolve_model_or_run


@dataclass
class Predictions:
    prompts: list[list[dict]]
    references: list[str]
    outputs: list[str]


def split_examples(examples) -> tuple[list[list[dict]], list[str]]:
    prompts, refs = [], []
    for ex in examples:
        messages = ex.messages if hasattr(ex, "messages") else ex
        if messages[-1]["role"] == "assistant":
            prompts.append(messages[:-1])
            refs.append(messages[-1]["content"])
        else:  # prompt-only rows (prediction without references)
            prompts.append(messages)
            refs.append("")
    return prompts, refs


def _batches(order: list[int], size: int, progress: bool, desc: str):
    """``order`` in slices of ``size``; with ``progress``, a count of rows done and an ETA on stderr."""
    with Progress(len(order), desc, "rows", enabled=None if progress else False) as bar:
        for s in range(0, len(order), size):
            yield order[s : s + size]
            bar.update(len(order[s : s + size]))


def predict(
    engine: Engine,
    prompts: list[list[dict]],
    settings: GenerationSettings,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Replies for every prompt, in input order, ``batch_size`` at a time (left padding, KV cache).

    Prompts are grouped by length so a batch pads little; results are put back in input order.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
    outputs: list[str] = [""] * len(prompts)
    for idx in _batches(order, batch_size, progress, desc):
        for i, completion in zip(idx, engine.generate([prompts[i] for i in idx], settings)):
            outputs[i] = completion.text
    return outputs


@torch.no_grad()
def eval_loss(
    engine: Engine, examples, batch_size: int = 8, max_length: int | None = 2048, progress: bool = False
) -> dict:
    """Token-weighted mean cross-entropy over the reply tokens (the training loss), and perplexity."""
    from .data.collate import DataCollator
    from .data.encode import EncodeSettings, encode_all

    encoded, _ = encode_all(
        engine.tokenizer, engine.template, list(examples), EncodeSettings(max_length=max_length)
    )
    collate = DataCollator(engine.pad_id)
    total, count = 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for idx in _batches(order, batch_size, progress, "eval loss"):
        batch = collate([{"input_ids": encoded[i].input_ids, "labels": encoded[i].labels} for i in idx])
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        logits = engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((labels != -100).sum())
    mean = total / max(count, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50)), "target_tokens": count}


def generation_metrics(outputs: Sequence[str], references: Sequence[str], task: str = "auto") -> dict:
    return {
        "rouge_bleu_chatglm3": rouge_bleu_chatglm3(list(outputs), list(references)),
        "rouge_bleu_chatglm6b": rouge_bleu_chatglm6b(list(outputs), list(references)),
        "task": task_metrics(list(outputs), list(references), task=task),
    }


def evaluate(
    engine: Engine,
    examples,
    settings: GenerationSettings,
    batch_size: int = 8,
    task: str = "auto",
    progress: bool = False,
    desc: str = "scoring",
) -> tuple[dict, Predictions]:
    """Task metrics of greedy (or sampled) replies, and the predictions themselves."""
    prompts, refs = split_examples(examples)
    outputs = predict(engine, prompts, settings, batch_size, progress=progress, desc=desc)
    return task_metrics(outputs, refs, task=task), Predictions(prompts, refs, outputs)


def full_report(
    engine: Engine,
    examples,
    settings: GenerationSettings,
    batch_size: int = 8,
    task: str = "auto",
    with_loss: bool = True,
) -> tuple[dict, Predictions]:
    """Eval loss + ROUGE/BLEU (both official definitions) + task metrics, with the predictions."""
    prompts, refs = split_examples(examples)
    outputs = predict(engine, prompts, settings, batch_size, progress=True)
    report = generation_metrics(outputs, refs, task)
    if with_loss:
        report["loss"] = eval_loss(engine, examples, batch_size, progress=True)
    return report, Predictions(prompts, refs, outputs)


def flatten_metrics(report: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in report.items():
        if isinstance(v, dict):
            out.update(flatten_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def markdown_report(title: str, tuned: dict, base: dict | None, rows: list[dict], n_rows: int = 5) -> str:
    """The Markdown report: metrics (tuned, and base + delta with --compare-base) and example rows."""
    t, b = flatten_metrics(tuned), flatten_metrics(base) if base else None
    lines = [f"# {title}", ""]
    if b is not None:
        lines += ["| metric | base | tuned | Δ |", "|---|---:|---:|---:|"]
        for k in t:
            if k in b:
                lines.append(f"| {k} | {b[k]:.4f} | {t[k]:.4f} | {t[k] - b[k]:+.4f} |")
    else:
        lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {v:.4f} |" for k, v in t.items()]
    lines += [
        "",
        "BLEU-4 and ROUGE are ×100. `rouge_bleu_chatglm3`: ChatGLM3 definition (BLEU on jieba words); "
        "`rouge_bleu_chatglm6b`: ChatGLM-6B/2 definition (BLEU on characters). ROUGE is on jieba words "
        "in both.",
        "",
        "## Examples",
        "",
    ]

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    for row in rows[:n_rows]:
        lines.append(f"- **input**: {cell(row['prompt'])}")
        lines.append(f"  - **reference**: {cell(row['label'])}")
        if "base" in row:
            lines.append(f"  - **base**: {cell(row['base'])}")
        lines.append(f"  - **tuned**: {cell(row['predict'])}")
    return "\n".join(lines) + "\n"


# The former name of :func:`glmtune.atomic.write_text`, kept for code that imports it from here.
write_text_atomic = write_text


class PredictionWriter:
    """Appends prediction rows to a JSONL file so an interrupted ``predict`` resumes where it stopped.

    Rows carry their input ``index``; on open, complete rows already in the file are kept (a torn last
    line from a crash is cut off) and their indices are skipped.
    """

    def __init__(self, path: Path):
        self.path = path
        self.done: set[int] = set()
        if path.exists():
            data = path.read_bytes()
            keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
            if len(keep) != len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(keep))
            for line in keep.decode("utf-8").splitlines():
                if line.strip():
                    self.done.add(int(json.loads(line)["index"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def predict_file(
    engine: Engine,
    examples,
    out: Path,
    settings: GenerationSettings,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """``glmtune predict``: generate for every example, resumable, rows in input order at the end."""
    prompts, refs = split_examples(examples)
    writer = PredictionWriter(out)
    todo = [i for i in range(len(prompts)) if i not in writer.done]
    skipped = len(prompts) - len(todo)
    order = sorted(todo, key=lambda i: len(str(prompts[i])))
    try:
        for idx in _batches(order, batch_size, progress, "predict"):
            completions = engine.generate([prompts[i] for i in idx], settings)
            writer.write(
                [
                    {
                        "index": i,
                        "prompt": prompts[i][-1]["content"],
                        "label": refs[i],
                        "predict": c.text,
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in zip(idx, completions)
                ]
            )
    finally:
        writer.close()
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: r["index"])
    write_jsonl(out, rows)
    return {"rows": len(rows), "generated": len(todo), "skipped_existing": skipped, "path": str(out)}


def resolve_target(
    target: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    generation: str | None = None,
    **loading,
) -> ResolvedModel:
    """What ``glmtune eval`` evaluates, resolved once: a run folder, a run config, or a model folder.

    A run's adapter is its ``final/`` folder (a full fine-tune's ``final/`` is the model); its
    ``model.generation``, ``dtype`` and ``quantization`` apply unless given (:meth:`glmtune.runs.Run.model`).
    ``loading``: ``dtype``, ``device``, ``quantization``, ``trust_remote_code``, ``template``.
    """
    return resolve_model_or_run(target, generation=generation, adapter=adapter, **loading)


def run_eval(
    target,
    data: str | os.PathLike,
    *,
    adapter=None,
    compare_base: bool = False,
    out_dir=None,
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    num_samples: int | None = None,
    n_examples: int = 5,
    fmt: str = "auto",
    generation: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    quantization: str | None = None,
    trust_remote_code: bool = False,
    template=None,
    printer=print,
) -> dict:
    """``glmtune eval``: reports (JSON, Markdown) and predictions for a model, optionally vs its base."""
    from .data import read_examples

    settings = settings or GenerationSettings()
    loading = dict(
        dtype=dtype,
        device=device,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
        template=template,  # None: a run's own prompt template, else the model's
    )
    what = resolve_target(target, adapter, generation, **loading)
    examples = read_examples(data, fmt=fmt).examples
    if num_samples:
        examples = examples[:num_samples]
    engine = Engine.load(what)
    printer(
        f"evaluating {what.path} ({what.generation})"
        + (f" + {what.adapter}" if what.adapter else "")
        + f" on {len(examples)} examples of {data}"
    )
    tuned, preds = full_report(engine, examples, settings, batch_size)
    base = base_preds = None
    if compare_base:
        from peft import PeftModel

        if isinstance(engine.model, PeftModel):
            with engine.model.disable_adapter():  # the same weights without the LoRA: no second copy
                base, base_preds = full_report(engine, examples, settings, batch_size)
        else:
            plain = what.adapter is None and not isinstance(target, ResolvedModel)
            run = Run.find(resolve_model_path(target)) if plain else None
            # A full fine-tune's base is the run's model.path; otherwise the model without its adapter.
            base_model = (
                run.base(generation=generation, **loading) if run is not None else what.replace(adapter=None)
            )
            base_engine = Engine.load(base_model)
            base, base_preds = full_report(base_engine, examples, settings, batch_size)
            del base_engine
    rows = []
    for i, (p, ref, out) in enumerate(zip(preds.prompts, preds.references, preds.outputs)):
        row = {"index": i, "prompt": p[-1]["content"] if p else "", "label": ref, "predict": out}
        if base_preds is not None:
            row["base"] = base_preds.outputs[i]
        rows.append(row)
    report = {
        "model": str(what.path),
        "generation": what.generation,
        "adapter": str(what.adapter) if what.adapter else None,
        "data": str(data),
        "examples": len(examples),
        "tuned": tuned,
    }
    if base is not None:
        report["base"] = base
        t, b = flatten_metrics(tuned), flatten_metrics(base)
        report["delta"] = {k: t[k] - b[k] for k in t if k in b}
    out = Path(out_dir or (what.adapter.parent / "eval" if what.adapter else Path("eval")))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report, indent=2, ensure_ascii=False)
    write_text(
        out / "report.md", markdown_report(f"glmtune eval: {Path(data).name}", tuned, base, rows, n_examples)
    )
    write_jsonl(out / "predictions.jsonl", rows)
    report["out_dir"] = str(out)
    return report

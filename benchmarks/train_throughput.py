"""Training throughput: glmtune's recipe against the usual HF Seq2SeqTrainer + peft LoRA script (not run in CI).

Workload: the real seed data (``../shared/data/mixed_extraction_classification``, context/target rows,
max source 512 / target 512 tokens), the ChatGLM3 fixture tokenizer, and a ChatGLM3-shaped random model
scaled to a small CPU (hidden 512, 6 layers, 8 heads, 2 kv groups, ffn 1368, padded vocab 65024,
float32, HF's std-0.02 init). Both sides train LoRA r=8, alpha=32, dropout 0.1 on every attention and
MLP projection, AdamW, the same learning rate, batch size, seed and the same examples.

- ``baseline``: what the official ChatGLM3 fine-tune demo / LLaMA-Factory users get, written here as a
  plain script that imports nothing of glmtune's training code (only its tokenizer, so both sides see
  the same tokens): ``Seq2SeqTrainer`` + ``peft`` + ``DataCollatorForSeq2Seq`` (padding to the longest
  in the batch), random batch order, full logits over the vocabulary.
- ``glmtune`` lines: ``glmtune.train.train`` (the recipe users run) with the default settings and with
  one lever changed per line.

Each line runs in its own process (peak RSS is that process's), in the launch order A B C ... A B C ...
for ``--rounds`` rounds; the table shows medians. Per run: examples/s and target tokens/s of the
training loop (``train_runtime``), peak RSS up to the end of training, the last logged train loss, the
dev loss after training (the same function for every line), and MFU: the FLOPs the examples need
(padding excluded, output layer at labelled positions only; the same count for every line) per second
over this CPU's float32 matmul peak, measured here; HFU counts the FLOPs each line actually executes
(its padding, its full-vocabulary logits).

    .venv/bin/python benchmarks/train_throughput.py                 # all lines, 2 rounds (~15 min, 2 cores)
    .venv/bin/python benchmarks/train_throughput.py --lines baseline,glmtune --examples 64 --rounds 1
    .venv/bin/python benchmarks/train_throughput.py --markdown benchmarks/RESULTS-train.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLMTUNE_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data" / "mixed_extraction_classification"
TOKENIZER = SHARED / "fixtures" / "chatglm3_tiny"

SHAPE = dict(hidden=512, layers=6, heads=8, kv_heads=2, head_dim=64, ffn=1368, vocab=65024)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
LORA = dict(r=8, alpha=32, dropout=0.1)
MAX_SOURCE, MAX_TARGET = 512, 512
SEED = 42

# name -> (side, glmtune config overrides, description). "glmtune" is glmtune's defaults.
LINES: dict[str, tuple[str, dict, str]] = {
    "baseline": (
        "baseline",
        {},
        "HF Seq2SeqTrainer + peft, DataCollatorForSeq2Seq, random order, full logits",
    ),
    "glmtune": (
        "glmtune",
        {},
        "glmtune defaults: padding-free batches (same batches, random order) + output layer and fused "
        "chunked cross-entropy at labelled positions only",
    ),
    "glmtune+group": (
        "glmtune",
        {"data.group_by_length": True},
        "defaults + data.group_by_length (length-grouped batch order)",
    ),
    "glmtune-padfree": (
        "glmtune",
        {"data.padding_free": False},
        "defaults - padding-free (data.padding_free=false: batches padded to their longest example)",
    ),
    "glmtune-labels": (
        "glmtune",
        {"train.logits_at_labels_only": False},
        "defaults - labelled-positions loss (train.logits_at_labels_only=false: full-vocabulary logits)",
    ),
    "glmtune-fused": (
        "glmtune",
        {"train.loss_chunk_size": 0},
        "defaults - fused chunked CE (train.loss_chunk_size=0: labelled logits at once, then cross_entropy)",
    ),
    "glmtune+eager": (
        "glmtune",
        {"attn": "eager"},
        "defaults with eager attention instead of SDPA per example (block-diagonal mask over the row)",
    ),
    "glmtune+pack": (
        "glmtune",
        {"data.packing": True, "pack_rows": 2},
        "data.packing instead (best-fit rows of 1024 tokens, 2 rows ~ 8 examples a step)",
    ),
    "glmtune+ckpt": (
        "glmtune",
        {"train.gradient_checkpointing": True},
        "defaults + train.gradient_checkpointing (memory lever)",
    ),
}


# ------------------------------------------------------------------------------------------ preparation
def prepare(work: Path, examples: int, dev_examples: int) -> dict:
    """The model (official ChatGLM3 folder for glmtune, HF folder for the baseline) and the data."""
    import torch

    import glmtune
    from glmtune.data.cache import tokenize_cached
    from glmtune.data.encode import EncodeSettings

    work.mkdir(parents=True, exist_ok=True)
    official, hf = work / "chatglm3-bench", work / "chatglm3-bench-hf"
    marker = work / "model.json"
    want = dict(SHAPE, version=1)
    if not (marker.exists() and json.loads(marker.read_text()) == want):
        from transformers import GlmForCausalLM

        from glmtune.official_format import save_official
        from glmtune.testing import _glm_config

        tok = glmtune.load_tokenizer(TOKENIZER)
        cfg = _glm_config(
            SHAPE["vocab"],
            hidden=SHAPE["hidden"],
            layers=SHAPE["layers"],
            heads=SHAPE["heads"],
            kv_heads=SHAPE["kv_heads"],
            head_dim=SHAPE["head_dim"],
            ffn=SHAPE["ffn"],
            eos=tok.eos_token_id,
            pad=tok.pad_token_id,
        )
        cfg.max_position_embeddings = 1024
        torch.manual_seed(0)
        model = GlmForCausalLM(cfg)  # transformers' init: std 0.02, a plausible start for LoRA
        save_official(model, official, "chatglm3", tokenizer=tok)
        model.save_pretrained(str(hf))
        # the same weights through both loaders
        ids = torch.tensor([[5, 17, 300, 42, 7]])
        a = glmtune.load_model(official)(input_ids=ids).logits
        from transformers import AutoModelForCausalLM

        b = AutoModelForCausalLM.from_pretrained(str(hf))(input_ids=ids).logits
        assert torch.allclose(a, b, atol=1e-5), "official and HF folders differ"
        marker.write_text(json.dumps(want))

    rows = [json.loads(line) for line in (DATA / "mixed_train_dataset.jsonl").open(encoding="utf-8")]
    random.Random(0).shuffle(rows)
    subset = work / f"train-{examples}.jsonl"
    subset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:examples]), "utf-8")
    dev_rows = [json.loads(line) for line in (DATA / "mixed_dev_dataset.jsonl").open(encoding="utf-8")]
    dev = work / f"dev-{dev_examples}.jsonl"
    dev.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dev_rows[:dev_examples]), "utf-8"
    )
    cache = work / "cache"
    encoded = {}
    for name, path, settings in (
        ("train", subset, EncodeSettings(max_source_length=MAX_SOURCE, max_target_length=MAX_TARGET)),
        ("dev", dev, EncodeSettings(max_source_length=MAX_SOURCE, max_target_length=MAX_TARGET)),
        ("pack", subset, EncodeSettings(max_length=MAX_SOURCE + MAX_TARGET)),
    ):
        ds, _ = tokenize_cached(path, official, settings=settings, cache_dir=cache)
        encoded[name] = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in ds]
    for name, rows_ in encoded.items():
        (work / f"{name}-{examples}.tokens.json").write_text(json.dumps(rows_))
    return {"official": official, "hf": hf, "subset": subset, "dev": dev, "cache": cache, "encoded": encoded}


def matmul_peak(threads: int, seconds: float = 3.0) -> float:
    """Best float32 GEMM rate (FLOP/s) over a few square and training-shaped products."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (3072, 3072, 3072), (4096, 512, 2736), (1024, 512, 65024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        c = torch.empty(m, n)
        torch.mm(a, b, out=c)
        t_end = time.perf_counter() + seconds / 4
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
    return best


def collation_times(work: Path, rows: list[dict], batch_size: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per batch of each collator over the training examples (best of ``repeats``)."""
    from transformers import DataCollatorForSeq2Seq

    import glmtune
    from glmtune.data.collate import DataCollator, FlatCollator

    tok = glmtune.load_tokenizer(work / "chatglm3-bench")
    collators = {
        "DataCollatorForSeq2Seq (baseline)": DataCollatorForSeq2Seq(
            tok, padding="longest", return_tensors="pt"
        ),
        "glmtune DataCollator (padded)": DataCollator(tok.pad_token_id),
        "glmtune FlatCollator (padding-free)": FlatCollator(tok.pad_token_id),
    }
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    out = {}
    for name, collate in collators.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                collate([dict(r) for r in b])
            best = min(best, time.perf_counter() - t0)
        out[name] = 1000 * best / len(batches)
    return out


# ------------------------------------------------------------------------------------------ FLOP counts
def flops_per_token_decoder() -> float:
    """Forward FLOPs of the decoder's linear layers per token (2 x weights)."""
    h, d, hd = SHAPE["hidden"], SHAPE["heads"], SHAPE["head_dim"]
    kv, f = SHAPE["kv_heads"], SHAPE["ffn"]
    per_layer = h * (d * hd + 2 * kv * hd) + d * hd * h + h * 2 * f + f * h
    lora = LORA["r"] * (
        (h + d * hd) + 2 * (h + kv * hd) + (d * hd + h) + (h + 2 * f) + (f + h)
    )  # A and B of each target
    return 2 * SHAPE["layers"] * per_layer, 2 * SHAPE["layers"] * lora


def train_flops(real_lengths, labelled, batches=None, full_logits=False) -> float:
    """Training FLOPs of LoRA: frozen weights forward + input gradient (2x forward), LoRA 3x forward,
    causal attention 3x forward, the output layer forward + input gradient where it is computed.

    ``batches`` (list of (tokens, sum of squared attention spans) per batch): count what is executed on
    the batches as collated (padding, attention over whole padded or packed rows) instead of the real
    lengths; ``full_logits``: the output layer at every position of the batches.
    """
    dec, lora = flops_per_token_decoder()
    attn_per_sq = SHAPE["layers"] * 2 * SHAPE["heads"] * SHAPE["head_dim"]  # causal: half of 4 t^2 d
    head = 2 * SHAPE["hidden"] * SHAPE["vocab"]
    if batches is None:
        tokens = sum(real_lengths)
        squares = sum(t * t for t in real_lengths)
    else:
        tokens = sum(b[0] for b in batches)
        squares = sum(b[1] for b in batches)
    out_rows = tokens if full_logits else labelled
    return 2 * dec * tokens + 3 * lora * tokens + 3 * attn_per_sq * squares + 2 * head * out_rows


# ------------------------------------------------------------------------------------------ workers
def _dev_loss(model, dev_rows, batch_size=8) -> float:
    """Mean cross-entropy over the dev replies; the output layer at labelled positions only (memory)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(dev_rows)), key=lambda i: len(dev_rows[i]["input_ids"]))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            rows = [dev_rows[i] for i in order[s : s + batch_size]]
            width = max(len(r["input_ids"]) for r in rows)
            ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
            labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
            mask = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
            )
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            targets = labels[:, 1:][labels[:, 1:] != -100]
            total += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            count += targets.numel()
    return total / count


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Counting:
    """Wraps a collator; records (tokens, sum of squared attention spans) of every batch it makes.

    Attention spans: each example of a padding-free row when SDPA runs per example
    (``cu_seq_lens_q`` present and ``per_example``), else the whole (padded or packed) row."""

    def __init__(self, inner, shapes, per_example=True):
        self.inner, self.shapes, self.per_example = inner, shapes, per_example

    def __call__(self, features):
        batch = self.inner(features)
        rows, width = batch["input_ids"].shape
        if self.per_example and "cu_seq_lens_q" in batch:
            cu = batch["cu_seq_lens_q"].tolist()
            squares = sum((b - a) ** 2 for a, b in zip(cu, cu[1:]))
        else:
            squares = rows * width * width
        self.shapes.append((rows * width, squares))
        return batch


def run_baseline(args, work: Path) -> dict:
    """The plain HF script: no glmtune training code."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        set_seed,
    )

    import glmtune  # tokenizer only: both sides must see the same tokens

    torch.set_num_threads(args.threads)
    tokenizer = glmtune.load_tokenizer(work / "chatglm3-bench")
    train_rows = json.loads((work / f"train-{args.examples}.tokens.json").read_text())
    dev_rows = json.loads((work / f"dev-{args.examples}.tokens.json").read_text())
    set_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(str(work / "chatglm3-bench-hf"), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        ),
    )
    shapes: list = []
    targs = Seq2SeqTrainingArguments(
        output_dir=str(work / "runs" / f"baseline-{args.round}"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        num_train_epochs=1,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        data_seed=SEED,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=targs,
        train_dataset=Dataset.from_list(train_rows),
        data_collator=_Counting(
            DataCollatorForSeq2Seq(tokenizer, padding="longest", return_tensors="pt"), shapes
        ),
        processing_class=tokenizer,
    )
    rss_loaded = _rss()
    result = trainer.train()
    rss = _rss()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_seconds": result.metrics["train_runtime"],
        "rss_peak": rss,
        "rss_loaded": rss_loaded,
        "final_train_loss": losses[-1],
        "dev_loss": _dev_loss(trainer.model, dev_rows),
        "shapes": shapes,
        "examples": len(train_rows),
        "full_logits": True,
    }


def run_glmtune(args, work: Path, overrides: dict) -> dict:
    import torch

    from glmtune.config import load_config
    from glmtune.train import train
    from glmtune.train.trainer import GlmtuneTrainer

    torch.set_num_threads(args.threads)
    overrides = dict(overrides)
    attn = overrides.pop("attn", None)
    pack_rows = overrides.pop("pack_rows", None)
    dev_rows = json.loads((work / f"dev-{args.examples}.tokens.json").read_text())
    data = {
        "train_file": str(work / f"train-{args.examples}.jsonl"),
        "format": "context_target",
        "cache_dir": str(work / "cache"),
    }
    if overrides.get("data.packing"):
        data["max_length"] = MAX_SOURCE + MAX_TARGET
    else:
        data.update(max_source_length=MAX_SOURCE, max_target_length=MAX_TARGET)
    raw = {
        "model": {"path": str(work / "chatglm3-bench"), "dtype": "float32"},
        "data": data,
        "method": {
            "name": "lora",
            "lora_r": LORA["r"],
            "lora_alpha": LORA["alpha"],
            "lora_dropout": LORA["dropout"],
            "lora_target_modules": LORA_TARGETS,
        },
        "train": {
            "output_dir": str(work / "runs" / f"{args.worker}-{args.round}"),
            "epochs": 1,
            "batch_size": pack_rows or args.batch_size,
            "learning_rate": args.lr,
            "logging_steps": args.logging_steps,
            "save_steps": 1_000_000,
            "report_to": [],
            "seed": SEED,
        },
    }
    cfg = load_config(raw, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    shapes: list = []
    made: list = []
    original = GlmtuneTrainer.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.data_collator = _Counting(self.data_collator, shapes, per_example=attn is None)
        if attn:
            self.model.set_attn_implementation(attn)
        made.append(self)

    GlmtuneTrainer.__init__ = init
    summary = train(cfg, printer=lambda *a, **k: None)
    rss = _rss()
    (trainer,) = made
    if attn:
        trainer.model.set_attn_implementation("sdpa")
    return {
        "train_seconds": summary["train_seconds"],
        "rss_peak": rss,
        "final_train_loss": summary["final_train_loss"],
        "dev_loss": _dev_loss(trainer.model, dev_rows),
        "shapes": shapes,
        "examples": args.examples,
        "full_logits": not cfg.train.logits_at_labels_only,
    }


def worker(args) -> int:
    work = Path(args.workdir)
    side, overrides, _ = LINES[args.worker]
    out = run_baseline(args, work) if side == "baseline" else run_glmtune(args, work, overrides)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ driver
def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", default=",".join(LINES), help=f"comma-separated, of: {', '.join(LINES)}")
    p.add_argument("--examples", type=int, default=32, help="training examples per run (one epoch)")
    p.add_argument("--dev-examples", type=int, default=48, help="dev examples for the dev loss")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--lever-rounds",
        type=int,
        default=1,
        help="rounds for the lines other than baseline, glmtune and glmtune+group (which run --rounds times)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--logging-steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/glmtune-bench-train")
    p.add_argument("--json", help="write every run and the summary here")
    p.add_argument("--markdown", help="write the summary table (Markdown) here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    for needed in (DATA, TOKENIZER):
        if not needed.exists():
            print(f"{needed}: missing (../shared holds the datasets and fixtures)", file=sys.stderr)
            return 2
    lines = [x for x in args.lines.split(",") if x]
    unknown = [x for x in lines if x not in LINES]
    if unknown:
        p.error(f"unknown lines: {unknown}")
    work = Path(args.workdir)
    t0 = time.time()
    load_before = os.getloadavg()
    prep = prepare(work, args.examples, args.dev_examples)
    # dev rows live in dev-<examples>.tokens.json
    peak = matmul_peak(args.threads)
    print(f"float32 matmul peak ({args.threads} threads): {peak / 1e9:.1f} GFLOP/s", flush=True)
    enc = prep["encoded"]["train"]
    real = [len(r["input_ids"]) for r in enc]
    labelled = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in enc)
    useful = train_flops(real, labelled)
    collate_ms = collation_times(work, enc, args.batch_size)
    runs: dict[str, list[dict]] = {name: [] for name in lines}
    headline = ("baseline", "glmtune", "glmtune+group")
    for rnd in range(args.rounds):
        for name in lines:
            if rnd >= args.lever_rounds and name not in headline:
                continue
            cmd = [sys.executable, __file__, "--worker", name, "--round", str(rnd)]
            for k in ("examples", "batch_size", "lr", "logging_steps", "threads", "workdir"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
            started = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not found:
                print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                raise SystemExit(f"{name} failed (exit {proc.returncode})")
            r = json.loads(found[-1][len("RESULT ") :])
            r["executed_flops"] = train_flops(real, labelled, r["shapes"], full_logits=r["full_logits"])
            r["padded_tokens"] = sum(b[0] for b in r.pop("shapes"))
            r["wall"] = time.time() - started
            runs[name].append(r)
            print(
                f"round {rnd + 1} {name:15s} {r['examples'] / r['train_seconds']:6.2f} ex/s "
                f"rss {_fmt_bytes(r['rss_peak'])} train loss {r['final_train_loss']:.4f} "
                f"dev loss {r['dev_loss']:.4f} ({r['wall']:.0f} s)",
                flush=True,
            )
    summary = summarize(runs, peak, useful, real, labelled, args)
    text = table(summary, args, peak, time.time() - t0)
    text += (
        f"\n\nLoad average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    text += (
        "\n\nCollation, ms per batch of "
        + str(args.batch_size)
        + ": "
        + ", ".join(f"{k} {v:.2f}" for k, v in collate_ms.items())
    )
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"runs": runs, "summary": summary, "collate_ms": collate_ms, "peak": peak}, indent=1)
        )
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    return 0


def summarize(runs, peak, useful, real, labelled, args) -> dict:
    med = statistics.median
    out = {}
    for name, rs in runs.items():
        secs = med(r["train_seconds"] for r in rs)
        out[name] = {
            "examples_per_s": len(real) / secs,
            "target_tokens_per_s": labelled / secs,
            "rss_peak": med(r["rss_peak"] for r in rs),
            "final_train_loss": med(r["final_train_loss"] for r in rs),
            "dev_loss": med(r["dev_loss"] for r in rs),
            "mfu": useful / secs / peak,
            "hfu": med(r["executed_flops"] for r in rs) / secs / peak,
            "padding": med(r["padded_tokens"] for r in rs) / sum(real) - 1,
            "runs": len(rs),
            "train_seconds": [round(r["train_seconds"], 2) for r in rs],
        }
    return out


def table(summary: dict, args, peak: float, wall: float) -> str:
    import platform

    import torch

    base = summary.get("baseline")
    head = (
        "| line | runs | ex/s | target tok/s | peak RSS | final train loss | dev loss | MFU | HFU | padding "
        "| ex/s ÷ baseline | RSS ÷ baseline | dev loss vs baseline |"
    )
    rows = [head, "|" + "---|" * 13]
    for name, s in summary.items():
        ratio = rss = dloss = "–"
        if base and name != "baseline":
            ratio = f"{s['examples_per_s'] / base['examples_per_s']:.2f}×"
            rss = f"{s['rss_peak'] / base['rss_peak']:.2f}×"
            dloss = f"{100 * (s['dev_loss'] / base['dev_loss'] - 1):+.2f} %"
        rows.append(
            f"| {name} | {s['runs']} | {s['examples_per_s']:.2f} | {s['target_tokens_per_s']:.0f} | {_fmt_bytes(s['rss_peak'])} "
            f"| {s['final_train_loss']:.4f} | {s['dev_loss']:.4f} | {100 * s['mfu']:.1f} % | {100 * s['hfu']:.1f} % "
            f"| {100 * s['padding']:.0f} % | {ratio} | {rss} | {dloss} |"
        )
    legend = [f"- `{n}`: {LINES[n][2]}" for n in summary]
    meta = (
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()} "
        f"({args.threads} threads, float32 matmul peak {peak / 1e9:.1f} GFLOP/s), torch {torch.__version__}; "
        f"{args.examples} examples per run (batch {args.batch_size}, lr {args.lr}); baseline, glmtune and "
        f"glmtune+group {args.rounds} rounds, the other lines {min(args.lever_rounds, args.rounds)}, interleaved "
        f"(runs column), medians; dev loss on {args.dev_examples} dev examples; whole benchmark {wall / 60:.1f} min."
    )
    return "\n".join([meta, "", *rows, "", *legend])


if __name__ == "__main__":
    sys.exit(main())

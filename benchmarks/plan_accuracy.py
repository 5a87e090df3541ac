"""``glmtune plan`` against measured peaks: CPU training and generation runs of several shapes and methods
(not run in CI; one case is the slow test in tests/test_plan.py).

Each case writes a random model in the official layout (``glmtune.testing.make_tiny_model`` at sizes
where the model, optimizer and activations dwarf the runtime; a padded vocabulary where the case is
about the logits), a data file whose every example is cut to exactly the configured lengths, and a run
config; then runs ``glmtune.train.train`` on it for ``--steps`` optimizer steps in a fresh process.

Measured: the process's peak resident memory (VmHWM) during training (read before the first checkpoint
is written), minus its resident memory (VmRSS) just before the model is loaded, when Python, torch,
transformers, glmtune, the tokenizer and the tokenized data are already in memory; the high-water mark is
reset there (``/proc/self/clear_refs``), so the import and tokenization peaks do not count. Predicted:
``glmtune plan`` for the same config on the CPU (``Plan.model_bytes``: the peak without its runtime line).
Each case runs twice (``--malloc both``): with glibc's default policy ("default": what a CPU user sees;
glibc keeps freed activation memory in its heap, which the plan's "freed memory glibc keeps" line counts)
and with ``MALLOC_MMAP_THRESHOLD_=262144`` ("live": glibc maps every large block on its own, so the
resident memory follows the live tensors; the plan is then made without that line). The heap line's
constants (``glibc_heap_share`` in ``glmtune.plan._LAYOUTS``, ``GLIBC_MMAP_CEILING``) were fitted on the
cases listed before the ``held-out`` ones, which were added afterwards to check every constant on shapes
it never saw. ``--serve`` runs the generation cases the same way (load through glmtune's engine, then
exactly the given number of new tokens with the KV cache) against ``glmtune plan --serve``. Exit status 1
when a case is off by more than 20 % in either mode.

    .venv/bin/python benchmarks/plan_accuracy.py                    # every training case, both modes (~30 min, 2 cores)
    .venv/bin/python benchmarks/plan_accuracy.py --cases lora,full --malloc live
    .venv/bin/python benchmarks/plan_accuracy.py --list
    .venv/bin/python benchmarks/plan_accuracy.py --json /tmp/plan.json --markdown /tmp/plan.md
    .venv/bin/python benchmarks/plan_accuracy.py --replan /tmp/plan.json   # current code, old measurements
    .venv/bin/python benchmarks/plan_accuracy.py --gpu-check [gpu_check.json]  # the GPU check's stages
    .venv/bin/python benchmarks/plan_accuracy.py --serve                 # generation: plan --serve (~8 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

GLM = dict(hidden=768, heads=12, kv_heads=2, head_dim=64, ffn=2048, layers=6)
V1 = dict(hidden=768, heads=12, ffn=3072, layers=6)
GLM_DEEP = dict(GLM, layers=12)
GLM_WIDE = dict(hidden=1024, heads=16, kv_heads=2, head_dim=64, ffn=2816, layers=4)
V1_WIDE = dict(hidden=1024, heads=16, ffn=4096, layers=4)
GLM_BIG = dict(hidden=2048, heads=16, kv_heads=2, head_dim=128, ffn=5632, layers=2)
GLM_MID = dict(hidden=1536, heads=12, kv_heads=2, head_dim=128, ffn=4096, layers=3)


@dataclass(frozen=True)
class Case:
    name: str
    generation: str
    sizes: dict
    method: str
    batch: int
    source: int  # data.max_source_length
    target: int  # data.max_target_length
    overrides: dict = field(default_factory=dict)  # dotted config keys
    vocab: int | None = None  # pad the vocabulary to this size (GLM layouts)
    held_out: bool = False  # not among the cases the plan's measured constants were fitted on

    def describe(self) -> str:
        s = self.sizes
        extra = " ".join(f"{k}={v}" for k, v in self.overrides.items())
        vocab = f", vocab {self.vocab}" if self.vocab else ""
        held = " (held-out)" if self.held_out else ""
        return (
            f"{self.generation} h{s['hidden']} L{s['layers']} f{s['ffn']}{vocab}, {self.method}, "
            f"batch {self.batch} x ({self.source}+{self.target}) {extra}".strip()
            + held
        )


CKPT = {"train.gradient_checkpointing": True}
CASES = [
    Case("lora", "chatglm3", GLM, "lora", 4, 256, 248),
    Case("lora-ckpt", "chatglm3", GLM, "lora", 4, 256, 248, CKPT),
    Case(
        "lora-long",
        "chatglm3",
        GLM,
        "lora",
        2,
        512,
        504,
        {"method.lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]},
    ),
    Case("full", "chatglm3", GLM, "full", 4, 256, 248),
    Case("full-ckpt", "chatglm3", GLM, "full", 4, 256, 248, CKPT),
    Case("full-padded", "chatglm3", GLM, "full", 2, 256, 248, {"data.padding_free": False}),
    Case("full-step", "chatglm3", GLM, "full", 1, 32, 24),  # the optimizer step is the peak
    Case("full-accum", "chatglm3", GLM, "full", 2, 128, 120, {"train.grad_accum": 2}),
    Case("ptuning", "chatglm3", GLM, "ptuning_v2", 4, 256, 248, {"method.pre_seq_len": 64}),
    Case("ptuning-ckpt", "chatglm3", GLM, "ptuning_v2", 4, 256, 248, {"method.pre_seq_len": 64, **CKPT}),
    Case("qlora", "chatglm3", GLM, "lora", 4, 256, 248, {"model.quantization": "4bit"}),
    Case("qlora-ckpt", "chatglm3", GLM, "lora", 4, 256, 248, {"model.quantization": "4bit", **CKPT}),
    # bf16 compute over the 4-bit base: the residual stream still runs in float32 (peft's k-bit set-up)
    Case(
        "qlora-bf16",
        "chatglm3",
        GLM,
        "lora",
        4,
        256,
        248,
        {"model.quantization": "4bit", "model.dtype": "bfloat16"},
    ),
    Case(
        "ptuning-8bit",
        "chatglm3",
        GLM,
        "ptuning_v2",
        4,
        256,
        248,
        {"method.pre_seq_len": 64, "model.quantization": "8bit"},
    ),
    Case("vocab-fused", "chatglm3", GLM, "lora", 4, 128, 376, {}, vocab=32768),
    Case("vocab-unfused", "chatglm3", GLM, "lora", 4, 128, 376, {"train.loss_chunk_size": 0}, vocab=32768),
    Case(
        "vocab-stock", "glm4", GLM, "lora", 2, 128, 376, {"train.logits_at_labels_only": False}, vocab=32768
    ),
    Case("v1-lora", "chatglm", V1, "lora", 4, 256, 248),
    Case("v1-full", "chatglm", V1, "full", 2, 256, 248),
    Case("v1-ptuning", "chatglm", V1, "ptuning_v2", 4, 256, 248, {"method.pre_seq_len": 64}),
    # Added to check the heap term, which was first fitted on the cases above as a constant number of
    # layers; these showed that it grows with depth, and the share in glmtune.plan._LAYOUTS was fitted on
    # them too.
    Case("deep-lora", "chatglm3", GLM_DEEP, "lora", 4, 256, 248),
    Case(
        "deep-qlora-ckpt", "chatglm3", GLM_DEEP, "lora", 4, 256, 248, {"model.quantization": "4bit", **CKPT}
    ),
    Case("wide-full", "chatglm3", GLM_WIDE, "full", 2, 256, 248),
    Case("wide-glm4-lora", "glm4", GLM_WIDE, "lora", 4, 384, 376),
    Case("v1-wide-lora", "chatglm", V1_WIDE, "lora", 2, 384, 376),
    # Every activation of hidden width or more is above glibc's 32 MiB mmap ceiling (3 x 2024 tokens x
    # 2048 x 4 B = 47 MiB): mapped on its own and returned when freed, whatever the policy.
    Case("big-tensors", "chatglm3", GLM_BIG, "lora", 3, 1024, 1000),
    Case("mid-tensors", "chatglm3", GLM_MID, "lora", 4, 512, 504),  # 4 x 1016 x 1536 x 4 B = 24 MiB
    # Held out: added after every measured constant was fixed, to check them on shapes they never saw.
    Case("deep-full-ckpt", "chatglm3", dict(GLM, layers=10), "full", 4, 256, 248, CKPT, held_out=True),
    Case(
        "v1-deep-ptuning",
        "chatglm",
        dict(V1, layers=10),
        "ptuning_v2",
        2,
        256,
        248,
        {"method.pre_seq_len": 64},
        held_out=True,
    ),
    Case("glm4-deep-long", "glm4", dict(GLM, layers=10), "lora", 1, 1024, 1000, held_out=True),
    Case(
        "wide-qlora",
        "chatglm3",
        dict(GLM_WIDE, layers=6),
        "lora",
        4,
        256,
        248,
        {"model.quantization": "4bit"},
        held_out=True,
    ),
]

# Runs in a fresh process: the config's training, with the memory readings around it.
CHILD = r"""
import json, sys
import glmtune.loading as loading
from glmtune.train import trainer as trainer_module
from glmtune.config import load_config
from glmtune.train import train

state = {}

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

original = loading.load_model

def load_model(*args, **kwargs):
    state["baseline"] = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0): the peak from here on
    return original(*args, **kwargs)

loading.load_model = load_model

def before_save(fn):
    def wrapped(self, *args, **kwargs):
        state.setdefault("peak", status("VmHWM:"))
        return fn(self, *args, **kwargs)
    return wrapped

cls = trainer_module.GlmtuneTrainer
cls._save_checkpoint = before_save(cls._save_checkpoint)
cls.save_model = before_save(cls.save_model)
summary = train(load_config(sys.argv[1]), printer=lambda *a, **k: None)
state.setdefault("peak", status("VmHWM:"))
state["steps"] = summary["steps"]
with open(sys.argv[2], "w") as f:
    json.dump(state, f)
"""


@dataclass(frozen=True)
class ServeCase:
    """Generation with the KV cache: ``batch`` rows of ``prompt`` tokens, then exactly ``new`` tokens each."""

    name: str
    generation: str
    sizes: dict
    batch: int
    prompt: int
    new: int
    quantization: str | None = None
    vocab: int | None = None
    held_out: bool = False

    def describe(self) -> str:
        s = self.sizes
        quant = f", {self.quantization}" if self.quantization else ", float32"
        return (
            f"{self.generation} h{s['hidden']} L{s['layers']} f{s['ffn']}{quant}, "
            f"{self.batch} x ({self.prompt} prompt + {self.new} new tokens)"
            + (" (held-out)" if self.held_out else "")
        )


SERVE_CASES = [
    ServeCase("serve", "chatglm3", GLM, 1, 1024, 256),
    ServeCase("serve-batch", "chatglm3", GLM, 4, 512, 256),
    ServeCase("serve-deep", "chatglm3", GLM_DEEP, 2, 1024, 512),
    ServeCase("serve-glm4-4bit", "glm4", GLM_WIDE, 2, 512, 128, "4bit"),
    ServeCase("serve-v1", "chatglm", V1, 2, 512, 256),
    ServeCase("serve-v1-8bit", "chatglm", V1_WIDE, 2, 512, 128, "8bit"),
    # Held out: added after the heap term of generation was fixed on the float cases above.
    ServeCase("serve-glm4-deep", "glm4", dict(GLM, layers=10), 3, 768, 384, held_out=True),
    ServeCase("serve-v1-long", "chatglm", dict(V1, layers=8), 1, 1536, 256, held_out=True),
]

# Runs in a fresh process: load through glmtune's inference engine and generate, with memory readings.
SERVE_CHILD = r"""
import json, sys, torch
import transformers.generation.utils  # generate()'s modules: runtime, like the training child's imports
from glmtune.inference import Engine
from glmtune.loading import load_model, load_tokenizer
from glmtune.resolve import resolve_model

folder, quant, batch, prompt, new, out = sys.argv[1:7]
batch, prompt, new = int(batch), int(prompt), int(new)
state = {}

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

resolved = resolve_model(folder, dtype="float32", device="cpu", quantization=quant or None)
tokenizer = load_tokenizer(resolved)  # before the baseline, as the training child has its data
if quant in ("4bit", "8bit"):
    import bitsandbytes  # noqa: F401  the library's own memory is runtime (the training child imports it too)
state["baseline"] = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
engine = Engine(load_model(resolved), tokenizer, resolved.spec, resolved.template)
state["load_peak"] = status("VmHWM:")  # loading (each tensor's file pages are mapped while it is read)
state["loaded"] = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
gen = torch.Generator().manual_seed(0)
ids = torch.randint(10, engine.tokenizer.vocab_size - 10, (batch, prompt), generator=gen)
with torch.no_grad():
    result = engine.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        min_new_tokens=new,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=engine.pad_id,
    )
assert result.shape == (batch, prompt + new), result.shape
state["generation_peak"] = status("VmHWM:")
state["peak"] = max(state["load_peak"], state["generation_peak"])
with open(out, "w") as f:
    json.dump(state, f)
"""


def measure_serving(work: Path, case: ServeCase, env: dict) -> dict:
    model = build_model(work, case)
    out = work / f"{case.name}.memory.json"
    out.unlink(missing_ok=True)
    args = [str(model), case.quantization or "", str(case.batch), str(case.prompt), str(case.new), str(out)]
    proc = subprocess.run([sys.executable, "-c", SERVE_CHILD, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{case.name}: generation failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def predict_serving(work: Path, case: ServeCase, mode: str):
    from glmtune.plan import Settings, plan_serving
    from glmtune.resolve import resolve_model

    resolved = resolve_model(
        build_model(work, case), dtype="float32", device="cpu", quantization=case.quantization
    )
    st = Settings(
        method="full",
        dtype="float32",
        quantization=case.quantization,
        batch_size=case.batch,
        prompt_len=case.prompt,
        max_new_tokens=case.new,
    )
    return plan_serving(resolved, st, "cpu", glibc_heap=mode == "default")


def _long_text(seed: int, chars: int = 4000) -> str:
    import random

    from glmtune.testing import CORPUS

    rng = random.Random(seed)
    out = []
    while sum(map(len, out)) < chars:
        out.append(rng.choice(CORPUS))
    return "".join(out)


def build_model(work: Path, case: Case) -> Path:
    """The case's model folder (written once per shape)."""
    key = json.dumps([case.generation, case.sizes, case.vocab], sort_keys=True)
    folder = work / f"model-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (folder / "done.json").exists():
        return folder
    from glmtune.testing import make_tiny_model

    make_tiny_model(folder, case.generation, max_shard_bytes=8 << 30, **case.sizes)
    if case.vocab:
        _pad_vocab(folder, case.vocab)
    (folder / "done.json").write_text(key)
    return folder


def _pad_vocab(folder: Path, vocab: int) -> None:
    """Grow the embedding and output rows of an official GLM folder to ``vocab`` (random new rows)."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    (file,) = folder.glob("*.safetensors")
    state = load_file(str(file))
    gen = torch.Generator().manual_seed(0)
    for key in ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight"):
        t = state[key]
        extra = torch.randn((vocab - t.shape[0], t.shape[1]), generator=gen, dtype=t.dtype) * 0.02
        state[key] = torch.cat([t, extra])
    save_file(state, str(file), metadata={"format": "pt"})
    cfg["padded_vocab_size"] = vocab
    cfg_path.write_text(json.dumps(cfg, indent=1))


def write_run(work: Path, case: Case, model: Path, steps: int) -> Path:
    """The data (every example longer than both limits) and the run config of a case."""
    run = work / case.name
    run.mkdir(parents=True, exist_ok=True)
    data = run / "train.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(case.batch * steps):
            row = {"context": _long_text(2 * i), "target": _long_text(2 * i + 1)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    cfg = {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {
            "train_file": str(data),
            "format": "context_target",
            "max_source_length": case.source,
            "max_target_length": case.target,
            "cache_dir": str(run / "cache"),
        },
        "method": {"name": case.method},
        "train": {
            "output_dir": str(run / "out"),
            "max_steps": steps,
            "batch_size": case.batch,
            "learning_rate": 1e-4,
            "save_steps": 10_000,
            "logging_steps": 1,
            "report_to": ["none"],
        },
    }
    for key, value in case.overrides.items():
        group, name = key.split(".")
        cfg[group][name] = value
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    return path


def measure(config: Path, env: dict) -> dict:
    out = config.parent / "memory.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(config), str(out)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{config}: training failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def predict(config: Path, mode: str):
    """The CPU plan for a case; "live" without the line for the free space glibc's heap keeps."""
    from glmtune.config import load_config
    from glmtune.plan import plan_config

    return plan_config(load_config(config), device="cpu", glibc_heap=mode == "default")[1]


# benchmarks/gpu_check.py's training stages at its GPU defaults (batch 4 x 512 tokens, half of them reply
# tokens; bf16 weights and precision, full fine-tuning of the last 4 layers over float32 weights):
# stage -> (generation, official config, method overrides, model overrides, train overrides).
GPU_STAGES = {
    "lora": ("chatglm3", "chatglm3-6b", {"name": "lora"}, {}, {}),
    "qlora": (
        "chatglm3",
        "chatglm3-6b",
        {"name": "lora"},
        {"quantization": "4bit"},
        {"gradient_checkpointing": True},
    ),
    "ptuning_v2": ("chatglm3", "chatglm3-6b", {"name": "ptuning_v2", "pre_seq_len": 128}, {}, {}),
    "full_last_layers": (
        "chatglm3",
        "chatglm3-6b",
        {"name": "full", "freeze_layers_except_last": 4},
        {"dtype": "float32"},
        {},
    ),
    "v1_lora": ("chatglm", "chatglm-6b", {"name": "lora"}, {}, {}),
}


def gpu_check(results: Path | None, work: Path) -> int:
    """The plan for gpu_check.py's training stages on a CUDA GPU, beside its measured peaks when given.

    gpu_check measures ``torch.cuda.max_memory_allocated`` (no CUDA context, no allocator slack), so the
    comparison is with the plan without its runtime line.
    """
    from glmtune.config import load_config
    from glmtune.plan import plan_config

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import SHAPES

    measured = {}
    if results is not None:
        for row in json.loads(results.read_text()).get("rows", []):
            if row.get("train_peak_bytes"):
                measured[row["stage"]] = row["train_peak_bytes"]
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'stage':<18}{'predicted':>11}{'measured':>11}{'ratio':>8}")
    worst = 0.0
    for stage, (generation, official, method, model, train_cfg) in GPU_STAGES.items():
        folder = work / f"gpu-{generation}"
        folder.mkdir(exist_ok=True)
        cfg = json.loads(
            (REPO / "tests" / "data" / "official_configs" / official / "config.json").read_text()
        )
        cfg.update(SHAPES[generation].official_overrides())
        (folder / "config.json").write_text(json.dumps(cfg))
        seq = 512
        raw = {
            "model": {"path": str(folder), "generation": generation, "dtype": "bfloat16", **model},
            "data": {"train_file": "train.jsonl", "max_length": seq},
            "method": method,
            "train": {"output_dir": str(work / "gpu-out"), "batch_size": 4, "precision": "bf16", **train_cfg},
        }
        plan = plan_config(load_config(raw), device="cuda")[1]
        got = measured.get(stage)
        cells = f"{got / 2**30:>9.2f}Gi{plan.model_bytes / got:>8.2f}" if got else f"{'-':>11}{'-':>8}"
        if got:
            worst = max(worst, abs(plan.model_bytes / got - 1))
        print(f"{stage:<18}{plan.model_bytes / 2**30:>9.2f}Gi{cells}   {plan.phase}")
    if measured:
        print(f"worst |predicted / measured - 1| = {worst:.1%}")
    return 0


def _predicted(plan) -> dict:
    return {
        "predicted": plan.model_bytes,
        "phase": plan.phase,
        "lines": {line.name: line.bytes for line in plan.lines},
    }


def replan(results_file: Path, work: Path, json_out: Path | None, markdown: Path | None) -> int:
    """Predictions of the current code against the measurements of an earlier run (no training)."""
    results = json.loads(results_file.read_text())
    modes = [m for m in ("default", "live") if m in results[0]]
    cases = {c.name: c for c in CASES}
    serving = {c.name: c for c in SERVE_CASES}
    for r in results:
        config = work / r["case"] / "config.yaml"
        if r["case"] not in serving and not config.exists():  # the run folder is gone: write it again
            case = cases[r["case"]]
            config = write_run(work, case, build_model(work, case), 2)
        for m in modes:
            plan = (
                predict_serving(work, serving[r["case"]], m) if r["case"] in serving else predict(config, m)
            )
            r[m].update(_predicted(plan))
            r[m]["ratio"] = r[m]["predicted"] / r[m]["measured"]
            print(
                f"{r['case']:<16}{r[m]['predicted'] / 2**20:>9.0f}Mi{r[m]['measured'] / 2**20:>9.0f}Mi"
                f"{r[m]['ratio']:>8.2f}   {m}"
            )
    return summarize(results, modes, json_out, markdown)


def summarize(results: list[dict], modes: list[str], json_out: Path | None, markdown: Path | None) -> int:
    """Print the ratio ranges, write the JSON and the Markdown table; 1 when a case is off by > 20 %."""
    for mode in modes:
        for label, held in (("fitted", False), ("held-out", True)):
            rows = [r for r in results if r.get("held_out", False) == held]
            if rows:
                ratios = sorted(r[mode]["ratio"] for r in rows)
                print(
                    f"{mode}, {label}: {len(rows)} cases, predicted / measured {ratios[0]:.2f}-{ratios[-1]:.2f} "
                    f"(median {ratios[len(ratios) // 2]:.2f})"
                )
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    if markdown:
        head = "| case | shape and method |" + "".join(
            f" predicted ({m}) | measured ({m}) | ratio |" for m in modes
        )
        rows = [head, "|---|---|" + "---:|---:|---:|" * len(modes)]
        for r in results:
            cells = "".join(
                f" {r[m]['predicted'] / 2**20:.0f} MiB | {r[m]['measured'] / 2**20:.0f} MiB | {r[m]['ratio']:.2f} |"
                for m in modes
            )
            rows.append(f"| {r['case']} | {r['shape']} |{cells}")
        markdown.write_text("\n".join(rows) + "\n")
    return 0 if all(abs(r[m]["ratio"] - 1) <= 0.20 for r in results for m in modes) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/glmtune-bench/plan"))
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument(
        "--steps",
        type=int,
        default=4,
        help="optimizer steps per run (states exist from step 2; glibc's heap settles over the first few)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--malloc",
        choices=["live", "default", "both"],
        default="both",
        help="default: glibc's own policy, which keeps freed activation memory in its heap (what a CPU user "
        "sees). live: MALLOC_MMAP_THRESHOLD_=262144, so glibc maps every block of 256 KiB or more on its own "
        "and unmaps it when freed: the resident memory follows the live tensors",
    )
    ap.add_argument(
        "--replan",
        type=Path,
        help="a --json file of an earlier run: recompute the predictions with the current code, no training",
    )
    ap.add_argument(
        "--gpu-check",
        nargs="?",
        const="",
        metavar="JSON",
        help="print the plan for benchmarks/gpu_check.py's training stages (CUDA), beside the peaks of its "
        "--out JSON when given",
    )
    ap.add_argument(
        "--serve",
        action="store_true",
        help="the generation cases (glmtune plan --serve against the peak of KV-cache generation) instead",
    )
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if args.list:
        for c in CASES + SERVE_CASES:
            print(f"{c.name:<16} {c.describe()}")
        return 0
    if args.replan:
        return replan(args.replan, args.work, args.json, args.markdown)
    if args.gpu_check is not None:
        return gpu_check(Path(args.gpu_check) if args.gpu_check else None, args.work)
    pool = SERVE_CASES if args.serve else CASES
    chosen = pool if not args.cases else [c for c in pool if c.name in args.cases.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    modes = ["default", "live"] if args.malloc == "both" else [args.malloc]
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    t0 = time.time()
    print(f"{'case':<16}{'predicted':>11}{'measured':>11}{'ratio':>8}   mode: phase; shape", flush=True)
    for case in chosen:
        config = None if args.serve else write_run(args.work, case, build_model(args.work, case), args.steps)
        t = time.time()
        row = {"case": case.name, "shape": case.describe(), "held_out": case.held_out}
        for mode in modes:
            plan = predict_serving(args.work, case, mode) if args.serve else predict(config, mode)
            run_env = dict(env, MALLOC_MMAP_THRESHOLD_=str(262144)) if mode == "live" else env
            mem = measure_serving(args.work, case, run_env) if args.serve else measure(config, run_env)
            measured = mem["peak"] - mem["baseline"]
            ratio = plan.model_bytes / measured
            row[mode] = {**_predicted(plan), "measured": measured, "ratio": ratio, **mem}
            print(
                f"{case.name:<16}{plan.model_bytes / 2**20:>9.0f}Mi{measured / 2**20:>9.0f}Mi{ratio:>8.2f}"
                f"   {mode}: {plan.phase}; {case.describe()} (baseline {mem['baseline'] / 2**20:.0f} MiB)",
                flush=True,
            )
        row["seconds"] = time.time() - t
        results.append(row)
    print(f"{time.time() - t0:.0f} s")
    return summarize(results, modes, args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())

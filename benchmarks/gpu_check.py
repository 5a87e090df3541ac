"""GPU check: glmtune's training methods, eval, predict and the API server on a 6B-shaped model, in one command.

    python benchmarks/gpu_check.py --out benchmarks/gpu_check.json       # one GPU; budgeted to 8 minutes on an H100
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json       # the same script on the CPU (~1 min)
    python benchmarks/gpu_check.py --stages lora,qlora --out /tmp/two.json

Setup: a random ChatGLM3-6B-shaped checkpoint in the official layout (bf16 weights made on the GPU,
official names, sharded safetensors, official config.json; the shape is ``load_memory.FULL``, 28 layers)
with a tiny sentencepiece tokenizer, its output rows past the tokenizer zeroed so that greedy decoding only
produces decodable ids, and training rows of exactly ``--seq-len`` tokens (half of them reply tokens).

Stages, each in its own ``try`` (a failure is reported in its row and the next stage runs), each with a
time budget, all under ``--budget`` seconds (stages that would start later are reported as skipped):

- ``lora``: LoRA (glmtune's defaults: q/k/v, r 8), bf16; ``qlora``: LoRA on a 4-bit NF4 base with
  gradient checkpointing; ``ptuning_v2``: P-Tuning v2, pre_seq_len 128; ``full_last_layers``: full
  fine-tuning of the last ``--full-last-layers`` layers. Each runs ``glmtune.train.train`` (the recipe
  ``glmtune train`` runs) for ``--warmup-steps`` + ``--steps`` steps of ``--batch-size`` x ``--seq-len``
  tokens; tokens/s and MFU are measured over the steps after the warm-up.
- ``eval`` and ``predict``: the LoRA run loaded as ``glmtune eval`` / ``glmtune predict`` load it (base +
  final/ adapter), greedy generation; tokens/s counts generated tokens.
- ``serve``: ``glmtune serve`` of the LoRA run in a child process under concurrent streaming load
  (``serve_load.run_once``); tokens/s is completion tokens per second.
- ``v1_lora``: LoRA on a random ChatGLM-6B (v1)-shaped checkpoint (built in the stage).

Per stage: tokens/s, MFU (model FLOPs per second over the peak: the device's dense bf16 peak from a table
by device name, or ``--peak-tflops``; in ``--tiny`` the measured float32 matmul rate of the CPU), peak
memory (``torch.cuda.max_memory_allocated`` from the stage's start; on the CPU the peak RSS), the goal and
whether it was met. The table is printed and written, atomically, to ``--out`` (``.json``: the rows and
the table; otherwise the Markdown table) after every stage, so a run cut short still leaves the stages it
finished. Exit status 1 when a stage failed.

``--tiny``: the same stages on the CPU with a tiny model of each shape (float32, a few steps), for the test
suite; goals are not judged there.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, imported below

from load_memory import FULL as CHATGLM3_6B  # noqa: E402  (the ChatGLM3-6B shape table)

GIB = 2**30

# Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; the first pattern found
# (case-insensitive) in torch.cuda.get_device_name() wins, so the specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (None when the table does not know it)."""
    name = device_name.lower()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern.lower() in name:
            return tflops
    return None


# ------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shape:
    """A model's sizes, enough to build it and to count its FLOPs.

    ``kv_groups``: key/value heads (grouped-query attention); ``gated``: the MLP's first matrix is
    [2 x ffn, hidden] (SwiGLU) rather than [ffn, hidden] (GELU); ``vocab``: rows of the output layer.
    """

    generation: str
    hidden: int
    layers: int
    heads: int
    kv_groups: int
    head_dim: int
    ffn: int
    vocab: int
    seq: int
    gated: bool

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's matrix multiplies (q/k/v, output projection, MLP)."""
        h, hd = self.hidden, self.heads * self.head_dim
        qkv = h * (hd + 2 * self.kv_groups * self.head_dim)
        mlp = h * self.ffn * (2 if self.gated else 1) + self.ffn * h
        return qkv + hd * h + mlp

    @property
    def head_params(self) -> int:
        """The output layer [vocab, hidden]."""
        return self.vocab * self.hidden

    def official_overrides(self) -> dict:
        """These sizes in the official config.json field names of the generation's layout."""
        return _LAYOUTS[_loader(self.generation)][0](self)


def _loader(generation: str) -> str:
    """The ModelSpec's layout key (glmtune.specs): which official config fields and model class apply."""
    from glmtune.specs import REGISTRY

    return REGISTRY[generation].loader


def _v1_fields(shape: Shape) -> dict:
    return {
        "hidden_size": shape.hidden,
        "num_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "inner_hidden_size": shape.ffn,
        "vocab_size": shape.vocab,
        "max_sequence_length": shape.seq,
    }


def _glm_fields(shape: Shape) -> dict:
    return {
        "hidden_size": shape.hidden,
        "num_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "multi_query_attention": shape.kv_groups != shape.heads,
        "multi_query_group_num": shape.kv_groups,
        "kv_channels": shape.head_dim,
        "ffn_hidden_size": shape.ffn,
        "padded_vocab_size": shape.vocab,
        "seq_length": shape.seq,
    }


def _v1_model(official: dict):
    from glmtune.models.chatglm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM

    return ChatGLMv1ForCausalLM, ChatGLMv1Config.from_official(official)


def _glm_model(official: dict):
    from transformers import GlmForCausalLM

    from glmtune.models.glm_official import glm_config_from_official

    return GlmForCausalLM, glm_config_from_official(official)


# ModelSpec.loader -> (official config fields of a Shape, glmtune's model class and config for them): the
# classes glmtune's loader builds for that layout.
_LAYOUTS = {"chatglm_v1": (_v1_fields, _v1_model), "glm_official": (_glm_fields, _glm_model)}


def _chatglm3(**sizes) -> Shape:
    return Shape(generation="chatglm3", gated=True, **sizes)


def _chatglm(hidden: int, layers: int, heads: int, ffn: int, vocab: int, seq: int) -> Shape:
    return Shape("chatglm", hidden, layers, heads, heads, hidden // heads, ffn, vocab, seq, gated=False)


SHAPES = {
    # ChatGLM3-6B as released: load_memory's table, 28 layers.
    "chatglm3": _chatglm3(
        hidden=CHATGLM3_6B["hidden"],
        layers=28,
        heads=CHATGLM3_6B["heads"],
        kv_groups=CHATGLM3_6B["groups"],
        head_dim=CHATGLM3_6B["kv"],
        ffn=CHATGLM3_6B["ffn"],
        vocab=CHATGLM3_6B["vocab"],
        seq=CHATGLM3_6B["seq"],
    ),
    # ChatGLM-6B (v1) as released (THUDM/chatglm-6b config.json).
    "chatglm": _chatglm(hidden=4096, layers=28, heads=32, ffn=16384, vocab=130528, seq=2048),
}
# --tiny: the same architectures, small; vocabularies above the tiny tokenizers' (509 and 600 ids) so
# that the zeroed output rows are exercised too.
TINY_SHAPES = {
    "chatglm3": _chatglm3(hidden=64, layers=2, heads=4, kv_groups=2, head_dim=16, ffn=96, vocab=576, seq=512),
    "chatglm": _chatglm(hidden=64, layers=2, heads=4, ffn=128, vocab=640, seq=512),
}


# ------------------------------------------------------------------------------------------ FLOPs
def train_flops_per_example(
    shape: Shape,
    *,
    seq: int,
    labelled: int,
    trainable_matmul: int,
    grad_layers: int,
    adapter_matmul: int = 0,
    prefix: int = 0,
) -> float:
    """Model FLOPs one example of ``seq`` tokens (``labelled`` of them predicting a reply token) needs in
    one training step (2 FLOPs per multiply-add; recomputation under gradient checkpointing not counted).

    - forward: 2 x (decoder matmul weights + ``adapter_matmul``, the LoRA A/B weights) per token; the
      output layer at the labelled positions only (glmtune computes it nowhere else); causal attention
      2 x seq^2 x heads x head_dim per layer, plus 4 x seq x ``prefix`` x heads x head_dim with a P-Tuning
      prefix of that many positions;
    - backward, activation gradients: the forward again for the output layer, the adapters and the top
      ``grad_layers`` layers (the layers gradients flow through: all of them when anything in the first
      layer trains, as with LoRA or a P-Tuning prefix; only the trained ones otherwise), attention x 2;
    - backward, weight gradients: 2 x ``trainable_matmul`` per token (the matmul weights that train; the
      output layer never trains here, a P-Tuning prefix is a lookup).

    So frozen-base LoRA needs 4N + 6N_lora per token and training every decoder weight 6N.
    """
    decoder = shape.layers * shape.layer_matmul_params
    per_layer_attn = (
        2 * seq * seq * shape.heads * shape.head_dim + 4 * seq * prefix * shape.heads * shape.head_dim
    )
    head = 2 * shape.head_params * labelled
    forward = 2 * (decoder + adapter_matmul) * seq + head + shape.layers * per_layer_attn
    grads_in = (
        2 * (grad_layers * shape.layer_matmul_params + adapter_matmul) * seq
        + head
        + 2 * grad_layers * per_layer_attn
    )
    grads_w = 2 * trainable_matmul * seq
    return float(forward + grads_in + grads_w)


# ------------------------------------------------------------------------------------------ memory
class Memory:
    """Peak memory of a stage: CUDA's allocated bytes on a GPU, the process's peak RSS on the CPU.

    ``mark()`` folds the peak so far into the stage's and starts a new interval (the step timer marks the
    start of training, so the peak of loading and of training are both known)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.before = 0

    def reset(self) -> None:
        self.before = 0
        self._reset_interval()

    def _reset_interval(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def interval_peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        return _proc_status_bytes("VmHWM")

    def current(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated())
        return _proc_status_bytes("VmRSS")

    def mark(self) -> int:
        """The peak of the interval that ends now (also kept for ``stage_peak``)."""
        peak = self.interval_peak()
        self.before = max(self.before, peak)
        self._reset_interval()
        return peak

    def stage_peak(self) -> int:
        return max(self.before, self.interval_peak())


def _proc_status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------------------------------ step timer
def _step_timer_class():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Times every optimizer step (CUDA synchronised), notes memory when training starts, and stops
        training at ``deadline`` once at least one step after the warm-up is timed."""

        def __init__(self, warmup: int, deadline: float, memory: Memory):
            self.warmup = warmup
            self.deadline = deadline
            self.memory = memory
            self.ends: list[tuple[int, float]] = []  # (global step, perf_counter at its end)
            self.load_peak = self.train_start = None

        def on_train_begin(self, args, state, control, **kw):
            self.train_start = self.memory.current()
            self.load_peak = self.memory.mark()
            self.ends.append((state.global_step, _sync_time()))

        def on_step_end(self, args, state, control, **kw):
            now = _sync_time()
            self.ends.append((state.global_step, now))
            if now > self.deadline and state.global_step > self.warmup:
                control.should_training_stop = True

        def window(self) -> tuple[int, float]:
            """(steps, seconds) after the warm-up steps."""
            timed = [(s, t) for s, t in self.ends if s >= self.warmup]
            if len(timed) < 2:
                raise RuntimeError(
                    f"no step after the {self.warmup} warm-up steps was timed "
                    f"(steps done: {self.ends[-1][0] if self.ends else 0}): the stage's time budget ran out"
                )
            (s0, t0), (s1, t1) = timed[0], timed[-1]
            return s1 - s0, t1 - t0

    return StepTimer


def _sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


@contextlib.contextmanager
def timed_trainer(timer):
    """``glmtune.train.train`` with ``timer`` among its Trainer's callbacks.

    The recipe takes no extra callbacks; it builds its Trainer from
    ``glmtune.train.trainer.GlmtuneTrainer``, looked up when ``train`` runs, so a subclass that adds the
    timer stands in for it during the call (``train_stage`` checks that the timer saw the run)."""
    from glmtune.train import trainer as trainer_module

    original = trainer_module.GlmtuneTrainer

    class TimedTrainer(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(timer)

    trainer_module.GlmtuneTrainer = TimedTrainer
    try:
        yield timer
    finally:
        trainer_module.GlmtuneTrainer = original


# ------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    tiny: bool
    device: str
    dtype: torch.dtype
    batch_size: int
    seq_len: int
    warmup_steps: int
    steps: int
    full_last_layers: int
    pre_seq_len: int
    eval_examples: int
    max_new_tokens: int
    gen_batch_size: int
    serve_concurrency: int
    serve_duration: float
    serve_max_tokens: int
    budget: float
    stage_budgets: dict[str, float]
    shapes: dict[str, Shape]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


# Seconds each stage may take on one H100 (loading ~12.5 GB included), summing to about the 8 minutes
# the whole run must fit in with the checkpoint written; the training steps stop at 70 % of the budget.
GPU_BUDGETS = {
    "lora": 55,
    "qlora": 70,
    "ptuning_v2": 55,
    "full_last_layers": 75,
    "eval": 40,
    "predict": 30,
    "serve": 60,
    "v1_lora": 90,
}


def settings_for(args) -> Settings:
    if args.tiny:
        return Settings(
            tiny=True,
            device="cpu",
            dtype=getattr(torch, args.dtype or "float32"),
            batch_size=args.batch_size or 2,
            seq_len=args.seq_len or 64,
            warmup_steps=1 if args.warmup_steps is None else args.warmup_steps,
            steps=args.steps or 2,
            full_last_layers=args.full_last_layers or 1,
            pre_seq_len=128,
            eval_examples=4,
            max_new_tokens=8,
            gen_batch_size=2,
            serve_concurrency=4,
            serve_duration=2.0,
            serve_max_tokens=8,
            budget=args.budget or 900,
            stage_budgets={k: 240 for k in GPU_BUDGETS},
            shapes=TINY_SHAPES,
        )
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; run with --tiny for the CPU version")
    return Settings(
        tiny=False,
        device="cuda",
        dtype=getattr(torch, args.dtype or "bfloat16"),
        batch_size=args.batch_size or 4,
        seq_len=args.seq_len or 512,
        warmup_steps=3 if args.warmup_steps is None else args.warmup_steps,
        steps=args.steps or 10,
        full_last_layers=args.full_last_layers or 4,
        pre_seq_len=128,
        eval_examples=32,
        max_new_tokens=64,
        gen_batch_size=8,
        serve_concurrency=16,
        serve_duration=15.0,
        serve_max_tokens=32,
        budget=args.budget or 480,
        stage_budgets=dict(GPU_BUDGETS),
        shapes=SHAPES,
    )


# ------------------------------------------------------------------------------------------ context
class StageSkipped(Exception):
    """The stage cannot run here (reported as "skipped: <reason>", not as a failure)."""


@dataclass
class Context:
    settings: Settings
    work: Path
    memory: Memory
    peak_flops: float
    log: Callable[[str], None] = print
    checkpoints: dict[str, Path] = field(default_factory=dict)
    checkpoint_errors: dict[str, str] = field(default_factory=dict)
    data: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, Path] = field(default_factory=dict)
    setup: list[dict] = field(default_factory=list)
    keep: bool = False  # keep what the stages write (else the full stage's ~12.5 GB final/ goes at once)

    def checkpoint(self, generation: str) -> Path:
        """The random checkpoint of ``generation`` in this run's shape, built on first use."""
        if generation in self.checkpoint_errors:
            raise RuntimeError(
                f"the {generation} checkpoint could not be built: {self.checkpoint_errors[generation]}"
            )
        if generation not in self.checkpoints:
            t = time.perf_counter()
            shape = self.settings.shapes[generation]
            try:
                path, nbytes = build_checkpoint(
                    self.work / f"{generation}-random",
                    shape,
                    self.settings.device,
                    self.settings.dtype,
                    self.work,
                )
            except Exception as e:
                self.checkpoint_errors[generation] = f"{type(e).__name__}: {e}"
                self.log("".join(traceback.format_exception(type(e), e, e.__traceback__)))
                raise
            seconds = time.perf_counter() - t
            self.checkpoints[generation] = path
            self.setup.append({"what": f"{generation} checkpoint", "seconds": seconds, "bytes": nbytes})
            self.log(
                f"setup: {generation} checkpoint ({nbytes / GIB:.2f} GiB of weights) written in {seconds:.1f} s"
            )
        return self.checkpoints[generation]

    def run_of(self, stage: str) -> Path:
        if stage not in self.runs:
            raise RuntimeError(
                f"needs the {stage} stage's run folder, and the {stage} stage did not complete"
            )
        return self.runs[stage]


# ------------------------------------------------------------------------------------------ checkpoint
def _build_model(generation: str, official: dict, device: str, dtype: torch.dtype):
    """glmtune's own model class for an official config dict, built directly on ``device`` in ``dtype``."""
    cls, config = _LAYOUTS[_loader(generation)][1](official)
    with torch.device(device):
        return cls._from_config(config, dtype=dtype)


def build_checkpoint(
    out: Path, shape: Shape, device: str, dtype: torch.dtype, work: Path
) -> tuple[Path, int]:
    """A random ``shape`` checkpoint in the official layout of its generation; returns (folder, weight bytes).

    The tokenizer and the special token ids come from glmtune's tiny model of the generation; the sizes
    from ``shape``. Weights: normal(0, 0.02), norms 1, made on ``device``; output rows past the tokenizer
    zeroed (greedy decoding picks a decodable id: the other logits are random, their maximum is > 0).
    """
    import glmtune
    from glmtune.official_format import _WRITERS
    from glmtune.testing import make_tiny_model

    tiny = make_tiny_model(work / f"tokenizer-{shape.generation}", shape.generation)
    tokenizer = glmtune.load_tokenizer(tiny)
    official = json.loads((tiny / "config.json").read_text(encoding="utf-8"))
    official.update(shape.official_overrides())
    model = _build_model(shape.generation, official, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        model.get_output_embeddings().weight[len(tokenizer) :] = 0
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # The layout writer of glmtune.official_format.save_official, without its atomic folder: that fsyncs
    # every file, and for ~12.5 GB the disk would set the pace; a scratch checkpoint needs no crash safety.
    _WRITERS[_loader(shape.generation)](model, out, shape.generation, True, 2 << 30)
    tokenizer.save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.update(_name_or_path=f"{shape.generation}-random", torch_dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    del model
    _free()
    return out, nbytes


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ data
def _text(rng: random.Random, chars: int) -> str:
    from glmtune.testing import CORPUS

    words = "".join(CORPUS)
    return "".join(rng.choice(words) for _ in range(chars))


def prepare_data(ctx: Context, generation: str) -> dict:
    """Training rows that encode to exactly ``seq_len`` tokens with the generation's template (about half of
    them reply tokens), and shorter eval rows; written once per generation."""
    if generation in ctx.data:
        return ctx.data[generation]
    import glmtune
    from glmtune.data import read_examples
    from glmtune.data.encode import EncodeSettings, encode_all

    s = ctx.settings
    resolved = glmtune.resolve_model(ctx.checkpoint(generation))
    tokenizer, template = glmtune.load_tokenizer(resolved), resolved.spec.template
    rng = random.Random(0)
    folder = ctx.work / f"data-{generation}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"context": _text(rng, 4 * s.seq_len), "target": _text(rng, 4 * s.seq_len)} for _ in range(32)]
    train_file = folder / "train.jsonl"
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    examples = read_examples(train_file).examples

    def lengths(source: int, target: int) -> tuple[set[int], set[int]]:
        encoded, _ = encode_all(
            tokenizer, template, examples, EncodeSettings(max_source_length=source, max_target_length=target)
        )
        return {len(e.input_ids) for e in encoded}, {sum(t != -100 for t in e.labels) for e in encoded}

    # The template's own tokens (role markers, [gMASK], eos) come on top of the two limits: measure them.
    target = s.seq_len // 2
    total, _ = lengths(target, target)
    source = s.seq_len - target - (max(total) - 2 * target)
    total, labelled = lengths(source, target)
    if total != {s.seq_len} or len(labelled) != 1:
        raise RuntimeError(
            f"{train_file}: rows encode to {sorted(total)} tokens ({sorted(labelled)} labelled), "
            f"not all exactly {s.seq_len}"
        )
    eval_rows = [{"context": _text(rng, 48), "target": _text(rng, 24)} for _ in range(s.eval_examples)]
    eval_file = folder / "eval.jsonl"
    eval_file.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in eval_rows), encoding="utf-8"
    )
    ctx.data[generation] = {
        "train": train_file,
        "eval": eval_file,
        "source": source,
        "target": target,
        "labelled": labelled.pop(),
    }
    return ctx.data[generation]


# ------------------------------------------------------------------------------------------ stages
@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context, float], dict]  # (context, deadline) -> results
    goals: tuple[tuple[str, str, float], ...] = ()  # (metric, "<=" or ">=", value): mfu, peak_memory_bytes
    description: str = ""


def train_stage(
    ctx: Context,
    deadline: float,
    *,
    name: str,
    generation: str,
    method: str,
    quantization: str = "none",
    gradient_checkpointing: bool = False,
) -> dict:
    """One ``glmtune.train.train`` run; tokens/s and MFU over the timed steps."""
    from glmtune.config import load_config
    from glmtune.errors import ConfigError
    from glmtune.train import train

    s = ctx.settings
    shape = s.shapes[generation]
    model_dir = ctx.checkpoint(generation)
    data = prepare_data(ctx, generation)
    out = ctx.work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    steps = s.warmup_steps + s.steps
    method_cfg: dict = {"name": method}
    if method == "ptuning_v2":
        method_cfg["pre_seq_len"] = s.pre_seq_len
    if method == "full":
        method_cfg["freeze_layers_except_last"] = s.full_last_layers
    # Full fine-tuning trains the loaded weights: glmtune loads them in float32 for it (its model.dtype
    # auto), the bf16 autocast of train.precision doing the matmuls; adapters train over bf16 weights.
    dtype = "float32" if method == "full" else s.dtype_name
    raw = {
        "model": {
            "path": str(model_dir),
            "generation": generation,
            "dtype": dtype,
            "quantization": quantization,
        },
        "data": {
            "train_file": str(data["train"]),
            "max_source_length": data["source"],
            "max_target_length": data["target"],
            "cache_dir": str(ctx.work / "cache"),
        },
        "method": method_cfg,
        "train": {
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": s.batch_size,
            "learning_rate": 1e-5 if method == "full" else 1e-4,
            "precision": s.precision,
            "gradient_checkpointing": gradient_checkpointing,
            "logging_steps": steps,
            "save_steps": 100_000,  # only final/: a mid-run checkpoint would land inside the timed steps
            "report_to": [],
            "seed": 0,
        },
    }
    cfg = load_config(raw)
    # Training stops at 70 % of the stage's time left: the final save (a whole model for full) follows.
    train_deadline = time.perf_counter() + 0.7 * max(deadline - time.perf_counter(), 0.0)
    timer = _step_timer_class()(s.warmup_steps, train_deadline, ctx.memory)

    def printer(*parts, **_):  # the recipe's printer is called like print()
        ctx.log(f"  [{name}] " + " ".join(map(str, parts)))

    try:
        with timed_trainer(timer):
            summary = train(cfg, printer=printer)
    except (ConfigError, NotImplementedError, RuntimeError) as e:
        # QLoRA on the CPU: bitsandbytes' k-bit layers may not run here (yet); elsewhere a real failure.
        if quantization != "none" and s.device == "cpu" and _not_supported(e):
            raise StageSkipped(f"{type(e).__name__}: {e}") from None
        raise
    if timer.train_start is None:
        raise RuntimeError(
            "the step timer saw no training: glmtune.train.train no longer builds its Trainer from "
            "glmtune.train.trainer.GlmtuneTrainer (update timed_trainer)"
        )
    timed_steps, seconds = timer.window()
    examples = timed_steps * s.batch_size
    adapter = summary["trainable_parameters"] if method == "lora" else 0
    trainable = {"lora": adapter, "full": s.full_last_layers * shape.layer_matmul_params}.get(method, 0)
    per_example = train_flops_per_example(
        shape,
        seq=s.seq_len,
        labelled=data["labelled"],
        trainable_matmul=trainable,
        grad_layers=s.full_last_layers if method == "full" else shape.layers,
        adapter_matmul=adapter,
        prefix=s.pre_seq_len if method == "ptuning_v2" else 0,
    )
    train_peak = ctx.memory.interval_peak()
    ctx.runs[name] = out
    if method == "full" and not ctx.keep:
        shutil.rmtree(out / "final", ignore_errors=True)  # a whole model; no later stage reads it
    return {
        "tokens_per_s": examples * s.seq_len / seconds,
        "mfu": per_example * examples / seconds / ctx.peak_flops,
        "timed_steps": timed_steps,
        "step_seconds": seconds / timed_steps,
        "labelled_tokens": data["labelled"],
        "flops_per_example": per_example,
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "train_loss": summary["train_loss"],
        "load_peak_bytes": timer.load_peak,
        "train_start_bytes": timer.train_start,
        "train_peak_bytes": train_peak,
        "notes": (
            f"{dtype} weights, {s.precision}; "
            f"{timed_steps} timed steps of {s.batch_size} x {s.seq_len} tokens, {seconds / timed_steps:.3f} s/step; "
            f"{summary['trainable_parameters']:,} trainable; memory: loading {timer.load_peak / GIB:.2f} GiB, "
            f"at train start {timer.train_start / GIB:.2f} GiB, training {train_peak / GIB:.2f} GiB"
        ),
    }


def _not_supported(error: BaseException) -> bool:
    text = str(error).lower()
    return any(k in text for k in ("cuda", "gpu", "not supported", "not implemented", "bitsandbytes"))


class _CountingGenerate:
    """Wraps ``Engine.generate`` to count the tokens it generates (the Completions carry their ids)."""

    def __init__(self, engine):
        self.inner = engine.generate
        self.tokens = 0
        engine.generate = self

    def __call__(self, *args, **kwargs):
        completions = self.inner(*args, **kwargs)
        self.tokens += sum(len(c.token_ids) for c in completions)
        return completions


def _load_lora_engine(ctx: Context):
    """The LoRA run as ``glmtune eval RUN`` / ``glmtune predict --model RUN`` load it (base + final/)."""
    from glmtune.inference import Engine
    from glmtune.runs import resolve_model_or_run

    t = time.perf_counter()
    engine = Engine.load(resolve_model_or_run(ctx.run_of("lora")))
    return engine, time.perf_counter() - t


def eval_stage(ctx: Context, deadline: float) -> dict:
    """``glmtune eval``'s report (generation, ROUGE/BLEU, task metrics, eval loss) of the LoRA run."""
    from glmtune.data import read_examples
    from glmtune.evaluate import full_report
    from glmtune.inference import GenerationSettings

    s = ctx.settings
    examples = read_examples(prepare_data(ctx, "chatglm3")["eval"]).examples
    engine, load_s = _load_lora_engine(ctx)
    counter = _CountingGenerate(engine)
    t = _sync_time()
    report, _ = full_report(
        engine, examples, GenerationSettings(max_new_tokens=s.max_new_tokens), s.gen_batch_size
    )
    seconds = _sync_time() - t
    if counter.tokens == 0:
        raise RuntimeError("eval generated no token")
    loss = report["loss"]
    return {
        "tokens_per_s": counter.tokens / seconds,
        "generated_tokens": counter.tokens,
        "eval_loss": loss["eval_loss"],
        "notes": (
            f"{len(examples)} examples, batch {s.gen_batch_size}, {counter.tokens} tokens generated (greedy, at "
            f"most {s.max_new_tokens} each) + eval loss over {loss['target_tokens']} tokens in {seconds:.1f} s; "
            f"load {load_s:.1f} s"
        ),
    }


def predict_stage(ctx: Context, deadline: float) -> dict:
    """``glmtune predict`` (resumable JSONL writer, batched generation) with the LoRA run."""
    from glmtune.data import read_examples
    from glmtune.evaluate import predict_file
    from glmtune.inference import GenerationSettings

    s = ctx.settings
    examples = read_examples(prepare_data(ctx, "chatglm3")["eval"], require_reply=False).examples
    engine, load_s = _load_lora_engine(ctx)
    counter = _CountingGenerate(engine)
    out = ctx.work / "predict" / "predictions.jsonl"
    out.unlink(missing_ok=True)
    t = _sync_time()
    result = predict_file(
        engine,
        examples,
        out,
        GenerationSettings(max_new_tokens=s.max_new_tokens),
        s.gen_batch_size,
        progress=False,
    )
    seconds = _sync_time() - t
    if result["rows"] != len(examples) or counter.tokens == 0:
        raise RuntimeError(
            f"predict wrote {result['rows']} rows for {len(examples)} examples, {counter.tokens} tokens"
        )
    return {
        "tokens_per_s": counter.tokens / seconds,
        "generated_tokens": counter.tokens,
        "notes": (
            f"{len(examples)} prompts, batch {s.gen_batch_size}, {counter.tokens} tokens in {seconds:.1f} s; "
            f"load {load_s:.1f} s"
        ),
    }


class _ChildMemory:
    """Samples the memory of this process's children (the ``glmtune serve`` process) every 0.2 s:
    on a GPU the device's used memory above what it was at the start, on the CPU their summed RSS."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak = 0
        self.base = self._device_used() if cuda else 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _device_used(self) -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _sample(self) -> int:
        if self.cuda:
            return self._device_used() - self.base
        import psutil

        total = 0
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, self._sample())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def serve_stage(ctx: Context, deadline: float) -> dict:
    """``glmtune serve RUN`` (a child process) under concurrent streaming requests: ``serve_load.run_once``."""
    import serve_load

    s = ctx.settings
    args = argparse.Namespace(
        endpoint="completions",
        concurrency=s.serve_concurrency,
        duration=s.serve_duration,
        max_tokens=s.serve_max_tokens,
        server_threads=1 if s.tiny else 0,  # 0: torch's default threads (the GPU machine's own cores)
    )
    with _ChildMemory(s.device == "cuda") as memory:
        r = serve_load.run_once(ctx.run_of("lora"), 8, args)
    if r["lost"]:
        raise RuntimeError(f"{r['lost']} of {r['requests']} requests lost: {r['lost_examples']}")
    if r["completion_tokens"] == 0:
        raise RuntimeError(f"{r['requests']} requests, no completion token")
    what = "GPU memory of the server process (device used - before)" if s.device == "cuda" else "server RSS"
    return {
        "tokens_per_s": r["tokens_per_s"],
        "peak_memory_bytes": memory.peak,
        "requests_per_s": r["requests_per_s"],
        "notes": (
            f"max batch 8, {s.serve_concurrency} concurrent streams for {s.serve_duration:g} s, {r['requests']} "
            f"requests, {r['requests_per_s']:.2f} req/s, latency p50 {r['latency_p50']:.2f} s, first token p50 "
            f"{r['ttft_p50']:.2f} s, mean batch {r['mean_batch']:.1f}; peak memory: {what}"
        ),
    }


def v1_lora_stage(ctx: Context, deadline: float) -> dict:
    t = time.perf_counter()
    ctx.checkpoint("chatglm")
    built = time.perf_counter() - t
    result = train_stage(ctx, deadline, name="v1_lora", generation="chatglm", method="lora")
    result["notes"] = f"checkpoint built in {built:.1f} s; " + result["notes"]
    return result


def _train(name: str, **kw) -> Callable[[Context, float], dict]:
    return lambda ctx, deadline: train_stage(ctx, deadline, name=name, **kw)


STAGES: tuple[Stage, ...] = (
    Stage(
        "lora",
        _train("lora", generation="chatglm3", method="lora"),
        (("mfu", ">=", 0.40), ("peak_memory_bytes", "<=", 16 * GIB)),
        "LoRA (glmtune's default targets q/k/v, r 8)",
    ),
    Stage(
        "qlora",
        _train(
            "qlora", generation="chatglm3", method="lora", quantization="4bit", gradient_checkpointing=True
        ),
        (("peak_memory_bytes", "<=", 6 * GIB),),
        "QLoRA: 4-bit NF4 base, gradient checkpointing",
    ),
    Stage(
        "ptuning_v2",
        _train("ptuning_v2", generation="chatglm3", method="ptuning_v2"),
        (("peak_memory_bytes", "<=", 18 * GIB),),
        "P-Tuning v2 (pre_seq_len 128)",
    ),
    Stage(
        "full_last_layers",
        _train("full_last_layers", generation="chatglm3", method="full"),
        (),
        "full fine-tuning of the last layers",
    ),
    Stage("eval", eval_stage, (), "eval of the LoRA run"),
    Stage("predict", predict_stage, (), "predict with the LoRA run"),
    Stage("serve", serve_stage, (), "glmtune serve of the LoRA run"),
    Stage("v1_lora", v1_lora_stage, (), "LoRA on ChatGLM-6B (v1)"),
)
TRAINING = {"lora", "qlora", "ptuning_v2", "full_last_layers", "v1_lora"}


# ------------------------------------------------------------------------------------------ goals
def _fmt_goal(metric: str, op: str, value: float) -> str:
    sign = "≥" if op == ">=" else "≤"
    if metric == "mfu":
        return f"MFU {sign} {100 * value:.0f} %"
    return f"peak {sign} {value / GIB:g} GiB"


def judge(row: dict, goals, judged: bool) -> tuple[str, str]:
    """(goal text, "pass" / "miss: by how much" / "n/a") of a row."""
    text = "; ".join(_fmt_goal(*g) for g in goals) or "reported"
    if not goals:
        return text, "–"
    if not judged:
        return text, "n/a (--tiny)"
    if row["status"] != "ok":
        return text, "–"
    misses = []
    for metric, op, value in goals:
        got = row.get(metric)
        if got is None:
            misses.append(f"{metric} not measured")
            continue
        ok = got >= value if op == ">=" else got <= value
        if ok:
            continue
        if metric == "mfu":
            misses.append(f"MFU {100 * got:.1f} %, {100 * (value - got):.1f} points short")
        else:
            misses.append(
                f"peak {got / GIB:.2f} GiB, {(got - value) / GIB:.2f} GiB over (+{100 * (got / value - 1):.0f} %)"
            )
    return text, "pass" if not misses else "miss: " + "; ".join(misses)


# ------------------------------------------------------------------------------------------ runner
def run_stages(
    stages,
    ctx: Context,
    *,
    judged: bool,
    budget: float,
    stage_budgets: dict[str, float],
    start: float | None = None,
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Run each stage in its own try with its time budget; a stage that raises gives a "failed" row and the
    next one runs; once ``budget`` seconds have passed since ``start`` (a ``perf_counter`` time, default
    now) the rest are "skipped". ``on_row(rows so far)`` after each stage."""
    start = time.perf_counter() if start is None else start
    rows = []
    for stage in stages:
        row: dict = {"stage": stage.name, "description": stage.description}
        left = budget - (time.perf_counter() - start)
        if left <= 0:
            row.update(status=f"skipped: the {budget:.0f} s budget was spent", seconds=0.0)
        else:
            ctx.log(
                f"stage {stage.name}: {stage.description} (budget {min(stage_budgets.get(stage.name, left), left):.0f} s)"
            )
            deadline = time.perf_counter() + min(stage_budgets.get(stage.name, left), left)
            ctx.memory.reset()
            t = time.perf_counter()
            try:
                result = stage.run(ctx, deadline)
                row["status"] = "ok"
            except StageSkipped as e:
                result, row["status"] = {}, f"skipped: {e}"
            except Exception as e:  # noqa: BLE001  (any failure is this stage's result; the next runs)
                result, row["status"] = {}, f"failed: {type(e).__name__}: {e}"
                ctx.log("".join(traceback.format_exception(type(e), e, e.__traceback__)))
            row["seconds"] = time.perf_counter() - t
            peak = result.pop("peak_memory_bytes", None)
            row["peak_memory_bytes"] = peak if peak is not None else ctx.memory.stage_peak()
            row.update(result)
            del result
            _free()
            leftover = ctx.memory.current() if ctx.memory.cuda else 0
            if leftover > 256 * 2**20:
                row["notes"] = (
                    row.get("notes", "") + f"; {leftover / GIB:.2f} GiB still allocated after it"
                ).lstrip("; ")
        row["goal"], row["result"] = judge(row, stage.goals, judged)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        ctx.log(
            f"stage {stage.name}: {row['status']} in {row['seconds']:.1f} s ({time.perf_counter() - start:.0f} s so far)"
        )
    return rows


def _num(value, fmt: str) -> str:
    return (
        "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else fmt.format(value)
    )


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"GPU check — device: **{meta['device']}**; {meta['torch']}; {meta['dtype']}; peak "
        f"{meta['peak_flops'] / 1e12:.3g} TFLOP/s ({meta['peak_source']}); {meta['date']}; whole run "
        f"{meta['elapsed_s']:.0f} s (budget {meta['budget_s']:.0f} s).",
        "",
        "| stage | status | tokens/s | MFU | peak memory | goal | result | seconds | notes |",
        "|---|---|---:|---:|---:|---|---|---:|---|",
    ]
    for r in rows:
        mfu = r.get("mfu")
        cells = [
            r["stage"],
            r["status"].replace("|", "\\|"),
            _num(r.get("tokens_per_s"), "{:,.0f}" if (r.get("tokens_per_s") or 0) >= 100 else "{:.2f}"),
            _num(None if mfu is None else 100 * mfu, "{:.1f} %"),
            _num(None if r.get("peak_memory_bytes") is None else r["peak_memory_bytes"] / GIB, "{:.2f} GiB"),
            r["goal"],
            r["result"],
            _num(r.get("seconds"), "{:.1f}"),
            r.get("notes", "").replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    setup = [
        f"{s['what']} ({s['bytes'] / GIB:.2f} GiB of weights) in {s['seconds']:.1f} s" for s in meta["setup"]
    ]
    if setup:
        lines += ["", "Checkpoints written: " + "; ".join(setup) + "."]
    return "\n".join(lines) + "\n"


def measure_peak(device: str, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best matmul rate (FLOP/s) of square products on the device: the CPU's MFU reference in --tiny, and
    a reachable-peak figure beside the data-sheet one on a GPU."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    torch.mm(a, b)
    while time.perf_counter() < end:
        t = _sync_time()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (_sync_time() - t))
    return best


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def scratch_root(tiny: bool) -> str | None:
    """The parent of the scratch folder: /dev/shm (memory) on the GPU machine when it has room for the
    6B checkpoint and the full stage's float32 final/ (~35 GiB at once; 128 GiB of RAM there), so that
    writing them (the recipe fsyncs final/) does not wait on the disk; else the system's temporary folder."""
    if tiny:
        return None
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 48 * GIB:
            return str(shm)
    return None


def write_out(path: Path, meta: dict, rows: list[dict], table: str) -> None:
    from glmtune.atomic import write_json, write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        write_json(path, {**meta, "rows": rows, "markdown": table}, indent=2, ensure_ascii=False)
    else:
        write_text(path, table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the same stages on the CPU with tiny models (tests)")
    p.add_argument("--out", type=Path, help="write the table here (.json: rows + table; else Markdown)")
    p.add_argument(
        "--stages", help=f"comma-separated subset of {','.join(s.name for s in STAGES)} (default all)"
    )
    p.add_argument(
        "--peak-tflops", type=float, help="peak FLOP/s of the device in TFLOP/s for MFU (default: table)"
    )
    p.add_argument("--budget", type=float, help="seconds for all stages (default 480; --tiny 900)")
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the scratch folder is made (default: /dev/shm on a GPU machine with room, else the "
        "temporary folder); the scratch folder is removed at the end",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (checkpoints, runs, data)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="weights dtype (default bf16; --tiny float32)"
    )
    p.add_argument("--batch-size", type=int, help="training batch (default 4; --tiny 2)")
    p.add_argument("--seq-len", type=int, help="tokens per training example (default 512; --tiny 64)")
    p.add_argument("--steps", type=int, help="timed training steps (default 10; --tiny 2)")
    p.add_argument("--warmup-steps", type=int, help="untimed first steps (default 3; --tiny 1)")
    p.add_argument(
        "--full-last-layers", type=int, help="layers full_last_layers trains (default 4; --tiny 1)"
    )
    args = p.parse_args(argv)

    s = settings_for(args)
    stages = STAGES
    if args.stages:
        names = [n.strip() for n in args.stages.split(",") if n.strip()]
        known = {st.name: st for st in STAGES}
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"--stages: unknown {', '.join(unknown)} (known: {', '.join(known)})")
        stages = tuple(known[n] for n in names)
    if s.tiny:
        torch.set_num_threads(min(2, os.cpu_count() or 1))

    t0 = time.perf_counter()  # the budget counts from here: setup included
    name = device_name(s.device)
    measured = measure_peak(s.device, s.dtype if s.device == "cuda" else torch.float32)
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    elif s.device == "cuda" and peak_bf16_tflops(name):
        peak, source = peak_bf16_tflops(name) * 1e12, "dense bf16 data-sheet peak"
    elif s.device == "cuda":
        peak, source = (
            measured,
            f"measured {s.dtype_name} matmul (device not in the peak table: pass --peak-tflops)",
        )
    else:
        peak, source = measured, "measured float32 matmul rate of this CPU"
    cuda_version = f", CUDA {torch.version.cuda}" if s.device == "cuda" else ""
    print(
        f"gpu_check: {name}; peak {peak / 1e12:.3g} TFLOP/s ({source}); matmul measured {measured / 1e12:.3g} TFLOP/s"
    )

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    parent = str(args.workdir) if args.workdir else scratch_root(s.tiny)
    work = Path(tempfile.mkdtemp(prefix="glmtune-gpu-check-", dir=parent))
    print(f"gpu_check: scratch folder {work}")
    ctx = Context(
        settings=s,
        work=work,
        memory=Memory(s.device == "cuda"),
        peak_flops=peak,
        log=lambda m: print(m, flush=True),
        keep=args.keep,
    )

    def report(rows: list[dict], complete: bool) -> tuple[dict, str]:
        meta = {
            "device": name,
            "mode": "tiny (CPU)" if s.tiny else "gpu",
            "complete": complete,
            "torch": f"torch {torch.__version__}{cuda_version}",
            "dtype": s.dtype_name,
            "peak_flops": peak,
            "peak_source": source,
            "measured_matmul_flops": measured,
            "date": time.strftime("%Y-%m-%d"),
            "elapsed_s": time.perf_counter() - t0,
            "budget_s": s.budget,
            "workload": {
                "shapes": {k: vars(v) for k, v in s.shapes.items()},
                "batch_size": s.batch_size,
                "seq_len": s.seq_len,
                "warmup_steps": s.warmup_steps,
                "steps": s.steps,
                "full_last_layers": s.full_last_layers,
                "pre_seq_len": s.pre_seq_len,
            },
            "setup": ctx.setup
            + [{"what": f"{g} checkpoint", "error": e} for g, e in ctx.checkpoint_errors.items()],
        }
        table = markdown({**meta, "setup": ctx.setup}, rows)
        if args.out:
            write_out(args.out, meta, rows, table)
        return meta, table

    try:
        if any(st.name != "v1_lora" for st in stages):
            with contextlib.suppress(Exception):  # a failure is kept and reported by each stage that needs it
                ctx.checkpoint("chatglm3")
        rows = run_stages(
            stages,
            ctx,
            judged=not s.tiny,
            budget=s.budget,
            stage_budgets=s.stage_budgets,
            start=t0,
            on_row=lambda rows: report(rows, complete=False),
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    _, table = report(rows, complete=True)
    print(table)
    if args.out:
        print(f"written: {args.out}")
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

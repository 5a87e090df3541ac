"""The typed configuration of ``glmtune train CONFIG.yaml [key.sub=value ...]``.

A run is described by five small groups of settings, each a stdlib dataclass whose fields carry their
documentation in ``field(metadata={"help": ...})``: :class:`ModelConfig` (``model:``),
:class:`DataConfig` (``data:``), :class:`MethodConfig` (``method:``), :class:`TrainConfig`
(``train:``) and :class:`EvalConfig` (``eval:``), gathered in :class:`RunConfig`. The same docs become
``glmtune train --help-config`` (:func:`config_help`) and the comments of the shipped example configs
(:func:`render_example_config`, driven by ``configs/generate.py``).

:func:`load_config` reads a YAML file (or a dict), applies dotted ``key.sub=value`` overrides, checks
and converts every value by its field's annotation, and runs :meth:`RunConfig.validate`. Every problem
is a :class:`~glmtune.errors.ConfigError` that names the file or override, the key path, the value and
what was expected; unknown keys list the valid ones and suggest the closest. :func:`save_config` writes
the resolved config (atomically) so that ``load_config`` of that file gives an equal config.

Relative paths in a config (model, data, output, DeepSpeed json) are relative to the working directory
``glmtune train`` runs in, not to the config file, with one fallback: a relative ``data.train_file`` or
``data.eval_file`` that is not there but lies beside the config file is read from beside it (so a config
ships with its data: the demo's, inside the package). :data:`BESIDE_CONFIG_RULE` says so in
``--help-config``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .atomic import write_text
from .data.readers import FORMAT_ALIASES, FORMATS
from .errors import ConfigError
from .metrics import ROUGE_BLEU_KEYS, TASK_METRIC_NAMES
from .specs import REGISTRY

__all__ = [
    "CONFIG_FILENAME",
    "DATA_FORMATS",
    "GROUPS",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_help",
    "load_config",
    "parse_override",
    "render_example_config",
    "save_config",
    "to_dict",
]

#: File name of the resolved config saved beside every checkpoint; ``load_config(folder)`` reads it.
CONFIG_FILENAME = "glmtune_config.yaml"

# The ModelSpec registry names (glmtune.specs.REGISTRY).
Generation = Literal[tuple(REGISTRY)]
DType = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["none", "8bit", "4bit"]
# The formats and their aliases are the readers' (glmtune.data.readers), listed once there.
DataFormat = Literal[("auto", *FORMATS)]
MethodName = Literal["lora", "ptuning_v2", "full"]
Precision = Literal["fp32", "fp16", "bf16"]
# transformers' SchedulerType values.
LRScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]

#: The data formats ``data.format`` names besides ``auto`` (:data:`glmtune.data.readers.FORMATS`).
DATA_FORMATS: tuple[str, ...] = FORMATS

# Logical column names the data readers know (glmtune.data.readers), for data.columns.
_DATA_COLUMNS = (
    "context",
    "target",
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "prompt",
    "response",
    "conversations",
    "messages",
    "tools",
)


# ---------------------------------------------------------------------------------------------------
# Field checks (run on every non-null value after conversion; return a problem or None)


def _at_least(low: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v >= low else f"must be >= {low}"

    return check


def _above(low: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v > low else f"must be > {low}"

    return check


def _fraction(*, closed_right: bool) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = 0.0 <= v <= 1.0 if closed_right else 0.0 <= v < 1.0
        return None if ok else f"must be in [0, 1{']' if closed_right else ')'}"

    return check


def _not_empty(v: Any) -> str | None:
    return None if len(v) else "must not be empty (leave it out or set null for the default)"


def _max_steps(v: int) -> str | None:
    return None if v == -1 or v > 0 else "must be -1 (train for train.epochs) or a positive number of steps"


def _resume(v: int | str) -> str | None:
    if isinstance(v, int) and v <= 0:
        return "must be 'latest', a positive step number or a checkpoint path"
    if isinstance(v, str) and not v.strip():
        return "must be 'latest', a positive step number or a checkpoint path"
    return None


def _columns(v: dict[str, str | None]) -> str | None:
    for key, value in v.items():
        if key not in _DATA_COLUMNS:
            close = difflib.get_close_matches(key, _DATA_COLUMNS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"unknown column {key!r} (known: {', '.join(_DATA_COLUMNS)}){hint}"
        if value is not None and not value:
            return f"column {key!r} must name a key (a non-empty string) or be null"
    return None


def _norm_columns(v: dict[str, str | None]) -> dict[str, str | None]:
    # ChatGLM2's P-Tuning scripts spell them prompt_column / response_column / history_column.
    return {(k[: -len("_column")] if k.endswith("_column") else k): x for k, x in v.items()}


#: What eval.best_metric can name before the data is known: the eval loss, ROUGE/BLEU and every task
#: metric (the recipe narrows the task metrics to those of the eval data).
BEST_METRICS = ("eval_loss", *ROUGE_BLEU_KEYS, *TASK_METRIC_NAMES)


def _norm_best_metric(v: str) -> str:
    # As logged ("eval_rouge-l") or as named in reports ("rouge-l"); "loss" is the eval loss.
    v = v.strip().lower()
    if v in ("loss", "eval_loss"):
        return "eval_loss"
    return v.removeprefix("eval_")


def _best_metric(v: str) -> str | None:
    if v in BEST_METRICS:
        return None
    close = difflib.get_close_matches(v, BEST_METRICS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"not a metric glmtune logs; choices: {', '.join(BEST_METRICS)}{hint}"


def _opt(
    default: Any = MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    aliases: Mapping[str, Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    normalize: Callable[[Any], Any] | None = None,
) -> Any:
    """A config field: ``help`` is its documentation; ``aliases`` map other spellings (compared
    lower-cased) to the canonical value; ``check`` returns a problem with a converted value or None."""
    metadata: dict[str, Any] = {"help": help}
    if aliases:
        metadata["aliases"] = dict(aliases)
    if check:
        metadata["check"] = check
    if normalize:
        metadata["normalize"] = normalize
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------------
# The groups


@dataclass(kw_only=True)
class ModelConfig:
    """The model to fine-tune and how to load it."""

    path: str = _opt(
        help='Model folder (Hugging Face layout or an official ChatGLM checkpoint), a .gguf file, or "default" '
        "for the embedded SmolLM2-135M-Instruct."
    )
    generation: Generation | None = _opt(
        None,
        help="Model generation (chatglm, chatglm2, chatglm3, glm4, hf); null = detected from the model's files. "
        "Set it only when detection gets it wrong.",
    )
    dtype: DType = _opt(
        "float32",
        help="Dtype the base weights are loaded in: float32, bfloat16 or float16 (adapters and prefix encoders "
        "stay float32). With quantization it is the compute dtype.",
        aliases={
            "fp32": "float32",
            "float": "float32",
            "bf16": "bfloat16",
            "fp16": "float16",
            "half": "float16",
        },
    )
    trust_remote_code: bool = _opt(
        False,
        help="Allow the model folder's own Python code to run. glmtune loads the ChatGLM family without it; "
        "only a folder nothing else can read needs it.",
    )
    adapter: str | None = _opt(
        None,
        help="Continue from an existing LoRA folder (peft) or P-Tuning v2 checkpoint instead of a fresh one.",
    )
    quantization: Quantization = _opt(
        "none",
        help="Load the base weights quantized with bitsandbytes: none, 8bit, or 4bit (NF4 with double "
        "quantization: QLoRA when method.name is lora). Needs a CUDA GPU.",
        aliases={
            "none": "none",
            "false": "none",
            "no": "none",
            "off": "none",
            "4": "4bit",
            "nf4": "4bit",
            "int4": "4bit",
            "8": "8bit",
            "int8": "8bit",
        },
    )


@dataclass(kw_only=True)
class DataConfig:
    """The training data and how examples are cut to length."""

    train_file: str = _opt(help="Training data: a .jsonl file (one JSON object a line) or a .json array.")
    eval_file: str | None = _opt(
        None,
        help="Evaluation data in the same format; null = none, or a split of train_file (data.eval_ratio).",
    )
    format: DataFormat = _opt(
        "auto",
        help="Row format: auto (detected from the first row's keys), context_target, alpaca, prompt_response, "
        "conversations (ChatGLM3), sharegpt or messages (OpenAI).",
        aliases=FORMAT_ALIASES,
    )
    columns: dict[str, str | None] = _opt(
        factory=dict,
        help="Rename the keys a format reads, e.g. {prompt: content, response: summary, history: null} for "
        "prompt_response; null switches an optional column off.",
        normalize=_norm_columns,
        check=_columns,
    )
    max_source_length: int | None = _opt(
        None,
        help="Most prompt tokens (the prompt is cut to fit); set with max_target_length, or use max_length.",
        check=_at_least(1),
    )
    max_target_length: int | None = _opt(
        None,
        help="Most reply tokens (the reply is cut to fit); set with max_source_length, or use max_length.",
        check=_at_least(1),
    )
    max_length: int | None = _opt(
        None,
        help="Most tokens of a whole example (prompt and reply share it); instead of the source/target pair.",
        check=_at_least(1),
    )
    train_on_prompt: bool = _opt(
        False, help="Compute the loss on prompt tokens too, not only on the replies."
    )
    skip_invalid: bool = _opt(
        False, help="Skip invalid rows (listed in the log) instead of stopping at the first one."
    )
    packing: bool = _opt(
        False, help="Pack several short examples into one sequence of the maximum length (faster on GPUs)."
    )
    group_by_length: bool = _opt(
        False, help="Batch examples of similar length together (less padding; the order is less random)."
    )
    padding_free: bool = _opt(
        True,
        help="Concatenate each batch's examples into one row without padding (position ids restart per "
        "example, attention stays within each example): the same batches and loss as padded ones, without "
        "computing padding. Not for ChatGLM-6B (v1) or P-Tuning v2 (padded batches are used there) nor with "
        "packing.",
    )
    cache_dir: str | None = _opt(
        None,
        help="Folder for the tokenized dataset cache; null = $GLMTUNE_CACHE/datasets or ~/.cache/glmtune/datasets.",
    )
    eval_ratio: float = _opt(
        0.0,
        help="Share of train_file held out for evaluation when there is no eval_file (0 = none).",
        check=_fraction(closed_right=False),
    )
    seed: int | None = _opt(None, help="Seed of the eval split and of shuffling; null = train.seed.")


@dataclass(kw_only=True)
class MethodConfig:
    """What is trained: LoRA adapters, a P-Tuning v2 prefix, or the whole model."""

    name: MethodName = _opt(
        "lora",
        help="lora, ptuning_v2 or full. QLoRA is lora with model.quantization: 4bit.",
        aliases={
            "p-tuning": "ptuning_v2",
            "ptuning": "ptuning_v2",
            "p-tuning-v2": "ptuning_v2",
            "p_tuning_v2": "ptuning_v2",
            "ptuning-v2": "ptuning_v2",
            "prefix": "ptuning_v2",
            "sft": "full",
            "full_finetune": "full",
            "finetune": "full",
        },
    )
    lora_r: int = _opt(
        8, help="LoRA rank r: the inner size of the low-rank update matrices.", check=_at_least(1)
    )
    lora_alpha: int = _opt(
        32, help="LoRA scaling: the update is multiplied by lora_alpha / lora_r.", check=_above(0)
    )
    lora_dropout: float = _opt(0.1, help="Dropout on the LoRA input.", check=_fraction(closed_right=False))
    lora_target_modules: list[str] | None = _opt(
        None,
        help="Module names LoRA wraps, e.g. [q_proj, v_proj]; null = the model generation's default.",
        check=_not_empty,
    )
    pre_seq_len: int = _opt(
        128, help="P-Tuning v2: number of virtual prefix tokens (num_virtual_tokens).", check=_at_least(1)
    )
    prefix_projection: bool = _opt(
        False,
        help="P-Tuning v2: pass the prefix through a two-layer MLP (more parameters) instead of using "
        "the embedding directly.",
    )
    freeze_layers_except_last: int | None = _opt(
        None,
        help="Full fine-tuning only: train only the last N transformer layers (null = all).",
        check=_at_least(1),
    )


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop: length, optimizer, precision, logging and checkpoints."""

    output_dir: str = _opt(help="Folder for checkpoints, logs and the final adapter or model.")
    epochs: float = _opt(
        3.0, help="Passes over the training data (used when max_steps is -1).", check=_above(0)
    )
    max_steps: int = _opt(-1, help="Optimizer steps to train; -1 = train for epochs.", check=_max_steps)
    batch_size: int = _opt(4, help="Examples per device per step.", check=_at_least(1))
    grad_accum: int = _opt(
        1,
        help="Gradient accumulation steps: the optimizer steps once every grad_accum batches.",
        check=_at_least(1),
    )
    learning_rate: float = _opt(2e-4, help="Peak learning rate.", check=_above(0))
    weight_decay: float = _opt(0.0, help="AdamW weight decay.", check=_at_least(0))
    warmup_steps: int = _opt(0, help="Steps of linear warm-up from 0 to learning_rate.", check=_at_least(0))
    warmup_ratio: float = _opt(
        0.0,
        help="Warm-up as a share of all steps (instead of warmup_steps).",
        check=_fraction(closed_right=False),
    )
    lr_scheduler: LRScheduler = _opt(
        "linear",
        help="Learning-rate schedule after warm-up: linear, cosine, constant, constant_with_warmup, ...",
    )
    optimizer: str = _opt(
        "adamw_torch",
        help="Optimizer name as transformers spells it: adamw_torch, adamw_torch_fused, adafactor, "
        "paged_adamw_8bit (bitsandbytes), ...",
    )
    max_grad_norm: float = _opt(
        1.0, help="Clip the gradient norm to this (0 = no clipping).", check=_at_least(0)
    )
    gradient_checkpointing: bool = _opt(
        False, help="Recompute activations in the backward pass: much less memory, about 30% slower."
    )
    logits_at_labels_only: bool = _opt(
        True,
        help="Compute the output layer and the loss only at positions that predict a label (the replies), "
        "not over the whole vocabulary at prompt and padding positions: the same loss and gradients, faster "
        "and lighter; false = transformers' full-logits loss.",
    )
    loss_chunk_size: int = _opt(
        1024,
        help="With logits_at_labels_only: labelled positions whose logits exist at a time, the output layer "
        "fused with the cross-entropy and its gradient (memory: chunk x vocabulary); 0 = all at once, unfused.",
        check=_at_least(0),
    )
    precision: Precision = _opt(
        "fp32",
        help="Mixed precision of the forward and backward pass: fp32 (none), fp16 or bf16 (CUDA; bf16 needs "
        "an Ampere or newer GPU).",
        aliases={
            "no": "fp32",
            "none": "fp32",
            "false": "fp32",
            "float32": "fp32",
            "32": "fp32",
            "float16": "fp16",
            "half": "fp16",
            "16": "fp16",
            "bfloat16": "bf16",
        },
    )
    seed: int = _opt(42, help="Random seed (model init, dropout, data order).")
    logging_steps: int = _opt(10, help="Log the loss and learning rate every N steps.", check=_at_least(1))
    eval_steps: int | None = _opt(
        None, help="Evaluate every N steps when there is eval data; null = save_steps.", check=_at_least(1)
    )
    save_steps: int = _opt(100, help="Save a checkpoint every N steps.", check=_at_least(1))
    save_total_limit: int | None = _opt(
        3,
        help="Keep at most this many checkpoints (the oldest are deleted); null = keep all.",
        check=_at_least(1),
    )
    resume: int | str | None = _opt(
        None,
        help='Resume training: "latest" (the newest checkpoint in output_dir; yes works too), a step number, or '
        "a checkpoint path; null = start afresh.",
        aliases={
            "true": "latest",
            "yes": "latest",
            "last": "latest",
            "false": None,
            "no": None,
            "none": None,
        },
        check=_resume,
    )
    report_to: list[str] = _opt(
        factory=lambda: ["tensorboard"],
        help="Where metrics are logged besides the console: tensorboard, wandb, ... ([] or [none] = nowhere).",
    )
    deepspeed: str | None = _opt(
        None, help="DeepSpeed ZeRO config json (e.g. configs/deepspeed/zero2.json); null = no DeepSpeed."
    )
    num_workers: int = _opt(
        0, help="Data loader worker processes (0 = load in the main process).", check=_at_least(0)
    )


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation during and after training."""

    max_new_tokens: int = _opt(256, help="Most tokens generated per evaluation example.", check=_at_least(1))
    predict_with_generate: bool = _opt(
        False,
        help="At every evaluation during training, also generate replies for the eval data (num_samples "
        "of it) and log ROUGE-1/2/L, BLEU-4 and the task metrics beside the eval loss.",
    )
    metrics: Literal["auto"] | list[str] = _opt(
        "auto", help="Generation metrics: auto (chosen from the data) or a list such as [rouge, bleu]."
    )
    num_samples: int | None = _opt(
        None, help="Generate for at most this many eval examples (null = all).", check=_at_least(1)
    )
    temperature: float = _opt(0.0, help="Sampling temperature of generation; 0 = greedy.", check=_at_least(0))
    top_p: float = _opt(1.0, help="Nucleus sampling mass when temperature > 0.", check=_above(0))
    best_metric: str = _opt(
        "eval_loss",
        help="The eval metric best/ follows: eval_loss (lower is better) or, with predict_with_generate, "
        "a generation metric (higher is better): rouge-1, rouge-2, rouge-l, bleu-4 or a task metric of "
        "the eval data (exact_match, json_exact_match, f1, ...).",
        normalize=_norm_best_metric,
        check=_best_metric,
    )


@dataclass(kw_only=True)
class RunConfig:
    """A whole ``glmtune train`` run."""

    model: ModelConfig = _opt(help="The model to fine-tune and how to load it.")
    data: DataConfig = _opt(help="The training data and how examples are cut to length.")
    method: MethodConfig = _opt(
        factory=MethodConfig, help="What is trained: LoRA adapters, a P-Tuning v2 prefix, or the whole model."
    )
    train: TrainConfig = _opt(
        help="The training loop: length, optimizer, precision, logging and checkpoints."
    )
    eval: EvalConfig = _opt(factory=EvalConfig, help="Evaluation during and after training.")

    # -- derived values ------------------------------------------------------------------------------
    @property
    def is_qlora(self) -> bool:
        """LoRA on a quantized base model."""
        return self.method.name == "lora" and self.model.quantization != "none"

    @property
    def data_seed(self) -> int:
        """The seed of the eval split and of shuffling: data.seed, or train.seed when that is null."""
        return self.train.seed if self.data.seed is None else self.data.seed

    @property
    def eval_steps(self) -> int:
        """Evaluate every this many steps: train.eval_steps, or train.save_steps when that is null."""
        return self.train.save_steps if self.train.eval_steps is None else self.train.eval_steps

    # -- checks --------------------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        """Check every value's type and range (normalising aliases in place) and the rules between fields.

        Raises :class:`ConfigError` listing every problem. Device-dependent rules (fp16/bf16, quantization)
        cannot be checked here: the trainer calls :meth:`check_device` once it knows the device.
        """
        problems = _validate(self)
        if problems:
            raise ConfigError(_format_problems(problems, None, {}))
        return self

    def check_device(self, *, cuda: bool, bf16_supported: bool = False, device_name: str = "") -> None:
        """The checks that need the device: call with what torch reports, e.g.
        ``cfg.check_device(cuda=torch.cuda.is_available(), bf16_supported=torch.cuda.is_bf16_supported())``.
        """
        problems = []
        where = device_name or ("this GPU" if cuda else "this machine (no CUDA GPU)")
        if self.train.precision == "fp16" and not cuda:
            problems.append(
                f"train.precision: fp16 mixed precision needs a CUDA GPU, {where} has none; use fp32 or bf16"
            )
        if self.train.precision == "bf16" and cuda and not bf16_supported:
            problems.append(f"train.precision: {where} does not support bf16; use fp16 or fp32")
        if self.model.quantization != "none" and not cuda:
            problems.append(
                f"model.quantization: {self.model.quantization} loading (bitsandbytes) needs a CUDA GPU, "
                f"{where} has none; use none"
            )
        if self.train.deepspeed and not cuda:
            problems.append(f"train.deepspeed: DeepSpeed needs CUDA GPUs, {where} has none; set it to null")
        if problems:
            raise ConfigError(problems[0] if len(problems) == 1 else _join(problems))


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}

# Names other tools and the original ChatGLM scripts use -> glmtune's key path (suggestions only).
_KNOWN_ALIASES: dict[str, str] = {
    "model_name_or_path": "model.path",
    "model_path": "model.path",
    "torch_dtype": "model.dtype",
    "quantization_bit": "model.quantization",
    "load_in_8bit": "model.quantization",
    "load_in_4bit": "model.quantization",
    "lora_path": "model.adapter",
    "ptuning_checkpoint": "model.adapter",
    "train": "data.train_file",
    "train_path": "data.train_file",
    "dev_path": "data.eval_file",
    "validation_file": "data.eval_file",
    "dev_file": "data.eval_file",
    "prompt_column": "data.columns",
    "response_column": "data.columns",
    "history_column": "data.columns",
    "max_source_seq_len": "data.max_source_length",
    "max_input_length": "data.max_source_length",
    "max_target_seq_len": "data.max_target_length",
    "max_output_length": "data.max_target_length",
    "max_seq_length": "data.max_length",
    "cutoff_len": "data.max_length",
    "use_lora": "method.name",
    "use_ptuning": "method.name",
    "finetuning_type": "method.name",
    "lora_rank": "method.lora_r",
    "r": "method.lora_r",
    "target_modules": "method.lora_target_modules",
    "num_virtual_tokens": "method.pre_seq_len",
    "save_dir": "train.output_dir",
    "lr": "train.learning_rate",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "save_freq": "train.save_steps",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "lr_scheduler_type": "train.lr_scheduler",
    "optim": "train.optimizer",
    "resume_from_checkpoint": "train.resume",
    "dataloader_num_workers": "train.num_workers",
    "generation_config": "eval.max_new_tokens",
}


# ---------------------------------------------------------------------------------------------------
# Types: names and conversion


class _Problem(Exception):
    """One problem: the key path it is about and the whole message (which names that path)."""

    def __init__(self, path: str, msg: str):
        super().__init__(msg)
        self.path = path
        self.msg = msg


def _bad(path: str, msg: str) -> _Problem:
    return _Problem(path, f"{path}: {msg}" if path else msg)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        args = get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    origin = get_origin(tp)
    if origin is Literal:
        choices = [str(c) for c in get_args(tp)]
        return choices[0] if len(choices) == 1 else "one of " + "|".join(choices)
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        k, v = get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    return {int: "integer", float: "float", bool: "bool", str: "string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = "null" if value is None else type(value).__name__
    return f"{text} ({kind})"


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(value: Any, tp: Any, path: str) -> Any:
    """``value`` as type ``tp``, or :class:`_Problem` naming the path, the value and the expected type."""
    expected = f"expected {_type_name(tp)}, got {_show(value)}"
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _bad(path, expected)
        arms = [a for a in args if a is not type(None)]
        # An arm the value already is wins (resume: 500 stays an int, "latest" a string).
        for arm in sorted(arms, key=lambda a: not _already(value, a)):
            try:
                return _convert(value, arm, path)
            except _Problem as err:
                if len(arms) == 1:
                    raise err from None
        raise _bad(path, expected)
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, str):
            text = value.strip().lower()
            for c in choices:
                if text == str(c).lower():
                    return c
            close = difflib.get_close_matches(text, [str(c) for c in choices], n=1)
            if close:
                expected += f"; did you mean {close[0]!r}?"
        raise _bad(path, expected)
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):  # a,b,c from a command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _bad(path, expected)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        if not isinstance(value, Mapping):
            raise _bad(path, expected)
        return {
            _convert(k, key_tp, f"{path} (key {k!r})"): _convert(v, value_tp, f"{path}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _bad(path, expected)
    if tp is int:
        if isinstance(value, bool):
            raise _bad(path, expected)
        if isinstance(value, int):
            return value
        number = value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    number = float(value.strip())
                except ValueError:
                    raise _bad(path, expected) from None
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise _bad(path, expected)
    if tp is float:
        if isinstance(value, bool):
            raise _bad(path, expected)
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise _bad(path, expected)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _bad(path, expected)
    raise TypeError(f"config field {path} has an unsupported type {tp!r}")  # a bug in this module


def _already(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp)
    if origin in (list, dict):
        return isinstance(value, origin)
    if tp in (int, float):
        return isinstance(value, tp) and not isinstance(value, bool)
    return isinstance(tp, type) and isinstance(value, tp)


def _alias_key(value: Any) -> str | None:
    if value is None or isinstance(value, (str, int, float, bool)):
        return str(value).strip().lower()
    return None


def _convert_field(f: dataclasses.Field, tp: Any, value: Any, path: str) -> Any:
    aliases = f.metadata.get("aliases")
    key = _alias_key(value)
    if aliases and key is not None and key in aliases:
        value = aliases[key]
    value = _convert(value, tp, path)
    if value is not None and "normalize" in f.metadata:
        value = f.metadata["normalize"](value)
    if value is not None and "check" in f.metadata:
        problem = f.metadata["check"](value)
        if problem:
            got = "" if isinstance(value, (dict, list)) else f", got {_show(value)}"
            raise _bad(path, problem + got)
    return value


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _all_keys() -> dict[str, str]:
    """field name -> full key path, over every group."""
    return {f.name: f"{g}.{f.name}" for g, cls in GROUPS.items() for f in fields(cls)}


def _unknown(path: str, key: str, valid: list[str], group: str | None) -> _Problem:
    full = f"{path}.{key}" if path else key
    what = f"valid keys of {group}" if group else "valid groups"
    msg = f"unknown key {full}; {what}: {', '.join(valid)}"
    every = _all_keys()
    suggestion = None
    if key in _KNOWN_ALIASES:
        suggestion = _KNOWN_ALIASES[key]
    elif key in every and every[key] != full:  # a key of another group, or a group left out
        suggestion = every[key]
    else:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if close:
            suggestion = f"{path}.{close[0]}" if path else close[0]
        elif group is None:
            close = difflib.get_close_matches(key, list(every), n=1, cutoff=0.75)
            if close:
                suggestion = every[close[0]]
    if suggestion:
        msg += f"; did you mean {suggestion}?"
    return _Problem(full, msg)


def _build(cls: type, raw: Any, path: str, problems: list[_Problem]) -> Any:
    """An instance of the dataclass ``cls`` from ``raw``; problems are appended (None returned)."""
    group = path or None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        what = f"the keys of {path}" if path else "groups (model, data, method, train, eval)"
        problems.append(_bad(path, f"expected a mapping of {what}, got {_show(raw)}"))
        return None
    before = len(problems)
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            problems.append(_unknown(path, str(key), names, group))
    hints = _hints(cls)
    kwargs = {}
    for f in fields(cls):
        p = f"{path}.{f.name}" if path else f.name
        tp = hints[f.name]
        if _is_group(tp):
            sub = _build(tp, raw.get(f.name), p, problems)
            if sub is not None:
                kwargs[f.name] = sub
            continue
        if f.name not in raw:
            if _required(f):
                problems.append(_Problem(p, f"missing required key {p} ({f.metadata['help']})"))
            continue
        try:
            kwargs[f.name] = _convert_field(f, tp, raw[f.name], p)
        except _Problem as err:
            problems.append(err)
    if len(problems) > before:
        return None
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Cross-field rules


def _validate(cfg: RunConfig) -> list[_Problem]:
    problems: list[_Problem] = []
    # Types and ranges of values set from Python (load_config has checked its own already).
    checked = _build(RunConfig, to_dict(cfg), "", problems)
    if problems:
        return problems
    for name in GROUPS:  # aliases normalised in place
        setattr(cfg, name, getattr(checked, name))

    d, m, t = cfg.data, cfg.method, cfg.train
    pair = (d.max_source_length, d.max_target_length)
    if d.max_length is not None and any(x is not None for x in pair):
        problems.append(
            _Problem(
                "data.max_length",
                "data.max_length and data.max_source_length/max_target_length are both set: use either "
                "max_length (prompt and reply share it) or the source/target pair",
            )
        )
    elif d.max_length is None and None in pair:
        if pair == (None, None):
            msg = "no length limit: set data.max_length, or both data.max_source_length and data.max_target_length"
        else:
            missing = "data.max_target_length" if d.max_target_length is None else "data.max_source_length"
            msg = f"{missing} is missing: data.max_source_length and data.max_target_length go together"
        problems.append(_Problem("data.max_length", msg))
    if d.eval_file is not None and d.eval_ratio > 0:
        problems.append(
            _Problem(
                "data.eval_ratio",
                "data.eval_ratio splits eval data off train_file, but data.eval_file is set: use one",
            )
        )
    if m.name == "full" and cfg.model.quantization != "none":
        problems.append(
            _Problem(
                "model.quantization",
                f"model.quantization {cfg.model.quantization} with method.name full: quantized weights cannot be "
                "trained; use lora (QLoRA) or ptuning_v2, or quantization none",
            )
        )
    if m.name == "full" and cfg.model.adapter is not None:
        problems.append(
            _Problem(
                "model.adapter",
                "model.adapter (continue a LoRA or P-Tuning run) does not apply to method.name full",
            )
        )
    if m.freeze_layers_except_last is not None and m.name != "full":
        problems.append(
            _Problem(
                "method.freeze_layers_except_last",
                f"method.freeze_layers_except_last is for method.name full, not {m.name}",
            )
        )
    if t.warmup_steps > 0 and t.warmup_ratio > 0:
        problems.append(
            _Problem("train.warmup_steps", "train.warmup_steps and train.warmup_ratio are both set: use one")
        )
    if cfg.eval.best_metric != "eval_loss" and not cfg.eval.predict_with_generate:
        problems.append(
            _Problem(
                "eval.best_metric",
                f"eval.best_metric {cfg.eval.best_metric} is a generation metric, logged only with "
                "eval.predict_with_generate true: set it, or use eval_loss (the only choice without it)",
            )
        )
    # method.name ptuning_v2 with model.quantization 8bit/4bit is allowed (the official 8-bit P-Tuning).
    return problems


# ---------------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.learning_rate=1e-4"`` -> ``("train.learning_rate", "1e-4")``: the value read as YAML, so
    numbers, booleans, null and ``[a, b]`` lists work (conversion to the field's type happens later)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value, e.g. train.learning_rate=1e-4")
    key, _, raw = text.partition("=")
    key = key.strip().removeprefix("--")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value, e.g. train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: take the text as it is (a path with odd characters, ...)
    return key, value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> tuple[dict, dict[str, str]]:
    """A copy of ``raw`` with the overrides set, and which key path each override set."""
    out = copy.deepcopy(dict(raw))
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                at = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {at} is {_show(child)}, not a group of keys")
            node = child
        node[parts[-1]] = value
        origins[key] = text
    return out, origins


# ---------------------------------------------------------------------------------------------------
# Loading and saving


def _join(lines: list[str]) -> str:
    return f"{len(lines)} config problems:\n" + "\n".join(f"  - {line}" for line in lines)


def _format_problems(problems: list[_Problem], source: str | None, origins: Mapping[str, str]) -> str:
    lines = []
    for problem in problems:
        origin = next(
            (
                text
                for key, text in origins.items()
                if problem.path == key
                or problem.path.startswith(key + ".")
                or key.startswith(problem.path + ".")
            ),
            None,
        )
        where = f"override {origin!r}" if origin else source
        lines.append(f"{where}: {problem.msg}" if where else problem.msg)
    return lines[0] if len(lines) == 1 else _join(lines)


def _read_yaml(path: Path) -> Any:
    if path.is_dir():
        path = path / CONFIG_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


#: The data files of a config file that are looked up beside it (see :func:`_beside_config`).
_BESIDE_CONFIG_KEYS = (("data", "train_file"), ("data", "eval_file"))

BESIDE_CONFIG_RULE = (
    "Relative paths are relative to the working directory, except that a relative data.train_file or "
    "data.eval_file of a config file that is not there but lies beside the config file is read from "
    "there (overrides on the command line stay relative to the working directory)."
)


def _beside_config(raw: dict, config_dir: Path, origins: Mapping[str, str]) -> dict:
    """``raw`` with each relative data file of :data:`_BESIDE_CONFIG_KEYS` that is missing from the
    working directory but present in ``config_dir`` replaced by its absolute path there. Keys set by an
    override, absolute paths and paths found from the working directory are left as they are."""
    for group, key in _BESIDE_CONFIG_KEYS:
        node = raw.get(group)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or f"{group}.{key}" in origins:
            continue
        path = Path(value).expanduser()
        if path.is_absolute() or path.exists():
            continue
        beside = config_dir / path
        if beside.exists():
            node[key] = os.path.abspath(beside)
    return raw


def load_config(
    path_or_dict: str | os.PathLike | Mapping[str, Any] | RunConfig, overrides: Iterable[str] = ()
) -> RunConfig:
    """The validated :class:`RunConfig` of a YAML file (or a checkpoint folder holding
    :data:`CONFIG_FILENAME`, or a dict), with ``key.sub=value`` overrides applied.

    Raises :class:`ConfigError` listing every problem: unknown keys (with the valid ones and the closest
    name), values of the wrong type (key path, value, expected type), missing required keys
    (model.path, data.train_file, train.output_dir) and broken rules between fields.

    Relative paths stay relative to the working directory, except the data files of a config file
    (:data:`BESIDE_CONFIG_RULE`): one that is not there but lies beside the file becomes its absolute
    path there.
    """
    if isinstance(path_or_dict, RunConfig):
        raw: Any = to_dict(path_or_dict)
        source = None
    elif isinstance(path_or_dict, Mapping):
        raw, source = path_or_dict, None
    else:
        source = str(path_or_dict)
        raw = _read_yaml(Path(path_or_dict))
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source or 'config'}: expected a mapping of groups (model, data, method, train, eval), got {_show(raw)}"
        )
    raw, origins = apply_overrides(raw, overrides)
    if source is not None:
        path = Path(source)
        raw = _beside_config(raw, path if path.is_dir() else path.parent, origins)
    problems: list[_Problem] = []
    cfg = _build(RunConfig, raw, "", problems)
    if cfg is not None:
        problems = _validate(cfg)
    if problems:
        raise ConfigError(_format_problems(problems, source, origins))
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config (or one group) as plain dicts, lists and scalars, in field order."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (:func:`glmtune.atomic.write_text`).

    A folder as ``path`` gets :data:`CONFIG_FILENAME` inside it. ``load_config`` of the file gives a
    config equal to ``cfg``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILENAME
    text = "# glmtune resolved run config: glmtune train THIS_FILE reruns it\n" + yaml.safe_dump(
        to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000
    )
    return write_text(path, text)


# ---------------------------------------------------------------------------------------------------
# Documentation


def _default_text(f: dataclasses.Field) -> str:
    if _required(f):
        return "required"
    value = f.default_factory() if f.default is MISSING else f.default
    return "default: " + _yaml_value(value)


def config_help() -> str:
    """Every key of every group with its type, default and help (``glmtune train --help-config``)."""
    lines = [
        "glmtune train CONFIG.yaml [key.sub=value ...]",
        "",
        "Config keys, by group. Override any of them on the command line as group.key=value (values are",
        "read as YAML: train.learning_rate=1e-4, method.lora_target_modules=[q_proj,v_proj],",
        "data.columns.prompt=content, model.adapter=null).",
        "",
        *textwrap.wrap(BESIDE_CONFIG_RULE, width=100),
    ]
    for group, cls in GROUPS.items():
        lines += ["", f"{group}: {(cls.__doc__ or '').strip()}"]
        hints = _hints(cls)
        for f in fields(cls):
            lines.append(f"  {group}.{f.name} ({_type_name(hints[f.name])}; {_default_text(f)})")
            lines += textwrap.wrap(
                f.metadata["help"], width=100, initial_indent="      ", subsequent_indent="      "
            )
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    """One value as inline YAML: scalars plain or quoted, lists and mappings in flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10000, sort_keys=False)
    return text.removesuffix("\n...\n").removesuffix("\n")


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text, width=100 - len(indent), initial_indent=indent + "# ", subsequent_indent=indent + "# "
    )


def render_example_config(cfg_dict: Mapping[str, Any], title: str) -> str:
    """YAML text for ``cfg_dict`` (groups of keys, any subset) in which every group and key is preceded
    by its ``# help`` comment, groups and keys in the documented order, under a ``# title`` header.

    Used by ``configs/generate.py`` to write the shipped configs. Unknown groups or keys raise
    :class:`ConfigError`; ``yaml.safe_load`` of the result gives ``cfg_dict`` back.
    """
    problems: list[_Problem] = []
    for group, values in cfg_dict.items():
        if group not in GROUPS:
            problems.append(_unknown("", str(group), list(GROUPS), None))
        elif not isinstance(values, Mapping):
            problems.append(_bad(group, f"expected a mapping of the keys of {group}, got {_show(values)}"))
        else:
            names = [f.name for f in fields(GROUPS[group])]
            problems += [_unknown(group, str(k), names, group) for k in values if k not in names]
    if problems:
        raise ConfigError(_format_problems(problems, "example config", {}))
    lines = [f"# {line}" if line else "#" for line in title.strip().splitlines()]
    run_help = {f.name: f.metadata["help"] for f in fields(RunConfig)}
    for group, cls in GROUPS.items():
        values = cfg_dict.get(group)
        if not values:
            continue
        lines.append("")
        lines += _comment(run_help[group], "")
        lines.append(f"{group}:")
        for f in fields(cls):
            if f.name in values:
                lines += _comment(f.metadata["help"], "  ")
                lines.append(f"  {f.name}: {_yaml_value(values[f.name])}")
    return "\n".join(lines) + "\n"

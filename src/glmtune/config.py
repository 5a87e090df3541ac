"""The typed configuration of ``glmtune train CONFIG.yaml [key.sub=value ...]``.

A run is described by five small groups of settings, each a pydantic dataclass whose fields carry their
documentation in ``Field(description=...)``: :class:`ModelConfig` (``model:``), :class:`DataConfig`
(``data:``), :class:`MethodConfig` (``method:``), :class:`TrainConfig` (``train:``) and
:class:`EvalConfig` (``eval:``), gathered in :class:`RunConfig`. They are pydantic dataclasses (not
``BaseModel``) so that they stay plain dataclasses too: ``dataclasses.replace``/``asdict``/``fields``
work on them as on any other. The same docs become ``glmtune train --help-config`` (:func:`config_help`)
and the comments of the shipped example configs (:func:`render_example_config`, driven by
``configs/generate.py``).

pydantic checks and converts every value (types, ranges, the spellings YAML and command lines bring:
``1e-4`` read as a string, ``bf16`` for ``bfloat16``, ``a,b`` for a list) and runs the rules between
fields (``model_validator``). :func:`load_config` reads a YAML file (or a dict), applies dotted
``key.sub=value`` overrides and validates; pydantic's errors are rendered here as
:class:`~glmtune.errors.ConfigError` lines that name the file or override, the key path, the value and
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
import os
import textwrap
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from .atomic import write_text
from .data.readers import FORMAT_ALIASES, FORMATS, KNOWN_COLUMNS
from .errors import ConfigError
from .method_names import METHOD_NAMES
from .metrics import ROUGE_BLEU_KEYS, TASK_METRIC_NAMES
from .specs import REGISTRY

__all__ = [
    "BESIDE_CONFIG_RULE",
    "BEST_METRICS",
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

#: The data formats ``data.format`` names besides ``auto`` (:data:`glmtune.data.readers.FORMATS`).
DATA_FORMATS: tuple[str, ...] = FORMATS

#: What eval.best_metric can name before the data is known: the eval loss, ROUGE/BLEU and every task
#: metric (the recipe narrows the task metrics to those of the eval data).
BEST_METRICS = ("eval_loss", *ROUGE_BLEU_KEYS, *TASK_METRIC_NAMES)


# ---------------------------------------------------------------------------------------------------
# Value types: pydantic converts and checks them. The before-validators below add only what YAML
# files and command lines bring and pydantic's lax mode does not take (or takes too readily).


def _problem(msg: str) -> PydanticCustomError:
    """A problem with a value, worded in full by the check that found it (rendered as ``path: msg``)."""
    return PydanticCustomError("glmtune", "{msg}", {"msg": msg})


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = "null" if value is None else type(value).__name__
    return f"{text} ({kind})"


def _alias_key(value: Any) -> str | None:
    if value is None or isinstance(value, (str, int, float, bool)):
        return str(value).strip().lower()
    return None


def _spelling(
    aliases: Mapping[str, Any] = types.MappingProxyType({}), *, lower: bool = True
) -> BeforeValidator:
    """Other spellings (compared stripped and lower-cased, so YAML's ``false`` or ``4`` match ``"false"`` and
    ``"4"``) mapped to the canonical value; with ``lower`` any other string is stripped and lower-cased
    (the choices of a Literal are lower case)."""

    def before(value: Any) -> Any:
        key = _alias_key(value)
        if key is not None and key in aliases:
            return aliases[key]
        return value.strip().lower() if lower and isinstance(value, str) else value

    return BeforeValidator(before)


def _int_in(value: Any) -> Any:
    # pydantic's lax int takes True as 1 (refused: a bool is no count) and refuses "1e3" (YAML reads a
    # quoted 1e3 as a string; taken when it is a whole number).
    if isinstance(value, bool):
        raise ValueError("a bool is not an integer")
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return value  # pydantic reports it
            return int(number) if number.is_integer() else value
    return value


def _float_in(value: Any) -> Any:
    # pydantic's lax float takes True as 1.0: refused. Strings ("1e-4", which YAML does not read as a
    # number) pydantic parses itself; inf and nan are refused by allow_inf_nan=False.
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    return value


def _split_commas(value: Any) -> Any:
    # a,b,c from a command line (q_proj,v_proj) is the list [a, b, c].
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _metrics_in(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _split_commas(value)


Int = Annotated[int, BeforeValidator(_int_in)]
Float = Annotated[float, BeforeValidator(_float_in)]
StrList = Annotated[list[str], BeforeValidator(_split_commas)]

# The ModelSpec registry names (glmtune.specs.REGISTRY).
Generation = Annotated[Literal[tuple(REGISTRY)], _spelling()]
DType = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"],
    _spelling(
        {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    ),
]
Quantization = Annotated[
    Literal["none", "8bit", "4bit"],
    _spelling(
        {
            "false": "none",
            "no": "none",
            "off": "none",
            "4": "4bit",
            "nf4": "4bit",
            "int4": "4bit",
            "8": "8bit",
            "int8": "8bit",
        }
    ),
]
# The formats and their aliases are the readers' (glmtune.data.readers), listed once there.
DataFormat = Annotated[Literal[("auto", *FORMATS)], _spelling(FORMAT_ALIASES)]
# The method names are glmtune.method_names' (glmtune.train.methods.METHODS is built from them).
MethodName = Annotated[
    Literal[METHOD_NAMES],
    _spelling(
        {
            "p-tuning": "ptuning_v2",
            "ptuning": "ptuning_v2",
            "p-tuning-v2": "ptuning_v2",
            "p_tuning_v2": "ptuning_v2",
            "ptuning-v2": "ptuning_v2",
            "prefix": "ptuning_v2",
            "sft": "full",
            "full_finetune": "full",
            "finetune": "full",
        }
    ),
]
Precision = Annotated[
    Literal["fp32", "fp16", "bf16"],
    _spelling(
        {
            "no": "fp32",
            "none": "fp32",
            "false": "fp32",
            "float32": "fp32",
            "32": "fp32",
            "float16": "fp16",
            "half": "fp16",
            "16": "fp16",
            "bfloat16": "bf16",
        }
    ),
]
# transformers' SchedulerType values.
LRScheduler = Annotated[
    Literal[
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
    ],
    _spelling(),
]


def _max_steps(v: int) -> int:
    if v == -1 or v > 0:
        return v
    raise _problem(f"must be -1 (train for train.epochs) or a positive number of steps, got {_show(v)}")


def _resume(v: int | str | None) -> int | str | None:
    if (isinstance(v, int) and v <= 0) or (isinstance(v, str) and not v.strip()):
        raise _problem(f"must be 'latest', a positive step number or a checkpoint path, got {_show(v)}")
    return v


Resume = Annotated[
    Int | str | None,
    _spelling(
        {
            "latest": "latest",
            "true": "latest",
            "yes": "latest",
            "last": "latest",
            "false": None,
            "no": None,
            "none": None,
        },
        lower=False,
    ),
    AfterValidator(_resume),
]


def _columns(v: dict[str, str | None]) -> dict[str, str | None]:
    # ChatGLM2's P-Tuning scripts spell them prompt_column / response_column / history_column.
    v = {(k[: -len("_column")] if k.endswith("_column") else k): x for k, x in v.items()}
    for key, value in v.items():
        if key not in KNOWN_COLUMNS:
            close = difflib.get_close_matches(key, KNOWN_COLUMNS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _problem(f"unknown column {key!r} (known: {', '.join(KNOWN_COLUMNS)}){hint}")
        if value is not None and not value:
            raise _problem(f"column {key!r} must name a key (a non-empty string) or be null")
    return v


def _best_metric(v: str) -> str:
    # As logged ("eval_rouge-l") or as named in reports ("rouge-l"); "loss" is the eval loss.
    name = v.strip().lower()
    name = "eval_loss" if name in ("loss", "eval_loss") else name.removeprefix("eval_")
    if name in BEST_METRICS:
        return name
    close = difflib.get_close_matches(name, BEST_METRICS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise _problem(f"{v!r} is not a metric glmtune logs; choices: {', '.join(BEST_METRICS)}{hint}")


def _rules(problems: list[tuple[str, str]]) -> None:
    """Raise the broken rules between fields, each as (key path, message), as one pydantic error."""
    if problems:
        summary = "; ".join(msg for _, msg in problems)
        raise PydanticCustomError(
            "glmtune_rules", "{summary}", {"summary": summary, "problems": tuple(problems)}
        )


# extra="forbid": unknown keys are errors (rendered with the valid keys and the closest name).
# coerce_numbers_to_str: a path or name YAML reads as a number (model.path=123) is that text.
# allow_inf_nan=False: .inf / .nan are no learning rate.
_GROUP_CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------------
# The groups


@dataclass(kw_only=True, config=_GROUP_CONFIG)
class ModelConfig:
    """The model to fine-tune and how to load it."""

    path: str = Field(
        description='Model folder (Hugging Face layout or an official ChatGLM checkpoint), a .gguf file, or "default" '
        "for the embedded SmolLM2-135M-Instruct."
    )
    generation: Generation | None = Field(
        None,
        description="Model generation (chatglm, chatglm2, chatglm3, glm4, hf); null = detected from the model's files. "
        "Set it only when detection gets it wrong.",
    )
    dtype: DType = Field(
        "auto",
        description="Dtype the base weights are loaded in: auto (the machine's: bfloat16 on a CUDA GPU that supports "
        "it, else float16, float32 on the CPU; float32 for method.name full, whose weights train), float32, bfloat16 "
        "or float16 (adapters and prefix encoders stay float32). With quantization it is the compute dtype.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow the model folder's own Python code to run. glmtune loads the ChatGLM family without it; "
        "only a folder nothing else can read needs it.",
    )
    adapter: str | None = Field(
        None,
        description="Continue from an existing LoRA folder (peft) or P-Tuning v2 checkpoint instead of a fresh one.",
    )
    quantization: Quantization = Field(
        "none",
        description="Load the base weights quantized with bitsandbytes: none, 8bit, or 4bit (NF4 with double "
        "quantization: QLoRA when method.name is lora), each Linear weight as it streams in. Needs the "
        "bitsandbytes package; runs on a CUDA GPU or on the CPU.",
    )
    template: str | None = Field(
        None,
        description="Prompt template instead of the model generation's own chat format: a shipped name (alpaca, "
        "chatml, vicuna) or a YAML file (README 'Prompt templates'); null = the generation's.",
    )


@dataclass(kw_only=True, config=_GROUP_CONFIG)
class DataSourceConfig:
    """One entry of a data.train_file / data.eval_file list (glmtune.data.sources)."""

    path: str = Field(
        description="A .json/.jsonl file, or a datasets hub id org/name[@revision] (hub:org/name forces the hub)."
    )
    split: str | None = Field(None, description="The split of a hub dataset; null = train.")
    format: DataFormat | None = Field(None, description="This source's row format; null = data.format.")
    columns: Annotated[dict[str, str | None], AfterValidator(_columns)] | None = Field(
        None, description="This source's column names; null = data.columns."
    )
    weight: Float | None = Field(
        None,
        gt=0,
        description="Share of the weighted sources' rows this source gets, relative to the other weights.",
    )
    rows: Int | None = Field(
        None, ge=1, description="Exactly this many rows (sampled, or repeated when the source has fewer)."
    )

    @model_validator(mode="after")
    def _check_rules(self) -> DataSourceConfig:
        if self.weight is not None and self.rows is not None:
            _rules([("weight", "give a source either weight or rows, not both")])
        return self


# A data file, or a list of sources (paths or mappings) mixed into one set.
DataFiles = str | list[str | DataSourceConfig]


@dataclass(kw_only=True, config=_GROUP_CONFIG)
class DataConfig:
    """The training data and how examples are cut to length."""

    train_file: DataFiles = Field(
        description="Training data: a .jsonl file (one JSON object a line) or a .json array, a datasets hub id "
        "(org/name), or a list of them mixed into one set, each entry a path or {path, split, format, columns, "
        "weight | rows} (see Mixed datasets in the README)."
    )
    eval_file: DataFiles | None = Field(
        None,
        description="Evaluation data in the same forms; null = none, or a split of train_file (data.eval_ratio).",
    )
    format: DataFormat = Field(
        "auto",
        description="Row format: auto (detected from the first row's keys), context_target, alpaca, prompt_response, "
        "conversations (ChatGLM3), sharegpt or messages (OpenAI).",
    )
    columns: Annotated[dict[str, str | None], AfterValidator(_columns)] = Field(
        default_factory=dict,
        description="Rename the keys a format reads, e.g. {prompt: content, response: summary, history: null} for "
        "prompt_response; null switches an optional column off.",
    )
    max_source_length: Int | None = Field(
        None,
        ge=1,
        description="Most prompt tokens (the prompt is cut to fit); set with max_target_length, or use max_length.",
    )
    max_target_length: Int | None = Field(
        None,
        ge=1,
        description="Most reply tokens (the reply is cut to fit); set with max_source_length, or use max_length.",
    )
    max_length: Int | None = Field(
        None,
        ge=1,
        description="Most tokens of a whole example (prompt and reply share it); instead of the source/target pair.",
    )
    train_on_prompt: bool = Field(
        False, description="Compute the loss on prompt tokens too, not only on the replies."
    )
    skip_invalid: bool = Field(
        False, description="Skip invalid rows (listed in the log) instead of stopping at the first one."
    )
    packing: bool = Field(
        False,
        description="Pack several short examples into one sequence of the maximum length (faster on GPUs).",
    )
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length together (less padding; the order is less random).",
    )
    padding_free: bool = Field(
        True,
        description="Concatenate each batch's examples into one row without padding (position ids restart per "
        "example, attention stays within each example): the same batches and loss as padded ones, without "
        "computing padding. Not for ChatGLM-6B (v1) or P-Tuning v2 (padded batches are used there) nor with "
        "packing.",
    )
    cache_dir: str | None = Field(
        None,
        description="Folder for the tokenized dataset cache; null = $GLMTUNE_CACHE/datasets or ~/.cache/glmtune/datasets.",
    )
    eval_ratio: Float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of train_file held out for evaluation when there is no eval_file (0 = none).",
    )
    seed: Int | None = Field(None, description="Seed of the eval split and of shuffling; null = train.seed.")

    @model_validator(mode="after")
    def _check_rules(self) -> DataConfig:
        problems = []
        pair = (self.max_source_length, self.max_target_length)
        if self.max_length is not None and any(x is not None for x in pair):
            problems.append(
                (
                    "data.max_length",
                    "data.max_length and data.max_source_length/max_target_length are both set: use either "
                    "max_length (prompt and reply share it) or the source/target pair",
                )
            )
        elif self.max_length is None and None in pair:
            if pair == (None, None):
                msg = "no length limit: set data.max_length, or both data.max_source_length and data.max_target_length"
            else:
                missing = (
                    "data.max_target_length" if self.max_target_length is None else "data.max_source_length"
                )
                msg = f"{missing} is missing: data.max_source_length and data.max_target_length go together"
            problems.append(("data.max_length", msg))
        if self.eval_file is not None and self.eval_ratio > 0:
            problems.append(
                (
                    "data.eval_ratio",
                    "data.eval_ratio splits eval data off train_file, but data.eval_file is set: use one",
                )
            )
        _rules(problems)
        return self

    def sources(self, which: str = "train") -> list:
        """``train_file`` (or ``eval_file``) as :class:`glmtune.data.sources.DataSource` entries; entries
        without their own format / columns take data.format / data.columns. Empty for no eval_file."""
        from .data.sources import DataSource

        value = self.train_file if which == "train" else self.eval_file
        if value is None:
            return []
        out = []
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                out.append(DataSource(item, format=self.format, columns=self.columns or None))
            else:
                out.append(
                    DataSource(
                        item.path,
                        split=item.split,
                        format=item.format or self.format,
                        columns=(item.columns if item.columns is not None else self.columns) or None,
                        weight=item.weight,
                        rows=item.rows,
                    )
                )
        return out

    def is_mixed(self, which: str = "train") -> bool:
        """More than one source, or one that is sampled or from the hub: read through the mixing path."""
        from .data.sources import is_hub_source

        sources = self.sources(which)
        return len(sources) > 1 or any(
            s.weight is not None or s.rows is not None or s.split is not None or is_hub_source(s.path)
            for s in sources
        )


@dataclass(kw_only=True, config=_GROUP_CONFIG)
class MethodConfig:
    """What is trained: LoRA adapters, a P-Tuning v2 prefix, or the whole model."""

    name: MethodName = Field(
        "lora",
        description=f"{', '.join(METHOD_NAMES[:-1])} or {METHOD_NAMES[-1]}. QLoRA is lora with model.quantization: 4bit.",
    )
    lora_r: Int = Field(8, ge=1, description="LoRA rank r: the inner size of the low-rank update matrices.")
    lora_alpha: Int = Field(
        32, gt=0, description="LoRA scaling: the update is multiplied by lora_alpha / lora_r."
    )
    lora_dropout: Float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: StrList | None = Field(
        None,
        min_length=1,
        description="Module names LoRA wraps, e.g. [q_proj, v_proj]; null = the model generation's default.",
    )
    pre_seq_len: Int = Field(
        128, ge=1, description="P-Tuning v2: number of virtual prefix tokens (num_virtual_tokens)."
    )
    prefix_projection: bool = Field(
        False,
        description="P-Tuning v2: pass the prefix through a two-layer MLP (more parameters) instead of using "
        "the embedding directly.",
    )
    freeze_layers_except_last: Int | None = Field(
        None,
        ge=1,
        description="Full fine-tuning only: train only the last N transformer layers (null = all).",
    )

    @model_validator(mode="after")
    def _check_rules(self) -> MethodConfig:
        if self.freeze_layers_except_last is not None and self.name != "full":
            _rules(
                [
                    (
                        "method.freeze_layers_except_last",
                        f"method.freeze_layers_except_last is for method.name full, not {self.name}",
                    )
                ]
            )
        return self


@dataclass(kw_only=True, config=_GROUP_CONFIG)
class TrainConfig:
    """The training loop: length, optimizer, precision, logging and checkpoints."""

    output_dir: str = Field(description="Folder for checkpoints, logs and the final adapter or model.")
    epochs: Float = Field(3.0, gt=0, description="Passes over the training data (used when max_steps is -1).")
    max_steps: Annotated[Int, AfterValidator(_max_steps)] = Field(
        -1, description="Optimizer steps to train; -1 = train for epochs."
    )
    batch_size: Int = Field(4, ge=1, description="Examples per device per step.")
    grad_accum: Int = Field(
        1,
        ge=1,
        description="Gradient accumulation steps: the optimizer steps once every grad_accum batches.",
    )
    learning_rate: Float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: Int = Field(0, ge=0, description="Steps of linear warm-up from 0 to learning_rate.")
    warmup_ratio: Float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Warm-up as a share of all steps (instead of warmup_steps).",
    )
    lr_scheduler: LRScheduler = Field(
        "linear",
        description="Learning-rate schedule after warm-up: linear, cosine, constant, constant_with_warmup, ...",
    )
    optimizer: str = Field(
        "adamw_torch",
        description="Optimizer name as transformers spells it: adamw_torch, adamw_torch_fused, adafactor, "
        "paged_adamw_8bit (bitsandbytes), ...",
    )
    max_grad_norm: Float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 = no clipping).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: much less memory, about 30% slower."
    )
    logits_at_labels_only: bool = Field(
        True,
        description="Compute the output layer and the loss only at positions that predict a label (the replies), "
        "not over the whole vocabulary at prompt and padding positions: the same loss and gradients, faster "
        "and lighter; false = transformers' full-logits loss.",
    )
    loss_chunk_size: Int = Field(
        1024,
        ge=0,
        description="With logits_at_labels_only: labelled positions whose logits exist at a time, the output layer "
        "fused with the cross-entropy and its gradient (memory: chunk x vocabulary); 0 = all at once, unfused.",
    )
    precision: Precision = Field(
        "fp32",
        description="Mixed precision of the forward and backward pass: fp32 (none), fp16 or bf16 (CUDA; bf16 needs "
        "an Ampere or newer GPU).",
    )
    seed: Int = Field(42, description="Random seed (model init, dropout, data order).")
    logging_steps: Int = Field(10, ge=1, description="Log the loss and learning rate every N steps.")
    eval_steps: Int | None = Field(
        None, ge=1, description="Evaluate every N steps when there is eval data; null = save_steps."
    )
    save_steps: Int = Field(100, ge=1, description="Save a checkpoint every N steps.")
    save_total_limit: Int | None = Field(
        3,
        ge=1,
        description="Keep at most this many checkpoints (the oldest are deleted); null = keep all.",
    )
    resume: Resume = Field(
        None,
        description='Resume training: "latest" (the newest checkpoint in output_dir; yes works too), a step number, or '
        "a checkpoint path; null = start afresh.",
    )
    report_to: StrList = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where metrics are logged besides the console: tensorboard, wandb, ... ([] or [none] = nowhere).",
    )
    deepspeed: str | None = Field(
        None,
        description="DeepSpeed ZeRO config json (e.g. configs/deepspeed/zero2.json); null = no DeepSpeed.",
    )
    num_workers: Int = Field(
        0, ge=0, description="Data loader worker processes (0 = load in the main process)."
    )

    @model_validator(mode="after")
    def _check_rules(self) -> TrainConfig:
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            _rules(
                [("train.warmup_steps", "train.warmup_steps and train.warmup_ratio are both set: use one")]
            )
        return self


@dataclass(kw_only=True, config=_GROUP_CONFIG)
class EvalConfig:
    """Evaluation during and after training."""

    max_new_tokens: Int = Field(256, ge=1, description="Most tokens generated per evaluation example.")
    predict_with_generate: bool = Field(
        False,
        description="At every evaluation during training, also generate replies for the eval data (num_samples "
        "of it) and log ROUGE-1/2/L, BLEU-4 and the task metrics beside the eval loss.",
    )
    metrics: Annotated[Literal["auto"] | list[str], BeforeValidator(_metrics_in)] = Field(
        "auto", description="Generation metrics: auto (chosen from the data) or a list such as [rouge, bleu]."
    )
    num_samples: Int | None = Field(
        None, ge=1, description="Generate for at most this many eval examples (null = all)."
    )
    temperature: Float = Field(0.0, ge=0, description="Sampling temperature of generation; 0 = greedy.")
    top_p: Float = Field(1.0, gt=0, description="Nucleus sampling mass when temperature > 0.")
    best_metric: Annotated[str, AfterValidator(_best_metric)] = Field(
        "eval_loss",
        description="The eval metric best/ follows: eval_loss (lower is better) or, with predict_with_generate, "
        "a generation metric (higher is better): rouge-1, rouge-2, rouge-l, bleu-4 or a task metric of "
        "the eval data (exact_match, json_exact_match, f1, ...).",
    )

    @model_validator(mode="after")
    def _check_rules(self) -> EvalConfig:
        if self.best_metric != "eval_loss" and not self.predict_with_generate:
            _rules(
                [
                    (
                        "eval.best_metric",
                        f"eval.best_metric {self.best_metric} is a generation metric, logged only with "
                        "eval.predict_with_generate true: set it, or use eval_loss (the only choice without it)",
                    )
                ]
            )
        return self


@dataclass(kw_only=True, config=_GROUP_CONFIG)
class RunConfig:
    """A whole ``glmtune train`` run."""

    model: ModelConfig = Field(description="The model to fine-tune and how to load it.")
    data: DataConfig = Field(description="The training data and how examples are cut to length.")
    method: MethodConfig = Field(
        default_factory=MethodConfig,
        description="What is trained: LoRA adapters, a P-Tuning v2 prefix, or the whole model.",
    )
    train: TrainConfig = Field(
        description="The training loop: length, optimizer, precision, logging and checkpoints."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation during and after training.")

    @model_validator(mode="before")
    @classmethod
    def _absent_groups(cls, data: Any) -> Any:
        # A group left out (or null, as an empty YAML section reads) is an empty one: its required keys are
        # then reported by name (model.path), not the whole group as missing.
        if isinstance(data, Mapping):
            return {**data, **{name: {} for name in GROUPS if data.get(name) is None}}
        return data

    @model_validator(mode="after")
    def _check_rules(self) -> RunConfig:
        problems = []
        if self.method.name == "full" and self.model.quantization != "none":
            problems.append(
                (
                    "model.quantization",
                    f"model.quantization {self.model.quantization} with method.name full: quantized weights cannot be "
                    "trained; use lora (QLoRA) or ptuning_v2, or quantization none",
                )
            )
        if self.method.name == "full" and self.model.adapter is not None:
            problems.append(
                (
                    "model.adapter",
                    "model.adapter (continue a LoRA or P-Tuning run) does not apply to method.name full",
                )
            )
        # method.name ptuning_v2 with model.quantization 8bit/4bit is allowed (the official 8-bit P-Tuning).
        _rules(problems)
        if self.method.name == "full" and self.model.dtype == "auto":
            # Full fine-tuning trains the loaded weights themselves: mixed precision keeps them (its master
            # copy) in float32, and fp16 weights cannot be trained with fp16 at all (the gradient scaler
            # refuses them), so the machine's dtype does not apply. The resolved value is saved as such; a
            # new group, not an edit of one a caller may share (dataclasses.replace keeps the others).
            self.model = dataclasses.replace(self.model, dtype="float32")
        return self

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
        """Check every value's type and range (normalising aliases in place) and the rules between fields:
        for a config changed or built in Python (attribute assignment is not validated).

        Raises :class:`ConfigError` listing every problem. Device-dependent rules (fp16/bf16, quantization)
        cannot be checked here: the trainer calls :meth:`check_device` once it knows the device.
        """
        checked = _validated(to_dict(self), None, {})
        for name in GROUPS:  # converted values and canonical spellings, in place
            setattr(self, name, getattr(checked, name))
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

_RUN_CONFIG = TypeAdapter(RunConfig)

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
# pydantic's errors as glmtune's messages: the key path, the value, the expected type, the hint.


@dataclasses.dataclass
class _Problem:
    """One problem: the key path it is about and the whole message (which names that path)."""

    path: str
    msg: str


def _fields(cls: type) -> dict[str, Any]:
    """A group's fields: name -> pydantic FieldInfo (annotation, default, description, constraints)."""
    return cls.__pydantic_fields__


def _unwrap(tp: Any) -> Any:
    # Annotated[X, validators...] -> X (the validators convert; the type is X).
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    tp = _unwrap(tp)
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


def _arm(tp: Any, origin: type) -> Any:
    """The ``list[...]`` / ``dict[...]`` member of ``tp`` (itself, or one arm of a union), or None."""
    tp = _unwrap(tp)
    for arm in get_args(tp) if _is_union(tp) else (tp,):
        if get_origin(_unwrap(arm)) is origin:
            return _unwrap(arm)
    return None


def _locate(loc: tuple) -> tuple[str, Any, Any]:
    """The key path of a pydantic error location (``("train", "learning_rate")`` -> ``train.learning_rate``,
    ``("method", "lora_target_modules", 1)`` -> ``method.lora_target_modules[1]``), the type expected
    there, and the FieldInfo of the field it lies in (None at the top)."""
    path, tp, info = "", RunConfig, None
    for part in loc:
        tp = _unwrap(tp)
        if _is_group(tp) and part in _fields(tp):
            info = _fields(tp)[part]
            tp = info.annotation
            path = f"{path}.{part}" if path else str(part)
        elif isinstance(part, int) and _arm(tp, list) is not None:
            tp = get_args(_arm(tp, list))[0]
            path = f"{path}[{part}]"
        elif isinstance(part, str) and _arm(tp, dict) is not None and part != "[key]":
            tp = get_args(_arm(tp, dict))[1]
            path = f"{path}.{part}"
        elif isinstance(part, str) and _union_arm(tp, part) is not None:
            # The tag of the union member the rest of the location lies in ("list[...]", a group's name).
            tp = _union_arm(tp, part)
        else:
            # The tag pydantic gives one member of a union ("int", "list[str]"): the value failed every
            # member, so the problem is the field's as a whole.
            break
    return path, tp, info


def _union_arm(tp: Any, tag: str) -> Any:
    """The member of the union ``tp`` that pydantic's location tag names: the list member for
    ``list[...]``, a group (config dataclass) whose name the tag ends with; None for a scalar member."""
    tp = _unwrap(tp)
    if not _is_union(tp):
        return None
    if tag.startswith("list["):
        return _arm(tp, list)
    for arm in get_args(tp):
        arm = _unwrap(arm)
        if _is_group(arm) and tag.rstrip("]").endswith(arm.__name__):
            return arm
    return None


def _bounds(info: Any) -> str:
    """A field's range as its ``Field(ge=..., lt=...)`` constraints say: ``must be >= 1``, ``must be in [0, 1)``."""
    low = high = None
    for c in info.metadata if info is not None else ():
        if isinstance(c, annotated_types.Ge):
            low = f"[{c.ge}"
        elif isinstance(c, annotated_types.Gt):
            low = f"({c.gt}"
        elif isinstance(c, annotated_types.Le):
            high = f"{c.le}]"
        elif isinstance(c, annotated_types.Lt):
            high = f"{c.lt})"
    if low and high:
        return f"must be in {low}, {high}"
    if low:
        return f"must be {'>=' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f"must be {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return "out of range"


def _choices(tp: Any) -> list[str]:
    """The choices of a Literal type (or of the Literal member of a union)."""
    tp = _unwrap(tp)
    for arm in get_args(tp) if _is_union(tp) else (tp,):
        if get_origin(_unwrap(arm)) is Literal:
            return [str(c) for c in get_args(_unwrap(arm))]
    return []


def _all_keys() -> dict[str, str]:
    """field name -> full key path, over every group."""
    return {name: f"{g}.{name}" for g, cls in GROUPS.items() for name in _fields(cls)}


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


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _error_path(e: Mapping[str, Any]) -> str:
    """The key path an error is about, as deep as it goes (an unknown key and a rule inside a list entry
    included), for telling which of a union's errors reaches deepest."""
    path = _locate(e["loc"])[0]
    if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{_locate(e['loc'][:-1])[0]}.{e['loc'][-1]}"
    if e["type"] == "glmtune_rules" and e["loc"]:
        return f"{path}.{e['ctx']['problems'][0][0]}"
    return path


def _problems(err: ValidationError) -> list[_Problem]:
    """Each of pydantic's errors as one problem naming the key path; a value that fails every member of
    a union is one problem, not one per member."""
    out: list[_Problem] = []
    seen: set[str] = set()
    errors = err.errors(include_url=False)
    # A value inside a union (data.train_file: a path or a list of sources) fails each member; the error
    # that reaches deepest says what is wrong, so one that a deeper error's path extends is left out.
    located = [_error_path(e) for e in errors]
    deeper = [any(o != p and o.startswith((p + ".", p + "[")) for o in located) for p in located]
    for e, is_covered in zip(errors, deeper):
        kind, loc, value = e["type"], e["loc"], e.get("input")
        if is_covered:
            continue
        if kind == "glmtune_rules":
            where, tp, _ = _locate(loc)
            if _is_group(_unwrap(tp)) and _unwrap(tp) not in GROUPS.values():  # a list entry's own rules
                out += [_Problem(f"{where}.{path}", f"{where}: {msg}") for path, msg in e["ctx"]["problems"]]
            else:
                out += [_Problem(path, msg) for path, msg in e["ctx"]["problems"]]
            continue
        if kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):  # invalid: not a string
            where, tp, _ = _locate(loc[:-1])
            if len(loc) > 2 and _is_group(_unwrap(tp)):
                out.append(_unknown(where, str(loc[-1]), list(_fields(_unwrap(tp))), where))
                continue
            group = str(loc[0]) if len(loc) > 1 else None
            valid = list(_fields(GROUPS[group])) if group in GROUPS else list(GROUPS)
            out.append(_unknown(group or "", str(loc[-1]), valid, group))
            continue
        path, tp, info = _locate(loc)
        if path in seen:
            continue
        seen.add(path)
        if kind == "missing":
            out.append(_Problem(path, f"missing required key {path} ({info.description})"))
        elif _is_group(_unwrap(tp)):
            what = f"the keys of {path}" if path else "groups (model, data, method, train, eval)"
            out.append(_Problem(path, f"{path}: expected a mapping of {what}, got {_show(value)}"))
        elif kind == "glmtune":
            out.append(_Problem(path, f"{path}: {e['ctx']['msg']}"))
        elif kind in _RANGE_ERRORS:
            out.append(_Problem(path, f"{path}: {_bounds(info)}, got {_show(value)}"))
        elif kind == "too_short":
            out.append(
                _Problem(path, f"{path}: must not be empty (leave it out or set null for the default)")
            )
        else:  # the value is not of the field's type
            msg = f"{path}: expected {_type_name(tp)}, got {_show(value)}"
            close = difflib.get_close_matches(value, _choices(tp), n=1) if isinstance(value, str) else []
            if close:
                msg += f"; did you mean {close[0]!r}?"
            out.append(_Problem(path, msg))
    # In the documented order of the groups (pydantic lists a group's unknown keys after its fields).
    order = {name: i for i, name in enumerate(GROUPS)}
    return sorted(out, key=lambda p: order.get(p.path.split(".")[0].split("[")[0], -1))


def _validated(raw: Mapping[str, Any], source: str | None, origins: Mapping[str, str]) -> RunConfig:
    """pydantic's validation of ``raw``; its errors as one :class:`ConfigError`."""
    try:
        return _RUN_CONFIG.validate_python(raw)
    except ValidationError as err:
        raise ConfigError(_format_problems(_problems(err), source, origins)) from None


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
                or problem.path.startswith((key + ".", key + "["))
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
    working directory but present in ``config_dir`` replaced by its absolute path there (also each
    path of a list of sources). Keys set by an override, absolute paths and paths found from the
    working directory are left as they are."""

    def beside(value: Any) -> Any:
        if isinstance(value, dict):
            return {**value, "path": beside(value.get("path"))} if "path" in value else value
        if not isinstance(value, str) or not value:
            return value
        path = Path(value).expanduser()
        if path.is_absolute() or path.exists() or not (config_dir / path).exists():
            return value
        return os.path.abspath(config_dir / path)

    for group, key in _BESIDE_CONFIG_KEYS:
        node = raw.get(group)
        if not isinstance(node, dict) or key not in node or f"{group}.{key}" in origins:
            continue
        value = node[key]
        node[key] = [beside(v) for v in value] if isinstance(value, list) else beside(value)
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
    return _validated(raw, source, origins)


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


def _default_text(info: Any) -> str:
    if info.is_required():
        return "required"
    return "default: " + _yaml_value(info.get_default(call_default_factory=True))


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
        for name, info in _fields(cls).items():
            lines.append(f"  {group}.{name} ({_type_name(info.annotation)}; {_default_text(info)})")
            lines += textwrap.wrap(
                info.description, width=100, initial_indent="      ", subsequent_indent="      "
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
            problems.append(
                _Problem(group, f"{group}: expected a mapping of the keys of {group}, got {_show(values)}")
            )
        else:
            names = list(_fields(GROUPS[group]))
            problems += [_unknown(group, str(k), names, group) for k in values if k not in names]
    if problems:
        raise ConfigError(_format_problems(problems, "example config", {}))
    lines = [f"# {line}" if line else "#" for line in title.strip().splitlines()]
    run_help = {name: info.description for name, info in _fields(RunConfig).items()}
    for group, cls in GROUPS.items():
        values = cfg_dict.get(group)
        if not values:
            continue
        lines.append("")
        lines += _comment(run_help[group], "")
        lines.append(f"{group}:")
        for name, info in _fields(cls).items():
            if name in values:
                lines += _comment(info.description, "  ")
                lines.append(f"  {name}: {_yaml_value(values[name])}")
    return "\n".join(lines) + "\n"

"""The training recipe: one function that reads top to bottom.

    check the config against the machine -> tokenizer and template -> tokenized data (cached) ->
    model (+ adapter to continue from) -> method makes it trainable -> HF Trainer -> summary

Multi-GPU / multi-node runs use the same code under ``accelerate launch`` or ``torchrun``; the Trainer
(accelerate underneath, DeepSpeed/FSDP through ``train.deepspeed`` or the accelerate config) does the
distribution.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json
from ..config import CONFIG_FILENAME, RunConfig, save_config
from ..errors import ConfigError, GlmtuneError
from ..resolve import ResolvedModel, resolve_model
from ..runs import Run
from ..user_templates import save_run_template
from .methods import check_quantization, get_method, prepare_quantized, trainable_summary


def check_launcher(cfg: RunConfig) -> None:
    """Refuse a run config that disagrees with what ``accelerate launch`` set up for DeepSpeed (its
    DeepSpeed configs, configs/accelerate/deepspeed_zero*.yaml), naming both sides; accelerate's and
    transformers' own errors come only after the model is loaded and name neither glmtune field."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true", "yes"):
        return
    if cfg.train.deepspeed:
        raise ConfigError(
            f"train.deepspeed={cfg.train.deepspeed}: this run was started by accelerate launch with a DeepSpeed "
            "config (configs/accelerate/deepspeed_zero*.yaml), which sets DeepSpeed up already; set "
            "train.deepspeed=null, or launch with configs/accelerate/ddp.yaml or torchrun to use the json"
        )
    launched = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    wanted = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[cfg.train.precision]
    if launched in ("no", "fp16", "bf16") and launched != wanted:
        as_precision = "fp32" if launched == "no" else launched
        raise ConfigError(
            f"train.precision={cfg.train.precision}, but accelerate launch was given mixed_precision "
            f"{launched} (the accelerate config or --mixed_precision); make them agree: "
            f"--mixed_precision {wanted} or train.precision={as_precision}"
        )


def check_device(cfg: RunConfig) -> None:
    """Refuse what the machine can't do before any weight is read."""
    check_launcher(cfg)
    cuda = torch.cuda.is_available()
    cfg.check_device(
        cuda=cuda,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        device_name=torch.cuda.get_device_name() if cuda else "",
    )
    check_quantization(cfg.model.quantization)
    if cfg.model.dtype == "float16" and not cuda:
        raise ConfigError(
            "model.dtype=float16 is not usable for training on the CPU; use float32 or bfloat16"
        )


def _resume_path(cfg: RunConfig) -> str | None:
    """The checkpoint ``train.resume`` names in the run folder (``Run.resume_path``), as the Trainer takes it."""
    path = Run.of(cfg).resume_path(cfg.train.resume)
    return str(path) if path is not None else None


def _encode_settings(cfg: RunConfig):
    from ..data.encode import EncodeSettings

    d = cfg.data
    return EncodeSettings(
        max_source_length=d.max_source_length,
        max_target_length=d.max_target_length,
        max_length=d.max_length,
        train_on_prompt=d.train_on_prompt,
    )


def _split_rows(n: int, cfg: RunConfig) -> tuple[list[int], list[int]]:
    """The rows of the tokenized train_file that stay for training and that data.eval_ratio splits off."""
    from datasets import Dataset

    d = cfg.data
    rows = Dataset.from_dict({"row": list(range(n))}).train_test_split(
        test_size=d.eval_ratio, seed=d.seed if d.seed is not None else cfg.train.seed
    )
    return rows["train"]["row"], rows["test"]["row"]


@dataclass
class _Data:
    """One split's data as read: the tokenized set, its sources with their cache records, and the mix."""

    dataset: Any
    sources: list
    infos: list
    mix: Any  # glmtune.data.sources.MixReport
    picked: list[list[int]]  # per source, its tokenized rows in the set, in order

    def reports(self, split: str) -> dict:
        """Label -> CacheInfo: ``train`` for one source, ``train <source>`` for each of several."""
        if len(self.sources) == 1:
            return {split: self.infos[0]}
        return {f"{split} {s.name}": info for s, info in zip(self.sources, self.infos)}


def _read_split(cfg: RunConfig, model: ResolvedModel, which: str) -> _Data | None:
    """data.train_file / data.eval_file: each source tokenized through the cache, then mixed
    (glmtune.data.sources; one plain file is that file's rows, unchanged)."""
    from ..data.sources import tokenize_sources

    d = cfg.data
    sources = d.sources(which)
    if not sources:
        return None
    dataset, infos, mix, picked = tokenize_sources(
        sources,
        model,
        seed=d.seed if d.seed is not None else cfg.train.seed,
        settings=_encode_settings(cfg),
        cache_dir=d.cache_dir,
        skip_invalid=d.skip_invalid,
    )
    return _Data(dataset, sources, infos, mix, picked)


def _datasets(cfg: RunConfig, model: ResolvedModel):
    """(train set, eval set or None, {"train": _Data, "eval": _Data}) of the config's data."""
    d = cfg.data
    data = {"train": _read_split(cfg, model, "train")}
    train, evals = data["train"].dataset, None
    if d.eval_file:
        data["eval"] = _read_split(cfg, model, "eval")
        evals = data["eval"].dataset
    elif d.eval_ratio > 0:
        # The same split as train.train_test_split(test_size, seed), with the rows known (the generation
        # metrics need the eval split's raw examples: _generation_examples).
        train_rows, eval_rows = _split_rows(len(train), cfg)
        train, evals = train.select(train_rows), train.select(eval_rows)
    return train, evals, data


def _kept_examples(cfg: RunConfig, model: ResolvedModel, tokenizer, source, info) -> list:
    """A source's examples as read, aligned with its tokenized rows (those that kept a reply token)."""
    from ..data import read_examples
    from ..data.encode import encode_all
    from ..data.sources import source_file

    d = cfg.data
    path = source_file(source, d.cache_dir)
    raw = read_examples(path, fmt=source.format, columns=source.columns, skip_invalid=d.skip_invalid).examples
    if info.stats.dropped or info.stats.invalid:
        settings = _encode_settings(cfg)
        raw = [
            ex for ex in raw if encode_all(tokenizer, model.template, [ex], settings, skip_invalid=True)[0]
        ]
    if len(raw) != info.rows:
        raise GlmtuneError(
            f"{path}: {len(raw)} examples read but {info.rows} tokenized rows; the eval examples for "
            "eval.predict_with_generate cannot be matched (clear data.cache_dir and retry)"
        )
    return raw


def _generation_examples(cfg: RunConfig, model: ResolvedModel, tokenizer, data: dict) -> list:
    """The eval examples generation is scored on, as read (prompt and reference reply), the first
    ``eval.num_samples`` of them: the rows of data.eval_file, or the rows data.eval_ratio split off."""
    split = data.get("eval") or data["train"]
    examples = [
        kept[i]
        for source, info, rows in zip(split.sources, split.infos, split.picked)
        for kept in [_kept_examples(cfg, model, tokenizer, source, info)]
        for i in rows
    ]
    if "eval" not in data:
        examples = [examples[i] for i in _split_rows(len(examples), cfg)[1]]
    n = cfg.eval.num_samples
    return examples[:n] if n else examples


def _generation_eval(cfg: RunConfig, model: ResolvedModel, tokenizer, data, has_eval: bool, printer):
    """The :class:`~.generation_eval.GenerationEval` of ``eval.predict_with_generate`` (None without it),
    with ``eval.best_metric`` checked against the metrics it will log, before any weight is read."""
    from ..inference import GenerationSettings
    from .generation_eval import EVAL_LOSS, GenerationEval

    e = cfg.eval
    generation = None
    if e.predict_with_generate and has_eval:
        from ..metrics import _eval_libs

        try:
            _eval_libs()  # jieba, rouge_chinese, nltk: before any weight is read, not at the first evaluation
        except ImportError as err:
            raise ConfigError(
                f"eval.predict_with_generate: {err}; or set eval.predict_with_generate=false"
            ) from err
        settings = GenerationSettings(
            max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p
        )
        examples = _generation_examples(cfg, model, tokenizer, data)
        generation = GenerationEval(
            examples,
            tokenizer,
            model.spec,
            settings,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            template=model.template,
        )
        generation.check_best_metric(e.best_metric)
        printer(
            f"eval: generating for {len(generation)} examples at every evaluation (at most "
            f"{e.max_new_tokens} new tokens); logging {', '.join(generation.names)} "
            f"(task {generation.task}, ROUGE/BLEU as {generation.definition}); best/ follows {e.best_metric}"
        )
    elif e.predict_with_generate:
        printer(
            "eval.predict_with_generate: there is no eval data (data.eval_file or data.eval_ratio), "
            "nothing to generate for"
        )
    if generation is None and e.best_metric != EVAL_LOSS:
        raise ConfigError(
            f"eval.best_metric: {e.best_metric} is a generation metric, but nothing is generated "
            "(eval.predict_with_generate needs eval data: data.eval_file or data.eval_ratio); "
            f"choices: {EVAL_LOSS}"
        )
    return generation


def _sharded(trainer) -> bool:
    """Weights sharded across processes (DeepSpeed ZeRO-3, FSDP): the Engine cannot generate there."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return bool(trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled()))


def _zero3_partitioned(model) -> bool:
    """The model's weights are ZeRO-3 partitions (built under ``deepspeed.zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _partition_sizes(model) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model) of a ZeRO-3 partitioned model: each
    parameter keeps its slice in ``ds_tensor`` (``numel`` / world size, padded) and ``ds_numel`` whole."""
    held = whole = 0
    for p in model.parameters():
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        whole += getattr(p, "ds_numel", p.numel())
    return held, whole


def _training_arguments(cfg: RunConfig, has_eval: bool):
    """The run's TrainingArguments. Made before the model is loaded (they set up DeepSpeed, see
    ``train``); ``include_num_input_tokens_seen`` is settled once the collator is known."""
    import dataclasses

    from transformers import TrainingArguments

    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"

    t = cfg.train
    eval_steps = t.eval_steps or t.save_steps
    warmup = t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio
    return TrainingArguments(
        output_dir=t.output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type=t.lr_scheduler,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        **{
            ckpt: t.gradient_checkpointing,
            f"{ckpt}_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None,
        },
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        deepspeed=t.deepspeed,
        dataloader_num_workers=t.num_workers,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        length_column_name="length",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )


def train(cfg: RunConfig, printer=print) -> dict:
    """Run a fine-tuning job described by ``cfg``; returns the train summary (also written to JSON)."""
    from ..loading import load_model, load_tokenizer
    from .generation_eval import EVAL_LOSS, metric_key
    from .trainer import BestAndPlotCallback, GlmtuneTrainer, ProgressCallback, plot_losses

    t0 = time.time()
    # 1. What the machine and the model can do, before reading any weight. The model is resolved once
    # (model.generation overrides detection) and that object goes to the tokenizer, data and loader.
    check_device(cfg)
    resolved = resolve_model(
        cfg.model.path,
        generation=cfg.model.generation,
        adapter=cfg.model.adapter,
        dtype=cfg.model.dtype,
        quantization=cfg.model.quantization,
        trust_remote_code=cfg.model.trust_remote_code,
        # A prompt template (shipped name or YAML file); the field may be absent from an older config.
        template=cfg.model.template,
    )
    spec, model_path = resolved.spec, resolved.path
    method = get_method(cfg.method.name)
    if method.name == "ptuning_v2" and not spec.supports_ptuning:
        raise ConfigError(
            f"method.name=ptuning_v2: P-Tuning v2 is not supported for {spec.name} models "
            f"({model_path}); use lora or full"
        )
    if cfg.data.packing:
        from ..data.collate import check_packing

        check_packing(resolved)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILENAME)
    save_run_template(resolved, out)

    # 2. Tokenizer and data (tokenized once, cached on disk).
    tokenizer = load_tokenizer(resolved)
    train_set, eval_set, data = _datasets(cfg, resolved)
    reports = {k: v for which, split in data.items() for k, v in split.reports(which).items()}
    for split, info in reports.items():
        st = info.stats
        printer(
            f"{split} data: {info.rows} examples ({'cached' if info.hit else 'tokenized'} in {info.seconds:.1f} s); "
            f"{st.truncated} truncated ({st.tokens_removed} tokens removed), {st.dropped} dropped, "
            f"{len(st.invalid)} invalid rows skipped"
        )
    # Generation metrics (eval.predict_with_generate): their eval examples, and eval.best_metric checked.
    for which, split in data.items():
        if len(split.sources) > 1 or split.mix.total != split.infos[0].rows:
            printer(f"{which} mix (seed {split.mix.seed}): {split.mix.total} rows")
            for line in split.mix.lines():
                printer(line)
    generation = _generation_eval(cfg, resolved, tokenizer, data, eval_set is not None, printer)

    # 3. Model, then the method makes it trainable.
    # The TrainingArguments come first: under DeepSpeed ZeRO-3 (train.deepspeed, or accelerate's DeepSpeed
    # plugin with zero3_init_flag) they hold the HfDeepSpeedConfig that makes the loaders build the model
    # already partitioned across the ranks (deepspeed.zero.Init), so no rank holds the whole model.
    args = _training_arguments(cfg, eval_set is not None)
    # Seed before the model is built: LoRA A matrices and a fresh P-Tuning prefix come from the global
    # RNG (the Trainer seeds only later), so without this one config starts from different weights.
    from transformers import set_seed

    set_seed(cfg.train.seed)
    model = load_model(resolved, trainable_adapter=True, **method.load_kwargs(cfg.method))
    if _zero3_partitioned(model):
        held, whole = _partition_sizes(model)
        printer(
            f"DeepSpeed ZeRO-3: rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()} "
            f"holds {held:,} of the {whole:,} base parameters (its partition)",
            flush=True,
        )
    if resolved.quantization:  # load_model quantized the base as it streamed in: k-bit training set-up
        model = prepare_quantized(model)
    model = method.prepare(model, spec, cfg.method)
    model.train()
    if cfg.train.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    trainable, total = trainable_summary(model)
    printer(
        f"model: {spec.name} ({type(model).__name__}), method {method.name}: "
        f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%)"
    )

    # 4. The run: the stock Trainer with glmtune's callbacks.
    from datasets import Dataset

    from ..data.collate import DataCollator, FlatCollator, PackedCollator, pack_examples
    from .fast_attention import use_padding_free_attention

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.data.packing:
        if cfg.data.max_length is None:
            raise ConfigError("data.packing needs data.max_length (the length of a packed row)")
        train_set = Dataset.from_list(pack_examples(train_set, cfg.data.max_length, model=model))
        collator = PackedCollator(pad_id, model=model)
    elif cfg.data.padding_free and _can_flatten(model):
        collator = FlatCollator(pad_id)
    else:
        collator = DataCollator(pad_id)
    # TensorBoard event files go to <output_dir>/tensorboard (transformers 5 takes the folder from the env).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    # Padding-free and packed batches carry no attention_mask: their tokens are all counted (exact for
    # padding-free rows; packed rows add their short per-batch padding).
    args.include_num_input_tokens_seen = "non_padding" if isinstance(collator, DataCollator) else "all"
    base_config = dict(resolved.config) or None  # config.json as resolved (None for GGUF)
    generated = [metric_key(name) for name in generation.names] if generation is not None else []
    progress = ProgressCallback(printer, metrics=generated)
    best = BestAndPlotCallback(metric_key(cfg.eval.best_metric), plot_metrics=generated)

    def save_extras(folder: Path) -> None:
        save_config(cfg, folder / CONFIG_FILENAME)
        save_run_template(resolved, folder)
        if method.name == "full":
            tokenizer.save_pretrained(str(folder))

    trainer = GlmtuneTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        callbacks=[progress, best],
        method=method,
        save_extras=save_extras,
        logits_at_labels_only=cfg.train.logits_at_labels_only,
        loss_chunk_size=cfg.train.loss_chunk_size,
        generation_eval=generation,
    )
    if generation is not None and _sharded(trainer):
        if cfg.eval.best_metric != EVAL_LOSS:
            raise ConfigError(
                f"eval.best_metric: {cfg.eval.best_metric} needs eval.predict_with_generate, which does not "
                f"run with sharded weights (DeepSpeed ZeRO-3, FSDP); choices here: {EVAL_LOSS}"
            )
        printer(
            "eval.predict_with_generate: not supported with sharded weights (DeepSpeed ZeRO-3, FSDP); "
            "evaluation logs the eval loss only (score the checkpoints with glmtune eval)"
        )
        trainer.generation_eval = generation = None
        generated, progress.metrics, best.plot_metrics = [], (), ()
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressCallback prints the readable line instead
    trainer.base_official_config = base_config
    best.trainer = trainer
    resume = _resume_path(cfg)
    if resume:
        printer(f"resuming from {resume}")
    with use_padding_free_attention(model) if isinstance(collator, FlatCollator) else _nothing():
        result = trainer.train(resume_from_checkpoint=resume)

    # 5. Final weights, plot and summary. Every rank takes part (ZeRO-3 gathers the weights), one writes,
    # and final/ appears whole.
    final = out / "final"
    trainer.save_model_atomic(final)
    if trainer.args.should_save:  # one writer: ranks share the temporary file name
        plot_losses(trainer.state.log_history, out / "loss.png", metrics=generated)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    seconds = time.time() - t0
    summary = {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": result.training_loss,
        "final_train_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
        ),
        "best_eval_loss": min(evals) if evals else None,
        "last_eval_loss": evals[-1] if evals else None,
        "best_metric": cfg.eval.best_metric,
        "best_step": best.best_step,
        "best_value": best.best if best.best_step is not None else None,
        "generation_metrics": _metric_summary(trainer.state.log_history, generated)
        if generation is not None
        else None,
        "generation_eval": {
            "examples": len(generation),
            "task": generation.task,
            "rouge_bleu_definition": generation.definition,
            "max_new_tokens": cfg.eval.max_new_tokens,
        }
        if generation is not None
        else None,
        "train_seconds": result.metrics.get("train_runtime"),
        "total_seconds": seconds,
        "train_examples": len(train_set),
        # Each source's rows available and used and its share of the set (glmtune.data.sources).
        "data_mix": {which: split.mix.as_dict() for which, split in data.items()},
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": (trainer.state.num_input_tokens_seen or 0)
        / max(result.metrics.get("train_runtime", 1), 1e-9),
        "peak_memory_bytes": _peak_memory(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "method": method.name,
        "generation": spec.name,
        "output": str(final),
    }
    if trainer.args.should_save:
        write_json(out / "train_summary.json", summary, indent=2)
    printer(f"done: {summary['steps']} steps in {seconds:.0f} s, final weights in {final}")
    return summary


def _metric_summary(history: list[dict], keys: list[str]) -> dict:
    """``name -> {"best", "best_step", "last"}`` of each generation metric logged (all higher-is-better)."""
    out = {}
    for key in keys:
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            step, value = max(points, key=lambda p: p[1])  # the first step of the highest value
            out[key.removeprefix("eval_")] = {"best": value, "best_step": step, "last": points[-1][1]}
    return out


def _can_flatten(model) -> bool:
    """Padding-free batches need what packing needs: one position per token, no P-Tuning prefix."""
    from ..data.collate import check_packing

    try:
        check_packing(model)
    except ConfigError:
        return False
    return True


@contextlib.contextmanager
def _nothing():
    yield


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

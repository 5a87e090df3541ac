"""glmtune's additions to the transformers ``Trainer`` (the run itself is the stock Trainer/accelerate).

- checkpoints appear atomically: written under ``.staging/`` and renamed into ``checkpoint-<step>``;
- the method decides what a checkpoint holds (peft adapter, official P-Tuning layout, full model) and
  the resolved config and tokenizer are saved beside it;
- a non-finite loss stops the run, naming the step, before anything is saved over the last good
  checkpoint;
- resuming a P-Tuning run reads the prefix back from the official layout;
- the loss is computed at the labelled positions only (``train.logits_at_labels_only``, see
  :mod:`glmtune.train.fast_loss`): the output layer never maps prompt or padding positions to the
  vocabulary;
- with ``eval.predict_with_generate`` every evaluation also generates and logs ROUGE/BLEU and task
  metrics beside the eval loss (:mod:`glmtune.train.generation_eval`); ``best/`` follows
  ``eval.best_metric``;
- ``metrics.jsonl`` in the run folder follows the log history as it grows, and SIGTERM stops a
  single-process run after a checkpoint of its current step (what glmtune web's Train tab reads and sends).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..adapters import load_prefix
from ..atomic import atomic_dir, replace_dir, write_bytes
from ..errors import GlmtuneError

STAGING = ".staging"


class TrainingDiverged(GlmtuneError):
    """The training loss became NaN or infinite."""


class TrainingStopped(GlmtuneError):
    """The run was asked to stop (SIGTERM) and stopped after saving a checkpoint of its last step."""


class CheckpointSaveError(GlmtuneError, OSError):
    """Writing a checkpoint failed (disk full, read-only folder): names the step, the folder being
    written and the last good checkpoint, which is left as it was."""


def _save_failed(error: Exception, what: str, where: Path, output_dir: str) -> CheckpointSaveError:
    last = _last_checkpoint(output_dir)
    file = getattr(error, "filename", None)
    reason = (getattr(error, "strerror", None) or str(error)) + (f" ({file})" if file else "")
    if isinstance(error, RuntimeError):  # torch.save's writer: the cause is not in its message
        reason = f"a file write failed (torch.save: {error})"
    try:
        free = f" ({shutil.disk_usage(output_dir).free:,} bytes free there)"
    except OSError:
        free = ""
    text = (
        f"{reason}: saving {what} into {where}{free} failed; "
        + (f"the last good checkpoint, {last}, is intact. " if last else "no checkpoint was saved before. ")
        + f"Free disk space or make {output_dir} writable, then resume with train.resume=latest."
    )
    errno = getattr(error, "errno", None)
    return CheckpointSaveError(errno, text) if errno is not None else CheckpointSaveError(text)


class GlmtuneTrainer(Trainer):
    def __init__(
        self,
        *args,
        method,
        save_extras,
        logits_at_labels_only: bool = True,
        loss_chunk_size: int = 1024,
        generation_eval=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.method = method
        # generation_eval(trainer) -> {metric: value}: generation metrics added to every evaluation
        # (glmtune.train.generation_eval.GenerationEval), or None.
        self.generation_eval = generation_eval
        # save_extras(out_dir): writes the resolved config, tokenizer and anything else a checkpoint needs.
        self.save_extras = save_extras
        self.logits_at_labels_only = logits_at_labels_only
        self.loss_chunk_size = loss_chunk_size
        self._output_layer = _output_layer(self.model) if logits_at_labels_only else None
        # For readers that follow the run (glmtune web's Train tab): metrics.jsonl, and SIGTERM as "stop".
        self.add_callback(MetricsLogCallback())
        self._graceful_stop = GracefulStopCallback()
        self.add_callback(self._graceful_stop)

    def train(self, *args, **kwargs):
        """The stock loop. A SIGTERM while it runs (``kill``, glmtune web's Stop) ends it at the end of the
        current step with a checkpoint of that step, then raises :class:`TrainingStopped`, so that
        ``train.resume=latest`` continues from exactly there (see :class:`GracefulStopCallback`)."""
        with self._graceful_stop.installed(self.args):
            result = super().train(*args, **kwargs)
        stop = self._graceful_stop
        if stop.requested and self.state.global_step < self.state.max_steps:
            raise TrainingStopped(
                f"stopped by {stop.requested} at step {self.state.global_step} of {self.state.max_steps}: "
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step} is saved in {self.args.output_dir}; "
                "continue with train.resume=latest"
            )
        return result

    def _labelled_loss_applies(self, model, inputs) -> bool:
        return (
            self._output_layer is not None
            and "labels" in inputs
            and "shift_labels" not in inputs
            and self.label_smoother is None
            and self.compute_loss_func is None
            # evaluation: only when nothing but the loss is wanted (no logits for compute_metrics)
            and (model.training or self.compute_metrics is None)
            # ZeRO-3 gathers a layer's weight only around its own forward and backward: the loss computed
            # beside the output layer's forward would need its weight again in the backward pass
            # (DeepSpeed fails with "active_backward_submodules is empty").
            and not (self.is_deepspeed_enabled and _zero3())
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stock loss, computed at the labelled positions only (see :mod:`.fast_loss`)."""
        # A batch (or accumulation window) without a single target token, e.g. every reply truncated
        # away: its loss is 0 (no gradient) rather than 0 / 0 = NaN, which the NaN guard would stop on.
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.clamp(min=1)
        elif num_items_in_batch is not None:
            num_items_in_batch = max(num_items_in_batch, 1)
        if not self._labelled_loss_applies(model, inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .fast_loss import LabelledOutputs

        labels = inputs["labels"]
        # ZeRO-3 / FSDP shard the output layer's weight outside its forward: only the plain path there.
        fused = not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        with LabelledOutputs(self._output_layer, labels, self.loss_chunk_size, fused=fused) as head:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        if head.loss_sum is None:  # the model does not feed the output layer [B, T, H]: stock path
            self._output_layer = None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(head.loss_sum.device)
            loss = head.loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:  # as Trainer.compute_loss scales it
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        else:
            loss = head.loss_sum / max(head.count, 1)  # the mean over the target tokens (0 when none)
        if isinstance(outputs, dict):
            outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The stock loop (the eval loss), plus the generation metrics of ``generation_eval`` under the same
        prefix: ``evaluate`` logs them in one entry with the loss and passes them to the callbacks."""
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self.generation_eval is not None and metric_key_prefix == "eval":
            for name, value in self.generation_eval(self).items():
                output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            last = _last_checkpoint(self.args.output_dir)
            raise TrainingDiverged(
                f"training loss is {loss.item()} at step {self.state.global_step + 1}; stopping. "
                + (f"The last good checkpoint is {last}." if last else "No checkpoint was saved yet.")
                + " Lower train.learning_rate or use train.precision=fp32/bf16."
            )
        return loss

    def _save(self, output_dir: str | None = None, state_dict=None):
        # transformers 5 calls _save on every rank (its own _save returns early on non-writers): only
        # the process that saves writes, or the ranks race on the same files.
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Under DeepSpeed ZeRO-3 / FSDP transformers passes the gathered full state dict: the local
        # parameters are only shards then, so save what was gathered.
        self.method.save(
            self.accelerator.unwrap_model(self.model),
            out,
            getattr(self, "base_official_config", None),
            state_dict=state_dict,
        )
        self.save_extras(out)

    def save_model_atomic(self, target: Path, extra=None) -> None:
        """``save_model`` into ``target``, which appears whole or not at all and replaces what was there.

        Every rank calls it (under ZeRO-3 the weights are gathered collectively); the process that saves
        writes into a fresh temporary folder beside ``target`` (``atomic_dir``) whose name the others
        receive, then ``extra(folder)`` adds its files, and the folder is renamed into place once every
        rank is done with it.
        """
        target = Path(target)
        distributed = self.args.parallel_mode.value == "distributed"
        with atomic_dir(target, overwrite=True) if self.args.should_save else _no_folder() as tmp:
            if distributed:
                box = [str(tmp) if tmp is not None else None]
                torch.distributed.broadcast_object_list(box, src=0)
                tmp = Path(box[0])
            self.save_model(str(tmp))
            if extra is not None and self.args.should_save:
                extra(tmp)
            if distributed:
                torch.distributed.barrier()

    def _save_checkpoint(self, model, trial):
        from safetensors import SafetensorError

        try:
            self._save_checkpoint_staged(model, trial)
        except CheckpointSaveError:
            raise
        except (OSError, SafetensorError, RuntimeError) as e:
            # torch.save reports a failed write (a full disk) only as "[enforce fail at
            # inline_container.cc...] unexpected pos" or "PytorchStreamWriter failed writing".
            if (
                isinstance(e, RuntimeError)
                and "inline_container" not in str(e)
                and "StreamWriter" not in str(e)
            ):
                raise
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            where = Path(self.args.output_dir) / STAGING / name
            raise _save_failed(e, name, where, self.args.output_dir) from e

    def _save_checkpoint_staged(self, model, trial):
        real = self.args.output_dir
        staging = Path(real) / STAGING
        distributed = self.args.parallel_mode.value == "distributed"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            # An old checkpoint-<step> that a process killed inside replace_dir (below) left aside.
            for aside in Path(real).glob(f".{PREFIX_CHECKPOINT_DIR}-*.old-*"):
                shutil.rmtree(aside, ignore_errors=True)
            staging.mkdir(parents=True)
        # Every rank writes into the checkpoint (rng_state_<rank>.pth): only once the staging folder is
        # fresh, and the rename waits until every rank's files are in.
        if distributed:
            torch.distributed.barrier()
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = real
        if distributed:
            torch.distributed.barrier()
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            # A re-run of the same step after a resume replaces checkpoint-<step> whole. replace_dir moves
            # the old one aside before the new one goes in, never deletes it in place: a kill mid-delete
            # would leave a partial checkpoint-<step> that train.resume=latest then picks.
            replace_dir(staging / name, Path(real) / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=real,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        if self.args.parallel_mode.value == "distributed":
            torch.distributed.barrier()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.method.name == "ptuning_v2":
            load_prefix(self.accelerator.unwrap_model(model or self.model), Path(resume_from_checkpoint))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


@contextlib.contextmanager
def _no_folder():
    yield None


def _zero3() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _output_layer(model):
    """The output layer when the labelled-positions loss can drive it, else None.

    The model (under peft: its base model) must be a causal LM that feeds its output layer the final
    hidden states as ``[batch, positions, hidden]``: transformers' models whose forward takes
    ``logits_to_keep`` (GlmForCausalLM for ChatGLM2/3 and GLM-4 and glmtune's P-Tuning subclass of it,
    Llama, Qwen, ...) and glmtune's ChatGLM-6B class. Remote-code models (other layouts) keep the stock loss.
    """
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_output_embeddings"):
        return None
    try:
        head = base.get_output_embeddings()
        # the class or a parent it extends (glmtune's P-Tuning subclass of GlmForCausalLM)
        takes = any(
            "logits_to_keep" in inspect.signature(cls.forward).parameters
            for cls in type(base).__mro__
            if "forward" in vars(cls)
        )
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return None
    if head is None or not takes or not isinstance(head, torch.nn.Module):
        return None
    return head


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressCallback(TrainerCallback):
    """A tqdm bar and, every ``logging_steps``, the line users read:

    ``step 900/1804 (49.9%) epoch 1 loss 0.7807 lr 2.9e-05 1.25 step/s 410 tok/s ETA 00:12:05``

    and, at each evaluation, the eval loss and the generation metrics ``metrics`` (logged keys, e.g.
    ``eval_rouge-l``): ``step 500: eval loss 2.1034, rouge-1 31.2000, ..., bleu-4 8.5000``.
    """

    def __init__(self, printer=print, metrics=()):
        self.printer = printer
        self.metrics = tuple(metrics)
        self.bar = None
        self.t0 = self.last_t = None
        self.last_step = 0
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                dynamic_ncols=True,
                leave=False,
                disable=not os.isatty(2),
            )
        self.t0 = self.last_t = time.time()
        self.last_step = state.global_step
        self.last_tokens = state.num_input_tokens_seen or 0
        self.first_step = state.global_step

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        if "loss" in logs:
            steps = state.global_step - self.last_step
            dt = max(now - self.last_t, 1e-9)
            tokens = (state.num_input_tokens_seen or 0) - self.last_tokens
            done = state.global_step - self.first_step
            rate = done / max(now - self.t0, 1e-9)
            eta = (state.max_steps - state.global_step) / rate if rate > 0 else float("nan")
            line = (
                f"step {state.global_step}/{state.max_steps} ({100 * state.global_step / state.max_steps:.1f}%) "
                f"epoch {math.ceil(state.epoch or 0)} loss {logs['loss']:.4f} lr {logs.get('learning_rate', 0):.2e} "
                f"{steps / dt:.2f} step/s {tokens / dt:.0f} tok/s ETA {_fmt_time(eta) if rate > 0 else '--:--:--'}"
            )
            self.last_t, self.last_step, self.last_tokens = (
                now,
                state.global_step,
                state.num_input_tokens_seen or 0,
            )
            self._write(line)
        if "eval_loss" in logs:
            extra = "".join(f", {k.removeprefix('eval_')} {logs[k]:.4f}" for k in self.metrics if k in logs)
            self._write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}{extra}")

    def _write(self, line):
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            self.printer(line, flush=True)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()


class BestAndPlotCallback(TrainerCallback):
    """Keeps ``best/`` (the weights with the best ``metric`` so far: by default the lowest eval loss)
    and redraws ``loss.png`` (with a panel of the generation metrics ``plot_metrics``).

    ``metric`` is a logged key (``eval_loss``, ``eval_rouge-l``, ...); ``greater_is_better`` defaults to
    :func:`~glmtune.train.generation_eval.greater_is_better` of it (lower for a loss, higher otherwise).
    ``best/best.json`` names the step, the metric and the eval metrics logged at that step.
    """

    def __init__(self, metric: str = "eval_loss", greater_is_better: bool | None = None, plot_metrics=()):
        from .generation_eval import greater_is_better as direction

        self.trainer = None
        self.metric = metric
        self.greater_is_better = direction(metric) if greater_is_better is None else greater_is_better
        self.best = -math.inf if self.greater_is_better else math.inf
        self.best_step: int | None = None
        self.plot_metrics = tuple(plot_metrics)

    def _better(self, value: float) -> bool:  # False for NaN
        return value > self.best if self.greater_is_better else value < self.best

    def on_train_begin(self, args, state, control, **kw):
        summary = Path(args.output_dir) / "best" / "best.json"
        if summary.exists():  # resumed run: keep the best value found before the interruption
            saved = json.loads(summary.read_text())
            # best/ of another metric (eval.best_metric changed): the next evaluation replaces it.
            if saved.get("metric", "eval_loss") == self.metric and self.metric in saved:
                self.best, self.best_step = saved[self.metric], saved.get("step")

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        metrics = metrics or {}
        value = metrics.get(self.metric)
        if value is None or not self._better(value):
            return
        self.best, self.best_step = value, state.global_step
        record = {"step": state.global_step, "metric": self.metric}
        for key in ("eval_loss", *self.plot_metrics, self.metric):
            if key in metrics:
                record[key] = metrics[key]
        best = Path(args.output_dir) / "best"
        try:
            # Every rank: the metrics (gathered) are the same on each, and under ZeRO-3 the weights are
            # gathered collectively; one process writes.
            self.trainer.save_model_atomic(
                best, extra=lambda folder: (folder / "best.json").write_text(json.dumps(record))
            )
        except OSError as e:  # best/ itself is left as it was
            raise _save_failed(e, f"best/ (step {state.global_step})", best, args.output_dir) from e

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_losses(state.log_history, Path(args.output_dir) / "loss.png", metrics=self.plot_metrics)


def loss_plot_series(history: list[dict], metrics=()) -> dict[str, list[tuple[int, float]]]:
    """What :func:`plot_losses` draws, as ``name -> [(step, value), ...]``: ``train loss``, ``eval loss``
    and each generation metric of ``metrics`` (logged keys, e.g. ``eval_rouge-l``) that was logged,
    under its name without the prefix (``rouge-l``)."""
    series = {
        "train loss": [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h],
        "eval loss": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
    }
    for key in metrics:
        points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if points:
            series[key.removeprefix("eval_")] = points
    return series


def plot_losses(
    history: list[dict], out: Path, title: str = "glmtune training loss", metrics=()
) -> Path | None:
    """Train loss (raw and smoothed) and eval loss against the step, and, when any of the generation
    metrics ``metrics`` was logged, a second panel with them (ROUGE/BLEU x100 on the left axis, the
    0-1 task metrics on the right); written atomically."""
    series = loss_plot_series(history, metrics)
    train, evals = series["train loss"], series["eval loss"]
    generated = {k: v for k, v in series.items() if k not in ("train loss", "eval loss")}
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if generated:
        fig, (ax, panel) = plt.subplots(1, 2, figsize=(14, 4.5), dpi=100)
        _draw_metrics(panel, generated)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, label="train loss")
        smooth, ema = [], losses[0]
        for v in losses:  # exponential moving average, the curve a reader follows
            ema = 0.8 * ema + 0.2 * v
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return write_bytes(out, png.getvalue())


def _draw_metrics(ax, series: dict[str, list[tuple[int, float]]]) -> None:
    """The generation-metrics panel: ROUGE/BLEU (x100) on ``ax``, the 0-1 task metrics on a twin axis."""
    from ..metrics import ROUGE_BLEU_KEYS

    scaled = {k: v for k, v in series.items() if k in ROUGE_BLEU_KEYS}
    fractions = {k: v for k, v in series.items() if k not in ROUGE_BLEU_KEYS}
    lines = []
    for name, points in scaled.items():
        steps, values = zip(*points)
        lines += ax.plot(steps, values, "o-", color=f"C{len(lines) % 10}", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("ROUGE / BLEU-4 (x100)")
    ax.set_title("generation metrics (eval)")
    ax.grid(alpha=0.3)
    if fractions:
        right = ax.twinx() if scaled else ax
        for name, points in fractions.items():
            steps, values = zip(*points)
            lines += right.plot(steps, values, "s--", color=f"C{len(lines) % 10}", label=name)
        right.set_ylabel("task metrics (0-1)")
    ax.legend(lines, [line.get_label() for line in lines], fontsize="small")


# ------------------------------------------------------------------------------- following a run, stopping it
#: The run folder's metrics log (see :class:`MetricsLogCallback`).
METRICS_FILE = "metrics.jsonl"


class MetricsLogCallback(TrainerCallback):
    """``<output_dir>/metrics.jsonl``: the Trainer's log history as it grows, one JSON object a line
    (``step``, ``epoch``, ``loss``, ``learning_rate``, ... or ``eval_loss`` and the generation metrics),
    each with ``max_steps``, for readers that follow a run live (glmtune web's Train tab) without
    TensorBoard. When a run starts or resumes the file is rewritten atomically from the state's history
    (empty, or the resumed checkpoint's), which drops lines logged after that checkpoint; then each log
    appends one flushed line (a reader may see the last line half-written and skip it)."""

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            from ..atomic import write_jsonl

            write_jsonl(
                Path(args.output_dir) / METRICS_FILE,
                [{**h, "max_steps": state.max_steps} for h in state.log_history],
            )

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        row = {**logs, "step": state.global_step, "max_steps": state.max_steps, "time": round(time.time(), 3)}
        with open(Path(args.output_dir) / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


class GracefulStopCallback(TrainerCallback):
    """SIGTERM as a request to stop: the current step finishes, its loss is logged and a checkpoint of
    it is saved (written atomically like every checkpoint), then the loop ends and
    :meth:`GlmtuneTrainer.train` raises :class:`TrainingStopped`. A second SIGTERM ends the process at
    once (the last checkpoint is intact). Only a single-process run in its main thread handles the
    signal: distributed ranks would see it at different steps and wait on each other's checkpoint."""

    def __init__(self):
        self.requested: str | None = None  # the signal's name once one arrived

    @contextlib.contextmanager
    def installed(self, args):
        import signal
        import threading

        if args.world_size > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return
        self.requested = None
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _handle(self, signum, frame):
        import signal

        if self.requested:  # asked twice: die now, as without the handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kw):
        if self.requested:
            control.should_log = control.should_save = control.should_training_stop = True

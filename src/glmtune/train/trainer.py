"""glmtune's additions to the transformers ``Trainer`` (the run itself is the stock Trainer/accelerate).

- checkpoints appear atomically: written under ``.staging/`` and renamed into ``checkpoint-<step>``;
- the method decides what a checkpoint holds (peft adapter, official P-Tuning layout, full model) and
  the resolved config and tokenizer are saved beside it;
- a non-finite loss stops the run, naming the step, before anything is saved over the last good
  checkpoint;
- resuming a P-Tuning run reads the prefix back from the official layout;
- the loss is computed at the labelled positions only (``train.logits_at_labels_only``, see
  :mod:`glmtune.train.fast_loss`): the output layer never maps prompt or padding positions to the
  vocabulary.
"""

from __future__ import annotations

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
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.method = method
        # save_extras(out_dir): writes the resolved config, tokenizer and anything else a checkpoint needs.
        self.save_extras = save_extras
        self.logits_at_labels_only = logits_at_labels_only
        self.loss_chunk_size = loss_chunk_size
        self._output_layer = _output_layer(self.model) if logits_at_labels_only else None

    def _labelled_loss_applies(self, model, inputs) -> bool:
        return (
            self._output_layer is not None
            and "labels" in inputs
            and "shift_labels" not in inputs
            and self.label_smoother is None
            and self.compute_loss_func is None
            # evaluation: only when nothing but the loss is wanted (no logits for compute_metrics)
            and (model.training or self.compute_metrics is None)
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
    """

    def __init__(self, printer=print):
        self.printer = printer
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
            self._write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")

    def _write(self, line):
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            self.printer(line, flush=True)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()


class BestAndPlotCallback(TrainerCallback):
    """Keeps ``best/`` (the weights with the lowest eval loss so far) and redraws ``loss.png``."""

    def __init__(self):
        self.trainer = None
        self.best = math.inf

    def on_train_begin(self, args, state, control, **kw):
        summary = Path(args.output_dir) / "best" / "best.json"
        if summary.exists():  # resumed run: keep the best loss found before the interruption
            self.best = json.loads(summary.read_text())["eval_loss"]

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not loss < self.best:
            return
        self.best = loss
        if not state.is_world_process_zero:
            return
        best = Path(args.output_dir) / "best"
        try:
            with atomic_dir(best, overwrite=True) as tmp:
                self.trainer._save(str(tmp))
                (tmp / "best.json").write_text(json.dumps({"step": state.global_step, "eval_loss": loss}))
        except OSError as e:  # best/ itself is left as it was
            raise _save_failed(e, f"best/ (step {state.global_step})", best, args.output_dir) from e

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_losses(state.log_history, Path(args.output_dir) / "loss.png")


def plot_losses(history: list[dict], out: Path, title: str = "glmtune training loss") -> Path | None:
    """Train loss (raw and smoothed) and eval loss against the step; written atomically."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

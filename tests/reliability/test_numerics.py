"""Numerics: batches with no target token, non-finite values in the data, fp16 loss scaling (GPU).

- A batch whose labels are all -100 (an example whose reply was truncated away, or a prompt-only
  row that reached the trainer) must not turn the loss into 0/0 = NaN and stop the run through the
  NaN guard: its loss is 0 and training continues. Tested through the Trainer path (the recipe with
  a dataset holding such rows), for the labelled-positions loss and for transformers' stock loss.
- The data layer drops zero-target examples before they reach the trainer (counted), and NaN /
  Infinity literals in a data file are a DataError naming the line.
- fp16 mixed precision with loss scaling on a GPU: an overflowing step is skipped by the scaler, and
  the run ends with finite weights (``@pytest.mark.gpu``).
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

import glmtune.train.recipe as recipe
from glmtune.data import DataError, read_examples
from glmtune.train.trainer import GlmtuneTrainer

from .conftest import ROWS, run, run_config, write_jsonl


@pytest.fixture
def empty_label_rows(monkeypatch):
    """The recipe's training set gets rows whose labels are all -100 (copies of real rows)."""
    original = recipe._datasets

    def patched(cfg, model_dir):
        train, evals, reports = original(cfg, model_dir)
        rows = train.to_list()
        empty = [dict(r, labels=[-100] * len(r["labels"])) for r in rows]
        return Dataset.from_list(rows + empty), evals, reports

    monkeypatch.setattr(recipe, "_datasets", patched)


@pytest.fixture
def batch_targets(monkeypatch):
    """Records, for each training batch the trainer computes a loss for, its target-token count and loss."""
    seen = []
    original = GlmtuneTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = original(self, model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = out[0] if return_outputs else out
            seen.append((int((inputs["labels"][:, 1:] != -100).sum()), float(loss.detach())))
        return out

    monkeypatch.setattr(GlmtuneTrainer, "compute_loss", compute_loss)
    return seen


@pytest.mark.parametrize(
    "labelled_only",
    [True, pytest.param(False, marks=pytest.mark.slow)],
    ids=["labelled_positions_loss", "stock_loss"],
)
def test_batch_without_targets_does_not_stop_training(
    tiny_model, data_cache, tmp_path, empty_label_rows, batch_targets, labelled_only
):
    base = tiny_model("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    out = tmp_path / "out"
    # Batches of one row: half the rows have no target, so some batches are empty and some are not.
    raw = run_config(base, out, data, data_cache, max_steps=6, save_steps=6, batch_size=1)
    summary = run(raw, f"train.logits_at_labels_only={str(labelled_only).lower()}", "method.lora_dropout=0.1")
    empty = [loss for n, loss in batch_targets if n == 0]
    print(
        f"[figure] empty-label batches ({'labelled-positions' if labelled_only else 'stock'} loss): "
        f"{len(empty)} of {len(batch_targets)} batches had no target token, their loss {empty}; "
        f"run finished {summary['steps']} steps, final train loss {summary['final_train_loss']:.4f}"
    )
    assert summary["steps"] == 6
    assert empty, "the seed gave no batch without targets: the test proves nothing"
    assert len(empty) < len(batch_targets), "no batch with targets either"
    assert all(loss == 0.0 for loss in empty)
    assert all(math.isfinite(loss) for _, loss in batch_targets)
    from safetensors.torch import load_file

    weights = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_zero_target_examples_are_dropped_before_the_trainer(tiny_model, tmp_path):
    """The data path never hands the trainer an example without a target: one whose reply is cut away
    entirely (a system prompt longer than max_length) is dropped and counted."""
    from glmtune import get_template, load_tokenizer
    from glmtune.data import EncodeSettings, encode_all

    base = tiny_model("chatglm3")
    hopeless = {
        "conversations": [
            {"role": "system", "content": "你是一个人工智能助手" * 5},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "好"},
        ]
    }
    ok = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]}
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", [ok, hopeless])).examples
    encoded, stats = encode_all(
        load_tokenizer(base), get_template(base), examples, EncodeSettings(max_length=16)
    )
    assert stats.dropped == 1 and stats.dropped_sources == [f"{tmp_path / 'd.jsonl'}:2"]
    assert [sum(1 for x in e.labels[1:] if x != -100) > 0 for e in encoded] == [True]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_data_are_a_data_error(tmp_path, literal):
    path = tmp_path / "d.jsonl"
    path.write_text(f'{{"context": "你好", "target": "好"}}\n{{"context": "你好", "target": {literal}}}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2.*target"):
        read_examples(path)


@pytest.mark.gpu
def test_fp16_loss_scaling_survives_an_overflow(tiny_model, data_cache, tmp_path):
    """fp16 on a GPU: a learning rate high enough to overflow some steps; the GradScaler skips them and
    the run ends with finite weights, or the NaN guard stops it naming the step (never NaN weights)."""
    from safetensors.torch import load_file

    from glmtune.train.trainer import TrainingDiverged

    base = tiny_model("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "out"
    raw = run_config(base, out, data, data_cache, max_steps=8, save_steps=4)
    try:
        summary = run(raw, "train.precision=fp16", "train.learning_rate=1.0")
    except TrainingDiverged as e:
        print(f"[figure] fp16: stopped by the NaN guard: {e}")
        assert "at step" in str(e)
        return
    weights = load_file(str(out / "final" / "adapter_model.safetensors"))
    print(f"[figure] fp16: {summary['steps']} steps, final loss {summary['final_train_loss']}")
    assert all(torch.isfinite(w).all() for w in weights.values())

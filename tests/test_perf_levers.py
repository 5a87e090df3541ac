"""Every training-speed lever computes what the unoptimised path computes.

- the loss at labelled positions only (``train.logits_at_labels_only``), fused and chunked
  (``train.loss_chunk_size``) or not: the same loss and the same gradients as transformers' full-logits
  loss, for plain and peft-wrapped GlmForCausalLM, a LoRA-wrapped output layer, P-Tuning v2 and
  ChatGLM-6B (v1), padded and packed batches, with and without ``num_items_in_batch``;
- packed batches through that loss: each example's loss is the one it has alone (no example attends
  to another; tests/test_data_collate.py checks the logits);
- padding-free batches (``data.padding_free``: :class:`FlatCollator` + the ``glmtune_sdpa``
  attention): every example's logits are its logits alone, no example sees another, and the loss and
  gradients equal the padded batch's;
- the recipe end to end: the same logged losses with each lever on and off.

All on tiny models on the CPU, within 1e-5.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

import glmtune
from glmtune.config import load_config
from glmtune.data import DataCollator, EncodeSettings, Example, PackedCollator, encode_all, pack_examples
from glmtune.data.collate import FlatCollator
from glmtune.testing import CORPUS, make_tiny_model
from glmtune.train import train
from glmtune.train.fast_attention import NAME, use_padding_free_attention
from glmtune.train.fast_loss import LabelledOutputs, label_positions, linear_cross_entropy
from glmtune.train.trainer import GlmtuneTrainer

IGNORE = -100
TOL = dict(atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf_levers")
    return {g: make_tiny_model(root / g, g) for g in ("chatglm3", "chatglm")}


@pytest.fixture(scope="module")
def encoded(folders):
    path = folders["chatglm3"]
    tok = glmtune.load_tokenizer(path)
    examples = [
        Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"c.jsonl:{i + 1}")
        for i, (q, a) in enumerate(zip(CORPUS, CORPUS[3:] + CORPUS[:3]))
    ]
    rows, _ = encode_all(tok, glmtune.get_template(path), examples, EncodeSettings(max_length=48))
    return SimpleNamespace(tok=tok, rows=rows)


def trainer_for(model, tmp_path, **kwargs) -> GlmtuneTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    return GlmtuneTrainer(model=model, args=args, method=None, save_extras=None, **kwargs)


def loss_and_grads(trainer, model, batch, num_items=None):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (P-Tuning prefix dropout) on both paths
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(reference, other):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    torch.testing.assert_close(loss_b, loss_a, **TOL)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def compare_paths(model, batch, tmp_path, chunk_sizes=(1024, 0, 3)):
    """Stock full-logits loss vs the labelled-positions loss (each chunk size), with/without num_items."""
    stock = trainer_for(model, tmp_path, logits_at_labels_only=False)
    assert stock._output_layer is None
    count = int((batch["labels"][:, 1:] != IGNORE).sum())
    for num_items in (None, torch.tensor(count + 5)):
        reference = loss_and_grads(stock, model, batch, num_items)
        for chunk in chunk_sizes:
            fast = trainer_for(model, tmp_path, logits_at_labels_only=True, loss_chunk_size=chunk)
            assert fast._output_layer is not None, "the labelled-positions loss should apply here"
            assert_same(reference, loss_and_grads(fast, model, batch, num_items))


def randomize_lora(model):
    """LoRA B starts at zero: give it values so that the adapter's gradients flow everywhere."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# --------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("chunk", [0, 1, 4, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_equals_linear_then_cross_entropy(chunk, with_bias):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(50, 16, generator=gen) * 0.5).requires_grad_()
    bias = (torch.randn(50, generator=gen) * 0.1).requires_grad_() if with_bias else None
    targets = torch.randint(0, 50, (13,), generator=gen)

    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    wanted = [hidden, weight] + ([bias] if with_bias else [])
    grads_expected = torch.autograd.grad(expected * 0.37, wanted)
    got = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL)
    for a, b in zip(torch.autograd.grad(got * 0.37, wanted), grads_expected):
        torch.testing.assert_close(a, b, **TOL)
    with torch.no_grad():  # loss only, no gradient work
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, targets, bias, chunk), expected.detach(), **TOL
        )


def test_linear_cross_entropy_frozen_weight_and_bf16_and_empty():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 8, generator=gen)  # frozen (LoRA): no weight gradient is made
    hidden = torch.randn(6, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 40, (6,), generator=gen)
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    (g,) = torch.autograd.grad(got, [hidden])
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (g_expected,) = torch.autograd.grad(expected, [hidden])
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(g, g_expected, **TOL)
    # bfloat16 model: logits made in bf16 then upcast, as transformers' loss does (logits.float())
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.bfloat16()
    ref = F.cross_entropy((hb @ wb.T).float(), targets, reduction="sum")
    torch.testing.assert_close(linear_cross_entropy(hb, wb, targets, chunk_size=2), ref, atol=1e-4, rtol=1e-4)
    empty = linear_cross_entropy(hidden[:0], weight, targets[:0])
    assert empty.item() == 0.0


def test_label_positions_shift_by_one():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, IGNORE, 8, 9]])
    mask, targets = label_positions(labels)
    assert mask.tolist() == [[False, True, True, False, False], [True, False, True, True, False]]
    assert targets.tolist() == [5, 6, 7, 8, 9]


def test_labelled_outputs_restores_the_layer_and_refuses_other_layouts():
    head = torch.nn.Linear(4, 10, bias=False)
    labels = torch.tensor([[IGNORE, 1, 2]])
    with LabelledOutputs(head, labels) as out:
        assert head.forward != torch.nn.Linear.forward.__get__(head)
        logits = head(torch.randn(1, 3, 4))
        assert logits.shape == (1, 0, 10) and out.count == 2 and out.loss_sum is not None
    assert "forward" not in vars(head)
    with LabelledOutputs(head, labels) as out:  # [T, B, H] (seq-first): the layer runs as usual
        assert head(torch.randn(3, 2, 4)).shape == (3, 2, 10)
        assert out.loss_sum is None


# --------------------------------------------------------------------------------------------- the trainer
def test_full_finetuning_glm_padded_batch(folders, encoded, tmp_path):
    model = glmtune.load_model(folders["chatglm3"])
    batch = DataCollator(encoded.tok.pad_token_id)(encoded.rows[:4])
    compare_paths(model, batch, tmp_path)  # the output layer's own gradient too


def test_lora_every_projection(folders, encoded, tmp_path):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    model = get_peft_model(
        glmtune.load_model(folders["chatglm3"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"),
    )
    randomize_lora(model)
    batch = DataCollator(encoded.tok.pad_token_id)(encoded.rows[2:6])
    compare_paths(model, batch, tmp_path)


def test_lora_on_the_output_layer_takes_the_unfused_path(folders, encoded, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        glmtune.load_model(folders["chatglm3"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"),
    )
    randomize_lora(model)
    batch = DataCollator(encoded.tok.pad_token_id)(encoded.rows[:3])
    trainer = trainer_for(model, tmp_path, loss_chunk_size=16)
    assert type(trainer._output_layer) is not torch.nn.Linear  # the LoRA wrapper: not fusable
    compare_paths(model, batch, tmp_path, chunk_sizes=(16,))
    grads = loss_and_grads(trainer, model, batch)[1]
    assert any("lm_head.lora_B" in n for n in grads)


def test_ptuning_prefix_model(folders, encoded, tmp_path):
    from glmtune.train.methods import get_method

    spec = glmtune.specs.get_spec("chatglm3")
    model = glmtune.load_model(folders["chatglm3"], prefix=(4, False))
    model = get_method("ptuning_v2").prepare(model, spec, SimpleNamespace())
    batch = DataCollator(encoded.tok.pad_token_id)(encoded.rows[:3])
    compare_paths(model, batch, tmp_path, chunk_sizes=(1024, 0))


def test_chatglm_v1(folders, tmp_path):
    from glmtune.data import Example as Ex

    path = folders["chatglm"]
    tok = glmtune.load_tokenizer(path)
    examples = [
        Ex([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"v1:{i}")
        for i, (q, a) in enumerate(zip(CORPUS[:4], CORPUS[4:8]))
    ]
    rows, _ = encode_all(tok, glmtune.get_template(path), examples, EncodeSettings(max_length=40))
    model = glmtune.load_model(path)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = DataCollator(tok.pad_token_id)(rows)
    compare_paths(model, batch, tmp_path, chunk_sizes=(1024, 5))


def test_packed_batch_loss_is_each_examples_own(folders, encoded, tmp_path):
    """Through the labelled-positions loss a packed row's loss is the token-weighted mean of each
    example's loss alone: nothing leaks between the examples of a row."""
    model = glmtune.load_model(folders["chatglm3"])
    rows = pack_examples(encoded.rows, max_length=96, model=model)
    assert any(len(r["lengths"]) >= 2 for r in rows)
    batch = PackedCollator(encoded.tok.pad_token_id, model=model)(rows)
    compare_paths(model, batch, tmp_path, chunk_sizes=(1024,))

    fast = trainer_for(model, tmp_path)
    model.eval()
    with torch.no_grad():
        packed = fast.compute_loss(model, dict(batch)).item()
        total, count = 0.0, 0
        for e in encoded.rows:  # each example alone, stock loss
            labels = torch.tensor([[IGNORE] + list(e.labels[1:])])
            out = model(input_ids=torch.tensor([e.input_ids]), labels=labels)
            n = int((labels[:, 1:] != IGNORE).sum())
            total, count = total + out.loss.item() * n, count + n
    assert packed == pytest.approx(total / count, abs=1e-5)

    # Changing one example of a row changes no other example's labelled loss.
    row = rows[next(i for i, r in enumerate(rows) if len(r["lengths"]) >= 2)]
    first = row["lengths"][0]
    one = PackedCollator(encoded.tok.pad_token_id)([row])
    changed = dict(one, input_ids=one["input_ids"].clone())
    changed["input_ids"][0, :first] = torch.randint(10, 400, (first,))
    rest = dict(one, labels=one["labels"].clone())
    rest["labels"][0, : first + 1] = IGNORE  # only the later examples' labels
    with torch.no_grad():
        a = fast.compute_loss(model, dict(rest))
        b = fast.compute_loss(model, dict(changed, labels=rest["labels"]))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_eval_loss_with_and_without_the_lever(folders, encoded, tmp_path):
    model = glmtune.load_model(folders["chatglm3"])
    batch = DataCollator(encoded.tok.pad_token_id)(encoded.rows[:5])
    model.eval()
    with torch.no_grad():
        a, _ = trainer_for(model, tmp_path, logits_at_labels_only=False).compute_loss(
            model, dict(batch), return_outputs=True
        )
        b, out = trainer_for(model, tmp_path).compute_loss(model, dict(batch), return_outputs=True)
    torch.testing.assert_close(a, b, **TOL)
    assert out["loss"] is b


def test_remote_code_layouts_keep_the_stock_loss(tmp_path):
    class SeqFirst(torch.nn.Module):  # no logits_to_keep in forward: not known to feed [B, T, H]
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 8)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids=None, labels=None):
            return None

    from glmtune.train.trainer import _output_layer

    assert _output_layer(SeqFirst()) is None


# --------------------------------------------------------------------------------------------- padding-free
def test_flat_collator_layout():
    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 7, 8]}, {"input_ids": [4, 5], "labels": [9, 10]}]
    batch = FlatCollator(0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    # the first label of each example is -100 (the previous example's last token predicts nothing)
    assert batch["labels"].tolist() == [[IGNORE, 7, 8, IGNORE, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 3 and batch["use_cache"] is False and "attention_mask" not in batch
    with pytest.raises(ValueError, match="differ in length"):
        FlatCollator(0)([{"input_ids": [1, 2], "labels": [1]}])


@pytest.mark.parametrize("attn", [NAME, "sdpa", "eager"])
def test_flat_rows_give_each_example_its_own_logits(folders, encoded, attn):
    model = glmtune.load_model(folders["chatglm3"])
    examples = encoded.rows[:5]
    batch = FlatCollator(encoded.tok.pad_token_id, model=model)(examples)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with use_padding_free_attention(model) as switched, torch.no_grad():
        assert switched and model.config._attn_implementation == NAME
        if attn != NAME:
            model.set_attn_implementation(attn)
        logits = model(**inputs).logits[0]
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        first = len(examples[0].input_ids)
        changed["input_ids"][0, :first] = torch.randint(10, 400, (first,))
        other = model(**changed).logits[0]
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
        if attn != NAME:
            model.set_attn_implementation(NAME)
    assert model.config._attn_implementation == "sdpa"  # restored
    start = 0
    for e, expected in zip(examples, alone):
        torch.testing.assert_close(logits[start : start + e.length], expected, atol=1e-5, rtol=0)
        start += e.length
    # rewriting the first example changes nothing in the others
    torch.testing.assert_close(other[first:], logits[first:], atol=1e-6, rtol=0)


def test_flat_batch_loss_and_gradients_equal_the_padded_batch(folders, encoded, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        glmtune.load_model(folders["chatglm3"]),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
        ),
    )
    randomize_lora(model)
    padded = DataCollator(encoded.tok.pad_token_id)(encoded.rows[:4])
    flat = FlatCollator(encoded.tok.pad_token_id, model=model)(encoded.rows[:4])
    count = int((padded["labels"][:, 1:] != IGNORE).sum())
    assert count == int((flat["labels"][:, 1:] != IGNORE).sum())
    for lever in (False, True):
        trainer = trainer_for(model, tmp_path, logits_at_labels_only=lever)
        for num_items in (None, torch.tensor(count)):
            reference = loss_and_grads(trainer, model, padded, num_items)
            with use_padding_free_attention(model):
                assert_same(reference, loss_and_grads(trainer, model, flat, num_items))


def test_segment_attention_leaves_other_calls_to_sdpa(folders, encoded):
    """Padded batches (a mask) and generation (a KV cache) under glmtune_sdpa: transformers' SDPA."""
    model = glmtune.load_model(folders["chatglm3"])
    batch = DataCollator(encoded.tok.pad_token_id, padding_side="left")(encoded.rows[:3])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with use_padding_free_attention(model):
            got = model(input_ids=ids, attention_mask=mask).logits
            gen2 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert gen.tolist() == gen2.tolist()


def test_models_that_cannot_flatten_keep_padded_batches(folders):
    from glmtune.train.recipe import _can_flatten

    assert _can_flatten(glmtune.load_model(folders["chatglm3"]))
    assert not _can_flatten(glmtune.load_model(folders["chatglm"]))  # 2D positions, prefix-LM
    assert not _can_flatten(glmtune.load_model(folders["chatglm3"], prefix=(4, False)))  # P-Tuning v2


# --------------------------------------------------------------------------------------------- end to end
def test_recipe_logs_the_same_losses_with_the_lever_on_and_off(folders, tmp_path, monkeypatch):
    collators = []
    original = GlmtuneTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        collators.append(type(self.data_collator).__name__)

    monkeypatch.setattr(GlmtuneTrainer, "__init__", init)

    rows = [{"context": CORPUS[i], "target": CORPUS[(i + 3) % len(CORPUS)]} for i in range(len(CORPUS))]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    def run(name, *overrides):
        raw = {
            "model": {"path": str(folders["chatglm3"])},
            "data": {"train_file": str(data), "max_length": 64, "cache_dir": str(tmp_path / "cache")},
            "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "train": {
                "output_dir": str(tmp_path / name),
                "max_steps": 4,
                "batch_size": 3,
                "learning_rate": 1e-2,
                "logging_steps": 1,
                "save_steps": 100,
                "report_to": [],
                "seed": 0,
            },
        }
        summary = train(load_config(raw, list(overrides)), printer=lambda *a, **k: None)
        assert collators[-1] == ("DataCollator" if "data.padding_free=false" in overrides else "FlatCollator")
        return summary, glmtune.load_model(folders["chatglm3"], adapter=tmp_path / name / "final")

    stock, stock_model = run("stock", "train.logits_at_labels_only=false", "data.padding_free=false")
    ids = torch.tensor([encoded_ids(folders["chatglm3"])])
    with torch.no_grad():
        ref = stock_model(input_ids=ids).logits
    for name, overrides in (
        ("defaults", ()),  # padding-free batches, fused labelled-positions loss
        ("unfused", ("train.loss_chunk_size=0",)),
        ("padded", ("data.padding_free=false",)),
        ("flat-stock-loss", ("train.logits_at_labels_only=false",)),
    ):
        summary, model = run(name, *overrides)
        for key in ("train_loss", "final_train_loss"):
            assert summary[key] == pytest.approx(stock[key], abs=1e-5), (name, key)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)


def encoded_ids(path) -> list[int]:
    tok = glmtune.load_tokenizer(path)
    messages = [{"role": "user", "content": CORPUS[0]}, {"role": "assistant", "content": CORPUS[1]}]
    return glmtune.get_template(path).encode_example(tok, messages).input_ids

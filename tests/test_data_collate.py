"""Batching: dynamic padding, length grouping, and packing that never lets one example see another."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import glmtune
from glmtune.data import (
    DataCollator,
    EncodeSettings,
    Example,
    PackedCollator,
    check_packing,
    encode_all,
    length_grouped_sampler,
    pack_examples,
)
from glmtune.errors import ConfigError
from glmtune.testing import CORPUS, make_tiny_model

IGNORE = -100


@pytest.fixture(scope="session")
def glm(tmp_path_factory):
    """A tiny ChatGLM3 folder loaded into GlmForCausalLM, with its tokenizer and some encoded examples."""
    path = make_tiny_model(tmp_path_factory.mktemp("collate") / "chatglm3", "chatglm3")
    tok = glmtune.load_tokenizer(path)
    examples = [
        Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"c.jsonl:{i + 1}")
        for i, (q, a) in enumerate(zip(CORPUS, CORPUS[3:] + CORPUS[:3]))
    ]
    encoded, _ = encode_all(tok, glmtune.get_template(path), examples, EncodeSettings(max_length=48))
    return SimpleNamespace(path=path, tok=tok, model=glmtune.load_model(path), encoded=encoded)


def rows_of(lengths):
    return [{"input_ids": list(range(1, n + 1)), "labels": [IGNORE] + list(range(2, n + 1))} for n in lengths]


# --------------------------------------------------------------------------------------------------
# Dynamic padding


def test_pads_to_the_longest_in_the_batch_not_a_fixed_max():
    batch = DataCollator(pad_id=0)(rows_of([3, 5]))
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, IGNORE], [IGNORE, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert DataCollator(pad_id=0)(rows_of([2, 2]))["input_ids"].shape == (2, 2)


def test_left_padding_and_multiple_of():
    batch = DataCollator(pad_id=9, padding_side="left", pad_to_multiple_of=4)(rows_of([3, 5]))
    assert batch["input_ids"].tolist() == [[9] * 5 + [1, 2, 3], [9] * 3 + [1, 2, 3, 4, 5]]
    assert batch["labels"][0].tolist() == [IGNORE] * 6 + [2, 3]
    assert batch["attention_mask"].sum(1).tolist() == [3, 5]
    assert DataCollator(pad_id=0, pad_to_multiple_of=8)(rows_of([8]))["input_ids"].shape == (1, 8)


def test_collator_arguments_are_checked():
    with pytest.raises(ConfigError):
        DataCollator(pad_id=None)
    with pytest.raises(ConfigError):
        DataCollator(pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="differ in length"):
        DataCollator(pad_id=0)([{"input_ids": [1, 2], "labels": [1]}])


def test_right_padded_batch_gives_each_example_its_own_logits(glm):
    examples = glm.encoded[:3]
    batch = DataCollator(glm.tok.pad_token_id)(examples)
    with torch.no_grad():
        logits = glm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, e in enumerate(examples):
            alone = glm.model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(logits[i, : e.length], alone, atol=1e-5, rtol=0)


def test_length_grouped_sampler_groups_similar_lengths():
    lengths = [5, 100, 7, 98, 6, 99, 4, 97] * 8

    def padding(order):
        batches = [[lengths[i] for i in order[k : k + 4]] for k in range(0, len(order), 4)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    order = list(length_grouped_sampler(lengths, batch_size=4, seed=1))
    assert sorted(order) == list(range(len(lengths)))
    # Sorting inside random mega-batches: far less padding than batches taken in file order.
    assert padding(order) < padding(list(range(len(lengths)))) / 4
    assert max(lengths[i] for i in order[:4]) == 100  # the longest batch first: OOM shows at step 1
    assert order == list(length_grouped_sampler(lengths, batch_size=4, seed=1))


# --------------------------------------------------------------------------------------------------
# Packing


def test_pack_examples_rows_positions_and_boundary_labels():
    examples = rows_of([6, 3, 5, 2, 4])
    rows = pack_examples(examples, max_length=8)
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    # Best fit decreasing: 6+2, 5+3, 4.
    assert sorted(sorted(r["lengths"]) for r in rows) == [[2, 6], [3, 5], [4]]
    seen = []
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == sum(r["lengths"])
        start = 0
        for n in r["lengths"]:
            assert r["position_ids"][start : start + n] == list(range(n))
            # No example predicts the next one's first token: its first label is always -100.
            assert r["labels"][start] == IGNORE
            assert r["labels"][start + 1 : start + n] == list(range(2, n + 1))
            seen.append(r["input_ids"][start : start + n])
            start += n
    assert sorted(map(len, seen)) == [2, 3, 4, 5, 6]


def test_pack_refuses_an_example_longer_than_the_row():
    with pytest.raises(ConfigError, match="more than the packing length 4"):
        pack_examples(rows_of([3, 5]), max_length=4)


def test_packed_collator_pads_with_a_sequence_of_its_own():
    rows = pack_examples(rows_of([3, 2, 4]), max_length=5)
    batch = PackedCollator(pad_id=0, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 8) and batch["use_cache"] is False
    assert "attention_mask" not in batch
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["position_ids"][r, n:].tolist() == list(range(8 - n))
        assert (batch["labels"][r, n:] == IGNORE).all()


def _per_example_logits(glm, row):
    out, start = [], 0
    for n in row["lengths"]:
        ids = torch.tensor([row["input_ids"][start : start + n]])
        with torch.no_grad():
            out.append(glm.model(input_ids=ids).logits[0])
        start += n
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(glm, attn):
    glm.model.set_attn_implementation(attn)
    try:
        rows = pack_examples(glm.encoded, max_length=96, model=glm.model)
        assert any(len(r["lengths"]) >= 2 for r in rows)
        batch = PackedCollator(glm.tok.pad_token_id, model=glm.model)(rows)
        with torch.no_grad():
            logits = glm.model(**batch).logits
        for r, row in enumerate(rows):
            start = 0
            for n, alone in zip(row["lengths"], _per_example_logits(glm, row)):
                torch.testing.assert_close(logits[r, start : start + n], alone, atol=1e-5, rtol=0)
                start += n
    finally:
        glm.model.set_attn_implementation("sdpa")


def test_packed_examples_are_isolated_and_the_loss_is_per_token(glm):
    a, b = glm.encoded[0], glm.encoded[1]
    row = pack_examples([a, b], max_length=a.length + b.length)[0]
    assert row["lengths"] == [a.length, b.length]
    batch = PackedCollator(glm.tok.pad_token_id)([row])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, : a.length] = torch.randint(10, 400, (a.length,))
    with torch.no_grad():
        out = glm.model(**batch)
        other = glm.model(**changed)
    # Rewriting the first example changes nothing in the second.
    torch.testing.assert_close(out.logits[0, a.length :], other.logits[0, a.length :], atol=1e-6, rtol=0)

    # The packed loss is the mean over both examples' labelled tokens, each predicted from its own
    # tokens only: nothing predicts b's first token from a's last one.
    total, count = 0.0, 0
    for e in (a, b):
        with torch.no_grad():
            logits = glm.model(input_ids=torch.tensor([e.input_ids])).logits[0]
        labels = torch.tensor(e.labels[1:])
        total += F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE, reduction="sum").item()
        count += int((labels != IGNORE).sum())
    assert out.loss.item() == pytest.approx(total / count, abs=1e-5)


def test_packing_refused_for_chatglm_v1_and_ptuning_prefix(tmp_path):
    from glmtune.models.chatglm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM

    with pytest.raises(ConfigError, match="packing is not supported for ChatGLM-6B"):
        check_packing("chatglm")
    folder = tmp_path / "chatglm-6b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "chatglm", "position_encoding_2d": True}))
    with pytest.raises(ConfigError, match="ChatGLM-6B"):
        pack_examples(rows_of([3]), max_length=8, model=folder)
    v1 = ChatGLMv1ForCausalLM(
        ChatGLMv1Config(
            vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2, inner_hidden_size=64
        )
    )
    with pytest.raises(ConfigError, match="ChatGLM-6B"):
        PackedCollator(pad_id=3, model=v1)
    prefixed = SimpleNamespace(config=SimpleNamespace(model_type="glm", pre_seq_len=8))
    with pytest.raises(ConfigError, match="P-Tuning v2 prefix"):
        check_packing(prefixed)
    for ok in ("chatglm2", "chatglm3", "glm4", "hf"):
        check_packing(ok)

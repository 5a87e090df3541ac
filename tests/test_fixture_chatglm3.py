"""The official ChatGLM3 fixtures (../shared/fixtures) reproduced by glmtune's own loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import glmtune

from conftest import shared_path


def _tol(ref: torch.Tensor) -> float:
    return max(1e-4, 5e-5 * ref.abs().max().item())


@pytest.fixture(scope="module")
def chatglm3():
    path = shared_path("fixtures", "chatglm3_tiny")
    cases = json.loads((path / "expected" / "cases.json").read_text())
    return glmtune.load_model(path), cases, load_file(path / "expected" / "logits.safetensors")


@pytest.fixture(scope="module")
def chatglm3_ptuning():
    base = shared_path("fixtures", "chatglm3_tiny")
    adapter = shared_path("fixtures", "chatglm3_ptuning")
    cases = json.loads((adapter / "expected" / "cases.json").read_text())
    model = glmtune.load_model(base, adapter=adapter)
    return model, cases, load_file(adapter / "expected" / "logits.safetensors")


def test_loads_native_glm_class(chatglm3):
    model, _, _ = chatglm3
    assert type(model).__name__ == "GlmForCausalLM"
    assert model.config.glmtune_generation == "chatglm3"
    assert model.config.vocab_size == 832


@pytest.mark.parametrize("which", ["chatglm3", "chatglm3_ptuning"])
def test_single_sequence_logits(which, request):
    model, cases, logits = request.getfixturevalue(which)
    for case in cases["logits"]["singles"]:
        with torch.no_grad():
            out = model(torch.tensor([case["input_ids"]])).logits[0]
        ref = logits[case["tensor"]]
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= _tol(ref), case["name"]
        assert out.argmax(-1).tolist() == case["argmax"]


@pytest.mark.parametrize("which", ["chatglm3", "chatglm3_ptuning"])
@pytest.mark.parametrize("explicit_positions", [True, False])
def test_left_padded_batch_logits(which, explicit_positions, request):
    model, cases, logits = request.getfixturevalue(which)
    batch = cases["logits"]["batch"]
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    kwargs = {"position_ids": torch.tensor(batch["position_ids"])} if explicit_positions else {}
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **kwargs).logits
    ref = logits[batch["tensor"]]
    valid = mask.bool()
    assert (out - ref)[valid].abs().max().item() <= _tol(ref)


def test_greedy_full_recompute_and_kv_cache(chatglm3):
    model, cases, _ = chatglm3
    for case in cases["greedy"]:
        ids = torch.tensor([case["input_ids"]])
        seq = ids
        for _ in range(len(case["new_ids"])):
            with torch.no_grad():
                nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        assert seq[0, ids.shape[1] :].tolist() == case["new_ids"]
        gen = model.generate(
            ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert gen[0, ids.shape[1] :].tolist() == case["new_ids"]


def test_left_padded_generation_equals_single(chatglm3):
    model, cases, _ = chatglm3
    prompts = [c["input_ids"] for c in cases["greedy"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    for row, case in zip(gen, cases["greedy"]):
        assert row[width:].tolist() == case["new_ids"]


def test_masked_loss(chatglm3):
    model, cases, logits = chatglm3
    case = cases["loss"]
    with torch.no_grad():
        out = model(torch.tensor([case["input_ids"]]), labels=torch.tensor([case["labels"]]))
    assert out.loss.item() == pytest.approx(case["loss"], abs=1e-4)
    ref = logits["loss_logits"]
    assert (out.logits[0] - ref).abs().max().item() <= _tol(ref)


def test_ptuning_prefix_is_float32_and_cached_generation_matches_recompute(chatglm3_ptuning):
    model, cases, _ = chatglm3_ptuning
    assert model.prefix_encoder.embedding.weight.dtype == torch.float32
    ids = torch.tensor([cases["logits"]["singles"][2]["input_ids"]])
    gen = model.generate(
        ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    seq = ids
    for _ in range(6):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq).logits[0, -1].argmax().view(1, 1)], dim=1)
    assert gen.tolist() == seq.tolist()


def test_bf16_load_keeps_prefix_fp32():
    base = shared_path("fixtures", "chatglm3_tiny")
    adapter = shared_path("fixtures", "chatglm3_ptuning")
    model = glmtune.load_model(base, adapter=adapter, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.prefix_encoder.embedding.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(torch.tensor([[801, 803, 450, 13]])).logits
    assert torch.isfinite(out.float()).all()

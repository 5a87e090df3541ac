"""``model.generate()`` called the way users call it equals greedy full recompute, on every fixture.

This is the contract transformers releases keep breaking (5.24 renamed the key/value cache argument): the
ChatGLM-6B model and the P-Tuning v2 prefix must follow the sequence, mask and cache that ``generate()``
hands them, with no private arguments. Runs under the locked and the newest transformers (``make
test-latest``).
"""

from __future__ import annotations

import json

import pytest
import torch

import glmtune

from conftest import shared_path

FIXTURES = {
    "chatglm6b": ("chatglm6b_v1_tiny", None),
    "chatglm3": ("chatglm3_tiny", None),
    "chatglm3_ptuning": ("chatglm3_tiny", "chatglm3_ptuning"),
}
STEPS = 8


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def loaded(request):
    base, adapter = FIXTURES[request.param]
    base_dir = shared_path("fixtures", base)
    cases = json.loads((base_dir / "expected" / "cases.json").read_text())
    adapter_dir = shared_path("fixtures", adapter) if adapter else None
    model = glmtune.load_model(base_dir, adapter=adapter_dir, dtype=torch.float32).eval()
    prompts = [case["input_ids"] for case in cases["greedy"]]
    return request.param, model, prompts


def _stop_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def greedy_recompute(model, prompt: list[int], steps: int) -> list[int]:
    """The reference: the whole sequence re-run each step, no cache, argmax, stop after an end token."""
    seq, new, stops = torch.tensor([prompt]), [], _stop_ids(model)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(seq, use_cache=False).logits[0, -1].argmax())
            new.append(token)
            if token in stops:
                break
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return new


def _new_tokens(row: list[int], stops: set[int]) -> list[int]:
    """Generated ids up to and including the first end token (what follows it is padding)."""
    for i, token in enumerate(row):
        if token in stops:
            return row[: i + 1]
    return row


def test_generate_with_mask_equals_greedy_recompute(loaded):
    name, model, prompts = loaded
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False
        )
        assert out[0, : ids.shape[1]].tolist() == prompt
        generated = _new_tokens(out[0, ids.shape[1] :].tolist(), _stop_ids(model))
        assert generated == greedy_recompute(model, prompt, STEPS), name


def test_left_padded_batch_generate_equals_each_prompt_alone(loaded):
    name, model, prompts = loaded
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else pad
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert mask.min() == 0, "the fixture prompts must differ in length for this test to pad"
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=pad
    )
    for row, prompt in zip(out[:, width:].tolist(), prompts):
        assert _new_tokens(row, _stop_ids(model)) == greedy_recompute(model, prompt, STEPS), name

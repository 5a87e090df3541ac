"""P-Tuning v2 under gradient checkpointing: the prefix stays in every checkpointed layer.

transformers drops a key/value cache inside checkpointed layers (a cache a layer writes to would be
extended again when the backward pass replays it). The prefix is passed as a cache, so training with
train.gradient_checkpointing must keep it: loss and prefix gradients equal those without checkpointing.
"""

from __future__ import annotations

import pytest
import torch

import glmtune
from glmtune.testing import make_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ptgc") / "m", "chatglm3", seed=4)


def _loss_and_grad(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    return out.loss.item(), model.prefix_encoder.embedding.weight.grad.clone()


def test_checkpointed_training_keeps_the_prefix(folder):
    model = glmtune.load_model(folder, prefix=(4, False))
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.prefix_encoder.embedding.weight
    with torch.no_grad():
        emb.normal_(0, 1.0)
    emb.requires_grad_(True)
    model.prefix_dropout.p = 0.0  # deterministic, so the two passes can be compared exactly
    model.train()
    ids = torch.randint(10, 300, (2, 12))
    plain_loss, plain_grad = _loss_and_grad(model, ids)

    # transformers >= 5.24 names it activation checkpointing (the old name warns).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.model.layers)
    ckpt_loss, ckpt_grad = _loss_and_grad(model, ids)

    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert torch.allclose(ckpt_grad, plain_grad, rtol=1e-4, atol=1e-6)
    assert plain_grad.abs().sum() > 0  # the prefix takes part in the loss

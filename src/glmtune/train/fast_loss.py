"""The training loss computed only where there are labels.

A causal LM's output layer maps every position to the whole vocabulary (65024 rows for ChatGLM2/3),
yet the loss only reads the positions whose next token is a label: the reply tokens, never the
prompt or the padding. :class:`LabelledOutputs` makes the output layer (``lm_head``) work on those
positions alone for one forward pass; the model itself runs unchanged (peft, DDP, gradient
checkpointing, packing and P-Tuning prefixes go through their usual code). Two ways to get the loss:

- fused (``chunk_size`` > 0, the output layer a plain ``nn.Linear``): :func:`linear_cross_entropy`
  computes logits, cross-entropy *and* its gradient ``chunk_size`` rows at a time, so no
  ``[tokens, vocab]`` logits tensor, log-softmax or logits gradient is ever held whole; the gradients
  are kept for the backward pass (the loss is the end of the graph, so nothing is recomputed);
- plain (``chunk_size`` = 0, or any other output layer such as a LoRA-wrapped ``lm_head``): the
  output layer on the labelled rows, then ``cross_entropy`` in float32.

Both equal the stock loss (transformers' ``ForCausalLMLoss``: labels shifted left by one, -100
ignored, float32 cross-entropy, sum / ``num_items_in_batch`` or the mean) to float rounding, and so do
the gradients (tests/test_perf_levers.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

__all__ = ["LabelledOutputs", "label_positions", "linear_cross_entropy"]


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T] of the positions that predict a label, the labels they predict [N], row-major)."""
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = keep
    return mask, shifted[keep]


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), gradients made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = chunk_size if chunk_size > 0 else max(n, 1)
        buf = None
        for start in range(0, n, step):
            h = hidden[start : start + step]
            t = targets[start : start + step]
            rows = h.shape[0]
            if buf is None or buf.shape[0] < rows:
                buf = torch.empty((rows, vocab), dtype=hidden.dtype, device=hidden.device)
            logits = buf[:rows]
            if bias is None:
                torch.mm(h, weight.t(), out=logits)
            else:
                torch.addmm(bias, h, weight.t(), out=logits)
            logits = logits.float()  # no copy for float32 models; a chunk-sized one otherwise
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            total += (lse - picked).sum()
            if need_h or need_w or need_b:
                # d(sum of losses)/d logits = softmax - one_hot(target), made in place in the buffer.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(rows, device=probs.device), t] -= 1.0
                g = probs.to(hidden.dtype)
                if need_h:
                    torch.mm(g, weight, out=grad_h[start : start + step])
                if need_w:
                    grad_w.addmm_(g.t().float(), h.float())
                if need_b:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.to(torch.float32)
        return (
            grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * scale.to(grad_w.dtype) if grad_w is not None else None,
            grad_b * scale.to(grad_b.dtype) if grad_b is not None else None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden [N, H] @ weight.T [H, V] (+ bias)`` against ``targets [N]``.

    Float32 loss; at most ``chunk_size`` x V logits exist at a time. Under ``torch.no_grad`` (or when
    nothing needs a gradient) only the loss is computed.
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float()
    if torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, int(chunk_size))
    with torch.no_grad():
        return _LinearCrossEntropy.forward(_NoCtx(), hidden, weight, bias, targets, int(chunk_size))


class _NoCtx:
    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *tensors):
        pass


class LabelledOutputs:
    """Within ``with``: ``head`` (the model's output layer) computes the loss at labelled positions only.

    ``head`` receives the final hidden states ``[B, T, H]`` as usual; it takes the rows that predict a
    label (``labels [B, T]``, shifted left by one, -100 ignored), computes their summed cross-entropy
    into :attr:`loss_sum` (float32, :attr:`count` target tokens) and returns an empty ``[B, 0, V]``
    tensor as the logits. When the hidden states are not ``[B, T, H]`` (a model laid out differently),
    the layer runs as usual and :attr:`loss_sum` stays None: compute the loss the stock way then.
    """

    def __init__(self, head: nn.Module, labels: torch.Tensor, chunk_size: int = 1024, fused: bool = True):
        self.head = head
        self.labels = labels
        self.chunk_size = int(chunk_size)
        self.fused = fused and chunk_size > 0 and type(head) is nn.Linear
        self.loss_sum: torch.Tensor | None = None
        self.count = 0
        self.calls = 0

    def __enter__(self) -> LabelledOutputs:
        if "forward" in vars(self.head):
            raise RuntimeError("the output layer's forward is already replaced (nested LabelledOutputs?)")
        self._original = self.head.forward
        self.head.forward = self._forward
        return self

    def __exit__(self, *exc) -> None:
        del self.head.forward

    def _forward(self, hidden: torch.Tensor, *args, **kwargs):
        self.calls += 1
        if self.calls > 1 or args or kwargs or hidden.ndim != 3 or hidden.shape[:2] != self.labels.shape:
            self.loss_sum = None
            return self._original(hidden, *args, **kwargs)
        mask, targets = label_positions(self.labels.to(hidden.device))
        rows = hidden[mask]
        self.count = int(targets.numel())
        if self.fused:
            self.loss_sum = linear_cross_entropy(
                rows, self.head.weight, targets, self.head.bias, self.chunk_size
            )
        else:
            logits = self._original(rows)
            self.loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        vocab = getattr(self.head, "out_features", None) or 0
        return hidden.new_zeros((hidden.shape[0], 0, vocab))

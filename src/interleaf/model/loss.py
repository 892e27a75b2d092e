"""The next-token loss, from logits or straight from the last hidden states.

:func:`next_token_loss` takes the logits the model returns. :func:`hidden_next_token_loss` is
what training uses: it never holds the float32 logits of the whole batch over the whole
vocabulary (2 x 512 tokens x 32,000 rows: 131 MB, and as much again for their softmax and
their gradient). It scores only the positions that have a label, a chunk of rows at a time,
and computes each chunk's gradients (with respect to the hidden states and the output head's
trainable weights) while its logits are at hand, as fused linear cross-entropy kernels do:
the same arithmetic as the plain loss, none of it repeated, and memory bounded by one chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from interleaf.model.masks import IGNORE_INDEX

# float32 logits per chunk: 8M (32 MB), e.g. 262 rows of a 32,000-token vocabulary
CHUNK_ELEMENTS = 1 << 23


def next_token_loss(logits: Tensor, labels: Tensor, z_loss_weight: float = 0.0) -> Tensor:
    """Mean cross-entropy of predicting token t+1 at t, over labels != -100; optionally plus
    ``z_loss_weight * mean(logsumexp(logits)^2)`` (the z-loss of PaLM / IDEFICS)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    count = valid.sum().clamp(min=1)  # a batch with nothing to learn has loss 0, not NaN
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if z_loss_weight:
        loss = loss + z_loss_weight * torch.logsumexp(logits[valid], dim=-1).pow(2).sum()
    return loss / count


def hidden_next_token_loss(
    head: Callable[[Tensor], Tensor],
    parameters: Sequence[nn.Parameter],
    hidden: Tensor,
    labels: Tensor,
    z_loss_weight: float = 0.0,
    vocab_size: int | None = None,
) -> Tensor:
    """:func:`next_token_loss` of ``head(hidden)`` without the whole logits: ``head`` maps
    (M, D) states to (M, V) logits, ``parameters`` are its weights (those that train get their
    gradient); ``vocab_size`` sets the chunk size (rows of ``CHUNK_ELEMENTS / V``)."""
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    rows, target = hidden[:, :-1][valid], target[valid]  # only the positions that have a label
    chunk = max(1, CHUNK_ELEMENTS // (vocab_size or 32000))
    trained = [p for p in parameters if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or trained):
        total = _FusedLoss.apply(head, chunk, z_loss_weight, rows, target, *trained)
    else:
        total = rows.new_zeros((), dtype=torch.float32)
        for i in range(0, len(rows), chunk):
            total = total + _chunk_loss(head, rows[i : i + chunk], target[i : i + chunk], z_loss_weight)
    return total / count


def _chunk_loss(head, rows: Tensor, target: Tensor, z_loss_weight: float) -> Tensor:
    logits = head(rows).float()
    loss = F.cross_entropy(logits, target, reduction="sum")
    if z_loss_weight:
        loss = loss + z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).sum()
    return loss


class _FusedLoss(torch.autograd.Function):
    """The summed loss of ``rows``; its gradients, computed chunk by chunk in the forward pass
    (each chunk's logits live only while it is scored), are kept for the backward pass, which
    scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, head, chunk: int, z_loss_weight: float, rows: Tensor, target: Tensor, *parameters: Tensor):
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.zeros_like(rows) if ctx.needs_input_grad[3] else None
        grad_parameters = [torch.zeros_like(p) for p in parameters]
        for start in range(0, len(rows), chunk):
            with torch.enable_grad():
                part = rows[start : start + chunk].detach().requires_grad_(grad_rows is not None)
                loss = _chunk_loss(head, part, target[start : start + chunk], z_loss_weight)
            inputs = ([part] if grad_rows is not None else []) + list(parameters)
            grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
            if grad_rows is not None:
                grad_rows[start : start + chunk] = grads.pop(0)
            for accumulated, grad in zip(grad_parameters, grads):
                if grad is not None:
                    accumulated += grad
            total += loss.detach()
        ctx.save_for_backward(*([grad_rows] if grad_rows is not None else []), *grad_parameters)
        ctx.has_rows = grad_rows is not None
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        saved = list(ctx.saved_tensors)
        grad_rows = None
        if ctx.has_rows:
            grad_rows = saved.pop(0)
            grad_rows = grad_rows * grad_total.to(grad_rows.dtype)
        return (None, None, None, grad_rows, None, *(g * grad_total.to(g.dtype) for g in saved))

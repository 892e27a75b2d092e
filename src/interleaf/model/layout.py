"""How the linear layers' weights lie in memory.

``nn.Linear`` keeps its weight as an (out, in) row-major matrix. torch's CPU matmul in float32
reads the same matrix faster when it lies (in, out)-major, the transpose's storage behind a
transposed view: same shape, same values, same module, other strides. Measured on this project's
development CPU (AMD EPYC, torch 2.13, one thread; ``benchmarks/bench_layout.py``): one row
at a time (decoding at batch 1), a single weight's matmul 1.02-1.82x faster at widths 512-1408
and for a 32,000-row output head, 0.85-1.18x at 4096-wide layers; with more rows and in the
backward, within noise either way. Whole steps (docs/BENCHMARKS.md): the medium model of
``benchmarks/compare.py`` decodes 1.31x faster per token at batch 1 but 0.89x at batch 8, and
trains 1.09-1.17x faster at the small and medium sizes; a small model with a tiny vocabulary
gains less at batch 1 (1.07x). In bfloat16 the (in, out) layout is slower (0.36-0.88x at
one row), and on a GPU cuBLAS reads either; so ``auto`` lays float32 CPU weights (in, out) and
every other weight (out, in), torch's own layout.

Checkpoints are unaffected (``save_pretrained`` saves the weights contiguous; ``torch.save``
keeps the strides and loads them back); ``safetensors.torch.save_model`` on a model with
shared tensors needs contiguous weights: call ``set_weight_layout(model, "out-major")`` first. Results differ
from the (out, in) layout's by rounding alone (the matmul sums in another order).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Layout = Literal["auto", "in-major", "out-major"]
LAYOUTS = ("auto", "in-major", "out-major")


def set_weight_layout(model: nn.Module, layout: Layout = "auto") -> int:
    """Lay every ``nn.Linear`` weight of ``model`` out as ``layout`` says (``auto``: (in, out)
    for float32 weights on a CPU, (out, in) for the rest); returns how many weights moved.
    Idempotent; call it again after moving the model to another device or dtype (``.to()``
    keeps the strides it finds)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_weight_layout takes a torch module (a Flamingo, an LM), not {type(model).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"weight layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    moved = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if weight.dim() != 2 or min(weight.shape) < 2 or weight.device.type == "meta":
            continue
        if layout == "auto":
            in_major = weight.device.type == "cpu" and weight.dtype == torch.float32
        else:
            in_major = layout == "in-major"
        if in_major == is_in_major(weight):
            continue
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t() if in_major else weight.data.contiguous()
        moved += 1
    return moved


def is_in_major(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight (a linear layer's ``.weight``) lies (in, out)-major: its transpose is
    contiguous and it is not. A weight with a dimension of 1 has one layout only: False."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        what = type(weight).__name__ if not isinstance(weight, torch.Tensor) else f"a {weight.dim()}-D tensor"
        raise TypeError(f"is_in_major takes a 2-D weight tensor (e.g. layer.weight), not {what}")
    return weight.t().is_contiguous() and not weight.is_contiguous()

"""How the linear layers' weights lie in memory.

``nn.Linear`` keeps its weight as an (out, in) row-major matrix. torch's CPU matmul in float32
reads the same matrix faster when it lies (in, out)-major, the transpose's storage behind a
transposed view: same shape, same values, same module, other strides. Measured on this project's
development CPU (AMD EPYC, torch 2.13, ``benchmarks/bench_layout.py``): one token at a time
(decoding) 1.35-1.96x faster per weight at the benchmark's medium sizes, neutral (0.91-1.11x)
at 4096-wide layers; whole training steps 1.09-1.17x faster at the small and medium sizes of
``benchmarks/compare.py``. In bfloat16 the (in, out) layout is slower (0.6-0.9x), and on a
GPU cuBLAS reads either; so ``auto`` lays float32 CPU weights (in, out) and every other weight
(out, in), torch's own layout.

Checkpoints are unaffected (weights are saved contiguous); results differ from the (out, in)
layout's by rounding alone (the matmul sums in another order).
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
    """Whether a 2-D weight lies (in, out)-major: its transpose is contiguous and it is not."""
    return weight.t().is_contiguous() and not weight.is_contiguous()

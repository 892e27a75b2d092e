"""Building blocks shared by the resampler and the cross-attention blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def make_norm(kind: str | None, dim: int, eps: float = 1e-5) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


class FeedForward(nn.Module):
    """Norm, then ``down(act(up(x)))``, or ``down(act(gate(x)) * up(x))`` when gated (SwiGLU)."""

    def __init__(
        self, dim: int, hidden: int, activation: str, *, norm: str = "layernorm", gated: bool = False, eps: float = 1e-5
    ):
        super().__init__()
        self.norm = make_norm(norm, dim, eps)
        self.gate_proj = nn.Linear(dim, hidden, bias=False) if gated else None
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MultiHeadProjection(nn.Module):
    """q from one input, k and v from another; optional norm of q and k over the head dim."""

    def __init__(
        self, q_dim: int, kv_dim: int, heads: int, head_dim: int, qk_norm: str | None = None, eps: float = 1e-5
    ):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.q_proj = nn.Linear(q_dim, inner, bias=False)
        self.k_proj = nn.Linear(kv_dim, inner, bias=False)
        self.v_proj = nn.Linear(kv_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, q_dim, bias=False)
        self.q_norm = make_norm(qk_norm, head_dim, eps)
        self.k_norm = make_norm(qk_norm, head_dim, eps)

    def query(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, H, T, d)"""
        return self.q_norm(rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.heads))

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, Dkv) -> two (B, H, S, d)"""
        k = self.k_norm(rearrange(self.k_proj(x), "b s (h d) -> b h s d", h=self.heads))
        v = rearrange(self.v_proj(x), "b s (h d) -> b h s d", h=self.heads)
        return k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scaled dot-product attention, heads merged and projected out: (B, T, D)."""
        return self.o_proj(rearrange(attention(q, k, v, mask), "b h t d -> b t (h d)"))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention, (B, H, T, d); ``mask`` (bool, True: may be read) broadcasts
    to (B, H, T, S). torch's fused SDPA, except in bfloat16/float16 on a CPU while autograd
    records: there SDPA's CPU flash-attention backward cost 31-40% of a small training step
    (docs/BENCHMARKS.md), more than the plain matmuls it replaces at the perceiver's and the
    cross-attention's short key lengths, so the scores are two matmuls and a softmax (in float32)."""
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16) or not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v


def gate_parameter(kind: str, dim: int) -> nn.Parameter:
    """A tanh gate's alpha: zero, so a fresh block is the identity."""
    if kind == "scalar":
        return nn.Parameter(torch.zeros(1))
    if kind == "vector":
        return nn.Parameter(torch.zeros(dim))
    raise ValueError(f"unknown gate {kind!r}; expected 'scalar' or 'vector'")

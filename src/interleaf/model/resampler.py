"""Perceiver resampler (Flamingo, sec. 2.1): a fixed number of learned latents summarise
the variable number of patch features of an image (or of the frames of a video)."""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from interleaf.config import ResamplerConfig
from interleaf.model.layers import FeedForward, MultiHeadProjection


class PerceiverLayer(nn.Module):
    """Latents attend to [features; latents], then a feed-forward; both residual."""

    def __init__(self, dim: int, cfg: ResamplerConfig):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = MultiHeadProjection(dim, dim, cfg.heads, cfg.head_dim, "layernorm" if cfg.qk_norm else None)
        self.ff = FeedForward(dim, cfg.ff_dim or cfg.ff_mult * dim, cfg.activation)

    def forward(self, x: Tensor, latents: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (n, S, D) features; latents: (n, L, D) -> (n, L, D); mask: (n, S) bool, which
        features may be read (the latents always may)."""
        lat = self.norm_latents(latents)
        kv_input = torch.cat([self.norm_media(x), lat], dim=1)  # (n, S + L, D)
        k, v = self.attn.keys_values(kv_input)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(latents.shape[:2])], dim=1)[:, None, None]  # (n, 1, 1, S + L)
        latents = latents + self.attn.attend(self.attn.query(lat), k, v, mask)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, cfg: ResamplerConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(cfg.max_frames, dim)) if cfg.max_frames else None
        self.media_embs = nn.Parameter(torch.randn(cfg.max_media, dim)) if cfg.max_media else None
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, media_position: Tensor | None = None) -> Tensor:
        """x: (n, F, P, D) patch features of n media with F frames each;
        media_position: (n,) 0-based position of each medium in its sample.
        Returns (n, L, D)."""
        n, frames = x.shape[:2]
        if self.frame_embs is not None:
            _check_range("frames", frames, self.frame_embs.shape[0])
            x = x + self.frame_embs[:frames, None]
        x = rearrange(x, "n f p d -> n (f p) d")
        if self.media_embs is not None:
            if media_position is None:
                media_position = torch.zeros(n, dtype=torch.long, device=x.device)
            _check_range("images in a sample", int(media_position.max()) + 1 if n else 0, self.media_embs.shape[0])
            x = x + self.media_embs[media_position, None]
        latents = repeat(self.latents, "l d -> n l d", n=n)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents)


def _check_range(what: str, got: int, limit: int) -> None:
    if got > limit:
        raise ValueError(f"the resampler has embeddings for {limit} {what}, got {got}")


def build_resampler(dim: int, cfg: ResamplerConfig) -> nn.Module | None:
    return PerceiverResampler(dim, cfg) if cfg.enabled else None

"""Gated cross-attention (Flamingo, sec. 2.2): text tokens attend to the latents of the
images they may see; tanh gates initialised at zero keep a fresh model equal to its LM."""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from interleaf.config import CrossAttentionConfig
from interleaf.model.layers import FeedForward, MultiHeadProjection, gate_parameter, make_norm


class MediaKV(NamedTuple):
    """Keys and values of one block over all images of a batch: (B, H, N * L, d) each."""

    k: Tensor
    v: Tensor


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, media_dim: int, cfg: CrossAttentionConfig):
        super().__init__()
        self.norm = make_norm(cfg.norm, dim, cfg.norm_eps)
        self.attn = MultiHeadProjection(dim, media_dim, cfg.heads, cfg.head_dim, cfg.qk_norm, cfg.norm_eps)
        self.attn_gate = gate_parameter(cfg.gate, dim)
        hidden = cfg.ff_dim or cfg.ff_mult * dim
        self.ff = FeedForward(dim, hidden, cfg.activation, norm=cfg.norm, gated=cfg.gated_ff, eps=cfg.norm_eps)
        self.ff_gate = gate_parameter(cfg.gate, dim)
        self.one_image = cfg.media_attention == "last"  # a token sees at most one image

    def project_media(self, media: Tensor) -> MediaKV:
        """media: (B, N, L, Dv) resampled latents -> this block's keys and values.

        Done once per forward (and once per ``generate`` call), not at every decoding step.
        """
        media = media.to(self.attn.k_proj.weight.device)  # this block's device (a model spread over GPUs)
        return MediaKV(*self.attn.keys_values(rearrange(media, "b n l d -> b (n l) d")))

    def forward(self, x: Tensor, media: MediaKV | None, visible: Tensor | None, keep: Tensor | None = None) -> Tensor:
        """x: (B, T, D); visible: (B, T, N) which images each token may attend to; keep: (B,)
        the samples this block changes (None: all; the others come out exactly as they went in).

        Without media (a text-only batch) only the gated feed-forward applies, as it does to
        the text-only samples of a mixed batch.
        """
        out = x
        if media is not None and visible is not None and visible.shape[-1] > 0:
            out = out + torch.tanh(self.attn_gate) * self._attend(out, media, visible)
        out = out + torch.tanh(self.ff_gate) * self.ff(out)
        return out if keep is None else torch.where(keep[:, None, None], out, x)

    def _attend(self, x: Tensor, media: MediaKV, visible: Tensor) -> Tensor:
        latents_per_image = media.k.shape[2] // visible.shape[-1]
        has_media = visible.any(-1, keepdim=True)  # (B, T, 1)
        if self.one_image and x.shape[1] == 1 and visible.shape[-1] > 1:
            # a decoding step: each sample's token reads one image's latents, gathered, not the
            # whole batch's images behind a mask (the masked-out keys weigh exactly zero)
            image = visible[:, 0].to(torch.uint8).argmax(-1)  # (B,): 0 where none is visible
            rows = torch.arange(len(image), device=image.device)
            k, v = (t.unflatten(2, (-1, latents_per_image))[rows, :, image] for t in media)  # (B, H, L, d)
            return self.attn.attend(self.attn.query(self.norm(x)), k, v) * has_media
        # A row with nothing visible would be a fully masked softmax: open it, then zero it.
        mask = visible | ~has_media
        mask = repeat(mask, "b t n -> b 1 t (n l)", l=latents_per_image)
        return self.attn.attend(self.attn.query(self.norm(x)), media.k, media.v, mask) * has_media

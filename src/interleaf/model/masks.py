"""Pure functions: which image each token sees, and which tokens carry a loss.

Images are numbered 1..N within a sample in the order of their ``<image>`` tokens. A token's
*media index* is the number of ``<image>`` tokens at or before it (0: no image yet).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

IGNORE_INDEX = -100


def media_index(input_ids: Tensor, image_token_id: int) -> Tensor:
    """(B, T) number of ``<image>`` tokens at or before each position."""
    return (input_ids == image_token_id).long().cumsum(-1)


def media_floor(
    input_ids: Tensor, image_token_id: int, eos_token_id: int | None, attention_mask: Tensor | None = None
) -> Tensor:
    """(B, T) the media index in force at the last EOS strictly before each position.

    Images numbered at or below the floor belong to an earlier packed document and are not
    seen. The EOS token itself still sees its document's image (as IDEFICS does). Padding
    (``attention_mask == 0``) is never an EOS, even where the pad id is the EOS id: right
    padding must not hide the prompt's images from the tokens generated after it.
    """
    if eos_token_id is None:
        return torch.zeros_like(input_ids)
    idx = media_index(input_ids, image_token_id)
    is_eos = input_ids == eos_token_id
    if attention_mask is not None:
        is_eos &= attention_mask.bool()
    at_eos = torch.where(is_eos, idx, torch.zeros_like(idx)).cummax(-1).values
    return torch.nn.functional.pad(at_eos[:, :-1], (1, 0))


def cross_attention_mask(
    input_ids: Tensor,
    image_token_id: int,
    num_media: int,
    *,
    mode: Literal["last", "all"] = "last",
    eos_token_id: int | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """(B, T, num_media) bool: may token t attend to image j (0-based)?

    ``mode="last"``: only the most recent preceding image; ``"all"``: every earlier image.
    With ``eos_token_id`` an EOS ends the reach of earlier images (packed documents); an EOS id
    where ``attention_mask`` is 0 is padding and ends nothing.
    Rows with no True entry belong to tokens that see no image; their cross-attention output
    must be exactly zero.
    """
    idx = media_index(input_ids, image_token_id)  # (B, T)
    lower = media_floor(input_ids, image_token_id, eos_token_id, attention_mask)
    if mode == "last":
        lower = torch.maximum(lower, idx - 1)
    elif mode != "all":
        raise ValueError(f"unknown media attention mode {mode!r}; expected 'last' or 'all'")
    j = torch.arange(1, num_media + 1, device=input_ids.device)  # (N,)
    return (j <= idx[..., None]) & (j > lower[..., None])


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, T) positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def flamingo_labels(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    image_token_id: int,
    end_of_chunk_id: int | None,
    ignore_ids: tuple[int, ...] = (),
) -> Tensor:
    """Labels for interleaved pretraining (OpenFlamingo's masking).

    -100 on padding, on ``<image>`` tokens (and ``ignore_ids``), on text before the first
    image, and on text after an ``<|endofchunk|>`` until the next image. The
    ``<|endofchunk|>`` token itself is a target: the model learns where a chunk ends.
    """
    is_image = input_ids == image_token_id
    seen_image = is_image.long().cumsum(-1) > 0
    # Position after an <|endofchunk|> and before the next <image>: a "closed" chunk.
    chunk_event = torch.where(is_image, 1, torch.where(input_ids == end_of_chunk_id, -1, 0))
    last_event = _last_nonzero(chunk_event)
    closed = torch.nn.functional.pad(last_event[:, :-1], (1, 0)) == -1
    keep = attention_mask.bool() & seen_image & ~closed & ~is_image
    for tid in ignore_ids:
        keep &= input_ids != tid
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def _last_nonzero(events: Tensor) -> Tensor:
    """(B, T) the most recent non-zero value of ``events`` at or before each position (0 if none)."""
    positions = torch.arange(events.shape[-1], device=events.device).expand_as(events)
    last_pos = torch.where(events != 0, positions, torch.full_like(positions, -1)).cummax(-1).values
    gathered = events.gather(-1, last_pos.clamp(min=0))
    return torch.where(last_pos >= 0, gathered, torch.zeros_like(gathered))

"""The model side of continuous batching: a batch of sequences that decode together, one
token per step, which sequences join and leave between steps.

The rows are right-aligned: each row's tokens end at the last column, and a row shorter than
the batch is padded on the left (``mask`` 0), exactly as ``generate`` pads a batch of prompts.
Positions come from the mask, so a row's positions, its attention and its images are those it
would have alone; only the shapes of the matrix products differ.

- ``join`` runs the prompts of the new rows through the model together (their images are
  encoded and every cross-attention block's keys/values projected here, once), then splices
  their LM KV cache, history and image keys/values into the running batch: the shorter side
  is padded on the left, image slots are padded with zeros that no token can see.
- ``step`` feeds each row its next token through the shared LM cache.
- ``leave`` drops rows and then every leading column that is padding in all remaining rows.

The LM cache is transformers' ``DynamicCache`` whose layers hold plain ``keys``/``values``
tensors (B, H, T, d); a sliding-window layer is accepted as long as no row outgrows its
window (``max_length`` says how long a row may get).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from interleaf.generation import next_token_logprobs
from interleaf.model.flamingo import Media
from interleaf.model.xattn import MediaKV


@dataclass(frozen=True)
class Prompt:
    """One new row: its token ids (T,) and the pixels of its images (N, C, H, W), N = number of
    ``<image>`` tokens in ``input_ids`` (None when there are none)."""

    input_ids: Tensor
    pixel_values: Tensor | None = None


class RunningBatch:
    def __init__(self, model):
        self.model = model
        self.history: Tensor | None = None  # (B, T) token ids, left-padded with the pad id
        self.mask: Tensor | None = None  # (B, T) 1 on real tokens
        self.cache = None  # the LM's DynamicCache over the same B x T
        self.media_kv: list[MediaKV] | None = None  # per block (B, H, N_max * L, d), or None
        self.image_counts: list[int] = []  # real images per row
        self.latents = 0  # keys/values per image in media_kv
        self.max_length = max_sequence_length(model)

    def __len__(self) -> int:
        return 0 if self.history is None else self.history.shape[0]

    @property
    def width(self) -> int:
        """Columns of the batch: the longest row's length."""
        return 0 if self.history is None else self.history.shape[1]

    @torch.no_grad()
    def join(self, prompts: list[Prompt]) -> Tensor:
        """Add ``prompts`` as the last rows; returns their (k, V) next-token log-probabilities."""
        model = self.model
        device = model.device
        pad = model.ids.pad
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p.input_ids) :] = p.input_ids.to(device)
            mask[row, width - len(p.input_ids) :] = 1
        counts = [0 if p.pixel_values is None else p.pixel_values.shape[0] for p in prompts]
        pixels = None
        if max(counts):
            first = next(p.pixel_values for p in prompts if p.pixel_values is not None)
            pixels = first.new_zeros(len(prompts), max(counts), *first.shape[1:])
            for row, p in enumerate(prompts):
                if counts[row]:
                    pixels[row, : counts[row]] = p.pixel_values
        media = model.prepare_media(ids, pixels)
        out = model.step(ids, history_ids=ids, attention_mask=mask, media=media, use_cache=True)
        logprobs = next_token_logprobs(model, out.last_hidden_state, mask)
        self._splice(ids, mask, out.cache, media, counts)
        return logprobs

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row (B,) and return the (B, V) next-token log-probabilities."""
        model = self.model
        tokens = tokens.to(self.history.device)
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = model.step(
            tokens[:, None],
            history_ids=self.history,
            attention_mask=self.mask,
            media=self._media(),
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        return next_token_logprobs(model, out.last_hidden_state, self.mask)

    def leave(self, rows: list[int]) -> None:
        """Drop ``rows`` (indices into the batch) at once."""
        if not rows:
            return
        gone = set(rows)
        keep = [r for r in range(len(self)) if r not in gone]
        if not keep:
            self.__init__(self.model)
            return
        index = torch.tensor(keep, device=self.history.device)
        self.image_counts = [self.image_counts[r] for r in keep]
        start = int(self.mask[index].any(0).long().argmax())  # leading columns now padding everywhere
        self.history = self.history[index, start:]
        self.mask = self.mask[index, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        self._set_length(self.width)
        if self.media_kv is not None:
            n = max(self.image_counts)
            kept = []
            for kv in self.media_kv:
                at = index.to(kv.k.device)
                kept.append(MediaKV(kv.k[at, :, : n * self.latents], kv.v[at, :, : n * self.latents]))
            self.media_kv = kept if n else None

    # -- internals --------------------------------------------------------------------------

    def _media(self) -> Media | None:
        if self.media_kv is None:
            return None
        return Media(self.media_kv, max(self.image_counts))

    def _splice(self, ids: Tensor, mask: Tensor, cache, media: Media | None, counts: list[int]) -> None:
        _check_cache(cache)
        if media is not None:
            self.latents = media.kv[0].k.shape[2] // media.count
        if self.history is None:
            self.history, self.mask, self.cache = ids, mask, cache
            self.media_kv = None if media is None else list(media.kv)
            self.image_counts = counts
            return
        width = max(self.width, ids.shape[1])
        pad = self.model.ids.pad
        self.history = torch.cat([_left_pad(self.history, width, pad), _left_pad(ids, width, pad)])
        self.mask = torch.cat([_left_pad(self.mask, width, 0), _left_pad(mask, width, 0)])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width, 0, dim=2), _left_pad(new.keys, width, 0, dim=2)])
            old.values = torch.cat([_left_pad(old.values, width, 0, dim=2), _left_pad(new.values, width, 0, dim=2)])
        self._set_length(width)
        self.media_kv = _merge_media(self.media_kv, len(self.image_counts), media, ids.shape[0])
        self.image_counts = self.image_counts + counts

    def _set_length(self, width: int) -> None:
        for layer in self.cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = width


def _merge_media(old: list[MediaKV] | None, old_rows: int, new: Media | None, new_rows: int) -> list[MediaKV] | None:
    """Image keys/values of two row groups stacked, the image axis zero-padded to the longer."""
    if old is None and new is None:
        return None
    reference = (old or new.kv)[0].k
    width = max(0 if old is None else old[0].k.shape[2], 0 if new is None else new.kv[0].k.shape[2])
    merged = []
    for b in range(len(old if old is not None else new.kv)):
        pair = []
        for which in (0, 1):
            top = _rows_of(old[b][which] if old is not None else None, old_rows, reference, width)
            bottom = _rows_of(new.kv[b][which] if new is not None else None, new_rows, reference, width)
            pair.append(torch.cat([top, bottom.to(top.device)]))
        merged.append(MediaKV(*pair))
    return merged


def _rows_of(kv: Tensor | None, rows: int, reference: Tensor, width: int) -> Tensor:
    if kv is None:
        return reference.new_zeros(rows, reference.shape[1], width, reference.shape[3])
    return F.pad(kv, (0, 0, 0, width - kv.shape[2]))


def _left_pad(x: Tensor, width: int, value, dim: int = 1) -> Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_full(shape, value), x], dim=dim)


def _check_cache(cache) -> None:
    for layer in getattr(cache, "layers", [None]):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) or getattr(layer, "record_past", False):
            raise NotImplementedError(
                f"continuous batching needs a DynamicCache of plain key/value layers; this LM's cache is "
                f"{type(cache).__name__} with {type(layer).__name__} layers"
            )


def max_sequence_length(model) -> int | None:
    """How long (prompt + generated) a row may get: the LM's position limit, and for an LM with
    a sliding-window cache, one less than its window (the batch's cache stays a plain one)."""
    config = model.language_model.lm.config
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "max_seq_len")]
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 1:
        limits.append(window - 1)
    found = [v for v in limits if isinstance(v, int) and v > 0]
    return min(found) if found else None

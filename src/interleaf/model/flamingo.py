"""Flamingo: a frozen vision encoder, a Perceiver resampler, and gated cross-attention
inserted into a frozen causal LM. The whole forward reads top to bottom in this file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from interleaf.config import FlamingoConfig
from interleaf.generation import generate
from interleaf.model.checkpoint import load_backbones, load_flamingo, save_flamingo
from interleaf.model.imagegen import ImageGenerator, find_targets
from interleaf.model.interleaved import draw_images, generate_interleaved
from interleaf.model.layout import set_weight_layout
from interleaf.model.lm import CrossAttentionDecoderLayer, LanguageModel, MediaContext
from interleaf.model.loss import hidden_next_token_loss, next_token_loss
from interleaf.model.masks import cross_attention_mask, position_ids
from interleaf.model.placement import parse_device, parse_dtype
from interleaf.model.resampler import build_resampler
from interleaf.model.trainable import apply_lora, apply_trainable
from interleaf.model.vision import VisionEncoder
from interleaf.model.xattn import GatedCrossAttentionBlock, MediaKV
from interleaf.tokens import prepare_tokenizer, token_ids


@dataclass
class FlamingoOutput:
    """``loss`` = ``text_loss`` + ``image_generation.loss_weight`` * ``image_loss`` (the
    diffusion loss of the images announced by the begin-of-image token, when the model draws)."""

    logits: Tensor | None  # None when training asked for the loss alone (``return_logits=False``)
    loss: Tensor | None = None
    text_loss: Tensor | None = None
    image_loss: Tensor | None = None


@dataclass(frozen=True)
class Media:
    """The images of a batch, encoded once: each block's keys/values and the image count N."""

    kv: list[MediaKV]
    count: int

    def select(self, index: Tensor) -> Media:
        """Rows ``index`` of the batch (beam expansion, reordering)."""
        return Media([MediaKV(kv.k[index], kv.v[index]) for kv in self.kv], self.count)


class Flamingo(nn.Module):
    def __init__(
        self, config: FlamingoConfig, *, lm: nn.Module, vision_tower: nn.Module, tokenizer, image_processor=None
    ):
        """The parts: an HF causal LM, a vision tower, the LM's tokenizer (special tokens are added
        to it) and the tower's HF image processor (saved with the model as its processor)."""
        super().__init__()
        added = prepare_tokenizer(tokenizer, config.tokens)
        config = dataclasses.replace(
            config, lm=dataclasses.replace(config.lm, added_tokens=config.lm.added_tokens or added)
        )
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.ids = token_ids(tokenizer, config.tokens)

        self.vision = VisionEncoder(vision_tower, config.vision)
        # the frozen-feature cache, when one is attached (interleaf.train.features.use_feature_cache):
        # a callable (n, F, C, H, W) pixels, n keys or None -> (n, F, P, D) features
        self.feature_cache = None
        self.resampler = build_resampler(self.vision.dim, config.resampler)
        xcfg = config.cross_attention
        lm_vocab = lm.get_input_embeddings().num_embeddings
        new_ids = [tokenizer.convert_tokens_to_ids(t) for t in config.lm.added_tokens]
        self.language_model = LanguageModel(
            lm,
            lambda: GatedCrossAttentionBlock(lm.config.hidden_size, self.vision.dim, xcfg),
            interval=xcfg.interval,
            offset=xcfg.offset,
            vocab_size=len(tokenizer),
            new_token_start=min([lm_vocab, *new_ids]),
            decoupled=config.lm.new_token_embeddings == "decoupled",
            layers_path=config.lm.layers_path,
        )
        gen = config.image_generation
        states = lm.config.hidden_size * (2 if gen and gen.read_embeddings else 1)
        self.image_generator = ImageGenerator(states, self.vision.dim, gen, self.vision.num_tokens) if gen else None
        if config.trainable.lora is not None:
            apply_lora(self.language_model, config.trainable.lora)
        self.trainable_names = apply_trainable(self, config.trainable)
        set_weight_layout(self)  # however it is built, a model computes as a loaded one does

    # -- construction and checkpoints ------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: FlamingoConfig, *, dtype: str | torch.dtype | None = None, device: str | None = None
    ) -> Flamingo:
        """Build from pretrained backbones named by ``config.lm.source`` / ``config.vision.source``,
        all of it in ``dtype`` (``float32``, ``bfloat16``, ``float16``; default float32) on
        ``device``. Like ``from_pretrained``, returns the model in eval mode."""
        dtype, device = parse_dtype(dtype), parse_device(device)
        lm, tokenizer, tower, image_processor = load_backbones(config, dtype=dtype)
        model = cls(config, lm=lm, vision_tower=tower, tokenizer=tokenizer, image_processor=image_processor)
        model.to(device=device, dtype=dtype)
        set_weight_layout(model)
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
    ) -> Flamingo:
        """Load an interleaf checkpoint from a directory or hub id, in eval mode: in ``dtype``
        (default: as stored), on ``device`` (``cpu``, ``cuda``, ``cuda:1``; ``auto`` = the
        device map ``auto``), or spread over several GPUs by ``device_map`` (``"auto"`` or a
        dict; see :mod:`interleaf.model.placement`). Weights are converted as they are read."""
        return load_flamingo(cls, path, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)

    def save_pretrained(self, path: str | Path, *, trainable_only: bool = False) -> None:
        """Write the checkpoint and the model's processor (see :mod:`interleaf.model.checkpoint`)."""
        save_flamingo(self, path, trainable_only=trainable_only)

    @property
    def blocks(self) -> list[GatedCrossAttentionBlock]:
        return [m.xattn for m in self.language_model.modules() if isinstance(m, CrossAttentionDecoderLayer)]

    # -- the forward pass ------------------------------------------------------------------

    def encode_images(
        self, input_ids: Tensor, pixel_values: Tensor | None, image_keys: list[list[str]] | None = None
    ) -> Tensor | None:
        """(B, N, L, D) resampled latents of each sample's real images, None if there are none.

        A sample's real images are its first ``count(<image> in input_ids)`` slots of
        ``pixel_values`` (B, N_max, C, H, W) or, for video, (B, N_max, F, C, H, W); padding
        slots never reach the vision encoder. ``image_keys`` (a batch's, from the data pipeline's
        collator: row b names its images) serve the frozen-feature cache, when the model has one
        (``feature_cache``; see ``interleaf.train.features``), and are ignored otherwise.
        """
        return self.encode_images_and_features(input_ids, pixel_values, features=False, image_keys=image_keys)[0]

    def encode_images_and_features(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        *,
        features: bool = True,
        image_keys: list[list[str]] | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """The resampled latents of :meth:`encode_images` and (``features``; else None) the
        vision encoder's features they were resampled from, (B, N, F P, D) (the patch grid of
        each frame)."""
        vision_device = next(self.vision.parameters()).device
        input_ids = input_ids.to(vision_device)
        counts = (input_ids == self.ids.image).sum(-1)
        n_max = int(counts.max()) if counts.numel() else 0
        if n_max == 0:
            return None, None
        if pixel_values is None:
            raise ValueError(f"input_ids hold {int(counts.sum())} <image> tokens but no pixel_values were given")
        if pixel_values.ndim == 5:
            pixel_values = pixel_values[:, :, None]
        if pixel_values.ndim != 6:
            raise ValueError(
                f"pixel_values must be (B, N, C, H, W) or (B, N, F, C, H, W), got {tuple(pixel_values.shape)}"
            )
        pixel_values = pixel_values.to(vision_device)
        batch, slots = pixel_values.shape[:2]
        if batch != input_ids.shape[0]:
            raise ValueError(f"pixel_values hold {batch} samples for {input_ids.shape[0]} samples in input_ids")
        if n_max > slots:
            sample = int((counts > slots).nonzero()[0])
            raise ValueError(
                f"sample {sample} has {int(counts[sample])} <image> tokens but pixel_values hold {slots} image slots"
            )
        real = torch.arange(n_max, device=input_ids.device) < counts[:, None]  # (B, n_max)
        pixels = pixel_values[:, :n_max][real]  # (n, F, C, H, W)
        n, frames = pixels.shape[:2]
        pixels = pixels.to(self.dtype)
        keys = _real_keys(image_keys, counts) if self.feature_cache is not None else None
        position = torch.arange(n_max, device=input_ids.device).expand_as(real)[real]
        # on a CPU, a few images at a time through the tower and the resampler (their work then
        # stays in cache: VisionEncoder.cpu_chunk); all of them at once on an accelerator
        chunk = max(1, self.vision.cpu_chunk(pixels.flatten(0, 1)) // frames)
        encoded, latents = [], []
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            if self.feature_cache is not None:
                enc = self.feature_cache(pixels[part], None if keys is None else keys[part])  # (c, F, P, D)
            else:
                enc = self.vision(pixels[part].flatten(0, 1)).unflatten(0, (-1, frames))  # (c, F, P, D)
            encoded.append(enc)
            # (c, L, D) resampled, or (c, F P, D) the features themselves
            latents.append(enc.flatten(1, 2) if self.resampler is None else self.resampler(enc, position[part]))
        encoded, latents = (torch.cat(x) if len(x) > 1 else x[0] for x in (encoded, latents))
        return _per_sample(latents, real), (_per_sample(encoded.flatten(1, 2), real) if features else None)

    def prepare_media(self, input_ids: Tensor, pixel_values: Tensor | None) -> Media | None:
        """Encode the images and project every block's keys/values, once."""
        return self.media(self.encode_images(input_ids, pixel_values))

    def media(self, latents: Tensor | None) -> Media | None:
        """Every block's keys/values of the (B, N, L, D) image latents."""
        if latents is None:
            return None
        return Media([block.project_media(latents) for block in self.blocks], latents.shape[1])

    def visible_media(
        self, history_ids: Tensor, attention_mask: Tensor, media: Media | None, new_tokens: int
    ) -> Tensor | None:
        """(B, new_tokens, N) which images the last ``new_tokens`` tokens may see (padding in
        ``attention_mask`` is not an EOS)."""
        if media is None:
            return None
        xcfg = self.config.cross_attention
        mask = cross_attention_mask(
            history_ids,
            self.ids.image,
            media.count,
            mode=xcfg.media_attention,
            eos_token_id=self.ids.eos if xcfg.reset_at_eos else None,
            attention_mask=attention_mask,
        )
        return mask[:, -new_tokens:]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        image_keys: list[list[str]] | None = None,
        z_loss_weight: float = 0.0,
        return_logits: bool = True,
    ) -> FlamingoOutput:
        """Logits over the tokenizer's vocabulary (new tokens included) and, with ``labels``
        ((B, T), -100 where ignored; see ``masks.flamingo_labels``), the next-token loss; a model
        that draws adds the diffusion loss of every image announced by the begin-of-image token.
        With labels and ``return_logits=False`` (what training asks) there are no logits: the loss
        comes from the hidden states a chunk of labelled positions at a time
        (:func:`~interleaf.model.loss.hidden_next_token_loss`), never the whole (B, T, V) floats."""
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        gen = self.config.image_generation
        patches = labels is not None and gen is not None and gen.mmfs_features == "patches"
        latents, features = self.encode_images_and_features(
            input_ids, pixel_values, features=patches, image_keys=image_keys
        )
        out = self.step(input_ids, history_ids=input_ids, attention_mask=attention_mask, media=self.media(latents))
        hidden, lm = out.last_hidden_state, self.language_model
        if labels is not None and not return_logits:
            logits = None
            labels = labels.to(hidden.device)
            text_loss = hidden_next_token_loss(
                lm.logits, lm.head_parameters(), hidden, labels, z_loss_weight, vocab_size=lm.vocab_size
            )
        else:
            logits = lm.logits(hidden)
            if labels is None:
                return FlamingoOutput(logits=logits)
            text_loss = next_token_loss(logits, labels.to(logits.device), z_loss_weight)
        earlier = self.generation_media(latents, features)
        image_loss = self.image_loss(input_ids, attention_mask, out.last_hidden_state, earlier, pixel_values)
        if image_loss is None:
            return FlamingoOutput(logits=logits, loss=text_loss, text_loss=text_loss)
        loss = text_loss + self.config.image_generation.loss_weight * image_loss
        return FlamingoOutput(logits=logits, loss=loss, text_loss=text_loss, image_loss=image_loss)

    def image_loss(
        self, input_ids: Tensor, attention_mask: Tensor, states: Tensor, earlier: Tensor | None, pixel_values
    ) -> Tensor | None:
        """The diffusion loss of the batch's announced images; None when the model does not
        draw or the batch announces none."""
        if self.image_generator is None:
            return None
        targets = find_targets(input_ids, self.ids.image, self.ids.begin_of_image)
        if not len(targets):
            return None
        pixels = pixel_values.to(states.device)
        states = self.generation_states(input_ids, states)
        return self.image_generator.loss(states, attention_mask, earlier, targets, pixels)

    def generation_media(self, latents: Tensor | None, features: Tensor | None) -> Tensor | None:
        """What the image decoder's MMFS reads of the earlier images: the resampled latents, or
        (``image_generation.mmfs_features="patches"``) the vision encoder's patch features."""
        gen = self.config.image_generation
        return features if gen is not None and gen.mmfs_features == "patches" else latents

    def generation_states(self, input_ids: Tensor, hidden: Tensor) -> Tensor:
        """What the image decoder's Perceiver reads of each token: the LM's last hidden state,
        and (``image_generation.read_embeddings``) the token's input embedding beside it."""
        if not self.config.image_generation.read_embeddings:
            return hidden
        return torch.cat([hidden, self.language_model.embed(input_ids).to(hidden.dtype)], dim=-1)

    def step(
        self,
        input_ids: Tensor,
        *,
        history_ids: Tensor,
        attention_mask: Tensor,
        media: Media | None,
        cache=None,
        use_cache: bool = False,
    ):
        """Run the LM on ``input_ids`` (the last tokens of ``history_ids``), with the LM's
        KV cache ``cache`` holding the earlier ones. ``attention_mask`` covers the
        whole history. Returns the LM's output (``last_hidden_state``, ``cache``)."""
        new = input_ids.shape[1]
        keep = None
        if self.config.cross_attention.without_media == "skip":  # InfiMM: only samples with an image
            keep = ((history_ids == self.ids.image) & attention_mask.bool()).any(-1)
        context = MediaContext(
            kv=media.kv if media is not None else None,
            visible=self.visible_media(history_ids, attention_mask, media, new),
            keep=keep,
        )
        return self.language_model(
            input_ids,
            media=context,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask)[:, -new:],
            cache=cache,
            use_cache=use_cache,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where token inputs go: the device of the LM's input embeddings (the first block of a
        model spread over several devices)."""
        return self.language_model.lm.get_input_embeddings().weight.device

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values=None, **kwargs) -> Tensor:
        """Generated token ids (B, T_new), prompt excluded; see ``interleaf.generation.generate``.
        Inputs may be on any device (the processor's are on the CPU): they move to the model's."""
        return generate(self, input_ids, attention_mask, pixel_values, **kwargs)

    def generate_interleaved(self, processor, prompt, **kwargs) -> list[dict]:
        """Continue an interleaved document with text and drawn images, in turn; see
        :func:`interleaf.model.interleaved.generate_interleaved`."""
        return generate_interleaved(self, processor, prompt, **kwargs)

    def draw(self, processor, prompts, **kwargs) -> list:
        """One image drawn after each prompt, batched; see :func:`interleaf.model.interleaved.draw_images`."""
        return draw_images(self, processor, prompts, **kwargs)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _real_keys(image_keys: list[list[str]] | None, counts: Tensor) -> list[str] | None:
    """The keys of the real images, sample by sample (row b's first ``counts[b]``); None if none
    were given. Raises ValueError naming the sample whose row is short."""
    if image_keys is None:
        return None
    counts = counts.tolist()
    if len(image_keys) != len(counts):
        raise ValueError(f"image_keys hold {len(image_keys)} samples for {len(counts)} samples in input_ids")
    keys: list[str] = []
    for sample, (row, count) in enumerate(zip(image_keys, counts)):
        if len(row) < count or not all(isinstance(k, str) for k in row[:count]):
            raise ValueError(f"sample {sample} has {count} <image> tokens but image_keys name {len(row)}: {row!r}")
        keys += row[:count]
    return keys


def _per_sample(x: Tensor, real: Tensor) -> Tensor:
    """(n, ...) rows of the real images -> (B, N_max, ...), zeros in the padding slots."""
    out = x.new_zeros(*real.shape, *x.shape[1:])
    out[real] = x
    return out

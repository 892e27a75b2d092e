"""Image generation head (MM-Interleaved, Tian et al. 2024): the LM writes a begin-of-image
token; its hidden states up to that token become a fixed number of condition vectors, which
condition a diffusion UNet that draws the image.

- **Condition vectors**: a small Perceiver whose learned queries attend to the LM's last
  hidden states up to and including the begin-of-image token (later tokens are masked out).
- **Earlier images** (``mmfs``): the UNet's cross-attention also reads the features of the
  images that came before in the document (the resampled latents, or with
  ``mmfs_features="patches"`` the vision encoder's patch grid), each image with a learned
  position embedding, and (``mmfs_pooled``) their mean joins the pooled condition: a light
  form of MM-Interleaved's multi-scale feature synchronizer (which reads multi-scale vision
  feature maps with deformable attention). ``mmfs_attention="aligned"`` reads each image where
  the UNet's query is, and ``mmfs_pixels`` adds a finest scale to that read: the earlier
  image itself, in the decoder's own space.
- **Decoder**: a ``diffusers`` ``UNet2DConditionModel`` over pixels or over the latents of a
  frozen ``AutoencoderKL``; DDPM noise in training, DDIM or DPM-Solver++ in sampling, with
  classifier-free guidance against a learned null condition (which replaces the condition,
  earlier images included, with probability ``condition_dropout`` in training).

The module holds no LM and no vision encoder: :class:`~interleaf.model.flamingo.Flamingo`
hands it the LM's states, the resampled image features and the target pixels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from interleaf.config import ImageGenerationConfig, ResamplerConfig
from interleaf.extras import optional_import
from interleaf.model.resampler import PerceiverLayer


@dataclass(frozen=True)
class Targets:
    """The images a batch asks to draw: target ``j`` is image ``image[j]`` (0-based, in text
    order) of sample ``sample[j]``, announced by the begin-of-image token at ``position[j]``."""

    sample: Tensor
    image: Tensor
    position: Tensor

    def __len__(self) -> int:
        return self.sample.numel()


def find_targets(input_ids: Tensor, image_id: int, begin_of_image_id: int) -> Targets:
    """Every ``<image>`` token directly preceded by the begin-of-image token is a target."""
    is_image = input_ids == image_id
    announced = torch.zeros_like(is_image)
    announced[:, 1:] = is_image[:, 1:] & (input_ids[:, :-1] == begin_of_image_id)
    index = is_image.long().cumsum(-1) - 1  # which image of its sample each <image> token is
    sample, position = announced.nonzero(as_tuple=True)
    return Targets(sample, index[sample, position], position - 1)


def _diffusers():
    return optional_import("diffusers", "image generation (FlamingoConfig.image_generation)", "imagegen")


class ConditionPerceiver(nn.Module):
    """(n, T, D_lm) LM states, (n, T) which may be read, (n, T) each token's distance back from
    the begin-of-image token -> (n, Q, C) condition vectors. The distance (a learned embedding,
    the last one shared by all farther tokens) tells the caption of this image from those of
    the document's earlier images, which the states alone hardly do."""

    def __init__(self, lm_dim: int, cfg: ImageGenerationConfig):
        super().__init__()
        dim = cfg.condition_dim
        layer_cfg = ResamplerConfig(
            depth=cfg.depth, num_latents=cfg.num_conditions, heads=cfg.heads, head_dim=cfg.head_dim
        )
        # each part of the states (the last hidden state; the input embedding) normalised on its
        # own: a small LM's embeddings are some 20 times smaller than its hidden states, and
        # would hardly count in a projection of the two side by side
        parts = 2 if cfg.read_embeddings else 1
        self.input_norms = nn.ModuleList(nn.LayerNorm(lm_dim // parts) for _ in range(parts))
        self.proj = nn.Linear(lm_dim, dim)
        self.distance = nn.Embedding(cfg.max_distance, dim)
        self.queries = nn.Parameter(torch.randn(cfg.num_conditions, dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim, layer_cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)
        self.token_norm = nn.LayerNorm(dim) if cfg.token_context else nn.Identity()
        self.token_context = cfg.token_context

    def forward(self, states: Tensor, mask: Tensor, distance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> the condition vectors (n, Q, C), and (``token_context`` W) the last W tokens up to
        the begin-of-image token, (n, W, C), the latest first, with which of them exist, (n, W)."""
        parts = states.chunk(len(self.input_norms), -1)
        states = torch.cat([norm(part) for norm, part in zip(self.input_norms, parts)], -1)
        x = self.proj(states) + self.distance(distance.clamp(0, self.distance.num_embeddings - 1))
        latents = self.queries.expand(states.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents, mask)
        back = torch.arange(self.token_context, device=states.device)
        index = (distance == 0).long().argmax(1)[:, None] - back  # (n, W): the token's position, back
        exists = index >= 0
        index = index.clamp(min=0)
        tokens = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        return self.norm(latents), self.token_norm(tokens), exists & mask.gather(1, index)


class ImageGenerator(nn.Module):
    """Condition Perceiver, optional earlier-image context, null condition and UNet."""

    def __init__(self, lm_dim: int, media_dim: int, cfg: ImageGenerationConfig, media_tokens: int | None = None):
        """``media_tokens``: the vision encoder's tokens per image (``mmfs_attention="aligned"``
        needs them: its patch grid)."""
        super().__init__()
        diffusers = _diffusers()
        self.cfg = cfg
        self.conditions = ConditionPerceiver(lm_dim, cfg)
        self.null_condition = nn.Parameter(torch.randn(cfg.num_conditions, cfg.condition_dim) * 0.02)
        if cfg.mmfs:
            self.media_proj = nn.Linear(media_dim, cfg.condition_dim)
            self.media_position = nn.Parameter(torch.randn(cfg.max_images, cfg.condition_dim) * 0.02)
            if cfg.mmfs_pooled:  # zero at the start: the pooled condition is the text's until it learns
                self.media_pool = nn.Linear(cfg.condition_dim, cfg.condition_dim)
                nn.init.zeros_(self.media_pool.weight)
                nn.init.zeros_(self.media_pool.bias)
                if cfg.mmfs_gate == "text":  # the text's pooled condition gates it, per channel
                    self.media_pool_gate = nn.Linear(cfg.condition_dim, cfg.condition_dim)
                    nn.init.zeros_(self.media_pool_gate.weight)
                    nn.init.zeros_(self.media_pool_gate.bias)
        channels, self.downsample = 3, 1
        if cfg.space == "latent":  # the VAE's latent channels and scale (SD's: 4, 1/8), from its config
            vae_config = _vae_config(cfg.vae)
            channels = vae_config["latent_channels"]
            self.downsample = 2 ** (len(vae_config["block_out_channels"]) - 1)
            if cfg.image_size % self.downsample:
                raise ValueError(
                    f"image_generation.image_size {cfg.image_size} is not a multiple of the VAE's {self.downsample}"
                )
        if cfg.mmfs and cfg.mmfs_pixels:  # the finest scale: the image folded space-to-depth
            if self.sample_size % cfg.mmfs_pixels:
                raise ValueError(
                    f"image_generation.mmfs_pixels {cfg.mmfs_pixels} does not divide "
                    f"the decoder's side {self.sample_size}"
                )
            self.fold = self.sample_size // cfg.mmfs_pixels
            self.pixel_proj = nn.Linear(channels * self.fold**2, cfg.condition_dim)
        u = cfg.unet
        self.unet = diffusers.UNet2DConditionModel(
            sample_size=self.sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=u.block_out_channels,
            down_block_types=u.down_block_types,
            up_block_types=u.up_block_types,
            layers_per_block=u.layers_per_block,
            attention_head_dim=u.attention_head_dim,
            norm_num_groups=u.norm_num_groups,
            cross_attention_dim=cfg.condition_dim,
            class_embed_type="projection" if u.pooled_condition else None,
            projection_class_embeddings_input_dim=cfg.condition_dim if u.pooled_condition else None,
        )
        if cfg.mmfs and cfg.mmfs_attention != "shared":
            text = cfg.num_conditions + cfg.token_context
            if cfg.mmfs_attention == "aligned":
                if media_tokens is None:
                    raise ValueError("mmfs_attention='aligned': the vision tower does not say its tokens per image")
                _grid_side(media_tokens)  # a clear error now, not at the first step

            def processor(name: str):
                gated = cfg.mmfs_gate == "text"
                if cfg.mmfs_attention == "aligned":
                    return AlignedMedia(text, self._attention(name), media_tokens, cfg.mmfs_pixels**2, text_gate=gated)
                return DecoupledMedia(text, self._attention(name), text_gate=gated)

            self.unet.set_attn_processor(
                {
                    name: processor(name) if name.endswith("attn2.processor") else proc
                    for name, proc in self.unet.attn_processors.items()
                }
            )
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), persistent=False)

    def _attention(self, processor_name: str):
        return self.unet.get_submodule(processor_name.removesuffix(".processor"))

    @property
    def sample_size(self) -> int:
        """The UNet's side: the image's, or its latent's (an SD VAE downsamples by 8)."""
        return self.cfg.image_size // self.downsample

    # -- conditioning ------------------------------------------------------------------------

    def context(
        self,
        states: Tensor,
        attention_mask: Tensor,
        media: Tensor | None,
        targets: Targets,
        pixel_values: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The UNet's cross-attention input of each target, (n, S, C), and which of it may be
        read, (n, S): the condition vectors, then (with ``mmfs``) the earlier images' features
        (each image's, then with ``mmfs_pixels`` its own grid, read from ``pixel_values``, the
        batch's processed images, (B, N, 3, H, W))."""
        length = states.shape[1]
        distance = targets.position[:, None] - torch.arange(length, device=states.device)  # (n, T)
        readable = (distance >= 0) & attention_mask[targets.sample].bool()
        cond, tokens, exists = self.conditions(states[targets.sample], readable, distance)
        keep = torch.cat([cond.new_ones(cond.shape[:2], dtype=torch.bool), exists], 1)
        cond = torch.cat([cond, tokens], 1)  # (n, Q + W, C)
        if not self.cfg.mmfs or media is None:
            return cond, keep
        earlier = media[targets.sample]  # (n, N, L, D): the sample's images
        count = earlier.shape[1]
        if count > self.cfg.max_images:
            raise ValueError(
                f"image_generation.max_images is {self.cfg.max_images}; a sample holds {count} images before a target"
            )
        earlier = self.media_proj(earlier)
        if self.cfg.mmfs_pixels:
            if pixel_values is None:
                raise ValueError("image_generation.mmfs_pixels: the earlier images' pixels were not given")
            pixels = pixel_values.to(states.device)[targets.sample][:, :count]
            earlier = torch.cat([earlier, self.pixel_grid(pixels).to(earlier.dtype)], 2)
        earlier = earlier + self.media_position[:count, None]
        seen = torch.arange(count, device=states.device)[None] < targets.image[:, None]  # (n, N)
        seen = seen[:, :, None].expand(-1, -1, earlier.shape[2])
        return torch.cat([cond, rearrange(earlier, "n i l c -> n (i l) c")], 1), torch.cat([keep, seen.flatten(1)], 1)

    def pixel_grid(self, pixel_values: Tensor) -> Tensor:
        """(n, N, 3, H, W) processed images -> (n, N, g * g, C): each in the decoder's space (its
        VAE latents' mean in latent space), folded space-to-depth into ``mmfs_pixels`` squared
        cells and projected."""
        n, count = pixel_values.shape[:2]
        z = self.encode(self.to_unit(pixel_values.flatten(0, 1)), sample=False)
        z = rearrange(z, "b c (y f) (x g) -> b (y x) (c f g)", f=self.fold, g=self.fold)
        return self.pixel_proj(z.to(self.pixel_proj.weight.dtype)).view(n, count, -1, self.cfg.condition_dim)

    def null_context(self, context: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """The unconditional input: the null condition, no token, no earlier image."""
        q = self.cfg.num_conditions
        null = self.null_condition.to(context.dtype).expand(context.shape[0], -1, -1)
        return torch.cat([null, context[:, q:]], 1), torch.cat([keep[:, :q], torch.zeros_like(keep[:, q:])], 1)

    # -- pixels and latents ----------------------------------------------------------------

    def to_unit(self, pixel_values: Tensor) -> Tensor:
        """The vision processor's normalised pixels -> [-1, 1] at ``image_size``."""
        x = (pixel_values.float() * self.pixel_std + self.pixel_mean).clamp(0, 1) * 2 - 1
        size = self.cfg.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def encode(self, x: Tensor, *, sample: bool = True) -> Tensor:
        """[-1, 1] pixels -> what the UNet denoises (in latent space: a draw from the VAE's
        posterior, or with ``sample=False`` its mean)."""
        if self.cfg.space == "pixel":
            return x
        vae = self.vae(x.device)
        with torch.no_grad():
            posterior = vae.encode(x.to(vae.dtype)).latent_dist
            return (posterior.sample() if sample else posterior.mode()) * vae.config.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """What the UNet denoised -> [-1, 1] pixels."""
        if self.cfg.space == "pixel":
            return z.clamp(-1, 1)
        vae = self.vae(z.device)
        with torch.no_grad():
            return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)

    def vae(self, device: torch.device):
        """The frozen ``AutoencoderKL`` of ``cfg.vae`` (loaded once; not part of the checkpoint)."""
        return _load_vae(self.cfg.vae).to(device)

    # -- training --------------------------------------------------------------------------

    def scheduler(self):
        diffusers = _diffusers()
        return diffusers.DDPMScheduler(
            num_train_timesteps=self.cfg.train_timesteps,
            beta_schedule=self.cfg.beta_schedule,
            prediction_type=self.cfg.prediction_type,
            clip_sample=False,
        )

    def loss(
        self, states: Tensor, attention_mask: Tensor, media: Tensor | None, targets: Targets, pixel_values: Tensor
    ) -> Tensor:
        """The denoising loss (mean squared error of the predicted noise, or velocity) of the
        targets, at uniformly drawn timesteps (``noise_draws`` per target); the null condition
        replaces a draw's condition with probability ``condition_dropout``, and its earlier
        images alone are hidden with probability ``image_dropout``."""
        x0 = self.encode(self.to_unit(pixel_values[targets.sample, targets.image]))
        context, keep = self.context(states, attention_mask, media, targets, pixel_values)
        draws = self.cfg.noise_draws  # each target k times, with its own timestep and noise
        x0, context, keep = (x.repeat_interleave(draws, 0) for x in (x0, context, keep))
        drop = torch.rand(len(x0), device=x0.device) < self.cfg.condition_dropout
        null, null_keep = self.null_context(context, keep)
        context = torch.where(drop[:, None, None], null, context)
        keep = torch.where(drop[:, None], null_keep, keep)
        if self.cfg.image_dropout:  # the text kept, the earlier images not read
            blind = torch.rand(len(x0), device=x0.device) < self.cfg.image_dropout
            text = self.cfg.num_conditions + self.cfg.token_context
            keep = torch.cat([keep[:, :text], keep[:, text:] & ~blind[:, None]], 1)
        schedule = self.scheduler()
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.cfg.train_timesteps, (len(x0),), device=x0.device)
        noisy = schedule.add_noise(x0, noise, t)
        target = noise if self.cfg.prediction_type == "epsilon" else schedule.get_velocity(x0, noise, t)
        pred = self.denoise(noisy, t, context, keep)
        error = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (n,)
        return (error * self.timestep_weights(schedule, t)).mean()

    def timestep_weights(self, schedule, t: Tensor) -> Tensor:
        """Min-SNR-gamma weights: ``min(SNR, gamma) / SNR`` for noise prediction, ``/ (SNR + 1)``
        for velocity, so that the easy low-noise steps do not dominate; ones when gamma is 0."""
        if not self.cfg.snr_gamma:
            return torch.ones(t.shape, device=t.device)
        alpha_bar = schedule.alphas_cumprod.to(t.device)[t]
        snr = alpha_bar / (1 - alpha_bar)
        clipped = snr.clamp(max=self.cfg.snr_gamma)
        return clipped / (snr + 1) if self.cfg.prediction_type == "v_prediction" else clipped / snr

    def denoise(self, sample: Tensor, t: Tensor, context: Tensor, keep: Tensor) -> Tensor:
        """The UNet's prediction (noise or velocity) for ``sample`` at timestep(s) ``t``."""
        dtype = next(self.unet.parameters()).dtype
        pooled = None
        if self.cfg.unet.pooled_condition:
            pooled = self.pooled(context, keep).to(dtype)
        return self.unet(
            sample.to(dtype),
            t,
            encoder_hidden_states=context.to(dtype),
            encoder_attention_mask=keep,
            class_labels=pooled,
        ).sample

    def pooled(self, context: Tensor, keep: Tensor) -> Tensor:
        """The global condition: the mean of the condition vectors, plus that of the tokens
        read (``token_context``; none for the null condition), plus (``mmfs_pooled``) a
        projection of the mean of the earlier images' features read (none without one), with
        ``mmfs_gate="text"`` through a gate per channel read from the text's part."""
        q, width = self.cfg.num_conditions, self.cfg.token_context
        pooled = context[:, :q].mean(1)

        def mean(part: slice) -> Tensor:
            x, read = context[:, part], keep[:, part, None].to(context.dtype)
            return (x * read).sum(1) / read.sum(1).clamp(min=1)

        if width:
            pooled = pooled + mean(slice(q, q + width))
        if self.cfg.mmfs and self.cfg.mmfs_pooled and context.shape[1] > q + width:
            media = self.media_pool(mean(slice(q + width, None)))
            if self.cfg.mmfs_gate == "text":
                media = media * torch.sigmoid(self.media_pool_gate(pooled))
            pooled = pooled + media
        return pooled

    # -- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        context: Tensor,
        keep: Tensor,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
    ) -> Tensor:
        """Draw one image per row of ``context``: (n, 3, H, W) pixels in [-1, 1]. The starting
        noise comes from ``generator`` (CPU), or from one generator per row: a row's image then
        does not depend on the rows beside it. ``guidance_scale`` and ``image_guidance_scale``
        default to the config's (see :class:`ImageGenerationConfig`)."""
        cfg = self.cfg
        guidance = cfg.guidance_scale if guidance_scale is None else guidance_scale
        image_guidance = cfg.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
        text = cfg.num_conditions + cfg.token_context
        # the images guided apart: a third pass, of the text alone (the images masked out)
        apart = image_guidance is not None and image_guidance != guidance and bool(keep[:, text:].any())
        sampler = self.sampler()
        sampler.set_timesteps(steps or cfg.inference_steps, device=context.device)
        n = context.shape[0]
        shape = (self.unet.config.in_channels, self.sample_size, self.sample_size)
        if isinstance(generator, Sequence):
            if len(generator) != n:
                raise ValueError(f"sample: {len(generator)} generators for {n} rows")
            z = torch.stack([torch.randn(shape, generator=g, device="cpu") for g in generator])
        else:
            z = torch.randn((n, *shape), generator=generator, device="cpu")
        z = z.to(context.device)
        z = z * sampler.init_noise_sigma
        # the conditional rows, then the text-only ones, then the unconditional: one UNet call
        parts = [(context, keep)]
        if apart:
            parts.append((context, torch.cat([keep[:, :text], torch.zeros_like(keep[:, text:])], 1)))
        if guidance != 1:
            parts.append(self.null_context(context, keep))
        context, keep = torch.cat([c for c, _ in parts]), torch.cat([k for _, k in parts])
        for t in sampler.timesteps:
            x = sampler.scale_model_input(torch.cat([z] * len(parts)), t)
            outs = self.denoise(x, t, context, keep).float().chunk(len(parts))
            full = outs[0]
            words = outs[1] if apart else full
            out = words if guidance == 1 else outs[-1] + guidance * (words - outs[-1])
            if apart:
                out = out + image_guidance * (full - words)
            z = sampler.step(out, t, z).prev_sample
        return self.decode(z.float())

    def sampler(self):
        """The inference scheduler, its first step at the last training timestep. In pixel space
        each step's clean-image estimate is kept in [-1, 1] (DDIM's clipping, DPM-Solver++'s
        dynamic thresholding): without it, the estimate at the noisiest steps (divided by a tiny
        sqrt(alpha_bar)) throws the sample off."""
        diffusers = _diffusers()
        pixel = self.cfg.space == "pixel"
        # "trailing": the first step starts at the last training timestep, pure noise (Lin et al.
        # 2024); "leading" would start short of it and miss the image's overall brightness
        config = dict(self.scheduler().config, timestep_spacing="trailing")
        if self.cfg.sampler == "ddim":
            return diffusers.DDIMScheduler.from_config(config, clip_sample=pixel)
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", thresholding=pixel, sample_max_value=1.0
        )


class DecoupledMedia(nn.Module):
    """A UNet cross-attention (a ``diffusers`` attention processor) that reads its context in
    two parts: the first ``text`` vectors (the condition, with the attention's own keys and
    values) and the rest, the earlier images, with keys and values of their own, added through
    ``tanh(gate)``, 0 at the start; with ``text_gate`` the gate is per channel and reads the
    text part too: ``tanh(gate + W mean(text))``, ``W`` zero at the start. A row with no earlier
    image gets the text part alone."""

    def __init__(self, text: int, attention, *, text_gate: bool = False):
        super().__init__()
        inner, cross = attention.to_q.out_features, attention.to_k.in_features
        self.text = text
        self.to_k = nn.Linear(cross, inner, bias=False)
        self.to_v = nn.Linear(cross, inner, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))
        self.text_gate = None
        if text_gate:
            self.text_gate = nn.Linear(cross, inner)
            nn.init.zeros_(self.text_gate.weight)
            nn.init.zeros_(self.text_gate.bias)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        n, text = hidden_states.shape[0], self.text
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        bias = None if attention_mask is None else attention_mask.reshape(n, 1, 1, -1)  # 0 or -10000: (n, 1, 1, S)

        def heads(x: Tensor) -> Tensor:
            return x.view(n, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        words = context[:, :text]
        out = F.scaled_dot_product_attention(
            q, heads(attn.to_k(words)), heads(attn.to_v(words)), attn_mask=None if bias is None else bias[..., :text]
        )
        media = context[:, text:]
        if media.shape[1]:
            media_bias = torch.zeros(n, 1, 1, media.shape[1], device=q.device) if bias is None else bias[..., text:]
            read, seen = self.read(q, media, media_bias, heads)
            gate = self.gates(words, None if bias is None else bias[..., :text], heads)
            out = out + gate * read * seen.to(read.dtype)
        out = out.transpose(1, 2).reshape(n, -1, q.shape[1] * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    def gates(self, words: Tensor, bias: Tensor | None, heads) -> Tensor:
        """The gate of the images' read: a scalar, or (with ``text_gate``) (n, h, 1, d), from the
        mean of the text vectors ``words`` (n, S, C) that ``bias`` (n, 1, 1, S) lets be read."""
        if self.text_gate is None:
            return torch.tanh(self.gate)
        if bias is None:
            pooled = words.mean(1)
        else:
            readable = (bias.reshape(bias.shape[0], -1, 1) > -1).to(words.dtype)
            pooled = (words * readable).sum(1) / readable.sum(1).clamp(min=1)
        return heads(torch.tanh(self.gate + self.text_gate(pooled))[:, None])

    def read(self, q: Tensor, media: Tensor, bias: Tensor, heads) -> tuple[Tensor, Tensor]:
        """What the queries (n, h, L, d) read of the earlier images' vectors (n, M, C), masked by
        ``bias`` (n, 1, 1, M), and which rows have any image to read, (n, 1, 1, 1)."""
        read = F.scaled_dot_product_attention(q, heads(self.to_k(media)), heads(self.to_v(media)), attn_mask=bias)
        return read, (bias > -1).any(-1, keepdim=True)


class AlignedMedia(DecoupledMedia):
    """:class:`DecoupledMedia` whose image part is spatially aligned, as MM-Interleaved's MMFS
    samples the image feature maps around each query's own position (deformable attention with
    the query's position as reference point): each earlier image's patch grid (``tokens`` per
    image, a CLS token first when there is one beyond a square grid) is projected to values and
    resized to the UNet's feature map, so that the query at (y, x) reads the image at (y, x);
    with ``fine`` cells of the image's own grid after its patches (``mmfs_pixels``), the finer
    scale is read at (y, x) too and added. The query weighs the images, and a learned null
    image whose value is zero (a softmax; keys from each image's mean patch), so that it can
    read an image here and nothing there."""

    def __init__(self, text: int, attention, tokens: int, fine: int = 0, *, text_gate: bool = False):
        super().__init__(text, attention, text_gate=text_gate)
        self.tokens, self.fine = tokens, fine
        self.grid = _grid_side(tokens)
        self.fine_grid = math.isqrt(fine)
        self.skip = tokens - self.grid**2
        self.null_key = nn.Parameter(torch.zeros(attention.to_q.out_features))

    def read(self, q: Tensor, media: Tensor, bias: Tensor, heads) -> tuple[Tensor, Tensor]:
        n, h, length, d = q.shape
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"mmfs_attention='aligned' needs a square UNet feature map, got {length} positions")
        images = media.view(n, -1, self.tokens + self.fine, media.shape[-1])
        patches = images[:, :, self.skip : self.tokens]  # (n, N, g*g, C)
        count = images.shape[1]
        seen = bias.view(n, count, self.tokens + self.fine)[..., 0] > -1  # (n, N)
        keys = heads(torch.cat([self.null_key.expand(n, 1, -1), self.to_k(patches.mean(2))], 1))  # (n, h, 1 + N, d)
        values = self.aligned(patches, self.grid, side, h)
        if self.fine:
            values = values + self.aligned(images[:, :, self.tokens :], self.fine_grid, side, h)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(d)  # (n, h, L, 1 + N): the null image first
        readable = torch.cat([seen.new_ones(n, 1), seen], 1)
        weights = scores.masked_fill(~readable[:, None, None], -1e4).softmax(-1)[..., 1:]
        read = torch.einsum("nhli,nhild->nhld", weights, values)
        return read, seen.any(-1).view(n, 1, 1, 1)

    def aligned(self, cells: Tensor, grid: int, side: int, h: int) -> Tensor:
        """(n, N, grid * grid, C) cells -> (n, h, N, side * side, d) values, resized to the
        UNet's map (a coarser map averages the cells it covers)."""
        count = cells.shape[1]
        values = rearrange(self.to_v(cells), "n i (y x) c -> (n i) c y x", y=grid)
        if grid > side and grid % side == 0:
            values = F.avg_pool2d(values, grid // side)
        elif grid != side:
            values = F.interpolate(values, size=(side, side), mode="bilinear", align_corners=False)
        return rearrange(values, "(n i) (h d) y x -> n h i (y x) d", i=count, h=h)


def _grid_side(tokens: int) -> int:
    """The side of a square patch grid of ``tokens`` tokens, or of ``tokens - 1`` (a CLS first)."""
    for side in (math.isqrt(tokens), math.isqrt(tokens - 1)):
        if side and side * side in (tokens, tokens - 1):
            return side
    raise ValueError(f"mmfs_attention='aligned': {tokens} vision tokens per image are not a square patch grid")


@functools.cache
def _vae_config(source: str) -> dict:
    diffusers = _diffusers()
    try:
        return dict(diffusers.AutoencoderKL.load_config(source, subfolder=_vae_subfolder(source)))
    except (OSError, ValueError) as e:
        raise ValueError(f"image_generation.vae: cannot load an AutoencoderKL from {source!r}: {e}") from None


@functools.cache
def _load_vae(source: str):
    diffusers = _diffusers()
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(source, subfolder=_vae_subfolder(source))
    except (OSError, ValueError) as e:
        raise ValueError(f"image_generation.vae: cannot load an AutoencoderKL from {source!r}: {e}") from None
    return vae.eval().requires_grad_(False)


def _vae_subfolder(source: str) -> str | None:
    """A whole Stable Diffusion repository keeps its VAE in ``vae/``."""
    return "vae" if (Path(source) / "vae" / "config.json").is_file() else None


def to_images(pixels: Tensor) -> list[Image.Image]:
    """(n, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]

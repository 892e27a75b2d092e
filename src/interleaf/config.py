"""Frozen, keyword-only configuration dataclasses, nested like the module tree.

A :class:`FlamingoConfig` is saved as ``config.json`` beside the weights. Every field has a
default, so a JSON file needs to name only what differs; unknown keys are errors that name
the key and its path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

Activation = Literal["gelu", "relu", "silu", "gelu_tanh"]
Norm = Literal["layernorm", "rmsnorm"]


def _scalar_error(value: Any, tp: Any) -> str | None:
    """Why ``value`` is not a ``tp`` (int, float, str, bool or a tuple of one), or None: a
    config built in Python is checked as strictly as one read from JSON (a bool is no int, an
    int is a float, a float must be finite)."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return f"expected a tuple, got {value!r}"
        for i, item in enumerate(value):
            if (why := _scalar_error(item, args[0])) is not None:
                return f"[{i}]: {why}"
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        return None if math.isfinite(value) else f"expected a finite number, got {value!r}"
    if tp in (int, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        return f"expected {tp.__name__}, got {value!r}"
    if dataclasses.is_dataclass(tp) and not isinstance(value, tp):  # a dict is read from JSON, not taken as it is
        return f"expected a {tp.__name__}, got {type(value).__name__} {value!r}"
    return None


def _validate(cfg: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Check a config's field types, Literal fields and numeric ranges on construction, naming
    the field."""
    hints = typing.get_type_hints(type(cfg))
    name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(options) == 1:
            if value is None:
                continue
            tp = options[0]
        literals = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
        if literals and value not in literals:
            raise ValueError(f"{name}.{f.name}: expected one of {list(literals)}, got {value!r}")
        if (why := _scalar_error(value, tp)) is not None:
            raise ValueError(f"{name}.{f.name}: {why}")
    for field_name in positive:
        if getattr(cfg, field_name) < 1:
            raise ValueError(f"{name}.{field_name} must be >= 1, got {getattr(cfg, field_name)}")
    for field_name in non_negative:
        if getattr(cfg, field_name) < 0:
            raise ValueError(f"{name}.{field_name} must be >= 0, got {getattr(cfg, field_name)}")


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Which vision encoder, and which of its activations become the image features.

    ``source`` is a hub id or a local directory holding an HF vision model (CLIP, SigLIP,
    IDEFICS vision tower, or a full CLIP/SigLIP model whose vision half is used).
    """

    source: str = ""
    layer: int = -1  # hidden-state index; -1 is the encoder's last layer
    post_layernorm: bool = False  # apply the tower's final LayerNorm to the patch features
    drop_cls: bool = False  # drop the class token (OpenFlamingo keeps only patch tokens)


@dataclass(frozen=True, kw_only=True)
class ResamplerConfig:
    """Perceiver resampler: learned latents cross-attend to [patch features; latents]."""

    enabled: bool = True  # IDEFICS' use_resampler=False feeds patch features directly
    depth: int = 6
    num_latents: int = 64
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    ff_dim: int = 0  # >0 overrides ff_mult * dim
    activation: Activation = "gelu"
    qk_norm: bool = False  # LayerNorm on per-head q and k (IDEFICS qk_layer_norms_perceiver)
    max_media: int = 0  # >0 adds a learned embedding per media position (OpenFlamingo)
    max_frames: int = 0  # >0 adds a learned embedding per video frame

    def __post_init__(self):
        _validate(self, ("depth", "num_latents", "heads", "head_dim", "ff_mult"), ("ff_dim", "max_media", "max_frames"))


@dataclass(frozen=True, kw_only=True)
class CrossAttentionConfig:
    """Gated cross-attention blocks inserted before decoder layers ``i`` with
    ``i % interval == offset`` (OpenFlamingo: offset = interval - 1; IDEFICS: offset 0)."""

    interval: int = 1
    offset: int = 0
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    ff_dim: int = 0  # >0 overrides ff_mult * dim (IDEFICS: the LM's intermediate size)
    activation: Activation = "gelu"
    gated_ff: bool = False  # SwiGLU-style feed-forward (IDEFICS) instead of a plain MLP
    norm: Norm = "layernorm"
    qk_norm: Norm | None = None  # norm over the head dim of q and k (IDEFICS qk_layer_norms)
    norm_eps: float = 1e-5  # of the block's norms and q/k norms (IDEFICS: the LM's rms_norm_eps)
    gate: Literal["scalar", "vector"] = "scalar"
    media_attention: Literal["last", "all"] = "last"  # which earlier images a token sees
    reset_at_eos: bool = False  # packed documents: EOS ends the reach of earlier images
    # a sample with no image at all: "ff" (OpenFlamingo, IDEFICS): its tokens still go through
    # the gated feed-forward; "skip" (InfiMM): the whole block leaves it unchanged
    without_media: Literal["ff", "skip"] = "ff"

    def __post_init__(self):
        _validate(self, ("interval", "heads", "head_dim", "ff_mult"), ("offset", "ff_dim"))
        if self.offset >= self.interval:
            raise ValueError(f"CrossAttentionConfig.offset must be < interval={self.interval}, got {self.offset}")
        if self.norm_eps <= 0:
            raise ValueError(f"CrossAttentionConfig.norm_eps must be > 0, got {self.norm_eps}")


@dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Which causal LM, where its decoder layers are, how new tokens get embeddings."""

    source: str = ""
    layers_path: str | None = None  # dotted path to the decoder-layer ModuleList; found if None
    new_token_embeddings: Literal["decoupled", "resize"] = "decoupled"
    added_tokens: tuple[str, ...] = ()  # recorded at first build: tokens the LM has no row for

    def __post_init__(self):
        _validate(self)


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters (LoRA, through ``peft``) on linear layers of the frozen LM: each
    targeted ``W`` becomes ``W + (alpha / rank) * B A`` with ``A`` (rank x in) and ``B``
    (out x rank, zero-initialised, so a fresh adapter changes nothing); only ``A`` and ``B`` train.

    ``target_modules`` are globs over the LM's module names as the Flamingo holds them (decoder
    layers that carry cross-attention are named like ``model.layers.0.decoder_layer.self_attn.q_proj``);
    empty: every linear layer of every decoder layer's self-attention (q/k/v/o, or fused qkv).
    The cross-attention blocks are never targeted (they train whole).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()

    def __post_init__(self):
        _validate(self, ("rank",))
        if self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True, kw_only=True)
class TrainableConfig:
    """The one trainability policy, applied at construction (see ``model.trainable``)."""

    resampler: bool = True
    cross_attention: bool = True
    new_token_embeddings: bool = True
    vision: bool = False
    lm: bool = False  # unfreeze the whole LM
    lm_patterns: tuple[str, ...] = ()  # or only LM parameters whose name matches a glob
    lora: LoraConfig | None = None  # or low-rank adapters on the frozen LM (InfiMM instruction tuning)
    image_generation: bool = True  # the image decoder (condition Perceiver, UNet), when the model has one

    def __post_init__(self):
        if self.lora is not None and self.lm:
            raise ValueError("TrainableConfig: lora trains adapters on a frozen LM; it does not combine with lm=true")


@dataclass(frozen=True, kw_only=True)
class TokensConfig:
    """Special tokens and how an image is written into the text."""

    image: str = "<image>"
    end_of_chunk: str | None = "<|endofchunk|>"  # None: the format has none (IDEFICS)
    pad: str = "<PAD>"  # added only when the tokenizer has no pad token
    image_prompt: str = "<image>"  # IDEFICS: <fake_token_around_image><image><fake_token_around_image>
    extra: tuple[str, ...] = ()  # further special tokens the prompt format uses
    strip_text: bool = False  # strip spaces around the text items of an interleaved list (IDEFICS)
    text_separator: str = ""  # written between two consecutive text items (IDEFICS-instruct: <end_of_utterance>)
    # MM-Interleaved: the token after which the model draws an image (added, last, when set)
    begin_of_image: str | None = None


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """A ``diffusers`` ``UNet2DConditionModel``; its cross-attention reads the condition vectors
    (and, with MMFS, the earlier images). A block type ``CrossAttn...`` has cross-attention."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    # cross-attention at the two coarser levels (16x16 and 8x8 for a 32x32 image): after 800
    # steps the demo's decoder drew the colour asked for 1 held-out prompt of 30 with it at 8x8
    # alone, 18 of 30 with both
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    # the mean of the condition vectors also joins the timestep embedding (a global path, as
    # SDXL adds its pooled text embedding), besides the cross-attention to all of them
    pooled_condition: bool = True

    def __post_init__(self):
        _validate(self, ("layers_per_block", "attention_head_dim", "norm_num_groups"))
        lengths = {len(self.block_out_channels), len(self.down_block_types), len(self.up_block_types)}
        if len(lengths) != 1:
            raise ValueError(
                "UNetConfig: block_out_channels, down_block_types and up_block_types need one entry per level"
            )
        for key, known in (
            ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D")),
            ("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D")),
        ):
            for i, block in enumerate(getattr(self, key)):
                if block not in known:
                    raise ValueError(f"UNetConfig.{key}[{i}]: expected one of {list(known)}, got {block!r}")
        for i, channels in enumerate(self.block_out_channels):
            if channels < 1 or channels % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig.block_out_channels[{i}] = {channels}: each level's channels must be a positive "
                    f"multiple of norm_num_groups ({self.norm_num_groups}), which its group norms split them into"
                )


@dataclass(frozen=True, kw_only=True)
class ImageGenerationConfig:
    """MM-Interleaved's image decoder: at ``tokens.begin_of_image`` the LM's hidden states up to
    that token become ``num_conditions`` condition vectors (a Perceiver with learned queries),
    which condition a diffusion UNet that draws the next image; ``mmfs`` adds cross-attention
    from the UNet to the features of the document's earlier images (``mmfs_features``: the
    resampled latents or the vision encoder's patches; a light form of MM-Interleaved's
    multi-scale feature synchronizer).

    ``space="pixel"`` denoises RGB pixels at ``image_size``; ``"latent"`` denoises the latents of
    a ``diffusers`` ``AutoencoderKL`` loaded from ``vae`` (a hub id or directory, e.g. Stable
    Diffusion's VAE), ``image_size`` being the pixel size. Training draws DDPM timesteps out of
    ``train_timesteps``; ``sampler`` (``ddim`` or ``dpmsolver++``) draws in ``inference_steps``
    steps with classifier-free ``guidance_scale`` (the learned null condition replaces the
    condition with probability ``condition_dropout`` in training). The diffusion loss enters
    the training loss with weight ``loss_weight`` (MM-Interleaved: 10).
    """

    num_conditions: int = 16
    condition_dim: int = 64
    depth: int = 2
    heads: int = 4
    head_dim: int = 16
    mmfs: bool = True
    # how the UNet reads the earlier images: "shared", in the cross-attention of the text
    # condition (64 image latents beside 24 text vectors dilute the text: measured, the demo's
    # model drew the caption's shape for 37-48% of held-out prompts with it, 90-98% without
    # MMFS); "decoupled", in an attention of their own added through a gate that starts at 0 (as
    # Flamingo adds its cross-attention to a frozen LM, and IP-Adapter images to a text UNet)
    # "aligned": decoupled, and spatially aligned as MMFS is (it samples the image feature maps
    # around each query's own position): the UNet's query at (y, x) reads each earlier image's
    # patch grid at (y, x), resized to the UNet's map; needs mmfs_features="patches"
    mmfs_attention: Literal["shared", "decoupled", "aligned"] = "shared"
    # what MMFS reads of an earlier image: "resampled", the Perceiver resampler's latents (what
    # the LM reads); "patches", the vision encoder's patch features before the resampler, the
    # image's spatial grid (MM-Interleaved's MMFS reads the vision encoder's feature maps)
    mmfs_features: Literal["resampled", "patches"] = "resampled"
    # the mean of the earlier images' features read also joins the pooled condition (the UNet's
    # class embedding, which scales and shifts every residual block): a global path for what is
    # global in a picture (its background, its colours, the size of its things)
    mmfs_pooled: bool = False
    # the finest scale of MMFS's multi-scale read (with mmfs_attention="aligned"): each earlier
    # image itself in the decoder's space (its pixels, or its VAE latents), folded space-to-depth
    # into a grid of this side and read where the query is, beside the patch grid: a vision
    # tower's 8-pixel patches keep where small things are but hardly their outline, which "the
    # same shape in blue" must copy (MM-Interleaved's MMFS reads feature maps down to 1/8 of the
    # image). 0: the patch grid alone
    mmfs_pixels: int = 0
    # the gate through which the decoupled/aligned read of the earlier images joins: "scalar",
    # one learned tanh gate per attention (Flamingo's); "text", that gate plus a term per channel
    # read from the text condition (the mean of its vectors, zero at the start), so that what
    # the text asks ("the same shape in blue." or "here we have two red circles.") decides how
    # much of an earlier picture, and which of its features, the drawing takes. With "scalar" the
    # read is weighed by the UNet's own noisy features alone, which do not know what the text asks
    mmfs_gate: Literal["scalar", "text"] = "scalar"
    # the Perceiver reads each token's input embedding beside the LM's last hidden state: the
    # token itself ("green"), which a small LM's last layer (tuned to predict the next token)
    # hardly keeps; False: the last hidden state alone, as MM-Interleaved reads its 7B LM
    read_embeddings: bool = True
    max_distance: int = 64  # tokens back from the begin-of-image token the Perceiver tells apart
    # the UNet's cross-attention also reads the last ``token_context`` tokens before the
    # begin-of-image token themselves (projected, with their distance), and their mean joins
    # the pooled condition, as Stable Diffusion reads its text encoder's tokens. The Perceiver
    # alone learns to attend to the one word that pays first (the colour) and then starves the
    # others of gradient; 0: the Perceiver's vectors only
    token_context: int = 16
    max_images: int = 8  # earlier images MMFS tells apart (a learned embedding each)
    space: Literal["pixel", "latent"] = "pixel"
    image_size: int = 32
    vae: str = ""
    unet: UNetConfig = field(default_factory=UNetConfig)
    train_timesteps: int = 1000
    beta_schedule: Literal["squaredcos_cap_v2", "scaled_linear", "linear"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    sampler: Literal["ddim", "dpmsolver++"] = "dpmsolver++"
    inference_steps: int = 25
    guidance_scale: float = 3.0
    # classifier-free guidance of the earlier images apart from the text's (InstructPix2Pix's two
    # scales, Brooks et al. 2023, with the text first): uncond + guidance_scale * (text - uncond)
    # + image_guidance_scale * (text and images - text), the text-only prediction being the one
    # a document's first picture is trained on. Below guidance_scale the text wins where the two
    # disagree ("the same shape in blue." after a red picture); None: guidance_scale (the plain
    # guidance, two UNet passes a step; otherwise three, where a row has an earlier image)
    image_guidance_scale: float | None = None
    condition_dropout: float = 0.1
    # the probability that a training draw (one not dropped whole) reads no earlier image, its
    # text kept: what "the same shape in blue." alone draws is then learned, the prediction
    # that image_guidance_scale guides from (InstructPix2Pix drops its image 5% of the time)
    image_dropout: float = 0.0
    # timesteps (with their noise) drawn per target image in a training step: the UNet learns
    # from each image (and its condition) several times for one pass of the LM, which costs
    # far more than the small UNet's
    noise_draws: int = 1
    snr_gamma: float = 5.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain mean squared error
    loss_weight: float = 10.0
    # pixels -> [-1, 1]: the vision processor's normalisation, undone (CLIP's by default)
    pixel_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    pixel_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        _validate(
            self,
            (
                "num_conditions",
                "condition_dim",
                "depth",
                "heads",
                "head_dim",
                "image_size",
                "inference_steps",
                "max_distance",
                "noise_draws",
                "max_images",
            ),
            ("loss_weight", "guidance_scale", "snr_gamma", "mmfs_pixels"),
        )
        if not 0 <= self.token_context <= self.max_distance:
            raise ValueError(
                f"ImageGenerationConfig.token_context must be in [0, max_distance={self.max_distance}], "
                f"got {self.token_context}"
            )
        if self.train_timesteps < 2:
            raise ValueError(f"ImageGenerationConfig.train_timesteps must be >= 2, got {self.train_timesteps}")
        if self.inference_steps > self.train_timesteps:
            raise ValueError(
                f"ImageGenerationConfig.inference_steps ({self.inference_steps}) must be at most "
                f"train_timesteps ({self.train_timesteps}): a sampler takes its steps among the training timesteps"
            )
        if not 0 <= self.condition_dropout < 1:
            raise ValueError(f"ImageGenerationConfig.condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if not 0 <= self.image_dropout < 1:
            raise ValueError(f"ImageGenerationConfig.image_dropout must be in [0, 1), got {self.image_dropout}")
        if self.space == "latent" and not self.vae:
            raise ValueError(
                "ImageGenerationConfig: space='latent' needs vae (a hub id or directory of an AutoencoderKL)"
            )
        if not self.mmfs:
            changed = [
                f"{k}={getattr(self, k)!r}"
                for k in (
                    "mmfs_attention",
                    "mmfs_features",
                    "mmfs_pooled",
                    "mmfs_pixels",
                    "mmfs_gate",
                    "image_guidance_scale",
                    "image_dropout",
                )
                if getattr(self, k) != getattr(ImageGenerationConfig, k)
            ]
            if changed:
                raise ValueError(
                    f"ImageGenerationConfig: {', '.join(changed)} set with mmfs=False, which reads no earlier "
                    "image: set mmfs=True, or leave them at their defaults"
                )
        if self.mmfs_attention == "aligned" and self.mmfs_features != "patches":
            raise ValueError(
                "ImageGenerationConfig: mmfs_attention='aligned' reads the patch grid: it needs mmfs_features='patches'"
            )
        if self.mmfs_pixels and self.mmfs_attention != "aligned":
            raise ValueError(
                "ImageGenerationConfig: mmfs_pixels (the side of the earlier images' own grid, 0: off) "
                f"needs mmfs_attention='aligned', got {self.mmfs_pixels} with {self.mmfs_attention!r}"
            )
        if self.image_guidance_scale is not None and self.image_guidance_scale < 0:
            raise ValueError(
                "ImageGenerationConfig.image_guidance_scale must be >= 0 (None: guidance_scale), "
                f"got {self.image_guidance_scale}"
            )
        if self.mmfs_gate != "scalar" and self.mmfs_attention == "shared":
            raise ValueError(
                f"ImageGenerationConfig: mmfs_gate={self.mmfs_gate!r} gates the earlier images' own attention: "
                "it needs mmfs_attention 'decoupled' or 'aligned' ('shared' reads them beside the text, ungated)"
            )
        if self.mmfs_pixels and self.space == "pixel" and self.image_size % self.mmfs_pixels:
            raise ValueError(
                f"ImageGenerationConfig.mmfs_pixels {self.mmfs_pixels} does not divide image_size {self.image_size} "
                "(the decoder's side in pixel space)"
            )
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ValueError("ImageGenerationConfig: pixel_mean and pixel_std need one value per RGB channel")


@dataclass(frozen=True, kw_only=True)
class FlamingoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    image_generation: ImageGenerationConfig | None = None  # None: a text-only model

    def __post_init__(self):
        if self.image_generation is not None and not self.tokens.begin_of_image:
            raise ValueError(
                "image_generation needs tokens.begin_of_image, the token that starts an image (e.g. <|beginofimage|>)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlamingoConfig:
        return from_dict(cls, data)

    @classmethod
    def from_json(cls, path: str | Path) -> FlamingoConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a Flamingo config: {e}") from None
        return from_dict(cls, data, where=str(path))


T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from nested plain data, checking keys and types.

    Errors name the offending path, e.g. ``config.json: resampler.depth: expected int, got 'x'``.
    """
    return _coerce(cls, data, where, "")


def _coerce(tp: Any, value: Any, where: str, path: str) -> Any:
    name = path or "<root>"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {name}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"{where}: {name}: unknown key {unknown[0]!r} (known: {sorted(fields)})")
        kwargs = {k: _coerce(hints[k], v, where, f"{path}.{k}" if path else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {name}: {e}") from None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {name}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {name}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, where, f"{name}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: {name}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, where, f"{name}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{where}: {name}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {name}")

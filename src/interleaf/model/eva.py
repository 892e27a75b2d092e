"""EVA-CLIP vision towers (EVA02-CLIP, as InfiMM uses them), written natively: no xformers,
no apex, no timm; attention through ``scaled_dot_product_attention``.

The tower has the Hugging Face ViT layout that :class:`~interleaf.model.vision.VisionEncoder`
reads (``embeddings``, ``encoder.layers``, ``post_layernorm``), so every interleaf feature that
takes a vision tower takes this one. Inside a block the parameter names are EVA-CLIP's own
(``norm1``, ``attn.q_proj``, ``attn.q_bias``, ``attn.inner_attn_ln``, ``mlp.w1``/``w2``/``w3``,
``mlp.ffn_ln``, ``gamma_1``), so an EVA-CLIP state dict loads by renaming its prefixes only
(:func:`from_eva_clip_state_dict`).

What EVA02 adds to a ViT, all configurable in :class:`EvaVisionConfig`:

- 2D rotary position embeddings on the patch tokens (not the class token): the first half of
  each head's dimensions rotates with the patch row, the second half with its column, in
  interleaved pairs; with ``intp_freq`` the positions are scaled to the grid the tower was
  pretrained at (``pt_hw_seq_len``), so a 336 px tower (24 x 24 patches) keeps the
  frequencies of its 224 px pretraining (16 x 16);
- a SwiGLU MLP (``swiglu``: ``w3(ffn_ln(silu(w1 x) * w2 x))``) or a GELU MLP;
- sub-LN (``subln``): separate q/k/v projections, a LayerNorm on the attention output before
  its projection and one inside the MLP;
- q and v biases without a k bias (``qkv_bias``), optional LayerScale (``layer_scale``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling


class EvaVisionConfig(transformers.PretrainedConfig):
    """An EVA-CLIP vision tower. Field names follow EVA-CLIP's ``CLIPVisionCfg`` where it has
    one (``width``, ``layers``, ``head_width``, ``naiveswiglu`` = ``swiglu``, ...)."""

    model_type = "interleaf_eva_clip"

    def __init__(
        self,
        image_size: int | tuple[int, int] = 336,
        patch_size: int = 14,
        width: int = 1024,
        layers: int = 24,
        head_width: int = 64,
        mlp_ratio: float = 2.6667,
        qkv_bias: bool = True,
        rope: bool = True,
        pt_hw_seq_len: int = 16,
        intp_freq: bool = True,
        swiglu: bool = True,
        subln: bool = True,
        layer_scale: float | None = None,
        norm_eps: float = 1e-6,
        num_channels: int = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = list(image_size) if isinstance(image_size, (list, tuple)) else image_size
        self.patch_size = patch_size
        self.width = width
        self.layers = layers
        self.head_width = head_width
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.rope = rope
        self.pt_hw_seq_len = pt_hw_seq_len
        self.intp_freq = intp_freq
        self.swiglu = swiglu
        self.subln = subln
        self.layer_scale = layer_scale
        self.norm_eps = norm_eps
        self.num_channels = num_channels
        self.hidden_size = width
        if width % head_width:
            raise ValueError(f"EvaVisionConfig: width {width} is not a multiple of head_width {head_width}")
        if rope and head_width % 4:
            raise ValueError(f"EvaVisionConfig: rotary embeddings need head_width divisible by 4, got {head_width}")
        for size in self.grid_size:
            if size < 1:
                raise ValueError(f"EvaVisionConfig: image_size {image_size} is smaller than patch_size {patch_size}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        h, w = self.image_size if isinstance(self.image_size, (list, tuple)) else (self.image_size,) * 2
        return h // self.patch_size, w // self.patch_size

    @property
    def heads(self) -> int:
        return self.width // self.head_width


def rope_tables(config: EvaVisionConfig) -> tuple[Tensor, Tensor]:
    """cos and sin (rows x columns, head_width) of EVA02's 2D rotary embedding."""
    rows, columns = config.grid_size
    if not config.intp_freq and (rows, columns) != (config.pt_hw_seq_len,) * 2:
        raise ValueError(
            f"EVA rotary embeddings without intp_freq are defined on a {config.pt_hw_seq_len}x"
            f"{config.pt_hw_seq_len} patch grid; this tower's grid is {rows}x{columns} (set intp_freq)"
        )
    axis_dim = config.head_width // 2  # dimensions per axis
    bands = 1.0 / (10000 ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim))

    def angles(n: int) -> Tensor:  # (n, axis_dim): each band twice, for the interleaved pairs
        t = torch.arange(n) / n * config.pt_hw_seq_len if config.intp_freq else torch.arange(n).float()
        return (t[:, None] * bands[None]).repeat_interleave(2, dim=-1)

    per_row = angles(rows)[:, None, :].expand(rows, columns, axis_dim)
    per_column = angles(columns)[None, :, :].expand(rows, columns, axis_dim)
    theta = torch.cat([per_row, per_column], dim=-1).reshape(rows * columns, config.head_width)
    return theta.cos(), theta.sin()


def _rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


class EvaAttention(nn.Module):
    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        width, self.heads = config.width, config.heads
        self.subln = config.subln
        if config.subln:
            self.q_proj = nn.Linear(width, width, bias=False)
            self.k_proj = nn.Linear(width, width, bias=False)
            self.v_proj = nn.Linear(width, width, bias=False)
        else:
            self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width)) if config.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(width)) if config.qkv_bias else None
        self.inner_attn_ln = nn.LayerNorm(width, eps=config.norm_eps) if config.subln else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.subln:
            q = F.linear(x, self.q_proj.weight, self.q_bias)
            k = self.k_proj(x)
            v = F.linear(x, self.v_proj.weight, self.v_bias)
        else:
            bias = None
            if self.q_bias is not None:
                bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        if rope is not None:  # the patch tokens rotate; the class token (first) does not
            cos, sin = rope
            q, k = (
                torch.cat([t[:, :, :1], (t[:, :, 1:] * cos + _rotate_pairs(t[:, :, 1:]) * sin).type_as(v)], dim=2)
                for t in (q, k)
            )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.proj(self.inner_attn_ln(out))


class EvaMlp(nn.Module):
    """SwiGLU (``w1`` gate, ``w2`` value, ``w3`` out) or GELU (``fc1``, ``fc2``), with sub-LN."""

    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        hidden = int(config.width * config.mlp_ratio)
        self.swiglu = config.swiglu
        if config.swiglu:
            self.w1 = nn.Linear(config.width, hidden)
            self.w2 = nn.Linear(config.width, hidden)
            self.w3 = nn.Linear(hidden, config.width)
        else:
            self.fc1 = nn.Linear(config.width, hidden)
            self.fc2 = nn.Linear(hidden, config.width)
        self.ffn_ln = nn.LayerNorm(hidden, eps=config.norm_eps) if config.subln else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))
        return self.fc2(self.ffn_ln(F.gelu(self.fc1(x))))


class EvaBlock(nn.Module):
    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = EvaAttention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = EvaMlp(config)
        scale = config.layer_scale
        self.gamma_1 = nn.Parameter(torch.full((config.width,), float(scale))) if scale else None
        self.gamma_2 = nn.Parameter(torch.full((config.width,), float(scale))) if scale else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        attn = self.attn(self.norm1(x), rope)
        x = x + (attn if self.gamma_1 is None else self.gamma_1 * attn)
        mlp = self.mlp(self.norm2(x))
        return x + (mlp if self.gamma_2 is None else self.gamma_2 * mlp)


class EvaEmbeddings(nn.Module):
    """Patches, a class token in front, absolute position embeddings."""

    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(config.num_channels, config.width, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        rows, columns = config.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, rows * columns + 1, config.width))

    def forward(self, pixel_values: Tensor) -> Tensor:
        expected = tuple(self.config.grid_size[i] * self.config.patch_size for i in (0, 1))
        if tuple(pixel_values.shape[-2:]) != expected:
            raise ValueError(
                f"the EVA tower takes {expected[0]}x{expected[1]} images, got {tuple(pixel_values.shape[-2:])}"
            )
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed


class EvaEncoder(nn.Module):
    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EvaBlock(config) for _ in range(config.layers))


class EvaVisionModel(nn.Module):
    """``forward(pixel_values)`` -> ``last_hidden_state`` (after the final LayerNorm, all
    tokens, the class token first) and ``pooler_output`` (its class token). InfiMM reads the
    last block's output before that norm: ``VisionConfig(layer=-1, post_layernorm=False,
    drop_cls=False)``."""

    config_class = EvaVisionConfig

    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = EvaEmbeddings(config)
        self.encoder = EvaEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.width, eps=config.norm_eps)
        cos, sin = rope_tables(config) if config.rope else (torch.empty(0), torch.empty(0))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_layernorm.weight.dtype

    def forward(self, pixel_values: Tensor, **_) -> BaseModelOutputWithPooling:
        x = self.embeddings(pixel_values)
        rope = (self.rope_cos.to(x.device), self.rope_sin.to(x.device)) if self.config.rope else None
        for layer in self.encoder.layers:
            x = layer(x, rope)
        x = self.post_layernorm(x)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x[:, 0])


EVA_PREFIXES = (
    ("blocks.", "encoder.layers."),
    ("patch_embed.proj.", "embeddings.patch_embed."),
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.pos_embed"),
    ("norm.", "post_layernorm."),
)
EVA_UNUSED = ("rope.", "head.", "fc_norm.")  # recomputed buffers, the CLIP projection head
_BLOCK_ROPE = re.compile(r"blocks\.\d+\.attn\.rope\.")  # each block's alias of the shared rope buffers


def from_eva_clip_state_dict(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """An EVA-CLIP vision state dict (keys under ``prefix``, e.g. ``model.vision_encoder.``)
    in this tower's names; the rotary buffers (saved once per block too, since every block's
    attention holds the shared rotary module) and the CLIP head are dropped."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith(EVA_UNUSED) or _BLOCK_ROPE.match(name):
            continue
        for old, new in EVA_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = value
    return out

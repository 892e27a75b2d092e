"""A small model that draws, for the tests of image generation: the tiny backbones, the
begin-of-image token, and a UNet of two levels with a few channels."""

import dataclasses

from interleaf.config import FlamingoConfig, ImageGenerationConfig, TokensConfig, UNetConfig
from interleaf.data import tinyworld

from conftest import tiny_config

SMALL_UNET = UNetConfig(
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
    norm_num_groups=4,
)
SMALL = dict(num_conditions=4, condition_dim=16, depth=1, heads=2, head_dim=8, inference_steps=3, unet=SMALL_UNET)


def draw_config(backbones, base: FlamingoConfig | None = None, **gen) -> FlamingoConfig:
    """``base`` (default: the tiny config) with the begin-of-image token and a small decoder;
    ``gen`` overrides its fields."""
    return dataclasses.replace(
        base or tiny_config(backbones),
        tokens=TokensConfig(begin_of_image=tinyworld.BEGIN_OF_IMAGE),
        image_generation=ImageGenerationConfig(**{**SMALL, **gen}),
    )

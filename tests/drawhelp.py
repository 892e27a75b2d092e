"""A small model that draws, for the tests of image generation: the tiny backbones, the
begin-of-image token, and a UNet of two levels with a few channels."""

import dataclasses
import signal

from interleaf.config import FlamingoConfig, ImageGenerationConfig, TokensConfig, UNetConfig
from interleaf.data import tinyworld
from interleaf.data.stream import Loader

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


class SignalAfter(Loader):
    """A loader that raises SIGTERM as it hands out batch ``at`` (as a kill mid-run would)."""

    def __init__(self, loader: Loader, at: int):
        super().__init__(loader.dataset, num_workers=loader.num_workers)
        self.at = at

    def __iter__(self):
        for batch in super().__iter__():
            if self.batches == self.at:
                signal.raise_signal(signal.SIGTERM)
            yield batch

"""Vision encoder adapter: any tower with the HF ViT layout
(``embeddings``, optional ``pre_layrnorm``, ``encoder.layers``, ``post_layernorm``), which
covers ``CLIPVisionModel``, ``SiglipVisionModel``, IDEFICS' vision transformer and interleaf's
EVA-CLIP tower (:mod:`interleaf.model.eva`)."""

from __future__ import annotations

import importlib

import torch
import transformers
from torch import Tensor, nn

from interleaf.config import VisionConfig
from interleaf.model.eva import EvaVisionConfig, EvaVisionModel

# Towers that the Auto classes do not know: model_type -> (module, config class, model class).
_EXTRA_TOWERS = {
    "idefics_vision": ("transformers.models.idefics.vision", "IdeficsVisionConfig", "IdeficsVisionTransformer")
}
# On a CPU, the images of one tower call: as many as keep a hidden state within this many
# floats (see VisionEncoder.cpu_chunk).
CPU_CHUNK_FLOATS = 1 << 18
# Full two-tower models whose vision half is used.
_VISION_HALF = {"clip": "vision_model", "siglip": "vision_model"}


class VisionEncoder(nn.Module):
    """Returns per-image patch features (n, P, D) from pixel values (n, C, H, W)."""

    def __init__(self, tower: nn.Module, cfg: VisionConfig):
        super().__init__()
        for part in ("embeddings", "encoder", "post_layernorm"):
            if not hasattr(tower, part):
                raise ValueError(
                    f"vision tower {type(tower).__name__} has no '{part}': expected the HF ViT layout "
                    "(CLIPVisionModel, SiglipVisionModel, IdeficsVisionTransformer)"
                )
        self.tower = tower
        self.cfg = cfg
        layers = tower.encoder.layers
        if not -len(layers) <= cfg.layer < len(layers):
            raise ValueError(f"vision.layer={cfg.layer} is out of range for a tower of {len(layers)} layers")
        self._layer = layers[cfg.layer]

    @property
    def dim(self) -> int:
        return self.tower.post_layernorm.normalized_shape[0]

    @property
    def num_tokens(self) -> int | None:
        """Tokens per image (the patches, and a CLS token unless dropped), from the tower's
        position embeddings; None when the tower does not say."""
        positions = getattr(self.tower.embeddings, "num_positions", None)
        return None if positions is None else positions - int(self.cfg.drop_cls)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(n, C, H, W) -> (n, P, D). On a CPU the images go through the tower a few at a time
        (:data:`CPU_CHUNK_FLOATS`), each result the same rows' (docs/BENCHMARKS.md)."""
        chunk = self.cpu_chunk(pixel_values)
        if chunk >= len(pixel_values):
            return self._features(pixel_values)
        return torch.cat([self._features(part) for part in pixel_values.split(chunk)])

    def cpu_chunk(self, pixel_values: Tensor) -> int:
        """How many images go through the tower at once: all of them on an accelerator; on a
        CPU, as many as keep one hidden state of the chunk within :data:`CPU_CHUNK_FLOATS`
        (the tower's elementwise work then runs in cache, not from memory: 1.3-1.5x faster
        on 64 images of 224 px through a 4 x 256 CLIP tower)."""
        if pixel_values.device.type != "cpu":
            return len(pixel_values)
        tokens = self.num_tokens or 1
        return max(1, CPU_CHUNK_FLOATS // ((tokens + 1) * self.dim))

    def _features(self, pixel_values: Tensor) -> Tensor:
        captured: list[Tensor] = []

        def keep(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self._layer.register_forward_hook(keep)
        try:
            self.tower(pixel_values=pixel_values)
        finally:
            handle.remove()
        features = captured[-1]
        if self.cfg.post_layernorm:
            features = self.tower.post_layernorm(features)
        if self.cfg.drop_cls:
            features = features[:, 1:]
        return features


def tower_from_config(config: transformers.PreTrainedConfig) -> nn.Module:
    """An untrained tower of the architecture ``config`` describes (weights are loaded after)."""
    if isinstance(config, EvaVisionConfig):
        return EvaVisionModel(config)
    if config.model_type in _EXTRA_TOWERS:
        module, _, model_class = _EXTRA_TOWERS[config.model_type]
        return getattr(importlib.import_module(module), model_class)(config)
    model = transformers.AutoModel.from_config(config)
    return getattr(model, _VISION_HALF[config.model_type]) if config.model_type in _VISION_HALF else model


def tower_config_from_dict(data: dict) -> transformers.PreTrainedConfig:
    """The HF config of a tower from its ``to_dict()`` form (as saved in checkpoints)."""
    data = dict(data)
    model_type = data.pop("model_type", None)
    if model_type == EvaVisionConfig.model_type:
        return EvaVisionConfig(**data)
    if model_type in _EXTRA_TOWERS:
        module, config_class, _ = _EXTRA_TOWERS[model_type]
        return getattr(importlib.import_module(module), config_class)(**data)
    return transformers.AutoConfig.for_model(model_type, **data)


def load_tower(source: str, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a pretrained tower from a hub id or a local directory (in ``dtype``, default float32)."""
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a vision encoder from {source!r}: {e}") from None
    model = transformers.AutoModel.from_pretrained(source, dtype=dtype or torch.float32)
    if config.model_type in _VISION_HALF:
        return getattr(model, _VISION_HALF[config.model_type])
    return model

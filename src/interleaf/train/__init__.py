"""Training: typed recipes, the optimiser and schedule, the one training loop, and (in
``parallel``) all of its distributed wrapping."""

from interleaf.train.config import (
    DataConfig,
    EvalTaskConfig,
    OptimConfig,
    Recipe,
    SourceConfig,
    TrainConfig,
    load_recipe,
)
from interleaf.train.loop import train

__all__ = [
    "DataConfig",
    "EvalTaskConfig",
    "OptimConfig",
    "Recipe",
    "SourceConfig",
    "TrainConfig",
    "load_recipe",
    "train",
]

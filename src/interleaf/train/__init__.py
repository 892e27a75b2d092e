"""Training: typed recipes, the optimiser and schedule, and the one training loop."""

from interleaf.train.config import DataConfig, OptimConfig, Recipe, SourceConfig, TrainConfig, load_recipe
from interleaf.train.loop import train

__all__ = ["DataConfig", "OptimConfig", "Recipe", "SourceConfig", "TrainConfig", "load_recipe", "train"]

"""Run recipes: YAML validated against frozen, keyword-only dataclasses.

A recipe names the model (:class:`interleaf.config.FlamingoConfig`), the data mixture, the
optimisation and the run. ``load_recipe(path, ["optim.lr=3e-4"])`` reads the YAML, applies the
``key.sub=value`` overrides (values parsed as YAML), then validates; every error is one line
that names the offending key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from interleaf.config import FlamingoConfig, _validate, from_dict
from interleaf.data.collate import CollateConfig
from interleaf.data.shards import expand
from interleaf.train.checkpoints import check_init_source


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML loading that also reads ``3e-4`` as a float (YAML 1.2), not a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def _parse(text: str):
    return yaml.load(text, Loader=_YamlLoader)


def _check(cfg: Any, name: str, ok, rule: str) -> None:
    """``cfg.<name>`` must be a finite number for which ``ok`` holds; the error names the field."""
    value = getattr(cfg, name)
    if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
        raise ValueError(f"{type(cfg).__name__}.{name} must be {rule}, got {value}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with weight decay only on matrices, warmup, then a decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1  # on >=2-D weights that are not norms, embeddings, gates or latents
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    accumulation: int = 1  # micro-batches per optimiser step
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1
    # step each weight as soon as its gradient is complete, then free that gradient: a step never
    # holds every gradient at once (single process; no clipping, no accumulation)
    in_backward: bool = False

    def __post_init__(self):
        _validate(self, ("accumulation",), ("warmup_steps",))
        _check(self, "lr", lambda v: v > 0, "> 0")
        _check(self, "eps", lambda v: v > 0, "> 0")
        _check(self, "weight_decay", lambda v: v >= 0, ">= 0")
        _check(self, "grad_clip", lambda v: v >= 0, ">= 0 (0 disables clipping)")
        _check(self, "min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.in_backward and self.grad_clip > 0:
            raise ValueError(
                f"optim.in_backward steps each weight as soon as its gradient is ready, so there is no global "
                f"gradient norm to clip: set optim.grad_clip: 0 (it is {self.grad_clip})"
            )
        if self.in_backward and self.accumulation != 1:
            raise ValueError(
                f"optim.in_backward steps the weights during each backward pass, so it cannot accumulate "
                f"micro-batches: set optim.accumulation: 1 (it is {self.accumulation})"
            )


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One data source: shards (a directory, glob, brace pattern or list) and its mixture weight."""

    shards: str | tuple[str, ...] = ""
    weight: float = 1.0

    def __post_init__(self):
        _check(self, "weight", lambda v: v > 0, "> 0")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    batch_size: int = 8
    num_workers: int = 0
    collate: CollateConfig = field(default_factory=CollateConfig)
    seed: int = 0
    # How the batch is split over the processes of a distributed run. batch_size is always the
    # global micro-batch (summed over ranks) and must be divisible by the world size.
    # "shards": each rank reads its own slot of the shards and collates batch_size/world rows
    #   (each document read once; the samples differ from a single-process run's).
    # "rows": every rank reads the single-process stream of global batches and keeps its rows
    #   rank::world (every rank reads everything; the same samples as one process, exactly).
    rank_split: Literal["shards", "rows"] = "shards"

    def __post_init__(self):
        _validate(self, ("batch_size",), ("num_workers",))


@dataclass(frozen=True, kw_only=True)
class EvalTaskConfig:
    """One task of the in-loop evaluation (``interleaf.eval``), scored every ``train.eval_every`` steps."""

    task: str = ""  # a built-in task name or a task YAML file
    root: str = ""  # the task's data directory ({root} in the task file)
    shots: tuple[int, ...] = (0,)
    limit: int = 0  # evaluate only the first `limit` queries; 0: all
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        _validate(self, ("batch_size",), ("limit",))
        if not self.task:
            raise ValueError("EvalTaskConfig.task: name a built-in task or a task YAML file")
        if not self.shots or any(k < 0 for k in self.shots):
            raise ValueError(f"EvalTaskConfig.shots must be non-negative shot counts, got {list(self.shots)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimiser steps
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: torch.autocast around forward
    # Where the run computes: "auto" (cuda:LOCAL_RANK when CUDA is there, else the CPU), "cpu",
    # "cuda" (cuda:LOCAL_RANK), or "cuda:N" (one process only).
    device: str = "auto"
    # The frozen weights' dtype: bfloat16 halves the memory of a frozen LM and vision encoder;
    # the trained parameters stay float32 for the optimiser. Other than float32 needs precision bf16.
    dtype: Literal["float32", "bfloat16"] = "float32"
    z_loss_weight: float = 0.0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 3
    out_dir: str = "runs/interleaf"
    resume: str = "auto"  # "auto" (newest readable checkpoint in out_dir), "never", or a checkpoint dir
    init_from: str = ""  # an earlier stage's export (out_dir/final): start from its weights, new optimiser
    seed: int = 0
    progress: bool = True  # tqdm progress bar (rank 0)
    # Distribution (see interleaf.train.parallel). One process, or one per device under torchrun /
    # accelerate launch (RANK, WORLD_SIZE, LOCAL_RANK). "auto": ddp when WORLD_SIZE > 1, else none.
    parallel: Literal["auto", "none", "ddp", "fsdp", "deepspeed"] = "auto"
    fsdp_sharding: Literal["full", "hybrid"] = "full"  # hybrid: shard within a node, replicate across nodes
    deepspeed_config: str = ""  # parallel=deepspeed: a DeepSpeed JSON, e.g. configs/deepspeed/zero2.json
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (non-reentrant)
    feature_cache: str = ""  # a directory: frozen vision features computed once per image, then read back
    tensorboard: bool = False  # scalars also to out_dir/tensorboard
    wandb: bool = False  # scalars also to Weights & Biases (needs the wandb package)
    wandb_project: str = "interleaf"
    eval_every: int = 0  # optimiser steps between in-loop evaluations; 0: never
    eval_tasks: tuple[EvalTaskConfig, ...] = ()

    def __post_init__(self):
        _validate(self, ("steps", "log_every", "checkpoint_every", "keep_last"), ("eval_every",))
        _check(self, "z_loss_weight", lambda v: v >= 0, ">= 0")
        if self.dtype != "float32" and self.precision != "bf16":
            raise ValueError(
                f"TrainConfig.dtype={self.dtype} keeps the frozen weights in {self.dtype}: it needs "
                "precision: bf16 (autocast), which runs the trained float32 parts with them"
            )
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"TrainConfig.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.eval_every and not self.eval_tasks:
            raise ValueError("TrainConfig.eval_every is set but eval_tasks is empty")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    model: FlamingoConfig = field(default_factory=FlamingoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``key.sub=value`` overrides, validate, check the data paths."""
    where = str(path)
    try:
        data = _parse(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{where}: cannot read the recipe: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a recipe is a mapping, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override, where)
    recipe = from_dict(Recipe, data, where=where)
    check_data(recipe.data, where)
    check_run_paths(recipe.train, where)
    return recipe


def check_run_paths(train: TrainConfig, where: str = "recipe") -> None:
    """The files a run reads must exist: the stage it starts from and a DeepSpeed config."""
    try:
        if train.init_from:
            check_init_source(train.init_from)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if train.deepspeed_config and not Path(train.deepspeed_config).is_file():
        raise ValueError(f"{where}: train.deepspeed_config: no such file: {train.deepspeed_config}")


def apply_override(data: dict[str, Any], override: str, where: str = "overrides") -> None:
    """Set ``data[a][b] = yaml(value)`` for ``override = "a.b=value"``, creating mappings."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ValueError(f"{where}: override {override!r} is not of the form key.sub=value")
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{where}: override {override!r}: {'.'.join(parents[: depth + 1])} is not a mapping")
    try:
        node[leaf] = _parse(raw)
    except yaml.YAMLError:
        raise ValueError(f"{where}: override {override!r}: cannot parse the value {raw!r}") from None


def check_data(data: DataConfig, where: str = "recipe") -> None:
    """Every source must name shards that exist; the error names the source and the path."""
    if not data.sources:
        raise ValueError(f"{where}: data.sources: no data sources given")
    for name, source in data.sources.items():
        try:
            expand(source.shards)
        except ValueError as e:
            raise ValueError(f"{where}: data.sources.{name}.shards: {e}") from None

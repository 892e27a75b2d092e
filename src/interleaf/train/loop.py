"""The one training loop: accumulation, autocast, clipping, logging, checkpoints, exact resume.

``train(recipe)`` builds what it is not given (model, processor, data loader), resumes from the
newest readable checkpoint when ``train.resume == "auto"``, trains to ``train.steps`` optimiser
steps, and exports ``out_dir/final``. SIGTERM or SIGINT finishes the current step, writes a
checkpoint and returns; a later ``train`` with ``resume="auto"`` continues exactly where it
stopped: same weights, optimiser, schedule, RNG and data position, so the same loss curve.

The same function is one rank of a ``torchrun`` / ``accelerate launch`` run: the wrapping
(DDP, FSDP, DeepSpeed, activation checkpointing) and the collectives live in
:mod:`interleaf.train.parallel`. ``data.batch_size`` is the global micro-batch; losses and token
counts are logged as global values; rank 0 alone writes metrics (``metrics.jsonl``, and
TensorBoard / W&B when asked for), the progress bar (with its ETA) and checkpoints, which hold
whole weights and optimiser state and every rank's data position. Every ``train.eval_every``
steps the model is scored few-shot by the evaluation harness on ``train.eval_tasks``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import random
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from interleaf.data.collate import Collator
from interleaf.data.shards import ShardStream, expand
from interleaf.data.stream import BatchStream, Loader, Mixture
from interleaf.eval.harness import EvalConfig, batch_to, evaluate
from interleaf.eval.tasks import load_task
from interleaf.extras import MissingExtra, require
from interleaf.model.checkpoint import save_flamingo, unique_state_dict
from interleaf.model.flamingo import Flamingo
from interleaf.model.masks import IGNORE_INDEX
from interleaf.model.trainable import format_parameter_report
from interleaf.processing import Processor
from interleaf.train import checkpoints, parallel
from interleaf.train.config import DataConfig, EvalTaskConfig, Recipe
from interleaf.train.features import FeatureCache, feature_cache
from interleaf.train.optim import build_optimizer, build_schedule, step_in_backward

METRICS = "metrics.jsonl"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mixture(data: DataConfig, slot: int, num_slots: int) -> Mixture:
    """The mixture of one (rank, worker) slot: every source read forever."""
    streams = {
        name: ShardStream(
            expand(src.shards),
            slot=slot,
            num_slots=num_slots,
            seed=data.seed,
            epochs=None,
        )
        for name, src in data.sources.items()
    }
    weights = {name: src.weight for name, src in data.sources.items()}
    return Mixture(streams, weights, seed=data.seed * 1_000_003 + slot)


def build_loader(data: DataConfig, processor: Processor, *, rank: int = 0, world_size: int = 1) -> Loader:
    """A resumable loader of this rank's rows of the global micro-batch (``data.batch_size``
    rows over all ranks; see ``DataConfig.rank_split`` for how the ranks share the data)."""
    rows = parallel.rank_batch_size(data.batch_size, world_size)
    collate = Collator(processor, data.collate)
    if data.rank_split == "rows" and world_size > 1:
        stream = BatchStream(functools.partial(_mixture, data), collate, data.batch_size)
        return RankRows(stream, rank=rank, world_size=world_size, num_workers=data.num_workers)
    stream = BatchStream(functools.partial(_mixture, data), collate, rows, rank=rank, world_size=world_size)
    return Loader(stream, num_workers=data.num_workers)


class RankRows(Loader):
    """Reads the single-process stream of global batches and keeps rows ``rank::world_size``:
    the ranks of a run together see exactly the batches one process would see, and each rank's
    position (hence its saved state) is that of the single-process stream."""

    def __init__(self, dataset: BatchStream, *, rank: int, world_size: int, num_workers: int = 0):
        super().__init__(dataset, num_workers=num_workers)
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        for batch in super().__iter__():
            yield {k: v[self.rank :: self.world_size] for k, v in batch.items()}


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint and return."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.received = signum

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    parts: dict[str, float] = field(default_factory=dict)  # a drawing model's text and image losses


class Loggers:
    """Where metrics go (rank 0 only): ``metrics.jsonl``, and TensorBoard / Weights & Biases
    when the recipe asks for them."""

    def __init__(self, recipe: Recipe, main: bool):
        cfg = recipe.train
        self.file = Path(cfg.out_dir) / METRICS
        self.main = main
        self.tensorboard = self.wandb = None
        if not main:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(cfg.out_dir) / "tensorboard"))
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project, dir=cfg.out_dir, config=dataclasses.asdict(recipe), resume="allow"
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step"}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


@dataclass
class Run:
    """Everything the loop mutates, and what it checkpoints.

    ``model`` is the unwrapped model (under FSDP, sharded in place); ``wrapped`` is what the loop
    calls (the DDP wrapper, the DeepSpeed engine, or ``model``).
    """

    recipe: Recipe
    model: Flamingo
    loader: Loader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dist: parallel.Dist = field(default_factory=parallel.Dist)
    wrapped: torch.nn.Module | None = None
    processor: Processor | None = None
    step: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)  # the last step's text and image losses (this rank)

    def __post_init__(self):
        if self.wrapped is None:
            self.wrapped = self.model

    @property
    def out_dir(self) -> Path:
        return Path(self.recipe.train.out_dir)

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the weights (collective: every rank calls it)."""
        return {
            "optimizer": parallel.optimizer_state(self.model, self.optimizer, self.dist),
            "scheduler": self.scheduler.state_dict(),
            "rng": checkpoints.rng_state(),
            "data": parallel.gather_objects(self.loader.state_dict(), self.dist),  # indexed by rank
            "world_size": self.dist.world_size,
        }

    def save(self) -> Path:
        """Write ``checkpoint-<step>`` (rank 0) from the gathered weights and states of all ranks."""
        weights = parallel.trainable_weights(self.model, self.dist)
        state = self.state()
        parallel.barrier(self.dist)
        if self.dist.main:
            checkpoints.save(self.out_dir, self.step, weights, state, self.recipe.train.keep_last)
        parallel.barrier(self.dist)
        return self.out_dir / f"checkpoint-{self.step}"

    def restore(self, ckpt: checkpoints.Checkpoint) -> None:
        try:
            parallel.load_trainable_weights(self.model, ckpt.weights)
        except ValueError as e:
            raise ValueError(
                f"train.resume: {ckpt.path} does not fit this model: {e} (a run resumes the newest checkpoint of "
                "its train.out_dir: give a changed model another out_dir, or train.resume=never)"
            ) from None
        if ckpt.state["optimizer"] is None:
            warnings.warn(f"{ckpt.path}: the optimiser state is not restored; its moments restart", stacklevel=2)
        else:
            parallel.load_optimizer_state(self.model, self.optimizer, ckpt.state["optimizer"], self.dist)
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        self._restore_data(ckpt)
        checkpoints.set_rng_state(ckpt.state["rng"])
        self.step = ckpt.state["step"]

    def _restore_data(self, ckpt: checkpoints.Checkpoint) -> None:
        """This rank's loader position; with another world size, only if all ranks had the same
        position (``rank_split=rows``), else the data stream restarts (with a warning)."""
        states = ckpt.state["data"]
        states = [states] if isinstance(states, dict) else states
        if len(states) == self.dist.world_size:
            self.loader.load_state_dict(states[self.dist.rank])
        elif all(state == states[0] for state in states):
            self.loader.load_state_dict(states[0])
        else:
            warnings.warn(
                f"{ckpt.path} was written by {len(states)} processes reading their own shards; with "
                f"{self.dist.world_size} the data stream restarts from its beginning",
                stacklevel=3,
            )


def check_requirements(recipe: Recipe) -> None:
    """One clear line, before anything runs, for an optional package the recipe needs but that
    is not installed."""
    if recipe.model.trainable.lora is not None:
        require("peft", "trainable.lora (LoRA adapters)", "train")
    if recipe.train.tensorboard:
        require("tensorboard", "train.tensorboard=true", "train")
    if recipe.train.wandb and importlib.util.find_spec("wandb") is None:
        raise MissingExtra("train.wandb=true needs the wandb package: pip install wandb (or set train.wandb=false)")


def train(
    recipe: Recipe,
    *,
    model: Flamingo | None = None,
    processor: Processor | None = None,
    loader: Loader | None = None,
) -> dict[str, Any]:
    """Train to ``recipe.train.steps`` optimiser steps; return the step reached, this call's
    per-step losses (global means), whether a signal stopped it, and the last checkpoint and
    export paths. Runs alone or as one rank of ``torchrun`` / ``accelerate launch``."""
    check_requirements(recipe)
    if recipe.train.init_from:
        checkpoints.check_init_source(recipe.train.init_from)
    d = parallel.setup(recipe.train)
    try:
        return _train(recipe, d, model, processor, loader)
    finally:
        parallel.teardown(d)


def _train(recipe: Recipe, d: parallel.Dist, model, processor, loader) -> dict[str, Any]:
    cfg = recipe.train
    parallel.rank_batch_size(recipe.data.batch_size, d.world_size)
    if d.kind == "deepspeed" and cfg.eval_every:
        raise ValueError("train.eval_every: in-loop evaluation is not supported with train.parallel=deepspeed")
    tasks = [load_eval_task(t) for t in cfg.eval_tasks] if cfg.eval_every else []
    seed_everything(cfg.seed)
    if model is None:
        model = Flamingo.from_config(recipe.model)
    if cfg.init_from:  # whoever built the model: the CLI, the demo and the Python API share this path
        copied = checkpoints.init_weights(model, cfg.init_from)
        if d.main:
            print(f"train.init_from: loaded {len(copied)} tensors from {cfg.init_from}")
    if cfg.dtype != "float32":
        frozen_to(model, getattr(torch, cfg.dtype))
    if d.main:
        print(format_parameter_report(model))
    if processor is None:
        processor = Processor.from_backbones(
            recipe.model.lm.source, recipe.model.vision.source, tokens=recipe.model.tokens
        )
    if loader is None:
        loader = build_loader(recipe.data, processor, rank=d.rank, world_size=d.world_size)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    with _feature_cache(model, cfg.feature_cache):
        return _run(recipe, d, model, processor, loader, tasks)


def frozen_to(model: Flamingo, dtype: torch.dtype) -> None:
    """``train.dtype``: the frozen parameters in ``dtype``; the trained ones stay float32."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


@contextmanager
def _feature_cache(model: Flamingo, directory: str):
    """``train.feature_cache``: the frozen vision encoder's features read from (and added to) a
    cache for the run; the model is given back unwrapped."""
    if not directory:
        yield
        return
    with feature_cache(model, FeatureCache.for_model(directory, model)):
        yield


def _run(recipe: Recipe, d: parallel.Dist, model, processor, loader, tasks) -> dict[str, Any]:
    cfg = recipe.train
    if recipe.optim.in_backward and d.kind != "none":
        raise ValueError(
            f"optim.in_backward steps each weight during the backward pass, before {d.kind} has synchronised "
            "its gradient: it runs in a single process only (train.parallel: none)"
        )
    wrapped = parallel.wrap(model, d, cfg)
    optimizer = build_optimizer(model, recipe.optim)
    if d.kind == "deepspeed":
        rows = parallel.rank_batch_size(recipe.data.batch_size, d.world_size)
        wrapped = parallel.deepspeed_engine(model, optimizer, d, cfg, recipe.optim, rows)
    schedule = build_schedule(optimizer, recipe.optim, cfg.steps)
    run = Run(recipe, model, loader, optimizer, schedule, d, wrapped, processor)
    resume(run)
    hooks = step_in_backward(optimizer) if recipe.optim.in_backward else []
    loggers = Loggers(recipe, d.main)
    stop = StopSignal()
    try:
        with stop.installed():
            last = loop(run, stop, loggers, tasks)
    finally:
        loggers.close()
        for hook in hooks:  # the model handed back steps nothing on its own
            hook.remove()
    stopped = parallel.any_rank(stop.received is not None, d)
    final = None if stopped else export(run, Path(cfg.out_dir) / "final")
    return {"step": run.step, "losses": run.losses, "stopped": stopped, "checkpoint": last, "final": final}


def export(run: Run, path: Path) -> Path:
    """The final model and processor (rank 0), gathered whole from the ranks under FSDP and DeepSpeed."""
    state = parallel.full_state_dict(run.model, run.dist)
    with parallel.gathered(run.model, run.dist):  # ZeRO-3: the model's shapes, which the save checks
        if run.dist.main:
            if state is None:
                run.model.save_pretrained(path)
            else:
                keep = unique_state_dict(run.model)
                save_flamingo(run.model, path, state={k: v for k, v in state.items() if k in keep})
            run.processor.save_pretrained(path)
    parallel.barrier(run.dist)
    return path


def resume(run: Run) -> None:
    """Restore ``run`` from a checkpoint as ``train.resume`` asks (the one rank 0 picks); drop
    later metric lines."""
    how = run.recipe.train.resume
    if how == "never":
        return
    path = None
    if run.dist.main:
        ckpt = checkpoints.latest(run.out_dir) if how == "auto" else checkpoints.read(Path(how))
        path = None if ckpt is None else ckpt.path
    path = parallel.broadcast_object(path, run.dist)
    if path is None:
        return
    run.restore(ckpt if run.dist.main else checkpoints.read(path))
    if run.dist.main:
        _trim_metrics(run.out_dir / METRICS, run.step)


def _trim_metrics(file: Path, step: int) -> None:
    """Forget metric lines past ``step`` (logged by a run that died before its next checkpoint)."""
    if file.exists():
        lines = [line for line in file.read_text().splitlines() if json.loads(line)["step"] <= step]
        file.write_text("".join(line + "\n" for line in lines))


def loop(run: Run, stop: StopSignal, loggers: Loggers, tasks: list | None = None) -> Path | None:
    """Optimiser steps until ``train.steps`` or a signal (on any rank); returns the last
    checkpoint written."""
    cfg = run.recipe.train
    run.wrapped.train()
    batches = iter(run.loader)
    window, last = Window(), None
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not (cfg.progress and run.dist.main), desc="train")
    stopping = False
    while run.step < cfg.steps and not stopping:
        loss, tokens = train_step(run, batches)
        run.step += 1
        run.losses[run.step] = loss
        window.loss, window.steps, window.tokens = window.loss + loss, window.steps + 1, window.tokens + tokens
        for name, value in run.parts.items():
            window.parts[name] = window.parts.get(name, 0.0) + value
        bar.update(1)
        if run.step % cfg.log_every == 0:
            _log(run, window, bar, loggers)
            window = Window()
        if cfg.eval_every and run.step % cfg.eval_every == 0:
            loggers.log({"step": run.step, **evaluate_tasks(run, tasks)})
        stopping = parallel.any_rank(stop.received is not None, run.dist)
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps or stopping:
            last = run.save()
    bar.close()
    return last


def train_step(run: Run, batches) -> tuple[float, int]:
    """One optimiser step over ``optim.accumulation`` micro-batches: the step's loss (the mean
    over its supervised tokens) and token count, over all ranks.

    Each micro-batch's token-mean loss is weighted by its share of the supervised tokens of the
    whole step (all micro-batches of all ranks; DDP then averages over ranks, hence the world
    size): N accumulated micro-batches give the gradient of one batch N times the size.
    """
    ocfg, tcfg, d = run.recipe.optim, run.recipe.train, run.dist
    micro_batches = [batch_to(next(batches), d.device) for _ in range(ocfg.accumulation)]
    counts = [(batch["labels"][:, 1:] != IGNORE_INDEX).sum().float() for batch in micro_batches]
    total = torch.stack(counts).sum()
    total = (parallel.sum_all(total) if d.distributed else total).clamp(min=1)
    step_loss, tokens = torch.zeros((), device=d.device), 0
    parts: dict[str, float] = {}
    for micro, (batch, count) in enumerate(zip(micro_batches, counts)):
        with parallel.gradient_sync(run.wrapped, d, micro == ocfg.accumulation - 1):
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16"):
                # the loss straight from the hidden states, never the whole logits; not under
                # DeepSpeed, whose ZeRO-3 gathers a weight only inside its own module calls
                logits = d.kind == "deepspeed"
                out = run.wrapped(**batch, z_loss_weight=tcfg.z_loss_weight, return_logits=logits)
            loss = out.loss
            if out.image_loss is not None:  # mean over the micro-batches that draw
                for name in ("text_loss", "image_loss"):
                    parts[name] = parts.get(name, 0.0) + getattr(out, name).item() / ocfg.accumulation
            scaled = loss * count * d.world_size / total
            if d.kind == "deepspeed":
                run.wrapped.backward(scaled * ocfg.accumulation)  # the engine divides by the accumulation
                run.wrapped.step()  # at the accumulation boundary: clipping, optimiser step, zeroing
            else:
                scaled.backward()
        step_loss += loss.detach().float() * count / total
        tokens += int(batch["attention_mask"].sum())
    if d.kind != "deepspeed" and not ocfg.in_backward:  # in_backward: each weight already stepped
        if ocfg.grad_clip > 0:
            params = [p for p in run.model.parameters() if p.requires_grad]
            parallel.clip_grad_norm(params, ocfg.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.parts = parts
    if not d.distributed:
        return step_loss.item(), tokens
    stats = parallel.sum_all(torch.stack([step_loss, torch.tensor(float(tokens), device=d.device)]))
    return stats[0].item(), int(stats[1].item())


def load_eval_task(cfg: EvalTaskConfig) -> tuple:
    """The spec, support and query examples of one in-loop evaluation task, read once."""
    return cfg, *load_task(cfg.task, cfg.root or None)


def evaluate_tasks(run: Run, tasks: list) -> dict[str, float]:
    """Few-shot scores of the unwrapped model, ``{"eval/<task>/<k>shot": score}``, through the
    evaluation harness: on rank 0 (on every rank in lockstep under FSDP, whose weights are
    gathered collectively), in eval mode, back to training mode after."""
    scores: dict[str, float] = {}
    if run.dist.main or run.dist.kind == "fsdp":
        with parallel.evaluation(run.model, run.dist):
            for cfg, spec, support, queries in tasks:
                ecfg = EvalConfig(shots=cfg.shots, seed=cfg.seed, batch_size=cfg.batch_size, limit=cfg.limit or None)
                report = evaluate(run.model, run.processor, spec, support, queries, ecfg, progress=False)
                for shots in cfg.shots:
                    scores[f"eval/{spec.name}/{shots}shot"] = report["summary"][str(shots)]["mean"]
    parallel.barrier(run.dist)
    return scores


def _log(run: Run, window: Window, bar: tqdm, loggers: Loggers) -> None:
    """Log the window's metrics and show them on the progress bar (which shows the ETA)."""
    seconds = time.perf_counter() - window.started
    record = {
        "step": run.step,
        "loss": window.loss / window.steps,
        "lr": run.scheduler.get_last_lr()[0],
        "tokens": window.tokens,
        "seconds": seconds,
        **{name: value / window.steps for name, value in window.parts.items()},
    }
    loggers.log(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{window.tokens / seconds:.0f}")

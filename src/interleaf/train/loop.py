"""The one training loop: accumulation, autocast, clipping, logging, checkpoints, exact resume.

``train(recipe)`` builds what it is not given (model, processor, data loader), resumes from the
newest readable checkpoint when ``train.resume == "auto"``, trains to ``train.steps`` optimiser
steps, and exports ``out_dir/final``. SIGTERM or SIGINT finishes the current step, writes a
checkpoint and returns; a later ``train`` with ``resume="auto"`` continues exactly where it
stopped: same weights, optimiser, schedule, RNG and data position, so the same loss curve.
"""

from __future__ import annotations

import functools
import json
import random
import signal
import threading
import time
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
from interleaf.model.flamingo import Flamingo
from interleaf.processing import Processor
from interleaf.train import checkpoints
from interleaf.train.config import DataConfig, Recipe
from interleaf.train.optim import build_optimizer, build_schedule

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
    """A resumable loader of collated batches from the recipe's data mixture."""
    stream = BatchStream(
        functools.partial(_mixture, data),
        Collator(processor, data.collate),
        data.batch_size,
        rank=rank,
        world_size=world_size,
    )
    return Loader(stream, num_workers=data.num_workers)


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


@dataclass
class Run:
    """Everything the loop mutates, and what it checkpoints."""

    recipe: Recipe
    model: Flamingo
    loader: Loader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    losses: dict[int, float] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.recipe.train.out_dir)

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": checkpoints.rng_state(),
            "data": self.loader.state_dict(),
        }

    def save(self) -> Path:
        return checkpoints.save(self.out_dir, self.step, self.model, self.state(), self.recipe.train.keep_last)

    def restore(self, ckpt: checkpoints.Checkpoint) -> None:
        checkpoints.restore_weights(self.model, ckpt.weights)
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        self.loader.load_state_dict(ckpt.state["data"])
        checkpoints.set_rng_state(ckpt.state["rng"])
        self.step = ckpt.state["step"]


def train(
    recipe: Recipe,
    *,
    model: Flamingo | None = None,
    processor: Processor | None = None,
    loader: Loader | None = None,
) -> dict[str, Any]:
    """Train to ``recipe.train.steps`` optimiser steps; return the step reached, this call's
    per-step losses, whether a signal stopped it, and the last checkpoint and export paths."""
    cfg = recipe.train
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if model is None:
        model = Flamingo.from_config(recipe.model)
    if processor is None:
        processor = Processor.from_backbones(
            recipe.model.lm.source, recipe.model.vision.source, tokens=recipe.model.tokens
        )
    if loader is None:
        loader = build_loader(recipe.data, processor)
    optimizer = build_optimizer(model, recipe.optim)
    run = Run(recipe, model, loader, optimizer, build_schedule(optimizer, recipe.optim, cfg.steps))
    resume(run)
    stop = StopSignal()
    with stop.installed():
        last = loop(run, stop)
    final = None
    if stop.received is None:
        final = Path(cfg.out_dir) / "final"
        model.save_pretrained(final)
        processor.save_pretrained(final)
    return {
        "step": run.step,
        "losses": run.losses,
        "stopped": stop.received is not None,
        "checkpoint": last,
        "final": final,
    }


def resume(run: Run) -> None:
    """Restore ``run`` from a checkpoint as ``train.resume`` asks; drop later metric lines."""
    how = run.recipe.train.resume
    if how == "never":
        return
    ckpt = checkpoints.latest(run.out_dir) if how == "auto" else checkpoints.read(Path(how))
    if ckpt is None:
        return
    run.restore(ckpt)
    _trim_metrics(run.out_dir / METRICS, run.step)


def _trim_metrics(file: Path, step: int) -> None:
    """Forget metric lines past ``step`` (logged by a run that died before its next checkpoint)."""
    if file.exists():
        lines = [line for line in file.read_text().splitlines() if json.loads(line)["step"] <= step]
        file.write_text("".join(line + "\n" for line in lines))


def loop(run: Run, stop: StopSignal) -> Path | None:
    """Optimiser steps until ``train.steps`` or a signal; returns the last checkpoint written."""
    cfg = run.recipe.train
    run.model.train()
    batches = iter(run.loader)
    window, last = Window(), None
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not cfg.progress, desc="train")
    while run.step < cfg.steps and stop.received is None:
        loss, tokens = train_step(run, batches)
        run.step += 1
        run.losses[run.step] = loss
        window.loss, window.steps, window.tokens = window.loss + loss, window.steps + 1, window.tokens + tokens
        bar.update(1)
        if run.step % cfg.log_every == 0:
            _log(run, window, bar)
            window = Window()
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps or stop.received is not None:
            last = run.save()
    bar.close()
    return last


def train_step(run: Run, batches) -> tuple[float, int]:
    """One optimiser step over ``optim.accumulation`` micro-batches: mean loss and token count."""
    ocfg, tcfg = run.recipe.optim, run.recipe.train
    device = next(run.model.parameters()).device
    total, tokens = 0.0, 0
    for _ in range(ocfg.accumulation):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16"):
            loss = run.model(**batch, z_loss_weight=tcfg.z_loss_weight).loss
        (loss / ocfg.accumulation).backward()
        total += loss.item() / ocfg.accumulation
        tokens += int(batch["attention_mask"].sum())
    if ocfg.grad_clip > 0:
        params = [p for p in run.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, ocfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total, tokens


def _log(run: Run, window: Window, bar: tqdm) -> None:
    """Append the window's metrics to ``metrics.jsonl`` and show them on the progress bar."""
    seconds = time.perf_counter() - window.started
    record = {
        "step": run.step,
        "loss": window.loss / window.steps,
        "lr": run.scheduler.get_last_lr()[0],
        "tokens": window.tokens,
        "seconds": seconds,
    }
    with open(run.out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{window.tokens / seconds:.0f}")

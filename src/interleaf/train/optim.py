"""AdamW with weight decay only where it belongs, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from interleaf.train.config import OptimConfig

NO_DECAY_NAMES = ("norm", "emb", "gate", "latents")


def _exempt_modules(model: nn.Module) -> set[int]:
    """Ids of the parameters of embedding and normalisation modules."""
    exempt = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            exempt.update(id(p) for p in module.parameters(recurse=False))
    return exempt


def decays(name: str, param: torch.Tensor, exempt: set[int]) -> bool:
    """Weight decay applies to >=2-D weights that are not norms, embeddings, gates or latents."""
    lowered = name.lower()
    return param.ndim >= 2 and id(param) not in exempt and not any(s in lowered for s in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: with and without weight decay."""
    exempt = _exempt_modules(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param, exempt) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def step_in_backward(optimizer: torch.optim.Optimizer) -> list[torch.utils.hooks.RemovableHandle]:
    """``optim.in_backward``: from now on, each backward pass steps ``optimizer`` on each of its
    parameters as soon as that parameter's gradient is complete, then frees the gradient; the
    step's gradients never all exist at once (a full fine-tune's peak memory falls by about one
    copy of the trained weights). When a parameter's gradient is complete, it is the only one
    with a gradient (the earlier ones were stepped and freed, the later ones not yet computed);
    the optimiser's own ``step`` updates it, shown that parameter alone: the same AdamW, the same
    state and schedule, the same arithmetic as a step after the backward. Returns the hooks' handles
    (``handle.remove()`` them when training ends)."""

    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}

    def hook(param: torch.Tensor) -> None:
        groups = optimizer.param_groups
        # the step sees this parameter alone (its group's settings, at this moment's learning
        # rate): what it would update anyway, without a scan of every parameter per call
        optimizer.param_groups = [{**group_of[id(param)], "params": [param]}]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups = groups
        param.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for group in optimizer.param_groups for p in group["params"]]


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based): linear warmup to 1, then
    constant, or a linear or cosine decay that reaches ``min_lr_ratio`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "constant":
        return 1.0
    shape = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))

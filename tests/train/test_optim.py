"""Weight decay only where it belongs; the learning-rate schedule."""

import math

import pytest
import torch

from interleaf.train.config import OptimConfig
from interleaf.train.optim import build_optimizer, build_schedule, lr_factor, param_groups


def test_decay_groups(make_model):
    model = make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(model.trainable_names)
    assert not decayed & exempt
    for name in exempt:
        assert any(s in name for s in ("norm", "gate", "latents", "emb", "bias")), name
    assert "resampler.latents" in exempt and "resampler.media_embs" in exempt
    assert "language_model.extra_embed.weight" in exempt
    assert any(n.endswith("xattn.attn_gate") for n in exempt)
    assert any(n.endswith("xattn.norm.weight") for n in exempt)
    assert any(n.endswith("xattn.attn.q_proj.weight") for n in decayed)
    assert all(".norm" not in n and "gate" not in n for n in decayed)


def test_frozen_parameters_never_reach_the_optimizer(make_model):
    model = make_model()
    optimizer = build_optimizer(model, OptimConfig())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == len(model.trainable_names)
    assert all(p.requires_grad for p in params)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.25, 0.5, 0.75, 1.0, 0.775, 0.55, 0.1]),
        ("cosine", [0.25, 0.5, 0.75, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55, 0.1]),
    ],
)
def test_schedule_values(schedule, expected):
    cfg = OptimConfig(lr=2.0, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    total = 8
    steps = [0, 1, 2, 3, 5, 6, 8]
    assert [lr_factor(s, cfg, total) for s in steps] == pytest.approx(expected)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    scheduler = build_schedule(optimizer, cfg, total)
    seen = []
    for _ in range(9):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [seen[s] for s in steps] == pytest.approx([2.0 * e for e in expected])

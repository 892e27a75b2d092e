"""Training checkpoints: RNG round trip, atomic writes, pruning, damaged ones skipped."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from interleaf.train import checkpoints, parallel


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trip(tmp_path):
    state = checkpoints.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = draws()
    checkpoints.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_save_prune_and_skip_damaged(tmp_path):
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    for step in (2, 4, 6):
        with torch.no_grad():
            model.weight.fill_(step)
        checkpoints.save(tmp_path, step, {"weight": model.weight}, {"data": {"batches": step}}, keep_last=2)
    assert [p.name for p in checkpoints.checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(tmp_path.glob(".tmp-*"))
    newest = checkpoints.latest(tmp_path)
    assert newest.state["step"] == 6 and set(newest.weights) == {"weight"}
    (tmp_path / "checkpoint-6" / checkpoints.STATE).unlink()
    with pytest.warns(UserWarning, match="checkpoint-6"):
        fallback = checkpoints.latest(tmp_path)
    assert fallback.state["data"] == {"batches": 4}
    parallel.load_trainable_weights(model, fallback.weights)
    assert torch.equal(model.weight, torch.full((2, 3), 4.0))

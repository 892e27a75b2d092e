"""Gradient accumulation weights each micro-batch by its supervised tokens: N accumulated
micro-batches give the gradient (and the logged loss) of one batch N times the size."""

import json

import torch

from interleaf.model.masks import IGNORE_INDEX
from interleaf.processing import Processor
from interleaf.train.loop import build_loader, train

from conftest import tiny_recipe

SETTINGS = {"grad_clip": 0.0, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"}


def one_step(backbones, shards, out, batch_size, accumulation):
    rec = tiny_recipe(
        backbones,
        shards,
        out,
        steps=1,
        data={"batch_size": batch_size},
        optim={**SETTINGS, "accumulation": accumulation},
    )
    train(rec)
    state = torch.load(out / "checkpoint-1" / "state.pt", weights_only=True)["optimizer"]["state"]
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return rec, {name: s["exp_avg"] for name, s in state.items()}, logged


def test_accumulated_micro_batches_equal_one_big_batch(backbones, shards, tmp_path):
    big_recipe, big, big_log = one_step(backbones, shards, tmp_path / "big", batch_size=4, accumulation=1)
    _, small, small_log = one_step(backbones, shards, tmp_path / "small", batch_size=2, accumulation=2)

    # the same four documents, split in two micro-batches with different numbers of supervised tokens
    assert big_log["tokens"] == small_log["tokens"]
    processor = Processor.from_backbones(big_recipe.model.lm.source, big_recipe.model.vision.source)
    halves = iter(build_loader(tiny_recipe(backbones, shards, tmp_path, data={"batch_size": 2}).data, processor))
    counts = [int((next(halves)["labels"][:, 1:] != IGNORE_INDEX).sum()) for _ in range(2)]
    assert counts[0] != counts[1]  # so a plain mean of the two micro-batch losses would differ

    # Adam's first moment after one step is 0.1 x the gradient. Different batch shapes (padding
    # widths): equal up to float32 rounding of the reductions.
    assert big.keys() == small.keys() and big
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-8, msg=name)
    assert abs(small_log["loss"] - big_log["loss"]) <= 1e-5 * big_log["loss"]

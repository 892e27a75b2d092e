"""Metrics to JSONL and TensorBoard, in-loop few-shot evaluation, a missing logger's error."""

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from interleaf.data import tinyworld
from interleaf.data.collate import CollateConfig
from interleaf.data.shards import write_shards
from interleaf.extras import MissingExtra
from interleaf.train.config import DataConfig, EvalTaskConfig, OptimConfig, Recipe, SourceConfig, TrainConfig
from interleaf.train.loop import train

from conftest import tiny_config

TASK = "tinyworld_classification"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world: its eval tasks, and training shards of its documents."""
    root = tmp_path_factory.mktemp("tinyworld")
    tinyworld.write(root / "world", n_train=4, n_eval=4)
    write_shards(tinyworld.iter_train_documents(seed=0, n=20), root / "shards", max_samples=20)
    return root


def recipe(backbones, world, out_dir, **train) -> Recipe:
    return Recipe(
        model=tiny_config(backbones),
        data=DataConfig(
            sources={"world": SourceConfig(shards=str(world / "shards"))},
            batch_size=2,
            collate=CollateConfig(max_tokens=64, max_images=2),
        ),
        optim=OptimConfig(lr=1e-3),
        train=TrainConfig(out_dir=str(out_dir), progress=False, log_every=1, checkpoint_every=100, **train),
    )


def test_tensorboard_and_in_loop_evaluation(backbones, make_model, world, tmp_path):
    task = EvalTaskConfig(task=TASK, root=str(world / "world"), shots=(0, 2), limit=2, batch_size=2)
    rec = recipe(backbones, world, tmp_path, steps=3, tensorboard=True, eval_every=2, eval_tasks=(task,))
    model = make_model()
    modes = []
    model.language_model.register_forward_pre_hook(lambda *_: modes.append(model.training))
    train(rec, model=model)
    assert False in modes and modes[-1] is True  # evaluated in eval mode, then back to training

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2]
    scores = {k: v for k, v in evals[0].items() if k != "step"}
    assert set(scores) == {f"eval/{TASK}/0shot", f"eval/{TASK}/2shot"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in records if "loss" in r])
    assert [e.step for e in events.Scalars(f"eval/{TASK}/2shot")] == [2]
    assert {"lr", "tokens"} <= set(events.Tags()["scalars"])


def test_wandb_asked_for_but_missing_is_one_line(backbones, world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(MissingExtra) as info:
        train(recipe(backbones, world, tmp_path / "run", steps=1, wandb=True))
    message = str(info.value)
    assert "\n" not in message and "train.wandb" in message and "pip install wandb" in message
    assert not (tmp_path / "run").exists()  # nothing ran


def test_eval_every_needs_tasks():
    with pytest.raises(ValueError, match="eval_every is set but eval_tasks is empty"):
        TrainConfig(eval_every=5)

"""train.init_from through the command line: the run starts from the named stage's weights,
and a stage that is missing or does not fit stops the run before it trains."""

import dataclasses
import json
import os
import subprocess
import sys

import torch

from interleaf import Flamingo
from interleaf.cli import main
from interleaf.processing import Processor
from interleaf.train.checkpoints import init_weights
from interleaf.train.config import load_recipe
from interleaf.train.loop import build_loader

from conftest import open_gates, tiny_recipe


def write_recipe(recipe, path):
    """A recipe object as a YAML file (JSON is YAML)."""
    path.write_text(json.dumps(dataclasses.asdict(recipe), indent=1))
    return path


def stage_one(backbones, where, **resampler):
    """An 'earlier stage': the recipe's model with open gates and moved latents, exported."""
    config = tiny_recipe(backbones, "unused", where).model
    if resampler:
        config = dataclasses.replace(config, resampler=dataclasses.replace(config.resampler, **resampler))
    torch.manual_seed(1)
    model = Flamingo.from_config(config)
    open_gates(model)
    with torch.no_grad():
        model.resampler.latents.normal_(0, 3.0)
    model.save_pretrained(where)
    return where


def first_batch_loss(recipe, init_from=None):
    model = Flamingo.from_config(recipe.model)
    if init_from is not None:
        init_weights(model, init_from)
    processor = Processor.from_backbones(recipe.model.lm.source, recipe.model.vision.source)
    batch = next(iter(build_loader(recipe.data, processor)))
    with torch.no_grad():
        return model.train()(**batch).loss.item()


def test_the_cli_run_starts_from_the_stage_it_names(backbones, shards, tmp_path):
    stage = stage_one(backbones, tmp_path / "stage1")
    recipe = tiny_recipe(backbones, shards, tmp_path / "run", steps=1, optim={"accumulation": 1})
    path = write_recipe(recipe, tmp_path / "recipe.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "interleaf.cli", "train", str(path), f"train.init_from={stage}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    copied = sum(1 for _ in Flamingo.from_config(recipe.model).named_parameters())
    assert f"train.init_from: loaded {copied} tensors from {stage}" in done.stdout

    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1
    loaded = first_batch_loss(load_recipe(path, [f"train.init_from={stage}"]), stage)
    fresh = first_batch_loss(load_recipe(path, []))
    # another process on the same batch and shapes: equal up to the order of float reductions
    assert abs(logged["loss"] - loaded) <= 1e-5 * abs(loaded)
    assert abs(fresh - loaded) > 1e-2  # the stage's weights change the loss, so the check can fail

    # a stage that is not there: one line, non-zero exit, nothing trained or written
    missing = [*cmd[:-1], f"train.init_from={tmp_path / 'nowhere'}", f"train.out_dir={tmp_path / 'second'}"]
    done = subprocess.run(missing, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2 and "trained to step" not in done.stdout
    assert done.stderr.count("\n") == 1 and "train.init_from: " in done.stderr and "is not a directory" in done.stderr
    assert not (tmp_path / "second").exists()


def test_a_stage_that_is_missing_or_does_not_fit_stops_the_run(backbones, shards, tmp_path, capsys):
    recipe = tiny_recipe(backbones, shards, tmp_path / "run", steps=1)
    path = str(write_recipe(recipe, tmp_path / "recipe.yaml"))
    other = stage_one(backbones, tmp_path / "other", num_latents=6)
    cases = {
        f"train.init_from={tmp_path / 'nowhere'}": "is not a directory",
        f"train.init_from={tmp_path}": "holds neither model.safetensors",
        f"train.init_from={other}": "'resampler.latents' has shape (6, 32), the model's is (4, 32)",
    }
    for override, words in cases.items():
        assert main(["train", path, override]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("interleaf train: error: "), err
        assert "train.init_from: " in err[0]
        assert words in err[0]
        assert not (tmp_path / "run").exists()


def test_the_files_a_run_reads_are_checked_when_the_recipe_loads(backbones, shards, tmp_path):
    import pytest

    path = write_recipe(tiny_recipe(backbones, shards, tmp_path / "run", steps=1), tmp_path / "recipe.yaml")
    with pytest.raises(ValueError, match=r"recipe.yaml: train.init_from: .*nowhere is not a directory"):
        load_recipe(path, [f"train.init_from={tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match=r"recipe.yaml: train.deepspeed_config: no such file: .*zero9.json"):
        load_recipe(path, ["train.parallel=deepspeed", f"train.deepspeed_config={tmp_path / 'zero9.json'}"])


def test_a_source_of_empty_shards_stops_the_run_with_one_line(backbones, shards, tmp_path, capsys):
    import tarfile

    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    path = write_recipe(tiny_recipe(backbones, shards, tmp_path / "run", steps=2), tmp_path / "recipe.yaml")
    assert main(["train", str(path), f"data.sources.world.shards={tmp_path / 'empty.tar'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "read no document" in err[0], err


def test_resuming_a_run_with_a_changed_model_is_one_line(backbones, shards, tmp_path, capsys):
    path = str(write_recipe(tiny_recipe(backbones, shards, tmp_path / "run", steps=1), tmp_path / "recipe.yaml"))
    assert main(["train", path]) == 0
    capsys.readouterr()
    assert main(["train", path, "train.steps=2", "model.resampler.num_latents=6"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "does not fit this model: 'resampler.latents' has shape (4, 32)" in err[0], err

"""DeepSpeed on the CPU (gloo): 2-process runs of ``train.parallel=deepspeed`` with the shipped
``configs/deepspeed/zero2.json`` follow the single-process loss curve and reach its weights and
optimiser state; their checkpoints resume in one process, and they resume a single-process
checkpoint. ZeRO-3 (``zero3.json``) follows the curve and exports the whole model. These runs are
skipped where deepspeed is not installed (``pip install deepspeed``), and deepspeed is imported by
the launched processes only; without it, a recipe asking for it fails at once, in one line.

As in test_parallel.py, ``data.rank_split="rows"`` makes both ranks together compute exactly the
batches of the single-process run. The tolerance is that of the DDP test: ZeRO reduces the
gradients in buckets and steps AdamW on flat fp32 partitions, which changes the last bits only.
"""

import dataclasses
import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_parallel import CONFIGS, STEPS, assert_same_checkpoint, launch, recipe

from interleaf.cli import main
from interleaf.train.loop import train

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install deepspeed)"
)

ZERO2, ZERO3 = str(CONFIGS / "zero2.json"), str(CONFIGS / "zero3.json")


@pytest.fixture(scope="module")
def reference(backbones, shards, tmp_path_factory):
    """The single-process run: its per-step losses and its output directory."""
    out = tmp_path_factory.mktemp("single")
    return train(recipe(backbones, shards, out))["losses"], out


def test_missing_deepspeed_is_one_cli_line(backbones, shards, tmp_path, monkeypatch, capsys):
    rec = recipe(backbones, shards, tmp_path / "out", parallel="deepspeed", deepspeed_config=ZERO2)
    (tmp_path / "recipe.yaml").write_text(json.dumps(dataclasses.asdict(rec)))  # JSON is YAML
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("interleaf train: error: train.parallel=deepspeed needs the deepspeed package")
    assert "\n" not in err and "pip install deepspeed" in err
    assert not (tmp_path / "out").exists()  # before any work


@needs_deepspeed
def test_zero2_two_processes_equal_one(backbones, shards, reference, tmp_path):
    losses, single = reference
    result = launch(recipe(backbones, shards, tmp_path / "out", parallel="deepspeed", deepspeed_config=ZERO2), tmp_path)
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]  # it learns
    for step, loss in losses.items():
        assert result["losses"][step] == pytest.approx(loss, rel=1e-5), step
    # weights and AdamW moments gathered by name from the ZeRO partitions equal the single run's
    assert_same_checkpoint(tmp_path / "out" / f"checkpoint-{STEPS}", single / f"checkpoint-{STEPS}")

    # the ZeRO-2 checkpoint resumes in one process, on the same curve
    rec = recipe(backbones, shards, tmp_path / "resumed", resume=str(tmp_path / "out" / "checkpoint-2"))
    resumed = train(rec)["losses"]
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5), step


@needs_deepspeed
def test_zero2_resumes_a_single_process_checkpoint(backbones, shards, reference, tmp_path):
    losses, single = reference
    rec = recipe(
        backbones,
        shards,
        tmp_path / "out",
        parallel="deepspeed",
        deepspeed_config=ZERO2,
        resume=str(single / "checkpoint-2"),  # weights into the fp32 masters, moments into the partitions
    )
    result = launch(rec, tmp_path)
    assert sorted(result["losses"]) == [3, 4]
    for step in (3, 4):
        assert result["losses"][step] == pytest.approx(losses[step], rel=1e-5), step
    assert_same_checkpoint(tmp_path / "out" / f"checkpoint-{STEPS}", single / f"checkpoint-{STEPS}")
    exported, expected = (load_file(p / "final" / "model.safetensors") for p in (tmp_path / "out", single))
    assert set(exported) == set(expected)  # the whole model, tied weights once
    for name in expected:
        torch.testing.assert_close(exported[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@needs_deepspeed
def test_zero3_two_processes_equal_one(backbones, shards, reference, tmp_path):
    losses, single = reference
    result = launch(recipe(backbones, shards, tmp_path / "out", parallel="deepspeed", deepspeed_config=ZERO3), tmp_path)
    for step, loss in losses.items():
        assert result["losses"][step] == pytest.approx(loss, rel=1e-5), step
    ckpt, expected_ckpt = (p / f"checkpoint-{STEPS}" for p in (tmp_path / "out", single))
    weights, expected_weights = (load_file(p / "trainable.safetensors") for p in (ckpt, expected_ckpt))
    assert set(weights) == set(expected_weights)  # gathered from the partitioned parameters
    for name in expected_weights:
        torch.testing.assert_close(weights[name], expected_weights[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.load(ckpt / "state.pt", weights_only=True)["optimizer"] is None  # ZeRO-3 moments: not gathered
    exported, expected = (load_file(p / "final" / "model.safetensors") for p in (tmp_path / "out", single))
    assert set(exported) == set(expected)
    for name in expected:
        torch.testing.assert_close(exported[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)

"""Distributed training on the CPU (gloo): 2-process DDP and FSDP runs follow the single-process
loss curve and reach its weights and optimiser state; checkpoints cross world sizes; gradient
checkpointing changes nothing but memory; DeepSpeed configs and its missing-package error.

The distributed runs use ``data.rank_split="rows"``: every rank reads the single-process stream
of global batches and keeps rows ``rank::2``, so both ranks together compute exactly the batches
of the single-process run, and the comparison is of the same samples.
"""

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interleaf.data.collate import CollateConfig
from interleaf.model.masks import IGNORE_INDEX
from interleaf.processing import Processor
from interleaf.train import parallel
from interleaf.train.config import Recipe, TrainConfig
from interleaf.train.loop import RankRows, build_loader, train

from conftest import TEXTS, encode, tiny_config, tiny_recipe

DISTJOB = Path(__file__).with_name("distjob.py")
CONFIGS = Path(__file__).parents[2] / "configs" / "deepspeed"
STEPS = 4


def recipe(backbones, shards, out_dir, **train) -> Recipe:
    small = CollateConfig(max_tokens=64, max_images=2)
    return tiny_recipe(
        backbones,
        shards,
        out_dir,
        data={"rank_split": "rows", "collate": small},
        optim={"warmup_steps": 1},
        **{"steps": STEPS, "checkpoint_every": 2, **train},
    )


@pytest.fixture(scope="module")
def reference(backbones, shards, tmp_path_factory):
    """The single-process run: its per-step losses and its output directory."""
    out = tmp_path_factory.mktemp("single")
    return train(recipe(backbones, shards, out))["losses"], out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(rec: Recipe, work: Path) -> dict:
    """Run ``rec`` as 2 processes under torchrun; rank 0's result."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(dataclasses.asdict(rec)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += [str(DISTJOB), str(work / "recipe.json"), str(work / "result.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((work / "result.json").read_text())
    result["losses"] = {int(k): v for k, v in result["losses"].items()}
    return result


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same trainable weights, optimiser state (by parameter name) and schedule."""
    wa, wb = load_file(a / "trainable.safetensors"), load_file(b / "trainable.safetensors")
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    assert set(sa["optimizer"]["state"]) == set(wa)  # keyed by parameter name, whatever the strategy
    for name, moments in sa["optimizer"]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[key], sb["optimizer"]["state"][name][key], rtol=1e-4, atol=1e-6)
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]


def test_ddp_two_processes_equal_one(backbones, shards, reference, tmp_path):
    losses, single = reference
    result = launch(recipe(backbones, shards, tmp_path / "out", parallel="ddp"), tmp_path)
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert result["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert_same_checkpoint(tmp_path / "out" / f"checkpoint-{STEPS}", single / f"checkpoint-{STEPS}")
    state = torch.load(tmp_path / "out" / f"checkpoint-{STEPS}" / "state.pt", weights_only=True)
    assert len(state["data"]) == 2 and state["world_size"] == 2  # each rank's loader position
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))  # rank 0 alone writes

    # the 2-process checkpoint resumes in one process, on the same curve
    rec = recipe(backbones, shards, tmp_path / "resumed", resume=str(tmp_path / "out" / "checkpoint-2"))
    resumed = train(rec)["losses"]
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5), step


def test_fsdp_two_processes_resume_a_single_process_checkpoint(backbones, shards, reference, tmp_path):
    losses, single = reference
    rec = recipe(
        backbones,
        shards,
        tmp_path / "out",
        parallel="fsdp",
        gradient_checkpointing=True,  # composes with FSDP, changes nothing
        resume=str(single / "checkpoint-2"),
    )
    result = launch(rec, tmp_path)
    assert sorted(result["losses"]) == [3, 4]
    for step in (3, 4):
        assert result["losses"][step] == pytest.approx(losses[step], rel=1e-5), step
    assert_same_checkpoint(tmp_path / "out" / f"checkpoint-{STEPS}", single / f"checkpoint-{STEPS}")
    exported, expected = (load_file(p / "final" / "model.safetensors") for p in (tmp_path / "out", single))
    assert set(exported) == set(expected)  # whole (gathered) model, tied weights once
    for name in expected:
        torch.testing.assert_close(exported[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_rank_rows_partition_the_global_batch(backbones, shards):
    rec = recipe(backbones, shards, "unused")
    processor = Processor.from_backbones(rec.model.lm.source, rec.model.vision.source)
    whole = next(iter(build_loader(rec.data, processor)))
    parts = [next(iter(build_loader(rec.data, processor, rank=r, world_size=2))) for r in (0, 1)]
    assert all(isinstance(build_loader(rec.data, processor, rank=r, world_size=2), RankRows) for r in (0, 1))
    assert whole.keys() == parts[0].keys() == parts[1].keys() and "image_keys" in whole
    for key, value in whole.items():
        same = torch.equal if isinstance(value, torch.Tensor) else lambda a, b: a == b
        assert same(value[0::2], parts[0][key]) and same(value[1::2], parts[1][key]), key
    shard_rows = dataclasses.replace(rec.data, rank_split="shards")
    assert len(next(iter(build_loader(shard_rows, processor, rank=1, world_size=2)))["input_ids"]) == 2
    with pytest.raises(ValueError, match=r"^data.batch_size=4 is the global batch: [^\n]*3 processes$"):
        build_loader(rec.data, processor, rank=0, world_size=3)


def test_strategy_choice():
    assert parallel.strategy("auto", 1) == "none" and parallel.strategy("auto", 4) == "ddp"
    assert parallel.strategy("fsdp", 2) == "fsdp" and parallel.strategy("fsdp", 1) == "none"
    with pytest.raises(ValueError, match=r"^train.parallel=none but 2 processes[^\n]*$"):
        parallel.strategy("none", 2)


def test_deepspeed_configs_and_missing_package(monkeypatch):
    for name, stage in (("zero2.json", 2), ("zero3.json", 3)):
        config = json.loads((CONFIGS / name).read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == "auto"  # filled in from the recipe
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(RuntimeError) as info:
        parallel.strategy("deepspeed", 2)
    message = str(info.value)
    assert "\n" not in message and "deepspeed" in message and "pip install deepspeed" in message
    with pytest.raises(RuntimeError, match="pip install deepspeed"):
        train(Recipe(train=TrainConfig(parallel="deepspeed", deepspeed_config=str(CONFIGS / "zero2.json"))))


def loss_and_grads(model, checkpointing: bool):
    ids, mask, pixels = encode(model, TEXTS, padding_side="right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    if checkpointing:
        parallel.apply_checkpointing(model)
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    model.train()  # GPT-2's dropout on: the recomputation must replay its random masks
    torch.manual_seed(1)
    loss = model(ids, mask, pixels, labels=labels).loss
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mpt"])
def test_gradient_checkpointing_changes_nothing(backbones, make_model, family):
    tiny_config(backbones, family)  # backbones built (and the RNG drawn) before both models are seeded
    loss, grads, calls = loss_and_grads(make_model(family), checkpointing=False)
    ckpt_loss, ckpt_grads, ckpt_calls = loss_and_grads(make_model(family), checkpointing=True)
    assert (calls, ckpt_calls) == (1, 2)  # the block ran again in backward: recomputed, not stored
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-5, atol=1e-6)
    assert set(ckpt_grads) == set(grads) and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)

"""The training loop: loss falls, frozen weights stay, checkpoints resume exactly."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from interleaf.model.flamingo import Flamingo
from interleaf.train import loop as loop_module
from interleaf.train.checkpoints import init_weights
from interleaf.train.config import Recipe
from interleaf.train.loop import train

from conftest import SignalAfter, tiny_config, tiny_recipe


def recipe(backbones, shards, out_dir, **train) -> Recipe:
    return tiny_recipe(backbones, shards, out_dir, **train)


def test_loss_falls_and_frozen_weights_stay(backbones, make_model, shards, tmp_path):
    model = make_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rec = recipe(backbones, shards, tmp_path, steps=30, checkpoint_every=10, keep_last=2)
    rec = dataclasses.replace(rec, optim=dataclasses.replace(rec.optim, lr=1e-2))
    result = train(rec, model=model)
    losses = [result["losses"][s] for s in range(1, 31)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses  # only the new layers learn
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    assert not list(tmp_path.glob(".tmp-*"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert set(records[0]) == {"step", "loss", "lr", "tokens", "seconds"}
    assert (result["final"] / "model.safetensors").exists() and (result["final"] / "processor_config.json").exists()


def test_in_backward_steps_as_the_optimizer_would_after_it(backbones, make_model, shards, tmp_path, monkeypatch):
    """optim.in_backward: every weight stepped during the backward pass, as soon as its gradient is
    complete, with only that gradient alive; a full fine-tune's losses and weights are bit-identical
    to stepping after the backward (the same AdamW arithmetic on the same gradients), and the model
    handed back steps nothing on its own."""
    from interleaf.config import TrainableConfig
    from interleaf.train.config import OptimConfig

    def run(out, in_backward, model):
        optim = {"grad_clip": 0.0, "accumulation": 1, "in_backward": in_backward, "weight_decay": 0.1}
        return model, train(recipe(backbones, shards, out, steps=4, optim=optim), model=model)

    full = TrainableConfig(lm=True, new_token_embeddings=True)
    make_model()  # the backbones are built (drawing random numbers) before the two models
    plain_model, plain = run(tmp_path / "plain", False, make_model(trainable=full))
    model = make_model(trainable=full)
    trained = [p for p in model.parameters() if p.requires_grad]
    alive = []
    step = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        alive.append(sum(p.grad is not None for p in trained))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    model, result = run(tmp_path / "in-backward", True, model)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert len(alive) == 4 * len(trained) and set(alive) == {1}  # one step per weight, one gradient alive
    assert result["losses"] == plain["losses"]
    for (name, a), b in zip(model.named_parameters(), plain_model.parameters()):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in trained)
    before = [p.detach().clone() for p in trained]
    ids = torch.tensor([[1, 5, 6, 7]])
    model(ids, labels=ids).loss.backward()  # the hooks are gone: a gradient, no step
    assert all(torch.equal(p, q) for p, q in zip(trained, before)) and any(p.grad is not None for p in trained)

    with pytest.raises(ValueError, match="no global gradient norm to clip: set optim.grad_clip: 0"):
        OptimConfig(in_backward=True)
    with pytest.raises(ValueError, match="set optim.accumulation: 1 \\(it is 2\\)"):
        OptimConfig(in_backward=True, grad_clip=0, accumulation=2)


def run_interrupted(backbones, make_model, shards, out_dir, stop_at: int, **train_kw):
    """Train to 12 steps, killed by SIGTERM at step ``stop_at``; returns the first call's result."""
    rec = recipe(backbones, shards, out_dir, steps=12, **train_kw)
    model = make_model()
    processor = loop_module.Processor.from_backbones(rec.model.lm.source, rec.model.vision.source)
    loader = SignalAfter(loop_module.build_loader(rec.data, processor), at=stop_at * rec.optim.accumulation)
    return rec, train(rec, model=model, processor=processor, loader=loader)


def test_sigterm_then_resume_equals_uninterrupted(backbones, make_model, shards, tmp_path):
    full = train(recipe(backbones, shards, tmp_path / "full", steps=12, checkpoint_every=4), model=make_model())
    rec, first = run_interrupted(backbones, make_model, shards, tmp_path / "cut", 6, checkpoint_every=4)
    assert first["stopped"] and first["step"] == 6 and first["final"] is None
    assert first["checkpoint"].name == "checkpoint-6"
    second = train(rec, model=make_model())
    assert sorted(second["losses"]) == list(range(7, 13))
    for step in range(1, 13):
        seen = first["losses"].get(step, second["losses"].get(step))
        assert seen == pytest.approx(full["losses"][step], abs=1e-6), step
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))


def test_truncated_checkpoint_falls_back_to_the_previous(backbones, make_model, shards, tmp_path):
    full = train(recipe(backbones, shards, tmp_path / "full", steps=12, checkpoint_every=4), model=make_model())
    rec, first = run_interrupted(backbones, make_model, shards, tmp_path / "cut", 6, checkpoint_every=4)
    damaged = first["checkpoint"] / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.warns(UserWarning, match="checkpoint-6"):
        second = train(rec, model=make_model())
    assert sorted(second["losses"]) == list(range(5, 13))
    for step in range(5, 13):
        assert second["losses"][step] == pytest.approx(full["losses"][step], abs=1e-6), step


def test_bf16_run_built_from_the_recipe_alone(backbones, shards, tmp_path):
    rec = recipe(backbones, shards, tmp_path, steps=2, checkpoint_every=2)
    rec = dataclasses.replace(rec, train=dataclasses.replace(rec.train, precision="bf16"))
    result = train(rec)
    assert result["step"] == 2 and (tmp_path / "checkpoint-2").is_dir()
    assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())


def test_a_stage_starts_from_the_previous_stage_export(backbones, shards, tmp_path):
    """train.init_from: stage 2 begins with stage 1's weights (and may train more of them)."""
    first = recipe(backbones, shards, tmp_path / "one", steps=2)
    train(first)
    exported = load_file(tmp_path / "one" / "final" / "model.safetensors")

    config = tiny_config(backbones)
    config = dataclasses.replace(config, trainable=dataclasses.replace(config.trainable, lm=True))
    second = recipe(backbones, shards, tmp_path / "two", steps=1)
    second = dataclasses.replace(second, model=config)
    model = Flamingo.from_config(config)
    copied = init_weights(model, tmp_path / "one" / "final")
    assert set(copied) == {n for n, _ in model.named_parameters()} <= set(exported)
    for name, param in model.named_parameters():
        assert torch.equal(param, exported[name]), name

    # through the recipe: the first step's loss is the one the exported model gives
    init = dataclasses.replace(second.train, init_from=str(tmp_path / "one" / "final"), resume="never")
    result = train(dataclasses.replace(second, train=init))
    assert result["step"] == 1 and result["losses"][1] < 10

    with pytest.raises(ValueError, match=r"init_from: .*nothing is not a directory"):
        init_weights(model, tmp_path / "nothing")
    partial = {k: v for k, v in exported.items() if ".xattn." not in k}
    save_file(partial, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="has no weight .*xattn"):
        init_weights(model, tmp_path)

"""Training a model that draws: the text and diffusion losses in one step, logged apart; the
trainability policy covers the decoder; an interrupted run resumes exactly (the diffusion
noise and timesteps come from the checkpointed RNG); the frozen-feature cache gives the same
losses; a text-only stage's export starts a drawing stage."""

import dataclasses
import json

import pytest
import torch

from interleaf.config import TrainableConfig
from interleaf.data import tinyworld
from interleaf.data.shards import write_shards
from interleaf.model.flamingo import Flamingo
from interleaf.train import loop as loop_module
from interleaf.train.loop import train

from conftest import SignalAfter, tiny_config, tiny_recipe
from drawhelp import draw_config


@pytest.fixture(scope="module")
def draw_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("draw-shards")
    docs = tinyworld.iter_train_documents(seed=0, n=32, mix={"story": 0.6, "variation": 0.2, "interleaved": 0.2})
    write_shards(docs, out, max_samples=16)
    return str(out)


def draw_recipe(backbones, shards, out_dir, **train):
    rec = tiny_recipe(backbones, shards, out_dir, **train)
    return dataclasses.replace(rec, model=draw_config(backbones, rec.model))


def build(rec):
    torch.manual_seed(0)
    return Flamingo.from_config(rec.model)


def test_both_losses_train_and_are_logged(backbones, draw_shards, tmp_path):
    rec = draw_recipe(backbones, draw_shards, tmp_path, steps=3)
    model = build(rec)
    unet = {n: p.detach().clone() for n, p in model.image_generator.named_parameters()}
    train(rec, model=model)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"text_loss", "image_loss"} <= set(records[0])
    for r in records:  # loss = text + 10 x image, each the mean of the step's micro-batches
        assert r["loss"] == pytest.approx(r["text_loss"] + 10 * r["image_loss"], rel=0.25)
    changed = [n for n, p in model.image_generator.named_parameters() if not torch.equal(p, unet[n])]
    assert len(changed) == len(unet)


def test_the_policy_can_freeze_the_decoder(backbones, draw_shards, tmp_path):
    rec = draw_recipe(backbones, draw_shards, tmp_path, steps=1)
    rec = dataclasses.replace(
        rec, model=dataclasses.replace(rec.model, trainable=TrainableConfig(image_generation=False))
    )
    model = build(rec)
    assert not any(p.requires_grad for p in model.image_generator.parameters())


def test_sigterm_then_resume_equals_uninterrupted(backbones, draw_shards, tmp_path):
    rec = draw_recipe(backbones, draw_shards, tmp_path / "full", steps=6, checkpoint_every=3)
    full = train(rec, model=build(rec))
    rec = draw_recipe(backbones, draw_shards, tmp_path / "cut", steps=6, checkpoint_every=3)
    model = build(rec)
    processor = loop_module.Processor.from_backbones(
        rec.model.lm.source, rec.model.vision.source, tokens=rec.model.tokens
    )
    loader = SignalAfter(loop_module.build_loader(rec.data, processor), at=3 * rec.optim.accumulation)
    first = train(rec, model=model, processor=processor, loader=loader)
    assert first["stopped"] and first["step"] == 3
    second = train(rec, model=build(rec))
    for step in range(1, 7):
        seen = first["losses"].get(step, second["losses"].get(step))
        assert seen == pytest.approx(full["losses"][step], abs=1e-6), step


def test_the_feature_cache_gives_the_same_losses(backbones, draw_shards, tmp_path):
    plain = train(draw_recipe(backbones, draw_shards, tmp_path / "plain", steps=3), model=None)["losses"]
    rec = draw_recipe(backbones, draw_shards, tmp_path / "cached", steps=3, feature_cache=str(tmp_path / "feats"))
    cached = train(rec, model=None)["losses"]
    # features computed in the same batches as without the cache (every lookup a miss, in the
    # training batch): the same computation; 1e-6 relative covers any last-bit difference
    assert cached == pytest.approx(plain, rel=1e-6, abs=0)


def test_a_text_only_export_starts_a_drawing_stage(backbones, shards, draw_shards, tmp_path):
    text = train(tiny_recipe(backbones, shards, tmp_path / "text", steps=1), model=None)
    rec = draw_recipe(backbones, draw_shards, tmp_path / "draw", steps=1, init_from=str(text["final"]))
    result = train(rec, model=None)
    loaded = Flamingo.from_pretrained(result["final"])
    assert loaded.image_generator is not None and loaded.config.tokens.begin_of_image == tinyworld.BEGIN_OF_IMAGE
    base = tiny_config(backbones)
    assert loaded.config.lm.added_tokens[:3] == Flamingo.from_config(base).config.lm.added_tokens

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from interleaf import Flamingo, FlamingoConfig, Processor
from interleaf.config import LMConfig, ResamplerConfig, VisionConfig
from interleaf.model.checkpoint import WEIGHTS

from conftest import TEXTS, encode, open_gates


def logits(model):
    ids, mask, pixels = encode(model, TEXTS)
    with torch.no_grad():
        return model(ids, mask, pixels).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "mpt"])
def test_full_round_trip_gives_identical_logits(make_model, tmp_path, family):
    model = make_model(family)
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert {"config.json", "model.safetensors", "lm_config.json", "vision_config.json", "tokenizer.json"} <= set(files)
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.config == model.config
    assert loaded.trainable_names == model.trainable_names


def test_trainable_only_checkpoint_references_backbones(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "small", trainable_only=True)
    small = (tmp_path / "small" / WEIGHTS).stat().st_size
    assert small < (tmp_path / "full" / WEIGHTS).stat().st_size
    loaded = Flamingo.from_pretrained(tmp_path / "small")
    assert torch.equal(logits(loaded), logits(model))


def test_trainable_only_needs_named_backbones(backbones, tmp_path):
    from transformers import AutoImageProcessor

    from interleaf.model.checkpoint import load_lm_and_tokenizer
    from interleaf.model.vision import load_tower

    lm, tok = load_lm_and_tokenizer(backbones("lm", "llama"))
    tower = load_tower(backbones("vision", "clip"))
    anonymous = Flamingo(FlamingoConfig(), lm=lm, vision_tower=tower, tokenizer=tok)
    with pytest.raises(ValueError, match="the model has no image processor"):
        anonymous.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    anonymous.image_processor = AutoImageProcessor.from_pretrained(backbones("vision", "clip"))
    with pytest.raises(ValueError, match="config.lm.source is empty"):
        anonymous.save_pretrained(tmp_path / "x", trainable_only=True)
    anonymous.save_pretrained(tmp_path / "y")  # a full checkpoint is self-contained
    assert Flamingo.from_pretrained(tmp_path / "y").config.lm.source == ""


def copy_backbones(backbones, where):
    for what, name in (("lm", "llama"), ("vision", "clip")):
        shutil.copytree(backbones(what, name), where / what)


@pytest.mark.parametrize("trainable_only", [False, True])
def test_checkpoints_load_from_another_working_directory(make_model, backbones, tmp_path, monkeypatch, trainable_only):
    """Backbones named by relative paths: saved absolute (outside the checkpoint) or relative
    to the checkpoint (inside it, so the directory can move)."""
    base = make_model()
    reference, base = logits(base), base.config
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy_backbones(backbones, work / "bb")
    copy_backbones(backbones, work / "ckpt-in" / "backbones")
    monkeypatch.chdir(work)
    for ckpt, lm, vision in (
        ("ckpt-out", "bb/lm", "bb/vision"),
        ("ckpt-in", "ckpt-in/backbones/lm", "ckpt-in/backbones/vision"),
    ):
        config = dataclasses.replace(base, lm=LMConfig(source=lm), vision=VisionConfig(source=vision))
        torch.manual_seed(0)
        model = Flamingo.from_config(config)
        open_gates(model)
        model.save_pretrained(ckpt, trainable_only=trainable_only)
    saved = {name: json.loads((work / name / "config.json").read_text()) for name in ("ckpt-out", "ckpt-in")}
    assert saved["ckpt-out"]["lm"]["source"] == str(work / "bb" / "lm")
    assert saved["ckpt-in"]["vision"]["source"] == "./backbones/vision"

    monkeypatch.chdir(elsewhere)
    shutil.move(work / "ckpt-in", elsewhere / "moved")
    for path in (work / "ckpt-out", elsewhere / "moved"):
        loaded = Flamingo.from_pretrained(path)
        # the same weights on the same batch and shapes, read back from disk
        assert torch.equal(logits(loaded), reference)
        assert Path(loaded.config.vision.source).is_absolute()
        assert Processor.from_pretrained(path)(["a"])["input_ids"].shape[0] == 1
    loaded.save_pretrained(elsewhere / "again", trainable_only=trainable_only)  # and saves again from there
    assert torch.equal(logits(Flamingo.from_pretrained(elsewhere / "again")), reference)


def test_a_full_checkpoint_needs_nothing_else(make_model, backbones, tmp_path, monkeypatch):
    copy_backbones(backbones, tmp_path / "bb")
    config = dataclasses.replace(
        make_model().config,
        lm=LMConfig(source=str(tmp_path / "bb" / "lm")),
        vision=VisionConfig(source=str(tmp_path / "bb" / "vision")),
    )
    torch.manual_seed(0)
    model = Flamingo.from_config(config)
    model.save_pretrained(tmp_path / "ckpt")
    expected = logits(model)
    shutil.rmtree(tmp_path / "bb")
    monkeypatch.chdir(tmp_path)
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), expected)
    processor = Processor.from_pretrained(tmp_path / "ckpt")
    assert processor.image_processor.to_dict() == model.image_processor.to_dict()


def test_truncated_weights_are_a_clear_error(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt or unreadable weights"):
        Flamingo.from_pretrained(tmp_path / "ckpt")


def test_missing_files_and_paths(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        Flamingo.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="does-not-exist: no such directory"):
        Flamingo.from_pretrained(tmp_path / "does-not-exist")


def edit_config(path, **changes):
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path.write_text(json.dumps(data))


def test_mismatched_checkpoint_names_the_keys(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "ckpt")
    edit_config(tmp_path / "ckpt" / "config.json", resampler__depth=3)
    with pytest.raises(ValueError, match=r"missing key\(s\): resampler\.layers\.2\."):
        Flamingo.from_pretrained(tmp_path / "ckpt")
    edit_config(tmp_path / "ckpt" / "config.json", resampler__depth=1)
    with pytest.raises(ValueError, match=r"unexpected key\(s\): resampler\.layers\.1\."):
        Flamingo.from_pretrained(tmp_path / "ckpt")
    edit_config(tmp_path / "ckpt" / "config.json", resampler__depth=2, resampler__num_latents=5)
    with pytest.raises(
        ValueError, match=r"shape mismatch\(es\): resampler.latents: checkpoint \(4, 32\) vs model \(5, 32\)"
    ):
        Flamingo.from_pretrained(tmp_path / "ckpt")
    edit_config(tmp_path / "ckpt" / "config.json", resampler__num_latents=4, resampler__bogus=1)
    with pytest.raises(ValueError, match="config.json: resampler: unknown key 'bogus'"):
        Flamingo.from_pretrained(tmp_path / "ckpt")


def test_save_load_keeps_opened_gates_and_dtype(make_model, tmp_path):
    model = make_model(resampler=ResamplerConfig(depth=1, num_latents=4, heads=2, head_dim=8))
    open_gates(model, attn=0.3, ff=-0.2, seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.blocks[0].attn_gate.float(), model.blocks[0].attn_gate.bfloat16().float())


def test_model_checkpoint_carries_its_processor(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    processor = Processor.from_pretrained(tmp_path / "ckpt")
    ids, mask, _ = encode(model, TEXTS)
    batch = processor([[text] if "<image>" not in text else text for text in TEXTS[2:]])
    assert batch["input_ids"].tolist()[0] == ids[2][mask[2].bool()].tolist()


def test_bfloat16_checkpoint_round_trip(make_model, tmp_path):
    model = make_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))
    # buffers (rotary frequencies) are rebuilt in float32 on load, where .to() had rounded them
    assert torch.allclose(logits(loaded).float(), logits(model).float(), atol=2e-2)

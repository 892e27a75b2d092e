"""Tiny backbone pretraining: the world as text, a tokenizer, an LM and a CLIP vision tower
that learn, saved in the Hugging Face formats that a Flamingo then loads."""

import pytest
import torch
import transformers

from interleaf.config import CrossAttentionConfig, FlamingoConfig, LMConfig, ResamplerConfig, VisionConfig
from interleaf.data.tinyworld import Scene, caption, iter_train_documents
from interleaf.model.flamingo import Flamingo
from interleaf.train.backbones import (
    LMPretraining,
    VisionPretraining,
    document_text,
    pretrain_lm,
    pretrain_vision,
    scene_pairs,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def docs():
    return list(iter_train_documents(seed=0, n=60))


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_tokenizer([document_text(d) for d in docs], vocab_size=400)


def test_document_text_writes_each_picture_as_its_caption(docs):
    doc = next(d for d in docs if d.meta["kind"] == "icl" and d.meta["rule"] == "words")
    text = document_text(doc)
    scenes = [Scene.from_dict(s.image.meta["scene"]) for s in doc.segments if s.image is not None]
    lines = text.splitlines()
    assert len(lines) == len(scenes)
    for line, scene, word in zip(lines, scenes, [s.text for s in doc.segments if s.text is not None]):
        assert line == f"{caption(scene)} {word}"
    chat = next(d for d in docs if d.is_chat)
    assert "user: " in document_text(chat) and "assistant: " in document_text(chat)


def test_document_text_refuses_an_image_without_a_scene():
    doc = next(iter_train_documents(seed=0, n=1))
    next(s for s in doc.segments if s.image is not None).image.meta.pop("scene")
    with pytest.raises(ValueError, match="without a scene"):
        document_text(doc)


def test_tokenizer_is_trained_on_the_world(tokenizer):
    assert len(tokenizer) == 400 and tokenizer.eos_token == "</s>" and tokenizer.chat_template
    # the world's frequent words are single tokens
    assert len(tokenizer.tokenize(" circle")) == 1 and len(tokenizer.tokenize(" background")) == 1


def test_pretrained_lm_learns_and_loads_as_a_flamingo_backbone(docs, tokenizer, tmp_path):
    texts = [document_text(d) for d in docs]
    cfg = LMPretraining(hidden=32, layers=2, heads=2, seq_len=64, batch_size=8, steps=40, warmup=4)
    losses = pretrain_lm(texts, tokenizer, tmp_path / "lm", cfg, progress=False)
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert lm.config.model_type == "llama" and lm.config.vocab_size == len(tokenizer)

    vcfg = VisionPretraining(hidden=32, layers=1, text_hidden=32, embed_dim=16, batch_size=16, steps=30, warmup=3)
    vision_losses = pretrain_vision(scene_pairs(0), tokenizer, tmp_path / "vision", vcfg, progress=False)
    assert sum(vision_losses[-5:]) / 5 < 0.8 * vision_losses[0]
    tower = transformers.CLIPVisionModel.from_pretrained(tmp_path / "vision")
    assert tower.config.hidden_size == 32

    model = Flamingo.from_config(
        FlamingoConfig(
            lm=LMConfig(source=str(tmp_path / "lm")),
            vision=VisionConfig(source=str(tmp_path / "vision")),
            resampler=ResamplerConfig(depth=1, num_latents=4, heads=2, head_dim=8),
            cross_attention=CrossAttentionConfig(interval=1, heads=2, head_dim=8),
        )
    )
    # the Flamingo's LM is exactly the pretrained one (all gates start at zero)
    ids = torch.tensor([tokenizer("a large red star on a grey background.")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits[..., : len(tokenizer)], lm(ids).logits, atol=1e-5)


def test_shape_negatives_differ_from_their_scene_in_shape_alone():
    """Each hard negative keeps places, colours, sizes, counts and background, changes every
    group's shape, and stays within the training combinations (held-out ones stay unseen)."""
    import itertools
    import random

    from interleaf.data.tinyworld import TRAIN_COMBOS, random_scene
    from interleaf.train.backbones import _shape_swapped

    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng)
        other = _shape_swapped(scene, rng)
        backdrop = (scene.background, scene.style, scene.texture_seed)
        assert (other.background, other.style, other.texture_seed) == backdrop
        assert len(other.groups()) == len(scene.groups())  # two groups never merge
        for a, b in zip(scene.things, other.things):
            assert (a.colour, a.size, a.position, a.jitter) == (b.colour, b.size, b.position, b.jitter)
            assert b.shape != a.shape and (b.colour, b.shape) in TRAIN_COMBOS  # every colour has 3+ shapes
    plain = [c for _, c in itertools.islice(scene_pairs(3), 2)]
    paired = [c for _, c in itertools.islice(scene_pairs(3, shape_negatives=True), 4)]
    assert plain[0] == paired[0] and paired[1] != paired[0]  # the same scenes, each followed by its negative

"""The frozen-feature cache: a hit returns exactly the features its miss computed, so features,
losses and gradients are bit-identical to the uncached model's on the same batch, and close (within
rounding) where the features were computed in a batch of another shape; hits skip the tower; the
cache persists, refuses another encoder or a trainable one, and leaves checkpoints alone.

Bit-identity is asserted only between runs of the same computation on the same shapes: a tower
run on a batch of another size may block its matmuls differently (MKL/oneDNN, per CPU), so its
last bits may differ there."""

import json

import pytest
import torch

from interleaf.config import TrainableConfig
from interleaf.data.collate import CollateConfig
from interleaf.data.shards import write_shards
from interleaf.data.tinyworld import iter_train_documents
from interleaf.model.vision import VisionEncoder
from interleaf.processing import Processor
from interleaf.train.config import Recipe
from interleaf.train.features import (
    MANIFEST,
    CachedVision,
    FeatureCache,
    feature_cache,
    precompute,
    remove_feature_cache,
    use_feature_cache,
    vision_fingerprint,
)
from interleaf.train.loop import train

from conftest import TEXTS, encode, tiny_recipe

DOCS = 8


class TowerCalls:
    """Counts the calls of ``model.vision.tower`` (a forward hook)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.vision.tower.register_forward_hook(self.hook)

    def hook(self, *_):
        self.count += 1


def outputs(model, ids, mask, pixels):
    """Latents, loss and the resampler's gradient of one forward/backward."""
    model.zero_grad(set_to_none=True)
    latents = model.encode_images(ids, pixels)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return latents.detach(), loss.detach(), grads


def assert_same(a, b):
    """Bit-identical: only for two runs on the same batch (same shapes, same tower batches)."""
    latents_a, loss_a, grads_a = a
    latents_b, loss_b, grads_b = b
    assert torch.equal(latents_a, latents_b)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_bit_identical_and_hits_skip_the_tower(make_model, tmp_path):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    n_images = int((ids == model.ids.image).sum())
    reference = outputs(model, ids, mask, pixels)
    real = pixels[:, :2].flatten(0, 1)  # the 3 real images (slots 0-2), then 3 slots no sample uses
    reference_features = model.vision(real)  # one tower batch of 6

    cache = FeatureCache.for_model(tmp_path / "feats", model)
    use_feature_cache(model, cache)
    calls = TowerCalls(model)
    # the misses run the tower on the same batch of 3 real images as the uncached forwards, and the
    # hits return those stored bytes: the same computation on the same shapes, so bit-identical
    assert_same(outputs(model, ids, mask, pixels), reference)  # misses, then hits (two forwards)
    assert calls.count == 1 and cache.misses == n_images and cache.hits == n_images
    calls.count = 0
    assert_same(outputs(model, ids, mask, pixels), reference)
    assert calls.count == 0 and cache.misses == n_images

    # a batch of hits and misses, straight through model.vision
    mixed = model.vision(real)
    assert calls.count == 1  # the image slots no sample uses were misses, computed in one tower call
    again = model.vision(real)  # hits only: exactly the tensors stored
    assert torch.equal(again, mixed) and calls.count == 1
    encoder = model.vision.encoder
    with torch.no_grad():
        # a hit is bit-identical to what its miss computed (the tower on the 3 real images) ...
        assert torch.equal(mixed[:3], encoder(real[:3]))
        # ... and the misses are computed together, in a tower batch of their own
        assert torch.equal(mixed[3:], encoder(real[3:]))
    # versus one tower batch of all 6: a batch of another shape, so matmul blocking differs across
    # CPUs and the last bits may too (features are O(1): float32 rounding is ~1e-6)
    torch.testing.assert_close(mixed, reference_features, rtol=1e-5, atol=1e-5)


def test_persisted_and_read_by_a_fresh_cache(make_model, tmp_path):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    reference = outputs(model, ids, mask, pixels)
    with feature_cache(model, FeatureCache.for_model(tmp_path, model)):
        outputs(model, ids, mask, pixels)
    n_images = int((ids == model.ids.image).sum())
    assert json.loads((tmp_path / MANIFEST).read_text())["fingerprint"] == vision_fingerprint(model)
    assert not list(tmp_path.rglob(".*.tmp"))

    fresh_model = make_model()  # same weights, another object
    fresh = FeatureCache.for_model(tmp_path, fresh_model)
    assert len(fresh) == n_images
    use_feature_cache(fresh_model, fresh)
    calls = TowerCalls(fresh_model)
    # the entries on disk were computed on the same batch as the reference: bit-identical
    assert_same(outputs(fresh_model, ids, mask, pixels), reference)
    assert calls.count == 0 and fresh.misses == 0 and fresh.memory_hits == n_images  # disk, then memory


def test_refuses_another_encoder(make_model, tmp_path):
    model = make_model()
    FeatureCache.for_model(tmp_path, model)
    with pytest.raises(ValueError, match=f"feature cache {tmp_path} was made by another vision encoder"):
        FeatureCache(tmp_path, "0" * 32)
    other = make_model()
    with torch.no_grad():
        other.vision.tower.post_layernorm.weight.add_(1.0)  # other weights: another fingerprint
    assert vision_fingerprint(other) != vision_fingerprint(model)
    with pytest.raises(ValueError, match=str(tmp_path)):
        FeatureCache.for_model(tmp_path, other)
    with pytest.raises(ValueError, match=f"feature cache {tmp_path} is for another vision encoder"):
        use_feature_cache(other, FeatureCache.for_model(tmp_path, model))
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "file").write_text("x")
    with pytest.raises(ValueError, match="not a feature cache"):
        FeatureCache(tmp_path / "stray", "0" * 32)


def test_refuses_a_trainable_or_random_encoder(make_model, tmp_path):
    model = make_model(trainable=TrainableConfig(vision=True))
    with pytest.raises(ValueError, match="vision encoder is trainable"):
        use_feature_cache(model, FeatureCache.for_model(tmp_path / "a", model))

    model = make_model()
    use_feature_cache(model, FeatureCache.for_model(tmp_path / "b", model))
    ids, mask, pixels = encode(model, TEXTS)
    model.vision.tower.embeddings.patch_embedding.weight.requires_grad_(True)  # unfrozen after wrapping
    with pytest.raises(ValueError, match="vision encoder is trainable"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    model.vision.tower.embeddings.patch_embedding.weight.requires_grad_(False)
    model.vision.tower.config.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    model.eval()
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def test_names_unchanged_and_unwrap_restores(make_model, tmp_path):
    model = make_model()
    encoder = model.vision
    keys = list(model.state_dict())
    params = [n for n, _ in model.named_parameters()]
    cache = FeatureCache.for_model(tmp_path, model)
    with feature_cache(model, cache) as cached:
        assert model.vision is cached and isinstance(cached, CachedVision) and cached.encoder is encoder
        assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == params
        assert cached.dim == encoder.dim and model.dtype == torch.float32
        model.save_pretrained(tmp_path / "ckpt")
    assert model.vision is encoder
    from safetensors.torch import load_file

    from interleaf.model.checkpoint import WEIGHTS, unique_state_dict

    assert set(load_file(str(tmp_path / "ckpt" / WEIGHTS))) == set(unique_state_dict(model))
    use_feature_cache(model, cache)
    use_feature_cache(model, cache)  # switching caches never nests wrappers
    assert isinstance(remove_feature_cache(model), VisionEncoder) and model.vision is encoder


def test_autocast_is_part_of_the_key(make_model, tmp_path):
    model = make_model()
    pixels = torch.randn(3, 3, 32, 32)
    fp32 = model.vision(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model.vision(pixels)
    assert not torch.equal(reference, fp32)  # autocast changes the bits
    cache = FeatureCache.for_model(tmp_path, model)
    with feature_cache(model, cache):  # every call below is on the same batch of 3: bit-identical
        assert torch.equal(model.vision(pixels), fp32) and torch.equal(model.vision(pixels), fp32)
        assert cache.misses == 3 and cache.hits == 3  # fp32 entries
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first, second = model.vision(pixels), model.vision(pixels)
        assert cache.misses == 6 and cache.hits == 6
    assert first.dtype == second.dtype == reference.dtype and torch.equal(first, reference)
    assert torch.equal(second, reference)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_shards(iter_train_documents(seed=0, n=DOCS), out, max_samples=DOCS)
    return str(out)


def recipe(backbones, shards, out_dir, **train) -> Recipe:
    small = CollateConfig(max_tokens=64, max_images=2)
    return tiny_recipe(
        backbones,
        shards,
        out_dir,
        data={"batch_size": 2, "collate": small},
        optim={"warmup_steps": 1, "accumulation": 1},
        **{"steps": 2, "checkpoint_every": 100, **train},
    )


def test_training_with_the_cache_matches(backbones, make_model, shards, tmp_path):
    rec = recipe(backbones, shards, tmp_path / "plain")
    processor = Processor.from_backbones(rec.model.lm.source, rec.model.vision.source)
    plain = train(rec, model=make_model(), processor=processor)["losses"]

    # precompute half the documents: training then meets hits and misses, in the same batches
    model = make_model()
    cache = FeatureCache.for_model(tmp_path / "feats", model)
    docs = list(iter_train_documents(seed=0, n=DOCS))[::2]
    counts = precompute(model, processor, docs, cache, batch_size=2, collate=rec.data.collate, progress=False)
    assert counts["batches"] == DOCS // 4 and counts["misses"] > 0 and counts["images"] >= counts["misses"]
    cached = use_feature_cache(model, FeatureCache.for_model(tmp_path / "feats", model))
    rec = recipe(backbones, shards, tmp_path / "mixed")
    # the hits were computed in precompute's batches and the misses in tower batches of their own,
    # not in the training batches: other batch shapes, so matmul blocking (and the last bits of the
    # features) may differ across CPUs. Losses ~5.7: 1e-6 relative is a few float32 ulps, far below
    # what a wrong image's features do (~1e-3).
    close = pytest.approx(plain, rel=1e-6, abs=0)
    assert train(rec, model=model, processor=processor)["losses"] == close
    assert cached.cache.hits > 0 and cached.cache.misses > 0

    # a second run over the same data, asked for by the recipe: hits only, the tower never runs,
    # and the model is handed back with its own encoder
    model = make_model()
    encoder, calls = model.vision, TowerCalls(model)
    rec = recipe(backbones, shards, tmp_path / "hits", feature_cache=str(tmp_path / "feats"))
    assert train(rec, model=model, processor=processor)["losses"] == close  # features of other batches, as above
    assert calls.count == 0 and model.vision is encoder

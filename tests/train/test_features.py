"""The frozen-feature cache: a hit returns exactly the features its miss computed, so features,
losses and gradients are bit-identical to the uncached model's on the same batch, and close (within
rounding) where the features were computed in a batch of another shape; hits skip the tower; the
cache persists, refuses another encoder or a trainable one, and leaves checkpoints alone.

Bit-identity is asserted only between runs of the same computation on the same shapes: a tower
run on a batch of another size may block its matmuls differently (MKL/oneDNN, per CPU), so its
last bits may differ there."""

import copy
import io
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
from interleaf.train import features as features_module
from interleaf.train.features import (
    FORMAT,
    MANIFEST,
    CachedFeatures,
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

    # a batch of hits and misses, straight through the cache: (n, F, C, H, W) -> (n, F, P, D)
    cached = model.feature_cache
    mixed = cached(real[:, None])[:, 0]
    assert calls.count == 1  # the image slots no sample uses were misses, computed in one tower call
    again = cached(real[:, None])[:, 0]  # hits only: exactly the tensors stored
    assert torch.equal(again, mixed) and calls.count == 1
    with torch.no_grad():
        # a hit is bit-identical to what its miss computed (the tower on the 3 real images) ...
        assert torch.equal(mixed[:3], model.vision(real[:3]))
        # ... and the misses are computed together, in a tower batch of their own
        assert torch.equal(mixed[3:], model.vision(real[3:]))
    # versus one tower batch of all 6: a batch of another shape, so matmul blocking differs across
    # CPUs and the last bits may too (features are O(1): float32 rounding is ~1e-6)
    torch.testing.assert_close(mixed, reference_features, rtol=1e-5, atol=1e-5)


def test_pipeline_keys_replace_pixel_hashing(make_model, tmp_path, monkeypatch):
    """With the batch's image_keys the step hashes no pixels and copies none to the host; the keys
    decide the entries, so two images with one key share one entry (the pipeline's promise: equal
    keys, equal pixels)."""
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    reference = outputs(model, ids, mask, pixels)
    keys = [["a0", "a1"], ["b0"], []]
    cached = use_feature_cache(model, FeatureCache.for_model(tmp_path, model))

    def no_pixel_hash(*_):
        raise AssertionError("pixels hashed although the batch carries image_keys")

    monkeypatch.setattr(features_module, "image_key", no_pixel_hash)
    model.zero_grad(set_to_none=True)
    labels = ids.masked_fill(mask == 0, -100)
    for _ in range(2):  # misses, then hits: the same bits as without the cache
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, image_keys=keys)
        out.loss.backward()
        assert torch.equal(out.loss.detach(), reference[1])
    assert cached.cache.misses == 3 and cached.cache.hits == 3
    # the keys, not the pixels, name the entries: other pixels under the same keys read the stored features
    assert torch.equal(model.encode_images(ids, pixels * 2, image_keys=keys), reference[0])
    # keys beyond a row's images are ignored (the collator never writes them; a processor batch has slots)
    assert torch.equal(model.encode_images(ids, pixels, image_keys=[["a0", "a1", "x"], ["b0", "y"], ["z"]]), reference[0])

    for bad, match in [
        ([["a0", "a1"], ["b0"]], "image_keys hold 2 samples for 3 samples"),
        ([["a0"], ["b0"], []], "sample 0 has 2 <image> tokens but image_keys name 1"),
        ([["a0", "a1"], [7], []], "sample 1 has 1 <image> tokens"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.encode_images(ids, pixels, image_keys=bad)
    remove_feature_cache(model)
    # without a cache the keys are not read at all
    assert torch.equal(model.encode_images(ids, pixels, image_keys=[["bad"]]), reference[0])


def test_collator_keys_follow_the_images(make_model, backbones):
    """image_keys name each row's images in order, through truncation and packing; equal bytes give
    equal keys, other bytes or another image transform other keys."""
    from interleaf.data.collate import Collator
    from interleaf.data.schema import Document, ImageRef, Segment
    from interleaf.images import source_key, transform_fingerprint

    model = make_model()
    processor = Processor(model.tokenizer, model.image_processor)
    images = [ImageRef(data=d) for d in _pngs(3)]

    def doc(i, refs):
        segs = [s for r in refs for s in (Segment(image=r), Segment(text=f" picture {i} is fine."))]
        return Document(id=f"d{i}", segments=segs)

    transform = transform_fingerprint(model.image_processor)
    key = [source_key(r.data, transform) for r in images]
    assert len(set(key)) == 3
    batch = Collator(processor, CollateConfig(max_tokens=64))([doc(0, images[:2]), doc(1, [images[2], images[0]])])
    assert batch["image_keys"] == [[key[0], key[1]], [key[2], key[0]]]
    packed = Collator(processor, CollateConfig(max_tokens=256, pack=True))([doc(0, images[:2]), doc(1, images[2:])])
    assert packed["image_keys"] == [[key[0], key[1], key[2]]]
    capped = Collator(processor, CollateConfig(max_tokens=64, max_images=1))([doc(0, images[:2])])
    assert capped["image_keys"] == [[key[0]]]
    counts = (batch["input_ids"] == processor.ids.image).sum(-1).tolist()
    assert counts == [len(k) for k in batch["image_keys"]]
    other = copy.deepcopy(model.image_processor)
    other.image_mean = [0.0, 0.0, 0.0]
    assert transform_fingerprint(other) != transform
    assert Collator(Processor(model.tokenizer, other))([doc(0, images[:1])])["image_keys"][0][0] != key[0]


def _pngs(n):
    from PIL import Image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_refuses_a_cache_of_another_format(make_model, tmp_path):
    model = make_model()
    FeatureCache.for_model(tmp_path, model)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "format": FORMAT - 1}))
    with pytest.raises(ValueError, match=f"has format {FORMAT - 1}"):
        FeatureCache.for_model(tmp_path, model)


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
        assert model.feature_cache is cached and isinstance(cached, CachedFeatures) and cached.encoder is encoder
        assert model.vision is encoder  # nothing swapped
        assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == params
        model.save_pretrained(tmp_path / "ckpt")
    assert model.feature_cache is None and model.vision is encoder
    from safetensors.torch import load_file

    from interleaf.model.checkpoint import WEIGHTS, unique_state_dict

    assert set(load_file(str(tmp_path / "ckpt" / WEIGHTS))) == set(unique_state_dict(model))
    first = use_feature_cache(model, cache)
    with feature_cache(model, FeatureCache.for_model(tmp_path / "other", model)) as inner:
        assert model.feature_cache is inner
    assert model.feature_cache is first  # the block gives back what was there before
    assert remove_feature_cache(model) is encoder and model.feature_cache is None
    with pytest.raises(TypeError, match="expected a Flamingo"):
        use_feature_cache(torch.nn.Linear(2, 2), cache)


def test_autocast_is_part_of_the_key(make_model, tmp_path):
    model = make_model()
    pixels = torch.randn(3, 1, 3, 32, 32)  # 3 images of one frame
    fp32 = model.vision(pixels[:, 0])[:, None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model.vision(pixels[:, 0])[:, None]
    assert not torch.equal(reference, fp32)  # autocast changes the bits
    cache = FeatureCache.for_model(tmp_path, model)
    with feature_cache(model, cache) as cached:  # every call below is on the same batch of 3: bit-identical
        for keys in (None, ["p", "q", "r"]):  # keyed by the pixels, then by the pipeline's keys
            assert torch.equal(cached(pixels, keys), fp32) and torch.equal(cached(pixels, keys), fp32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                first, second = cached(pixels, keys), cached(pixels, keys)
            assert first.dtype == second.dtype == reference.dtype and torch.equal(first, reference)
            assert torch.equal(second, reference)
        assert cache.misses == 12 and cache.hits == 12  # fp32 and bf16 entries, for both kinds of key
        with pytest.raises(ValueError, match="image_keys name 2 images for 3 real images"):
            cached(pixels, ["p", "q"])


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


def test_training_with_the_cache_matches(backbones, make_model, shards, tmp_path, monkeypatch):
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
    # no pixel is hashed (the loader's batches carry image_keys), and the model is handed back
    # without the cache
    monkeypatch.setattr(features_module, "image_key", lambda *_: pytest.fail("pixels hashed in training"))
    model = make_model()
    encoder, calls = model.vision, TowerCalls(model)
    rec = recipe(backbones, shards, tmp_path / "hits", feature_cache=str(tmp_path / "feats"))
    assert train(rec, model=model, processor=processor)["losses"] == close  # features of other batches, as above
    assert calls.count == 0 and model.vision is encoder and model.feature_cache is None

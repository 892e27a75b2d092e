"""The instrument for generated images (interleaf.eval.imagegen): the attribute classifier, its
accuracy on held-out real pictures, the Fréchet distance over its features, the report, Inception
FID's missing-package errors, and CLIP score against a tiny random CLIP.

The classifier is trained once for the module on a small budget (2,000 pictures, 200 steps,
~11 s on one contended CPU thread). Its held-out accuracy, measured on 2,000 real pictures for
training seeds 0-3: colour 1.0, shape 0.944-0.988 (0.982 for seed 0), count 0.983-0.994, size
1.0, background 1.0; the thresholds below leave room for other thread counts' rounding."""

import dataclasses
import random
import shutil
import sys
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from scipy.linalg import sqrtm

from interleaf.data import tinyworld
from interleaf.eval import imagegen
from interleaf.extras import MissingExtra
from interleaf.tiny import build_tokenizer

THRESHOLDS = {"colour": 0.98, "shape": 0.9, "count": 0.95, "size": 0.98, "background": 0.98}


@pytest.fixture(scope="module")
def classifier():
    return imagegen.train_classifier(seed=0, n_train=2000, steps=200)


@pytest.fixture(scope="module")
def held_out():
    return imagegen.real_images(seed=1, n=400)


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def all_red(n: int) -> list[Image.Image]:
    """Real pictures with every thing red: a generator stuck on one colour."""
    images = []
    for i in range(n):
        rng = random.Random(f"test-red-{i}")
        scene = tinyworld.uniform_scene(rng, "red", rng.choice(tinyworld.SHAPES), rng.choice(tinyworld.SIZES))
        images.append(tinyworld.render(scene))
    return images


def wrong(targets: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each attribute moved to the next value: every target is wrong."""
    values = imagegen.VALUES
    return [{a: values[a][(values[a].index(v) + 1) % len(values[a])] for a, v in t.items()} for t in targets]


# ---------------------------------------------------------------------------------------------
# Attributes


def test_scene_attributes_of_a_uniform_scene():
    scene = tinyworld.uniform_scene(random.Random(3), "blue", "star", "small", count=3)
    assert imagegen.scene_attributes(scene) == {
        "colour": "blue",
        "shape": "star",
        "count": "3",
        "size": "small",
        "background": scene.background,
    }


def test_scene_attributes_rejects_two_groups():
    one = tinyworld.uniform_scene(random.Random(0), "red", "circle", "large", count=2)
    two = dataclasses.replace(one, things=(one.things[0], dataclasses.replace(one.things[1], colour="green")))
    with pytest.raises(ValueError, match="2 groups"):
        imagegen.scene_attributes(two)


def test_chance_levels():
    assert imagegen.chance_levels() == {
        "colour": 1 / 6,
        "shape": 1 / 5,
        "count": 1 / 4,
        "size": 1 / 2,
        "background": 1 / 4,
    }


def test_real_images_are_deterministic_and_apart_from_training():
    images, attrs = imagegen.real_images(seed=7, n=5)
    again, attrs_again = imagegen.real_images(seed=7, n=5)
    assert attrs == attrs_again and [i.tobytes() for i in images] == [i.tobytes() for i in again]
    assert images[0].size == (32, 32) and set(attrs[0]) == set(imagegen.ATTRIBUTES)
    other, _ = imagegen.real_images(seed=8, n=5)
    assert [i.tobytes() for i in images] != [i.tobytes() for i in other]


# ---------------------------------------------------------------------------------------------
# The classifier


def test_classifier_held_out_accuracy(classifier, held_out):
    accuracy = imagegen.attribute_accuracy(classifier, *held_out)
    chance = imagegen.chance_levels()
    assert set(accuracy) == set(imagegen.ATTRIBUTES)
    for attr, threshold in THRESHOLDS.items():
        assert accuracy[attr] >= threshold, (attr, accuracy)
        assert accuracy[attr] - chance[attr] > 0.4, (attr, accuracy)


def test_classifier_shapes(classifier):
    x = imagegen.to_tensor(imagegen.real_images(seed=2, n=3)[0])
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    with torch.no_grad():
        logits, features = classifier(x), classifier.features(x)
        bigger = classifier.features(torch.nn.functional.interpolate(x, size=(48, 48)))
    assert {a: tuple(v.shape) for a, v in logits.items()} == {
        a: (3, len(imagegen.VALUES[a])) for a in imagegen.ATTRIBUTES
    }
    assert features.shape == (3, classifier.config.features) and bigger.shape == features.shape
    assert not classifier.training


def test_larger_images_are_resized(classifier):
    images, targets = imagegen.real_images(seed=1, n=200, image_size=64)
    accuracy = imagegen.attribute_accuracy(classifier, images, targets)
    assert accuracy["colour"] >= 0.95 and accuracy["background"] >= 0.95


def test_to_tensor_errors():
    with pytest.raises(ValueError, match="no images"):
        imagegen.to_tensor([])
    with pytest.raises(ValueError, match="different sizes"):
        imagegen.to_tensor([Image.new("RGB", (32, 32)), Image.new("RGB", (16, 16))])


def test_training_is_deterministic_for_a_seed():
    a = imagegen.train_classifier(seed=5, n_train=64, steps=3, batch_size=16)
    b = imagegen.train_classifier(seed=5, n_train=64, steps=3, batch_size=16)
    c = imagegen.train_classifier(seed=6, n_train=64, steps=3, batch_size=16)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_load_round_trip(classifier, held_out, tmp_path):
    imagegen.save_classifier(classifier, tmp_path / "clf")
    loaded = imagegen.load_classifier(tmp_path / "clf")
    assert loaded.config == classifier.config and not loaded.training
    x = imagegen.to_tensor(held_out[0][:64])
    with torch.no_grad():
        before, after = classifier(x), loaded(x)
    assert all(torch.equal(before[a], after[a]) for a in imagegen.ATTRIBUTES)
    assert np.array_equal(
        imagegen.classifier_features(classifier, held_out[0][:64]),
        imagegen.classifier_features(loaded, held_out[0][:64]),
    )


def test_load_errors_name_the_file(classifier, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing / "config.json")):
        imagegen.load_classifier(missing)
    imagegen.save_classifier(classifier, tmp_path / "clf")
    (tmp_path / "clf" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=str(tmp_path / "clf" / "model.safetensors")):
        imagegen.load_classifier(tmp_path / "clf")
    (tmp_path / "clf" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=str(tmp_path / "clf" / "config.json")):
        imagegen.load_classifier(tmp_path / "clf")


# ---------------------------------------------------------------------------------------------
# Attribute accuracy


def test_attribute_accuracy_with_right_shuffled_and_wrong_targets(classifier, held_out):
    images, targets = held_out
    subset = [{"colour": t["colour"], "shape": t["shape"]} for t in targets]
    right = imagegen.attribute_accuracy(classifier, images, subset, batch_size=64)
    assert set(right) == {"colour", "shape"} and right["colour"] >= 0.98 and right["shape"] >= 0.9
    shuffled = list(targets)
    random.Random(0).shuffle(shuffled)
    by_chance = imagegen.attribute_accuracy(classifier, images, shuffled)
    chance = imagegen.chance_levels()
    assert all(by_chance[a] < chance[a] + 0.15 for a in imagegen.ATTRIBUTES), by_chance
    assert all(v <= 0.1 for v in imagegen.attribute_accuracy(classifier, images, wrong(targets)).values())


def test_attribute_accuracy_counts_each_attribute_where_named(classifier, held_out):
    images, targets = held_out
    mixed = [{"colour": t["colour"]} if i % 2 else {"count": t["count"]} for i, t in enumerate(targets[:40])]
    assert set(imagegen.attribute_accuracy(classifier, images[:40], mixed)) == {"colour", "count"}


def test_attribute_accuracy_errors(classifier, held_out):
    images, targets = held_out
    with pytest.raises(ValueError, match="no images"):
        imagegen.attribute_accuracy(classifier, [], [])
    with pytest.raises(ValueError, match="3 images but 2 targets"):
        imagegen.attribute_accuracy(classifier, images[:3], targets[:2])
    with pytest.raises(ValueError, match="'hue'"):
        imagegen.attribute_accuracy(classifier, images[:1], [{"hue": "red"}])
    with pytest.raises(ValueError, match="count '5'"):
        imagegen.attribute_accuracy(classifier, images[:1], [{"count": "5"}])


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The FID formula as the reference implementations write it: sqrtm of the product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * cross))


def correlated(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    return rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + shift


def test_frechet_distance_matches_scipy_sqrtm():
    # Both in float64; eigh of the symmetric Sa^1/2 Sb Sa^1/2 and scipy's Schur-based sqrtm of
    # the non-symmetric Sa Sb round differently: they agree to ~1e-13 relative here, not bitwise
    # (1e-8 leaves room for other BLAS builds).
    rng = np.random.default_rng(0)
    for n, dim in ((200, 8), (50, 16), (300, 32)):
        a, b = correlated(rng, n, dim), correlated(rng, n + 17, dim, shift=0.3)
        assert imagegen.frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-8, abs=1e-8)


def test_frechet_distance_of_identical_sets_is_zero_and_it_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = correlated(rng, 100, 12), correlated(rng, 80, 12, shift=1.0)
    scale = np.trace(np.cov(a, rowvar=False))
    assert imagegen.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * scale)
    assert imagegen.frechet_distance(a, b) == pytest.approx(imagegen.frechet_distance(b, a), rel=1e-9)
    assert imagegen.frechet_distance(a.astype(np.float32), b) == pytest.approx(
        imagegen.frechet_distance(a.astype(np.float32).astype(np.float64), b), rel=1e-12
    )


def test_frechet_distance_of_a_mean_shift_is_its_squared_length():
    rng = np.random.default_rng(2)
    a = correlated(rng, 150, 10)
    shift = rng.normal(size=10)
    assert imagegen.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_frechet_distance_errors():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="1 sample"):
        imagegen.frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match="4 features in a but 3 in b"):
        imagegen.frechet_distance(rng.normal(size=(5, 4)), rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="shape"):
        imagegen.frechet_distance(rng.normal(size=5), rng.normal(size=(5, 1)))
    with pytest.raises(ValueError, match="NaN"):
        imagegen.frechet_distance(np.full((3, 2), np.nan), rng.normal(size=(5, 2)))


def test_frechet_distance_over_classifier_features_separates_real_from_wrong(classifier):
    real_a = imagegen.classifier_features(classifier, imagegen.real_images(seed=2, n=300)[0])
    real_b = imagegen.classifier_features(classifier, imagegen.real_images(seed=3, n=300)[0])
    real_vs_real = imagegen.frechet_distance(real_a, real_b)
    red = imagegen.frechet_distance(imagegen.classifier_features(classifier, all_red(300)), real_b)
    noise = imagegen.frechet_distance(imagegen.classifier_features(classifier, noise_images(300)), real_b)
    assert real_a.shape == (300, classifier.config.features) and real_a.dtype == np.float32
    assert 5 * real_vs_real < red and 5 * real_vs_real < noise, (real_vs_real, red, noise)


# ---------------------------------------------------------------------------------------------
# The report


def test_report(classifier, held_out):
    generated, targets = imagegen.real_images(seed=4, n=100)  # a perfect generator
    subset = [{"colour": t["colour"], "shape": t["shape"]} for t in targets]
    real_b = imagegen.real_images(seed=5, n=200)[0]
    good = imagegen.report(classifier, generated, subset, held_out, real_b)
    assert set(good) == {
        "accuracy",
        "chance",
        "classifier_accuracy_on_real",
        "frechet_generated_vs_real",
        "frechet_real_vs_real",
    }
    assert (
        set(good["accuracy"]) == set(good["chance"]) == set(good["classifier_accuracy_on_real"]) == {"colour", "shape"}
    )
    assert good["chance"] == {"colour": 1 / 6, "shape": 1 / 5}
    assert good["accuracy"]["colour"] >= 0.98 and good["classifier_accuracy_on_real"]["colour"] >= 0.98
    bad = imagegen.report(classifier, noise_images(100), subset, held_out, real_b)
    assert bad["accuracy"]["shape"] < 0.5 and bad["frechet_real_vs_real"] == good["frechet_real_vs_real"]
    assert bad["frechet_generated_vs_real"] > 5 * good["frechet_generated_vs_real"]


# ---------------------------------------------------------------------------------------------
# Inception FID (the fid extra)


def test_missing_torchmetrics_gives_a_one_line_error(monkeypatch):
    for name in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.fid"):
        monkeypatch.setitem(sys.modules, name, None)
    images = imagegen.real_images(seed=0, n=2)[0]
    with pytest.raises(MissingExtra) as error:
        imagegen.inception_fid(images, images)
    message = str(error.value)
    assert "\n" not in message and message.startswith("inception_fid needs the torchmetrics package")
    assert message.endswith("pip install 'interleaf[fid]'")


def test_missing_torch_fidelity_gives_a_one_line_error(monkeypatch):
    # torchmetrics' FID module stands in as an empty module, so this runs without torchmetrics.
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", types.ModuleType("torchmetrics.image.fid"))
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    images = imagegen.real_images(seed=0, n=2)[0]
    with pytest.raises(
        MissingExtra, match=r"^inception_fid needs the torch_fidelity package: pip install 'interleaf\[fid\]'$"
    ):
        imagegen.inception_fid(images, images)


def test_inception_fid_when_available():
    # torch-fidelity needs torchvision, which does not load beside the CPU torch build of the
    # development machines: this runs only where both packages import.
    pytest.importorskip("torchmetrics")
    pytest.importorskip("torch_fidelity")
    real = imagegen.real_images(seed=0, n=16)[0]
    try:
        fid_same = imagegen.inception_fid(real[:8], real[8:])
        fid_noise = imagegen.inception_fid(real, noise_images(16))
    except RuntimeError as error:
        if "could not load" in str(error):
            pytest.skip(str(error))
        raise
    assert 0 <= fid_same < fid_noise


# ---------------------------------------------------------------------------------------------
# CLIP score, on a tiny random CLIP written to a directory


def save_tiny_clip(directory, *, pad_token: str | None = "</s>") -> None:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        # eos_token_id 2 is transformers' legacy pooling (at the highest token id): the tiny
        # tokenizer appends no end token, so pooling at the first </s> would always pool at 0.
        text_config=dict(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=24,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    transformers.CLIPModel(config).save_pretrained(directory)
    build_tokenizer(directory, pad_token=pad_token)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    save_tiny_clip(directory)
    return directory


def direct_scores(directory, images, texts) -> np.ndarray:
    """100 x cosine of each pair, unclamped: one pair at a time, through CLIPProcessor and the
    towers' pooled outputs and projections."""
    model = transformers.CLIPModel.from_pretrained(directory).eval()
    processor = transformers.CLIPProcessor.from_pretrained(directory)
    scores = []
    with torch.no_grad():
        for image, text in zip(images, texts):
            inputs = processor(text=[text], images=[image], return_tensors="pt")
            vision = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
            words = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            a = model.visual_projection(vision)[0].double()
            b = model.text_projection(words.pooler_output)[0].double()
            scores.append(float(100 * a @ b / (a.norm() * b.norm())))
    return np.array(scores)


@pytest.fixture(scope="module")
def pairs():
    images, targets = imagegen.real_images(seed=0, n=12)
    images[3] = imagegen.real_images(seed=9, n=1, image_size=64)[0][0]  # the processor resizes it
    texts = [f"{t['count']} {t['size']} {t['colour']} {t['shape']}s on {t['background']}" for t in targets]
    return images, texts


def test_clip_score_matches_a_direct_computation(tiny_clip, pairs):
    images, texts = pairs
    raw = direct_scores(tiny_clip, images, texts)
    # The random tiny CLIP gives cosines of both signs: the floor at 0 applies to some pairs.
    assert (raw < 0).any() and (raw > 0).any(), raw
    expected = float(np.maximum(raw, 0).mean())
    assert expected > max(float(raw.mean()), 0) + 1  # per-pair floor, not a floor of the mean
    # Both sides are float32 on the same weights; batched and padded against one pair at a time,
    # the matmuls round differently by ~1e-6 on the 0-100 scale.
    for batch_size in (32, 5, 1):
        assert imagegen.clip_score(images, texts, str(tiny_clip), batch_size=batch_size) == pytest.approx(
            expected, abs=1e-4
        )
    assert imagegen.clip_score(images, texts, tiny_clip, device="cpu") == pytest.approx(expected, abs=1e-4)


def test_clip_score_floors_each_pair_at_zero(tiny_clip, pairs):
    images, texts = pairs
    raw = direct_scores(tiny_clip, images, texts)
    negative, positive = int(np.argmin(raw)), int(np.argmax(raw))
    assert raw[negative] < 0 < raw[positive]
    assert imagegen.clip_score([images[negative]], [texts[negative]], tiny_clip) == 0.0
    assert imagegen.clip_score([images[positive]], [texts[positive]], tiny_clip) == pytest.approx(
        raw[positive], abs=1e-4
    )


def test_clip_score_with_a_tokenizer_without_pad_token(tiny_clip, pairs, tmp_path):
    images, texts = pairs
    shutil.copytree(tiny_clip, tmp_path / "clip")
    build_tokenizer(tmp_path / "clip")  # the same vocabulary, no pad token: texts go one at a time
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "clip").pad_token is None
    assert imagegen.clip_score(images, texts, tmp_path / "clip") == pytest.approx(
        imagegen.clip_score(images, texts, tiny_clip), abs=1e-4
    )


def test_clip_score_input_errors(tiny_clip, pairs):
    images, texts = pairs
    with pytest.raises(ValueError, match="12 images but 11 texts"):
        imagegen.clip_score(images, texts[:-1], tiny_clip)
    with pytest.raises(ValueError, match="no images"):
        imagegen.clip_score([], [], tiny_clip)
    with pytest.raises(ValueError, match="one string"):
        imagegen.clip_score(images[:2], "ab", tiny_clip)
    with pytest.raises(ValueError, match="batch_size"):
        imagegen.clip_score(images, texts, tiny_clip, batch_size=0)


def assert_load_error(model, detail: str) -> None:
    with pytest.raises(ValueError) as error:
        imagegen.clip_score([Image.new("RGB", (32, 32))], ["a red circle"], model)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"clip_score: could not load the CLIP model {str(model)!r}")
    assert "downloaded on first use" in message and detail in message, message


def test_clip_score_load_errors(tiny_clip, tmp_path, monkeypatch):
    assert_load_error(tmp_path / "nowhere", "OSError")
    (tmp_path / "gpt").mkdir()
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt")
    assert_load_error(tmp_path / "gpt", "'gpt2' model, not a CLIP")
    (tmp_path / "no-weights").mkdir()
    shutil.copy(tiny_clip / "config.json", tmp_path / "no-weights")
    assert_load_error(tmp_path / "no-weights", "model.safetensors")
    (tmp_path / "no-tokenizer").mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(tiny_clip / name, tmp_path / "no-tokenizer")
    assert_load_error(tmp_path / "no-tokenizer", "tokenizer has no vocabulary")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    assert_load_error("openai/clip-vit-base-patch32", "OSError: We couldn't connect")


def test_the_drawing_table_explains_its_columns():
    from interleaf.eval.drawing import table

    rates = {"colour": 0.9, "shape": 0.5}
    prompts = {
        "chance": {"colour": 1 / 6, "shape": 0.2},
        "classifier_accuracy_on_real": {"colour": 1.0, "shape": 1.0},
        "accuracy": rates,
        "frechet_generated_vs_real": 80.0,
        "frechet_real_vs_real": 50.0,
    }
    scores = {"prompts": prompts, "held_out_combinations": rates, "same_shape": {"colour": 1.0}}
    coherent = {"agreement": {"colour": 1.0}, "counts": {"colour": 7}, "pictures": 9}
    text = table(scores, coherent)
    assert "| colour | 16.7 | 100.0 | 90.0 | 90.0 | 100.0 | 100.0 (7) |" in text
    assert "| shape | 20.0 | 100.0 | 50.0 | 50.0 | - | - |" in text  # no caption named a shape
    assert "drew 9 pictures" in text and "how many captions named it" in text
    assert "own caption" not in table(scores) and "drawn vs real 80.00, real vs real 50.00" in table(scores)

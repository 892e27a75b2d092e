"""Measuring images generated from text on the tiny world (MM-Interleaved-style generation).

A prompt such as ``two small red circles on a grey background`` names one group of identical
things, so a generated picture can be checked attribute by attribute: colour, shape, count,
size and background. :class:`AttributeClassifier` is a small CNN trained here on real rendered
pictures (:func:`train_classifier`, about a minute on two CPU cores); its per-attribute
accuracy on held-out real pictures (:func:`real_images`) is the ceiling that generated pictures
are measured against, and :func:`chance_levels` the floor.

Its trunk's feature vector also gives a Fréchet distance (:func:`frechet_distance`, the FID
formula over the classifier's features instead of Inception's). :func:`report` puts the
distance of generated to real pictures beside the distance of two disjoint real sets, the
distance that sampling alone gives.

Inception FID and CLIP score are there for real models and download their weights on first
use: :func:`inception_fid` needs the ``fid`` extra (torchmetrics, torch-fidelity; not exercised on
the CPU-only development machines, where torch-fidelity's torchvision does not load);
:func:`clip_score` computes CLIPScore with a transformers ``CLIPModel`` (a hub id or a local
directory).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from interleaf.data import tinyworld
from interleaf.extras import optional_import, require

ATTRIBUTES = ("colour", "shape", "count", "size", "background")
VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(tinyworld.COLOURS),
    "shape": tinyworld.SHAPES,
    "count": ("1", "2", "3", "4"),
    "size": tinyworld.SIZES,
    "background": tuple(tinyworld.BACKGROUNDS),
}
"""The values each attribute takes, in the order of the classifier's logits."""

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def scene_attributes(scene: tinyworld.Scene) -> dict[str, str]:
    """The attributes of a scene showing one group of identical things (``uniform_scene``)."""
    groups = scene.groups()
    if len(groups) != 1:
        raise ValueError(f"scene_attributes: the scene shows {len(groups)} groups of things; expected exactly one")
    (group,) = groups
    return {
        "colour": group.colour,
        "shape": group.shape,
        "count": str(group.count),
        "size": group.size,
        "background": scene.background,
    }


def chance_levels() -> dict[str, float]:
    """Accuracy of a uniform guess: 1 / the number of values of each attribute."""
    return {attr: 1 / len(VALUES[attr]) for attr in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------
# The classifier


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Input side (other sizes are resized to it), the widths of the trunk's three stages and
    the feature vector's size."""

    image_size: int = 32
    widths: tuple[int, int, int] = (16, 32, 64)
    features: int = 64


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class AttributeClassifier(nn.Module):
    """Shared CNN trunk -> feature vector (n, F) -> one linear head per attribute.

    The trunk: a 3x3 convolution at full resolution, then two stages of a stride-2 3x3
    convolution and a 3x3 one (each with batch norm and ReLU), so a small shape (radius ~4 px at
    32 px) spans several pixels of the first maps, and the last map's receptive field (21 px)
    holds a whole large shape. Average and max pooling over the last map feed the features: the
    average counts, the max detects."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        w1, w2, w3 = config.widths
        self.trunk = nn.Sequential(
            *_conv(3, w1), *_conv(w1, w2, stride=2), *_conv(w2, w2), *_conv(w2, w3, stride=2), *_conv(w3, w3)
        )
        self.embed = nn.Linear(2 * w3, config.features)
        self.heads = nn.ModuleDict({attr: nn.Linear(config.features, len(VALUES[attr])) for attr in ATTRIBUTES})

    def features(self, x: Tensor) -> Tensor:
        """(n, 3, H, W) in [0, 1] -> (n, F)."""
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        h = self.trunk(x)  # (n, w3, size/4, size/4)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (n, 2 w3)
        return F.relu(self.embed(pooled))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(n, 3, H, W) in [0, 1] -> {attribute: (n, values) logits}."""
        f = self.features(x)
        return {attr: head(f) for attr, head in self.heads.items()}


def to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """PIL images of one size -> float (n, 3, H, W) in [0, 1]."""
    if not images:
        raise ValueError("to_tensor: no images")
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"to_tensor: images of different sizes {sorted(sizes)}; pass one size per call")
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (n, H, W, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)


def _labels(attrs: Mapping[str, str]) -> list[int]:
    return [VALUES[attr].index(attrs[attr]) for attr in ATTRIBUTES]


def _draw_scene(rng: random.Random) -> tinyworld.Scene:
    colour, shape = rng.choice(tinyworld.ALL_COMBOS)
    size = rng.choice(tinyworld.SIZES)
    return tinyworld.uniform_scene(rng, colour, shape, size, rng.randint(1, 4))


def _rendered(namespace: str, seed: int, n: int, image_size: int) -> tuple[list[Image.Image], list[dict[str, str]]]:
    images, attrs = [], []
    for i in range(n):
        scene = _draw_scene(random.Random(f"imagegen-{namespace}-{seed}-{i}"))
        images.append(tinyworld.render(scene, image_size))
        attrs.append(scene_attributes(scene))
    return images, attrs


def real_images(seed: int, n: int, image_size: int = 32) -> tuple[list[Image.Image], list[dict[str, str]]]:
    """``n`` real uniform scenes (any colour+shape, 1-4 things) and their attributes, drawn in a
    seed namespace apart from the classifier's training pictures."""
    return _rendered("real", seed, n, image_size)


def train_classifier(
    *,
    seed: int = 0,
    n_train: int = 6000,
    steps: int = 600,
    batch_size: int = 64,
    image_size: int = 32,
    lr: float = 4e-3,
    progress: bool = False,
) -> AttributeClassifier:
    """Train an :class:`AttributeClassifier` on ``n_train`` rendered uniform scenes (the sum of
    the heads' cross-entropies, AdamW with a one-cycle schedule); the same seed gives the same
    weights (on the same machine and thread count). Returns it in eval mode."""
    if n_train < 1 or steps < 1 or batch_size < 1:
        raise ValueError(
            f"train_classifier: n_train, steps and batch_size must be >= 1, got {n_train}, {steps}, {batch_size}"
        )
    torch.manual_seed(seed)
    images, attrs = _rendered("train", seed, n_train, image_size)
    x = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)  # uint8
    y = torch.tensor([_labels(a) for a in attrs])  # (n, attributes)
    model = AttributeClassifier(ClassifierConfig(image_size=image_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    order = torch.Generator().manual_seed(seed)
    perm, at = torch.randperm(n_train, generator=order), 0
    model.train()
    for _ in tqdm(range(steps), disable=not progress, desc="classifier"):
        if at + batch_size > n_train:
            perm, at = torch.randperm(n_train, generator=order), 0
        idx = perm[at : at + batch_size]
        at += batch_size
        logits = model(x[idx].float().div(255))
        loss = sum(F.cross_entropy(logits[attr], y[idx, k]) for k, attr in enumerate(ATTRIBUTES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def save_classifier(model: AttributeClassifier, path: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` into the directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps({**asdict(model.config), "values": VALUES}, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / WEIGHTS))


def load_classifier(path: str | Path) -> AttributeClassifier:
    """The classifier :func:`save_classifier` wrote into ``path``, in eval mode."""
    path = Path(path)
    config_file, weights_file = path / CONFIG, path / WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"load_classifier: {file} is missing")
    try:
        data = json.loads(config_file.read_text())
        values = {attr: tuple(v) for attr, v in data.pop("values").items()}
        config = ClassifierConfig(**{**data, "widths": tuple(data["widths"])})
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"load_classifier: {config_file} is not a classifier config: {error}") from None
    if values != VALUES:
        raise ValueError(f"load_classifier: {config_file} names other attribute values than this version's")
    model = AttributeClassifier(config)
    try:
        model.load_state_dict(load_file(str(weights_file)))
    except (SafetensorError, RuntimeError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"load_classifier: {weights_file} does not hold the classifier's weights: {first}") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Measures


def _inputs(classifier: AttributeClassifier, images: Sequence[Image.Image]) -> Tensor:
    """One (n, 3, S, S) tensor on the classifier's device, whatever the images' sizes."""
    size = classifier.config.image_size
    device = next(classifier.parameters()).device
    parts = []
    for image in images:
        x = to_tensor([image])
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        parts.append(x)
    return torch.cat(parts).to(device)


def _batched(
    classifier: AttributeClassifier, images: Sequence[Image.Image], fn: Callable[[Tensor], Any], batch_size: int
) -> list[Any]:
    if not images:
        raise ValueError("no images")
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(fn(_inputs(classifier, images[start : start + batch_size])))
    return out


def predict(
    classifier: AttributeClassifier, images: Sequence[Image.Image], *, batch_size: int = 256
) -> list[dict[str, str]]:
    """The classifier's attribute values for each image."""
    batches = _batched(classifier, images, classifier, batch_size)
    picks = {attr: torch.cat([b[attr].argmax(-1).cpu() for b in batches]).tolist() for attr in ATTRIBUTES}
    return [{attr: VALUES[attr][picks[attr][i]] for attr in ATTRIBUTES} for i in range(len(images))]


def attribute_accuracy(
    classifier: AttributeClassifier,
    images: Sequence[Image.Image],
    targets: Sequence[Mapping[str, str]],
    *,
    batch_size: int = 256,
) -> dict[str, float]:
    """Per attribute named in the targets (any subset of :data:`ATTRIBUTES`), the fraction of the
    images whose target names it where the classifier predicts the target value."""
    if len(images) != len(targets):
        raise ValueError(f"attribute_accuracy: {len(images)} images but {len(targets)} targets")
    if not images:
        raise ValueError("attribute_accuracy: no images")
    for i, target in enumerate(targets):
        for attr, value in target.items():
            if attr not in VALUES:
                raise ValueError(f"attribute_accuracy: target {i} names {attr!r}, not one of {ATTRIBUTES}")
            if value not in VALUES[attr]:
                raise ValueError(f"attribute_accuracy: target {i}: {attr} {value!r} is not one of {VALUES[attr]}")
    predicted = predict(classifier, images, batch_size=batch_size)
    accuracy = {}
    for attr in ATTRIBUTES:
        hits = [p[attr] == t[attr] for p, t in zip(predicted, targets) if attr in t]
        if hits:
            accuracy[attr] = sum(hits) / len(hits)
    return accuracy


def classifier_features(
    classifier: AttributeClassifier, images: Sequence[Image.Image], *, batch_size: int = 256
) -> np.ndarray:
    """The trunk's feature vectors of the images, (n, F) float32."""
    return torch.cat([f.cpu() for f in _batched(classifier, images, classifier.features, batch_size)]).numpy()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (rounding's negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (n, F) and ``b`` (m, F):
    ``|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)``, in float64.

    ``tr((Sa Sb)^1/2)`` (FID's form) equals ``tr((Sa^1/2 Sb Sa^1/2)^1/2)``, the root of a
    symmetric PSD matrix, which ``eigh`` takes exactly where FID's ``sqrtm`` of a non-symmetric
    product can return a complex result."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2:
            raise ValueError(f"frechet_distance: {name} has shape {x.shape}; expected (samples, features)")
        if len(x) < 2:
            raise ValueError(f"frechet_distance: {name} has {len(x)} sample(s); a covariance needs at least 2")
        if not np.isfinite(x).all():
            raise ValueError(f"frechet_distance: {name} holds NaN or infinite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: {a.shape[1]} features in a but {b.shape[1]} in b")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    cross = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
    return max(value, 0.0)


def report(
    classifier: AttributeClassifier,
    generated: Sequence[Image.Image],
    targets: Sequence[Mapping[str, str]],
    real_a: tuple[Sequence[Image.Image], Sequence[Mapping[str, str]]],
    real_b: Sequence[Image.Image],
) -> dict[str, Any]:
    """Attribute accuracy of generated pictures against their prompts' targets, beside chance
    and the classifier's own accuracy on real pictures ``real_a`` (images, attributes), over the
    same attributes; and the Fréchet distances generated-vs-``real_b`` and ``real_a``-vs-``real_b``
    (the floor that sampling alone gives)."""
    accuracy = attribute_accuracy(classifier, generated, targets)
    real_images_a, real_targets_a = real_a
    missing = {attr for attr in accuracy for t in real_targets_a if attr not in t}
    if missing:
        raise ValueError(f"report: the real targets lack {sorted(missing)}, which the generated targets name")
    real_targets = [{attr: t[attr] for attr in accuracy} for t in real_targets_a]
    chance = chance_levels()
    features_b = classifier_features(classifier, real_b)
    return {
        "accuracy": accuracy,
        "chance": {attr: chance[attr] for attr in accuracy},
        "classifier_accuracy_on_real": attribute_accuracy(classifier, real_images_a, real_targets),
        "frechet_generated_vs_real": frechet_distance(classifier_features(classifier, generated), features_b),
        "frechet_real_vs_real": frechet_distance(classifier_features(classifier, real_images_a), features_b),
    }


# ---------------------------------------------------------------------------------------------
# Real-model metrics (weights downloaded on first use)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _uint8(images: Sequence[Image.Image]) -> Tensor:
    return (to_tensor(images) * 255).round().to(torch.uint8)


def inception_fid(
    real_images: Sequence[Image.Image], generated_images: Sequence[Image.Image], *, batch_size: int = 64
) -> float:
    """FID with Inception-v3 pool features (torchmetrics' ``FrechetInceptionDistance``, on
    torch-fidelity's weights, downloaded on first use); images of one size each, at least two of
    each. Needs the ``fid`` extra (``pip install 'interleaf[fid]'``); a missing package is a
    one-line :class:`~interleaf.extras.MissingExtra`, weights that cannot be fetched a one-line
    ``RuntimeError``.

    torch-fidelity needs torchvision, which does not load beside the CPU torch build of this
    project's development machines, so FID is not exercised there; the tests run it where both
    packages import."""
    feature = "inception_fid"
    fid_module = optional_import("torchmetrics.image.fid", feature, "fid")
    require("torch_fidelity", feature, "fid")
    for name, images in (("real", real_images), ("generated", generated_images)):
        if len(images) < 2:
            raise ValueError(f"{feature}: {len(images)} {name} image(s); FID needs at least 2")
    try:
        metric = fid_module.FrechetInceptionDistance(feature=2048)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"{feature}: could not load the Inception weights (downloaded on first use; is there a network?): "
            f"{_first_line(error)}"
        ) from None
    for images, real in ((real_images, True), (generated_images, False)):
        for start in range(0, len(images), batch_size):
            metric.update(_uint8(images[start : start + batch_size]), real=real)
    return float(metric.compute())


def _pooled(output: Any) -> Tensor:
    """``get_image_features``/``get_text_features``' embeddings: a tensor before transformers 5,
    a model output whose ``pooler_output`` holds the projected embeddings from 5 on."""
    return output if isinstance(output, Tensor) else output.pooler_output


def _load_clip(model: str | Path) -> tuple[Any, Any, Any]:
    """(CLIPModel in eval mode, tokenizer, image processor) from a hub id or a local directory."""
    import transformers

    def failed(detail: str) -> ValueError:
        return ValueError(
            f"clip_score: could not load the CLIP model {str(model)!r} (a hub id is downloaded on first use; "
            f"is there a network, and is the id or directory right?): {detail}"
        )

    errors = (OSError, ValueError, RuntimeError, KeyError, TypeError)
    try:
        config = transformers.AutoConfig.from_pretrained(model)
    except errors as error:
        raise failed(_first_line(error)) from None
    if not isinstance(config, transformers.CLIPConfig):
        raise failed(f"its config is a {config.model_type!r} model, not a CLIP")
    try:
        clip = transformers.CLIPModel.from_pretrained(model, config=config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        image_processor = transformers.AutoImageProcessor.from_pretrained(model)
    except errors as error:
        raise failed(_first_line(error)) from None
    # transformers 5 builds an empty tokenizer where a CLIP config has no tokenizer files beside it.
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise failed(f"its tokenizer has no vocabulary ({len(tokenizer)} tokens); are the tokenizer files there?")
    return clip.eval(), tokenizer, image_processor


def clip_score(
    images: Sequence[Image.Image],
    texts: Sequence[str],
    model: str | Path = "openai/clip-vit-base-patch32",
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> float:
    """Mean CLIP score of each image with its text (Hessel et al. 2021, CLIPScore with w = 100):
    per pair ``max(100 * cos(E_image, E_text), 0)``, averaged over the pairs.

    The embeddings are the projected ones of a transformers ``CLIPModel`` (a hub id, downloaded
    on first use, or a local directory holding the model, its tokenizer and its image processor);
    texts longer than the text encoder's positions are truncated. ``device`` defaults to CUDA
    where there is one. A model that does not load raises a one-line ``ValueError``.

    torchmetrics' ``CLIPScore`` documents this definition but floors the mean instead of each
    pair; the two agree whenever no pair's cosine is negative, as is usual for a trained CLIP."""
    feature = "clip_score"
    if isinstance(texts, str):
        raise ValueError(f"{feature}: texts is one string; pass a sequence of strings, one per image")
    if len(images) != len(texts):
        raise ValueError(f"{feature}: {len(images)} images but {len(texts)} texts")
    if not images:
        raise ValueError(f"{feature}: no images")
    if batch_size < 1:
        raise ValueError(f"{feature}: batch_size must be >= 1, got {batch_size}")
    clip, tokenizer, image_processor = _load_clip(model)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    clip = clip.to(device)
    max_length = clip.config.text_config.max_position_embeddings

    def embed_texts(batch: list[str]) -> Tensor:
        # Padding is masked out; without a pad token the texts go one at a time, unpadded.
        pad = tokenizer.pad_token is not None
        parts = []
        for group in [batch] if pad else [[text] for text in batch]:
            tokens = tokenizer(group, padding=pad, truncation=True, max_length=max_length, return_tensors="pt")
            parts.append(
                _pooled(
                    clip.get_text_features(
                        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
                    )
                )
            )
        return torch.cat(parts)

    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch_images = [image.convert("RGB") for image in images[start : start + batch_size]]
            pixels = image_processor(images=batch_images, return_tensors="pt")["pixel_values"]
            image_embeddings = _pooled(clip.get_image_features(pixel_values=pixels.to(device, clip.dtype)))
            text_embeddings = embed_texts(list(texts[start : start + batch_size]))
            cosine = F.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)
            scores.append((100 * cosine).clamp(min=0).cpu())
    return float(torch.cat(scores).double().mean())

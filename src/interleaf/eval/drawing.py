"""How well a model draws, on the tiny world, where it can be measured exactly.

An attribute classifier trained on the world's real pictures (:mod:`interleaf.eval.imagegen`)
reads the drawn ones:

- **prompts**: captions of pictures no training document shows (``here we have two large red
  circles on a grey background.``); each drawn picture is scored on the five attributes its
  caption names, beside chance and the classifier's own accuracy on real pictures, with the
  Fréchet distance in the classifier's feature space to real pictures (and between two sets
  of real pictures, the floor);
- **held-out combinations**: the same for the colour+shape combinations no training picture shows;
- **same shape**: a picture, then ``the same shape in blue.``: the shape (and count, size,
  background) must come from the earlier picture, which MMFS lets the decoder read directly;
- **coherence**: documents the model writes from a title alone, text and pictures in turn;
  each drawn picture against the caption the model wrote for it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from interleaf.data import tinyworld
from interleaf.eval.imagegen import (
    AttributeClassifier,
    attribute_accuracy,
    chance_levels,
    predict,
    real_images,
    report,
    scene_attributes,
)


def draw_all(
    model, processor, prompts: Sequence[Sequence[Any]], *, seed: int = 0, batch_size: int = 32, **sampling
) -> list[Image.Image]:
    """One picture per prompt, drawn ``batch_size`` prompts at a time (batch ``k`` seeded ``seed + k``)."""
    images: list[Image.Image] = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        images += model.draw(processor, prompts[start : start + batch_size], seed=seed + k, **sampling)
    return images


def _targets(prompts: Sequence[tinyworld.DrawingPrompt]) -> list[dict[str, str]]:
    return [{a: v for a, v in scene_attributes(p.scene).items() if a in p.checks} for p in prompts]


def drawing_scores(
    model,
    processor,
    classifier: AttributeClassifier,
    *,
    seed: int = 0,
    n: int = 60,
    batch_size: int = 32,
    **sampling,
) -> dict[str, Any]:
    """The scores of the module docstring but coherence, and the prompts' drawings (``images``)."""
    prompts = tinyworld.drawing_prompts(seed, n)
    drawn = draw_all(model, processor, [p.prompt for p in prompts], seed=seed, batch_size=batch_size, **sampling)
    real_a = real_images(seed, n)
    real_b, _ = real_images(seed + 1, n)
    scores = report(classifier, drawn, _targets(prompts), real_a, real_b)
    held_out = tinyworld.drawing_prompts(seed, n, combos=sorted(tinyworld.HELD_OUT))
    same = tinyworld.variation_prompts(seed, n, keep="shape")
    drawn_held_out, drawn_same = (
        draw_all(model, processor, [p.prompt for p in asked], seed=seed, batch_size=batch_size, **sampling)
        for asked in (held_out, same)
    )
    return {
        "prompts": scores,
        "held_out_combinations": attribute_accuracy(classifier, drawn_held_out, _targets(held_out)),
        "same_shape": attribute_accuracy(classifier, drawn_same, _targets(same)),
        "n": n,
        "images": {"prompts": (prompts, drawn), "same_shape": (same, drawn_same)},
    }


def coherence(
    model, processor, classifier: AttributeClassifier, *, seed: int = 0, documents: int = 20, num_iter: int = 3
) -> dict[str, Any]:
    """Documents written from a title alone (``generate_texts``, ``num_iter`` rounds); for each
    drawn picture, per attribute the model's caption before it names, whether the classifier
    reads the same value in the picture. Returns the rates, the counts and the documents."""
    docs, pairs = [], []
    for i in range(documents):
        # no trailing space: the model goes on with " this picture ..." (a lone space is a token of its own)
        title = random.Random(f"tinyworld/{seed}/story-title/{i}").choice(tinyworld.TITLES)
        doc = model.generate_interleaved(processor, [title], mode="generate_texts", num_iter=num_iter, seed=seed + i)
        docs.append(doc)
        for before, part in itertools.pairwise(doc):
            if "image" in part and part.get("generated") and "text" in before:
                pairs.append((tinyworld.read_caption(before["text"]), part["image"]))
    read = predict(classifier, [image for _, image in pairs]) if pairs else []
    matches: dict[str, list[bool]] = {}
    for (named, _), seen in zip(pairs, read):
        for attribute, value in named.items():
            matches.setdefault(attribute, []).append(seen[attribute] == value)
    rates = {a: sum(m) / len(m) for a, m in matches.items()}
    chance = chance_levels()
    return {
        "agreement": rates,
        "chance": {a: chance[a] for a in rates},
        "counts": {a: len(m) for a, m in matches.items()},
        "pictures": len(pairs),
        "documents": docs,
    }


def grid(prompts: Sequence[str], images: Sequence[Image.Image], path: str | Path, *, columns: int = 6) -> Path:
    """The pictures in a grid, each under its prompt (wrapped), written to ``path`` (PNG)."""
    import matplotlib  # the backend is chosen before pyplot is imported (as eval.report does)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, prompt, image in zip(axes.flat, prompts, images):
        ax.imshow(image.resize((128, 128), Image.NEAREST))
        ax.set_title(_wrap(prompt, 24), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def variation_grid(
    prompts: Sequence[tinyworld.DrawingPrompt], images: Sequence[Image.Image], path: str | Path, *, pairs: int = 9
) -> Path:
    """The first ``pairs`` "same shape" prompts as pairs in a grid: the earlier picture, then
    what was drawn under the prompt's text (``the same shape in blue.``)."""
    labels, pictures = [], []
    for prompt, drawn in list(zip(prompts, images))[:pairs]:
        earlier, text = prompt.prompt
        labels += ["the earlier picture", text]
        pictures += [earlier, drawn]
    return grid(labels, pictures, path)


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def table(scores: dict[str, Any], coherent: dict[str, Any] | None = None) -> str:
    """A markdown table: per attribute, chance, the classifier on real pictures, the drawn
    pictures for held-out prompts, for held-out combinations, for "the same shape", and coherence."""
    prompts = scores["prompts"]
    columns = [
        ("chance", prompts["chance"]),
        ("classifier on real", prompts["classifier_accuracy_on_real"]),
        ("drawn: prompts", prompts["accuracy"]),
        ("drawn: held-out combos", scores["held_out_combinations"]),
        ("drawn: same shape", scores["same_shape"]),
    ]
    if coherent is not None:
        columns.append(("own caption vs own picture (captions)", coherent["agreement"]))
    lines = ["| attribute | " + " | ".join(name for name, _ in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for attribute in prompts["accuracy"]:
        cells = [f"{100 * c[attribute]:.1f}" if attribute in c else "-" for _, c in columns]
        if coherent is not None and attribute in coherent["counts"]:
            cells[-1] += f" ({coherent['counts'][attribute]})"
        lines.append(f"| {attribute} | " + " | ".join(cells) + " |")
    fd = f"Fréchet distance (classifier features): drawn vs real {prompts['frechet_generated_vs_real']:.2f}, "
    fd += f"real vs real {prompts['frechet_real_vs_real']:.2f}"
    if coherent is not None:
        fd += (
            f"\n\nown caption vs own picture: the model wrote documents from a title and drew "
            f"{coherent['pictures']} pictures; for each attribute its caption before a picture named, % of those "
            "captions whose value the classifier reads in the picture (in brackets: how many captions named "
            "it; -: none did)"
        )
    return "\n".join(lines) + "\n\n" + fd

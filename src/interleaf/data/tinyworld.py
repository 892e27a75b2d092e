"""The tiny world: a deterministic procedural world of coloured shapes, the embedded default
dataset of the demo and of the tests.

A picture shows one to four shapes (circle, square, triangle, star, diamond) in six colours and
two sizes, at the cells of a 2x2 grid or in the centre, on a noisy or graded background. A
:class:`Scene` describes a picture and :func:`render` draws it. Scenes give captions, VQA
questions with answers, and class labels; from those come the training documents
(:func:`iter_train_documents`):

- ``pair``: an image and its caption;
- ``interleaved``: several images, the text after each describing it (and comparing it with the last);
- ``task``: VQA (``Question: ... Short answer: ...``) or captioning (``Output: ...``) prompts, several per document;
- ``icl``: in-context learning documents (Chan et al. 2022) whose labelling rule changes from
  document to document: which attribute the answers name (``rule="attribute"``), or invented
  words bound to classes for this document only (``rule="words"``, bursty: two or three classes
  each seen at least twice, drawn from a Zipfian distribution over the classes);
- ``chat``: a user asks about an image, an assistant answers.

The held-out evaluation split (:func:`eval_tasks`) is disjoint from training by construction:
captioning and VQA pictures each show a colour+shape combination of :data:`HELD_OUT`, which no
training picture shows, and classification names the colours with invented words of
:data:`EVAL_WORDS`, which no training text contains, so that 0-shot is at chance and only the
demonstrations tell which word is which colour. :func:`write` writes it all in the field's file
layouts (MMC4 jsonl, pairs parquet, LLaVA json; COCO Karpathy json, VQAv2 json, ImageNet-style
folders) so the same readers are exercised.

Everything is a pure function of the seed: a per-item ``random.Random`` seeded with a string
(no global RNG), so the same seed gives the same documents and byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from .schema import Document, ImageRef, Segment

VERSION = 2
SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 190),
    "orange": (250, 140, 30),
}
BACKGROUNDS = {"grey": (128, 128, 128), "black": (30, 30, 30), "white": (230, 230, 230), "brown": (115, 80, 50)}
SIZES = ("small", "large")
RADIUS = {"small": 0.12, "large": 0.22}  # a shape's radius, as a fraction of the image side
CELLS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75)}
CENTRE = "center"
POSITIONS = (*CELLS, CENTRE)
NUMBERS = ("no", "one", "two", "three", "four")

HELD_OUT = frozenset(
    {("red", "star"), ("green", "triangle"), ("blue", "diamond"), ("yellow", "circle"), ("purple", "square")}
)
"""(colour, shape) combinations that no training picture shows; every eval caption/VQA picture shows one."""
ALL_COMBOS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
TRAIN_COMBOS = tuple(combo for combo in ALL_COMBOS if combo not in HELD_OUT)

VQA_PROMPT = "Question: {question} Short answer:"
OUTPUT_PROMPT = "Output:"
"""Prompts of the task and in-context documents; the answer follows after one space."""
BEGIN_OF_IMAGE = "<|beginofimage|>"
"""Ends a text that an image follows in the documents that teach drawing (``story``, ``variation``)."""

DEFAULT_MIX = {"pair": 0.25, "interleaved": 0.15, "task": 0.2, "icl": 0.35, "chat": 0.05}
ICL_EXAMPLES = (5, 9)  # examples per in-context document: room for 8 shots and a query
BURSTY_EXAMPLES = (8, 16)  # examples per long bursty document (icl_bursty*): 16 shots in-distribution
BURSTY_CLASSES = 6  # at most this many words bound per bursty document
ATTRIBUTES = ("colour", "shape", "count", "size")
GRANULARITIES = ("shape", "colour", "object")
FAKE_URL = "https://tinyworld.invalid"


def _word_pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Invented words (consonant-vowel, consonant-vowel, consonant), split once and for all
    into a training pool and a disjoint pool reserved for evaluation."""
    syllables = [onset + vowel for onset in "bdfgklmnprstvz" for vowel in "aeiou"]
    words = sorted(a + b + coda for a in syllables for b in syllables for coda in "kmnpstx")
    random.Random("tinyworld-words").shuffle(words)
    return tuple(words[64:]), tuple(words[:64])


TRAIN_WORDS, EVAL_WORDS = _word_pools()


# ---------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Thing:
    """One shape of a scene; ``jitter`` moves it inside its cell, as a fraction of the free room."""

    shape: str
    colour: str
    size: str
    position: str
    jitter: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Group:
    """Identical things (same shape, colour and size) of a scene, and where they are."""

    shape: str
    colour: str
    size: str
    positions: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class Scene:
    """What one picture shows; with its ``texture_seed`` it renders the same pixels every time."""

    things: tuple[Thing, ...]
    background: str = "grey"
    style: str = "noise"  # or "gradient"
    texture_seed: int = 0

    def groups(self) -> list[Group]:
        """The things grouped by (shape, colour, size), in order of first appearance."""
        places: dict[tuple[str, str, str], list[str]] = {}
        for t in self.things:
            places.setdefault((t.shape, t.colour, t.size), []).append(t.position)
        return [Group(shape, colour, size, tuple(p)) for (shape, colour, size), p in places.items()]

    def combos(self) -> set[tuple[str, str]]:
        """The (colour, shape) combinations shown."""
        return {(t.colour, t.shape) for t in self.things}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``asdict``, written out: this runs once per image)."""
        things = [{**vars(t), "jitter": list(t.jitter)} for t in self.things]
        return {"things": things, "background": self.background, "style": self.style, "texture_seed": self.texture_seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        things = tuple(Thing(**{**t, "jitter": tuple(t["jitter"])}) for t in data["things"])
        return cls(**{**data, "things": things})


def random_scene(
    rng: random.Random, combos: Sequence[tuple[str, str]] = TRAIN_COMBOS, *, focus: tuple[str, str] | None = None
) -> Scene:
    """One or two groups of identical things (1-4 things in all) at distinct places, their
    (colour, shape) drawn from ``combos``; ``focus`` forces the first group's."""
    n_groups = rng.choice((1, 2))
    total = rng.randint(n_groups, 4)
    counts = [total] if n_groups == 1 else [first := rng.randint(1, total - 1), total - first]
    picks = [focus] if focus else []
    while len(picks) < n_groups:
        combo = rng.choice(combos)
        if combo not in picks:
            picks.append(combo)
    places = iter(_places(rng, total))
    things = []
    for (colour, shape), count in zip(picks, counts):
        size = rng.choice(SIZES)
        things += [_thing(rng, shape, colour, size, next(places)) for _ in range(count)]
    return Scene(tuple(things), **_backdrop(rng))


def uniform_scene(rng: random.Random, colour: str, shape: str, size: str, count: int = 1) -> Scene:
    """``count`` identical things at random places on a random background."""
    things = tuple(_thing(rng, shape, colour, size, place) for place in _places(rng, count))
    return Scene(things, **_backdrop(rng))


def _places(rng: random.Random, n: int) -> list[str]:
    if n == 1 and rng.random() < 0.5:
        return [CENTRE]
    return rng.sample(list(CELLS), n)


def _thing(rng: random.Random, shape: str, colour: str, size: str, position: str) -> Thing:
    jitter = (round(rng.uniform(-1, 1), 3), round(rng.uniform(-1, 1), 3))
    return Thing(shape, colour, size, position, jitter)


def _backdrop(rng: random.Random) -> dict[str, Any]:
    return {
        "background": rng.choice(list(BACKGROUNDS)),
        "style": rng.choice(("noise", "gradient")),
        "texture_seed": rng.getrandbits(32),
    }


# ---------------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (shapes in their exact palette colour)."""
    image = Image.fromarray(_background(scene, size))
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        x, y, r = centre(thing, size)
        colour = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.polygon(_outline(thing.shape, x, y, r), fill=colour)
    return image


def centre(thing: Thing, size: int) -> tuple[float, float, float]:
    """Centre x, y and radius of ``thing`` in pixels, in an image of side ``size``."""
    cx, cy = CELLS.get(thing.position, (0.5, 0.5))
    half = 0.5 if thing.position == CENTRE else 0.25
    radius = RADIUS[thing.size]
    room = max(half - radius - 0.02, 0.0)
    return (cx + thing.jitter[0] * room) * size, (cy + thing.jitter[1] * room) * size, radius * size


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    radii = {
        "square": [r * 1.13] * 4,
        "diamond": [r, r * 0.8] * 2,
        "triangle": [r * 1.1] * 3,
        "star": [r * 1.1, r * 0.45] * 5,
    }[shape]
    start = -math.pi / 4 if shape == "square" else -math.pi / 2
    angles = [start + 2 * math.pi * i / len(radii) for i in range(len(radii))]
    return [(x + d * math.cos(a), y + d * math.sin(a)) for d, a in zip(radii, angles)]


def _background(scene: Scene, size: int) -> np.ndarray:
    """Solid colour with noise, or a horizontal/vertical gradient with a little noise."""
    rng = np.random.default_rng(scene.texture_seed)
    base = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    amplitude = 4 if scene.style == "gradient" else 14
    pixels = base + rng.integers(-amplitude, amplitude + 1, (size, size, 3), dtype=np.int16)
    if scene.style == "gradient":
        direction = int(rng.integers(4))  # down, up, right, left
        ramp = np.linspace(0.65, 1.1, size, dtype=np.float32)[:: 1 - 2 * (direction % 2)]
        shade = ramp[:, None, None] if direction < 2 else ramp[None, :, None]
        pixels = (pixels * shade).astype(np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding (deterministic: same pixels, same bytes); fast zlib level, as the noise
    hardly compresses anyway."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Text: captions and questions


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(group: Group, *, size: bool = True) -> str:
    """``a small red circle`` / ``two blue squares``."""
    words = ([group.size] if size else []) + [group.colour, group.shape + ("s" if group.count > 1 else "")]
    amount = article(words[0]) if group.count == 1 else NUMBERS[group.count]
    return f"{amount} {' '.join(words)}"


def _where(position: str) -> str:
    return f"in the {position}" if position == CENTRE else f"at the {position}"


def caption(scene: Scene, *, size: bool = True) -> str:
    """``a small red circle and two large blue squares on a grey background.``"""
    things = " and ".join(_phrase(g, size=size) for g in scene.groups())
    return f"{things} on a {scene.background} background."


def reference_captions(scene: Scene) -> list[str]:
    """Five paraphrases of the caption (as COCO has five references per image)."""
    groups = scene.groups()
    plain = " and ".join(_phrase(g, size=False) for g in groups)
    placed = " and ".join(
        _phrase(g, size=False) + (f" {_where(g.positions[0])}" if g.count == 1 else "") for g in groups
    )
    return [
        caption(scene),
        caption(scene, size=False),
        f"a picture of {' and '.join(_phrase(g) for g in groups)}.",
        f"a {scene.background} background with {plain}.",
        f"{placed}.",
    ]


@dataclass(frozen=True)
class QA:
    """A question, its short answer, its kind, the answer as a sentence (for chat), and the
    (colour, shape) combination it is about, if any."""

    question: str
    answer: str
    kind: str  # colour, shape, size, count, position, background, exists
    sentence: str
    about: tuple[str, str] | None = None


def questions(scene: Scene) -> list[QA]:
    """Every question the scene answers unambiguously, each once."""
    groups = scene.groups()
    shapes = Counter(g.shape for g in groups)
    colours = Counter(g.colour for g in groups)
    total = len(scene.things)
    qas = [
        QA(
            "how many shapes are there?",
            str(total),
            "count",
            f"there {_be(total)} {NUMBERS[total]} {_plural('shape', total)}.",
        ),
        QA("what color is the background?", scene.background, "background", f"the background is {scene.background}."),
    ]
    for g in groups:
        qas += _group_questions(g, shapes[g.shape] == 1, colours[g.colour] == 1, scene)
    for shape in SHAPES:
        if shape in shapes:
            qas.append(
                QA(f"is there {article(shape)} {shape}?", "yes", "exists", f"yes, there is {article(shape)} {shape}.")
            )
        else:
            qas.append(QA(f"is there {article(shape)} {shape}?", "no", "exists", f"no, there is no {shape}."))
    shown = scene.combos()
    qas += [absent_question(combo) for combo in TRAIN_COMBOS if combo[1] in shapes and combo not in shown]
    return list({qa.question: qa for qa in qas}.values())


def absent_question(combo: tuple[str, str]) -> QA:
    """``is there a red star?`` -> ``no``, about a (colour, shape) the scene does not show."""
    colour, shape = combo
    return QA(
        f"is there {article(colour)} {colour} {shape}?", "no", "exists", f"no, there is no {colour} {shape}.", combo
    )


def _group_questions(g: Group, unique_shape: bool, unique_colour: bool, scene: Scene) -> list[QA]:
    about, be = (g.colour, g.shape), _be(g.count)
    the = f"the {_plural(g.shape, g.count)}"
    n_shape = sum(t.shape == g.shape for t in scene.things)
    qas = [
        QA(
            f"is there {article(g.colour)} {g.colour} {g.shape}?",
            "yes",
            "exists",
            f"yes, there {be} {_phrase(g, size=False)}.",
            about,
        ),
        QA(
            f"how many {g.shape}s are there?",
            str(n_shape),
            "count",
            f"there {_be(n_shape)} {NUMBERS[n_shape]} {_plural(g.shape, n_shape)}.",
            about if n_shape == g.count else None,
        ),
    ]
    if unique_shape:
        qas.append(QA(f"what color {be} {the}?", g.colour, "colour", f"{the} {be} {g.colour}.", about))
        qas.append(QA(f"what size {be} {the}?", g.size, "size", f"{the} {be} {g.size}.", about))
    if unique_colour:
        things = f"the {g.colour} {_plural('object', g.count)}"
        answer = f"{article(g.shape)} {g.shape}" if g.count == 1 else f"{g.shape}s"
        qas.append(QA(f"what shape {be} {things}?", g.shape, "shape", f"{things} {be} {answer}.", about))
    if g.count == 1:
        where = _where(g.positions[0])
        qas.append(
            QA(
                f"where is the {g.colour} {g.shape}?",
                g.positions[0],
                "position",
                f"the {g.colour} {g.shape} is {where}.",
                about,
            )
        )
    return qas


def _be(count: int) -> str:
    return "is" if count == 1 else "are"


def _plural(noun: str, count: int) -> str:
    return noun if count == 1 else noun + "s"


def pick_question(rng: random.Random, qas: Sequence[QA]) -> QA:
    """A question drawn with its kind uniform, then its answer uniform within the kind (which
    balances yes and no), then uniformly."""
    kind = rng.choice(sorted({q.kind for q in qas}))
    answer = rng.choice(sorted({q.answer for q in qas if q.kind == kind}))
    return rng.choice([q for q in qas if q.kind == kind and q.answer == answer])


# ---------------------------------------------------------------------------------------------
# Training documents

Built = tuple[list[Segment], dict[str, Any]]  # a document's segments and meta


def picture(scene: Scene, size: int, role: str | None = None) -> Segment:
    """An image segment holding the PNG of ``scene``, with the scene in ``image.meta["scene"]``."""
    image = ImageRef(data=png_bytes(render(scene, size)), meta={"scene": scene.to_dict()})
    return Segment(image=image, role=role)


def _pair_document(rng: random.Random, size: int) -> Built:
    scene = random_scene(rng)
    return [picture(scene, size), Segment(text=rng.choice(reference_captions(scene)))], {}


TITLES = ("some pictures of shapes.", "a page from a book of shapes.", "my drawings from today.", "shapes and colors.")
FIRST = ("here we have {}", "this picture shows {}", "first, {}", "look at this: {}")
NEXT = ("next to it, {}", "the next picture shows {}", "then {}", "after that, {}", "and here we have {}")


def _interleaved_document(rng: random.Random, size: int) -> Built:
    segments = [Segment(text=rng.choice(TITLES))] if rng.random() < 0.5 else []
    previous = None
    for _ in range(rng.randint(2, 4)):
        scene = random_scene(rng)
        text = rng.choice(NEXT if previous else FIRST).format(caption(scene, size=rng.random() < 0.5))
        if previous and rng.random() < 0.5:
            text += " " + _comparison(previous, scene)
        segments += [picture(scene, size), Segment(text=text)]
        previous = scene
    return segments, {}


def _comparison(before: Scene, after: Scene) -> str:
    a, b = len(before.things), len(after.things)
    if before.background == after.background:
        return f"the background is {after.background} again."
    if a == b:
        return "it has as many shapes as the previous picture."
    return f"it has {'more' if b > a else 'fewer'} shapes than the previous picture."


def _task_document(rng: random.Random, size: int) -> Built:
    task = rng.choice(("vqa", "vqa", "caption"))
    segments = []
    for _ in range(rng.randint(2, 4)):
        scene = random_scene(rng)
        if task == "vqa":
            qa = pick_question(rng, questions(scene))
            text = f"{VQA_PROMPT.format(question=qa.question)} {qa.answer}"
        else:
            text = f"{OUTPUT_PROMPT} {caption(scene)}"
        segments += [picture(scene, size), Segment(text=text)]
    return segments, {"task": task}


def _icl_document(rng: random.Random, size: int) -> Built:
    n = rng.randint(*ICL_EXAMPLES)
    return (_word_document if rng.random() < 0.5 else _attribute_document)(rng, size, n)


def _attribute_document(rng: random.Random, size: int, n: int) -> Built:
    """Every answer names the same attribute (colour, shape, count or size) of the image; only
    the earlier examples tell which, since every image shows all four unambiguously."""
    attribute = rng.choice(ATTRIBUTES)
    segments = []
    for _ in range(n):
        (colour, shape), scale, count = rng.choice(TRAIN_COMBOS), rng.choice(SIZES), rng.randint(1, 4)
        answer = {"colour": colour, "shape": shape, "count": str(count), "size": scale}[attribute]
        scene = uniform_scene(rng, colour, shape, scale, count)
        segments += [picture(scene, size), Segment(text=f"{OUTPUT_PROMPT} {answer}")]
    return segments, {"rule": "attribute", "attribute": attribute}


def _word_document(rng: random.Random, size: int, n: int, granularity: str | None = None) -> Built:
    """Invented words bound, for this document only, to two or three classes (shapes, colours or
    colour+shape objects, drawn Zipf-distributed), each class shown at least twice (bursty)."""
    granularity = granularity or rng.choice(GRANULARITIES)
    k = 2 if n < 6 else rng.choice((2, 3))
    return _bound_words(rng, size, granularity, _zipf_sample(rng, _classes(granularity), k), n)


def _bound_words(rng: random.Random, size: int, granularity: str, classes: list[str], n: int) -> Built:
    """``n`` examples naming ``classes`` with invented words fresh to this document: every class
    twice, the rest drawn uniformly among them, in shuffled order."""
    words = rng.sample(TRAIN_WORDS, len(classes))
    sequence = classes * 2 + [rng.choice(classes) for _ in range(n - 2 * len(classes))]
    rng.shuffle(sequence)
    segments = []
    for label in sequence:
        colour, shape = _exemplar(rng, granularity, label)
        scene = uniform_scene(rng, colour, shape, "large")
        segments += [picture(scene, size), Segment(text=f"{OUTPUT_PROMPT} {words[classes.index(label)]}")]
    binding = {word: label for word, label in zip(words, classes)}
    return segments, {"rule": "words", "granularity": granularity, "binding": binding}


def _bursty_document(rng: random.Random, size: int, granularity: str | None = None) -> Built:
    """A long in-context document (Chan et al. 2022's bursty distribution): 8-16 examples binding
    2-6 invented words, fresh for this document, to classes drawn from many; every class shown at
    least twice and the rest drawn uniformly, so that only matching the picture to an earlier one
    names it: neither the most frequent word nor the latest one does better than chance."""
    granularity = granularity or rng.choice(GRANULARITIES)
    n = rng.randint(*BURSTY_EXAMPLES)
    pool = _classes(granularity)
    k = rng.randint(2, min(BURSTY_CLASSES, n // 2, len(pool)))
    segments, meta = _bound_words(rng, size, granularity, _zipf_sample(rng, pool, k, exponent=0.5), n)
    return segments, {**meta, "bursty": True}


def _classes(granularity: str) -> list[str]:
    """The classes of a granularity, most frequent first (the Zipf ranks)."""
    if granularity == "shape":
        return list(SHAPES)
    if granularity == "colour":
        return list(COLOURS)
    return [f"{colour} {shape}" for colour, shape in TRAIN_COMBOS]


def _zipf_sample(rng: random.Random, items: list[str], k: int, exponent: float = 1.0) -> list[str]:
    """``k`` distinct items, drawn with probability proportional to ``1 / rank**exponent``."""
    pool = list(items)
    weights = [1 / (rank + 1) ** exponent for rank in range(len(pool))]
    chosen = []
    for _ in range(k):
        i = rng.choices(range(len(pool)), weights)[0]
        chosen.append(pool.pop(i))
        weights.pop(i)
    return chosen


def _exemplar(rng: random.Random, granularity: str, label: str) -> tuple[str, str]:
    """A training (colour, shape) of class ``label``."""
    if granularity == "shape":
        return rng.choice([c for c in TRAIN_COMBOS if c[1] == label])
    if granularity == "colour":
        return rng.choice([c for c in TRAIN_COMBOS if c[0] == label])
    colour, shape = label.split()
    return colour, shape


# ---------------------------------------------------------------------------------------------
# Documents that teach drawing (MM-Interleaved): the text comes first, then the image it describes


def drawn_scene(
    rng: random.Random, combos: Sequence[tuple[str, str]] = TRAIN_COMBOS, *, held_out: bool = False
) -> Scene:
    """A picture of one kind of thing, 1-4 of them, which a caption describes completely
    (colour, shape, count, size and background): one whose description is drawing-held-out
    (:func:`drawing_held_out`) if ``held_out``, else one whose description is not."""
    while True:
        colour, shape = rng.choice(combos)
        scene = uniform_scene(rng, colour, shape, rng.choice(SIZES), rng.randint(1, 4))
        if drawing_held_out(scene) == held_out:
            return scene


def drawing_held_out(scene: Scene) -> bool:
    """Whether no training document draws a picture of this description (colour, shape, count,
    size, background): a fixed tenth of the descriptions, chosen by hash, kept for evaluation."""
    (group,) = scene.groups()
    key = f"{group.colour} {group.shape} {group.count} {group.size} {scene.background}"
    return hashlib.sha256(key.encode()).digest()[0] % 10 == 0


def _story_document(rng: random.Random, size: int) -> Built:
    """One to three pictures, each after the caption that announces it with :data:`BEGIN_OF_IMAGE`."""
    title = rng.choice(TITLES) + " " if rng.random() < 0.5 else ""
    segments = []
    for k in range(rng.randint(1, 3)):
        scene = drawn_scene(rng)
        text = rng.choice(NEXT if k else FIRST).format(caption(scene))
        segments += [Segment(text=(title if k == 0 else "") + text + BEGIN_OF_IMAGE), picture(scene, size)]
    return segments, {}


def _variation_document(rng: random.Random, size: int) -> Built:
    """A picture, then one that keeps its shape in another colour (or its colour with another
    shape), the count, size and background too: only the first picture tells what to keep."""
    while True:
        first = drawn_scene(rng)
        text, second = variation(rng, first)
        if not drawing_held_out(second):
            return [picture(first, size), Segment(text=text + BEGIN_OF_IMAGE), picture(second, size)], {}


def variation(rng: random.Random, scene: Scene, keep: str | None = None) -> tuple[str, Scene]:
    """``the same shape in blue.`` (``keep="shape"``) or ``the same color, but stars.``
    (``keep="colour"``) and the scene it asks for: ``scene`` with its colour or shape changed."""
    (group,) = scene.groups()
    keep = keep or rng.choice(("shape", "colour"))
    if keep == "shape":
        colour, shape = rng.choice([c for c in TRAIN_COMBOS if c[1] == group.shape and c[0] != group.colour])
        text = f"the same shape in {colour}."
    else:
        colour, shape = rng.choice([c for c in TRAIN_COMBOS if c[0] == group.colour and c[1] != group.shape])
        text = f"the same color, but {shape}s."
    things = tuple(dataclasses.replace(t, colour=colour, shape=shape) for t in scene.things)
    return text, dataclasses.replace(scene, things=things, texture_seed=rng.getrandbits(32))


@dataclass(frozen=True)
class DrawingPrompt:
    """A held-out prompt to draw from: ``prompt`` (text and earlier pictures, an interleaved
    list) asks for ``scene``; ``checks`` are the attributes the prompt determines."""

    prompt: tuple[Any, ...]
    scene: Scene
    checks: tuple[str, ...]


def drawing_prompts(
    seed: int = 0, n: int = 60, *, combos: Sequence[tuple[str, str]] = TRAIN_COMBOS
) -> list[DrawingPrompt]:
    """Captions to draw, as a story document opens (``here we have two large red circles on
    a grey background.``), of descriptions no training document draws (:func:`drawing_held_out`);
    ``combos=HELD_OUT`` asks for colour+shape combinations no training picture shows at all."""
    prompts = []
    for i in range(n):
        rng = random.Random(f"tinyworld/{seed}/draw/{i}")
        scene = drawn_scene(rng, sorted(combos), held_out=True)
        text = rng.choice(FIRST).format(caption(scene))
        prompts.append(DrawingPrompt((text,), scene, ("colour", "shape", "count", "size", "background")))
    return prompts


def variation_prompts(seed: int = 0, n: int = 60, *, keep: str = "shape", image_size: int = 32) -> list[DrawingPrompt]:
    """A picture and ``the same shape in blue.`` (``keep="shape"``): the shape, count, size and
    background must come from the picture, the colour from the text."""
    prompts = []
    for i in range(n):
        rng = random.Random(f"tinyworld/{seed}/variation/{i}")
        while True:  # the picture asked for has a description no training document draws
            first = drawn_scene(rng)
            text, second = variation(rng, first, keep)
            if drawing_held_out(second):
                break
        image = render(first, image_size)
        prompts.append(DrawingPrompt((image, text), second, ("colour", "shape", "count", "size", "background")))
    return prompts


def read_caption(text: str) -> dict[str, str]:
    """The attributes a caption of one kind of thing names (``two large red circles on a grey
    background.`` -> count 2, size large, colour red, shape circle, background grey): each the
    first of its kind in the text (a number or article only right before a size, colour or
    shape), absent when the text names none."""
    words = re.findall(r"[a-z]+", text.lower())
    kinds = {
        "size": {s: s for s in SIZES},
        "colour": {c: c for c in COLOURS},
        "shape": {s: s for s in SHAPES} | {s + "s": s for s in SHAPES},
    }
    numbers = {word: str(n) for n, word in enumerate(NUMBERS) if n} | {"a": "1", "an": "1"}
    found: dict[str, str] = {}
    for word, after in zip(words, [*words[1:], ""]):
        for kind, values in kinds.items():
            if kind not in found and word in values:
                found[kind] = values[word]
        if "count" not in found and word in numbers and any(after in values for values in kinds.values()):
            found["count"] = numbers[word]
        if "background" not in found and word in BACKGROUNDS and after == "background":
            found["background"] = word
    return found


OPENERS = ("describe this image.", "what is in this picture?", "what do you see?")


def _chat_document(rng: random.Random, size: int) -> Built:
    scene = random_scene(rng)
    segments = [
        picture(scene, size, role="user"),
        Segment(text=rng.choice(OPENERS), role="user"),
        Segment(text=f"the picture shows {caption(scene)}", role="assistant"),
    ]
    qas = questions(scene)
    for _ in range(rng.randint(0, 2)):
        qa = pick_question(rng, qas)
        qas.remove(qa)
        segments += [Segment(text=qa.question, role="user"), Segment(text=qa.sentence, role="assistant")]
    return segments, {}


BUILDERS: dict[str, Callable[[random.Random, int], Built]] = {
    "pair": _pair_document,
    "interleaved": _interleaved_document,
    "task": _task_document,
    "icl": _icl_document,
    "chat": _chat_document,
    "story": _story_document,  # text, then the image it describes: teaches drawing
    "variation": _variation_document,
    # one rule only, for mixtures that want more of it than "icl" gives
    "icl_words": lambda rng, size: _word_document(rng, size, rng.randint(*ICL_EXAMPLES)),
    "icl_attribute": lambda rng, size: _attribute_document(rng, size, rng.randint(*ICL_EXAMPLES)),
    "icl_bursty": _bursty_document,
    **{f"icl_bursty_{g}": partial(_bursty_document, granularity=g) for g in GRANULARITIES},
    **{
        f"icl_{granularity}_words": partial(
            lambda rng, size, granularity: _word_document(rng, size, rng.randint(*ICL_EXAMPLES), granularity),
            granularity=granularity,
        )
        for granularity in GRANULARITIES
    },
}


def iter_train_documents(
    seed: int = 0, n: int = 2000, *, image_size: int = 32, mix: dict[str, float] | None = None
) -> Iterator[Document]:
    """``n`` training documents; the kind of each is drawn with the weights of ``mix`` (default
    :data:`DEFAULT_MIX`) and stored in ``meta["kind"]`` with the kind's details (the rule of an
    ``icl`` document, the task of a ``task`` one). Document ``i`` depends only on ``seed`` and ``i``."""
    mix = DEFAULT_MIX if mix is None else mix
    unknown = sorted(set(mix) - set(BUILDERS))
    if unknown:
        raise ValueError(f"mix: unknown document kind {unknown[0]!r}; the kinds are {', '.join(sorted(BUILDERS))}")
    bad = [kind for kind, weight in mix.items() if not (isinstance(weight, int | float) and weight >= 0)]
    if bad or not any(mix.values()):
        raise ValueError(
            f"mix: weight {mix[bad[0]]!r} of {bad[0]!r} is not a number >= 0"
            if bad
            else "mix: no kind has a weight > 0"
        )
    return _documents(seed, n, image_size, mix)


def _documents(seed: int, n: int, image_size: int, mix: dict[str, float]) -> Iterator[Document]:
    kinds = sorted(mix)
    weights = [mix[kind] for kind in kinds]
    for i in range(n):
        rng = random.Random(f"tinyworld/{seed}/train/{i}")
        kind = rng.choices(kinds, weights)[0]
        segments, meta = BUILDERS[kind](rng, image_size)
        yield Document(id=f"train-{i:06d}", segments=segments, source="tinyworld", meta={"kind": kind, **meta})


# ---------------------------------------------------------------------------------------------
# Held-out evaluation tasks


@dataclass(frozen=True)
class EvalItem:
    """One evaluation example: an image, the prompt that follows it (the answer comes after one
    space), and the accepted answers (10 human answers for VQA, 5 reference captions, or the
    class name)."""

    id: str
    image_id: int
    image: bytes
    prompt: str
    answers: tuple[str, ...]
    question: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class EvalTask:
    """A held-out task: ``support`` holds the items demonstrations are drawn from (written as the
    ``train`` split), ``test`` the queries; ``classnames`` the labels ranked in classification."""

    name: str
    kind: str  # captioning, vqa, classification
    support: tuple[EvalItem, ...]
    test: tuple[EvalItem, ...]
    classnames: tuple[str, ...] = ()


def eval_classnames(seed: int = 0) -> tuple[str, ...]:
    """The invented class names of the classification task, one per colour of :data:`COLOURS`."""
    return tuple(random.Random(f"tinyworld/{seed}/classnames").sample(EVAL_WORDS, len(COLOURS)))


Made = tuple[Scene, dict[str, Any]]  # an eval item's scene, and its EvalItem fields but id and image


def _caption_item(rng: random.Random, index: int) -> Made:
    scene = random_scene(rng, ALL_COMBOS, focus=rng.choice(sorted(HELD_OUT)))
    return scene, {"prompt": OUTPUT_PROMPT, "answers": tuple(reference_captions(scene)), "meta": {}}


def _vqa_item(rng: random.Random, index: int) -> Made:
    """A question about the held-out combination the picture shows (or about one it does not show)."""
    focus = rng.choice(sorted(HELD_OUT))
    scene = random_scene(rng, ALL_COMBOS, focus=focus)
    absent = [absent_question(combo) for combo in sorted(HELD_OUT - scene.combos())]
    qa = pick_question(rng, [q for q in questions(scene) if q.about == focus] + absent)
    return scene, {
        "prompt": VQA_PROMPT.format(question=qa.question),
        "answers": human_answers(rng, qa.answer),
        "question": qa.question,
        "meta": {"answer": qa.answer, "kind": qa.kind},
    }


def _classification_item(rng: random.Random, index: int, classnames: Sequence[str]) -> Made:
    colour = list(COLOURS)[index % len(COLOURS)]  # balanced classes: 0-shot is at chance
    shape = rng.choice([s for c, s in TRAIN_COMBOS if c == colour])
    scene = uniform_scene(rng, colour, shape, "large")
    label = index % len(COLOURS)
    return scene, {"prompt": OUTPUT_PROMPT, "answers": (classnames[label],), "meta": {}}


VARIANTS = {
    **{str(n): (NUMBERS[n],) for n in range(1, 5)},
    "top left": ("upper left", "top left corner"),
    "top right": ("upper right", "top right corner"),
    "bottom left": ("lower left", "bottom left corner"),
    "bottom right": ("lower right", "bottom right corner"),
    CENTRE: ("middle", "centre"),
    "grey": ("gray",),
    "purple": ("violet",),
}


def human_answers(rng: random.Random, answer: str) -> tuple[str, ...]:
    """Ten annotator answers: at least seven the canonical one, the rest small variations."""
    answers = [answer] * 10
    variants = VARIANTS.get(answer, ())
    for i in rng.sample(range(10), rng.choice((0, 0, 1, 1, 2, 3)) if variants else 0):
        answers[i] = rng.choice(variants)
    return tuple(answers)


def eval_tasks(
    seed: int = 0, n: int = 100, *, n_support: int | None = None, image_size: int = 32
) -> dict[str, EvalTask]:
    """The held-out tasks ``captioning``, ``vqa`` and ``classification``, each with ``n`` test
    items and ``n_support`` (default ``n``) support items to draw demonstrations from."""
    n_support = n if n_support is None else n_support
    classnames = eval_classnames(seed)
    makers = {
        "captioning": _caption_item,
        "vqa": _vqa_item,
        "classification": partial(_classification_item, classnames=classnames),
    }
    tasks = {}
    for name, make in makers.items():
        support, test = (
            _items(seed, name, split, k, make, image_size) for split, k in (("support", n_support), ("test", n))
        )
        names = classnames if name == "classification" else ()
        tasks[name] = EvalTask(f"tinyworld_{name}", name, support, test, classnames=names)
    return tasks


def _items(
    seed: int, task: str, split: str, count: int, make: Callable[[random.Random, int], Made], size: int
) -> tuple[EvalItem, ...]:
    """Items ``0..count-1`` of one split; image ids are 1,000,000 + i (support) or 2,000,000 + i (test)."""
    offset = 1_000_000 if split == "support" else 2_000_000
    items = []
    for i in range(count):
        scene, fields = make(random.Random(f"tinyworld/{seed}/eval/{task}/{split}/{i}"), i)
        fields["meta"] = {"scene": scene.to_dict(), **fields["meta"]}
        image = png_bytes(render(scene, size))
        items.append(EvalItem(id=f"{task}-{split}-{i:05d}", image_id=offset + i, image=image, **fields))
    return tuple(items)


# ---------------------------------------------------------------------------------------------
# Writing in the field's file layouts


def write(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_eval: int = 100,
    n_support: int | None = None,
    image_size: int = 32,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the tiny world under ``out_dir`` and return its manifest (also ``manifest.json``).

    Layout::

        train/mmc4/docs.jsonl, train/mmc4/images/*.png   interleaved, task and icl documents (MMC4)
        train/pairs.parquet                              pairs: image {bytes, path} struct, caption, url, key
        train/llava.json, train/llava_images/*.png       chat (LLaVA-665k)
        eval/captioning/dataset_tinyworld.json, images/  COCO Karpathy json, splits train (support) and test
        eval/vqa/{train,test}_{questions,annotations}.json, images/<image_id:012d>.png   VQAv2
        eval/classification/classnames.json, {train,test}/<class name>/<n:05d>.png      ImageNet-style

    A directory already holding a tiny world of the same configuration is returned as it is
    (a cache); one of another configuration, or anything else, is an error unless ``overwrite``.
    The world is written to a sibling ``.staging`` directory and renamed into place when done.
    """
    out = Path(out_dir)
    config = {"seed": seed, "n_train": n_train, "n_eval": n_eval, "image_size": image_size}
    config["n_support"] = n_eval if n_support is None else n_support
    cached = _cached(out, config, overwrite)
    if cached is not None:
        return cached
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    counts = _write_train(staging / "train", iter_train_documents(seed, n_train, image_size=image_size))
    tasks = eval_tasks(seed, n_eval, n_support=config["n_support"], image_size=image_size)
    counts["eval"] = _write_eval(staging / "eval", tasks)
    manifest = _manifest(staging, config, counts, tasks["classification"].classnames)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return manifest


def _cached(out: Path, config: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of the tiny world of ``config`` already in ``out``; None when ``out`` may be
    (over)written; an error when it holds something else."""
    manifest_file = out / "manifest.json"
    if manifest_file.is_file() and not overwrite:
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("config") == config and manifest.get("version") == VERSION:
            return manifest
        raise FileExistsError(
            f"{out} holds a tiny world of {manifest.get('config')}; pass overwrite=True to replace it"
        )
    if out.exists() and any(out.iterdir()) and not manifest_file.is_file():
        raise FileExistsError(f"{out} exists and is neither empty nor a tiny world")
    return None


def _manifest(root: Path, config: dict[str, Any], counts: dict[str, Any], classnames: Sequence[str]) -> dict[str, Any]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {
        "format": "interleaf-tinyworld",
        "version": VERSION,
        "config": config,
        "counts": {**counts, "files": len(files)},
        "sha256": _tree_hash(root, files),
        "held_out_combinations": [f"{colour} {shape}" for colour, shape in sorted(HELD_OUT)],
        "classification": {"classnames": list(classnames), "bound_to_colours": list(COLOURS)},
        "prompts": {"vqa": VQA_PROMPT, "output": OUTPUT_PROMPT},
    }


def _tree_hash(root: Path, files: Iterable[Path]) -> str:
    """One sha256 over the relative paths and contents of ``files``."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _write_train(root: Path, documents: Iterable[Document]) -> dict[str, Any]:
    """Pairs to parquet, chats to LLaVA json, the other kinds to MMC4 jsonl; returns the counts
    of documents by kind (``train``) and of images (``train_images``)."""
    for folder in ("mmc4/images", "llava_images"):
        (root / folder).mkdir(parents=True)
    kinds: Counter[str] = Counter()
    images = 0
    pairs, chats = [], []
    with (root / "mmc4" / "docs.jsonl").open("w") as mmc4:
        for doc in documents:
            kinds[doc.meta["kind"]] += 1
            images += len(doc.images)
            if doc.meta["kind"] == "pair":
                pairs.append(_pair_row(doc))
            elif doc.is_chat:
                chats.append(_llava_record(doc, root / "llava_images"))
            else:
                mmc4.write(json.dumps(_mmc4_record(doc, root / "mmc4" / "images")) + "\n")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("caption", pa.string()), ("url", pa.string()), ("key", pa.string())])
    pq.write_table(pa.Table.from_pylist(pairs, schema=schema), root / "pairs.parquet")
    (root / "llava.json").write_text(json.dumps(chats, indent=1))
    return {"train": dict(sorted(kinds.items())), "train_images": images}


def _mmc4_record(doc: Document, image_dir: Path) -> dict[str, Any]:
    """MMC4 places each image before the sentence at its ``matched_text_index``: the text segment
    right after the image here, so reading it back gives the same order."""
    text_list: list[str] = []
    image_info = []
    for segment in doc.segments:
        if segment.text is not None:
            text_list.append(segment.text)
            continue
        name = f"{doc.id}-{len(image_info)}.png"
        (image_dir / name).write_bytes(segment.image.data)
        info = {"image_name": name, "raw_url": f"{FAKE_URL}/images/{name}", "matched_text_index": len(text_list)}
        image_info.append({**info, "matched_sim": 1.0})
    similarity = [[float(i["matched_text_index"] == t) for t in range(len(text_list))] for i in image_info]
    return {
        "url": f"{FAKE_URL}/docs/{doc.id}",
        "text_list": text_list,
        "image_info": image_info,
        "similarity_matrix": similarity,
        "could_have_url_duplicate": 0,
    }


def _pair_row(doc: Document) -> dict[str, Any]:
    image, text = doc.segments
    name = f"{doc.id}.png"
    return {
        "image": {"bytes": image.image.data, "path": name},
        "caption": text.text,
        "url": f"{FAKE_URL}/images/{name}",
        "key": doc.id,
    }


def _llava_record(doc: Document, image_dir: Path) -> dict[str, Any]:
    name = f"{doc.id}.png"
    (image_dir / name).write_bytes(doc.images[0].data)
    turns = [s for s in doc.segments if s.text is not None]
    conversations = [{"from": "human" if s.role == "user" else "gpt", "value": s.text} for s in turns]
    conversations[0]["value"] = "<image>\n" + conversations[0]["value"]
    return {"id": doc.id, "image": name, "conversations": conversations}


def _write_eval(root: Path, tasks: dict[str, EvalTask]) -> dict[str, int]:
    _write_captioning(root / "captioning", tasks["captioning"])
    _write_vqa(root / "vqa", tasks["vqa"])
    _write_classification(root / "classification", tasks["classification"])
    return {
        f"{name}_{split}": len(getattr(task, split)) for name, task in tasks.items() for split in ("support", "test")
    }


def _splits(task: EvalTask) -> list[tuple[str, tuple[EvalItem, ...]]]:
    return [("train", task.support), ("test", task.test)]


def _write_captioning(root: Path, task: EvalTask) -> None:
    """COCO Karpathy layout: ``{"images": [{"filepath", "filename", "imgid", "split", "sentids",
    "sentences": [{"raw", "tokens", "imgid", "sentid"}], "cocoid"}], "dataset"}``."""
    (root / "images").mkdir(parents=True)
    images, sentid = [], 0
    for split, items in _splits(task):
        for item in items:
            imgid = len(images)
            (root / "images" / f"{item.id}.png").write_bytes(item.image)
            sentences = [
                {"raw": raw, "tokens": re.findall(r"[a-z0-9]+", raw.lower()), "imgid": imgid, "sentid": sentid + j}
                for j, raw in enumerate(item.answers)
            ]
            sentid += len(sentences)
            images.append(
                {
                    "filepath": "images",
                    "filename": f"{item.id}.png",
                    "imgid": imgid,
                    "split": split,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                    "cocoid": item.image_id,
                }
            )
    (root / "dataset_tinyworld.json").write_text(json.dumps({"images": images, "dataset": "tinyworld"}))


ANSWER_TYPES = {"exists": "yes/no", "count": "number"}
QUESTION_TYPES = {
    "colour": "what color",
    "size": "what size",
    "shape": "what shape",
    "count": "how many",
    "position": "where is the",
    "exists": "is there a",
}


def _write_vqa(root: Path, task: EvalTask) -> None:
    """VQAv2 layout: ``{split}_questions.json`` and ``{split}_annotations.json`` (question id =
    image id * 1000), images ``images/<image_id:012d>.png``."""
    (root / "images").mkdir(parents=True)
    for split, items in _splits(task):
        questions_, annotations = [], []
        for item in items:
            (root / "images" / f"{item.image_id:012d}.png").write_bytes(item.image)
            ids = {"image_id": item.image_id, "question_id": item.image_id * 1000}
            questions_.append({**ids, "question": item.question})
            answers = [
                {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(item.answers)
            ]
            annotations.append(
                {
                    **ids,
                    "answers": answers,
                    "multiple_choice_answer": item.meta["answer"],
                    "answer_type": ANSWER_TYPES.get(item.meta["kind"], "other"),
                    "question_type": QUESTION_TYPES[item.meta["kind"]],
                }
            )
        header = {"info": {"description": "tiny world"}, "data_type": "tinyworld", "data_subtype": split}
        (root / f"{split}_questions.json").write_text(
            json.dumps({**header, "task_type": "Open-Ended", "questions": questions_})
        )
        (root / f"{split}_annotations.json").write_text(json.dumps({**header, "annotations": annotations}))


def _write_classification(root: Path, task: EvalTask) -> None:
    """ImageNet-style folders ``{train,test}/<class name>/<n:05d>.png`` and ``classnames.json``
    (the class names in label order)."""
    for split, items in _splits(task):
        seen: Counter[str] = Counter()
        for item in items:
            label = item.answers[0]
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{seen[label]:05d}.png").write_bytes(item.image)
            seen[label] += 1
    (root / "classnames.json").write_text(json.dumps(list(task.classnames)))

"""Readers for the standard benchmark file layouts; each returns a list of :class:`Example`.

A task names its reader and the reader's arguments (see :mod:`interleaf.eval.tasks`). Images
are referenced by path, never decoded here, but each image file must exist. Bad input (a
missing file or field, VQA questions and annotations that do not pair up, a missing image, an
empty split) is a ``ValueError`` that names the file and the record.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from interleaf.data.schema import ImageRef
from interleaf.eval.task import Example

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""Files of an image folder that count as images (case-insensitive)."""

LETTERS = string.ascii_uppercase


def karpathy(path: str | Path, image_dir: str | Path, split: str | Sequence[str]) -> list[Example]:
    """COCO / Flickr30K captions in Karpathy's split json.

    ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}], "cocoid" or "imgid"}]}``;
    an image lies at ``image_dir/filepath/filename`` (COCO: ``filepath`` is train2014 or val2014)
    or ``image_dir/filename`` (Flickr30K). ``split`` is one split name or several (Karpathy's
    ``["train", "restval"]``). The answers are the reference sentences (``raw``, stripped of
    surrounding whitespace); the id is ``cocoid`` (else ``imgid``).
    """
    path, image_dir = Path(path), Path(image_dir)
    splits = {split} if isinstance(split, str) else set(split)
    records = _list_field(_load_json(path), "images", str(path))
    examples = []
    for i, record in enumerate(records):
        where = f"{path}: images[{i}]"
        if _field(record, "split", where) in splits:
            examples.append(_karpathy_example(record, image_dir, where))
    return _nonempty(examples, path, f"images of split {sorted(splits)}")


def _karpathy_example(record: dict[str, Any], image_dir: Path, where: str) -> Example:
    key = "cocoid" if "cocoid" in record else "imgid"
    ident = _field(record, key, where)
    where = f"{where} ({key} {ident})"
    folder = image_dir / record["filepath"] if record.get("filepath") else image_dir
    sentences = _list_field(record, "sentences", where)
    answers = tuple(str(_field(s, "raw", f"{where}: sentences[{j}]")).strip() for j, s in enumerate(sentences))
    if not answers:
        raise ValueError(f"{where}: no reference sentences")
    return Example(id=str(ident), image=_image(folder / _field(record, "filename", where), where), answers=answers)


def vqa(
    questions: str | Path, annotations: str | Path, image_dir: str | Path, image_pattern: str = "{image_id}"
) -> list[Example]:
    """VQAv2 / OK-VQA questions and annotations json (and VizWiz, TextVQA in that format).

    ``{"questions": [{"question_id", "image_id", "question"}]}`` and
    ``{"annotations": [{"question_id", "answers": [{"answer"}]}]}``, paired by question id; the
    answers are the (ten) human answers. The image is ``image_dir / image_pattern.format(image_id=...)``,
    e.g. ``COCO_val2014_{image_id:012d}.jpg`` (VQAv2, OK-VQA), ``{image_id}`` (VizWiz, whose ids are
    file names), ``{image_id}.jpg`` (TextVQA).
    """
    q_path, a_path, image_dir = Path(questions), Path(annotations), Path(image_dir)
    answers = _vqa_answers(a_path)
    records = _list_field(_load_json(q_path), "questions", str(q_path))
    asked = [_field(record, "question_id", f"{q_path}: questions[{i}]") for i, record in enumerate(records)]
    _check_pairing(asked, answers, q_path, a_path)
    examples = []
    for i, (qid, record) in enumerate(zip(asked, records)):
        where = f"{q_path}: questions[{i}] (question_id {qid})"
        image = image_dir / _image_name(image_pattern, _field(record, "image_id", where), where)
        question = str(_field(record, "question", where))
        examples.append(Example(str(qid), _image(image, where), {"question": question}, answers[qid]))
    return _nonempty(examples, q_path, "questions")


def _vqa_answers(path: Path) -> dict[Any, tuple[str, ...]]:
    """Question id -> the human answers of an annotations file."""
    answers: dict[Any, tuple[str, ...]] = {}
    for i, record in enumerate(_list_field(_load_json(path), "annotations", str(path))):
        where = f"{path}: annotations[{i}]"
        qid = _field(record, "question_id", where)
        where = f"{where} (question_id {qid})"
        if qid in answers:
            raise ValueError(f"{where}: duplicate question id")
        given = _list_field(record, "answers", where)
        answers[qid] = tuple(str(_field(a, "answer", f"{where}: answers[{j}]")) for j, a in enumerate(given))
        if not answers[qid]:
            raise ValueError(f"{where}: no answers")
    return answers


def _check_pairing(asked: list[Any], answers: dict[Any, tuple[str, ...]], q_path: Path, a_path: Path) -> None:
    """Every question has one annotation and every annotation one question."""
    seen: set[Any] = set()
    for qid in asked:
        if qid in seen:
            raise ValueError(f"{q_path}: duplicate question id {qid!r}")
        seen.add(qid)
    unanswered = [qid for qid in asked if qid not in answers]
    unasked = [qid for qid in answers if qid not in seen]
    if unanswered or unasked:
        raise ValueError(
            f"mismatched question ids between {q_path} and {a_path}: "
            f"{len(unanswered)} question(s) without an annotation (e.g. {unanswered[:3]}), "
            f"{len(unasked)} annotation(s) without a question (e.g. {unasked[:3]})"
        )


def _image_name(pattern: str, image_id: Any, where: str) -> str:
    try:
        return pattern.format(image_id=image_id)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{where}: image pattern {pattern!r} does not fit image_id {image_id!r}: {e}") from None


def hateful_memes(path: str | Path, image_dir: str | Path) -> list[Example]:
    """HatefulMemes jsonl: ``{"id", "img", "label", "text"}`` per line.

    ``img`` (``img/42953.png``) is taken relative to ``image_dir`` (the dataset folder); where no
    file is there, ``image_dir`` is taken to be the ``img`` folder itself. The label (1 = hateful)
    gives the answer ``yes`` or ``no``; files without labels (the unlabeled test splits) are errors.
    """
    path, image_dir = Path(path), Path(image_dir)
    examples = []
    for line, record in _read_jsonl(path):
        ident = _field(record, "id", f"{path}:{line}")
        where = f"{path}:{line} (id {ident})"
        label = _field(record, "label", where, hint="evaluation needs labels; the unlabeled test splits have none")
        if label not in (0, 1) or isinstance(label, bool):
            raise ValueError(f"{where}: label must be 0 or 1, got {label!r}")
        label = int(label)
        img = str(_field(record, "img", where))
        image = image_dir / img if (image_dir / img).is_file() else image_dir / Path(img).name
        fields = {"text": str(_field(record, "text", where))}
        answer = ("yes",) if label == 1 else ("no",)
        examples.append(Example(str(ident), _image(image, where), fields, answer, label=label))
    return _nonempty(examples, path, "memes")


def image_folder(root: str | Path, classnames: str | Path | None = None) -> list[Example]:
    """ImageNet-style ``root/<class folder>/<image file>``.

    Without ``classnames`` the folder names are the class names. ``classnames`` is a json file:
    a list of class names that name the folders (their order is the order of the options), or a
    mapping folder -> class name (ImageNet's synset -> name). Every example's options are all the
    class names; its answer is its class name; its id is ``<split>/<folder>/<file name>``, the
    split being the name of ``root`` (``val/n01440764/ILSVRC2012_val_00000001.JPEG``).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory of class folders")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names, options = _class_names(folders, Path(classnames) if classnames is not None else None, root)
    split = root.resolve().name
    examples = []
    for folder in folders:
        for file in sorted((root / folder).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                ident = f"{split}/{folder}/{file.name}"
                examples.append(Example(ident, ImageRef(path=str(file)), answers=(names[folder],), options=options))
    return _nonempty(examples, root, "images in class folders")


def _class_names(folders: list[str], classnames: Path | None, root: Path) -> tuple[dict[str, str], tuple[str, ...]]:
    """Folder -> class name, and all class names in option order."""
    if classnames is None:
        return {f: f for f in folders}, tuple(folders)
    given = _load_json(classnames)
    if isinstance(given, list):
        mapping, options = {str(n): str(n) for n in given}, tuple(str(n) for n in given)
    elif isinstance(given, dict):
        mapping = {str(k): str(v) for k, v in given.items()}
        options = tuple(mapping.values())
    else:
        raise ValueError(f"{classnames}: expected a json list of class names or a mapping folder -> name")
    duplicates = sorted(n for n, count in Counter(options).items() if count > 1)
    if duplicates:
        raise ValueError(f"{classnames}: class names must be distinct to be ranked; repeated: {duplicates[:5]}")
    unknown = [f for f in folders if f not in mapping]
    if unknown:
        raise ValueError(f"{root}: class folder(s) {unknown[:5]} are not named in {classnames}")
    return {f: mapping[f] for f in folders}, options


def multiple_choice(path: str | Path, image_dir: str | Path | None = None, image_only: bool = False) -> list[Example]:
    """ScienceQA / MMBench-style jsonl: ``{"id", "image"?, "question", "choices": [...], "answer"}``.

    The options are the choice letters ``A``, ``B``, ...; the answer is the correct letter, given in
    the file as a 0-based index, as the text of the choice, or as the letter. The fields are
    ``question`` and ``choices``, the latter rendered ``"A. first\\nB. second"``. Images are
    relative to ``image_dir`` (default: the file's folder); an item without one has ``image=None``,
    or is left out with ``image_only`` (e.g. ScienceQA-IMG).
    """
    path = Path(path)
    image_dir = path.parent if image_dir is None else Path(image_dir)
    examples = []
    for line, record in _read_jsonl(path):
        ident = _field(record, "id", f"{path}:{line}")
        where = f"{path}:{line} (id {ident})"
        image = _image(image_dir / record["image"], where) if record.get("image") else None
        if image is None and image_only:
            continue
        choices = [str(c) for c in _list_field(record, "choices", where)]
        if not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"{where}: expected 2 to {len(LETTERS)} choices, got {len(choices)}")
        letters = tuple(LETTERS[: len(choices)])
        fields = {
            "question": str(_field(record, "question", where)),
            "choices": "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices)),
        }
        answer = _choice_letter(_field(record, "answer", where), choices, where)
        examples.append(Example(str(ident), image, fields, (answer,), options=letters))
    return _nonempty(examples, path, "items with an image" if image_only else "items")


def _choice_letter(answer: Any, choices: list[str], where: str) -> str:
    """The letter of the correct choice, from an index, a choice's text, or a letter."""
    letters = LETTERS[: len(choices)]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return letters[answer]
    if isinstance(answer, str) and answer in choices:
        return letters[choices.index(answer)]
    if isinstance(answer, str) and len(answer) == 1 and answer in letters:
        return answer
    raise ValueError(f"{where}: answer {answer!r} is neither an index, a letter nor the text of one of {choices}")


READERS: dict[str, Callable[..., list[Example]]] = {
    "karpathy": karpathy,
    "vqa": vqa,
    "hateful_memes": hateful_memes,
    "image_folder": image_folder,
    "multiple_choice": multiple_choice,
}
"""The readers a task may name."""


# ---------------------------------------------------------------------------------------------
# Shared checks


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read json: {e}") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid json: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a json object, got {type(record).__name__}")
        yield number, record


def _field(record: Any, key: str, where: str, hint: str = "") -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a json object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r}" + (f" ({hint})" if hint else ""))
    return record[key]


def _list_field(record: Any, key: str, where: str) -> list[Any]:
    value = _field(record, key, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}: field {key!r} must be a list, got {type(value).__name__}")
    return value


def _image(path: Path, where: str) -> ImageRef:
    if not path.is_file():
        raise ValueError(f"{where}: image file {path} does not exist")
    return ImageRef(path=str(path))


def _nonempty(examples: list[Example], path: Path, what: str) -> list[Example]:
    if not examples:
        raise ValueError(f"{path}: no {what} found")
    return examples

"""Readers for the field's data formats, each yielding :class:`~interleaf.data.schema.Document`s.

=================  ====================================================================================
format             layout
=================  ====================================================================================
``mmc4``           MMC4 jsonl (or the released ``.jsonl.zip``): ``text_list``, ``image_info``
``obelics``        OBELICS parquet: ``texts`` / ``images`` lists, ``metadata`` / ``general_metadata``
``pairs_wds``      image-text pairs in webdataset tars (img2dataset): ``key.jpg`` + ``key.txt``/``.json``
``pairs_parquet``  image-text pairs in parquet: image bytes or URL column + caption column (LAION, HF)
``llava``          LLaVA chat json: ``id``, ``image``, ``conversations`` with ``from``/``value``
``annt``           MM-Interleaved ``annt.json``: ``sentences``, ``images``, ``sentence_ixs``, ``image_first``
=================  ====================================================================================

Every reader takes a file or a directory (all files of the format inside it, sorted by name) and
streams. A bad record never raises: it is skipped and counted on the :class:`SkipCounter` by a
short reason (``malformed_json``, ``missing_field``, ``bad_type``, ``bad_index``, ``length_mismatch``,
``bad_position``, ``no_text``, ``missing_image``, ``unknown_role``, ``image_count_mismatch``,
``corrupt_file``, ...), with where it was (``docs.jsonl:17``: line numbers count from 1, parquet rows
and JSON list items from 0). The counter raises ``DataError("too_many_skips")`` once the skip rate
passes its ceiling. Images are references (bytes, path or URL), not decoded; ``check_images=True``
decodes each one at read time and skips the record with the image's reason (``corrupt_image``,
``empty_image``, ``huge_image``, ``missing_image``, ``url_image``) when one fails. ``part`` (a
:class:`~interleaf.data.parts.Part`) reads only that part's files or records; the records of other
parts are neither built nor counted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tarfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .parts import Part
from .schema import DataError, Document, ImageRef, Segment, SkipCounter

Task = tuple[str, Callable[[], Document]]  # where the record is, and how to build its document

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ANNT_FIELDS = ("sentences", "images", "sentence_ixs", "image_first")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img")  # HF datasets, img2dataset parquet
TEXT_COLUMNS = ("caption", "text")  # matched case-insensitively: LAION's TEXT
URL_COLUMNS = ("url",)  # LAION's URL
FILE_ERRORS = (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, pa.ArrowException)
SUFFIXES = {  # the files of each format that a directory's listing holds
    "mmc4": (".jsonl", ".jsonl.zip"),
    "obelics": (".parquet",),
    "pairs_wds": (".tar",),
    "pairs_parquet": (".parquet",),
    "llava": (".json",),
    "annt": (".json",),
}


# ---------------------------------------------------------------------------------------------
# MMC4


def read_mmc4(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    similarity_threshold: float | None = None,
    counter: SkipCounter | None = None,
    check_images: bool = False,
    part: Part | None = None,
) -> Iterator[Document]:
    """MMC4 documents from ``.jsonl`` (or ``.jsonl.zip``) files.

    Each image goes before the sentence at its ``matched_text_index`` (as MMC4 and OpenFlamingo
    place them); images whose ``matched_sim`` is below ``similarity_threshold`` are dropped. Runs
    of sentences become one text segment, joined by single spaces. Images are the files
    ``image_root / image_name``, or their ``raw_url`` when ``image_root`` is None. The document id
    is its ``url``.
    """
    files = _files(path, SUFFIXES["mmc4"])
    per_file = partial(_mmc4_tasks, image_root=image_root, threshold=similarity_threshold)
    return _documents(_tasks(files, per_file, part), counter, check_images)


def _mmc4_tasks(file: Path, image_root: str | Path | None, threshold: float | None) -> Iterator[Task]:
    for where, line in _lines(file):
        yield where, partial(_mmc4_document, line, where, image_root, threshold)


def _mmc4_document(line: bytes, where: str, image_root: str | Path | None, threshold: float | None) -> Document:
    record = _parse_json(line)
    sentences = _strings(record, "text_list")
    before: defaultdict[int, list[ImageRef]] = defaultdict(list)
    for info in _field(record, "image_info", list):
        index = _index(_field(info, "matched_text_index", int), len(sentences), "matched_text_index")
        if threshold is not None and _field(info, "matched_sim", (int, float)) < threshold:
            continue
        before[index].append(_mmc4_image(info, image_root))
    items = [item for i, sentence in enumerate(sentences) for item in (*before[i], sentence)]
    url = record.get("url")
    return Document(id=url if isinstance(url, str) else where, segments=_segments(items), source="mmc4")


def _mmc4_image(info: dict[str, Any], image_root: str | Path | None) -> ImageRef:
    if image_root is None:
        return ImageRef(url=_field(info, "raw_url", str))
    path = Path(image_root) / _field(info, "image_name", str)
    return ImageRef(path=str(path), meta={"raw_url": info.get("raw_url"), "matched_sim": info.get("matched_sim")})


# ---------------------------------------------------------------------------------------------
# OBELICS


def read_obelics(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    counter: SkipCounter | None = None,
    check_images: bool = False,
    part: Part | None = None,
) -> Iterator[Document]:
    """OBELICS documents from ``.parquet`` files.

    ``texts`` and ``images`` are lists of equal length holding, at each position, exactly one
    non-null entry. Images are URLs in the released dataset: with ``image_root``, a URL maps to
    the local file ``image_root / (sha1(url).hexdigest() + ".jpg")`` when that file exists (the
    convention of a URL-keyed download cache; name your downloads so), else it stays a URL.
    Image entries holding bytes or a Hugging Face image struct ``{"bytes", "path"}`` are read as
    such. ``metadata`` (a JSON list, one dict per image) goes to each image's ``meta``,
    ``general_metadata`` (a JSON dict) to the document's; the id is its ``url``.
    """
    files = _files(path, SUFFIXES["obelics"])
    return _documents(_tasks(files, partial(_obelics_tasks, image_root=image_root), part), counter, check_images)


def _obelics_tasks(file: Path, image_root: str | Path | None) -> Iterator[Task]:
    for where, row in _parquet_rows(file):
        yield where, partial(_obelics_document, row, where, image_root)


def _obelics_document(row: dict[str, Any], where: str, image_root: str | Path | None) -> Document:
    texts, images = _field(row, "texts", list), _field(row, "images", list)
    if len(texts) != len(images):
        raise DataError("length_mismatch", f"{len(texts)} texts but {len(images)} images")
    image_meta = _json_string(row, "metadata") or [None] * len(images)
    general = _json_string(row, "general_metadata") or {}
    if not isinstance(image_meta, list) or len(image_meta) != len(images) or not isinstance(general, dict):
        raise DataError("bad_type", "metadata must be a list with one entry per position, general_metadata a dict")
    segments = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise DataError("bad_position", f"position {i} must hold exactly one of a text and an image")
        if image is None:
            segments.append(Segment(text=_typed(text, str, f"texts[{i}]")))
        else:
            meta = _typed(image_meta[i] or {}, dict, f"metadata[{i}]")
            segments.append(Segment(image=_obelics_image(image, image_root, meta)))
    url = general.get("url")
    return Document(id=url if isinstance(url, str) else where, segments=segments, source="obelics", meta=general)


def _obelics_image(value: Any, image_root: str | Path | None, meta: dict[str, Any]) -> ImageRef:
    if not isinstance(value, str):
        return _image_cell(value)
    if image_root is not None:
        local = Path(image_root) / f"{hashlib.sha1(value.encode()).hexdigest()}.jpg"
        if local.is_file():
            return ImageRef(path=str(local), meta={**meta, "url": value})
    return ImageRef(url=value, meta=meta)


# ---------------------------------------------------------------------------------------------
# Image-text pairs


def read_pairs_wds(
    path: str | Path, *, counter: SkipCounter | None = None, check_images: bool = False, part: Part | None = None
) -> Iterator[Document]:
    """Image-text pairs from webdataset ``.tar`` shards (as img2dataset writes them).

    Members sharing a key form a sample: an image (``jpg``/``jpeg``/``png``/``webp``) and a caption,
    from ``txt`` or else from the ``caption`` field of ``json`` (whose other fields become the
    document's ``meta``). Document = ``[image, caption]``, id = the key. Members are read with
    webdataset's own tar iterator and key splitting (so keys match what ``wds.WebDataset`` sees),
    grouped here rather than by its pipeline so that every bad sample is counted by reason.
    """
    files = _files(path, SUFFIXES["pairs_wds"])
    return _documents(_tasks(files, _wds_tasks, part), counter, check_images)


def _wds_tasks(file: Path) -> Iterator[Task]:
    from webdataset.tariterators import base_plus_ext, tar_file_iterator  # imports torch: only when used

    with file.open("rb") as stream:
        members = ((*base_plus_ext(m["fname"]), m["data"]) for m in tar_file_iterator(stream))
        keyed = (member for member in members if member[0] is not None)
        for key, group in itertools.groupby(keyed, key=lambda member: member[0]):
            parts = {extension.lower(): data for _, extension, data in group}
            yield f"{file.name}:{key}", partial(_wds_document, key, parts)


def _wds_document(key: str, parts: dict[str, bytes]) -> Document:
    extension = next((e for e in WDS_IMAGE_EXTENSIONS if e in parts), None)
    if extension is None:
        raise DataError("missing_image", f"sample {key!r} has no {'/'.join(WDS_IMAGE_EXTENSIONS)} member")
    meta = _typed(_parse_json(parts["json"]), dict, "json member") if "json" in parts else {}
    caption = _utf8(parts["txt"]) if "txt" in parts else meta.get("caption")
    meta.pop("caption", None)
    text = _caption(caption, "txt/json caption")
    return Document(
        id=key, segments=[Segment(image=ImageRef(data=parts[extension])), text], source="pairs_wds", meta=meta
    )


def read_pairs_parquet(
    path: str | Path,
    *,
    image_column: str = "image",
    text_column: str = "caption",
    url_column: str = "url",
    counter: SkipCounter | None = None,
    check_images: bool = False,
    part: Part | None = None,
) -> Iterator[Document]:
    """Image-text pairs from ``.parquet`` files.

    The image is the row's bytes (raw, or a Hugging Face ``{"bytes", "path"}`` struct) when there
    are any, else its URL. A named column that is absent falls back, case-insensitively, to a
    common name: ``image``/``jpg``/``png``/``webp``/``img``; ``caption``/``text`` (LAION's ``TEXT``);
    ``url`` (LAION's ``URL``). A file with no caption column, or neither an image nor a URL
    column, raises ``DataError("missing_column")``: no row of it could be read. Document =
    ``[image, caption]``, id = ``file:row``.
    """
    files = _files(path, SUFFIXES["pairs_parquet"])
    per_file = partial(_pairs_parquet_tasks, columns=(image_column, text_column, url_column))
    return _documents(_tasks(files, per_file, part), counter, check_images)


def _pairs_parquet_tasks(file: Path, columns: tuple[str, str, str]) -> Iterator[Task]:
    names = pq.read_schema(file).names
    image, text, url = (
        _column(names, wanted, fallbacks)
        for wanted, fallbacks in zip(columns, (IMAGE_COLUMNS, TEXT_COLUMNS, URL_COLUMNS))
    )
    if text is None or (image is None and url is None):
        raise DataError("missing_column", f"{file.name} has no caption and image/url columns {columns}: {names}")
    for where, row in _parquet_rows(file, [c for c in (image, text, url) if c is not None]):
        yield where, partial(_pair_document, row, where, image, text, url)


def _pair_document(row: dict[str, Any], where: str, image: str | None, text: str, url: str | None) -> Document:
    if image is not None and row[image] is not None:
        ref = _image_cell(row[image])
    elif url is not None and isinstance(row[url], str):
        ref = ImageRef(url=row[url])
    else:
        raise DataError("missing_image", "row has neither image bytes nor a URL")
    meta = {"url": row[url]} if url is not None else {}
    return Document(
        id=where, segments=[Segment(image=ref), _caption(row[text], text)], source="pairs_parquet", meta=meta
    )


def _column(names: list[str], wanted: str, fallbacks: tuple[str, ...]) -> str | None:
    if wanted in names:
        return wanted
    lowered = {name.lower(): name for name in names}
    return next((lowered[c.lower()] for c in (wanted, *fallbacks) if c.lower() in lowered), None)


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError("malformed_text", f"caption is not UTF-8: {e}") from None


def _caption(value: Any, name: str) -> Segment:
    if value is None:
        raise DataError("missing_field", f"no caption ({name})")
    text = _typed(value, str, name)
    if not text.strip():
        raise DataError("no_text", "empty caption")
    return Segment(text=text)


# ---------------------------------------------------------------------------------------------
# LLaVA chat


def read_llava(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    counter: SkipCounter | None = None,
    check_images: bool = False,
    part: Part | None = None,
) -> Iterator[Document]:
    """Chat documents from LLaVA-style ``.json`` files (a JSON list of records).

    Roles map ``human``/``gpt``/``system`` to ``user``/``assistant``/``system``. Each ``<image>`` in a
    turn becomes an image segment of that turn's role at its place, the placeholder and the newline
    beside it (LLaVA writes ``"<image>\\n..."`` or ``"...\\n<image>"``) removed. ``image`` is a path
    (or a list of paths) relative to ``image_root``, by default the json file's folder; records
    without one are text-only chats. As many ``<image>`` as images, or the record is skipped
    (``image_count_mismatch``).
    """
    files = _files(path, SUFFIXES["llava"])
    return _documents(_tasks(files, partial(_llava_tasks, image_root=image_root), part), counter, check_images)


def _llava_tasks(file: Path, image_root: str | Path | None) -> Iterator[Task]:
    root = Path(image_root) if image_root is not None else file.parent
    for where, record in _json_items(file):
        yield where, partial(_llava_document, record, where, root)


def _llava_document(record: Any, where: str, root: Path) -> Document:
    turns = [(_llava_role(turn), _field(turn, "value", str)) for turn in _field(record, "conversations", list)]
    images = _llava_images(record, root)
    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
    if placeholders != len(images):
        raise DataError(
            "image_count_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders, {len(images)} images"
        )
    refs = iter(images)
    segments = [segment for role, value in turns for segment in _turn_segments(value, role, refs)]
    record_id = record.get("id")
    return Document(id=where if record_id is None else str(record_id), segments=segments, source="llava")


def _llava_role(turn: Any) -> str:
    speaker = _field(turn, "from", str)
    if speaker not in LLAVA_ROLES:
        raise DataError("unknown_role", f"unknown speaker {speaker!r}; expected one of {list(LLAVA_ROLES)}")
    return LLAVA_ROLES[speaker]


def _llava_images(record: dict[str, Any], root: Path) -> list[ImageRef]:
    value = record.get("image")
    names = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DataError("bad_type", f"'image' must be a path or a list of paths, got {value!r}")
    return [ImageRef(path=str(root / name)) for name in names]


def _turn_segments(value: str, role: str, images: Iterator[ImageRef]) -> list[Segment]:
    pieces = value.split(IMAGE_PLACEHOLDER)
    segments = []
    for i, piece in enumerate(pieces):
        if i > 0:
            segments.append(Segment(image=next(images), role=role))
            piece = piece.removeprefix("\n")
        if i < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        if piece:
            segments.append(Segment(text=piece, role=role))
    return segments


# ---------------------------------------------------------------------------------------------
# MM-Interleaved annt.json


def read_annt(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    counter: SkipCounter | None = None,
    check_images: bool = False,
    part: Part | None = None,
) -> Iterator[Document]:
    """Documents from MM-Interleaved ``annt.json`` files: a JSON list of documents (a single
    document object is accepted too).

    ``images[k]`` belongs to sentence ``sentence_ixs[k]``, before it when ``image_first[k]`` and
    after it otherwise. As MM-Interleaved's loader does, the image slots are laid out from
    ``(sentence_ixs, image_first)`` and filled with ``images`` in list order. Runs of sentences
    become one text segment, joined by single spaces. Image paths are relative to ``image_root``,
    by default the json file's folder. Other keys (``generate_mode``, ``num_iter``) go to ``meta``.
    """
    files = _files(path, SUFFIXES["annt"])
    return _documents(_tasks(files, partial(_annt_tasks, image_root=image_root), part), counter, check_images)


def _annt_tasks(file: Path, image_root: str | Path | None) -> Iterator[Task]:
    root = Path(image_root) if image_root is not None else file.parent
    for where, record in _json_items(file):
        yield where, partial(_annt_document, record, where, root)


def _annt_document(record: Any, where: str, root: Path) -> Document:
    sentences, images = _strings(record, "sentences"), _strings(record, "images")
    indices, first = _field(record, "sentence_ixs", list), _field(record, "image_first", list)
    if not len(images) == len(indices) == len(first):
        raise DataError(
            "length_mismatch", f"{len(images)} images, {len(indices)} sentence_ixs, {len(first)} image_first"
        )
    slots = [
        (_index(ix, len(sentences), "sentence_ixs"), _typed(f, bool, "image_first")) for ix, f in zip(indices, first)
    ]
    before = Counter(ix for ix, is_first in slots if is_first)
    after = Counter(ix for ix, is_first in slots if not is_first)
    refs = iter([ImageRef(path=str(root / image)) for image in images])
    items: list[str | ImageRef] = []
    for i, sentence in enumerate(sentences):
        items += [*itertools.islice(refs, before[i]), sentence, *itertools.islice(refs, after[i])]
    meta = {key: value for key, value in record.items() if key not in ANNT_FIELDS}
    return Document(id=where, segments=_segments(items), source="annt", meta=meta)


# ---------------------------------------------------------------------------------------------
# Dispatch

READERS: dict[str, Callable[..., Iterator[Document]]] = {
    "mmc4": read_mmc4,
    "obelics": read_obelics,
    "pairs_wds": read_pairs_wds,
    "pairs_parquet": read_pairs_parquet,
    "llava": read_llava,
    "annt": read_annt,
}


def read(path: str | Path, fmt: str, *, counter: SkipCounter | None = None, **options: Any) -> Iterator[Document]:
    """Documents of ``path`` (a file or a directory) in format ``fmt``, one of :data:`READERS`;
    ``options`` go to that format's reader (e.g. ``image_root``, ``check_images``, ``part``)."""
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r}; known formats: {', '.join(READERS)}")
    return READERS[fmt](path, counter=counter, **options)


def input_files(path: str | Path, fmt: str) -> list[Path]:
    """The files a reader of ``fmt`` reads at ``path``, in its order (what parts are split over)."""
    if fmt not in SUFFIXES:
        raise ValueError(f"unknown data format {fmt!r}; known formats: {', '.join(READERS)}")
    return _files(path, SUFFIXES[fmt])


# ---------------------------------------------------------------------------------------------
# Shared machinery: files, tasks, skip counting, field checks


def _files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
        if not files:
            raise FileNotFoundError(f"no {'/'.join(suffixes)} files in {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"no such file or directory: {path}")
    return [path]


def _tasks(files: list[Path], per_file: Callable[[Path], Iterator[Task]], part: Part | None = None) -> Iterator[Task]:
    """The tasks of ``part`` (all when None): its files' tasks in turn, every ``m``-th from ``r``
    (:meth:`Part.select`); tasks of other parts are skipped unbuilt, so they cost a scan only."""
    files, modulus, residue = part.select(files) if part is not None else (files, 1, 0)
    return itertools.islice(_file_tasks(files, per_file), residue, None, modulus)


def _file_tasks(files: list[Path], per_file: Callable[[Path], Iterator[Task]]) -> Iterator[Task]:
    """The tasks of each file in turn; a file that cannot be read (a truncated tar, a broken zip
    or parquet, invalid JSON) becomes one failing task, so it is counted like a bad record."""
    for file in files:
        try:
            yield from per_file(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield file.name, partial(_fail, "malformed_json", f"invalid JSON: {e}")
        except FILE_ERRORS as e:
            yield file.name, partial(_fail, "corrupt_file", f"cannot read file: {type(e).__name__}: {e}")


def _fail(reason: str, message: str) -> Document:
    raise DataError(reason, message)


def _documents(tasks: Iterable[Task], counter: SkipCounter | None, check_images: bool) -> Iterator[Document]:
    """Build each document, counting it as read or skipped (by the reason of its DataError)."""
    counter = SkipCounter() if counter is None else counter
    for where, build in tasks:
        try:
            document = build()
            if check_images:
                for image in document.images:
                    image.load()
        except DataError as e:
            counter.skip(e.reason, where, str(e))
            continue
        counter.ok()
        yield document


def _lines(file: Path) -> Iterator[tuple[str, bytes]]:
    """Non-blank lines of a jsonl file, or of each member of a zip of them, with their place."""
    if file.suffix == ".zip":
        with zipfile.ZipFile(file) as archive:
            for name in archive.namelist():
                with archive.open(name) as member:
                    yield from _numbered(member, name)
    else:
        with file.open("rb") as lines:
            yield from _numbered(lines, file.name)


def _numbered(lines: Iterable[bytes], name: str) -> Iterator[tuple[str, bytes]]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield f"{name}:{number}", line


def _json_items(file: Path) -> Iterator[tuple[str, Any]]:
    """Items of a json file holding a list of records (anything else counts as one record)."""
    data = json.loads(file.read_bytes())
    items = data if isinstance(data, list) else [data]
    for index, item in enumerate(items):
        yield f"{file.name}:{index}", item


def _parquet_rows(file: Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    with pq.ParquetFile(file) as parquet:
        rows = (row for batch in parquet.iter_batches(columns=columns) for row in batch.to_pylist())
        for index, row in enumerate(rows):
            yield f"{file.name}:{index}", row


def _segments(items: Iterable[str | ImageRef]) -> list[Segment]:
    """Each image its own segment; each run of sentences one text segment, joined by spaces."""
    segments = []
    for is_text, group in itertools.groupby(items, key=lambda item: isinstance(item, str)):
        if not is_text:
            segments += [Segment(image=image) for image in group]
        elif text := " ".join(sentence for sentence in group if sentence.strip()):
            segments.append(Segment(text=text))
    return segments


def _image_cell(value: Any) -> ImageRef:
    """Encoded bytes, or a Hugging Face datasets image struct ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, bytes):
        return ImageRef(data=value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        return ImageRef(data=value["bytes"])
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return ImageRef(path=value["path"])
    raise DataError("bad_type", f"an image must be bytes or a {{'bytes', 'path'}} struct, got {type(value).__name__}")


def _parse_json(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError("malformed_json", f"invalid JSON: {e}") from None


def _json_string(row: dict[str, Any], key: str) -> Any:
    """A column holding JSON text (None when absent or null)."""
    value = row.get(key)
    return None if value is None else _parse_json(_typed(value, str, key))


def _field(record: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    """``record[key]``, which must be present, non-null and of type ``kind``."""
    record = _typed(record, dict, "record")
    if record.get(key) is None:
        raise DataError("missing_field", f"missing field {key!r}")
    return _typed(record[key], kind, key)


def _typed(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError("bad_type", f"{name} must be {expected}, got {type(value).__name__}")
    return value


def _strings(record: Any, key: str) -> list[str]:
    values = _field(record, key, list)
    for i, value in enumerate(values):
        _typed(value, str, f"{key}[{i}]")
    return values


def _index(value: Any, size: int, name: str) -> int:
    """A sentence index, which must be an int in ``range(size)``."""
    index = _typed(value, int, name)
    if not 0 <= index < size:
        raise DataError("bad_index", f"{name} {index} out of range for {size} sentences")
    return index

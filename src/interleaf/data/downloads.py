"""Images by URL: the URL list for img2dataset, and img2dataset's output joined back into documents.

MMC4 and OBELICS give their images as URLs. ``interleaf data urls`` writes the distinct image URLs
of a dataset (or of one part of it) as img2dataset's input, a parquet file with a ``url`` column;
img2dataset (https://github.com/rom1504/img2dataset) downloads them; ``interleaf data convert
--images FOLDER`` reads its output folder and gives each URL image of a document the downloaded
bytes. img2dataset's output folder holds, for each of its shards ``NNNNN`` (from ``00000``):

=====================  ========================================================================
``NNNNN.parquet``      one row per input URL: ``url``, ``key``, ``status`` (``success``,
                       ``failed_to_download``, ``failed_to_resize``), ``error_message``, sizes, ...
``NNNNN.tar``          ``output_format=webdataset``: ``KEY.jpg`` (or ``.png``/``.webp``) and
                       ``KEY.json`` for each success
``NNNNN/``             ``output_format=files``: the same as files
``NNNNN_stats.json``   the shard's counts, written when it is done
=====================  ========================================================================

A URL image whose download failed, or that is not in the output at all, fails its document:
the document is skipped and counted by the image's reason, as any document whose image cannot
be read (``missing_image``, ``url_image``): ``failed_to_download``, ``failed_to_resize`` (the
status img2dataset wrote; other statuses are kept as they are), ``not_downloaded`` (no row for the
URL: img2dataset was given another list, or lost the shard) or ``missing_bytes`` (a success row
whose image is not in the folder). Every failed image is also counted by reason and message.
"""

from __future__ import annotations

import os
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from interleaf.extras import optional_import

from .schema import DataError, Document, ImageRef, Segment, SkipCounter

METADATA_COLUMNS = ("url", "key", "status", "error_message")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_MESSAGES = 20  # distinct error messages kept per reason; the rest count as "other messages"


# ---------------------------------------------------------------------------------------------
# URL lists


@dataclass
class UrlList:
    """The distinct image URLs of some documents, in the order they first appear."""

    urls: dict[str, None] = field(default_factory=dict)
    occurrences: int = 0
    documents: int = 0

    def add(self, docs: Iterable[Document]) -> None:
        for doc in docs:
            self.documents += 1
            for image in doc.images:
                if image.url is not None:
                    self.occurrences += 1
                    self.urls.setdefault(image.url)

    def write(self, out: str | Path) -> Path:
        """``out``: a ``.parquet`` file with a ``url`` column (img2dataset ``--input_format
        parquet``) or a ``.txt`` file with a URL a line (``--input_format txt``)."""
        out = Path(out)
        if out.suffix not in (".parquet", ".txt"):
            raise ValueError(f"{out}: a URL list is a .parquet or a .txt file")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        if out.suffix == ".txt":
            broken = next((url for url in self.urls if "\n" in url or "\r" in url), None)
            if broken is not None:
                raise ValueError(f"{out}: URL {broken!r} holds a line break; write a .parquet list instead")
            partial.write_text("".join(f"{url}\n" for url in self.urls))
        else:
            pq.write_table(pa.table({"url": pa.array(list(self.urls), pa.string())}), partial)
        partial.replace(out)
        return out


def download(
    url_list: str | Path,
    out: str | Path,
    *,
    processes: int = 1,
    threads: int = 32,
    timeout: int = 10,
    output_format: str = "webdataset",
    **options: Any,
) -> None:
    """Download the URLs of ``url_list`` (written by :meth:`UrlList.write`, or a folder of such
    files) into ``out`` with img2dataset, keeping each image as it was served where img2dataset
    allows (``resize_mode="no"``, ``skip_reencode=True``: an image already in ``encode_format``
    keeps its bytes; others are re-encoded). ``options`` go to ``img2dataset.download`` (e.g.
    ``encode_format``, ``number_sample_per_shard``, ``distributor``, ``retries``; ``input_format``
    for a folder of ``.txt`` lists)."""
    img2dataset = optional_import("img2dataset", "downloading images by URL (img2dataset)", "prep")
    settings = {
        "input_format": "txt" if Path(url_list).suffix == ".txt" else "parquet",
        "url_col": "url",
        "resize_mode": "no",
        "skip_reencode": True,
        "enable_wandb": False,
        **options,
    }
    if settings.get("encode_format") == "png":
        settings.setdefault("encode_quality", 9)  # png's quality is its compression level, 0 to 9
    img2dataset.download(
        url_list=str(url_list),
        output_folder=str(out),
        processes_count=processes,
        thread_count=threads,
        timeout=timeout,
        output_format=output_format,
        **settings,
    )


# ---------------------------------------------------------------------------------------------
# img2dataset's output


@dataclass
class ImageCounts:
    """Outcomes of the URL images of the documents joined: how many got their bytes, and the
    failures by reason and error message."""

    joined: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    messages: dict[str, Counter[str]] = field(default_factory=dict)

    def fail(self, reason: str, message: str) -> None:
        self.failed[reason] += 1
        messages = self.messages.setdefault(reason, Counter())
        if message and (message in messages or len(messages) < MAX_MESSAGES):
            messages[message] += 1
        elif message:
            messages["other messages"] += 1

    def merge(self, other: ImageCounts) -> None:
        self.joined += other.joined
        self.failed.update(other.failed)
        for reason, messages in other.messages.items():
            for message, n in messages.items():
                mine = self.messages.setdefault(reason, Counter())
                key = message if message in mine or len(mine) < MAX_MESSAGES else "other messages"
                mine[key] += n

    def report(self) -> str:
        total = sum(self.failed.values())
        if not total:
            return f"{self.joined} joined, none failed"
        parts = []
        for reason, n in self.failed.most_common():
            top = self.messages.get(reason, Counter()).most_common(3)
            detail = ", ".join(f"{message!r} x{k}" for message, k in top)
            parts.append(f"{reason}: {n}" + (f" ({detail})" if detail else ""))
        return f"{self.joined} joined, {total} failed: " + "; ".join(parts)


class _Row(NamedTuple):
    shard: int  # index into Downloads.shards
    key: str
    status: str
    error: str


class Downloads:
    """An img2dataset output folder, indexed by URL (the ``url``/``key``/``status``/``error_message``
    columns of its ``NNNNN.parquet`` files; a few hundred bytes of memory a URL). Image bytes are
    read when a document asks for them: from ``NNNNN.tar`` (its members indexed on first use) or
    the folder ``NNNNN/``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.shards = check_folder(self.folder)
        self.index: dict[str, _Row] = {}
        for number, file in enumerate(self.shards):
            table = _read_metadata(self.folder, file)
            columns = [table.column(name).to_pylist() for name in METADATA_COLUMNS]
            for url, key, status, error in zip(*columns):
                if not isinstance(url, str):
                    continue
                row = _Row(number, str(key), sys.intern(str(status)), error or "")
                old = self.index.get(url)
                if old is None or (old.status != "success" and row.status == "success"):
                    self.index[url] = row
        self.counts = ImageCounts()
        self._members: dict[int, dict[str, tuple[str, int, int]]] = {}

    def join(self, docs: Iterable[Document], counter: SkipCounter) -> Iterator[Document]:
        """``docs`` with each URL image replaced by its downloaded bytes (the URL kept in the
        image's ``meta["url"]``); a document with a failed image is skipped and counted on
        ``counter`` by that image's reason, all its failed images on :attr:`counts`."""
        for doc in docs:
            segments, failure = [], None
            for segment in doc.segments:
                image = segment.image
                if image is None or image.url is None:
                    segments.append(segment)
                    continue
                try:
                    data = self.fetch(image.url)
                except DataError as e:
                    self.counts.fail(e.reason, str(e))
                    failure = failure or (e.reason, f"image {image.url!r}: {e}")
                    continue
                self.counts.joined += 1
                ref = ImageRef(data=data, meta={**image.meta, "url": image.url})
                segments.append(Segment(image=ref, role=segment.role))
            if failure is not None:
                counter.skip(failure[0], f"document {doc.id!r}", failure[1])
                continue
            yield Document(id=doc.id, segments=segments, source=doc.source, meta=doc.meta)

    def fetch(self, url: str) -> bytes:
        """The downloaded bytes of ``url``, or a :class:`DataError` with the failure's reason."""
        row = self.index.get(url)
        if row is None:
            raise DataError("not_downloaded", "not in the img2dataset output")
        if row.status != "success":
            raise DataError(row.status, row.error)
        members = self._members.get(row.shard)
        if members is None:
            members = self._members[row.shard] = self._index_shard(row.shard)
        if row.key not in members:
            raise DataError("missing_bytes", f"no image for key {row.key} in {self.shards[row.shard].stem}")
        path, offset, size = members[row.key]
        with open(path, "rb") as stream:
            stream.seek(offset)
            return stream.read(size)

    def _index_shard(self, number: int) -> dict[str, tuple[str, int, int]]:
        """``key -> (file, offset, size)`` of the images of shard ``number``."""
        stem = self.shards[number].stem
        tar, files = self.folder / f"{stem}.tar", self.folder / stem
        members = {}
        if tar.is_file():
            try:
                with tarfile.open(tar, "r:") as archive:
                    for member in archive:
                        key, _, extension = member.name.rpartition("/")[2].partition(".")
                        if member.isfile() and extension.lower() in IMAGE_EXTENSIONS:
                            members[key] = (str(tar), member.offset_data, member.size)
            except (OSError, tarfile.TarError):
                pass  # a broken tar: what was indexed before the damage is kept; the rest is missing_bytes
        elif files.is_dir():
            for entry in os.scandir(files):
                key, _, extension = entry.name.partition(".")
                if extension.lower() in IMAGE_EXTENSIONS and entry.is_file():
                    members[key] = (entry.path, 0, entry.stat().st_size)
        return members


def check_folder(folder: Path) -> list[Path]:
    """The metadata files of an img2dataset output folder; a ``ValueError`` naming the folder
    (and the file) when it is not one, or when its images are in a layout not read here."""
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: no such directory (img2dataset's output folder)")
    shards = sorted(folder.glob("*.parquet"))
    if not shards:
        raise ValueError(
            f"--images {folder}: not an img2dataset output folder: no NNNNN.parquet files "
            "(img2dataset writes one per shard, beside NNNNN.tar or NNNNN/)"
        )
    for file in shards:
        try:
            names = pq.read_schema(file).names
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"--images {folder}: cannot read {file.name}: {e}") from None
        missing = [name for name in METADATA_COLUMNS if name not in names]
        if missing:
            raise ValueError(
                f"--images {folder}: {file.name} is not img2dataset's metadata: it has no "
                f"{', '.join(missing)} column(s) (its columns: {', '.join(names[:8])})"
            )
        images_inside = [name for name in names if name in IMAGE_EXTENSIONS]
        if images_inside and not (folder / f"{file.stem}.tar").is_file() and not (folder / file.stem).is_dir():
            raise ValueError(
                f"--images {folder}: {file.name} holds the images ({images_inside[0]} column: img2dataset's "
                "output_format parquet), which is not read here; download with output_format webdataset or files"
            )
    return shards


def _read_metadata(folder: Path, file: Path) -> pa.Table:
    try:
        return pq.read_table(file, columns=list(METADATA_COLUMNS))
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"--images {folder}: cannot read {file.name}: {e}") from None

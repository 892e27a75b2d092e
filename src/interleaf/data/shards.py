"""Webdataset tar shards: writing Documents, and streaming them to ranks and workers.

A shard sample is one Document: ``<key>.json`` (its segments, each image replaced by a member
name) and ``<key>.img<i>.<ext>`` (each image's encoded bytes). Reading splits the work into
``num_slots = world_size x num_workers`` slots: by shard when there are at least as many
shards as slots, otherwise by sample (sample ``i`` of the epoch goes to slot ``i % num_slots``),
so within an epoch every sample is read by exactly one slot.
"""

from __future__ import annotations

import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from webdataset import tariterators

from interleaf.data.schema import DataError, Document, ImageRef, SkipCounter

_MAGIC = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"GIF8": "gif", b"RIFF": "webp", b"BM": "bmp"}


def image_bytes(ref: ImageRef) -> tuple[bytes, str]:
    """Encoded bytes and a file extension for an image reference (no decoding)."""
    raw = ref.raw()
    ext = next((e for magic, e in _MAGIC.items() if raw.startswith(magic)), "bin")
    return raw, ext


def write_shards(
    docs: Iterable[Document],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_samples: int = 1000,
    max_bytes: float = 256e6,
    counter: SkipCounter | None = None,
    key_prefix: str = "",
) -> list[Path]:
    """Write ``docs`` to ``out_dir/prefix-000000.tar, ...``, at most ``max_samples`` documents
    or ``max_bytes`` per shard, and return the shards written (none, not an empty shard, when no
    document is). Documents whose images cannot be read are skipped and counted. Sample keys are
    ``key_prefix`` + the document's index in ``docs`` (``000000012``); a prefix keeps keys unique
    across the shards of several writers (the parts of a conversion)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counter = counter or SkipCounter()
    pattern = str(out / f"{prefix}-%06d.tar")
    sink: wds.ShardWriter | None = None  # opened at the first document: no empty shard
    written: list[str] = []
    try:
        for index, doc in enumerate(docs):
            try:
                images = [image_bytes(ref) for ref in doc.images]
            except DataError as e:
                counter.skip(e.reason, f"document {doc.id!r}", str(e))
                continue
            names = [f"img{i}.{ext}" for i, (_, ext) in enumerate(images)]
            sample = {"__key__": f"{key_prefix}{index:09d}", "json": doc.to_json(names).encode()}
            sample.update({name: raw for name, (raw, _) in zip(names, images)})
            if sink is None:
                sink = wds.ShardWriter(pattern, maxcount=max_samples, maxsize=max_bytes, verbose=0, post=written.append)
            sink.write(sample)
            counter.ok()
    finally:
        if sink is not None:
            sink.close()
    return [Path(shard) for shard in written]


def read_shard(path: str | Path, counter: SkipCounter | None = None) -> Iterator[Document]:
    """The Documents of one shard, in order; broken samples are skipped and counted."""
    counter = counter or SkipCounter()
    try:
        with open(path, "rb") as stream:
            members = tariterators.tar_file_expander([{"stream": stream, "url": str(path)}])
            for sample in tariterators.group_by_keys(members):
                where = f"{Path(path).name}:{sample.get('__key__')}"
                try:
                    if "json" not in sample:
                        raise DataError("missing_field", "sample has no json member")
                    files = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
                    doc = Document.from_json(sample["json"], files)
                except DataError as e:
                    counter.skip(e.reason, where, str(e))
                    continue
                counter.ok()
                yield doc
    except DataError:
        raise  # too many skips: the counter's verdict
    except (OSError, EOFError, ValueError, tarfile.TarError) as e:
        counter.skip("corrupt_shard", str(path), f"{type(e).__name__}: {e}")


@dataclass
class Position:
    """Where a stream stands: epoch, index in the epoch's shard order, samples read from that shard."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0


class ShardStream:
    """The Documents of one slot (rank x worker), epoch after epoch, resumable exactly.

    ``shuffle`` reorders the shards every epoch (seeded by ``seed`` and the epoch); ``epochs``
    (None: forever) bounds the stream. Resampling for infinite streams is ``epochs=None``: each
    new epoch draws a fresh shard order.
    """

    def __init__(
        self,
        shards: list[str | Path],
        *,
        slot: int = 0,
        num_slots: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = 1,
        counter: SkipCounter | None = None,
    ):
        if not shards:
            raise ValueError("no shards to read")
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is not in range(num_slots={num_slots})")
        self.shards = [str(s) for s in shards]
        self.slot, self.num_slots = slot, num_slots
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.counter = counter or SkipCounter()
        self.position = Position()

    def epoch_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _assignment(self, epoch: int) -> tuple[list[str], bool]:
        """This slot's shards for ``epoch``, and whether samples are split within them."""
        order = self.epoch_order(epoch)
        if len(order) >= self.num_slots:
            return order[self.slot :: self.num_slots], False
        return order, True

    def __iter__(self) -> Iterator[Document]:
        while self.epochs is None or self.position.epoch < self.epochs:
            shards, by_sample = self._assignment(self.position.epoch)
            whole_pass, found = self.position.shard == 0 and self.position.offset == 0, False
            while self.position.shard < len(shards):
                for doc in self._read(shards[self.position.shard], by_sample):
                    found = True
                    yield doc
                self.position = Position(self.position.epoch, self.position.shard + 1, 0)
            if whole_pass and not found:  # another pass would read nothing again, forever
                raise DataError(
                    "empty_source",
                    f"a whole pass over {len(shards)} shard(s) (e.g. {shards[0]}) read no document for slot "
                    f"{self.slot} of {self.num_slots}: {self.counter.report()}",
                )
            self.position = Position(self.position.epoch + 1, 0, 0)

    def _read(self, shard: str, by_sample: bool) -> Iterator[Document]:
        """Documents of ``shard`` from the current offset on; the offset counts samples seen."""
        skip = self.position.offset
        for index, doc in enumerate(read_shard(shard, self.counter)):
            if index < skip:
                continue
            self.position.offset = index + 1
            if by_sample and (self.position.shard * 1_000_000 + index) % self.num_slots != self.slot:
                continue
            yield doc

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "shard": self.position.shard, "offset": self.position.offset}

    def load_state_dict(self, state: dict) -> None:
        self.position = Position(state["epoch"], state["shard"], state["offset"])


def expand(spec: str | Path | list) -> list[str]:
    """Shard paths from a directory, a glob, a brace pattern (``shard-{000000..000009}.tar``) or a list.

    Every shard must exist: a directory without ``.tar`` files, a glob that matches nothing, or a
    file (named, listed or expanded from braces) that does not exist is a ``ValueError`` naming it.
    """
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("no shards given (an empty list)")
        return [s for item in spec for s in expand(item)]
    spec = str(spec)
    if not spec.strip():
        raise ValueError("no shards given (an empty path)")
    path = Path(spec)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise ValueError(f"no shards found at {spec!r} (a directory without .tar files)")
        return found
    if any(c in spec for c in "*?["):
        found = sorted(str(p) for p in Path(path.anchor or ".").glob(str(path.relative_to(path.anchor or "."))))
        if not found:
            raise ValueError(f"no shards found at {spec!r} (the pattern matches no file)")
        return found
    from braceexpand import braceexpand

    found = list(braceexpand(spec))
    missing = [f for f in found if not Path(f).is_file()]
    if missing and len(found) == 1:
        raise ValueError(f"no shards found at {spec!r}: no such file or directory")
    if missing:
        raise ValueError(
            f"no shards found at {spec!r}: {len(missing)} of its {len(found)} files do not exist, e.g. {missing[0]!r}"
        )
    return found

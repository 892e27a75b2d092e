"""Parts of an input: which records of a dataset one of N independent jobs converts.

The input is the format's files, sorted by name (as every reader lists a directory), and the
records of those files in order. Part ``i`` of ``N`` takes

- **by file** the files ``i, i + N, i + 2N, ...`` when there are at least ``N`` files: a part
  opens only its own files, which is what scales (MMC4 and OBELICS ship as thousands of files);
- **by record** otherwise: record ``j`` of the whole input (counted over the sorted files, from 0)
  when ``j % N == i``; every part then scans all the files but builds (parses, checks, writes)
  only its own records.

A part of a part (``--part I/N --workers K``) splits the records of its parent by the same rule,
so the parts of any split are disjoint and together hold every record exactly once. Shards are
named by the part: ``part-00003-of-00008-000000.tar``, and a worker's within a part
``part-00003-of-00008-w001-of-004-000000.tar``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Part:
    """Part ``index`` (from 0) of ``count``, of the whole input or of a ``parent`` part."""

    index: int
    count: int
    parent: Part | None = None

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"a part count must be >= 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"part index {self.index} is not in 0..{self.count - 1} (parts count from 0)")

    @classmethod
    def parse(cls, text: str) -> Part:
        """``"I/N"``: part I (0 <= I < N) of N."""
        match = _SPEC.fullmatch(text)
        if match is None:
            raise ValueError(f"expected I/N (part I of N, 0 <= I < N, e.g. 3/8), got {text!r}")
        index, count = int(match[1]), int(match[2])
        if count < 1:
            raise ValueError(f"{text!r}: the number of parts N must be >= 1")
        if index >= count:
            raise ValueError(f"{text!r}: part I must be in 0..{count - 1} (parts count from 0)")
        return cls(index, count)

    def split(self, count: int) -> list[Part]:
        """This part's ``count`` sub-parts (one per local worker)."""
        return [Part(index, count, self) for index in range(count)]

    @property
    def top(self) -> Part:
        """The outermost part (the ``--part`` a user gave)."""
        return self if self.parent is None else self.parent.top

    @property
    def name(self) -> str:
        """The shard name prefix: ``part-00003-of-00008``, ``part-00003-of-00008-w001-of-004``."""
        if self.parent is None:
            return f"part-{self.index:05d}-of-{self.count:05d}"
        return f"{self.parent.name}-w{self.index:03d}-of-{self.count:03d}"

    def __str__(self) -> str:
        own = f"{self.index}/{self.count}"
        return own if self.parent is None else f"{self.parent} worker {own}"

    def select(self, files: list[T]) -> tuple[list[T], int, int]:
        """``(files, m, r)``: this part reads ``files`` and keeps the records whose index ``j``
        over those files (from 0) has ``j % m == r``."""
        files, modulus, residue = self.parent.select(files) if self.parent is not None else (files, 1, 0)
        if modulus == 1 and len(files) >= self.count:
            return files[self.index :: self.count], 1, 0
        return files, modulus * self.count, residue + modulus * self.index


def describe(part: Part, files: list[Path]) -> str:
    """How ``part`` splits ``files``, for a summary line."""
    chosen, modulus, residue = part.select(files)
    if modulus == 1:
        return f"{len(chosen)} of {len(files)} files"
    return f"records j % {modulus} == {residue} of {len(files)} file(s)"

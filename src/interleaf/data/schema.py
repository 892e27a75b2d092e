"""One schema for all training data: a :class:`Document` is an ordered list of segments,
each a piece of text or an image. Image-text pairs are two-segment documents; chat
conversations are documents whose segments carry the speaker's role."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from interleaf.images import ImageError, load_image

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A sample that cannot be used; ``reason`` is a short stable key for skip counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageRef:
    """An image held as encoded bytes, a file path, or a URL, with free-form metadata."""

    data: bytes | None = None
    path: str | None = None
    url: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if sum(x is not None for x in (self.data, self.path, self.url)) != 1:
            raise DataError("bad_image_ref", "an image needs exactly one of data, path or url")

    def raw(self) -> bytes:
        """The encoded bytes; :class:`DataError` ``url_image`` (not fetched), ``missing_image``
        or ``empty_image`` when there are none."""
        if self.url is not None:
            raise DataError("url_image", f"image {self.url!r} is a URL; download images first")
        if self.path is not None:
            try:
                raw = Path(self.path).read_bytes()
            except OSError as e:
                raise DataError("missing_image", f"cannot read image file {self.path!r}: {e.strerror or e}") from None
        else:
            raw = self.data
        if not raw:
            raise DataError("empty_image", "cannot read image bytes: zero-byte image")
        return raw

    def load(self) -> Image.Image:
        """Decode to an RGB PIL image; failures are :class:`DataError`s with the reasons of
        :meth:`raw` and ``corrupt_image`` or ``huge_image``."""
        return decode_image(self.raw())


def decode_image(raw: bytes) -> Image.Image:
    """Encoded bytes -> RGB image through :func:`interleaf.images.load_image` (the processor's
    decoder too); its errors become :class:`DataError`s with the same reasons."""
    try:
        return load_image(raw)
    except ImageError as e:
        raise DataError(e.reason, str(e)) from None


@dataclass(frozen=True)
class Segment:
    """Text or an image; ``role`` is set for chat turns (system, user, assistant)."""

    text: str | None = None
    image: ImageRef | None = None
    role: str | None = None

    def __post_init__(self):
        if (self.text is None) == (self.image is None):
            raise DataError("bad_segment", "a segment holds exactly one of text or image")
        if self.role is not None and self.role not in ROLES:
            raise DataError("bad_role", f"unknown role {self.role!r}; expected one of {list(ROLES)}")


@dataclass
class Document:
    id: str
    segments: list[Segment]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.segments:
            raise DataError("empty_document", f"document {self.id!r} has no segments")
        roles = {s.role is None for s in self.segments}
        if len(roles) > 1:
            raise DataError("mixed_roles", f"document {self.id!r} mixes chat turns and plain segments")

    @property
    def is_chat(self) -> bool:
        return self.segments[0].role is not None

    @property
    def images(self) -> list[ImageRef]:
        return [s.image for s in self.segments if s.image is not None]

    def to_json(self, image_names: list[str]) -> str:
        """JSON with each image replaced by the name of the file that holds it in a shard."""
        names = iter(image_names)
        segments = [
            {"text": s.text, "role": s.role} if s.text is not None else {"image": next(names), "role": s.role}
            for s in self.segments
        ]
        return json.dumps({"id": self.id, "source": self.source, "meta": self.meta, "segments": segments})

    @classmethod
    def from_json(cls, text: str | bytes, files: dict[str, bytes]) -> Document:
        """Inverse of :meth:`to_json`; ``files`` maps image names to their bytes."""
        try:
            data = json.loads(text)
            segments = []
            for s in data["segments"]:
                if "image" in s:
                    if s["image"] not in files:
                        raise DataError("missing_image", f"image member {s['image']!r} is not in the sample")
                    segments.append(Segment(image=ImageRef(data=files[s["image"]]), role=s.get("role")))
                else:
                    segments.append(Segment(text=s["text"], role=s.get("role")))
            return cls(id=data["id"], segments=segments, source=data.get("source", ""), meta=data.get("meta", {}))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DataError("malformed_sample", f"cannot parse a document: {type(e).__name__}: {e}") from None


class SkipCounter:
    """Counts samples read and skipped (by reason); raises once the skip rate passes a ceiling.

    ``max_skip_rate`` is checked after ``min_samples`` samples, so a few early failures do not
    stop a run, while a broken dataset fails loudly instead of training on nothing.
    """

    def __init__(self, max_skip_rate: float = 0.2, min_samples: int = 50):
        self.max_skip_rate = max_skip_rate
        self.min_samples = min_samples
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def ok(self) -> None:
        self.seen += 1

    def skip(self, reason: str, where: str, message: str = "") -> None:
        self.seen += 1
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{where}: {message}" if message else where)
        total = sum(self.skipped.values())
        if self.seen >= self.min_samples and total / self.seen > self.max_skip_rate:
            raise DataError(
                "too_many_skips",
                f"{total} of {self.seen} samples skipped ({total / self.seen:.0%} > {self.max_skip_rate:.0%}): "
                + self.report(),
            )

    def report(self) -> str:
        if not self.skipped:
            return f"{self.seen} samples, none skipped"
        parts = [f"{reason}: {n} (e.g. {self.examples[reason]})" for reason, n in self.skipped.most_common()]
        return f"{self.seen} samples, skipped " + "; ".join(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(self.skipped), "examples": dict(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]
        self.skipped = Counter(state["skipped"])
        self.examples = dict(state["examples"])

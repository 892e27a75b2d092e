"""Where a checkpoint named by a path or a hub id lives on disk.

:func:`resolve` gives a local directory (the path itself, or a snapshot of the hub repo).
:func:`native` also converts upstream formats on the fly: converters (IDEFICS, OpenFlamingo
releases) sit above the model in the import layers, so they register themselves here when
:mod:`interleaf.convert` is imported (``import interleaf`` does it), and the loaders below them
(``Flamingo.from_pretrained``, ``Processor.from_pretrained``) reach them through this registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

Converter = Callable[[str], "Path | None"]
"""Takes a path or hub id; returns the directory of its interleaf conversion, or None when the
source is not in the converter's format."""

_CONVERTERS: list[Converter] = []


def cache_root() -> Path:
    """Where conversions are cached: ``$INTERLEAF_CACHE``, default ``~/.cache/interleaf``."""
    return Path(os.environ.get("INTERLEAF_CACHE", "~/.cache/interleaf")).expanduser()


def register_converter(converter: Converter) -> Converter:
    """Add ``converter`` to those :func:`native` tries (once; in registration order)."""
    if converter not in _CONVERTERS:
        _CONVERTERS.append(converter)
    return converter


def resolve(path: str | Path) -> Path:
    """A local directory for ``path``: itself, or a hub snapshot of the repo id ``path``."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{path}: expected a checkpoint directory, found a file")
    text = str(path)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:  # a path, not "org/name"
        raise ValueError(f"{path}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path)))
    except Exception as e:  # network, auth and repo errors all mean: not loadable
        raise ValueError(f"{path!r} is neither a local directory nor a downloadable hub repo: {e}") from None


def native(path: str | Path) -> Path:
    """A directory holding an interleaf checkpoint for ``path`` (a local directory or hub id):
    a registered converter's output for an upstream format, else :func:`resolve`'s directory."""
    for converter in _CONVERTERS:
        converted = converter(str(path))
        if converted is not None:
            return converted
    return resolve(path)

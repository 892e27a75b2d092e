"""Converters from the released formats of this model family to interleaf checkpoints.

``Flamingo.from_pretrained`` and ``Processor.from_pretrained`` call :func:`native` so that an
upstream directory or hub id (IDEFICS, or a known OpenFlamingo release) is converted once, on
the fly, into a cache directory (``$INTERLEAF_CACHE``, default ``~/.cache/interleaf``) and
loaded from there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("INTERLEAF_CACHE", "~/.cache/interleaf")).expanduser()


def native(path: str | Path) -> Path:
    """A directory holding an interleaf checkpoint for ``path`` (a local dir or hub id):
    ``path`` itself, or its conversion, made on first use and reused while the source's
    files are unchanged."""
    from interleaf.checkpoint import resolve
    from interleaf.convert import idefics, openflamingo

    release = openflamingo.release_checkpoint(str(path))
    if release is not None:
        return release
    root = resolve(path)
    if not idefics.is_idefics(root):
        return root
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(root.iterdir()))
    key = hashlib.sha256(f"{root.resolve()}|{stamp}".encode()).hexdigest()[:16]
    target = cache_root() / "converted" / f"idefics-{root.name}-{key}"
    if not (target / "processor_config.json").is_file():  # written last by the converter
        idefics.convert(root, target)
    return target

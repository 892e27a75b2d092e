"""Converters from the released formats of this model family to interleaf checkpoints.

Importing this package registers two converters with :mod:`interleaf.hub`, so that
``Flamingo.from_pretrained`` and ``Processor.from_pretrained`` accept an upstream directory or
hub id (IDEFICS, or a known OpenFlamingo release): it is converted once, on the fly, into a cache
directory (``$INTERLEAF_CACHE``, default ``~/.cache/interleaf``) and loaded from there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from interleaf.convert import idefics, openflamingo
from interleaf.hub import cache_root, register_converter, resolve


@register_converter
def openflamingo_release(path: str) -> Path | None:
    """A known OpenFlamingo hub release, converted on first use."""
    return openflamingo.release_checkpoint(path)


@register_converter
def idefics_directory(path: str) -> Path | None:
    """An IDEFICS directory or hub id, converted on first use and reused while its files are unchanged."""
    root = resolve(path)
    if not idefics.is_idefics(root):
        return None
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(root.iterdir()))
    key = hashlib.sha256(f"{root.resolve()}|{stamp}".encode()).hexdigest()[:16]
    target = cache_root() / "converted" / f"idefics-{root.name}-{key}"
    if not (target / "processor_config.json").is_file():  # written last by the converter
        idefics.convert(root, target)
    return target

"""Converters from the released formats of this model family to interleaf checkpoints.

Importing this package registers three converters with :mod:`interleaf.hub`, so that
``Flamingo.from_pretrained`` and ``Processor.from_pretrained`` accept an upstream directory or
hub id (IDEFICS, a known OpenFlamingo release, InfiMM): it is converted once, on the fly, into a cache
directory (``$INTERLEAF_CACHE``, default ``~/.cache/interleaf``) and loaded from there.
"""

from __future__ import annotations

from pathlib import Path

from interleaf.convert import idefics, infimm, openflamingo
from interleaf.convert.common import convert_once, converted_directory
from interleaf.hub import register_converter, resolve


@register_converter
def openflamingo_release(path: str) -> Path | None:
    """A known OpenFlamingo hub release, converted on first use."""
    return openflamingo.release_checkpoint(path)


@register_converter
def infimm_directory(path: str) -> Path | None:
    """A local InfiMM directory or a known InfiMM hub release, converted on first use."""
    return infimm.release_directory(path)


@register_converter
def idefics_directory(path: str) -> Path | None:
    """An IDEFICS directory or hub id, converted on first use and reused while its files are unchanged."""
    root = resolve(path)
    if not idefics.is_idefics(root):
        return None
    return convert_once(converted_directory("idefics", root), lambda dst: idefics.convert(root, dst))

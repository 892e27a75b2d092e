"""Checks on paths a command will write, made before any work: a run that trains or draws for
minutes must not fail at its end because its output cannot be written."""

from __future__ import annotations

from pathlib import Path


def check_out_dir(path: str | Path, what: str = "out") -> Path:
    """``path`` as a ``Path``, refused in one line when it, or the nearest of its parents that
    exists, is not a directory (a file there would stop the write of the first output)."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, not a directory")
    return path

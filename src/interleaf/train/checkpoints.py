"""Training checkpoints: written atomically, pruned to the last K, read back or skipped.

A checkpoint is a directory ``checkpoint-<step>`` holding ``trainable.safetensors`` (the
trainable weights) and ``state.pt`` (optimiser, scheduler, RNG states, data-loader state and
step). It is written to a temporary directory, fsynced, then renamed into place, so a crash
leaves either a whole checkpoint or none; one damaged later on disk is detected on reading.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
PATTERN = re.compile(r"checkpoint-(\d+)")
READ_ERRORS = (OSError, RuntimeError, EOFError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError)


@dataclass
class Checkpoint:
    """What a checkpoint holds, read fully into memory before anything is restored."""

    path: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep_last: int) -> Path:
    """Write ``checkpoint-<step>`` (the trainable ``weights`` by name, and ``state``) atomically
    under ``out_dir`` and prune to ``keep_last``."""
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
    save_file(weights, tmp / WEIGHTS, metadata={"step": str(step)})
    torch.save({**state, "step": step}, tmp / STATE)
    for file in (tmp / WEIGHTS, tmp / STATE, tmp):
        _fsync(file)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(out_dir)
    prune(out_dir, keep_last)
    return final


def checkpoints(out_dir: Path) -> list[Path]:
    """The checkpoint directories of ``out_dir``, oldest first."""
    found = [(int(m.group(1)), p) for p in out_dir.glob("checkpoint-*") if (m := PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prune(out_dir: Path, keep_last: int) -> None:
    for path in checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(path)


def read(path: Path) -> Checkpoint:
    """Read a checkpoint whole; raises one of ``READ_ERRORS`` if a file is missing or damaged."""
    weights = load_file(path / WEIGHTS)
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    if "step" not in state:
        raise KeyError(f"{path / STATE} holds no step")
    return Checkpoint(path, weights, state)


def latest(out_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint of ``out_dir``; damaged ones are skipped with a warning."""
    for path in reversed(checkpoints(out_dir)):
        try:
            return read(path)
        except READ_ERRORS as e:
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}", stacklevel=2)
    return None


def init_weights(model: nn.Module, directory: str | Path) -> list[str]:
    """Start a stage from an earlier stage's export (``train.init_from``, a ``save_pretrained``
    directory): copy every weight the file holds into the parameter of the same name (a LoRA
    layer's ``base_layer`` takes the plain layer's weight); the resampler and the cross-attention
    must all be there, shapes must agree; LoRA adapters the file lacks stay as initialised.
    Returns the names of the parameters that were copied."""
    from interleaf.model.trainable import parameter_groups

    file = Path(directory) / "model.safetensors"
    try:
        weights = load_file(file)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"train.init_from: {directory}: cannot read model.safetensors ({e})") from None
    groups = parameter_groups(model)
    copied = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = name if name in weights else name.replace(".base_layer.", ".")
            if key not in weights:
                if groups[name] in ("resampler", "cross_attention"):
                    raise ValueError(f"train.init_from: {file} has no weight {name!r}: not an export of this model")
                continue
            if weights[key].shape != param.shape:
                raise ValueError(
                    f"train.init_from: {file}: {key!r} has shape {tuple(weights[key].shape)}, "
                    f"the model's is {tuple(param.shape)}"
                )
            param.copy_(weights[key])
            copied.append(name)
    return copied

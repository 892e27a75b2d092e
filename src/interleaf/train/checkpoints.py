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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from interleaf.model.trainable import parameter_groups

WEIGHTS = "trainable.safetensors"
EXPORT_WEIGHTS = "model.safetensors"  # interleaf.checkpoint.WEIGHTS: what save_pretrained writes
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


def init_source(directory: str | Path) -> Path:
    """The weights file ``train.init_from`` names: an export's ``model.safetensors`` (a
    ``save_pretrained`` directory such as ``out_dir/final``) or a training checkpoint's
    ``trainable.safetensors``; a ``ValueError`` naming the option and the path otherwise."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"train.init_from: {directory} is not a directory (an earlier stage's out_dir/final)")
    for name in (EXPORT_WEIGHTS, WEIGHTS):
        if (root / name).is_file():
            return root / name
    raise ValueError(
        f"train.init_from: {directory} holds neither {EXPORT_WEIGHTS} (an export, e.g. out_dir/final) "
        f"nor {WEIGHTS} (a training checkpoint)"
    )


def check_init_source(directory: str | Path) -> None:
    """Fail before anything is built if ``train.init_from`` names no readable weights."""
    file = init_source(directory)
    try:
        with safe_open(file, framework="pt") as f:
            f.keys()
    except (OSError, SafetensorError) as e:
        raise ValueError(f"train.init_from: cannot read {file}: {e}") from None


def init_weights(model: nn.Module, directory: str | Path) -> list[str]:
    """Start a stage from an earlier stage's weights (``train.init_from``: an export or a training
    checkpoint, see :func:`init_source`): copy every weight the file holds into the parameter of
    the same name (a LoRA layer's ``base_layer`` takes the plain layer's weight). The resampler and
    the cross-attention must all be there, every tensor must fit a parameter by name and shape;
    LoRA adapters the file lacks stay as initialised, and so do the rows of new tokens this stage
    adds (a begin-of-image token, added after the others, when a model learns to draw). Returns
    the names of the parameters that were copied."""
    file = init_source(directory)
    try:
        weights = load_file(file)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"train.init_from: cannot read {file}: {e}") from None
    groups = parameter_groups(model)
    params = dict(model.named_parameters())
    by_key = {name if name in weights else name.replace(".base_layer.", "."): name for name in params}
    buffers = {name for name, _ in model.named_buffers()}
    unused = sorted(k for k in weights if k not in by_key and k not in buffers)
    if unused:
        more = f" (+{len(unused) - 3} more)" if len(unused) > 3 else ""
        raise ValueError(
            f"train.init_from: {file} holds {len(unused)} tensor(s) this model does not have: "
            f"{', '.join(unused[:3])}{more}; not a stage of this model"
        )
    copied = []
    with torch.no_grad():
        for key, name in by_key.items():
            if key not in weights:
                if groups[name] in ("resampler", "cross_attention"):
                    raise ValueError(f"train.init_from: {file} has no weight {name!r}: not a stage of this model")
                continue
            param = params[name]
            if groups[name] == "new_token_embeddings" and _fewer_rows(weights[key], param):
                param[: weights[key].shape[0]].copy_(weights[key])  # tokens added by this stage start fresh
                copied.append(name)
                continue
            if weights[key].shape != param.shape:
                raise ValueError(
                    f"train.init_from: {file}: {key!r} has shape {tuple(weights[key].shape)}, "
                    f"the model's is {tuple(param.shape)}"
                )
            param.copy_(weights[key])
            copied.append(name)
    return copied


def _fewer_rows(stored: torch.Tensor, param: torch.Tensor) -> bool:
    """``stored`` is ``param`` with fewer rows (new tokens' embedding rows, ids in order)."""
    return stored.ndim == param.ndim and stored.shape[1:] == param.shape[1:] and stored.shape[0] < param.shape[0]

"""What every converter shares: reading upstream weights, writing a checked checkpoint."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn

from interleaf.config import FlamingoConfig
from interleaf.hub import cache_root
from interleaf.model.checkpoint import save_flamingo
from interleaf.model.flamingo import Flamingo
from interleaf.processing import Processor


def read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory: ``model.safetensors``, sharded safetensors
    (``model.safetensors.index.json``), or ``pytorch_model.bin`` (single or sharded)."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: cannot read the shard index: {e}") from None
            state = {}
            for shard in shards:
                state.update(_read_file(src / shard))
            return state
        if (src / single).is_file():
            return _read_file(src / single)
    raise ValueError(f"{src}: no model.safetensors, pytorch_model.bin or shard index found")


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        with file.open("rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ValueError(f"{file}: cannot read the weights: {e}") from None
    if not head:
        raise ValueError(f"{file}: empty file, not weights")
    if head.startswith(b"version https://git-lfs"):
        raise ValueError(f"{file}: a git-lfs pointer, not the weights; fetch the file itself (git lfs pull)")
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # not torch's message: it advises weights_only=False, which runs whatever the file holds
        raise ValueError(
            f"{file}: corrupt or unreadable weights: not a checkpoint of plain tensors (the weights-only reader "
            "refused it)"
        ) from None
    except SafetensorError as e:
        raise ValueError(f"{file}: corrupt or unreadable weights: {e}") from None
    except (OSError, RuntimeError, EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{file}: corrupt or unreadable weights: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{file}: holds a {type(state).__name__}, not a state dict of named tensors")
    return state


def meta_model(
    config: FlamingoConfig,
    *,
    lm_config: transformers.PreTrainedConfig,
    vision_tower: Callable[[], nn.Module],
    tokenizer,
) -> Flamingo:
    """The Flamingo of ``config`` on the meta device (no memory): the names and shapes a
    converted state dict must have."""
    with init_empty_weights():
        lm = transformers.AutoModelForCausalLM.from_config(lm_config)
        return Flamingo(config, lm=lm, vision_tower=vision_tower(), tokenizer=tokenizer)


def write_checkpoint(
    dst: str | Path,
    model: Flamingo,
    state: dict[str, torch.Tensor],
    *,
    image_processor,
    padding_side: str = "left",
    **processor_options,
) -> Path:
    """Write converted tensors ``state`` as an interleaf checkpoint of the (meta) ``model``, with
    its processor (``processor_options``: see :class:`~interleaf.processing.Processor`).

    ``state`` must name and shape exactly the model's parameters; any missing, unexpected or
    misshapen tensor is an error.
    """
    dst = Path(dst)
    Processor(
        model.tokenizer, image_processor, tokens=model.config.tokens, padding_side=padding_side, **processor_options
    ).save_pretrained(dst)
    save_flamingo(model, dst, state=state)
    return dst


def convert_once(target: Path, convert: Callable[[Path], object]) -> Path:
    """``target``, made by ``convert(directory)`` unless it exists: the conversion writes into a
    fresh sibling directory that is renamed to ``target`` only when complete, so an error or an
    interruption never leaves a half-written cache entry."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        convert(partial)
        partial.rename(target)
    except OSError:
        if not target.is_dir():  # another process finished first: its result stands
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def converted_directory(kind: str, root: Path) -> Path:
    """Where the converted checkpoint of upstream directory ``root`` goes in the cache: a name
    that changes whenever a file of ``root`` does, so a changed source converts again."""
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(root.iterdir()))
    key = hashlib.sha256(f"{root.resolve()}|{stamp}".encode()).hexdigest()[:16]
    return cache_root() / "converted" / f"{kind}-{root.name}-{key}"

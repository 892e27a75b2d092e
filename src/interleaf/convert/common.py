"""What every converter shares: reading upstream weights, writing a checked checkpoint."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn

from interleaf.config import FlamingoConfig
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
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{file}: corrupt or unreadable weights: {e}") from None


def write_checkpoint(
    dst: str | Path,
    config: FlamingoConfig,
    state: dict[str, torch.Tensor],
    *,
    lm_config: transformers.PreTrainedConfig,
    vision_tower: Callable[[], nn.Module],
    tokenizer,
    image_processor,
    padding_side: str = "left",
) -> Path:
    """Write converted tensors ``state`` as an interleaf checkpoint with its processor.

    The model is built on the meta device (no memory) only to check that ``state`` names and
    shapes exactly its parameters; any missing, unexpected or misshapen tensor is an error.
    """
    dst = Path(dst)
    with init_empty_weights():
        lm = transformers.AutoModelForCausalLM.from_config(lm_config)
        model = Flamingo(config, lm=lm, vision_tower=vision_tower(), tokenizer=tokenizer)
    Processor(tokenizer, image_processor, tokens=model.config.tokens, padding_side=padding_side).save_pretrained(dst)
    save_flamingo(model, dst, state=state)
    return dst

"""Checkpoints: ``config.json`` + ``model.safetensors`` + the tokenizer, in one directory.

Full checkpoints also hold the backbones' HF configs (``lm_config.json``,
``vision_config.json``) so they load offline with nothing else. Trainable-only checkpoints
(``save_pretrained(dir, trainable_only=True)``) hold the trained parameters alone and load
the backbones from ``config.lm.source`` / ``config.vision.source`` (a hub id or a path).
Loading validates the keys strictly and names every missing, unexpected or misshapen one.
With ``trainable.lora`` the model is built with its adapters before the weights load, so the
adapters (``...q_proj.lora_A.default.weight``) are trainable weights like any other, and a
full checkpoint holds the adapted layers' frozen weights as ``...q_proj.base_layer.weight``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from interleaf.config import FlamingoConfig
from interleaf.model.trainable import apply_trainable
from interleaf.model.vision import tower_config_from_dict, tower_from_config

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LM_CONFIG = "lm_config.json"
VISION_CONFIG = "vision_config.json"
KIND_KEY = "interleaf_weights"  # safetensors metadata: "full" or "trainable"


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied parameters (e.g. GPT-2's lm_head/wte) kept once, under the
    first name; the model's own tying restores the others on load. Works on meta models."""
    keep = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def save_flamingo(model, path: str | Path, *, trainable_only: bool = False, state=None) -> None:
    """Write ``model`` (or, for converters, ``state``: tensors named and shaped as the
    possibly meta-device ``model``'s, checked here) as an interleaf checkpoint."""
    path = Path(path)
    expected = unique_state_dict(model)
    if state is None:
        state = expected
    else:
        _check_keys(path / WEIGHTS, state, expected)
    path.mkdir(parents=True, exist_ok=True)
    if trainable_only:
        for field, source in (("lm", model.config.lm.source), ("vision", model.config.vision.source)):
            if not source:
                raise ValueError(
                    f"config.{field}.source is empty: a trainable-only checkpoint must name its backbones; "
                    "save the full weights instead"
                )
        keep = set(model.trainable_names)
        state = {k: v for k, v in state.items() if k in keep}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt", KIND_KEY: "trainable" if trainable_only else "full"})
    model.config.to_json(path / CONFIG)
    (path / LM_CONFIG).write_text(model.language_model.lm.config.to_json_string())
    (path / VISION_CONFIG).write_text(model.vision.tower.config.to_json_string())
    model.tokenizer.save_pretrained(path)
    _save_processor(model, path)


def _save_processor(model, path: Path) -> None:
    """Write the processor beside the weights (unless one was saved there already), so that
    ``Processor.from_pretrained`` works on a model checkpoint alone."""
    from interleaf.processing import CONFIG_FILE, Processor

    source = model.config.vision.source
    if (path / CONFIG_FILE).exists() or not source:
        return
    try:
        image_processor = transformers.AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        warnings.warn(
            f"no processor written to {path}: cannot load the image processor of {source!r}: {e}", stacklevel=3
        )
        return
    Processor(model.tokenizer, image_processor, tokens=model.config.tokens).save_pretrained(path)


def resolve(path: str | Path) -> Path:
    """A local directory for ``path``: itself, or a hub snapshot of the repo id ``path``."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{path}: expected a checkpoint directory, found a file")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path)))
    except Exception as e:  # network, auth and repo errors all mean: not loadable
        raise ValueError(f"{path!r} is neither a local directory nor a downloadable hub repo: {e}") from None


def load_lm_and_tokenizer(source: str, **kwargs):
    """An HF causal LM and its tokenizer from a hub id or a directory."""
    try:
        lm = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a causal language model from {source!r}: {e}") from None
    return lm, tokenizer


def load_flamingo(path: str | Path, *, dtype: torch.dtype | None = None):
    from interleaf.convert import native
    from interleaf.model.flamingo import Flamingo, load_backbones

    root = native(path)
    for name in (CONFIG, WEIGHTS):
        if not (root / name).is_file():
            raise ValueError(f"{root}: not an interleaf checkpoint: {name} is missing")
    config = FlamingoConfig.from_json(root / CONFIG)
    state, kind = _read_weights(root / WEIGHTS)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root)
    except (OSError, ValueError) as e:
        raise ValueError(f"{root}: cannot load the tokenizer: {e}") from None
    if kind == "full":
        lm_config = _read_hf_config(root / LM_CONFIG)
        vision_config = _read_hf_config(root / VISION_CONFIG, tower_config_from_dict)
        # Parameters start on the meta device (no memory, no random init) and take the
        # checkpoint's tensors; buffers such as rotary frequencies are built for real.
        with init_empty_weights():
            lm = transformers.AutoModelForCausalLM.from_config(lm_config)
            tower = tower_from_config(vision_config)
        _tie_embeddings(lm)  # outside the context, which would copy the parameter
        with init_empty_weights():
            model = Flamingo(config, lm=lm, vision_tower=tower, tokenizer=tokenizer)
        _check_keys(root / WEIGHTS, state, unique_state_dict(model))
        model.load_state_dict(state, strict=False, assign=True)
        _tie_embeddings(model.language_model.lm)
        model.trainable_names = apply_trainable(model, config.trainable)
    else:
        lm, _, tower = load_backbones(config)
        model = Flamingo(config, lm=lm, vision_tower=tower, tokenizer=tokenizer)
        _check_keys(root / WEIGHTS, state, {k: model.state_dict()[k] for k in model.trainable_names})
        model.load_state_dict(state, strict=False)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _tie_embeddings(lm: nn.Module) -> None:
    """Share the output and input embeddings where the LM's config ties them (transformers
    does not tie parameters that live on the meta device)."""
    if getattr(lm.config, "tie_word_embeddings", False):
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight


def _read_weights(file: Path) -> tuple[dict[str, torch.Tensor], str]:
    try:
        with safe_open(file, framework="pt") as f:
            kind = (f.metadata() or {}).get(KIND_KEY, "full")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{file}: corrupt or unreadable weights: {e}") from None
    if kind not in ("full", "trainable"):
        raise ValueError(f"{file}: unknown {KIND_KEY}={kind!r} in the metadata")
    return state, kind


def _read_hf_config(file: Path, parse=None) -> transformers.PreTrainedConfig:
    try:
        data = json.loads(file.read_text())
        if parse is not None:
            return parse(data)
        return transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    except (OSError, json.JSONDecodeError, ValueError, KeyError) as e:
        raise ValueError(f"{file}: cannot read the backbone config: {e}") from None


def _check_keys(file: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_first(shapes)}")
    if problems:
        raise ValueError(f"{file} does not match the model built from its config: " + "; ".join(problems))


def _first(items: list[str], n: int = 5) -> str:
    more = f", ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more

"""Checkpoints: ``config.json`` + ``model.safetensors`` + the tokenizer + the processor, in one
directory; and the backbones a config names.

Full checkpoints also hold the backbones' HF configs (``lm_config.json``,
``vision_config.json``) so they load offline with nothing else. Trainable-only checkpoints
(``save_pretrained(dir, trainable_only=True)``) hold the trained parameters alone and load
the backbones from ``config.lm.source`` / ``config.vision.source`` (a hub id or a path).
A local backbone path is saved relative to the checkpoint directory when it lies inside it
(``./backbones/lm``), else absolute, so a checkpoint loads from any working directory.
Every checkpoint holds its processor (``processor_config.json``, the image processor and
the tokenizer), so ``Processor.from_pretrained`` works on it alone.
Loading validates the keys strictly and names every missing, unexpected or misshapen one.
With ``trainable.lora`` the model is built with its adapters before the weights load, so the
adapters (``...q_proj.lora_A.default.weight``) are trainable weights like any other, and a
full checkpoint holds the adapted layers' frozen weights as ``...q_proj.base_layer.weight``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from interleaf.config import FlamingoConfig
from interleaf.hub import native
from interleaf.model.trainable import apply_trainable
from interleaf.model.vision import load_tower, tower_config_from_dict, tower_from_config
from interleaf.processing import CONFIG_FILE as PROCESSOR_CONFIG
from interleaf.processing import IMAGE_PROCESSOR_FILE, Processor

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
    possibly meta-device ``model``'s, checked here) as an interleaf checkpoint, with its
    processor unless one was saved in ``path`` already."""
    path = Path(path)
    expected = unique_state_dict(model)
    if state is None:
        state = expected
    else:
        _check_keys(path / WEIGHTS, state, expected)
    if (path / PROCESSOR_CONFIG).exists():
        processor = None
    elif model.image_processor is not None:
        processor = Processor(model.tokenizer, model.image_processor, tokens=model.config.tokens)
    else:
        raise ValueError(
            f"cannot save to {path}: the model has no image processor (build it with Flamingo.from_config, "
            "pass image_processor= to Flamingo(...), or save a Processor to the directory first)"
        )
    if trainable_only:
        for field, source in (("lm", model.config.lm.source), ("vision", model.config.vision.source)):
            if not source:
                raise ValueError(
                    f"config.{field}.source is empty: a trainable-only checkpoint must name its backbones; "
                    "save the full weights instead"
                )
        keep = set(model.trainable_names)
        state = {k: v for k, v in state.items() if k in keep}
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt", KIND_KEY: "trainable" if trainable_only else "full"})
    portable_sources(model.config, path).to_json(path / CONFIG)
    (path / LM_CONFIG).write_text(model.language_model.lm.config.to_json_string())
    (path / VISION_CONFIG).write_text(model.vision.tower.config.to_json_string())
    model.tokenizer.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)


def portable_sources(config: FlamingoConfig, directory: Path) -> FlamingoConfig:
    """``config`` with each backbone source that is a local path written so that it resolves
    from anywhere: relative to ``directory`` (``./...``) when it lies inside it, else absolute.
    Hub ids stay as they are."""

    def portable(source: str) -> str:
        local = Path(source).expanduser()
        if not source or not local.exists():
            return source
        local, root = local.resolve(), directory.resolve()
        return f"./{local.relative_to(root).as_posix()}" if local.is_relative_to(root) else str(local)

    return dataclasses.replace(
        config,
        lm=dataclasses.replace(config.lm, source=portable(config.lm.source)),
        vision=dataclasses.replace(config.vision, source=portable(config.vision.source)),
    )


def located_sources(config: FlamingoConfig, directory: Path) -> FlamingoConfig:
    """The inverse of :func:`portable_sources` for a checkpoint read from ``directory``: sources
    written relative to it become absolute paths; others stay (hub ids, absolute paths, and the
    relative paths older checkpoints kept, which resolve from the directory they were saved from)."""

    def located(source: str) -> str:
        if source.startswith(("./", "../")) and (directory / source).exists():
            return str((directory / source).resolve())
        return source

    return dataclasses.replace(
        config,
        lm=dataclasses.replace(config.lm, source=located(config.lm.source)),
        vision=dataclasses.replace(config.vision, source=located(config.vision.source)),
    )


def load_lm_and_tokenizer(source: str, **kwargs):
    """An HF causal LM and its tokenizer from a hub id or a directory."""
    try:
        lm = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a causal language model from {source!r}: {e}") from None
    return lm, tokenizer


def load_backbones(config: FlamingoConfig) -> tuple[nn.Module, object, nn.Module, object]:
    """The LM, its tokenizer, the vision tower and its image processor named by ``config``; a
    source that cannot be loaded is a one-line ``ValueError`` naming the field, the source and the
    reason. Both sources' configs are read before any weights, so a wrong id fails fast."""

    def load(field: str, what: str, fn):
        source = getattr(config, field).source
        if not source:
            raise ValueError(f"{field}.source is empty: name the {what} (a hub id or a local directory)")
        try:
            return fn(source)
        except (OSError, ValueError) as e:
            reason = e.__context__ or e  # the loader's own error, without its wrapping
            raise ValueError(f"{field}.source {source!r}: cannot load the {what}: {one_line(reason)}") from None

    load("lm", "language model", transformers.AutoConfig.from_pretrained)
    load("vision", "vision encoder", transformers.AutoConfig.from_pretrained)
    lm, tokenizer = load("lm", "language model", load_lm_and_tokenizer)
    tower = load("vision", "vision encoder", load_tower)
    image_processor = load("vision", "image processor", transformers.AutoImageProcessor.from_pretrained)
    return lm, tokenizer, tower, image_processor


def one_line(error: BaseException) -> str:
    """An exception's message with its line breaks and runs of spaces collapsed."""
    return " ".join(str(error).split()) or type(error).__name__


def load_flamingo(cls, path: str | Path, *, dtype: torch.dtype | None = None):
    """The model of class ``cls`` (:class:`~interleaf.model.flamingo.Flamingo`) saved at ``path``
    (a directory or hub id; upstream formats are converted, see :func:`interleaf.hub.native`)."""
    root = native(path)
    for name in (CONFIG, WEIGHTS):
        if not (root / name).is_file():
            raise ValueError(f"{root}: not an interleaf checkpoint: {name} is missing")
    config = located_sources(FlamingoConfig.from_json(root / CONFIG), root)
    state, kind = _read_weights(root / WEIGHTS)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root)
    except (OSError, ValueError) as e:
        raise ValueError(f"{root}: cannot load the tokenizer: {e}") from None
    image_processor = None
    if (root / IMAGE_PROCESSOR_FILE).is_file():
        try:
            image_processor = transformers.AutoImageProcessor.from_pretrained(root)
        except (OSError, ValueError) as e:
            raise ValueError(f"{root}: cannot load the image processor: {one_line(e)}") from None
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
            model = cls(config, lm=lm, vision_tower=tower, tokenizer=tokenizer, image_processor=image_processor)
        _check_keys(root / WEIGHTS, state, unique_state_dict(model))
        model.load_state_dict(state, strict=False, assign=True)
        _tie_embeddings(model.language_model.lm)
        model.trainable_names = apply_trainable(model, config.trainable)
    else:
        lm, _, tower, backbone_processor = load_backbones(config)
        processor = image_processor or backbone_processor
        model = cls(config, lm=lm, vision_tower=tower, tokenizer=tokenizer, image_processor=processor)
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

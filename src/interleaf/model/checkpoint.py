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
import math
from functools import partial
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn

from interleaf.config import FlamingoConfig
from interleaf.hub import native
from interleaf.images import load_image_processor
from interleaf.model.layout import set_weight_layout
from interleaf.model.placement import as_device, device_of, dispatch, parse_device, parse_dtype, plan_device_map
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


def load_backbones(
    config: FlamingoConfig, *, dtype: torch.dtype | None = None
) -> tuple[nn.Module, object, nn.Module, object]:
    """The LM, its tokenizer, the vision tower and its image processor named by ``config``, with
    their weights read in ``dtype`` (default: float32); a source that cannot be loaded is a
    one-line ``ValueError`` naming the field, the source and the reason. Both sources' configs
    are read before any weights, so a wrong id fails fast."""

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
    lm, tokenizer = load("lm", "language model", partial(load_lm_and_tokenizer, dtype=dtype or torch.float32))
    tower = load("vision", "vision encoder", partial(load_tower, dtype=dtype or torch.float32))
    image_processor = load("vision", "image processor", transformers.AutoImageProcessor.from_pretrained)
    return lm, tokenizer, tower, image_processor


def one_line(error: BaseException) -> str:
    """An exception's message with its line breaks and runs of spaces collapsed."""
    return " ".join(str(error).split()) or type(error).__name__


def load_flamingo(
    cls,
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | int | torch.device | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
):
    """The model of class ``cls`` (:class:`~interleaf.model.flamingo.Flamingo`) saved at ``path``
    (a directory or hub id; upstream formats are converted, see :func:`interleaf.hub.native`).

    ``dtype`` (``float32``, ``bfloat16``, ``float16``; default: as stored, or float32 for a
    checkpoint that mixes dtypes) and ``device``
    (``cpu``, ``cuda``, ``cuda:1``; default: the CPU) are applied tensor by tensor as the weights
    are read, so loading never holds more than the model in its final dtype plus one tensor
    (a float32 copy of a bf16 model is never made). ``device_map`` (``"auto"`` or a dict, see
    :mod:`interleaf.model.placement`) spreads the blocks over several GPUs instead.
    """
    dtype = parse_dtype(dtype)
    if device == "auto":
        device, device_map = None, device_map or "auto"
    if device is not None and device_map is not None:
        raise ValueError("give device (one device) or device_map (several), not both")
    device = parse_device(device) or torch.device("cpu")
    root = native(path)
    for name in (CONFIG, WEIGHTS):
        if not (root / name).is_file():
            raise ValueError(f"{root}: not an interleaf checkpoint: {name} is missing")
    if max_memory is not None and device_map is None:
        raise ValueError("max_memory bounds a device map: pass device_map='auto' (or a dict) with it")
    config = located_sources(FlamingoConfig.from_json(root / CONFIG), root)
    header, kind = read_header(root / WEIGHTS)
    stored = {entry.dtype for entry in header.values() if entry.dtype.is_floating_point}
    if dtype is None and len(stored) > 1:
        # e.g. a run with train.dtype=bfloat16: frozen weights in bf16, trained ones in float32.
        # One dtype is needed outside autocast; float32 loses nothing (pass dtype to choose).
        dtype = torch.float32
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root)
    except (OSError, ValueError) as e:
        raise ValueError(f"{root}: cannot load the tokenizer: {e}") from None
    image_processor = None
    if (root / IMAGE_PROCESSOR_FILE).is_file():
        try:
            image_processor = load_image_processor(root)
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
        _check_keys(root / WEIGHTS, header, unique_state_dict(model))
        if device_map is not None:
            device_map, device = _planned(model, device_map, dtype, max_memory, device)
        one_device = device
        place = partial(device_of, device_map=device_map) if device_map is not None else (lambda name: one_device)
        state = read_weights(root / WEIGHTS, header, dtype=dtype, place=place)
        model.load_state_dict(state, strict=False, assign=True)
        del state
        _tie_embeddings(model.language_model.lm)
        model.trainable_names = apply_trainable(model, config.trainable)
    else:
        lm, _, tower, backbone_processor = load_backbones(config, dtype=dtype)
        processor = image_processor or backbone_processor
        model = cls(config, lm=lm, vision_tower=tower, tokenizer=tokenizer, image_processor=processor)
        _check_keys(root / WEIGHTS, header, {k: model.state_dict()[k] for k in model.trainable_names})
        model.load_state_dict(read_weights(root / WEIGHTS, header, dtype=dtype), strict=False)
        if device_map is not None:
            device_map, device = _planned(model, device_map, dtype, max_memory, device)
        if device_map is not None:
            for name, param in model.named_parameters():
                param.data = param.data.to(device_of(name, device_map))
    if dtype is not None:  # the buffers (built in float32) and anything the checkpoint did not hold
        model.to(dtype)
    if device_map is not None:
        dispatch(model, device_map)
    else:
        model.to(device)
    set_weight_layout(model)
    return model.eval()


def _planned(model, device_map, dtype, max_memory, device) -> tuple[dict | None, torch.device]:
    """The device map to load with, or (``"auto"`` landing on one device) none and that device."""
    planned = plan_device_map(model, device_map, dtype=dtype, max_memory=max_memory)
    if isinstance(device_map, str) and len(set(planned.values())) == 1:
        return None, as_device(next(iter(planned.values())))
    return planned, device


def _tie_embeddings(lm: nn.Module) -> None:
    """Share the output and input embeddings where the LM's config ties them (transformers
    does not tie parameters that live on the meta device)."""
    if getattr(lm.config, "tie_word_embeddings", False):
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file: its dtype, shape and byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int


def read_header(file: Path) -> tuple[dict[str, TensorEntry], str]:
    """The tensors a safetensors file holds (without reading them) and the checkpoint's kind
    (``full`` or ``trainable``, from the metadata). A corrupt header is a one-line error."""
    try:
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError(f"header length {size}")
            raw = json.loads(f.read(size))
        total = file.stat().st_size
        metadata = raw.pop("__metadata__", None) or {}
        entries = {}
        for name, info in raw.items():
            begin, end = (8 + size + int(o) for o in info["data_offsets"])
            shape = tuple(int(n) for n in info["shape"])
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if not begin <= end <= total or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name!r}: byte range {begin}..{end} does not fit its shape or the file")
            entries[name] = TensorEntry(dtype, shape, begin, end)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: corrupt or unreadable weights: {one_line(e)}") from None
    kind = metadata.get(KIND_KEY, "full")
    if kind not in ("full", "trainable"):
        raise ValueError(f"{file}: unknown {KIND_KEY}={kind!r} in the metadata")
    return entries, kind


def read_weights(
    file: Path,
    header: dict[str, TensorEntry],
    *,
    dtype: torch.dtype | None = None,
    place=lambda name: None,
) -> dict[str, torch.Tensor]:
    """The tensors of ``file``, each converted to ``dtype`` (floating tensors only) and moved to
    ``place(name)`` before the next one is read. No memory map (a mapped file's pages would
    count as a second copy): a tensor kept as stored is read straight into its own memory, one
    to convert goes through a single scratch buffer, so loading holds the model in its final
    dtype plus one tensor as stored."""
    state, scratch = {}, None
    try:
        with file.open("rb") as f:
            for name, entry in sorted(header.items(), key=lambda item: item[1].start):
                target = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
                device = as_device(place(name))  # not `or "cpu"`: GPU 0 is written 0
                size = entry.end - entry.start
                keep = target == entry.dtype and device.type == "cpu"
                if keep:
                    buffer = torch.empty(size, dtype=torch.uint8)
                else:
                    if scratch is None:
                        scratch = torch.empty(max(e.end - e.start for e in header.values()), dtype=torch.uint8)
                    buffer = scratch[:size]
                f.seek(entry.start)
                if f.readinto(memoryview(buffer.numpy())) != size:
                    raise ValueError(f"tensor {name!r} is cut short")
                tensor = buffer.view(entry.dtype).reshape(entry.shape)
                state[name] = tensor if keep else tensor.to(device, target, copy=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file}: corrupt or unreadable weights: {one_line(e)}") from None
    return state


def _read_hf_config(file: Path, parse=None) -> transformers.PreTrainedConfig:
    try:
        data = json.loads(file.read_text())
        if parse is not None:
            return parse(data)
        return transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    except (OSError, json.JSONDecodeError, ValueError, KeyError) as e:
        raise ValueError(f"{file}: cannot read the backbone config: {e}") from None


def _check_keys(file: Path, state: dict, expected: dict[str, torch.Tensor]) -> None:
    """The names and shapes of ``state`` (tensors, or a header's entries) against the model's."""
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

"""Where a model lives and in what precision: dtype and device names as users write them,
and device maps for checkpoints larger than one accelerator.

A device map (accelerate's big-model inference) assigns each block of the model to one
device: ``"auto"`` fills the visible GPUs in order (then the CPU), a dict names the device of
each module (``{"vision": 0, "language_model.lm.model.layers.0": 0, ..., "": "cpu"}``).
Every block's weights really live on its device and it computes there; accelerate's hooks
carry the hidden states from one device to the next. Blocks are never split: a decoder layer
with its cross-attention block, a vision encoder layer, the resampler. Offloading weights to
disk (or keeping them on the CPU while computing on a GPU) is not supported: a map that needs
it is an error that says how much memory is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DeviceMap = dict[str, Any]


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from ``float32``/``bfloat16``/``float16`` (or ``fp32``/``bf16``/``fp16``,
    or a torch dtype); ``None`` and ``"auto"`` mean: as stored."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"dtype {value}: expected one of {', '.join(DTYPE_NAMES)}")
        return value
    if str(value) not in DTYPES:
        raise ValueError(f"dtype {value!r}: expected one of {', '.join(DTYPE_NAMES)} (or auto: as stored)")
    return DTYPES[str(value)]


def parse_device(value: str | int | torch.device | None) -> torch.device | None:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``, or a
    GPU index); ``None`` means the CPU. ``"auto"`` is not a device: it is a device map."""
    if value is None:
        return None
    if value == "auto":
        raise ValueError("device 'auto' is a device map: pass device_map='auto' (the CLI's --device auto does)")
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"cuda:{value}"  # a GPU index, as device maps write it
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {value!r}: expected cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {value!r}: CUDA is not available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {value!r}: MPS is not available here")
    return device


def process_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of one process of a run of ``world_size`` (torchrun's LOCAL_RANK): ``auto`` is
    ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU; ``cuda`` is ``cuda:LOCAL_RANK``;
    ``cuda:N`` names one GPU, which fits one process only."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    elif name.startswith("cuda:") and world_size > 1:
        raise ValueError(f"{name} names one GPU for {world_size} processes: use cuda (cuda:LOCAL_RANK in each)")
    return parse_device(name)


def as_device(where: Any) -> torch.device:
    """A device map's value as a torch device: a GPU index (``0``) is ``cuda:0``, None the CPU."""
    if where is None:
        return torch.device("cpu")
    if isinstance(where, int) and not isinstance(where, bool):
        return torch.device("cuda", where)
    return torch.device(where)


def no_split_classes(model: nn.Module) -> list[str]:
    """Class names of the blocks a device map must keep whole: the decoder layers (with their
    cross-attention), the vision tower's layers (each backbone's own ``_no_split_modules``) and
    the resampler."""
    names = {"CrossAttentionDecoderLayer", "GatedCrossAttentionBlock", type(model.resampler).__name__}
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return sorted(names)


def plan_device_map(
    model: nn.Module,
    device_map: str | Mapping[str, Any],
    *,
    dtype: torch.dtype | None = None,
    max_memory: Mapping[Any, Any] | None = None,
) -> DeviceMap:
    """The device of each block of ``model`` (which may live on the meta device).

    ``"auto"`` puts the model on GPU 0 when it fits there (85% of its free memory), else spreads
    it like ``"balanced"``: the blocks evenly over the GPUs; ``"sequential"`` fills them in
    order; all within ``max_memory`` (``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``;
    default: what the devices have free). Without a GPU and without ``max_memory`` every block
    goes to the CPU. A dict is checked to cover the whole model.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import check_device_map, get_balanced_memory

    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "sequential"):
            raise ValueError(f"device_map {device_map!r}: expected auto, balanced, sequential or a dict")
        if max_memory is None and not torch.cuda.is_available():
            return {"": "cpu"}
        if device_map == "auto" and max_memory is None and _fits_one_gpu(model, dtype):
            return {"": 0}  # one GPU computes faster than a pipeline over several
        no_split = no_split_classes(model)
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split, dtype=dtype)
        planned = dict(
            infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
        )
    else:
        planned = dict(device_map)
        for where in set(planned.values()):
            if where != "disk":
                parse_device(where)  # one line for a device this machine does not have
        uncovered = [name for name, _ in model.named_parameters() if _placed(name, planned) is None]
        if uncovered:
            raise ValueError(
                f"device_map does not place {len(uncovered)} parameter(s), e.g. {', '.join(uncovered[:3])}: "
                'name their modules or give a default with "" (e.g. {"": 0, "vision": 1})'
            )
        check_device_map(model, planned)
    offloaded = sorted(name for name, where in planned.items() if where == "disk")
    if offloaded:
        need = sum(p.numel() * (dtype or p.dtype).itemsize for p in model.parameters())
        first = offloaded[0] or "the whole model"
        raise ValueError(
            f"device_map: {len(offloaded)} block(s) do not fit on the devices (first: {first}); the model needs "
            f"{_size(need)} in {dtype or 'its dtype'}: give max_memory more room or use more GPUs "
            "(offloading to disk is not supported)"
        )
    return _with_tied_together(model, planned)


def _fits_one_gpu(model: nn.Module, dtype: torch.dtype | None) -> bool:
    """Whether the weights take at most 85% of GPU 0's free memory (the rest: activations, cache)."""
    from accelerate.utils import get_max_memory

    need = sum(p.numel() * (dtype or p.dtype).itemsize for p in model.parameters())
    return need <= 0.85 * get_max_memory().get(0, 0)


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _with_tied_together(model: nn.Module, device_map: DeviceMap) -> DeviceMap:
    """Modules that share a parameter (an LM head tied to its input embeddings) on one device:
    the device of the first of them."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    fixed = dict(device_map)
    for names in owners.values():
        if len(names) > 1:
            first = device_of(names[0], fixed)
            for name in names[1:]:
                if device_of(name, fixed) != first:
                    fixed[name] = first
    return fixed


def _placed(name: str, device_map: Mapping[str, Any]) -> Any:
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in device_map:
            return device_map[prefix]
    return None


def device_of(name: str, device_map: Mapping[str, Any]) -> Any:
    """The device ``device_map`` gives to the tensor or module ``name`` (its longest prefix; a
    buffer of a module the map leaves out, e.g. rotary frequencies, goes to the first device)."""
    where = _placed(name, device_map)
    return where if where is not None else next(iter(device_map.values()))


def dispatch(model: nn.Module, device_map: DeviceMap) -> nn.Module:
    """Put each block's remaining tensors (buffers) on its device and attach the hooks that move
    inputs between blocks; the weights must already be on their devices."""
    from accelerate.hooks import attach_align_device_hook_on_blocks

    for name, buffer in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        module._buffers[leaf] = buffer.to(device_of(name, device_map))
    devices = list(dict.fromkeys(device_map.values()))
    main = next((d for d in devices if d != "cpu"), "cpu")
    attach_align_device_hook_on_blocks(
        model,
        execution_device={**device_map, "": main},
        offload=dict.fromkeys(device_map, False),
    )
    model.hf_device_map = dict(device_map)
    return model

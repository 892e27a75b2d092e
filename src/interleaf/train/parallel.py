"""All distributed wrapping of a built model: the process group, DDP, FSDP2, DeepSpeed,
activation checkpointing, global means, and full (gathered) checkpoints.

The same :func:`interleaf.train.train` runs in one process and under ``torchrun`` or
``accelerate launch`` (which set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Model code knows
nothing of this module; the loop calls it at a handful of places.

- Process group: gloo on CPU, nccl on CUDA; created (and destroyed at the end) by
  :func:`setup` when ``WORLD_SIZE > 1`` and none exists yet; a group made by the caller is used
  as it is and left alone. With CUDA the model lives on ``cuda:LOCAL_RANK``.
- ``train.parallel``: ``auto`` (ddp with several processes, none with one), ``none``, ``ddp``,
  ``fsdp`` (FSDP2 ``fully_shard`` per cross-attention block, per decoder layer, on the
  resampler, the vision encoder and the rest; frozen and trainable parameters mix freely),
  ``deepspeed`` (ZeRO through a JSON config; imported only when asked for; on the CPU it runs
  over the same gloo group). With one process ddp and fsdp wrap nothing: one process holds
  everything.
- Batches: ``data.batch_size`` is the global micro-batch; each rank computes its rows. The
  loss is the token-weighted mean over the global micro-batch: each rank scales its summed
  loss by ``world / global label count`` before backward, so the gradients DDP/FSDP average
  equal those of one process on the whole batch, and the logged loss is that global mean.
- Checkpoints: the trainable weights and the optimiser state are gathered whole, keyed by
  parameter name (rank 0 writes them), so a checkpoint of any world size and strategy
  resumes under any other.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from interleaf.extras import MissingExtra
from interleaf.model.layout import set_weight_layout
from interleaf.model.lm import checkpoint_contexts, find_decoder_layers
from interleaf.model.placement import process_device
from interleaf.train.config import OptimConfig, TrainConfig

DEEPSPEED_MISSING = (
    "train.parallel=deepspeed needs the deepspeed package, which is not installed: "
    "pip install deepspeed (or pip install 'interleaf[deepspeed]'), or use train.parallel=fsdp"
)


class DeepSpeedMissing(MissingExtra, RuntimeError):
    """deepspeed is not installed: a :class:`MissingExtra` (the CLI prints its one line), and a
    RuntimeError as it was before."""


@dataclass
class Dist:
    """This process's place in the run, and the strategy the model is wrapped with."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    kind: str = "none"  # none, ddp, fsdp or deepspeed
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def strategy(requested: str, world_size: int) -> str:
    """The strategy ``train.parallel`` names for ``world_size`` processes; one clear line if unusable."""
    if requested == "auto":
        return "ddp" if world_size > 1 else "none"
    if requested == "none" and world_size > 1:
        raise ValueError(
            f"train.parallel=none but {world_size} processes were launched: each would train alone; "
            "use ddp or fsdp, or launch one process"
        )
    if requested == "deepspeed":
        require_deepspeed()
    if requested in ("ddp", "fsdp") and world_size == 1:
        return "none"
    return requested


def require_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise DeepSpeedMissing(DEEPSPEED_MISSING) from None
    return deepspeed


def setup(cfg: TrainConfig) -> Dist:
    """Join (or create) the process group of a ``torchrun`` / ``accelerate launch`` run."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    kind = strategy(cfg.parallel, dist.get_world_size() if dist.is_initialized() else env_world)
    if kind == "deepspeed" and not cfg.deepspeed_config:
        raise ValueError("train.parallel=deepspeed needs train.deepspeed_config, e.g. configs/deepspeed/zero2.json")
    if kind == "deepspeed" and "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        raise ValueError(
            "train.parallel=deepspeed runs under a launcher (without one DeepSpeed looks for MPI): "
            "torchrun --nproc_per_node N -m interleaf train RECIPE ... (N=1 for one process)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = process_device(cfg.device, local_rank, env_world)
    except ValueError as e:
        raise ValueError(f"train.device: {e}") from None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized() and env_world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        owns = True
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, kind, owns)
    return Dist(0, 1, 0, device, kind, False)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """Rows of the global micro-batch each rank computes."""
    if batch_size % world_size:
        raise ValueError(
            f"data.batch_size={batch_size} is the global batch: it must be divisible by the {world_size} processes"
        )
    return batch_size // world_size


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    lm = model.language_model
    return find_decoder_layers(lm.lm, lm.layers_path)[1]


def apply_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant; names and classes unchanged)."""
    from torch.distributed._composable import checkpoint

    for layer in decoder_layers(model):
        checkpoint(layer, context_fn=checkpoint_contexts)


def wrap(model: nn.Module, d: Dist, cfg: TrainConfig) -> nn.Module:
    """Move ``model`` to this rank's device, apply activation checkpointing, and wrap it; returns
    the module to call in training (the DDP wrapper, or ``model`` itself, sharded in place)."""
    model.to(d.device)
    # After train.dtype and the move (the fastest layout depends on both). FSDP shards each
    # weight along its first dimension and DeepSpeed views each as bytes to broadcast and
    # partition it: they get the weights as torch lays them.
    set_weight_layout(model, "out-major" if d.kind in ("fsdp", "deepspeed") else "auto")
    if cfg.gradient_checkpointing:
        apply_checkpointing(model)
    if d.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a micro-batch without images leaves resampler and blocks unused
        ids = [d.local_rank] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    if d.kind == "fsdp":
        shard(model, mesh(d, cfg.fsdp_sharding))
    return model


def mesh(d: Dist, sharding: str):
    """The device mesh of FSDP: 1-D (full shard), or (nodes, processes per node) for hybrid
    sharding (replicated across nodes, sharded within one)."""
    from torch.distributed.device_mesh import init_device_mesh

    if sharding == "full":
        return init_device_mesh(d.device.type, (d.world_size,))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    if d.world_size % per_node:
        raise ValueError(f"fsdp_sharding=hybrid: {d.world_size} processes do not fill nodes of {per_node}")
    return init_device_mesh(d.device.type, (d.world_size // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def shard(model: nn.Module, device_mesh) -> None:
    """FSDP2 in place: a unit per cross-attention block (whose ``project_media``, called from
    the Flamingo forward, gathers its weights too), per decoder layer, the resampler, the vision
    encoder, and the root (embeddings, head, final norm)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # project_media returns views (keys and values split from one projection); nothing changes
    # them in place, so FSDP's warning about views losing their pre-backward hook does not apply
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPGatedCrossAttentionBlock\) returned a view")
    for block in model.blocks:
        fully_shard(block, mesh=device_mesh)
        register_fsdp_forward_method(block, "project_media")
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=device_mesh)
    if model.resampler is not None:
        fully_shard(model.resampler, mesh=device_mesh)
    fully_shard(model.vision, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)


def deepspeed_engine(
    model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist, cfg: TrainConfig, optim: OptimConfig, rows: int
):
    """A DeepSpeed engine over ``model`` and ``optimizer`` from ``cfg.deepspeed_config``, joining
    the process group of :func:`setup`. The batch sizes, accumulation, clipping and bf16 are the
    recipe's (``"auto"`` in the JSON files): ``train.precision=bf16`` turns on DeepSpeed's bf16
    (bf16 weights, fp32 master weights in the optimiser), fp32 keeps everything in fp32."""
    deepspeed = require_deepspeed()
    config = json.loads(Path(cfg.deepspeed_config).read_text())
    config.update(
        train_micro_batch_size_per_gpu=rows,
        gradient_accumulation_steps=optim.accumulation,
        train_batch_size=rows * optim.accumulation * d.world_size,
        gradient_clipping=optim.grad_clip,
        bf16={**config.get("bf16", {}), "enabled": cfg.precision == "bf16"},
    )
    # ZeRO replaces each group's parameters by one flat partition: keep their names for checkpoints
    names = {p: n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        group["param_names"] = [names[p] for p in group["params"]]
    if d.device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (minutes on a small
        # machine) that only its inference all-reduce uses; training reduces through the gloo group
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # ZeRO gathers its updated partitions with all_gather_into_tensor, which torch 2.13 deprecates (for
    # all_gather_single) with a FutureWarning per call; DeepSpeed's to change, not ours
    warnings.filterwarnings("ignore", r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if not _zero_partitioned(model):  # ZeRO stage 0 in fp32: DeepSpeed steps the optimiser as it is
        for group in optimizer.param_groups:
            del group["param_names"]
    return engine


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, d: Dist, sync: bool):
    """Skip the gradient all-reduce of accumulation micro-batches other than the last."""
    if d.kind == "ddp" and not sync:
        with wrapped.no_sync():
            yield
        return
    if d.kind == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    yield


def sum_all(values: Tensor) -> Tensor:
    """Sum over the ranks (identity in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def clip_grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    """Global gradient-norm clipping: the gradients are the averaged ones (DDP) or shards (FSDP
    DTensors, whose norm torch reduces over the mesh)."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def any_rank(flag: bool, d: Dist) -> bool:
    """Whether ``flag`` holds on some rank (so that all ranks stop at the same step)."""
    if not d.distributed:
        return flag
    value = torch.tensor([float(flag)], device=d.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """``obj`` of every rank, indexed by rank."""
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- full checkpoints -------------------------------------------------------------------------


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def trainable_weights(model: nn.Module, d: Dist) -> dict[str, Tensor]:
    """The full trainable weights on the CPU, by parameter name (collective under FSDP and ZeRO)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if _zero_partitioned(model):  # the optimiser's fp32 master weights, gathered from their partitions
        full = require_deepspeed().utils.safe_get_full_fp32_param
        return {n: full(p).detach().cpu().clone() for n, p in params}
    return {n: (p.full_tensor() if _is_dtensor(p) else p).detach().cpu().clone() for n, p in params}


def load_trainable_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Copy full trainable weights into the (possibly sharded) model, and into the fp32 master
    weights of a DeepSpeed ZeRO optimiser; names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(hasattr(p, "ds_id") for p in params.values()):
        raise RuntimeError(
            "train.resume under DeepSpeed ZeRO-3 is not supported (its weights are partitioned): "
            "resume with configs/deepspeed/zero2.json, fsdp or ddp"
        )
    if set(params) != set(weights):
        diff = sorted(set(params) ^ set(weights))
        raise ValueError(f"checkpoint weights do not match the model's trainable parameters, e.g. {diff[:3]}")
    for name, param in params.items():
        if weights[name].shape != param.shape:
            raise ValueError(
                f"{name!r} has shape {tuple(weights[name].shape)} in the checkpoint, {tuple(param.shape)} in the model"
            )
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, param in params.items():
            full = weights[name].to(param.device, param.dtype)
            if _is_dtensor(param):
                full = distribute_tensor(full, param.device_mesh, param.placements).to_local()
                param.to_local().copy_(full)
            else:
                param.copy_(full)
            if hasattr(param, "_hp_mapping"):  # ZeRO-1/2: this rank's slice of the fp32 master copy
                require_deepspeed().utils.safe_set_full_fp32_param(param, weights[name].to(param.device))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any] | None:
    """The optimiser state keyed by parameter name, gathered whole (on rank 0 under FSDP); None
    under DeepSpeed ZeRO-3, whose partitioned state is not gathered."""
    if _zero_partitioned(model):
        return _zero_optimizer_state(model, optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=d.kind == "fsdp")
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], d: Dist) -> None:
    """Restore a state of :func:`optimizer_state`, whatever the world size that wrote it."""
    if _zero_partitioned(model):
        _load_zero_optimizer_state(model, optimizer, state)
        return
    if d.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    names = {id(p): n for n, p in model.named_parameters()}
    index = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            index[names[id(p)]] = len(index)
    if set(index) != {n for g in state["param_groups"] for n in g["params"]}:
        raise ValueError("the checkpoint's optimiser state holds other parameters than the model's trainable ones")
    optimizer.load_state_dict(
        {
            "state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
        }
    )


def _zero_partitioned(model: nn.Module) -> bool:
    """Whether a DeepSpeed ZeRO optimiser (or its bf16 optimiser) keeps the fp32 master weights
    and the moments of ``model``'s parameters in flat partitions (not so under ZeRO stage 0 in fp32,
    where DeepSpeed steps the optimiser as it is)."""
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in model.parameters())


def _zero_groups(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Per parameter group of a ZeRO-1/2 optimiser: its flat fp32 partition on this rank, and
    its model parameters by name (as :func:`deepspeed_engine` recorded them); None under ZeRO-3."""
    params = dict(model.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):
        return None
    return [(group["params"][0], {n: params[n] for n in group["param_names"]}) for group in optimizer.param_groups]


def _zero_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The state of a ZeRO-1/2 optimiser in the layout of :func:`optimizer_state`: every rank's
    slices of the moments, gathered per parameter (collective); scalars (``step``) are per group."""
    groups = _zero_groups(model, optimizer)
    if groups is None:
        return None
    utils = require_deepspeed().utils
    state: dict[str, dict[str, Any]] = {}
    for flat, params in groups:
        flat_state = optimizer.state.get(flat, {})  # empty before the first step
        if not flat_state:
            continue
        # link the parameters to the moments again: DeepSpeed 0.19 links every group after the
        # first group's first step, when the later groups have no state yet, and never again
        utils.lazy_init_hp_params_optimizer_state(list(params.values()), flat, optimizer.state)
        for name, param in params.items():
            state[name] = {
                key: utils.safe_get_full_optimizer_state(param, key).cpu().clone()
                if _flat_sized(value, flat)
                else value.clone()
                for key, value in flat_state.items()
            }
    param_groups = [
        {**{k: v for k, v in group.items() if k not in ("params", "param_names")}, "params": group["param_names"]}
        for group in optimizer.param_groups
    ]
    return {"state": state, "param_groups": param_groups}


def _flat_sized(value: Any, flat: Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == flat.shape


def _load_zero_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Scatter a state of :func:`optimizer_state` into a ZeRO-1/2 optimiser's flat partitions:
    each rank creates its partition's state (as the optimiser's first step would) and copies its
    slice of every parameter's moments."""
    groups = _zero_groups(model, optimizer)
    if groups is None:
        raise RuntimeError("the optimiser state of a DeepSpeed ZeRO-3 run cannot be restored")
    utils = require_deepspeed().utils
    saved_groups = state["param_groups"]
    if [set(g["params"]) for g in saved_groups] != [set(params) for _, params in groups]:
        raise ValueError("the checkpoint's optimiser state holds other parameters than the model's trainable ones")
    for (flat, params), group, saved in zip(groups, optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        moments = {n: state["state"][n] for n in params if n in state["state"]}
        if not moments:
            continue
        first = next(iter(moments.values()))  # a group's scalars (its step) are one on the partition
        optimizer.state[flat] = {
            key: torch.zeros_like(flat) if _param_sized(value) else value.clone() for key, value in first.items()
        }
        utils.lazy_init_hp_params_optimizer_state(list(params.values()), flat, optimizer.state)
        for name, values in moments.items():
            for key, value in values.items():
                if _param_sized(value):
                    utils.safe_set_full_optimizer_state(params[name], value.to(flat), key)


def _param_sized(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() > 0


def full_state_dict(model: nn.Module, d: Dist) -> dict[str, Tensor] | None:
    """The whole model's state on rank 0 (None elsewhere) for the final export under FSDP or
    DeepSpeed; None otherwise (the model's own tensors are whole)."""
    if d.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if d.main else None
    if d.kind == "deepspeed":
        trainable = trainable_weights(model, d)  # the fp32 master weights, not their bf16 copies
        with gathered(model, d):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if d.main else None
        return {**state, **trainable} if d.main else None
    return None


@contextlib.contextmanager
def gathered(model: nn.Module, d: Dist):
    """The whole weights on every rank for the duration, under DeepSpeed ZeRO-3 (which partitions
    them); nothing to do otherwise (collective under DeepSpeed)."""
    if d.kind != "deepspeed":
        yield
        return
    with require_deepspeed().zero.GatheredParameters(list(model.parameters())):
        yield


@contextlib.contextmanager
def evaluation(model: nn.Module, d: Dist):
    """The model ready for evaluation outside ``forward`` (generation, ranking): under FSDP the
    root's weights (embeddings, head) are gathered for the duration, on every rank."""
    was_training = model.training
    model.eval()
    if d.kind == "fsdp":
        model.unshard()
    try:
        yield model
    finally:
        if d.kind == "fsdp":
            model.reshard()
        model.train(was_training)

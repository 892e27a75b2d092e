"""Evaluation across processes, as OpenFlamingo's is: under ``torchrun --nproc_per_node N``
each rank evaluates every N-th query (by index, so a query's demonstrations are those of a
one-process run), and the samples are gathered so that every rank holds all of them; rank 0
writes the one results file. Without a process group everything is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from interleaf.model.placement import process_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, index: int) -> bool:
        """Whether query ``index`` is this rank's."""
        return index % self.world_size == self.rank


def current() -> Ranks:
    """This process's place in the process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def join(device: str = "auto") -> tuple[Ranks, torch.device | None]:
    """Join the process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1: NCCL on GPUs, gloo
    on the CPU) and return the ranks and this rank's device for ``device`` (``auto``/``cuda``:
    ``cuda:LOCAL_RANK``). A single process returns ``None`` as its device: the caller keeps
    ``device`` as given (``auto`` is then a device map over all GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = process_device(device, local_rank, world)
    if not dist.is_initialized():
        if where.type == "cuda":
            torch.cuda.set_device(where)
            dist.init_process_group("nccl", device_id=where)
        else:
            dist.init_process_group("gloo")
    return current(), where


def gather(samples: dict[str, dict], ranks: Ranks) -> dict[str, dict]:
    """Every rank's samples (id -> sample), merged, on every rank."""
    if ranks.world_size == 1:
        return samples
    parts: list[dict[str, dict] | None] = [None] * ranks.world_size
    dist.all_gather_object(parts, samples)
    merged: dict[str, dict] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()


def leave() -> None:
    """End the process group this module started (at the end of a CLI run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

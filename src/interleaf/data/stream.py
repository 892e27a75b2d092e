"""Mixing sources by weight, batching, and loading with workers, resumable exactly.

Every stream here is a deterministic function of its seed and its position, and its
``state_dict()`` is that position. With DataLoader workers each worker runs its own mixture
(slot ``rank * num_workers + worker``); the loader in the main process records each worker's
state as its batches arrive, and on resume hands every worker its state back, rotating the
workers so that the batch after the last one consumed comes from the worker whose turn it
was. For infinite streams (``epochs=None``, the training case) the resumed sequence of
batches equals the uninterrupted one exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from interleaf.data.schema import Document
from interleaf.data.shards import ShardStream


class Mixture:
    """Draws each document from one of several streams, chosen with probability ~ weight.

    Deterministic given ``seed``; a finite stream that runs out leaves the mixture, which ends
    when all have.
    """

    def __init__(self, sources: dict[str, ShardStream], weights: dict[str, float] | None = None, *, seed: int = 0):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        weights = weights or {name: 1.0 for name in sources}
        unknown = set(weights) ^ set(sources)
        if unknown:
            raise ValueError(f"mixture weights and sources differ: {sorted(unknown)}")
        if any(w <= 0 for w in weights.values()):
            raise ValueError(f"mixture weights must be > 0, got {weights}")
        self.sources, self.weights = sources, weights
        self.rng = random.Random(seed)
        self.exhausted: set[str] = set()

    def __iter__(self) -> Iterator[tuple[str, Document]]:
        streams = {name: iter(src) for name, src in self.sources.items() if name not in self.exhausted}
        while streams:
            names = sorted(streams)
            name = self.rng.choices(names, weights=[self.weights[n] for n in names])[0]
            try:
                yield name, next(streams[name])
            except StopIteration:
                del streams[name]
                self.exhausted.add(name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "sources": {name: src.state_dict() for name, src in self.sources.items()},
            "exhausted": sorted(self.exhausted),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for name, src_state in state["sources"].items():
            self.sources[name].load_state_dict(src_state)
        self.exhausted = set(state["exhausted"])


class BatchStream(IterableDataset):
    """Batches of collated documents from one mixture per (rank, worker) slot.

    ``make_mixture(slot, num_slots)`` builds the mixture of a slot; ``collate(docs)`` turns a
    list of documents into a batch. Each item is ``(batch, (worker, state))``.
    """

    def __init__(
        self,
        make_mixture: Callable[[int, int], Mixture],
        collate: Callable[[list[Document]], Any],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.make_mixture, self.collate, self.batch_size = make_mixture, collate, batch_size
        self.rank, self.world_size = rank, world_size
        self.resume: dict[int, dict] = {}
        self.rotate = 0

    def __iter__(self):
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (physical + self.rotate) % workers
        mixture = self.make_mixture(self.rank * workers + worker, self.world_size * workers)
        if worker in self.resume:
            mixture.load_state_dict(self.resume[worker])
        docs: list[Document] = []
        for _, doc in mixture:
            docs.append(doc)
            if len(docs) == self.batch_size:
                yield self.collate(docs), (worker, mixture.state_dict())
                docs = []


class Loader:
    """A DataLoader over a :class:`BatchStream` whose position can be saved and restored."""

    def __init__(self, dataset: BatchStream, *, num_workers: int = 0, **loader_kwargs):
        self.dataset, self.num_workers = dataset, num_workers
        self.loader_kwargs = loader_kwargs
        self.worker_states: dict[int, dict] = {}
        self.batches = 0

    def __iter__(self):
        workers = max(self.num_workers, 1)
        self.dataset.resume = dict(self.worker_states)
        self.dataset.rotate = self.batches % workers
        # a generator of its own for the workers' base seed: the DataLoader would otherwise draw
        # it from the global torch RNG, which the training step's own draws (a drawing model's
        # diffusion noise) share, and a resumed run starts its DataLoader at another point of it
        kwargs = {"generator": torch.Generator().manual_seed(0), **self.loader_kwargs}
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, **kwargs)
        for batch, (worker, state) in loader:
            self.worker_states[worker] = state
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "workers": dict(self.worker_states), "num_workers": self.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_workers"] != self.num_workers:
            raise ValueError(
                f"the data state was saved with {state['num_workers']} workers; resume with the same number "
                f"(got {self.num_workers})"
            )
        self.batches = state["batches"]
        self.worker_states = {int(k): v for k, v in state["workers"].items()}


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1

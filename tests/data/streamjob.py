"""A data pipeline job the resume test runs in fresh processes: ``python streamjob.py SHARDS STATE N``
prints the ids of N batches as JSON, resuming from STATE if it exists and saving the state after."""

import functools
import json
import sys
from pathlib import Path

import torch

from interleaf.data.shards import ShardStream, expand
from interleaf.data.stream import BatchStream, Loader, Mixture


def mixture(shards: dict[str, list[str]], slot: int, num_slots: int) -> Mixture:
    sources = {
        name: ShardStream(paths, slot=slot, num_slots=num_slots, seed=7, epochs=None) for name, paths in shards.items()
    }
    return Mixture(sources, {"a": 0.7, "b": 0.3}, seed=100 + slot)


def ids(docs):
    return [d.id for d in docs]


def loader(root: str, workers: int) -> Loader:
    shards = {name: expand(Path(root) / name) for name in ("a", "b")}
    dataset = BatchStream(functools.partial(mixture, shards), ids, batch_size=3)
    return Loader(dataset, num_workers=workers)


def run(root: str, state_file: str, n: int, workers: int) -> list:
    data = loader(root, workers)
    if Path(state_file).exists():
        data.load_state_dict(torch.load(state_file, weights_only=False))
    out = []
    for batch in data:
        out.append(batch)
        if len(out) == n:
            break
    torch.save(data.state_dict(), state_file)
    return out


if __name__ == "__main__":
    root, state, n, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(run(root, state, n, workers)))

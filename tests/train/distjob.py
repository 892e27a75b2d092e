"""One rank of a distributed test run: ``python -m torch.distributed.run --nproc_per_node 2
tests/train/distjob.py RECIPE.json RESULT.json``. The recipe is a ``Recipe`` as JSON
(``dataclasses.asdict``); rank 0 writes the per-step losses and the train() result to RESULT.json."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from interleaf.config import from_dict
from interleaf.train import Recipe, train


def main(recipe_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    with open(recipe_file) as f:
        recipe = from_dict(Recipe, json.load(f), where=recipe_file)
    result = train(recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result_file, "w") as f:
            json.dump({"step": result["step"], "losses": result["losses"], "final": str(result["final"])}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

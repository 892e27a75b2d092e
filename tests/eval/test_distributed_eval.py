"""Evaluation across processes: ``torchrun --nproc_per_node 2 -m interleaf eval`` with gloo on the
CPU gives one results file equal to a one-process run's."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from interleaf import Flamingo
from interleaf.cli import main
from interleaf.data import tinyworld

from conftest import open_gates, tiny_config


@pytest.fixture(scope="module")
def setup(backbones, tmp_path_factory):
    root = tmp_path_factory.mktemp("disteval")
    tinyworld.write(root / "world", seed=0, n_train=10, n_eval=9)
    torch.manual_seed(0)
    model = Flamingo.from_config(tiny_config(backbones))
    open_gates(model)
    model.save_pretrained(root / "ckpt")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("task", "extra"),
    [("tinyworld_classification", ["--demos", "rices"]), ("tinyworld_vqa", ["--demos", "random"])],
)
def test_two_processes_write_one_file_equal_to_one_process(setup, tmp_path, task, extra):
    args = ["eval", "--model", str(setup / "ckpt"), "--task", task, "--root", str(setup / "world")]
    # batch size 1: every prompt runs alone in both runs (the same shapes), and one thread in
    # every process (torchrun gives each worker one; a matmul's sums split over two threads
    # round differently on some CPUs), so the two runs do the same computation: results compare exactly
    args += ["--shots", "0", "2", "--batch-size", "1", *extra]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "interleaf"]
    done = subprocess.run(
        [*command, *args, "--out", str(tmp_path / "two.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results:") == 1  # rank 0 alone reports
    assert "(2 processes)" in done.stdout
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert not list(tmp_path.glob("*.partial*"))  # each rank's partial file is gone
    assert one["summary"] == two["summary"]
    for a, b in zip(one["results"], two["results"]):
        assert [s["id"] for s in a["samples"]] == [s["id"] for s in b["samples"]]
        for x, y in zip(a["samples"], b["samples"]):
            assert (x["demos"], x["prompt"], x["answer"]) == (y["demos"], y["prompt"], y["answer"])
            assert x.get("scores") == y.get("scores")


def test_each_rank_runs_every_nth_query_only(setup, monkeypatch):
    """Rank 1 of 2 computes the odd-numbered queries; the rest comes from the gather."""
    from interleaf.eval import distributed, harness
    from interleaf.eval.tasks import load_task
    from interleaf.processing import Processor

    model = Flamingo.from_pretrained(setup / "ckpt")
    processor = Processor.from_pretrained(setup / "ckpt")
    spec, support, queries = load_task("tinyworld_classification", setup / "world")
    cfg = harness.EvalConfig(shots=(2,), batch_size=1)  # each prompt alone: the same shapes in both runs
    whole = harness.evaluate(model, processor, spec, support, queries, cfg, progress=False)
    everything = {s["id"]: s for s in whole["results"][0]["samples"]}
    computed = []

    def gather(samples, ranks):
        computed.extend(samples)
        return {**everything, **samples}

    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(1, 2))
    monkeypatch.setattr(distributed, "gather", gather)
    report = harness.evaluate(model, processor, spec, support, queries, cfg, progress=False)
    assert computed == [q.id for q in queries[1::2]]
    assert report["summary"] == whole["summary"]

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from interleaf.data.shards import ShardStream, write_shards
from interleaf.data.stream import Mixture

from datahelp import make_docs

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    write_shards(make_docs(40, "a"), root / "a", max_samples=5)
    write_shards(make_docs(30, "b"), root / "b", max_samples=5)
    return root


def mixture(root, seed=0, epochs=None):
    streams = {n: ShardStream(sorted((root / n).glob("*.tar")), seed=1, epochs=epochs) for n in ("a", "b")}
    return Mixture(streams, {"a": 0.8, "b": 0.2}, seed=seed)


def take(mix, n):
    out = []
    for _, doc in mix:
        out.append(doc.id)
        if len(out) == n:
            break
    return out


def test_mixture_follows_weights_and_is_deterministic(sources):
    first = take(mixture(sources), 500)
    assert first == take(mixture(sources), 500)
    assert first != take(mixture(sources, seed=1), 500)
    share = Counter(i[0] for i in first)["a"] / 500
    assert 0.74 < share < 0.86


def test_finite_mixture_drains_every_source(sources):
    ids = [doc.id for _, doc in mixture(sources, epochs=1)]
    assert sorted(ids) == sorted([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(30)])


def test_mixture_resumes_in_process(sources):
    full = take(mixture(sources), 120)
    mix = mixture(sources)
    head = take(mix, 47)
    again = mixture(sources)
    again.load_state_dict(mix.state_dict())
    assert head + take(again, 73) == full


def test_bad_weights():
    with pytest.raises(ValueError, match="differ"):
        Mixture({"a": object()}, {"b": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        Mixture({"a": object()}, {"a": 0.0})


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_continues_exactly(sources, tmp_path, workers):
    def job(state, n):
        cmd = [sys.executable, str(HERE / "streamjob.py"), str(sources), str(state), str(n), str(workers)]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    uninterrupted = job(tmp_path / "full.pt", 9)
    first = job(tmp_path / "resumed.pt", 4)
    rest = job(tmp_path / "resumed.pt", 5)  # a new process, restored from the saved state
    assert first + rest == uninterrupted
    flat = [i for batch in uninterrupted for i in batch]
    assert len(flat) == len(set(flat))  # no document twice within the epoch

"""RICES at scale: each query's k most similar support embeddings, by a chunked top-k
(interleaf) versus the whole queries x support similarity matrix argsorted (interleaf's earlier
`Rices.rank`; OpenFlamingo's RICES argsorts each query batch's full rows: the same sorting time).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rices.py [--support 100000] [--queries 10000] \
        [--dim 768] [--k 32] [--full-queries 500] [--list-queries 50]

The embeddings are random unit vectors (float32). Each path runs in a fresh process, so its peak
memory is the growth of that process's peak RSS over its RSS once the embeddings exist (Linux:
VmHWM after a reset through /proc/self/clear_refs; elsewhere ru_maxrss); the
embeddings themselves are reported apart (they are needed by any method). The full matrix at
full size (queries x support x 4 B, plus argsort's sorted values x 4 B and indices x 8 B) does not
fit beside other work on a 24 GB machine, so it runs on the first ``--full-queries`` queries and
its memory and time are scaled linearly to all queries (both grow with the row count); the
earlier `Rices.rank` also turned the order into Python lists (``.tolist()``), measured the same
way on ``--list-queries`` queries. The chunked result is checked against the full argsort on the
queries both ran (similarity values within 1e-5: matmul blocking may change a last bit).
The cache row times one lookup of every support image in an :class:`EmbeddingStore` of 4096-row
shards (the step that replaces encoding when all images hit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from interleaf.eval.rices import EmbeddingStore, top_k_similar

MIB = 1 << 20


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024


def start_peak() -> int:
    """The baseline for :func:`peak_bytes`: on Linux the peak RSS is reset to the current RSS
    (``/proc/self/clear_refs``), so what came before (imports, making the embeddings) does not
    hide what follows; elsewhere the peak so far (which can only under-state the growth)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return peak_bytes()


def peak_bytes() -> int:
    try:
        return _proc_status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def unit(n: int, dim: int, seed: int) -> torch.Tensor:
    """Random unit vectors, made a slice at a time so that making them sets no high-water mark."""
    g, out = torch.Generator().manual_seed(seed), torch.empty(n, dim)
    for s in range(0, n, 4096):
        out[s : s + 4096] = torch.nn.functional.normalize(torch.randn(min(4096, n - s), dim, generator=g), dim=1)
    return out


def worker(args) -> dict:
    """One measurement, in this (fresh) process; prints a JSON line."""
    support = unit(args.support, args.dim, 0)
    queries = unit(args.queries, args.dim, 1)[: args.rows]
    base, start = start_peak(), time.perf_counter()
    if args.worker == "chunked":
        qc, sc = (int(x) for x in args.chunks.split("x"))
        top = top_k_similar(queries, support, args.k, query_chunk=qc, support_chunk=sc)
    elif args.worker == "full":
        top = (queries @ support.T).argsort(dim=1, descending=True)[:, : args.k]
    elif args.worker == "lists":  # the earlier Rices.rank: argsort, .tolist(), filter by id
        ids, query_ids = [f"s{j}" for j in range(args.support)], [f"q{i}" for i in range(len(queries))]
        base, start = start_peak(), time.perf_counter()
        order = (queries @ support.T).argsort(dim=-1, descending=True).tolist()
        ranked = [[j for j in row if ids[j] != qid] for qid, row in zip(query_ids, order)]
        top = torch.tensor([row[: args.k] for row in ranked])
    else:  # cache: look every support image up in a store of shards
        with tempfile.TemporaryDirectory() as tmp:
            store = EmbeddingStore(tmp, "bench")
            digests = [i.to_bytes(32, "big") for i in range(args.support)]
            for s in range(0, args.support, 4096):
                store.put(digests[s : s + 4096], support[s : s + 4096])
            base, start = start_peak(), time.perf_counter()
            found = store.get(digests)
            seconds = time.perf_counter() - start
            assert len(found) == args.support
            return {"seconds": seconds, "peak_mib": (peak_bytes() - base) / MIB, "top": []}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": (peak_bytes() - base) / MIB, "top": top[: args.check].tolist()}


def run(args, kind: str, rows: int, chunks: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--rows", str(rows), "--chunks", chunks or "1x1"]
    cmd += ["--support", str(args.support), "--queries", str(args.queries), "--dim", str(args.dim)]
    cmd += ["--k", str(args.k), "--check", str(args.full_queries)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--support", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--chunk-sizes", default="1024x16384,256x4096", help="query x support chunks to run")
    ap.add_argument("--full-queries", type=int, default=500)
    ap.add_argument("--list-queries", type=int, default=50)
    ap.add_argument("--worker", choices=["chunked", "full", "lists", "cache"], help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--chunks", help=argparse.SUPPRESS)
    ap.add_argument("--check", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    s, q, scale, list_scale = (
        args.support,
        args.queries,
        args.queries / args.full_queries,
        args.queries / args.list_queries,
    )
    print(
        f"support {s:,} x {args.dim}, queries {q:,}, k={args.k}, float32, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, torch {torch.__version__}"
    )
    print(
        f"embeddings (any method): support {s * args.dim * 4 / MIB:.0f} MiB + queries {q * args.dim * 4 / MIB:.0f} MiB"
    )
    print(
        f"full path at {q:,} queries, computed: matrix {q * s * 4 / MIB:,.0f} MiB + argsort {q * s * 12 / MIB:,.0f} MiB"
    )
    print()
    print("| ranking path | queries run | peak memory beyond the embeddings | time | at all queries |")
    print("|---|---|---|---|---|")
    full = run(args, "full", args.full_queries)
    checks = []
    for chunks in args.chunk_sizes.split(","):
        r = run(args, "chunked", q, chunks)
        qc, sc = (int(x) for x in chunks.split("x"))
        name = f"chunked top-k, chunks {qc} x {sc} (block {qc * sc * 4 / MIB:.0f} MiB)"
        print(f"| {name} | {q:,} | {r['peak_mib']:,.0f} MiB | {r['seconds']:.1f} s | measured |")
        checks.append(f"{chunks}: {check(args, r, full)}")
    lists = run(args, "lists", args.list_queries)
    for name, n, r, factor in (
        ("full matrix + argsort", args.full_queries, full, scale),
        ("full matrix + argsort + `.tolist()` (earlier `Rices.rank`)", args.list_queries, lists, list_scale),
    ):
        scaled = f"{r['peak_mib'] * factor:,.0f} MiB, {r['seconds'] * factor:,.1f} s (scaled)"
        print(f"| {name} | {n:,} | {r['peak_mib']:,.0f} MiB | {r['seconds']:.1f} s | {scaled} |")
    print()
    for line in checks:
        print(f"check, chunks {line}")
    cache = run(args, "cache", 0)
    print(f"\ncache: looking up {s:,} embeddings in {-(-s // 4096)} shards: {cache['seconds']:.2f} s")


def check(args, chunked: dict, full: dict) -> str:
    """The chunked top-k of the first queries against the full argsort's (up to last-bit ties)."""
    support = unit(args.support, args.dim, 0)
    queries = unit(args.queries, args.dim, 1)[: args.full_queries]
    a, b = torch.tensor(chunked["top"]), torch.tensor(full["top"])
    sims = queries @ support.T
    gap = (sims.gather(1, a) - sims.gather(1, b)).abs().max().item()
    same = (a == b).all(dim=1).float().mean().item()
    assert gap < 1e-5, f"chunked and full top-k differ by {gap}"
    return f"{same:.1%} of {len(a)} queries identical to the full argsort, similarities within {gap:.1e}"


if __name__ == "__main__":
    main()

"""Linear weights (in, out)-major against torch's (out, in), on this CPU: what
``interleaf.model.layout.set_weight_layout`` chooses between.

    .venv/bin/python benchmarks/bench_layout.py [--threads 1] [--dtype float32 bfloat16] [--rows 1 8 64 512]

For each weight shape (the medium model of ``benchmarks/compare.py``: LM 8 x 512 with a 1408
MLP, vocabulary 32,000; and a 7B-class LM's 4096 x 4096 and 4096 x 11008) and each number of
rows (1: decoding one token; 512: a training sequence), the same ``F.linear`` runs on the same
values stored both ways, alternating, over as many copies of the weight as fill 128 MB (so
that they stream from memory, as a model's weights do, instead of sitting in the cache);
forward alone, and forward plus the backward of both the input and the weight. The outputs
are checked to agree; the table gives each layout's time per weight and the ratio
(torch's time / (in, out)'s: above 1, the (in, out) layout is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(512, 512), (1408, 512), (512, 1408), (32000, 512), (4096, 4096), (11008, 4096), (4096, 11008)]
STREAM_BYTES = 128_000_000
MAX_COPIES = 1024  # a tiny weight sits in the cache whatever: no point in millions of copies


def shape(text: str) -> tuple[int, int]:
    """``OUTxIN``, e.g. ``512x1408``: a weight of ``nn.Linear(IN, OUT)``."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 2 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected OUTxIN, two whole numbers >= 2, e.g. 512x1408")
    return int(parts[0]), int(parts[1])


def at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def run(weight: tuple[int, int], rows: int, dtype: torch.dtype, backward: bool, repeats: int) -> dict:
    out_f, in_f = weight
    copies = min(MAX_COPIES, max(1, STREAM_BYTES // (out_f * in_f * dtype.itemsize)))
    if backward:
        copies = min(copies, 4)  # the backward computes as much again per weight: fewer suffice
    g = torch.Generator().manual_seed(0)
    torch_layout = [torch.randn(out_f, in_f, generator=g).to(dtype) for _ in range(copies)]
    in_major = [w.t().contiguous().t() for w in torch_layout]
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    grad = torch.randn(rows, out_f, generator=g).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(F.linear(x, in_major[0]), F.linear(x, torch_layout[0]), rtol=tol, atol=tol * in_f)

    def calls(weights):
        if not backward:
            return lambda: [F.linear(x, w) for w in weights]
        leaves = [w.detach().requires_grad_() for w in weights]
        xg = x.detach().requires_grad_()
        return lambda: [torch.autograd.grad(F.linear(xg, w), (xg, w), grad) for w in leaves]

    fns = {"torch": calls(torch_layout), "in-major": calls(in_major)}
    seconds = {name: [] for name in fns}
    for _ in range(repeats):  # alternated
        for name, fn in fns.items():
            seconds[name] += timed(fn, 1)
    med = {name: statistics.median(s) / copies for name, s in seconds.items()}
    ratio = med["torch"] / med["in-major"]
    return {"torch_ms": med["torch"] * 1e3, "in_major_ms": med["in-major"] * 1e3, "ratio": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    ap.add_argument("--rows", nargs="+", type=at_least_one, default=[1, 8, 64, 512])
    ap.add_argument("--repeats", type=at_least_one, default=5)
    default = " ".join(f"{o}x{i}" for o, i in SHAPES)
    ap.add_argument("--shapes", nargs="+", type=shape, default=SHAPES, help=f"OUTxIN weights (default: {default})")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread{'s' * (threads > 1)}; ms per weight (median of {args.repeats})")
    print(
        "| dtype | weight (out x in) | rows | forward: torch / (in, out) ms | ratio "
        "| fwd+bwd: torch / (in, out) ms | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for weight in args.shapes:
            for rows in args.rows:
                fwd = run(weight, rows, dtype, False, args.repeats)
                both = run(weight, rows, dtype, True, args.repeats) if rows > 1 else None
                bwd = f"{both['torch_ms']:.3f} / {both['in_major_ms']:.3f} | {both['ratio']:.2f}x" if both else "- | -"
                print(
                    f"| {dtype_name} | {weight[0]} x {weight[1]} | {rows} | "
                    f"{fwd['torch_ms']:.3f} / {fwd['in_major_ms']:.3f} | {fwd['ratio']:.2f}x | {bwd} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

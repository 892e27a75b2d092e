"""Serving throughput: continuous batching against serving requests one at a time.

    .venv/bin/python benchmarks/bench_serve.py [--requests 32] [--max-tokens 48] [--clients 1 4 16]

One process runs ``interleaf serve``'s app (uvicorn on 127.0.0.1) over a medium model (LM 8
layers x 512, 8 heads, a vocabulary of 32000: its head computes all 32000 logits; CLIP-style
vision 64 px, 64 latents per image) and fires the same requests from C concurrent clients over
HTTP (threads with httpx, in a second process, as real clients are): each request one image
and a prompt of its own length, greedy, ``max_tokens`` new tokens. "One at a time" is the same
server with ``--max-batch-size 1``: it answers the requests in turn, as a server without
batching does. Reported: generated tokens
per second over the whole run, the ratio to one at a time, and the median request latency. The
answers of every setting are checked equal to one at a time's (greedy).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import httpx
import torch
from bench_generation import build as build_flamingo

from interleaf import Flamingo, Processor
from interleaf.serve.protocol import Limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
from servehelp import data_url, png, start


def build(tmp: str) -> tuple[Flamingo, Processor]:
    model = build_flamingo(tmp, hidden=512, layers=8, vision_hidden=256, interval=2, vocab_size=32000)
    model.save_pretrained(f"{tmp}/model")
    return Flamingo.from_pretrained(f"{tmp}/model"), Processor.from_pretrained(f"{tmp}/model")


def body(i: int, max_tokens: int) -> dict:
    colors = [(200, 40, 40), (30, 160, 60), (30, 60, 220), (230, 200, 40)]
    text = " ".join(["describe the picture in detail"] * (1 + i % 6)) + f" (request {i})"
    image = {"type": "image_url", "image_url": {"url": data_url(png(colors[i % 4], size=(64, 64)))}}
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": text}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stop": ["\x00never"],  # no early stop: every request generates max_tokens (the chat stops stay)
    }


def fire(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list, float]:
    """The clients (in a process of their own, as real clients are): ``requests`` requests from
    ``clients`` threads; each request's (text, completion tokens, latency), and the wall time."""

    def one(i):
        began = time.perf_counter()
        r = httpx.post(url, json=body(i, max_tokens), timeout=600)
        r.raise_for_status()
        data = r.json()
        elapsed = time.perf_counter() - began
        return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"], elapsed

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    return results, time.perf_counter() - begin


def run(model, processor, client_process, *, batch: int, clients: int, requests: int, max_tokens: int):
    limits = Limits(max_batch_size=batch, max_tokens=4096)
    served, thread = start(model, processor, model_name="bench", limits=limits)
    try:
        url = f"{served.url}/v1/chat/completions"
        httpx.post(url, json=body(0, 4), timeout=600).raise_for_status()  # warm-up
        results, wall = client_process.apply(fire, (url, clients, requests, max_tokens))
        sizes = [len(ids) for _, ids in served.scheduler.trace]
    finally:
        thread.stop()
    tokens = sum(n for _, n, _ in results)
    return {
        "texts": [t for t, _, _ in results],
        "tokens": tokens,
        "tok_s": tokens / wall,
        "latency": statistics.median(s for _, _, s in results),
        "mean_batch": sum(sizes) / max(len(sizes), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp, multiprocessing.get_context("spawn").Pool(1) as client_process:
        model, processor = build(tmp)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"model: {n_params:.0f}M parameters; {args.requests} requests x {args.max_tokens} new tokens\n")
        common = dict(requests=args.requests, max_tokens=args.max_tokens)
        base = run(model, processor, client_process, batch=1, clients=max(args.clients), **common)
        rows = [("one at a time (--max-batch-size 1)", max(args.clients), base)]
        for clients in args.clients:
            result = run(model, processor, client_process, batch=16, clients=clients, **common)
            assert result["texts"] == base["texts"], "continuous batching changed an answer"
            rows.append((f"continuous batching, {clients} client{'s' * (clients > 1)}", clients, result))
    print("| serving | clients | tokens/s | vs one at a time | median latency | mean batch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, clients, r in rows:
        print(
            f"| {name} | {clients} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x | "
            f"{r['latency']:.2f} s | {r['mean_batch']:.1f} |"
        )
    print("\nevery answer equal to one at a time's (greedy)")


if __name__ == "__main__":
    main()

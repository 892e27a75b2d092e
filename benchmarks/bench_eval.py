"""Ranking class names after a few-shot prompt: time and memory.

1. Time (``--classes``, 100): the prompt (demonstrations + query) encoded once and its KV
   cache shared by every candidate (interleaf), versus the full prompt recomputed for every
   candidate (how OpenFlamingo's evaluation scores ImageNet classes when its prefix cache is
   off, and how harnesses without caching work). Both in this process.
2. Memory (``--memory-classes``, 1,000 as ImageNet): interleaf's chunks of ``--chunks``
   candidates, each over a copy of the shared prompt cache, versus the previous path that ran
   all candidates as one batch over one copy of the prompt cache per candidate (kept below,
   private to this benchmark, for the comparison). Each path runs in a fresh process; the
   figure is the peak resident memory that ranking one query adds to the loaded model (the
   process's high-water mark, Linux ``/proc/self/status`` VmHWM, reset just before ranking).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval.py [--classes 100] [--memory-classes 1000]
        [--chunks 16 64 256] [--shots 4] [--queries 4]

The scores of every path are checked equal to 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from interleaf import Flamingo, FlamingoConfig
from interleaf.config import CrossAttentionConfig, LMConfig, ResamplerConfig, VisionConfig
from interleaf.data import tinyworld
from interleaf.eval.ranking import rank_candidates
from interleaf.processing import Processor
from interleaf.tiny import build_lm, build_tokenizer, build_vision

ALL_IN_ONE_BATCH = "all"


def build(tmp: str) -> str:
    """The Llama-style 6x256 Flamingo of this benchmark, saved to ``tmp/model``."""
    tok = build_tokenizer()
    build_lm(f"{tmp}/lm", "llama", tokenizer=tok, hidden=256, layers=6, heads=8)
    build_vision(f"{tmp}/vision", "clip", hidden=256, image_size=64, patch_size=8)
    config = FlamingoConfig(
        lm=LMConfig(source=f"{tmp}/lm"),
        vision=VisionConfig(source=f"{tmp}/vision"),
        resampler=ResamplerConfig(depth=2, num_latents=32, heads=4, head_dim=64),
        cross_attention=CrossAttentionConfig(interval=2, heads=4, head_dim=64),
    )
    torch.manual_seed(0)
    model = Flamingo.from_config(config)
    with torch.no_grad():  # open gates, so that the images matter
        for block in model.blocks:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    model.save_pretrained(f"{tmp}/model")
    return f"{tmp}/model"


def query(classes: int, shots: int) -> tuple[str, list, list[str]]:
    """A few-shot prompt, its images and ``classes`` class names (a fixed seed)."""
    rng = random.Random(0)
    names = [f" {rng.choice(['red', 'blue', 'green'])} {rng.choice(['circle', 'star'])} {i}" for i in range(classes)]
    scene = tinyworld.uniform_scene(rng, "red", "circle", "large")
    images = [tinyworld.render(scene, 64) for _ in range(shots + 1)]
    prompt = "".join(f"<image>Output:{names[i]}<|endofchunk|>" for i in range(shots)) + "<image>Output:"
    return prompt, images, names


@torch.no_grad()
def rank_all_in_one_batch(model, processor, prompt: str, images: list, candidates: list[str]) -> list[float]:
    """The previous ranking path: the prompt's KV cache repeated once per candidate and all
    candidates (each tokenized alone) run as one batch."""
    batch = processor(prompt, images=images)
    media = model.prepare_media(batch["input_ids"], batch["pixel_values"])
    out = model.step(
        batch["input_ids"],
        history_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        media=media,
        use_cache=True,
    )
    first = model.language_model.logits(out.last_hidden_state[:, -1]).float().log_softmax(-1)[0]
    tokens = [processor.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
    n, width, pad = len(tokens), max(len(t) for t in tokens), model.ids.pad
    cont = torch.tensor([t + [pad] * (width - len(t)) for t in tokens])
    valid = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tokens])
    cache = out.cache
    cache.batch_repeat_interleave(n)
    history = torch.cat([batch["input_ids"].expand(n, -1), cont], dim=1)
    mask = torch.cat([batch["attention_mask"].expand(n, -1), valid], dim=1)
    rest = model.step(
        cont[:, :-1],
        history_ids=history[:, :-1],
        attention_mask=mask[:, :-1],
        media=media.select(torch.zeros(n, dtype=torch.long)),
        cache=cache,
    )
    logprobs = model.language_model.logits(rest.last_hidden_state).float().log_softmax(-1)
    following = logprobs.gather(-1, cont[:, 1:, None])[..., 0] * valid[:, 1:]
    return ((first[cont[:, 0]] + following.sum(-1)) / valid.sum(-1)).tolist()


@torch.no_grad()
def rank_by_recomputing(model, processor, prompt: str, images: list, candidates: list[str]) -> list[float]:
    scores = []
    for candidate in candidates:
        batch = processor(prompt + candidate, images=images)
        n = len(processor.tokenizer(candidate, add_special_tokens=False)["input_ids"])
        logp = model(**batch).logits[0, :-1].float().log_softmax(-1)
        target = batch["input_ids"][0, 1:]
        scores.append(logp.gather(-1, target[:, None])[-n:, 0].mean().item())
    return scores


def memory_mib(field: str) -> float:
    return int(re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) / 1024


def measure(model_dir: str, path: str, classes: int, shots: int) -> dict:
    """In this (fresh) process: rank ``classes`` names once along ``path`` (a chunk size or
    ``all``); the peak memory it adds to the loaded model, its seconds and its scores."""
    model, processor = Flamingo.from_pretrained(model_dir), Processor.from_pretrained(model_dir)
    prompt, images, names = query(classes, shots)

    def run(candidates):
        if path == ALL_IN_ONE_BATCH:
            return rank_all_in_one_batch(model, processor, prompt, images, candidates)
        return rank_candidates(model, processor, [prompt], [images], [candidates], chunk_size=int(path))[0]

    run(names[:8])  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the high-water mark VmHWM to the current resident size
    before = memory_mib("VmRSS")
    start = time.perf_counter()
    scores = run(names)
    seconds = time.perf_counter() - start
    return {"added_mib": memory_mib("VmHWM") - before, "seconds": seconds, "scores": scores}


def in_fresh_process(model_dir: str, path: str, classes: int, shots: int) -> dict:
    argv = [sys.executable, __file__, "--measure", path, "--model-dir", model_dir]
    argv += ["--memory-classes", str(classes), "--shots", str(shots)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_table(model_dir: str, args) -> None:
    model, processor = Flamingo.from_pretrained(model_dir), Processor.from_pretrained(model_dir)
    prompt, images, classes = query(args.classes, args.shots)
    timings = {}
    for name, fn in (
        (
            "interleaf: prompt once, KV cache shared by the candidates",
            lambda: rank_candidates(model, processor, [prompt], [images], [classes])[0],
        ),
        (
            "recompute the prompt for every candidate",
            lambda: rank_by_recomputing(model, processor, prompt, images, classes),
        ),
    ):
        fn()
        start = time.perf_counter()
        for _ in range(args.queries):
            scores = fn()
        timings[name] = ((time.perf_counter() - start) / args.queries, scores)
    (fast, fast_scores), (_, slow_scores) = timings.values()
    assert max(abs(a - b) for a, b in zip(fast_scores, slow_scores)) < 1e-4, "the two paths disagree"
    tokens = len(processor(prompt, images=images)["input_ids"][0])
    print(
        f"\nLlama-style LM 6x256, {args.shots}-shot prompt ({tokens} tokens, {args.shots + 1} images), "
        f"{args.classes} class names, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| ranking path | seconds per query | time vs interleaf |")
    print("|---|---|---|")
    for name, (seconds, _) in timings.items():
        print(f"| {name} | {seconds:.3f} | {seconds / fast:.2f}x |")


def memory_table(model_dir: str, args) -> None:
    paths = [ALL_IN_ONE_BATCH, *map(str, args.chunks)]
    results = {p: in_fresh_process(model_dir, p, args.memory_classes, args.shots) for p in paths}
    reference = results[ALL_IN_ONE_BATCH]["scores"]
    for path, result in results.items():
        gap = max(abs(a - b) for a, b in zip(result["scores"], reference))
        assert gap < 1e-4, f"{path}: the scores differ from the one-batch path's by {gap}"
    print(f"\n{args.memory_classes} class names, the same prompt, one fresh process per path\n")
    print("| ranking path | peak memory added (MiB) | seconds per query |")
    print("|---|---|---|")
    for path, result in results.items():
        name = (
            "previous: all candidates in one batch (a prompt-cache copy each)"
            if path == ALL_IN_ONE_BATCH
            else f"interleaf: chunks of {path} candidates"
        )
        print(f"| {name} | {result['added_mib']:.0f} | {result['seconds']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=100, help="class names of the time comparison")
    ap.add_argument("--memory-classes", type=int, default=1000, help="class names of the memory comparison")
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 64, 256], help="chunk sizes measured")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # in a child process: one path of the memory table
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.model_dir, args.measure, args.memory_classes, args.shots)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(tmp)
        time_table(model_dir, args)
        memory_table(model_dir, args)


if __name__ == "__main__":
    main()

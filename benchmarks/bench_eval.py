"""Ranking class names: the prompt (demonstrations + query) encoded once and its KV cache
shared by every candidate (interleaf), versus the full prompt recomputed for every candidate
(how OpenFlamingo's evaluation scores ImageNet classes when its prefix cache is off, and how
harnesses without caching work).

    .venv/bin/python benchmarks/bench_eval.py [--classes 100] [--shots 4] [--queries 4]

Both paths run the same model in one process; the scores are checked equal.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import AutoImageProcessor

from interleaf import Flamingo, FlamingoConfig
from interleaf.config import CrossAttentionConfig, LMConfig, ResamplerConfig, VisionConfig
from interleaf.data import tinyworld
from interleaf.eval.harness import rank_candidates
from interleaf.processing import Processor
from interleaf.tiny import build_lm, build_tokenizer, build_vision


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--queries", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer()
        build_lm(f"{tmp}/lm", "llama", tokenizer=tok, hidden=256, layers=6, heads=8)
        build_vision(f"{tmp}/vision", "clip", hidden=256, image_size=64, patch_size=8)
        config = FlamingoConfig(
            lm=LMConfig(source=f"{tmp}/lm"),
            vision=VisionConfig(source=f"{tmp}/vision"),
            resampler=ResamplerConfig(depth=2, num_latents=32, heads=4, head_dim=64),
            cross_attention=CrossAttentionConfig(interval=2, heads=4, head_dim=64),
        )
        model = Flamingo.from_config(config)
        processor = Processor(model.tokenizer, AutoImageProcessor.from_pretrained(f"{tmp}/vision"))
        rng = random.Random(0)
        classes = [
            f" {rng.choice(['red', 'blue', 'green'])} {rng.choice(['circle', 'star'])} {i}" for i in range(args.classes)
        ]
        scene = tinyworld.uniform_scene(rng, "red", "circle", "large")
        images = [tinyworld.render(scene, 64) for _ in range(args.shots + 1)]
        prompt = "".join(f"<image>Output:{classes[i]}<|endofchunk|>" for i in range(args.shots)) + "<image>Output:"
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


if __name__ == "__main__":
    main()

"""Training steps with and without the frozen-feature cache (``interleaf.train.features``).

    .venv/bin/python benchmarks/bench_features.py [--steps 8] [--batch 4] [--image-size 224]
        [--vision-hidden 256] [--vision-layers 6] [--precision fp32]

Tiny random backbones (a 4-layer 32-wide llama, a CLIP vision tower of the given size) and
tinyworld documents; the same batches are timed three ways, each step a forward, backward and
AdamW step of the trainable parts: without the cache, with an empty cache (every image a miss:
the tower runs, and each feature is hashed and written), and again with the filled cache (every
image a hit: the tower never runs), keyed by the loader's ``image_keys``; then the hits again keyed
by a hash of the pixels (batches without ``image_keys``), what the cache did before the data
pipeline named its images. The losses of every pass are checked to be equal. The figure of merit
is the ratio plain / hits; it grows with the share of the vision tower in a step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from interleaf import Flamingo, FlamingoConfig
from interleaf.config import CrossAttentionConfig, LMConfig, ResamplerConfig, VisionConfig
from interleaf.data.collate import CollateConfig
from interleaf.data.shards import write_shards
from interleaf.data.tinyworld import iter_train_documents
from interleaf.processing import Processor
from interleaf.tiny import build_lm, build_tokenizer, build_vision
from interleaf.train.config import DataConfig, SourceConfig
from interleaf.train.features import FeatureCache, feature_cache
from interleaf.train.loop import build_loader


def timed_pass(model: Flamingo, batches: list[dict], precision: str) -> tuple[float, list[float]]:
    """Seconds per step and the losses of one pass of optimiser steps over ``batches``."""
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    state = {id(p): p.detach().clone() for p in params}
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    losses = []
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = (time.perf_counter() - start) / len(batches)
    with torch.no_grad():  # the next pass starts from the same weights
        for p in params:
            p.copy_(state[id(p)])
    return seconds, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        build_lm(root / "lm", "llama", tokenizer=build_tokenizer())
        build_vision(
            root / "vision", image_size=args.image_size, patch_size=16, hidden=args.vision_hidden,
            layers=args.vision_layers,
        )  # fmt: skip
        docs = args.steps * args.batch
        write_shards(iter_train_documents(seed=0, n=docs, image_size=args.image_size), root / "world", max_samples=docs)
        config = FlamingoConfig(
            lm=LMConfig(source=str(root / "lm")),
            vision=VisionConfig(source=str(root / "vision")),
            resampler=ResamplerConfig(depth=2, num_latents=16, heads=4, head_dim=32),
            cross_attention=CrossAttentionConfig(heads=4, head_dim=16, interval=2),
        )
        torch.manual_seed(0)
        model = Flamingo.from_config(config)
        processor = Processor.from_backbones(config.lm.source, config.vision.source)
        data = DataConfig(
            sources={"world": SourceConfig(shards=str(root / "world"))},
            batch_size=args.batch,
            collate=CollateConfig(max_tokens=128, max_images=3),
        )
        loader = iter(build_loader(data, processor))
        batches = [next(loader) for _ in range(args.steps)]
        images = sum(int((b["input_ids"] == model.ids.image).sum()) for b in batches)

        timed_pass(model, batches[:1], args.precision)  # warm-up
        plain, plain_losses = timed_pass(model, batches, args.precision)
        cache = FeatureCache.for_model(root / "feats", model)
        unkeyed = [{k: v for k, v in b.items() if k != "image_keys"} for b in batches]
        with feature_cache(model, cache):
            misses, miss_losses = timed_pass(model, batches, args.precision)
            hits, hit_losses = timed_pass(model, batches, args.precision)
            timed_pass(model, unkeyed, args.precision)  # fills the pixel-keyed entries
            pixel_hits, pixel_losses = timed_pass(model, unkeyed, args.precision)
        assert plain_losses == miss_losses == hit_losses == pixel_losses, (plain_losses, miss_losses, hit_losses)
        stored = sum(f.stat().st_size for f in (root / "feats").rglob("*.safetensors"))

    print(f"{args.steps} steps x {args.batch} docs ({images} images), vision {args.image_size}px "
          f"h{args.vision_hidden} x{args.vision_layers} layers, {args.precision}, {args.threads} threads")  # fmt: skip
    print(f"  plain        {plain * 1000:8.1f} ms/step")
    print(f"  cache misses {misses * 1000:8.1f} ms/step  ({misses / plain:.2f}x plain)")
    print(f"  cache hits   {hits * 1000:8.1f} ms/step  ({hits / plain:.2f}x plain; keyed by the loader's image_keys)")
    print(f"  hits, keyed by hashing the pixels {pixel_hits * 1000:8.1f} ms/step  ({pixel_hits / plain:.2f}x plain)")
    print(f"  speed-up with a filled cache: {plain / hits:.2f}x; losses identical; {stored / 2**20:.1f} MiB on disk")
    print(f"  cache counters: {cache.stats()}")


if __name__ == "__main__":
    main()

"""Data throughput: documents per second through read (webdataset shards), decode (PNG),
preprocess (the vision encoder's image processor) and collate (tokens, labels, pixels),
with 0, 1 and 2 DataLoader workers.

    .venv/bin/python benchmarks/bench_data.py [--docs 600] [--image-size 224] [--batch 16]

The documents are interleaved: 1-3 random-noise PNG images (incompressible, the worst case
for decoding) each followed by a sentence. The first batch of each run is not timed
(worker start-up).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
from PIL import Image
from transformers import AutoImageProcessor

from interleaf.data.collate import CollateConfig, Collator
from interleaf.data.schema import Document, ImageRef, Segment
from interleaf.data.shards import ShardStream, expand, write_shards
from interleaf.data.stream import BatchStream, Loader, Mixture
from interleaf.processing import Processor
from interleaf.tiny import build_tokenizer, build_vision


def documents(n: int, size: int, seed: int = 0):
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    for i in range(n):
        segments = []
        for _ in range(rng.randint(1, 3)):
            out = io.BytesIO()
            Image.fromarray(noise.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out, "PNG")
            segments += [Segment(image=ImageRef(data=out.getvalue())), Segment(text=f"picture {i}: a noisy square.")]
        yield Document(id=str(i), segments=segments)


def mixture(shards: list[str], slot: int, num_slots: int) -> Mixture:
    return Mixture({"docs": ShardStream(shards, slot=slot, num_slots=num_slots, epochs=1)})


def run(shards: list[str], processor: Processor, batch: int, workers: int) -> tuple[float, int]:
    dataset = BatchStream(functools.partial(mixture, shards), Collator(processor, CollateConfig()), batch)
    loader = iter(Loader(dataset, num_workers=workers))
    first = next(loader)
    docs, start = 0, time.perf_counter()
    for b in loader:
        docs += b["input_ids"].shape[0]
    return (docs / (time.perf_counter() - start), docs + first["input_ids"].shape[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        vision = build_vision(Path(tmp) / "vision", "clip", image_size=224)
        processor = Processor(build_tokenizer(), AutoImageProcessor.from_pretrained(vision))
        write_shards(documents(args.docs, args.image_size), Path(tmp) / "shards", max_samples=50)
        shards = expand(Path(tmp) / "shards")
        results = {w: run(shards, processor, args.batch, w) for w in (0, 1, 2)}
    print(
        f"\n{args.docs} documents (1-3 noise PNGs of {args.image_size}px each), CLIP preprocessing to 224px, "
        f"batch {args.batch}, {os.cpu_count()} CPUs\n"
    )
    print("| workers | documents/s | vs 0 workers |")
    print("|---|---|---|")
    for w, (rate, _) in results.items():
        print(f"| {w} | {rate:.1f} | {rate / results[0][0]:.2f}x |")


if __name__ == "__main__":
    main()

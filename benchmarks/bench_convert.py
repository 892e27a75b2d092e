"""``interleaf data convert`` throughput: documents per second with 1 and 2 local workers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_convert.py [--docs 3000] [--files 1 8] [--repeats 3]

The input is MMC4-style jsonl (``--files`` files) whose documents hold 1-3 images each, local
noise PNG files of ``--image-size`` px (incompressible, as photos are), read through
``--image-root``. Two timings per setting, the median of ``--repeats`` runs:

- ``command``: the whole ``interleaf data convert`` process, start-up included (what a user
  waits for; the start-up imports interleaf, and with workers a fork server imports it once more);
- ``in process``: ``interleaf.data.prepare.convert`` called in a warm process (the fork server
  already started): the conversion alone.

With one input file the parts split it by record (each worker scans every line, parses its own);
with as many files as workers or more, by file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from interleaf.data.prepare import convert


def write_input(root: Path, docs: int, files: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    folder, images = root / f"docs-{files}", root / "images"
    folder.mkdir(parents=True)
    images.mkdir(exist_ok=True)
    streams = [(folder / f"part-{f:03d}.jsonl").open("w") for f in range(files)]
    for i in range(docs):
        info = []
        for k in range(rng.randint(1, 3)):
            name = f"{i}-{k}.png"
            if not (images / name).exists():
                pixels = noise.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(images / name, compress_level=1)
            info.append({"image_name": name, "raw_url": f"https://x.invalid/{name}", "matched_text_index": k})
        sentences = [f"sentence {k} of document {i}, " + "words " * rng.randint(5, 40) for k in range(4)]
        record = {"url": f"https://x.invalid/doc/{i}", "text_list": sentences, "image_info": info}
        streams[i * files // docs].write(json.dumps(record) + "\n")  # contiguous runs, as released shards
    for stream in streams:
        stream.close()
    return folder, images


def timed_command(src: Path, images: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "interleaf.cli", "data", "convert", "mmc4", str(src), str(out)]
    start = time.perf_counter()
    subprocess.run([*argv, "--image-root", str(images), "--workers", str(workers)], check=True, capture_output=True)
    return time.perf_counter() - start


def timed_call(src: Path, images: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    convert("mmc4", src, out, image_root=images, workers=workers)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--files", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = {files: write_input(root, args.docs, files, args.image_size) for files in args.files}
        images_mb = sum(p.stat().st_size for p in (root / "images").iterdir()) / 1e6
        first, first_images = inputs[args.files[0]]
        convert("mmc4", first, root / "warm", image_root=first_images, workers=2)  # starts the fork server
        for files, (src, images) in inputs.items():
            for how, run in (("command", timed_command), ("in process", timed_call)):
                rates = {}
                for workers in (1, 2):
                    seconds = [run(src, images, root / "out", workers) for _ in range(args.repeats)]
                    rates[workers] = args.docs / statistics.median(seconds)
                rows.append((files, how, rates[1], rates[2]))
    print(
        f"\n{args.docs} MMC4 documents (1-3 noise PNGs of {args.image_size}px each, {images_mb:.0f} MB of images), "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"median of {args.repeats}\n"
    )
    print("| input files | timing | 1 worker (docs/s) | 2 workers (docs/s) | 2 vs 1 |")
    print("|---|---|---|---|---|")
    for files, how, one, two in rows:
        print(f"| {files} | {how} | {one:.0f} | {two:.0f} | {two / one:.2f}x |")


if __name__ == "__main__":
    main()

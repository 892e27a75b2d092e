"""Peak host memory of loading a checkpoint in bfloat16.

    .venv/bin/python benchmarks/bench_loading.py [--hidden 1536 --layers 8]

Writes a Llama-style Flamingo checkpoint of a few hundred MB twice (float32 and bfloat16
weights), then loads each in a fresh process and reports the peak resident memory the load
added (``ru_maxrss`` after minus before; the baseline is the process's imports), beside the
usual alternative: ``safetensors.torch.load_file`` (memory-mapped) of the whole file, then
the model converted to bf16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from interleaf import Flamingo, FlamingoConfig
from interleaf.config import CrossAttentionConfig, LMConfig, ResamplerConfig, VisionConfig
from interleaf.tiny import build_lm, build_tokenizer, build_vision

PROBE = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from interleaf import Flamingo
    torch.set_num_threads(1)
    path, how = sys.argv[1], sys.argv[2]
    def status(field):  # kB, from /proc/self/status
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
    before = status("VmRSS:")
    start = time.perf_counter()
    if how == "interleaf":
        model = Flamingo.from_pretrained(path, dtype="bfloat16")
    else:  # the whole file memory-mapped and read, then converted
        from safetensors.torch import load_file
        state = load_file(f"{path}/model.safetensors")
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    seconds = time.perf_counter() - start
    after = status("VmHWM:")
    print(json.dumps({"peak_mib": (after - before) / 1024, "seconds": seconds}))
    """
)


def build(root: Path, hidden: int, layers: int) -> int:
    lm = build_lm(root / "lm", "llama", tokenizer=build_tokenizer(), hidden=hidden, layers=layers, heads=16)
    vision = build_vision(root / "vision")
    config = FlamingoConfig(
        lm=LMConfig(source=str(lm)),
        vision=VisionConfig(source=str(vision)),
        resampler=ResamplerConfig(depth=2, num_latents=8, heads=4, head_dim=32),
        cross_attention=CrossAttentionConfig(heads=8, head_dim=64, interval=2),
    )
    model = Flamingo.from_config(config)
    model.save_pretrained(root / "float32")
    model.to(torch.bfloat16).save_pretrained(root / "bfloat16")
    return sum(p.numel() for p in model.parameters())


def probe(path: Path, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), how], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--hidden", type=int, default=1536)
    args.add_argument("--layers", type=int, default=8)
    opts = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        params = build(root, opts.hidden, opts.layers)
        bf16_mib = params * 2 / 2**20
        built = time.perf_counter() - start
        print(f"model: {params / 1e6:.0f}M parameters, {bf16_mib:.0f} MiB in bf16 (built in {built:.0f}s)")
        rows = [
            ("interleaf, bf16 checkpoint", probe(root / "bfloat16", "interleaf")),
            ("interleaf, float32 checkpoint read as bf16", probe(root / "float32", "interleaf")),
            ("load_file (mmap) of the float32 file, then to bf16", probe(root / "float32", "mmap")),
        ]
        print("\n| load | peak added (MiB) | x bf16 size | seconds |\n|---|---|---|---|")
        for name, row in rows:
            print(f"| {name} | {row['peak_mib']:.0f} | {row['peak_mib'] / bf16_mib:.2f}x | {row['seconds']:.1f} |")


if __name__ == "__main__":
    main()

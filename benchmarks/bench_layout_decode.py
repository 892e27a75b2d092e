"""Whole decoding steps in the two weight layouts: the same interleaf checkpoint (the
OpenFlamingo-shaped model of ``benchmarks/compare.py``) loaded twice, one copy put back in torch's
(out, in) layout with ``set_weight_layout(model, "out-major")``, greedy decoding alternated.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_layout_decode.py --size medium --threads 1

Prints, per (images, batch), whether the tokens are equal, the whole call's time and the time
per token ((32 tokens - 1 token) / 31) in each layout, and their ratios (torch's / in-major's).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import compare as C
import torch

from interleaf import Flamingo
from interleaf.model.layout import set_weight_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("small", "medium"), default="medium")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per layout (at least 1)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    size, new = C.FULL.sizes[args.size], C.FULL.decode_new
    with tempfile.TemporaryDirectory() as tmp:
        dirs = C.build(Path(tmp), size)
        in_major = Flamingo.from_pretrained(dirs.openflamingo_converted)
        torch_layout = Flamingo.from_pretrained(dirs.openflamingo_converted)
        set_weight_layout(torch_layout, "out-major")
        image_prompt = [in_major.ids.image]
        for images, batch in ((1, 1), (8, 8)):
            ids = C.prompt_ids(batch, C.FULL.decode_prompt, images, image_prompt, size.vocab - 2, seed=1)
            inputs = C.Peer.ours_inputs(ids, C.random_pixels(batch, images, size, seed=1))

            def greedy(model, n, inputs=inputs):
                return model.generate(**inputs, max_new_tokens=n, stop_at_eos=False, stop_at_end_of_chunk=False)

            models = {"in-major": in_major, "torch": torch_layout}
            calls = {(k, n): functools.partial(greedy, m, n) for k, m in models.items() for n in (new, 1)}
            tokens = C.warm_up(calls)
            sec = C.medians(C.alternate(calls, args.repeats)[0])
            step = {k: (sec[(k, new)] - sec[(k, 1)]) / (new - 1) for k in models}
            print(
                f"{args.size}, {images} image(s), batch {batch}: tokens equal "
                f"{torch.equal(tokens[('in-major', new)], tokens[('torch', new)])}; call torch / in-major "
                f"{sec[('torch', new)]:.3f} / {sec[('in-major', new)]:.3f} s = "
                f"{sec[('torch', new)] / sec[('in-major', new)]:.2f}x; per token "
                f"{step['torch'] * 1e3:.1f} / {step['in-major'] * 1e3:.1f} ms = "
                f"{step['torch'] / step['in-major']:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()

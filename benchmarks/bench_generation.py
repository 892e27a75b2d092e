"""Decoding speed: cross-attention keys/values projected once per call (interleaf) versus
once per step (what OpenFlamingo and transformers' IDEFICS do: they cache the resampled
image features but re-project them in every cross-attention layer at every step), versus
recomputing everything (no caches at all).

    .venv/bin/python benchmarks/bench_generation.py [--images 4] [--new-tokens 32] [--dtype bfloat16]

All three run the same model with the same weights in one process and produce the same
tokens (checked); the table reports tokens/s and the ratio to interleaf's default path.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers

from interleaf import Flamingo, FlamingoConfig
from interleaf.config import CrossAttentionConfig, LMConfig, ResamplerConfig, VisionConfig
from interleaf.model.flamingo import Media
from interleaf.tiny import build_lm, build_tokenizer, build_vision


def build(
    tmp: str, hidden: int, layers: int, vision_hidden: int, *, interval: int = 1, vocab_size: int | None = None
) -> Flamingo:
    """A Llama-style LM (``vocab_size`` rows, default the tokenizer's; the new tokens'
    embeddings are decoupled, so the LM keeps them all) with CLIP-style vision at 64 px, 64
    latents per image, cross-attention every ``interval`` layers, gates at 0.5."""
    tok = build_tokenizer()
    extra = {} if vocab_size is None else {"vocab_size": vocab_size}
    build_lm(f"{tmp}/lm", "llama", tokenizer=tok, hidden=hidden, layers=layers, heads=8, **extra)
    build_vision(f"{tmp}/vision", "clip", hidden=vision_hidden, image_size=64, patch_size=8, layers=2)
    config = FlamingoConfig(
        lm=LMConfig(source=f"{tmp}/lm"),
        vision=VisionConfig(source=f"{tmp}/vision"),
        resampler=ResamplerConfig(depth=2, num_latents=64, heads=8, head_dim=64),
        cross_attention=CrossAttentionConfig(interval=interval, heads=8, head_dim=64),
    )
    torch.manual_seed(0)
    model = Flamingo.from_config(config)
    with torch.no_grad():
        for block in model.blocks:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model


def per_step_projection(model: Flamingo):
    """Patch ``model.step`` to re-project the cached latents at every step (the peers' way)."""
    original_step = model.step
    original_prepare = model.prepare_media
    latents = {}

    def prepare(input_ids, pixel_values):
        latents["x"] = model.encode_images(input_ids, pixel_values)
        return original_prepare(input_ids, pixel_values)

    def step(input_ids, *, media, **kwargs):
        if media is not None:
            media = Media([block.project_media(latents["x"]) for block in model.blocks], media.count)
        return original_step(input_ids, media=media, **kwargs)

    model.prepare_media, model.step = prepare, step
    return lambda: (setattr(model, "step", original_step), setattr(model, "prepare_media", original_prepare))


def timed(fn, repeats: int):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vision-hidden", type=int, default=768)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        model = build(tmp, args.hidden, args.layers, args.vision_hidden).to(getattr(torch, args.dtype))
        text = "".join("<image>a photo of a red square.<|endofchunk|>" for _ in range(args.images))
        batch = model.tokenizer([text] * args.batch, return_tensors="pt")
        pixels = torch.randn(args.batch, args.images, 3, 64, 64)
        kw = dict(max_new_tokens=args.new_tokens, stop_at_eos=False, stop_at_end_of_chunk=False)

        def run(**extra):
            return model.generate(batch.input_ids, batch.attention_mask, pixels, **kw, **extra)

        results = {}
        results["interleaf: K/V projected once per call"] = timed(run, args.repeats)
        restore = per_step_projection(model)
        results["K/V re-projected every step (OpenFlamingo, IDEFICS)"] = timed(run, args.repeats)
        restore()
        results["no caches (recompute the whole prompt each step)"] = timed(
            lambda: run(use_cache=False), max(1, args.repeats // 2)
        )

    reference_tokens = next(iter(results.values()))[1]
    base = next(iter(results.values()))[0]
    tokens = args.batch * args.new_tokens
    print(
        f"\nLlama-style LM {args.layers}x{args.hidden}, cross-attention every layer, CLIP vision "
        f"{args.vision_hidden}, {args.images} images x 64 latents, batch {args.batch}, "
        f"{args.new_tokens} new tokens, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| decoding path | tokens/s | time vs interleaf |")
    print("|---|---|---|")
    for name, (seconds, out) in results.items():
        same = "" if torch.equal(out, reference_tokens) else " (tokens differ!)"
        print(f"| {name} | {tokens / seconds:.1f} | {seconds / base:.2f}x{same} |")


if __name__ == "__main__":
    main()

"""``interleaf <verb>``: parse the arguments, then call one typed function per verb."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def demo(out: Path, steps: int, seed: int) -> None:
    from interleaf.demo import DemoOptions, run

    run(DemoOptions(out=out, steps=steps, seed=seed))


def generate(
    model_dir: str,
    prompt: str,
    images: list[Path],
    *,
    max_new_tokens: int,
    num_beams: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int | None,
    stream_output: bool,
) -> None:
    """Generate a continuation of ``prompt``, whose ``<image>`` placeholders take ``images`` in order."""
    from interleaf.generation import stream
    from interleaf.model.flamingo import Flamingo
    from interleaf.processing import Processor

    model = Flamingo.from_pretrained(model_dir)
    processor = Processor.from_pretrained(model_dir)
    batch = processor(prompt, images=list(images))
    settings = dict(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    if stream_output and num_beams != 1:
        raise ValueError("--stream shows one continuation as it grows; it does not combine with --num-beams")
    if stream_output:
        for piece in stream(model, **batch, **settings):
            print(piece, end="", flush=True)
        print()
        return
    ids = model.generate(**batch, **settings)
    print(processor.batch_decode(ids, skip_special_tokens=True)[0])


def convert(fmt: str, src: str, dst: Path, *, lm: str | None, vision: str, every: int | None) -> None:
    """Convert an upstream checkpoint into an interleaf checkpoint."""
    from interleaf.checkpoint import resolve

    if fmt == "idefics":
        from interleaf.convert.idefics import convert as run_idefics

        out = run_idefics(resolve(src), dst)
    else:
        from interleaf.convert.openflamingo import convert as run_openflamingo

        if lm is None:
            raise ValueError("convert openflamingo needs --lm, the language model the checkpoint was trained on")
        out = run_openflamingo(src, dst, lm=lm, vision=vision, cross_attn_every_n_layers=every)
    print(f"wrote an interleaf checkpoint to {out}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="interleaf", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True)

    d = verbs.add_parser("demo", help="build and train a tiny Flamingo on the CPU, then generate")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="where backbones and the model go")
    d.add_argument("--steps", type=int, default=200, help="training steps")
    d.add_argument("--seed", type=int, default=0)

    g = verbs.add_parser("generate", help="generate from an interleaved prompt")
    g.add_argument("--model", required=True, help="an interleaf checkpoint directory or hub id")
    g.add_argument("--prompt", required=True, help="text with one <image> placeholder per --image")
    g.add_argument("--image", type=Path, action="append", default=[], help="an image file (repeat, in order)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")

    c = verbs.add_parser("convert", help="convert a released checkpoint (IDEFICS, OpenFlamingo) to interleaf's format")
    c.add_argument("format", choices=["idefics", "openflamingo"], help="the upstream format")
    c.add_argument("src", help="IDEFICS: directory or hub id; OpenFlamingo: its checkpoint.pt")
    c.add_argument("dst", type=Path, help="where to write the interleaf checkpoint")
    c.add_argument("--lm", help="OpenFlamingo: the language model (hub id or directory), e.g. anas-awadalla/mpt-7b")
    c.add_argument("--vision", default="openai/clip-vit-large-patch14", help="OpenFlamingo: the HF CLIP vision tower")
    c.add_argument("--cross-attn-every-n-layers", type=int, help="OpenFlamingo: checked against the checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.verb == "demo":
            demo(args.out, args.steps, args.seed)
        elif args.verb == "convert":
            convert(
                args.format, args.src, args.dst, lm=args.lm, vision=args.vision, every=args.cross_attn_every_n_layers
            )
        elif args.verb == "generate":
            generate(
                args.model,
                args.prompt,
                args.image,
                max_new_tokens=args.max_new_tokens,
                num_beams=args.num_beams,
                do_sample=args.sample,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                stream_output=args.stream,
            )
    except ValueError as e:
        print(f"interleaf {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

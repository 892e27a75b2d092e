"""``interleaf <verb>``: parse the arguments, then call one typed function per verb."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def demo(out: Path, seed: int, scale: float) -> None:
    from interleaf.demo import DemoOptions, run

    run(DemoOptions(out=out, seed=seed, scale=scale))


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


def train(recipe_path: Path, overrides: list[str]) -> None:
    """Train the model of a YAML recipe (with ``key.sub=value`` overrides), after printing
    which parameters train."""
    from interleaf.model.flamingo import Flamingo
    from interleaf.model.trainable import parameter_report
    from interleaf.train.config import load_recipe
    from interleaf.train.loop import Loggers, seed_everything
    from interleaf.train.loop import train as run

    recipe = load_recipe(recipe_path, overrides)
    try:
        Loggers.check(recipe.train)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    seed_everything(recipe.train.seed)
    model = Flamingo.from_config(recipe.model)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        print(format_parameter_report(parameter_report(model), sum(p.numel() for p in model.parameters())))
    result = run(recipe, model=model)
    if main_process:
        stopped = " (stopped by a signal)" if result["stopped"] else ""
        print(f"trained to step {result['step']}{stopped}; saved to {result['final'] or result['checkpoint']}")


def format_parameter_report(report: dict[str, int], total: int) -> str:
    """The trainable parameter counts as a small table: the total, then one line per group."""
    lines = [f"trainable parameters: {report['total']:,} of {total:,} ({100 * report['total'] / max(total, 1):.2f}%)"]
    lines += [f"  {group:<22}{count:>16,}" for group, count in report.items() if group != "total"]
    return "\n".join(lines)


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


def data_convert(
    fmt: str, src: Path, out: Path, *, shard_size: int, max_skip_rate: float, image_root: Path | None
) -> None:
    """Read ``src`` in format ``fmt`` and write webdataset shards of ``shard_size`` documents."""
    from interleaf.data.formats import read
    from interleaf.data.schema import SkipCounter
    from interleaf.data.shards import write_shards

    reading, writing = SkipCounter(max_skip_rate=max_skip_rate), SkipCounter(max_skip_rate=max_skip_rate)
    options = {"image_root": image_root} if image_root is not None else {}
    docs = read(src, fmt, counter=reading, **options)
    shards = write_shards(docs, out, max_samples=shard_size, counter=writing)
    print(f"wrote {len(shards)} shards to {out}; read: {reading.report()}; written: {writing.report()}")


def data_inspect(spec: str, samples: int) -> None:
    """Counts over shards, and the first few documents."""
    from collections import Counter

    from interleaf.data.schema import SkipCounter
    from interleaf.data.shards import expand, read_shard

    counter, kinds, images, shown = SkipCounter(max_skip_rate=1.0), Counter(), 0, 0
    for shard in expand(spec):
        for doc in read_shard(shard, counter):
            kinds["chat" if doc.is_chat else f"{len(doc.images)} image(s)"] += 1
            images += len(doc.images)
            if shown < samples:
                shown += 1
                parts = [f"[image {len(s.image.data)} B]" if s.image else repr(s.text[:60]) for s in doc.segments]
                print(f"{doc.id} ({doc.source or 'no source'}): " + " ".join(parts))
    print(f"{counter.seen - sum(counter.skipped.values())} documents, {images} images; by kind: {dict(kinds)}")
    print(counter.report())


def data_tinyworld(out: Path, seed: int, n_train: int, n_eval: int, image_size: int) -> None:
    from interleaf.data import tinyworld

    tinyworld.write(out, seed=seed, n_train=n_train, n_eval=n_eval, image_size=image_size)
    print(f"wrote the tiny world (seed {seed}) to {out}")


def evaluate(
    model_dir: str,
    task: str,
    *,
    root: str | None,
    shots: list[int],
    demos: str,
    trials: int,
    seed: int,
    batch_size: int,
    limit: int | None,
    out: Path,
) -> None:
    """Few-shot evaluation of a checkpoint on a task; prints the summary table."""
    from interleaf.eval.harness import EvalConfig
    from interleaf.eval.harness import evaluate as run
    from interleaf.eval.report import table
    from interleaf.eval.rices import Rices
    from interleaf.eval.tasks import load_task
    from interleaf.model.flamingo import Flamingo
    from interleaf.processing import Processor

    spec, support, queries = load_task(task, root)
    cfg = EvalConfig(shots=tuple(shots), demos=demos, trials=trials, seed=seed, batch_size=batch_size, limit=limit)
    model, processor = Flamingo.from_pretrained(model_dir), Processor.from_pretrained(model_dir)
    rices = Rices.from_model(model, processor, cache_dir=out.parent / ".rices") if demos == "rices" else None
    report = run(model, processor, spec, support, queries, cfg, model_name=model_dir, out=out, rices=rices)
    print(table([report]))
    print(f"results: {out}")


def eval_report(paths: list[str], out: Path | None) -> None:
    from interleaf.eval.report import load, plot, table

    reports = load(paths)
    print(table(reports))
    if out is not None:
        print(f"plot: {plot(reports, out)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="interleaf", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True)

    d = verbs.add_parser(
        "demo", help="tiny world -> pretrained tiny backbones -> Flamingo stages -> few-shot evaluation, on the CPU"
    )
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="where every stage's output goes")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scale", type=float, default=1.0, help="multiply data and steps (0.25: quick look; 2: stronger)")

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

    t = verbs.add_parser("train", help="train a model from a YAML recipe (see configs/recipes/)")
    t.add_argument("recipe", type=Path, help="a run recipe (YAML): model, data, optim, train")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. optim.lr=3e-4 train.steps=100")

    c = verbs.add_parser("convert", help="convert a released checkpoint (IDEFICS, OpenFlamingo) to interleaf's format")
    c.add_argument("format", choices=["idefics", "openflamingo"], help="the upstream format")
    c.add_argument("src", help="IDEFICS: directory or hub id; OpenFlamingo: its checkpoint.pt")
    c.add_argument("dst", type=Path, help="where to write the interleaf checkpoint")
    c.add_argument("--lm", help="OpenFlamingo: the language model (hub id or directory), e.g. anas-awadalla/mpt-7b")
    c.add_argument("--vision", default="openai/clip-vit-large-patch14", help="OpenFlamingo: the HF CLIP vision tower")
    c.add_argument("--cross-attn-every-n-layers", type=int, help="OpenFlamingo: checked against the checkpoint")

    e = verbs.add_parser("eval", help="few-shot evaluation (or: eval report RESULTS.json ... --out plot.png)")
    e.add_argument("action", nargs="?", choices=["report"], help="report: table and plot of result files")
    e.add_argument("results", nargs="*", help="report: result files")
    e.add_argument("--model", help="an interleaf checkpoint directory or hub id")
    e.add_argument("--task", help="a built-in task name or a task YAML file")
    e.add_argument("--root", help="the task's data directory (where its files are)")
    e.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    e.add_argument("--demos", choices=["random", "rices"], default="random")
    e.add_argument("--trials", type=int, default=1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--limit", type=int, help="evaluate only the first N queries")
    e.add_argument("--out", type=Path, help="results JSON (run) or plot PNG (report)")

    data = verbs.add_parser("data", help="convert, inspect and generate training data").add_subparsers(
        dest="data_verb", required=True
    )
    dc = data.add_parser("convert", help="a dataset in a known format -> webdataset shards")
    dc.add_argument("format", help="mmc4, obelics, pairs_wds, pairs_parquet, llava, annt")
    dc.add_argument("src", type=Path, help="a file or a directory of files in that format")
    dc.add_argument("out", type=Path, help="directory for the shards")
    dc.add_argument("--shard-size", type=int, default=1000, help="documents per shard")
    dc.add_argument("--max-skip-rate", type=float, default=0.2, help="fail when more are skipped")
    dc.add_argument("--image-root", type=Path, help="where the format's image files are")
    di = data.add_parser("inspect", help="counts and a few samples of webdataset shards")
    di.add_argument("shards", help="a directory, a glob or a brace pattern of .tar shards")
    di.add_argument("--samples", type=int, default=3)
    dt = data.add_parser("tinyworld", help="write the synthetic tiny world in the real formats")
    dt.add_argument("out", type=Path)
    dt.add_argument("--seed", type=int, default=0)
    dt.add_argument("--n-train", type=int, default=2000)
    dt.add_argument("--n-eval", type=int, default=200)
    dt.add_argument("--image-size", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.verb == "demo":
            demo(args.out, args.seed, args.scale)
        elif args.verb == "eval" and args.action == "report":
            eval_report(args.results, args.out)
        elif args.verb == "eval":
            if not (args.model and args.task and args.out):
                raise ValueError("eval needs --model, --task and --out")
            evaluate(
                args.model,
                args.task,
                root=args.root,
                shots=args.shots,
                demos=args.demos,
                trials=args.trials,
                seed=args.seed,
                batch_size=args.batch_size,
                limit=args.limit,
                out=args.out,
            )
        elif args.verb == "data":
            if args.data_verb == "convert":
                data_convert(
                    args.format,
                    args.src,
                    args.out,
                    shard_size=args.shard_size,
                    max_skip_rate=args.max_skip_rate,
                    image_root=args.image_root,
                )
            elif args.data_verb == "inspect":
                data_inspect(args.shards, args.samples)
            else:
                data_tinyworld(args.out, args.seed, args.n_train, args.n_eval, args.image_size)
        elif args.verb == "train":
            train(args.recipe, args.overrides)
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
        print(f"interleaf {args.verb}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

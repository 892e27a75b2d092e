"""``interleaf <verb>``: parse the arguments, then call one typed function per verb."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from interleaf.extras import MissingExtra
from interleaf.paths import check_out_dir


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``interleaf <verb>: error: <message>``,
    with exit status 2 (the usage stays available with ``-h``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _checked(kind: type, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse ``type``: ``kind(text)``, which must be finite and satisfy ``ok``; argparse
    reports a failure as ``argument --limit: must be >= 1, got 0``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, ">= 1")
non_negative_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
non_negative_float = _checked(float, lambda v: v >= 0, ">= 0")
fraction = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
top_p_fraction = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")


def part_spec(text: str) -> str:
    """An argparse ``type``: ``I/N``, part I (from 0) of N."""
    from interleaf.data.parts import Part

    try:
        Part.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def existing_path(text: str) -> Path:
    """An argparse ``type``: a file or directory that exists."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return Path(text)


def existing_file(text: str) -> Path:
    """An argparse ``type``: a file that exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{'not a file' if Path(text).exists() else 'no such file'}: {text}")
    return Path(text)


def existing_dir(text: str) -> Path:
    """An argparse ``type``: a directory that exists."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{'not a directory' if Path(text).exists() else 'no such directory'}: {text}")
    return Path(text)


def demo(
    out: Path, seed: int, scale: float, *, device: str = "auto", dtype: str = "float32", generate: bool = False
) -> None:
    from interleaf.demo import DemoOptions, run

    run(DemoOptions(out=out, seed=seed, scale=scale, device=device, dtype=dtype, generate=generate))


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
    stop: list[str],
    stream_output: bool,
    device: str = "auto",
    dtype: str | None = None,
) -> None:
    """Generate a continuation of ``prompt``, whose ``<image>`` placeholders take ``images`` in
    order; the text is cut before the first of the ``stop`` strings."""
    from interleaf.generation import GenerationConfig, decode, stream
    from interleaf.model.flamingo import Flamingo
    from interleaf.processing import Processor

    if stream_output and num_beams != 1:
        raise ValueError("--stream shows one continuation as it grows; it does not combine with --num-beams")
    settings = dict(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_strings=tuple(stop),
    )
    GenerationConfig(**settings)  # every setting checked before the model loads
    model = Flamingo.from_pretrained(model_dir, device=device, dtype=dtype)
    processor = Processor.from_pretrained(model_dir)
    batch = processor(prompt, images=list(images))
    if stream_output:
        for piece in stream(model, **batch, **settings):
            print(piece, end="", flush=True)
        print()
        return
    ids = model.generate(**batch, **settings)
    print(decode(processor.tokenizer, ids, stop)[0])


def generate_interleaved(
    model_dir: str,
    *,
    source: Path | None,
    prompt: str | None,
    images: list[Path],
    out: Path,
    mode: str,
    num_iter: int,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int,
    guidance_scale: float | None,
    inference_steps: int | None,
    device: str = "auto",
    image_guidance_scale: float | None = None,
    dtype: str | None = None,
) -> None:
    """Continue interleaved documents with text and drawn images (MM-Interleaved's inference):
    those of an ``annt.json`` file (``source``; a document's own ``generate_mode`` and
    ``num_iter`` win over ``mode`` and ``num_iter``), or one prompt whose ``<image>``
    placeholders take ``images``. Writes PNGs, ``annt.json`` and ``index.html`` under ``out``."""
    from interleaf.config import FlamingoConfig
    from interleaf.data.formats import read
    from interleaf.data.pages import write_interleaved
    from interleaf.data.schema import DataError, SkipCounter
    from interleaf.model.flamingo import Flamingo
    from interleaf.model.interleaved import MODES
    from interleaf.processing import Processor

    if (source is None) == (prompt is None):
        raise ValueError("--interleaved takes --input annt.json or --prompt TEXT (one of them)")
    if source is not None and images:
        raise ValueError("--image goes with --prompt (an annt.json file names its own images)")
    jobs = []
    if source is not None:
        counter = SkipCounter()
        try:
            docs = list(read(source, "annt", counter=counter, check_images=True))
        except DataError as e:
            raise ValueError(f"{source}: {e}") from None
        if counter.skipped:
            raise ValueError(f"{source}: {counter.report()}")
        if not docs:
            raise ValueError(f"{source}: no document")
        for doc in docs:
            items = [s.text if s.text is not None else s.image.load() for s in doc.segments]
            for key in doc.meta:  # a misspelt setting would be dropped without a word
                near = difflib.get_close_matches(key, ("generate_mode", "num_iter", "id"), n=1, cutoff=0.75)
                if near and near[0] != key:
                    raise ValueError(f"{doc.id}: unknown field {key!r} (did you mean {near[0]!r}?)")
            doc_mode = doc.meta.get("generate_mode", mode)
            doc_iter = doc.meta.get("num_iter", num_iter)
            if doc_mode not in MODES:
                raise ValueError(f"{doc.id}: generate_mode must be one of {list(MODES)}, got {doc_mode!r}")
            if not isinstance(doc_iter, int) or isinstance(doc_iter, bool) or doc_iter < 1:
                raise ValueError(f"{doc.id}: num_iter must be an integer >= 1, got {doc_iter!r}")
            jobs.append((str(doc.meta.get("id") or doc.id), items, doc_mode, doc_iter))  # its own id, if it has one
    else:
        pieces = prompt.split("<image>")
        if len(pieces) - 1 != len(images):
            raise ValueError(f"--prompt has {len(pieces) - 1} <image> placeholder(s) for {len(images)} --image file(s)")
        items = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            items += [image, piece]
        jobs.append(("prompt", [i for i in items if not (isinstance(i, str) and not i.strip())], mode, num_iter))
        if not jobs[0][1]:
            raise ValueError("--prompt is empty: give text (and <image> placeholders for --image files)")
    config = None
    if (Path(model_dir) / "config.json").is_file():  # an interleaf checkpoint: checked before the weights load
        with contextlib.suppress(ValueError):  # else another family's directory, converted when loaded
            config = FlamingoConfig.from_json(Path(model_dir) / "config.json")
    if config is not None:
        _check_interleaved_jobs(jobs, config, model_dir)
    model = Flamingo.from_pretrained(model_dir, device=device, dtype=dtype)
    if config is None:  # a hub id or another family's checkpoint: its config is known once loaded
        _check_interleaved_jobs(jobs, model.config, model_dir)
    processor = Processor.from_pretrained(model_dir)
    written, settings = [], []
    for doc_id, items, doc_mode, doc_iter in jobs:
        parts = model.generate_interleaved(
            processor,
            items,
            mode=doc_mode,
            num_iter=doc_iter,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            inference_steps=inference_steps,
        )
        written.append((doc_id, parts))
        settings.append({"generate_mode": doc_mode, "num_iter": doc_iter})
        text = " ".join(p.get("text", "<image>") for p in parts if p.get("generated"))
        print(f"{doc_id}, written by the model: {text}")
    paths = write_interleaved(written, out, settings)
    print(f"wrote {len(paths['images'])} images under {out / 'images'}, {paths['json']} and {paths['html']}")


def _check_interleaved_jobs(jobs: list, config, model_dir: str) -> None:
    """Refuse, naming the document and item, text that writes a token the model reads as an
    image (its image token, or its begin-of-image token): in an annt.json sentence an image is
    its own item, and where a drawing starts is the model's to say."""
    if config.image_generation is None:
        raise ValueError(f"{model_dir}: this model does not draw (its config has no image_generation)")
    for doc_id, items, _, _ in jobs:
        for i, item in enumerate(items):
            for token in (config.tokens.image, config.tokens.begin_of_image):
                if isinstance(item, str) and token in item:
                    raise ValueError(
                        f"{doc_id}, item {i}: the text contains the token {token!r}; an image is an item of its own"
                    )


def chat(model_dir: str, *, max_new_tokens: int, temperature: float, seed: int | None, device: str, dtype) -> None:
    """A conversation in the terminal (see :mod:`interleaf.serve.chat`)."""
    from interleaf.serve.chat import ChatSession, load, run

    ChatSession.check(max_new_tokens=max_new_tokens, temperature=temperature)
    model, processor = load(model_dir, device=device, dtype=dtype)
    run(ChatSession(model, processor, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))


def serve(model_dir: str, args: argparse.Namespace) -> None:
    """The OpenAI-compatible server and its chat page (see :mod:`interleaf.serve.api`)."""
    from interleaf.extras import require

    require("fastapi", "interleaf serve", "serve")
    require("uvicorn", "interleaf serve", "serve")
    from interleaf.serve.api import ServeOptions, run
    from interleaf.serve.protocol import Limits

    limits = Limits(**{name: getattr(args, name) for name in SERVE_LIMITS})
    key = args.api_key if args.api_key is not None else os.environ.get("INTERLEAF_API_KEY") or None
    name = args.model_name or Path(model_dir.rstrip("/")).name or model_dir
    options = ServeOptions(model_name=name, api_key=key, allow_remote_images=args.allow_remote_images, limits=limits)
    run(
        model_dir,
        host=args.host,
        port=args.port,
        options=options,
        device=args.device,
        dtype=args.dtype,
        log_level=args.log_level,
    )


SERVE_LIMITS = {
    "max_request_bytes": (20 * 2**20, "request body bytes"),
    "max_image_bytes": (10 * 2**20, "bytes of one image"),
    "max_image_pixels": (16_000_000, "pixels of one image (larger ones are refused from their header)"),
    "max_images": (8, "images in one request"),
    "max_prompt_tokens": (4096, "tokens of a prompt"),
    "max_tokens": (1024, "tokens a request may ask for (and gets when it does not say)"),
    "max_batch_size": (16, "requests decoded together"),
    "max_waiting": (64, "requests queued beyond those; more get a 429"),
}


def train(recipe_path: Path, overrides: list[str]) -> None:
    """Train the model of a YAML recipe (with ``key.sub=value`` overrides); the run prints
    what ``train.init_from`` loaded and which parameters train."""
    from interleaf.train.config import load_recipe
    from interleaf.train.loop import train as run

    recipe = load_recipe(recipe_path, overrides)
    result = run(recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        stopped = " (stopped by a signal)" if result["stopped"] else ""
        print(f"trained to step {result['step']}{stopped}; saved to {result['final'] or result['checkpoint']}")


def convert(fmt: str, src: str, dst: Path, *, lm: str | None, vision: str, every: int | None) -> None:
    """Convert an upstream checkpoint into an interleaf checkpoint."""
    from interleaf.hub import resolve

    if fmt == "idefics":
        from interleaf.convert.idefics import convert as run_idefics

        out = run_idefics(resolve(src), dst)
    elif fmt == "infimm":
        from interleaf.convert import infimm

        root = resolve_infimm(src)
        if not infimm.is_infimm(root):
            raise ValueError(f"convert infimm: {src}: no InfiMM config.json (with 'visual' and 'language') there")
        out = infimm.convert(root, dst)
    else:
        from interleaf.convert.openflamingo import convert as run_openflamingo

        if lm is None:
            raise ValueError("convert openflamingo needs --lm, the language model the checkpoint was trained on")
        if not Path(src).is_file():
            raise ValueError(f"convert openflamingo: src {src}: no such checkpoint file (its checkpoint.pt)")
        out = run_openflamingo(src, dst, lm=lm, vision=vision, cross_attn_every_n_layers=every)
    print(f"wrote an interleaf checkpoint to {out}")


def resolve_infimm(src: str) -> Path:
    """A local directory, or a hub snapshot of the InfiMM repo's data files (never its Python)."""
    from interleaf.convert import infimm
    from interleaf.hub import resolve

    return infimm.download(src) if src in infimm.RELEASES else resolve(src)


def data_convert(
    fmt: str,
    src: Path,
    out: Path,
    *,
    shard_size: int,
    max_skip_rate: float,
    image_root: Path | None,
    part: str | None = None,
    workers: int = 1,
    images: Path | None = None,
) -> None:
    """Read ``src`` in format ``fmt`` and write webdataset shards of ``shard_size`` documents: all
    of it, or part ``I/N`` (``part``), in ``workers`` local processes; URL images joined from the
    img2dataset output folder ``images``. Prints one summary line a part (and the total).

    Reading no usable document (e.g. a file of another format) is an error that names the file,
    the format and the skip reasons; so is writing none (e.g. no image could be read)."""
    from interleaf.data.parts import Part
    from interleaf.data.prepare import convert

    conversion = convert(
        fmt,
        src,
        out,
        part=None if part is None else Part.parse(part),
        workers=workers,
        shard_size=shard_size,
        max_skip_rate=max_skip_rate,
        image_root=image_root,
        images=images,
    )
    for line in conversion.lines:
        print(line)


def data_urls(fmt: str, src: Path, out: Path, *, part: str | None = None, max_skip_rate: float = 0.2) -> None:
    """Write the distinct image URLs of ``src`` (or of its part ``I/N``) to ``out`` (``.parquet``
    with a ``url`` column, or ``.txt``), img2dataset's input."""
    from interleaf.data.downloads import UrlList
    from interleaf.data.formats import read
    from interleaf.data.parts import Part
    from interleaf.data.schema import DataError, SkipCounter

    if not src.exists():
        raise ValueError(f"src {src}: no such file or directory")
    if out.suffix not in (".parquet", ".txt"):
        raise ValueError(f"{out}: the URL list must be a .parquet or a .txt file")
    options = {} if part is None else {"part": Part.parse(part)}
    reading, urls = SkipCounter(max_skip_rate=max_skip_rate), UrlList()
    try:
        urls.add(read(src, fmt, counter=reading, **options))
    except FileNotFoundError as e:  # a directory without files of the format
        raise ValueError(f"{fmt}: {e}") from None
    except DataError as e:  # too many skips: the counter's verdict
        raise ValueError(f"{src} ({fmt}): {e}") from None
    if not urls.urls and not (part is not None and reading.seen == 0):
        raise ValueError(f"{src}: no image URL in its {fmt} documents: {reading.report()}")
    urls.write(out)
    where = "" if part is None else f"part {part}: "
    print(
        f"{where}wrote {len(urls.urls)} distinct image URLs to {out} ({urls.occurrences} image URLs in "
        f"{urls.documents} documents, {urls.occurrences - len(urls.urls)} duplicates dropped); read: {reading.report()}"
    )


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
    documents = sum(kinds.values())
    if documents == 0:
        raise ValueError(f"{spec}: no readable document in its shards: {counter.report()}")
    print(f"{documents} documents, {images} images; by kind: {dict(kinds)}")
    print(counter.report())


def data_tinyworld(out: Path, seed: int, n_train: int, n_eval: int, image_size: int) -> None:
    from interleaf.data import tinyworld

    try:
        tinyworld.write(out, seed=seed, n_train=n_train, n_eval=n_eval, image_size=image_size)
    except FileExistsError as e:  # out holds something else
        raise ValueError(str(e)) from None
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
    rank_chunk_size: int,
    out: Path,
    device: str = "auto",
    dtype: str | None = None,
) -> None:
    """Few-shot evaluation of a checkpoint on a task; prints the summary table. Under
    ``torchrun --nproc_per_node N`` the queries are shared among N processes (one GPU each) and
    rank 0 writes the results."""
    from interleaf.eval import distributed
    from interleaf.eval.harness import EvalConfig
    from interleaf.eval.harness import evaluate as run
    from interleaf.eval.report import table
    from interleaf.eval.rices import Rices
    from interleaf.eval.tasks import load_task
    from interleaf.model.flamingo import Flamingo
    from interleaf.processing import Processor

    # Everything that can be wrong with the task or the options fails here, before the model loads.
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the results JSON file to write")
    spec, support, queries = load_task(task, root)
    cfg = EvalConfig(
        shots=tuple(shots),
        demos=demos,
        trials=trials,
        seed=seed,
        batch_size=batch_size,
        limit=limit,
        rank_chunk_size=rank_chunk_size,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    ranks, rank_device = distributed.join(device)
    try:
        model = Flamingo.from_pretrained(model_dir, device=rank_device or device, dtype=dtype)
        processor = Processor.from_pretrained(model_dir)
        rices = Rices.from_model(model, processor, cache_dir=out.parent / ".rices") if demos == "rices" else None
        report = run(model, processor, spec, support, queries, cfg, model_name=model_dir, out=out, rices=rices)
    finally:
        distributed.leave()
    if ranks.main:
        print(table([report]))
        print(f"results: {out}" + (f" ({ranks.world_size} processes)" if ranks.world_size > 1 else ""))


def eval_report(paths: list[str], out: Path | None) -> None:
    """The table (and with ``out`` the plot) of evaluation result files; other JSON files among
    them (a demo's ``stage.json``) are skipped with a note on stderr."""
    from interleaf.eval.report import load, plot, table

    if not paths:
        raise ValueError("no result files given (eval report RESULTS.json ...)")
    if out is not None and out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the plot file to write (e.g. plot.png)")
    reports = load(paths, on_other=lambda note: print(f"interleaf eval: note: {note}", file=sys.stderr))
    if not reports:
        raise ValueError(f"none of the {len(paths)} files given is an evaluation result")
    print(table(reports))
    if out is not None:
        print(f"plot: {plot(reports, out)}")


DEVICE_HELP = (
    "cpu, cuda, cuda:N, or auto (default): spread over all visible GPUs when it does not fit one "
    "(accelerate's device map), else the GPU, else the CPU; under torchrun: cuda:LOCAL_RANK"
)


def device_name(text: str) -> str:
    """An argparse ``type``: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or auto, got {text!r}")
    return text


def placement_options(p: argparse.ArgumentParser, *, dtype_default: str | None = None, training: bool = False) -> None:
    """``--device`` and ``--dtype``."""
    help_text = (
        "the Flamingo stages and the evaluation: auto (default: a GPU when there is one, else the CPU), cpu, "
        "cuda, cuda:N; the tiny world and the backbones' pretraining stay on the CPU"
        if training
        else DEVICE_HELP
    )
    p.add_argument("--device", type=device_name, default="auto", help=help_text)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"] if training else ["float32", "bfloat16", "float16"],
        default=dtype_default,
        help="the weights' dtype"
        + (" (bfloat16: frozen weights and autocast)" if training else " (default: as saved)"),
    )


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="interleaf", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=Parser)

    d = verbs.add_parser(
        "demo", help="tiny world -> pretrained tiny backbones -> Flamingo stages -> few-shot evaluation, on the CPU"
    )
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="where every stage's output goes")
    d.add_argument("--seed", type=int, default=0)
    placement_options(d, dtype_default="float32", training=True)
    d.add_argument(
        "--scale", type=positive_float, default=1.0, help="multiply data and steps (0.25: quick look; 2: stronger)"
    )
    d.add_argument(
        "--generate",
        action="store_true",
        help="then learn to draw (MM-Interleaved): stage 3 with and without MMFS, scored by an attribute classifier",
    )

    g = verbs.add_parser("generate", help="generate from an interleaved prompt")
    g.add_argument("--model", required=True, help="an interleaf checkpoint directory or hub id")
    g.add_argument("--prompt", help="text with one <image> placeholder per --image")
    g.add_argument("--image", type=existing_file, action="append", default=[], help="an image file (repeat, in order)")
    g.add_argument("--max-new-tokens", type=positive_int, default=32)
    g.add_argument("--num-beams", type=positive_int, default=1)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=positive_float, default=1.0)
    g.add_argument("--top-p", type=top_p_fraction, default=1.0)
    g.add_argument(
        "--seed",
        type=_checked(int, lambda v: 0 <= v < 2**62, "in [0, 2**62)"),
        help="seed of the sampling (and, with --interleaved, of the drawings' noise; default 0)",
    )
    g.add_argument("--stop", action="append", default=[], help="end the text before this string (repeat for several)")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.add_argument(
        "--interleaved", action="store_true", help="write text and draw images in turn (a model with image generation)"
    )
    g.add_argument("--input", type=existing_file, help="with --interleaved: an MM-Interleaved annt.json of documents")
    g.add_argument("--out", type=Path, help="with --interleaved: where the PNGs, annt.json and index.html go")
    g.add_argument(
        "--mode",
        choices=("generate_texts", "generate_images"),
        help="with --interleaved: each round starts with text (generate_texts, the default) or an image",
    )
    g.add_argument("--num-iter", type=positive_int, help="with --interleaved: the most rounds (default: 1)")
    g.add_argument("--guidance-scale", type=non_negative_float, help="classifier-free guidance (default: the model's)")
    g.add_argument(
        "--image-guidance-scale",
        type=non_negative_float,
        help="the earlier images' own guidance, below --guidance-scale to favour the text (default: the model's)",
    )
    g.add_argument("--inference-steps", type=positive_int, help="sampler steps (default: the model's)")
    placement_options(g)

    ch = verbs.add_parser("chat", help="talk to a model in the terminal (/image PATH, /reset, /quit)")
    ch.add_argument("--model", required=True, help="an interleaf checkpoint directory or hub id")
    ch.add_argument("--max-new-tokens", type=positive_int, default=256, help="the longest answer (default: 256)")
    ch.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="0 (default): greedy; above 0: sampling"
    )
    ch.add_argument(
        "--seed", type=_checked(int, lambda v: -(2**63) <= v < 2**64, "in [-2**63, 2**64)"), help="seed of the sampling"
    )
    placement_options(ch)

    sv = verbs.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions) with a chat page at /")
    sv.add_argument("--model", required=True, help="an interleaf checkpoint directory or hub id")
    sv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine)")
    sv.add_argument(
        "--port",
        type=_checked(int, lambda v: 0 <= v <= 65535, "in [0, 65535]"),
        default=8000,
        help="the port (default: 8000; 0: any free port, printed at start)",
    )
    sv.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="info (default): a line per request; warning: errors only",
    )
    sv.add_argument(
        "--api-key", help="clients must send 'Authorization: Bearer KEY' (default: $INTERLEAF_API_KEY, else none)"
    )
    sv.add_argument("--model-name", help="the model's name in the API (default: the directory's name)")
    sv.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (default: data: URLs only)"
    )
    for name, (default, what) in SERVE_LIMITS.items():
        sv.add_argument(
            f"--{name.replace('_', '-')}",
            type=positive_int if name != "max_waiting" else non_negative_int,
            default=default,
            help=f"the most {what} (default: {default:,})",
        )
    placement_options(sv)

    t = verbs.add_parser("train", help="train a model from a YAML recipe (see configs/recipes/)")
    t.add_argument("recipe", type=Path, help="a run recipe (YAML): model, data, optim, train")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. optim.lr=3e-4 train.steps=100")

    c = verbs.add_parser(
        "convert", help="convert a released checkpoint (IDEFICS, OpenFlamingo, InfiMM) to interleaf's format"
    )
    c.add_argument("format", choices=["idefics", "openflamingo", "infimm"], help="the upstream format")
    c.add_argument("src", help="IDEFICS, InfiMM: directory or hub id; OpenFlamingo: its checkpoint.pt")
    c.add_argument("dst", type=Path, help="where to write the interleaf checkpoint")
    c.add_argument("--lm", help="OpenFlamingo: the language model (hub id or directory), e.g. anas-awadalla/mpt-7b")
    c.add_argument("--vision", default="openai/clip-vit-large-patch14", help="OpenFlamingo: the HF CLIP vision tower")
    c.add_argument(
        "--cross-attn-every-n-layers", type=positive_int, help="OpenFlamingo: checked against the checkpoint"
    )

    e = verbs.add_parser("eval", help="few-shot evaluation (or: eval report RESULTS.json ... --out plot.png)")
    e.add_argument("action", nargs="?", choices=["report"], help="report: table and plot of result files")
    e.add_argument("results", nargs="*", help="report: result files")
    e.add_argument("--model", help="an interleaf checkpoint directory or hub id")
    e.add_argument("--task", help="a built-in task name or a task YAML file")
    e.add_argument("--root", type=existing_dir, help="the task's data directory (where its files are)")
    e.add_argument("--shots", type=non_negative_int, nargs="+", default=[0, 4], help="shot counts (default: 0 4)")
    e.add_argument(
        "--demos", choices=["random", "rices"], default="random", help="how demonstrations are chosen (default: random)"
    )
    e.add_argument("--trials", type=positive_int, default=1, help="repeats with other random demonstrations")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=positive_int, default=8, help="queries per batch (results do not change)")
    e.add_argument("--limit", type=positive_int, help="evaluate only the first N queries (default: all)")
    e.add_argument(
        "--rank-chunk-size",
        type=positive_int,
        default=64,
        help="ranking tasks: candidates scored at once (default: 64); peak memory grows with it, not with the "
        "class count; results do not change",
    )
    e.add_argument(
        "--out",
        type=Path,
        help="results JSON (run; finished samples go to OUT.partial*.jsonl first, and a rerun resumes from them) "
        "or plot PNG (report)",
    )
    placement_options(e)

    data = verbs.add_parser("data", help="convert, inspect and generate training data").add_subparsers(
        dest="data_verb", required=True, parser_class=Parser
    )
    dc = data.add_parser("convert", help="a dataset in a known format -> webdataset shards")
    dc.add_argument("format", help="mmc4, obelics, pairs_wds, pairs_parquet, llava, annt")
    dc.add_argument("src", type=existing_path, help="a file or a directory of files in that format")
    dc.add_argument("out", type=Path, help="directory for the shards")
    dc.add_argument("--shard-size", type=positive_int, default=1000, help="documents per shard")
    dc.add_argument("--max-skip-rate", type=fraction, default=0.2, help="fail when more are skipped (0 to 1)")
    dc.add_argument("--image-root", type=existing_dir, help="where the format's image files are")
    dc.add_argument("--part", type=part_spec, metavar="I/N", help="convert only part I (from 0) of N; see README")
    dc.add_argument("--workers", type=positive_int, default=1, help="local processes, each converting a part")
    dc.add_argument("--images", type=existing_dir, help="img2dataset's output folder: bytes for the URL images")
    du = data.add_parser("urls", help="the image URLs of MMC4/OBELICS documents -> img2dataset's input")
    du.add_argument("format", help="mmc4, obelics (any format whose images are URLs)")
    du.add_argument("src", type=existing_path, help="a file or a directory of files in that format")
    du.add_argument("out", type=Path, help="the URL list to write: a .parquet (column url) or a .txt file")
    du.add_argument("--part", type=part_spec, metavar="I/N", help="only the URLs of part I (from 0) of N")
    du.add_argument("--max-skip-rate", type=fraction, default=0.2, help="fail when more are skipped (0 to 1)")
    di = data.add_parser("inspect", help="counts and a few samples of webdataset shards")
    di.add_argument("shards", help="a directory, a glob or a brace pattern of .tar shards")
    di.add_argument("--samples", type=non_negative_int, default=3)
    dt = data.add_parser("tinyworld", help="write the synthetic tiny world in the real formats")
    dt.add_argument("out", type=Path)
    dt.add_argument("--seed", type=int, default=0)
    dt.add_argument("--n-train", type=positive_int, default=2000)
    dt.add_argument("--n-eval", type=positive_int, default=200)
    dt.add_argument("--image-size", type=positive_int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one verb; the exit status: 0, or 2 after one line ``interleaf <verb>: error: ...`` on
    stderr for a bad argument or input (checked before any model is loaded)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # -h, or a bad argument (Parser.error printed the line)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.verb == "demo":
            demo(args.out, args.seed, args.scale, device=args.device, dtype=args.dtype, generate=args.generate)
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
                rank_chunk_size=args.rank_chunk_size,
                out=args.out,
                device=args.device,
                dtype=args.dtype,
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
                    part=args.part,
                    workers=args.workers,
                    images=args.images,
                )
            elif args.data_verb == "urls":
                data_urls(args.format, args.src, args.out, part=args.part, max_skip_rate=args.max_skip_rate)
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
        elif args.verb == "chat":
            chat(
                args.model,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed,
                device=args.device,
                dtype=args.dtype,
            )
        elif args.verb == "serve":
            serve(args.model, args)
        elif args.verb == "generate" and args.interleaved:
            if args.out is None:
                raise ValueError("--interleaved needs --out DIR (where the documents are written)")
            if check_out_dir(args.out, "--out").exists() and any(args.out.iterdir()):
                raise ValueError(f"--out {args.out} is a folder that is not empty; give a new folder")
            unused = [
                f"--{n}"
                for n, v in (("num-beams", args.num_beams != 1), ("stop", args.stop), ("stream", args.stream))
                if v
            ]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} do not apply to --interleaved (greedy or --sample text, then a drawing)"
                )
            generate_interleaved(
                args.model,
                source=args.input,
                prompt=args.prompt,
                images=args.image,
                out=args.out,
                mode=args.mode or "generate_texts",
                num_iter=args.num_iter or 1,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.sample,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=0 if args.seed is None else args.seed,
                guidance_scale=args.guidance_scale,
                image_guidance_scale=args.image_guidance_scale,
                inference_steps=args.inference_steps,
                device=args.device,
                dtype=args.dtype,
            )
        elif args.verb == "generate":
            if args.prompt is None:
                raise ValueError("--prompt is required (or --interleaved with --input)")
            given = [
                f"--{n}"
                for n in (
                    "input",
                    "out",
                    "mode",
                    "num-iter",
                    "guidance-scale",
                    "image-guidance-scale",
                    "inference-steps",
                )
                if getattr(args, n.replace("-", "_")) is not None
            ]
            if given:
                raise ValueError(f"{', '.join(given)}: only with --interleaved")
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
                stop=args.stop,
                stream_output=args.stream,
                device=args.device,
                dtype=args.dtype,
            )
    except (ValueError, MissingExtra) as e:
        verb = f"{args.verb} {args.data_verb}" if args.verb == "data" else args.verb
        print(f"interleaf {verb}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

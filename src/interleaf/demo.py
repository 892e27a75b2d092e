"""``interleaf demo``: the whole recipe in miniature, on a 2-core CPU in minutes.

1. **world**: write the tiny world (training documents in the MMC4 / pairs-parquet / LLaVA
   layouts, held-out evaluation tasks in the COCO / VQAv2 / ImageNet layouts).
2. **backbones**: train a byte-level BPE tokenizer and a small Llama-architecture LM on the
   world's text (pictures written as their captions), and a small CLIP vision tower
   contrastively against captions; both are saved as Hugging Face checkpoints.
3. **Flamingo, stage 1** (pretraining): frozen backbones; the resampler, the gated
   cross-attention and the new token embeddings learn on the world's interleaved documents
   and image-caption pairs, read from their files and written to webdataset shards.
4. **Flamingo, stage 2** (multi-task and in-context documents, LM unfrozen, as InfiMM and
   IDEFICS2 do in their later stages).
5. **few-shot evaluation** of the held-out tasks at 0/2/4/8 shots, with demonstrations chosen
   by RICES (the most similar support images, OpenFlamingo's retrieval) and at random; a
   results table, a plot of score against shots, and a generated answer to an interleaved prompt.

Every stage writes its output under ``--out`` and is skipped when a finished one is found
(training stages resume from their last checkpoint if interrupted). ``--scale`` multiplies the
data and the steps: 0.25 for a quick look, 2 or more for a stronger model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interleaf.config import (
    CrossAttentionConfig,
    FlamingoConfig,
    ImageGenerationConfig,
    LMConfig,
    ResamplerConfig,
    VisionConfig,
)
from interleaf.data import tinyworld
from interleaf.data.collate import CollateConfig
from interleaf.data.formats import read
from interleaf.data.pages import write_interleaved
from interleaf.data.shards import write_shards
from interleaf.eval import drawing
from interleaf.eval.harness import EvalConfig, Prompter, answer_text, evaluate
from interleaf.eval.imagegen import load_classifier, save_classifier, train_classifier
from interleaf.eval.probes import flamingo_induction, lm_induction, ordinary_ids
from interleaf.eval.report import plot, plot_induction, table
from interleaf.eval.rices import Rices
from interleaf.eval.tasks import load_task
from interleaf.model.flamingo import Flamingo
from interleaf.model.placement import process_device
from interleaf.paths import check_out_dir
from interleaf.processing import Processor
from interleaf.train.backbones import (
    LMPretraining,
    VisionPretraining,
    document_text,
    pretrain_lm,
    pretrain_vision,
    scene_pairs,
    train_tokenizer,
)
from interleaf.train.config import DataConfig, OptimConfig, Recipe, SourceConfig, TrainConfig
from interleaf.train.loop import train

TASKS = ("tinyworld_classification", "tinyworld_vqa", "tinyworld_caption")
# mostly long bursty in-context documents (the held-out classification's kind: colours), some of
# every granularity, and the formats of the other tasks kept up
STAGE2_MIX = {"icl_bursty_colour": 0.7, "icl_bursty": 0.1, "task": 0.1, "interleaved": 0.05, "pair": 0.05}
# stage 1's in-context documents, a third source beside the world's interleaved ones and pairs
STAGE1_ICL_MIX = {"icl_bursty_colour": 0.7, "icl_bursty": 0.3}
STAGE1_ICL_WEIGHT = 1.0  # the interleaved and pair sources weigh 1 each
MAX_IMAGES = 16  # pictures per training sequence: 16-shot prompts are in-distribution
DRAW_MIX = {"story": 0.55, "variation": 0.3, "interleaved": 0.15}  # drawing, and reading kept up


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    out: Path = Path("runs/demo")
    seed: int = 0
    scale: float = 1.0  # multiplies documents and steps
    documents: int = 3000  # tiny-world training documents (and as many again for stage 2)
    eval_queries: int = 60  # held-out queries per task
    # copying text first, then a quarter of it beside the world's text: the curriculum that forms
    # induction heads (the probe's phase change, README)
    lm: LMPretraining = field(
        default_factory=lambda: LMPretraining(
            steps=1800, lr=1e-3, probe_every=50, induction_share=0.25, induction_first=1000
        )
    )
    vision: VisionPretraining = field(default_factory=lambda: VisionPretraining(steps=300))
    # With generate the tower must encode shape, for MMFS to copy it: longer, larger batches, and
    # each scene beside its shape-swapped copy (scene_pairs' shape_negatives); see the README
    draw_vision: VisionPretraining = field(default_factory=lambda: VisionPretraining(steps=2000, batch_size=256))
    stage1_steps: int = 300
    stage2_steps: int = 700
    batch_size: int = 16
    shots: tuple[int, ...] = (0, 2, 4, 8)
    demos: tuple[str, ...] = ("rices", "random")
    trials: int = 3  # draws of random demonstrations per shot count (RICES is deterministic: one)
    progress: bool = True
    generate: bool = False  # then learn to draw: stage 3 with and without MMFS, and the drawing evaluation
    draw_steps: int = 2000
    draw_queries: int = 60  # held-out prompts per drawing test
    draw_documents: int = 20  # documents written from a title alone (coherence)
    device: str = "auto"  # the Flamingo stages and the evaluation: auto (a GPU when there is one), cpu, cuda, cuda:N
    dtype: str = "float32"  # bfloat16: frozen weights in bf16 and autocast in training, bf16 weights in evaluation

    def __post_init__(self):
        """Settings checked when made, before any stage runs: a bad one would otherwise stop the
        demo minutes in, at the stage that reads it."""
        object.__setattr__(self, "out", check_out_dir(self.out))  # a string is taken as a path
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a number > 0, got {self.scale!r}")
        if self.trials < 1 or self.documents < 1 or self.eval_queries < 1:
            raise ValueError(
                f"trials, documents and eval_queries must be >= 1, got {self.trials}, "
                f"{self.documents}, {self.eval_queries}"
            )
        if not self.shots or min(self.shots) < 0:
            raise ValueError(f"shots must be one or more shot counts >= 0, got {self.shots}")
        if not self.demos or set(self.demos) - {"random", "rices"}:
            raise ValueError(f"demos must be one or both of 'random' and 'rices', got {self.demos}")

    def scaled(self) -> DemoOptions:
        """The options with documents and steps multiplied by ``scale`` (at least a few each)."""

        def s(n: int, least: int = 4) -> int:
            return max(least, round(n * self.scale))

        return dataclasses.replace(
            self,
            scale=1.0,
            documents=s(self.documents, 40),
            lm=dataclasses.replace(
                self.lm,
                steps=s(self.lm.steps),
                warmup=min(self.lm.warmup, s(self.lm.steps) // 4),
                induction_first=min(s(self.lm.steps), round(self.lm.induction_first * self.scale)),
                probe_every=max(1, round(self.lm.probe_every * self.scale)) if self.lm.probe_every else 0,
            ),
            vision=_scaled_steps(self.vision, s),
            draw_vision=_scaled_steps(self.draw_vision, s),
            stage1_steps=s(self.stage1_steps),
            stage2_steps=s(self.stage2_steps),
            draw_steps=s(self.draw_steps),
        )


def _scaled_steps(cfg: VisionPretraining, s: Callable[[int], int]) -> VisionPretraining:
    return dataclasses.replace(cfg, steps=s(cfg.steps), warmup=min(cfg.warmup, s(cfg.steps) // 4))


class Stages:
    """Runs each stage once: a stage's directory holds ``stage.json`` with the hash of the
    configuration that made it; the same configuration again is skipped."""

    def __init__(self, out: Path):
        self.out = out
        self.times: dict[str, float] = {}
        self.digests: dict[str, str] = {}  # of the stages run so far: a later stage's config includes them

    def run(self, name: str, config: dict[str, Any], make: Callable[[Path], Any]) -> Path:
        where = self.out / name
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        marker = where / "stage.json"
        self.digests[name] = digest
        if marker.exists() and json.loads(marker.read_text()).get("config") == digest:
            print(f"[{name}] done before, skipped ({where})")
            self.times[name] = 0.0
            return where
        print(f"[{name}] ...")
        start = time.perf_counter()
        where.mkdir(parents=True, exist_ok=True)
        record = make(where)  # a stage may return a dict of measurements, kept in its stage.json
        self.times[name] = time.perf_counter() - start
        extra = record if isinstance(record, dict) else {}
        marker.write_text(json.dumps({"config": digest, "seconds": self.times[name], **extra}) + "\n")
        print(f"[{name}] {self.times[name]:.0f}s")
        return where


def run(opts: DemoOptions | None = None) -> dict[str, Any]:
    """Run every stage (skipping finished ones); return the reports, timings and the answer."""
    opts = DemoOptions() if opts is None else opts
    start = time.perf_counter()
    process_device(opts.device)  # a device this machine lacks fails here, before any stage runs
    again = command_line(opts)
    opts = opts.scaled()
    stages = Stages(opts.out)
    world = stages.run("world", _world_config(opts), lambda d: _write_world(d, opts))
    lm_config = {"lm": dataclasses.asdict(opts.lm), "after": stages.digests}
    lm = stages.run("backbones-lm", lm_config, lambda d: _lm(d, opts))
    tower = {**dataclasses.asdict(_tower(opts)), "shape_negatives": opts.generate, "after": stages.digests}
    vision = stages.run("backbones-vision", tower, lambda d: _vision(d, opts, lm))
    stage1 = stages.run(
        "flamingo-stage1",
        {
            **_flamingo_stage(opts, opts.stage1_steps),
            "icl": STAGE1_ICL_MIX,
            "icl_weight": STAGE1_ICL_WEIGHT,
            "after": stages.digests,
        },
        lambda d: _stage1(d, opts, world, lm, vision),
    )
    stage2 = stages.run(
        "flamingo-stage2",
        {**_flamingo_stage(opts, opts.stage2_steps), "mix": STAGE2_MIX, "after": stages.digests},
        lambda d: _stage2(d, opts, world, lm, vision, stage1),
    )
    model_dir = stage2 / "final"
    evaluation = stages.run(
        "eval",
        {"shots": opts.shots, "demos": opts.demos, "trials": opts.trials, "dtype": opts.dtype, "after": stages.digests},
        lambda d: _evaluate(d, opts, model_dir, world),
    )
    reports = [json.loads(p.read_text()) for p in sorted(evaluation.glob("*.json")) if p.name != "stage.json"]

    print("\nfew-shot scores on the held-out tasks (x100; model column: how demonstrations were chosen)\n")
    print(table(reports))
    figure = plot(reports, opts.out / "fewshot.png")
    print(f"\nplot: {figure}")
    probe = lm / "induction.json"
    if probe.exists():
        curve = json.loads(probe.read_text())["curve"]
        curve = plot_induction(curve, opts.out / "induction.png", copying_until=opts.lm.induction_first)
        print(f"the LM's induction probe against its pretraining steps: {curve}")
    answer = {**_showcase(evaluation, world), **_caption(model_dir, world, opts.out / "examples", opts)}
    if opts.generate:
        answer["drawing"] = _drawing_stages(stages, opts, lm, vision, stage2, again)
    seconds = time.perf_counter() - start
    print(f"\ndone in {seconds:.0f}s; stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in stages.times.items()))
    return {"reports": reports, "times": stages.times, "seconds": seconds, "model": model_dir, **answer}


def _world_config(opts: DemoOptions) -> dict[str, Any]:
    return {"seed": opts.seed, "documents": opts.documents, "eval": opts.eval_queries, "version": tinyworld.VERSION}


def _flamingo_stage(opts: DemoOptions, steps: int) -> dict[str, Any]:
    """What a Flamingo stage's output depends on beside its data and the stages before it."""
    model = dataclasses.asdict(flamingo_config(Path("lm"), Path("vision")))
    return {"steps": steps, "batch": opts.batch_size, "dtype": opts.dtype, "model": model, "images": MAX_IMAGES}


def _write_world(where: Path, opts: DemoOptions) -> None:
    tinyworld.write(where, seed=opts.seed, n_train=opts.documents, n_eval=opts.eval_queries, overwrite=True)


def _lm(where: Path, opts: DemoOptions) -> dict[str, Any] | None:

    texts = [document_text(doc) for doc in tinyworld.iter_train_documents(opts.seed, opts.documents)]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    cfg = dataclasses.replace(opts.lm, seed=opts.seed)
    probe = where / "induction.json"
    probe.unlink(missing_ok=True)  # a rerun's own, or none
    losses = pretrain_lm(texts, tokenizer, where, cfg, progress=opts.progress)
    print(f"  LM ({cfg.family}, {cfg.layers}x{cfg.hidden}) loss {losses[0]:.2f} -> {_tail(losses):.2f}")
    if not probe.exists():
        return None
    induction = json.loads(probe.read_text())["final"]
    print(
        f"  induction probe: loss on a repeated random sequence {induction['first']:.2f} (first copy) -> "
        f"{induction['second']:.2f} (second), {100 * induction['ratio']:.0f}%"
    )
    return {"induction": induction}


def _vision(where: Path, opts: DemoOptions, lm: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm)
    cfg = dataclasses.replace(_tower(opts), seed=opts.seed)
    pairs = scene_pairs(opts.seed, cfg.image_size, shape_negatives=opts.generate)
    losses = pretrain_vision(pairs, tokenizer, where, cfg, progress=opts.progress)
    print(f"  CLIP vision ({cfg.layers}x{cfg.hidden}) contrastive loss {losses[0]:.2f} -> {_tail(losses):.2f}")


def _tower(opts: DemoOptions) -> VisionPretraining:
    """The vision pretraining the run uses: the drawing run's tower must encode shape."""
    return opts.draw_vision if opts.generate else opts.vision


def _tail(losses: list[float], n: int = 20) -> float:
    """The mean of the last ``n`` losses; nan for none (a stage that resumed at its last step)."""
    return sum(losses[-n:]) / len(losses[-n:]) if losses else float("nan")


def flamingo_config(lm: Path, vision: Path) -> FlamingoConfig:
    """The demo's Flamingo: cross-attention before every LM layer, a one-layer resampler."""
    return FlamingoConfig(
        lm=LMConfig(source=str(lm)),
        vision=VisionConfig(source=str(vision)),
        # no media-position embeddings (OpenFlamingo's default): an in-context example reads the
        # same wherever it stands in the prompt
        resampler=ResamplerConfig(depth=1, num_latents=8, heads=4, head_dim=16, max_media=0),
        cross_attention=CrossAttentionConfig(interval=1, heads=4, head_dim=16),
    )


def _recipe(
    where: Path, opts: DemoOptions, model: FlamingoConfig, sources: dict[str, SourceConfig], steps: int, lr: float
):
    return Recipe(
        model=model,
        data=DataConfig(
            sources=sources,
            batch_size=opts.batch_size,
            collate=CollateConfig(max_tokens=224, max_images=MAX_IMAGES),
            seed=opts.seed,
        ),
        optim=OptimConfig(lr=lr, warmup_steps=min(30, steps // 4), weight_decay=0.0),
        train=TrainConfig(
            steps=steps,
            out_dir=str(where),
            log_every=max(1, steps // 20),
            checkpoint_every=max(1, steps // 4),
            keep_last=1,
            seed=opts.seed,
            progress=opts.progress,
            device=opts.device,
            dtype=opts.dtype,
            precision="bf16" if opts.dtype == "bfloat16" else "fp32",
        ),
    )


def _stage1(where: Path, opts: DemoOptions, world: Path, lm: Path, vision: Path) -> dict[str, Any]:
    """Frozen backbones; the world's interleaved documents (MMC4 layout) and pairs (parquet)."""

    def write(shards: Path) -> None:
        mmc4 = world / "train" / "mmc4"
        write_shards(read(mmc4, "mmc4", image_root=mmc4 / "images"), shards / "interleaved", max_samples=500)
        write_shards(read(world / "train" / "pairs.parquet", "pairs_parquet"), shards / "pairs", max_samples=500)
        icl = tinyworld.iter_train_documents(opts.seed + 3, opts.documents, mix=STAGE1_ICL_MIX)
        write_shards(icl, shards / "icl", max_samples=500)

    shards = _shards(where / "shards", {"world": _world_config(opts), "icl": STAGE1_ICL_MIX, **_drawn(opts, 3)}, write)
    sources = {
        "interleaved": SourceConfig(shards=str(shards / "interleaved")),
        "pairs": SourceConfig(shards=str(shards / "pairs")),
        "icl": SourceConfig(shards=str(shards / "icl"), weight=STAGE1_ICL_WEIGHT),
    }
    result = train(_recipe(where, opts, flamingo_config(lm, vision), sources, opts.stage1_steps, 1e-3))
    print(f"  loss {result['losses'].get(1, float('nan')):.2f} -> {_tail(list(result['losses'].values())):.2f}")
    return _probes(where / "final", opts, world)


def _stage2(where: Path, opts: DemoOptions, world: Path, lm: Path, vision: Path, stage1: Path) -> dict[str, Any]:
    """From stage 1's weights, the LM unfrozen, on task and in-context documents (a fresh draw of the world)."""

    def write(shards: Path) -> None:
        docs = tinyworld.iter_train_documents(opts.seed + 1, opts.documents, mix=STAGE2_MIX)
        write_shards(docs, shards, max_samples=500)

    shards = _shards(where / "shards", {"mix": STAGE2_MIX, **_drawn(opts, 1)}, write)
    config = flamingo_config(lm, vision)
    config = dataclasses.replace(config, trainable=dataclasses.replace(config.trainable, lm=True))
    recipe = _recipe(where, opts, config, {"mixed": SourceConfig(shards=str(shards))}, opts.stage2_steps, 1e-3)
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, init_from=str(stage1 / "final")))
    result = train(recipe)
    print(f"  loss {result['losses'].get(1, float('nan')):.2f} -> {_tail(list(result['losses'].values())):.2f}")
    return _probes(where / "final", opts, world)


def _shards(where: Path, key: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """``where``, holding the shards ``write`` writes there for ``key``: kept from an earlier run
    (an interrupted stage resumes on them) only when written for the same key."""
    marker = where / "written.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(key)):
        return where
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    write(where)
    marker.write_text(json.dumps(key))
    return where


def _drawn(opts: DemoOptions, offset: int) -> dict[str, Any]:
    """What a stage's own tiny-world documents depend on: the world's version, seed and count."""
    return {"version": tinyworld.VERSION, "seed": opts.seed + offset, "documents": opts.documents}


def _probes(model_dir: Path, opts: DemoOptions, world: Path) -> dict[str, Any]:
    """The induction probes on a stage's model (recorded in its stage.json): its LM on a
    repeated random sequence, and the held-out classification's pictures and words."""
    model, processor = _load(model_dir, opts)
    spec, support, _ = load_task("tinyworld_classification", world)
    lm = lm_induction(model, ordinary_ids(processor.tokenizer), seed=opts.seed)
    pictures = flamingo_induction(model, processor, spec, support, seed=opts.seed)
    same = pictures.get("same_class")  # absent when no class has two support pictures
    print(
        f"  induction probes: LM on a repeated random sequence {lm['first']:.2f} -> {lm['second']:.2f} "
        f"({100 * lm['ratio']:.0f}%); a picture's word first shown {pictures['first']:.2f}, "
        f"at its picture again {pictures['repeat']:.2f} ({100 * pictures['ratio']:.0f}%)"
        + (f", at another picture of its class {same:.2f} ({100 * pictures['same_class_ratio']:.0f}%)" if same else "")
    )
    return {"lm_induction": lm, "picture_induction": pictures}


def _load(model_dir: Path, opts: DemoOptions) -> tuple[Flamingo, Processor]:
    model = Flamingo.from_pretrained(model_dir, device=opts.device, dtype=opts.dtype)
    return model, Processor.from_pretrained(model_dir)


def _evaluate(where: Path, opts: DemoOptions, model_dir: Path, world: Path) -> None:

    for stale in where.glob("*.json"):  # an earlier run's results (other tasks or demos) would show as current
        if stale.name != "stage.json":
            stale.unlink()
    model, processor = _load(model_dir, opts)
    rices = Rices.from_model(model, processor, cache_dir=where / ".rices")
    for task in TASKS:
        spec, support, queries = load_task(task, world)
        for demos in opts.demos:
            trials = opts.trials if demos == "random" else 1
            cfg = EvalConfig(shots=opts.shots, demos=demos, seed=opts.seed, batch_size=16, trials=trials)
            evaluate(
                model,
                processor,
                spec,
                support,
                queries,
                cfg,
                model_name=f"{demos} demos",
                out=where / f"{task}-{demos}.json",
                rices=rices,
                progress=opts.progress,
            )


def _showcase(evaluation: Path, world: Path, *, shots: int = 4, classes: int = 3) -> dict[str, Any]:
    """Answers of the held-out classification shown by a fixed rule, not chosen for being right:
    from the evaluation's random-demonstration results at ``shots`` (or the most shots evaluated
    below it), first trial, the first query of each of the first ``classes`` classes (queries
    come sorted by class), printed as they came out beside the accuracy of that run."""
    task = "tinyworld_classification"
    found = [p for p in (evaluation / f"{task}-{demos}.json" for demos in ("random", "rices")) if p.exists()]
    if not found:
        return {}
    report = json.loads(found[0].read_text())
    runs = [r for r in report["results"] if r["trial"] == 0]
    below = [r for r in runs if r["shots"] <= shots]
    run_ = max(below, key=lambda r: r["shots"]) if below else min(runs, key=lambda r: r["shots"])
    _, _, queries = load_task(task, world)
    expected = {q.id: q.answers[0] for q in queries}
    manifest = json.loads((world / "manifest.json").read_text())["classification"]
    colour = dict(zip(manifest["classnames"], manifest["bound_to_colours"]))
    picked, seen = [], set()
    for sample in run_["samples"]:
        if expected[sample["id"]] not in seen and len(seen) < classes:
            seen.add(expected[sample["id"]])
            picked.append(sample)
    shown_class = {True: [0, 0], False: [0, 0]}  # whether a demonstration shows the class: [right, all]
    for sample in run_["samples"]:
        want = expected[sample["id"]]
        tally = shown_class[want in _classes(sample)]
        tally[0] += sample["answer"] == want
        tally[1] += 1
    (right, shown), (guessed, unshown) = shown_class[True], shown_class[False]
    print(
        f"\nheld-out classification, {report['model']}, {run_['shots']}-shot, first trial: accuracy "
        f"{100 * run_['score']:.1f}%; {100 * right / max(1, shown):.1f}% of the {shown} queries whose class a "
        f"demonstration shows, {100 * guessed / max(1, unshown):.1f}% of the {unshown} others.\n"
        f"The first query of each of the first {classes} classes, as they came out:"
    )
    examples = []
    for sample in picked:
        demos = _classes(sample)
        want = expected[sample["id"]]
        shown = " ".join(f"<image: {tinyworld.article(colour[d])} {colour[d]} shape>Output: {d}" for d in demos)
        verdict = "right" if sample["answer"] == want else "wrong"
        query = f"<image: {tinyworld.article(colour[want])} {colour[want]} shape>Output:"
        present = (
            f"{demos.count(want)} of the demonstrations show its colour" if want in demos else "none shows its colour"
        )
        print(f"  {shown} {query} -> {sample['answer']!r} (expected {want!r}, {verdict}; {present})")
        examples.append({"demos": demos, "answer": sample["answer"], "expected": want})
    return {"answer": examples[0]["answer"], "expected": examples[0]["expected"], "examples": examples}


def _classes(sample: dict[str, Any]) -> list[str]:
    """The classes of a classification sample's demonstrations (their ids are <split>/<class>/<file>)."""
    return [d.split("/")[-2] for d in sample["demos"]]


def _caption(model_dir: Path, world: Path, examples: Path, opts: DemoOptions) -> dict[str, Any]:
    """A caption generated for a picture of a held-out colour+shape combination (the first query
    of the held-out captioning task, after its first two support pictures), whose pictures are
    written to ``examples`` with the ``interleaf generate`` command that answers the same prompt."""
    model, processor = _load(model_dir, opts)
    spec, support, queries = load_task("tinyworld_caption", world)
    prompt, images = Prompter(spec, processor).build(queries[0], support[:2], text_only=False)
    settings = {"max_new_tokens": spec.max_new_tokens, "num_beams": spec.num_beams, "stop_strings": spec.stop_strings}
    out = model.generate(**processor(prompt, images=images), **settings)
    caption = answer_text(processor.batch_decode(out, skip_special_tokens=True)[0], spec)
    examples.mkdir(parents=True, exist_ok=True)
    files = [examples / name for name in ("caption-demo-1.png", "caption-demo-2.png", "caption-query.png")]
    for image, file in zip(images, files):
        image.save(file)
    command = [
        "interleaf generate",
        f"--model {model_dir}",
        f"--prompt {shlex.quote(prompt)}",
        *(f"--image {file}" for file in files),
        f"--num-beams {spec.num_beams} --max-new-tokens {spec.max_new_tokens}",
        *(f"--stop {shlex.quote(stop)}" for stop in spec.stop_strings),
        *([f"--dtype {opts.dtype}"] if opts.dtype != "float32" else []),
    ]
    print(f"\nprompt: {prompt}")
    print(f"generated caption: {caption!r}; a reference: {queries[0].answers[0]!r}")
    print("the same prompt from the command line: " + " ".join(command))
    return {"caption": caption, "command": " ".join(command)}


# ---------------------------------------------------------------------------------------------
# Drawing (interleaf demo --generate): MM-Interleaved's image generation on the tiny world


def draw_config(lm: Path, vision: Path, *, mmfs: bool = True) -> FlamingoConfig:
    """The demo's Flamingo with an image decoder: a pixel-space UNet at 32x32 conditioned on 8
    vectors from the LM's states and the 16 latest tokens (and, with ``mmfs``, on the earlier
    pictures' patch grids and their own pixels folded 2 x 2, spatially aligned, and the patches'
    mean in the pooled condition: see the README); the LM frozen (stage 2
    trained it), the new token, the resampler and the cross-attention train with it."""
    base = flamingo_config(lm, vision)
    earlier = {}
    if mmfs:  # the settings measured best (README, What it learns)
        earlier = dict(mmfs_features="patches", mmfs_attention="aligned", mmfs_pooled=True, mmfs_pixels=16)
        earlier.update(mmfs_gate="text", image_dropout=0.15)
    return dataclasses.replace(
        base,
        tokens=dataclasses.replace(base.tokens, begin_of_image=tinyworld.BEGIN_OF_IMAGE),
        image_generation=ImageGenerationConfig(mmfs=mmfs, num_conditions=8, condition_dim=64, **earlier),
    )


def command_line(opts: DemoOptions) -> str:
    """The ``interleaf demo`` command that runs (or, its stages finished, reuses) ``opts``: the
    options the command line can set, where they differ from the defaults."""
    words = ["interleaf", "demo", *(["--generate"] if opts.generate else []), "--out", str(opts.out)]
    default = DemoOptions()
    for flag, name in (("--seed", "seed"), ("--scale", "scale"), ("--device", "device"), ("--dtype", "dtype")):
        if getattr(opts, name) != getattr(default, name):
            words += [flag, str(getattr(opts, name))]
    return " ".join(shlex.quote(w) for w in words)


def _drawing_stages(
    stages: Stages, opts: DemoOptions, lm: Path, vision: Path, stage2: Path, again: str
) -> dict[str, Any]:
    """Stage 3 twice (with and without MMFS, from stage 2), the attribute classifier, and the
    drawing evaluation; prints the table and writes the picture grid and the written documents."""
    after = dict(stages.digests)
    shards = opts.out / "draw-shards"
    config = {"steps": opts.draw_steps, "batch": opts.batch_size, "dtype": opts.dtype, "after": after}
    runs = {
        name: stages.run(
            f"flamingo-draw{suffix}",
            {**config, "mmfs": mmfs},
            lambda d, mmfs=mmfs: _draw_stage(d, opts, shards, lm, vision, stage2, mmfs),
        )
        for name, suffix, mmfs in (("mmfs", "", True), ("no mmfs", "-nommfs", False))
    }
    classifier = stages.run("draw-classifier", {"seed": opts.seed}, lambda d: _classifier(d, opts))
    evaluation = stages.run(
        "draw-eval",
        {"queries": opts.draw_queries, "documents": opts.draw_documents, "after": dict(stages.digests)},
        lambda d: _draw_eval(d, opts, runs, classifier),
    )
    result = json.loads((evaluation / "drawing.json").read_text())
    print("\ndrawing, read by an attribute classifier (% of pictures with the attribute asked for)\n")
    print((evaluation / "table.md").read_text())
    print(f"\npictures: {evaluation / 'drawings.png'}, same-shape.png (without MMFS: *-nommfs.png)")
    print(f"the table again (each finished stage is reused): {again}")
    print(f"written documents: {evaluation / 'documents' / 'index.html'}")
    return result


def _draw_stage(where: Path, opts: DemoOptions, shards: Path, lm: Path, vision: Path, stage2: Path, mmfs: bool) -> None:
    """From stage 2's weights: documents that teach drawing (a caption, then its picture; a
    picture, then "the same shape in blue.", then that picture) and interleaved ones."""

    def write(shards: Path) -> None:
        write_shards(
            tinyworld.iter_train_documents(opts.seed + 2, opts.documents, mix=DRAW_MIX), shards, max_samples=500
        )

    _shards(shards, {"mix": DRAW_MIX, **_drawn(opts, 2)}, write)
    result = train(draw_recipe(where, opts, draw_config(lm, vision, mmfs=mmfs), shards, stage2))
    print(f"  loss {result['losses'].get(1, float('nan')):.2f} -> {_tail(list(result['losses'].values())):.2f}")


def draw_recipe(where: Path, opts: DemoOptions, config: FlamingoConfig, shards: Path, stage2: Path) -> Recipe:
    """The demo's stage 3 (``opts.draw_steps`` steps at lr 1e-3 on the drawing documents in
    ``shards``, from stage 2's final weights) for a model ``config``, written under ``where``."""
    sources = {"draw": SourceConfig(shards=str(shards))}
    recipe = _recipe(where, opts, config, sources, opts.draw_steps, 1e-3)
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, init_from=str(stage2 / "final")))


def _classifier(where: Path, opts: DemoOptions) -> None:
    save_classifier(train_classifier(seed=opts.seed, progress=opts.progress), where / "classifier")


def _draw_eval(where: Path, opts: DemoOptions, runs: dict[str, Path], classifier_dir: Path) -> None:
    classifier = load_classifier(classifier_dir / "classifier")
    results: dict[str, Any] = {}
    tables = []
    for name, run_dir in runs.items():
        model, processor = _load(run_dir / "final", opts)
        scores = drawing.drawing_scores(model, processor, classifier, seed=opts.seed, n=opts.draw_queries)
        coherent = None
        prompts, images = scores["images"]["prompts"]
        suffix = "" if name == "mmfs" else "-nommfs"
        drawing.grid([" ".join(p.prompt) for p in prompts[:18]], images[:18], where / f"drawings{suffix}.png")
        drawing.variation_grid(*scores["images"]["same_shape"], where / f"same-shape{suffix}.png")
        if name == "mmfs":
            coherent = drawing.coherence(model, processor, classifier, seed=opts.seed, documents=opts.draw_documents)
            write_interleaved([(f"story-{i}", d) for i, d in enumerate(coherent.pop("documents"))], where / "documents")
        scores.pop("images")
        results[name] = {"scores": scores, "coherence": coherent}
        tables.append(f"{name}:\n\n" + drawing.table(scores, coherent))
    (where / "drawing.json").write_text(json.dumps(results, indent=2) + "\n")
    (where / "table.md").write_text("\n\n".join(tables) + "\n")

"""The one evaluation harness: few-shot prompts with images in the demonstrations, answers
by generation or by ranking candidates, reference-exact metrics, resumable results.

Conventions (Flamingo, OpenFlamingo): demonstrations are drawn per query (by seed, or by
RICES with the most similar last); "0-shot" shows two text-only demonstrations (their
images removed) so that the model sees the answer format; several trials give a mean and a
standard deviation. Ranking scores each candidate answer by its length-normalised
log-likelihood after the prompt, with the prompt encoded once and its KV cache shared by all
candidates.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

import interleaf
from interleaf.eval import distributed
from interleaf.eval.ranking import DEFAULT_CHUNK_SIZE, rank_candidates
from interleaf.eval.scoring import score_task
from interleaf.eval.task import Example, TaskSpec
from interleaf.generation import trim_at_stop

ZERO_SHOT_TEXT_DEMOS = 2


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    shots: tuple[int, ...] = (0, 4)
    demos: str = "random"  # or "rices"
    trials: int = 1
    seed: int = 0
    batch_size: int = 8
    limit: int | None = None  # evaluate only the first `limit` queries
    rank_chunk_size: int = DEFAULT_CHUNK_SIZE  # ranking: candidates scored at once (bounds the memory)

    def __post_init__(self):
        if self.demos not in ("random", "rices"):
            raise ValueError(f"demos must be 'random' or 'rices', got {self.demos!r}")
        if not self.shots or any(k < 0 for k in self.shots):
            raise ValueError(f"EvalConfig.shots must be one or more shot counts >= 0, got {list(self.shots)}")
        for name in ("trials", "batch_size", "rank_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig.limit must be >= 1 (or None: all queries), got {self.limit}")


NOT_IN_HASH = ("batch_size", "rank_chunk_size")  # they change no result (tested), only speed and memory


def config_hash(spec: TaskSpec, cfg: EvalConfig, model_name: str, dtype: str = "") -> str:
    """What identifies a run's results: the task, the settings that change them, the model and
    its dtype. A partial file resumes only a run of the same hash."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_HASH}
    blob = {"task": asdict(spec), "eval": settings, "model": model_name}
    if dtype:
        blob["dtype"] = dtype
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Prompter:
    """Builds the prompt and images of one query with its demonstrations."""

    def __init__(self, spec: TaskSpec, processor):
        self.spec = spec
        eoc = processor.tokens.end_of_chunk
        self.chunk_end = eoc if eoc is not None else "\n"  # IDEFICS has no end-of-chunk token

    def _text(self, text: str) -> str:
        return text.replace("<|endofchunk|>", self.chunk_end)

    def build(self, query: Example, demos: Sequence[Example], *, text_only: bool) -> tuple[str, list]:
        parts, images = [], []
        for demo in demos:
            parts.append(self._text(self.spec.demonstration(demo, image=not text_only)))
            if not text_only:
                images.append(demo.image)
        parts.append(self.spec.query_text(query))
        images.append(query.image)
        return "".join(parts), [ref.load() for ref in images]


def choose_demos(
    support: Sequence[Example], query_index: int, shots: int, *, seed: int, ranked: Sequence[int] | None = None
) -> tuple[list[Example], bool]:
    """The demonstrations of one query, and whether they are text-only (0-shot).

    Random: a sample seeded by (seed, query index), so a query's demonstrations do not depend
    on the batch it is in. RICES: ``ranked`` support indices, most similar first; they are
    used most similar last.
    """
    count, text_only = (ZERO_SHOT_TEXT_DEMOS, True) if shots == 0 else (shots, False)
    if count > len(support):
        raise ValueError(f"{shots}-shot needs {count} demonstrations, the support set has {len(support)}")
    if ranked is not None and not text_only:
        return [support[i] for i in reversed(ranked[:count])], False
    rng = random.Random(seed * 1_000_003 + query_index)
    return rng.sample(list(support), count), text_only


def answer_text(raw: str, spec: TaskSpec) -> str:
    """The answer part of a generation: cut at the first stop string, stripped."""
    return trim_at_stop(raw, (*spec.stop_strings, "<|endofchunk|>", "\n")).strip()


def batch_to(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device``; its other values (``image_keys``) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_model(model, batch) -> dict:
    """The processor's tensors on the model's device (the processor works on the CPU)."""
    return batch_to(batch, model.device)  # where token inputs go (the first block of a model over several GPUs)


def evaluate(
    model,
    processor,
    spec: TaskSpec,
    support: Sequence[Example],
    queries: Sequence[Example],
    cfg: EvalConfig,
    *,
    model_name: str = "",
    out: str | Path | None = None,
    rices=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``queries`` at every shot count and trial; returns (and writes to ``out``)
    the results. With ``out``, finished samples are appended to ``out + '.partial.jsonl'`` as
    they come, and a rerun after a crash skips them.

    In a process group (``torchrun``; see :mod:`interleaf.eval.distributed`) each rank runs
    every N-th query and appends to its own ``.partial.rankR.jsonl``; the samples are gathered
    after each shot count, every rank returns the whole report and rank 0 writes ``out``."""
    from tqdm import tqdm

    ranks = distributed.current()
    queries = list(queries)[: cfg.limit] if cfg.limit else list(queries)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    digest = config_hash(spec, cfg, model_name, dtype)
    done = _load_partial(out, digest)
    if done and ranks.main:
        count = sum(len(samples) for samples in done.values())
        print(f"eval {spec.name}: resuming: {count} finished samples read from {out}.partial*", file=sys.stderr)
    prompter = Prompter(spec, processor)
    ranked = rices.rank(queries, support, k=max(cfg.shots)) if (rices is not None and cfg.demos == "rices") else None
    runs = [(k, t) for t in range(cfg.trials) for k in cfg.shots]
    mine = [i for i in range(len(queries)) if ranks.mine(i)]
    share = f" (rank 0's share, {ranks.world_size} processes)" if ranks.world_size > 1 else ""
    bar = tqdm(total=len(runs) * len(mine), desc=f"eval {spec.name}{share}", disable=not (progress and ranks.main))
    results = []
    for shots, trial in runs:
        samples = done.get((shots, trial), {})
        todo = [i for i in mine if queries[i].id not in samples]
        bar.update(len(mine) - len(todo))
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            for sample in _run_batch(
                model, processor, spec, prompter, support, queries, chunk, shots, trial, cfg, ranked
            ):
                samples[sample["id"]] = sample
                _append_partial(out, digest, shots, trial, sample, ranks)
            bar.update(len(chunk))
        samples = distributed.gather(samples, ranks)
        ordered = [samples[q.id] for q in queries]
        results.append(
            {"shots": shots, "trial": trial, "score": score_task(spec, queries, ordered), "samples": ordered}
        )
    bar.close()
    report = _report(spec, cfg, digest, model_name, results)
    report["config"]["model"] = {"dtype": dtype, "device": str(getattr(model, "device", ""))}
    if out is not None:
        distributed.barrier(ranks)  # every rank is past its partial file
        if ranks.main:
            Path(out).write_text(json.dumps(report, indent=1))
            for partial in _partial_paths(out):
                partial.unlink(missing_ok=True)
        distributed.barrier(ranks)
    return report


def _run_batch(model, processor, spec, prompter, support, queries, chunk, shots, trial, cfg, ranked) -> list[dict]:
    seed = cfg.seed + 7919 * trial
    built = []
    for i in chunk:
        demos, text_only = choose_demos(support, i, shots, seed=seed, ranked=None if ranked is None else ranked[i])
        prompt, images = prompter.build(queries[i], demos, text_only=text_only)
        built.append((queries[i], demos, prompt, images))
    if spec.answer_mode == "rank":
        cands = [list(spec.fixed_candidates) if spec.candidates == "fixed" else list(q.options) for q, *_ in built]
        texts = [[spec.answer_prefix + c for c in cs] for cs in cands]
        prompts, images = [b[2] for b in built], [b[3] for b in built]
        scores = rank_candidates(model, processor, prompts, images, texts, chunk_size=cfg.rank_chunk_size)
        return [
            _sample(q, demos, prompt, raw=None, answer=c[max(range(len(c)), key=s.__getitem__)], scores=dict(zip(c, s)))
            for (q, demos, prompt, _), c, s in zip(built, cands, scores)
        ]
    batch = to_model(model, processor([b[2] for b in built], images=[b[3] for b in built]))
    ids = model.generate(
        **batch,
        max_new_tokens=spec.max_new_tokens,
        num_beams=spec.num_beams,
        length_penalty=spec.length_penalty,
        stop_strings=spec.stop_strings,
    )
    raws = processor.batch_decode(ids, skip_special_tokens=True)
    return [
        _sample(q, demos, prompt, raw=raw, answer=answer_text(raw, spec))
        for (q, demos, prompt, _), raw in zip(built, raws)
    ]


def _sample(query: Example, demos, prompt: str, *, raw, answer: str, scores=None) -> dict:
    sample = {"id": query.id, "demos": [d.id for d in demos], "prompt": prompt, "raw": raw, "answer": answer}
    if scores is not None:
        sample["scores"] = scores
    return sample


def _partial_path(out: str | Path, ranks: distributed.Ranks | None = None) -> Path:
    if ranks is None or ranks.world_size == 1:
        return Path(f"{out}.partial.jsonl")
    return Path(f"{out}.partial.rank{ranks.rank}.jsonl")


def _partial_paths(out: str | Path) -> list[Path]:
    """The partial files of ``out``: one process's and each rank's (a resumed run reads all)."""
    out = Path(out)
    return sorted(out.parent.glob(f"{out.name}.partial.jsonl")) + sorted(
        out.parent.glob(f"{out.name}.partial.rank*.jsonl")
    )


def _load_partial(out, digest: str) -> dict[tuple[int, int], dict[str, dict]]:
    done: dict[tuple[int, int], dict[str, dict]] = {}
    if out is None:
        return done
    lines = [line for path in _partial_paths(out) for line in path.read_text().splitlines()]
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the crash
        if row.get("config_hash") == digest:
            done.setdefault((row["shots"], row["trial"]), {})[row["sample"]["id"]] = row["sample"]
    return done


def _append_partial(out, digest: str, shots: int, trial: int, sample: dict, ranks: distributed.Ranks) -> None:
    if out is None:
        return
    with _partial_path(out, ranks).open("a") as f:
        f.write(json.dumps({"config_hash": digest, "shots": shots, "trial": trial, "sample": sample}) + "\n")


def _report(spec: TaskSpec, cfg: EvalConfig, digest: str, model_name: str, results: list[dict]) -> dict:
    summary = {}
    for shots in cfg.shots:
        values = [r["score"] for r in results if r["shots"] == shots]
        summary[str(shots)] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "trials": values,
        }
    return {
        "task": spec.name,
        "metric": spec.metric,
        "model": model_name,
        "config": {"task": asdict(spec), "eval": asdict(cfg)},
        "config_hash": digest,
        "zero_shot": f"{ZERO_SHOT_TEXT_DEMOS} text-only demonstrations (OpenFlamingo's convention)",
        "versions": {
            "interleaf": interleaf.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "summary": summary,
        "results": results,
    }

"""``interleaf data convert``: a dataset in a known format -> webdataset shards, as one job, as one
part of N independent jobs, or as parts run by local worker processes; URL images optionally
joined from an img2dataset download (:mod:`interleaf.data.downloads`).

Shards in OUT, by how the conversion runs (the split itself: :mod:`interleaf.data.parts`):

==============================  ==================================================================
one job                         ``shard-000000.tar``, ``shard-000001.tar``, ...
``--part I/N``                  ``part-0000I-of-0000N-000000.tar``, ... (keys ``part-...-000000012``)
``--workers K``                 parts ``0/K`` .. ``K-1/K``: the very shards K runs of ``--part k/K`` write
``--part I/N --workers K``      ``part-0000I-of-0000N-w00k-of-00K-000000.tar``, ...
==============================  ==================================================================

Each job writes into a hidden staging folder inside OUT (``.part-00003-of-00008.staging``) and,
once the whole run has succeeded, replaces the shards that an earlier run wrote for the same part
by its own: readers never see half a part, a rerun of a part (a retried array task) replaces it
rather than adding to it, and a failed run leaves nothing behind. OUT may hold the shards of
sibling parts (of the same N) but no other ``.tar``: their documents would mix with these.

A job checks its own records: the skip ceiling (``max_skip_rate``) applies to each part, and a
part that reads records but writes no document fails as a one-job run would. A part that holds no
record (more parts than records) writes nothing and says so. With ``workers``, that last check is
made on the workers' totals, so ``--workers K`` fails exactly when the one-job run fails.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .downloads import Downloads, ImageCounts, check_folder
from .formats import READERS, input_files, read
from .parts import Part, describe
from .schema import DataError, SkipCounter
from .shards import write_shards


@dataclass(frozen=True)
class Job:
    """One writer: the whole input (``part`` None) or one part of it."""

    fmt: str
    src: Path
    out: Path
    part: Part | None
    shard_size: int
    max_skip_rate: float
    image_root: Path | None
    images: Path | None

    @property
    def prefix(self) -> str:
        return "shard" if self.part is None else self.part.name

    @property
    def staging(self) -> Path:
        return self.out / f".{self.prefix}.staging"


@dataclass
class PartResult:
    """What one job read and wrote."""

    part: Part | None
    shards: list[Path]
    reading: SkipCounter
    writing: SkipCounter
    images: ImageCounts | None

    @property
    def documents(self) -> int:
        return self.writing.seen - sum(self.writing.skipped.values())


@dataclass
class Conversion:
    """The outcome of :func:`convert`: each job's result and one summary line a job (and a total)."""

    results: list[PartResult]
    lines: list[str]

    @property
    def shards(self) -> list[Path]:
        return [shard for result in self.results for shard in result.shards]

    @property
    def documents(self) -> int:
        return sum(result.documents for result in self.results)


def convert(
    fmt: str,
    src: str | Path,
    out: str | Path,
    *,
    part: Part | None = None,
    workers: int = 1,
    shard_size: int = 1000,
    max_skip_rate: float = 0.2,
    image_root: str | Path | None = None,
    images: str | Path | None = None,
) -> Conversion:
    """Convert ``src`` (format ``fmt``) into shards in ``out``: all of it, or ``part``; in
    ``workers`` local processes, each writing a part (of ``part``, or of the whole input); URL
    images joined from the img2dataset output folder ``images``. Bad input is a ``ValueError``
    naming the file, the format and the skip reasons."""
    src, out = Path(src), Path(out)
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r}; known formats: {', '.join(READERS)}")
    if not src.exists():
        raise ValueError(f"src {src}: no such file or directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out}: not a directory (the shards' directory)")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if image_root is not None and images is not None:
        raise ValueError("give either --image-root (local image files) or --images (img2dataset's output), not both")
    if images is not None:
        check_folder(Path(images))
    if workers == 1:
        parts = [part]
    else:
        parts = part.split(workers) if part is not None else [Part(k, workers) for k in range(workers)]
    jobs = [
        Job(
            fmt,
            src,
            out,
            p,
            shard_size,
            max_skip_rate,
            None if image_root is None else Path(image_root),
            None if images is None else Path(images),
        )
        for p in parts
    ]
    _refuse_foreign_shards(out, jobs[0].part)
    created = not out.exists()
    try:
        results = _run(jobs)
        lines = _check_and_describe(jobs, results, part)
        _publish(jobs, results)
    except BaseException:
        for job in jobs:
            shutil.rmtree(job.staging, ignore_errors=True)
        _remove_if_empty(out, created)
        raise
    _remove_if_empty(out, created)  # a part that holds no record
    return Conversion(results, lines)


def run_job(job: Job) -> PartResult:
    """Read, join and write one job's documents into its staging folder; bad input is a
    ``ValueError`` (the staging folder then removed)."""
    shutil.rmtree(job.staging, ignore_errors=True)  # what a killed run of this part left
    reading = SkipCounter(max_skip_rate=job.max_skip_rate)
    writing = SkipCounter(max_skip_rate=job.max_skip_rate)
    options: dict = {} if job.image_root is None else {"image_root": job.image_root}
    if job.part is not None:
        options["part"] = job.part
    try:
        downloads = Downloads(job.images) if job.images is not None else None
        docs = read(job.src, job.fmt, counter=reading, **options)
        if downloads is not None:
            docs = downloads.join(docs, writing)
        key_prefix = "" if job.part is None else f"{job.prefix}-"
        shards = write_shards(
            docs, job.staging, prefix=job.prefix, max_samples=job.shard_size, counter=writing, key_prefix=key_prefix
        )
    except (FileNotFoundError, DataError, ValueError) as e:
        shutil.rmtree(job.staging, ignore_errors=True)
        if isinstance(e, FileNotFoundError):  # a directory without files of the format
            raise ValueError(f"{job.fmt}: {e}") from None
        if isinstance(e, DataError):  # too many skips: the counter's verdict
            raise ValueError(f"{job.src} ({job.fmt}): {e}") from None
        raise
    except BaseException:
        shutil.rmtree(job.staging, ignore_errors=True)
        raise
    return PartResult(job.part, shards, reading, writing, None if downloads is None else downloads.counts)


def merged(counters: list[SkipCounter]) -> SkipCounter:
    """One counter holding the counts of ``counters`` (the first example of each reason)."""
    total = SkipCounter(max_skip_rate=1.0)
    for counter in counters:
        total.seen += counter.seen
        total.skipped.update(counter.skipped)
        for reason, example in counter.examples.items():
            total.examples.setdefault(reason, example)
    return total


def _run(jobs: list[Job]) -> list[PartResult]:
    if len(jobs) == 1:
        return [run_job(jobs[0])]
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=_context()) as pool:
        outcomes = list(pool.map(_run_in_worker, jobs))
    failed = [(job, outcome) for job, outcome in zip(jobs, outcomes) if isinstance(outcome, str)]
    if failed:
        job, message = failed[0]
        more = f" ({len(failed) - 1} more worker(s) failed too)" if len(failed) > 1 else ""
        raise ValueError(f"part {job.part}: {message}{more}")
    return outcomes


def _context() -> multiprocessing.context.BaseContext:
    """Workers start from a fork server that has imported this module once (a fork of the
    caller, which may hold threads, is not safe; a spawn per worker imports everything again)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _run_in_worker(job: Job) -> PartResult | str:
    """:func:`run_job` in a worker process; bad input comes back as its message."""
    try:
        return run_job(job)
    except ValueError as e:
        return str(e)


def _check_and_describe(jobs: list[Job], results: list[PartResult], part: Part | None) -> list[str]:
    """The summary lines (one a part, and the total of the workers); a ``ValueError`` when the
    run wrote no document and should have."""
    job = jobs[0]
    reading = merged([r.reading for r in results])
    writing = merged([r.writing for r in results])
    documents = sum(r.documents for r in results)
    if documents == 0 and not (part is not None and reading.seen == 0):
        if reading.seen == sum(reading.skipped.values()):
            raise ValueError(
                f"{job.src}: no usable {job.fmt} document read (is it in the {job.fmt} format?): {reading.report()}"
            )
        raise ValueError(f"{job.src}: wrote no {job.fmt} document to {job.out}: {writing.report()}")
    if job.part is None:
        return [_summary(job, results[0])]
    files = input_files(job.src, job.fmt)
    lines = [_line(j, r, files) for j, r in zip(jobs, results)]
    if len(results) > 1:
        images = None
        if job.images is not None:
            images = ImageCounts()
            for result in results:
                images.merge(result.images)
        total = PartResult(None, [s for r in results for s in r.shards], reading, writing, images)
        whole = "the whole input" if part is None else f"part {part}"
        lines.append(f"{whole} by {len(results)} workers: {_summary(job, total)}")
    return lines


def _line(job: Job, result: PartResult, files: list[Path]) -> str:
    split = describe(job.part, files)
    if result.reading.seen == 0:
        return f"part {job.part}: holds no record ({split}); wrote nothing"
    return f"part {job.part} ({split}): {_summary(job, result, f' as {job.prefix}-*.tar')}"


def _summary(job: Job, result: PartResult, naming: str = "") -> str:
    text = (
        f"wrote {len(result.shards)} shards ({result.documents} documents) to {job.out}{naming}; "
        f"read: {result.reading.report()}; checked before writing: {result.writing.report()}"
    )
    if result.images is not None:
        text += f"; images from {job.images}: {result.images.report()}"
    return text


def _publish(jobs: list[Job], results: list[PartResult]) -> None:
    """Replace the shards of the jobs' parts (an earlier run's) by the staged ones."""
    owners = {"shard" if job.part is None else job.part.top.name for job in jobs}
    out = jobs[0].out
    for owner in owners:
        for stale in out.glob(f"{owner}-*.tar"):
            stale.unlink()
    for job, result in zip(jobs, results):
        placed = []
        for shard in result.shards:
            placed.append(shard.replace(out / shard.name))
        result.shards = placed
        shutil.rmtree(job.staging, ignore_errors=True)


def _remove_if_empty(out: Path, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):  # only when empty: other parts may be writing here
            out.rmdir()


def _refuse_foreign_shards(out: Path, part: Part | None) -> None:
    """OUT may hold earlier shards of this layout (replaced when this run succeeds) and the
    shards of sibling parts, but no other ``.tar`` file."""
    if not out.is_dir():
        return
    ours = re.compile(r"shard-.*\.tar" if part is None else rf"part-\d+-of-0*{part.top.count}-.*\.tar")
    foreign = sorted(p.name for p in out.glob("*.tar") if not ours.fullmatch(p.name))
    if foreign:
        layout = "shard-*.tar" if part is None else f"part-*-of-{part.top.count:05d}-*.tar"
        raise ValueError(
            f"{out} already holds {len(foreign)} .tar file(s) of another layout than {layout} "
            f"(e.g. {foreign[0]}); their documents would mix with these: remove them or choose another OUT"
        )

"""Results of evaluation runs: a summary table for the terminal, score-versus-shots plots."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def load(paths: Sequence[str | Path], *, on_other: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The evaluation results in ``paths`` (JSON files written by the harness).

    A file that cannot be read as JSON is an error naming it. A JSON file that is not an
    evaluation result (e.g. a demo's ``stage.json`` beside the results) is an error too, unless
    ``on_other`` is given: then it is skipped and ``on_other`` gets a note naming it.
    """
    reports = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path}: cannot read evaluation results: {' '.join(str(e).split())}") from None
        problem = _not_a_result(data)
        if problem is None:
            reports.append(data)
        elif on_other is None:
            raise ValueError(f"{path}: not an interleaf evaluation result ({problem})")
        else:
            on_other(f"{path}: not an interleaf evaluation result ({problem}); skipped")
    return reports


def _not_a_result(data: Any) -> str | None:
    """Why ``data`` is not an evaluation result the table and plot can show; None when it is one."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    if "summary" not in data:
        return "no 'summary'"
    if not isinstance(data["summary"], dict) or not all(
        isinstance(s, dict) and {"mean", "std"} <= set(s) for s in data["summary"].values()
    ):
        return "its 'summary' is not a mapping of shots to mean and std"
    missing = [key for key in ("task", "metric") if key not in data]
    if missing:
        return f"no {missing[0]!r}"
    return None


def demos(report: dict[str, Any]) -> str | None:
    """How the demonstrations of a result were chosen (``random`` or ``rices``), as it records."""
    config = report.get("config")
    evaluation = config.get("eval") if isinstance(config, dict) else None
    value = evaluation.get("demos") if isinstance(evaluation, dict) else None
    return value if isinstance(value, str) else None


def label(report: dict[str, Any]) -> str:
    """The model of a result and how its demonstrations were chosen: ``<model> (rices demos)``."""
    model = report.get("model") or "-"
    chosen = demos(report)
    if chosen is None or f"{chosen} demos" in model:
        return model
    return f"{model} ({chosen} demos)"


def table(reports: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per (model and demonstrations, task), one column per shot count,
    mean ± std."""
    shots = sorted({int(k) for r in reports for k in r["summary"]})
    lines = [
        "| model | task | metric | " + " | ".join(f"{k}-shot" for k in shots) + " |",
        "|---|---|---|" + "---|" * len(shots),
    ]
    for r in reports:
        cells = []
        for k in shots:
            s = r["summary"].get(str(k))
            cells.append("" if s is None else _pct(s["mean"]) + (f" ± {_pct(s['std'])}" if s["std"] else ""))
        lines.append(f"| {label(r)} | {r['task']} | {r['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(value: float) -> str:
    """Accuracies and AUC as percentages; CIDEr as OpenFlamingo reports it (x100)."""
    return f"{100 * value:.1f}"


def plot(reports: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Score against shots, one line per (model and demonstrations, task), error bars over trials."""
    fig, ax = _figure(width=9)
    for r in reports:
        shots = sorted(int(k) for k in r["summary"])
        means = [100 * r["summary"][str(k)]["mean"] for k in shots]
        stds = [100 * r["summary"][str(k)]["std"] for k in shots]
        name = label(r)
        line = f"{r['task']} ({r['metric']})" + (f" - {name}" if name != "-" else "")
        ax.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=line)
    ax.set_xlabel("shots (in-context examples)")
    ax.set_ylabel("score (x100)")
    ax.set_xticks(sorted({int(k) for r in reports for k in r["summary"]}))
    return _save(fig, ax, out, legend={"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)})  # beside the lines


def plot_induction(curve: Sequence[dict[str, Any]], out: str | Path, *, copying_until: int = 0) -> Path:
    """The induction probe against training steps (``induction.json``'s curve): the loss on the
    first and on the second copy of a repeated random sequence; induction heads forming show as
    the second copy's loss falling abruptly (a phase change). ``copying_until``: a line where the
    copying-only steps end (``LMPretraining.induction_first``)."""
    if not curve or not all(isinstance(p, dict) and {"step", "first", "second"} <= set(p) for p in curve):
        raise ValueError("curve: a list of probe points with 'step', 'first' and 'second' (induction.json's 'curve')")
    fig, ax = _figure()
    if copying_until > 0:
        ax.axvline(copying_until, color="grey", linestyle=":", label="copying text alone before this step")
    steps = [point["step"] for point in curve]
    ax.plot(steps, [point["first"] for point in curve], marker=".", label="first copy (nothing to copy)")
    ax.plot(steps, [point["second"] for point in curve], marker=".", label="second copy (copyable)")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("loss per token (nats)")
    ax.set_ylim(bottom=0)
    return _save(fig, ax, out)


def _figure(width: float = 6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, 4), dpi=120)


def _save(fig, ax, out: str | Path, legend: dict[str, Any] | None = None) -> Path:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, **(legend or {}))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

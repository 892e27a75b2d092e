"""Results of evaluation runs: a summary table for the terminal, score-versus-shots plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read evaluation results: {e}") from None
        if "summary" not in reports[-1]:
            raise ValueError(f"{path}: not an interleaf evaluation result (no 'summary')")
    return reports


def table(reports: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per (model, task), one column per shot count, mean ± std."""
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
        lines.append(f"| {r.get('model') or '-'} | {r['task']} | {r['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(value: float) -> str:
    """Accuracies and AUC as percentages; CIDEr as OpenFlamingo reports it (x100)."""
    return f"{100 * value:.1f}"


def plot(reports: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Score against shots, one line per (model, task), error bars over trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in reports:
        shots = sorted(int(k) for k in r["summary"])
        means = [100 * r["summary"][str(k)]["mean"] for k in shots]
        stds = [100 * r["summary"][str(k)]["std"] for k in shots]
        label = f"{r['task']} ({r['metric']})" + (f" - {r['model']}" if r.get("model") else "")
        ax.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xlabel("shots (in-context examples)")
    ax.set_ylabel("score (x100)")
    ax.set_xticks(sorted({int(k) for r in reports for k in r["summary"]}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

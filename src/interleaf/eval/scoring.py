"""A task's score from its samples, through the reference-exact metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence

from interleaf.eval.metrics import cider, okvqa_stem, roc_auc, vqa_accuracy
from interleaf.eval.task import Example, TaskSpec


def score_task(spec: TaskSpec, queries: Sequence[Example], samples: Sequence[dict]) -> float:
    """CIDEr, VQA accuracy (the official evaluation's normalisation; OK-VQA predictions
    stemmed first, as OpenFlamingo does), top-1 accuracy, or ROC AUC."""
    answers = [s["answer"] for s in samples]
    if spec.metric == "cider":
        return cider({q.id: a for q, a in zip(queries, answers)}, {q.id: list(q.answers) for q in queries})
    if spec.metric in ("vqa", "okvqa"):
        if spec.metric == "okvqa":  # OpenFlamingo stems OK-VQA predictions before scoring
            answers = [okvqa_stem(a) for a in answers]
        per_item = [vqa_accuracy(a, list(q.answers), convention="vqa") for q, a in zip(queries, answers)]
        return sum(per_item) / len(per_item)
    if spec.metric == "accuracy":
        return sum(a == q.answers[0] for q, a in zip(queries, answers)) / len(queries)
    if spec.metric == "roc_auc":
        positive = spec.fixed_candidates[-1]
        return roc_auc([_probability(s["scores"], positive) for s in samples], [q.label for q in queries])
    raise ValueError(f"unknown metric {spec.metric!r}")


def _probability(scores: dict[str, float], positive: str) -> float:
    """Softmax over the candidates' scores, the positive one's share (HatefulMemes' "yes")."""
    top = max(scores.values())
    weights = {k: math.exp(v - top) for k, v in scores.items()}
    return weights[positive] / sum(weights.values())

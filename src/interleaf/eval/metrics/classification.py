"""Classification metrics: ROC AUC (HatefulMemes, through scikit-learn as OpenFlamingo computes it), top-1 accuracy
over class scores (ImageNet-style class-name ranking), and multiple-choice accuracy (ScienceQA / MMBench style)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from interleaf.extras import optional_import


def _check_lengths(name: str, values: Sequence, labels: Sequence) -> None:
    if len(values) != len(labels):
        raise ValueError(f"{name} and labels differ in length: {len(values)} != {len(labels)}")
    if len(values) == 0:
        raise ValueError(f"no {name} to score")


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive) for binary ``labels`` (0/1),
    ``sklearn.metrics.roc_auc_score(labels, scores)``."""
    roc_auc_score = optional_import("sklearn.metrics", "ROC AUC (HatefulMemes)", "eval").roc_auc_score
    _check_lengths("scores", scores, labels)
    classes = set(np.asarray(labels).tolist())
    if not classes <= {0, 1}:
        raise ValueError(f"labels must be 0 or 1, got {sorted(classes, key=repr)}")
    if len(classes) < 2:
        raise ValueError(f"ROC AUC needs both classes among the labels; all {len(labels)} are {classes.pop()}")
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, dtype=np.float64)))


def top1_accuracy(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """Fraction of rows of ``scores`` (samples x classes) whose highest score is at the label's index; ties go to the
    first class, as ``numpy.argmax``."""
    _check_lengths("scores", scores, labels)
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"scores must be a (samples, classes) matrix, got shape {matrix.shape}")
    targets = np.asarray(labels)
    if ((targets < 0) | (targets >= matrix.shape[1])).any():
        raise ValueError(f"labels must be class indices in [0, {matrix.shape[1]})")
    return float((matrix.argmax(axis=1) == targets).mean())


def multiple_choice_accuracy(choice_scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Fraction of questions whose best-scored choice is the answer; questions may have different numbers of choices.
    Ties go to the first choice."""
    _check_lengths("choice_scores", choice_scores, answers)
    correct = 0
    for i, (scores, answer) in enumerate(zip(choice_scores, answers)):
        if not 0 <= answer < len(scores):
            raise ValueError(f"question {i}: answer index {answer} is not among its {len(scores)} choices")
        correct += int(np.argmax(scores)) == answer
    return correct / len(answers)

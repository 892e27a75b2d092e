"""CIDEr-D exactly as pycocoevalcap computes it for COCO captioning (the numbers OpenFlamingo reports).

pycocoevalcap's ``COCOEvalCap`` PTB-tokenizes references and predictions (Java, Stanford CoreNLP 3.4.1) and scores
them with ``Cider``: TF-IDF vectors of 1- to 4-grams, document frequencies counted over the references of all
images, cosine similarity with clipped hypothesis weights, a Gaussian length penalty (sigma 6), averaged over the
four n-gram orders and the references, times 10. ``tokenizer="java"`` runs pycocoevalcap itself;
``tokenizer="python"`` runs :func:`~interleaf.eval.metrics.ptb.python_tokenize` and :func:`cider_d`, which
reproduce it without Java; ``"auto"`` takes Java where pycocoevalcap and a ``java`` executable are present.
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal, TypeVar

from interleaf.eval.metrics.ptb import clean_caption, python_tokenize
from interleaf.extras import MissingExtra

Key = TypeVar("Key", bound=Hashable)
Tokenizer = Literal["auto", "java", "python"]
NGram = tuple[str, ...]


def java_tokenizer_available() -> bool:
    """Whether pycocoevalcap is importable and a ``java`` executable is on the PATH."""
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


def java_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenize with pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP through Java), in one JVM run.

    Raises ``RuntimeError`` when the Java run does not return one line per caption.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not captions:
        return []
    lines = PTBTokenizer().tokenize({i: [{"caption": clean_caption(c)}] for i, c in enumerate(captions)})
    if sorted(lines) != list(range(len(captions))):
        raise RuntimeError(f"pycocoevalcap's PTBTokenizer returned {len(lines)} of {len(captions)} captions")
    return [lines[i][0] for i in range(len(captions))]


def _tokenize_runs(runs: Sequence[Sequence[str]], tokenizer: Tokenizer) -> tuple[list[list[str]], bool]:
    """Tokenize each run of captions as one document, all with the same tokenizer; also says whether it was Java."""
    if tokenizer not in ("auto", "java", "python"):
        raise ValueError(f'tokenizer must be "auto", "java" or "python", not {tokenizer!r}')
    if tokenizer == "java" and not java_tokenizer_available():
        raise MissingExtra(
            "tokenizer=\"java\" needs pycocoevalcap (pip install 'interleaf[eval]') and a `java` executable on PATH"
        )
    if tokenizer == "java":
        return [java_tokenize(run) for run in runs], True
    if tokenizer == "auto" and java_tokenizer_available():
        try:
            return [java_tokenize(run) for run in runs], True
        except (OSError, RuntimeError) as error:
            warnings.warn(f"Java PTB tokenizer failed ({error}); using the Python tokenizer", stacklevel=3)
    return [python_tokenize(run) for run in runs], False


def ptb_tokenize(captions: Sequence[str], *, tokenizer: Tokenizer = "auto") -> list[str]:
    """PTB-tokenize captions as pycocoevalcap does: lower-cased, punctuation dropped, tokens joined by spaces.

    ``"java"`` requires pycocoevalcap and Java; ``"python"`` never uses them; ``"auto"`` prefers Java and falls back
    to Python (with a warning) when the Java run fails.
    """
    return _tokenize_runs([captions], tokenizer)[0][0]


def _ngrams(caption: str, n: int = 4) -> Counter[NGram]:
    """Counts of the 1- to n-grams of a tokenized caption (split on white space)."""
    words = caption.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class _TfIdf:
    """A caption's TF-IDF vector per n-gram order, the norms, and the length that the penalty compares."""

    def __init__(self, counts: Counter[NGram], document_frequency: Counter[NGram], log_images: float, n: int):
        self.vectors: list[dict[NGram, float]] = [{} for _ in range(n)]
        for ngram, tf in counts.items():
            self.vectors[len(ngram) - 1][ngram] = tf * (log_images - math.log(max(1.0, document_frequency[ngram])))
        self.norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in self.vectors]
        # pycocoevalcap measures length as the number of bigrams (its `n == 1` is the 2-gram index), kept as is.
        self.length = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)


def _similarity(hyp: _TfIdf, ref: _TfIdf, sigma: float) -> list[float]:
    """Per n-gram order: cosine similarity with the hypothesis weights clipped to the reference's, length-penalized."""
    penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * sigma**2))
    values = []
    for hyp_vec, ref_vec, hyp_norm, ref_norm in zip(hyp.vectors, ref.vectors, hyp.norms, ref.norms):
        value = sum(min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, w in hyp_vec.items())
        if hyp_norm != 0 and ref_norm != 0:
            value /= hyp_norm * ref_norm
        values.append(value * penalty)
    return values


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """CIDEr-D of tokenized captions, one score per image, as pycocoevalcap's ``CiderScorer`` computes it.

    Document frequencies count, for each n-gram, the images whose references contain it; the IDF base is the number
    of images. Each image's score is the mean over n-gram orders of the summed similarities to its references,
    divided by the number of references, times 10.
    """
    if not hypotheses or len(hypotheses) != len(references) or not all(references):
        raise ValueError("cider_d needs one hypothesis and at least one reference per image, for at least one image")
    ref_counts = [[_ngrams(ref, n) for ref in refs] for refs in references]
    document_frequency = Counter(ngram for refs in ref_counts for ngram in set().union(*refs))
    log_images = math.log(float(len(references)))
    scores = []
    for hypothesis, refs in zip(hypotheses, ref_counts):
        hyp = _TfIdf(_ngrams(hypothesis, n), document_frequency, log_images, n)
        totals = [0.0] * n
        for ref in refs:
            sims = _similarity(hyp, _TfIdf(ref, document_frequency, log_images, n), sigma)
            totals = [total + sim for total, sim in zip(totals, sims)]
        scores.append(sum(totals) / n / len(refs) * 10.0)
    return scores


def _validate(predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]]) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    unreferenced = [key for key in predictions if key not in references]
    unpredicted = [key for key in references if key not in predictions]
    if unreferenced or unpredicted:
        raise ValueError(
            f"predictions and references must have the same ids: {len(unreferenced)} predictions have no references "
            f"(e.g. {unreferenced[:3]}), {len(unpredicted)} references have no prediction (e.g. {unpredicted[:3]})"
        )
    empty = [key for key in predictions if not references[key]]
    if empty:
        raise ValueError(f"{len(empty)} ids have no reference caption, e.g. {empty[:3]}")


def _pycocoevalcap_cider(hypotheses: list[str], references: list[list[str]]) -> list[float]:
    from pycocoevalcap.cider.cider import Cider

    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [hyp] for i, hyp in enumerate(hypotheses)}
    return [float(score) for score in Cider().compute_score(gts, res)[1]]


def cider_scores(
    predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]], *, tokenizer: Tokenizer = "auto"
) -> dict[Key, float]:
    """Per-image CIDEr-D, as pycocoevalcap's ``COCOEvalCap`` computes it (PTB tokenization, then ``Cider``).

    ``predictions`` maps an image id to one generated caption, ``references`` maps the same ids to their human
    captions. Captions are tokenized in the order of ``predictions``, as COCOEvalCap does with its result file. With
    ``tokenizer="java"`` (or ``"auto"`` where Java works) the scores come from pycocoevalcap's ``Cider`` itself.
    """
    _validate(predictions, references)
    keys = list(predictions)
    flat_refs = [ref for key in keys for ref in references[key]]
    (tokenized_refs, hypotheses), java = _tokenize_runs([flat_refs, [predictions[key] for key in keys]], tokenizer)
    remaining = iter(tokenized_refs)
    grouped_refs = [[next(remaining) for _ in references[key]] for key in keys]
    scores = _pycocoevalcap_cider(hypotheses, grouped_refs) if java else cider_d(hypotheses, grouped_refs)
    return dict(zip(keys, scores))


def cider(
    predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]], *, tokenizer: Tokenizer = "auto"
) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_scores` (pycocoevalcap's ``COCOEvalCap.eval["CIDEr"]``)."""
    scores = cider_scores(predictions, references, tokenizer=tokenizer)
    return sum(scores.values()) / len(scores)

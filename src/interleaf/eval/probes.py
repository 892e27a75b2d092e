"""Probes that show whether a model can learn in context before any few-shot evaluation runs.

The induction probe (Olsson et al. 2022, "In-context learning and induction heads"): a random
token sequence ``A`` of ``length`` tokens is shown twice, ``A A``. A model without induction
heads predicts the second copy no better than the first (both are random); one with them copies
it from the first, and its loss on the second copy falls to a small fraction of the first's.
The first token of each copy is unpredictable either way and is left out of both means. The
ratio ``second / first`` is the probe's reading: about 1 without the circuit, near 0 with it.

The Flamingo's probe does the same with pictures and words: a prompt of a classification
task's demonstrations (picture, label), then one of its pictures again. The label's loss where
the pair is first shown (its word still unknown) against its loss at the repeat, which the
model can copy; and at another picture of the same class, which it must match by what the
picture shows, as a few-shot classification with invented words needs.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from interleaf.eval.harness import Prompter
from interleaf.eval.ranking import rank_candidates
from interleaf.eval.task import Example, TaskSpec


def _embeddings(model) -> int | None:
    """How many input embeddings the LM (of a Flamingo too) has; None when it does not say."""
    for owner in (model, getattr(getattr(model, "language_model", None), "lm", None)):
        get = getattr(owner, "get_input_embeddings", None)
        if callable(get):
            return get().num_embeddings
    return None


@torch.no_grad()
def lm_induction(
    model, vocab: tuple[int, int], *, length: int = 32, n: int = 32, seed: int = 0, bos: int | None = None
) -> dict[str, Any]:
    """The induction probe on a causal LM (anything whose ``model(input_ids=...).logits`` are
    next-token logits): ``n`` sequences of ``length`` tokens drawn uniformly from the ids
    ``vocab[0] <= id < vocab[1]`` (ordinary tokens, not the special ones), each shown twice after
    ``bos`` (when given). Returns the mean next-token loss (nats) over the first copy and over
    the second (each without its first token), their ratio, ``length`` and ``n``."""
    low, high = vocab
    if not 0 <= low < high:
        raise ValueError(f"vocab must be a range of token ids (low, high) with 0 <= low < high, got {vocab}")
    if length < 2 or n < 1:
        raise ValueError(f"length must be >= 2 and n >= 1, got length={length}, n={n}")
    size = _embeddings(model)
    if size is not None and (high > size or (bos is not None and not 0 <= bos < size)):
        raise ValueError(f"vocab {vocab} and bos {bos} must be token ids of the model's {size} embeddings")
    generator = torch.Generator().manual_seed(seed)
    sequence = torch.randint(low, high, (n, length), generator=generator)
    ids = torch.cat([sequence, sequence], dim=1)
    start = 0
    if bos is not None:
        ids = torch.cat([torch.full((n, 1), bos), ids], dim=1)
        start = 1
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids.to(_device(model))).logits.float().cpu()
    finally:
        model.train(was_training)
    # losses[:, j] is the loss of token j + 1 given tokens 0..j
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    first = losses[:, start : start + length - 1].mean().item()
    second = losses[:, start + length : start + 2 * length - 1].mean().item()
    return {"first": first, "second": second, "ratio": second / first, "length": length, "n": n}


@torch.no_grad()
def flamingo_induction(
    model, processor, spec: TaskSpec, support: Sequence[Example], *, shots: int = 4, n: int = 32, seed: int = 0
) -> dict[str, Any]:
    """The induction probe on a Flamingo with a classification task (``spec``, its ``support``
    examples): ``n`` prompts of ``shots`` demonstrations of distinct classes, chosen at random;
    the mean loss (nats a token) of one demonstration's label where it is first shown (after
    the demonstrations before it: its word appears for the first time), when its picture is
    shown again after all of them (``repeat``), and for another support picture of its class
    (``same_class``, when the class has one), with the ratios to the first."""
    if shots < 1 or n < 1:
        raise ValueError(f"shots and n must be >= 1, got shots={shots}, n={n}")
    by_class: dict[str, list[Example]] = defaultdict(list)
    for example in support:
        by_class[example.answers[0]].append(example)
    if len(by_class) < shots:
        raise ValueError(
            f"{shots} demonstrations of distinct classes need {shots} classes, the support has {len(by_class)}"
        )
    rng = random.Random(seed)
    prompter = Prompter(spec, processor)
    built: dict[str, list[tuple[str, list, str]]] = {"first": [], "repeat": [], "same_class": []}
    for _ in range(n):
        demos = [rng.choice(by_class[label]) for label in rng.sample(sorted(by_class), shots)]
        j = rng.randrange(shots)
        target = demos[j]
        label = spec.answer_prefix + target.answers[0]
        built["first"].append((*prompter.build(target, demos[:j], text_only=False), label))
        built["repeat"].append((*prompter.build(target, demos, text_only=False), label))
        others = [e for e in by_class[target.answers[0]] if e not in demos]
        if others:
            built["same_class"].append((*prompter.build(rng.choice(others), demos, text_only=False), label))
    losses = {}
    for kind, rows in built.items():
        if rows:
            prompts, images, labels = zip(*rows)
            scores = rank_candidates(model, processor, list(prompts), list(images), [[label] for label in labels])
            losses[kind] = -sum(score for (score,) in scores) / len(scores)
    first = losses["first"]
    result = {"first": first, "repeat": losses["repeat"], "ratio": losses["repeat"] / first, "shots": shots, "n": n}
    if "same_class" in losses:
        result |= {"same_class": losses["same_class"], "same_class_ratio": losses["same_class"] / first}
    return result


def ordinary_ids(tokenizer) -> tuple[int, int]:
    """The range of a tokenizer's ordinary token ids: after its special tokens, before the
    tokens added to it (the Flamingo's ``<image>`` and the like)."""
    base = tokenizer.vocab_size
    specials = [i for i in tokenizer.all_special_ids if i < base]
    return (max(specials) + 1 if specials else 0), base


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device

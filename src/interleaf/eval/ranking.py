"""Ranking candidate answers by their length-normalised log-likelihood after a prompt, in
memory that does not grow with the number of candidates.

What is scored. A candidate is scored inside the text the model would read, ``prompt +
candidate`` tokenized as ONE string (as the processor tokenizes a text prompt): its tokens are
those of that string that cover at least one character of the candidate (by the tokenizer's
character offsets), and its score is the mean log-probability of those tokens, each given all
the tokens before it. So the score equals scoring the full ``prompt + candidate`` string alone
with one forward pass. Tokenizing the candidate apart from its prompt would not: SentencePiece
tokenizers (Llama, Mistral) give `` yes`` alone other ids than after ``Answer:``. Where the
tokenizer merges across the boundary (``:▁`` holding the prompt's colon and the candidate's
space, or ``▁yes`` after a prompt that ends in a space), the straddling token belongs to the
candidate, and the tokens before it are the candidate's context. The contexts of one prompt's
candidates can therefore differ in their last token(s).

Shared prefix. Per prompt, the longest common prefix of its candidates' contexts is the
prefix; all of it but its last token is encoded once into the LM's KV cache. Each candidate
then continues from the prefix's last token: the rest of its context (not scored) and its own
tokens (scored), so every scored token is predicted inside the candidate's own row.

Batches. The prefixes of all the prompts of one call (the harness passes one batch of queries)
are encoded in one forward, left-padded: padding is masked out of attention, position ids
count from each row's first real token, and padding never counts as an image or an EOS (as in
generation). The continuations of all (prompt, candidate) pairs then run in chunks of
``chunk_size`` rows, which may mix prompts: each row gets a copy of its prompt's cache row and
image keys/values, and is right-padded (causal attention keeps padding after a token from
reaching it). So a candidate's score does not depend on the other rows of its chunk or on the
chunk size, up to the rounding of differently shaped float operations.

Memory. The prompt caches are never written to: each chunk indexes its rows out of them into
new tensors (``Cache.batch_select_indices`` on a shallow copy of the cache; transformers'
dynamic cache layers assign new tensors rather than writing into the old ones), and the next
chunk indexes them again. Peak memory is about (prompts + ``chunk_size``) x one prompt's KV
cache and image keys/values, plus one chunk's activations, whatever the number of candidates
(ImageNet's 1,000 classes after an 8-shot prompt, 9B model: ~150 GB as one batch, ~10 GB in
chunks of 64).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 64


@dataclass(frozen=True)
class CandidateTokens:
    """``tokenize(prompt + candidate)`` as ``ids``; the candidate's tokens are ``ids[start:end]``."""

    ids: list[int]
    start: int
    end: int


@dataclass(frozen=True)
class _Row:
    """One candidate after its prompt's prefix: ``ids`` run from the prefix's last token to the
    candidate's last; the last ``scored`` of them are the candidate's own."""

    prompt: int
    ids: list[int]
    scored: int


def candidate_tokens(tokenizer, prompt: str, candidates: Sequence[str]) -> list[CandidateTokens]:
    """Each candidate's tokens within ``prompt + candidate`` tokenized as one string (with the
    tokenizer's special tokens, as the processor adds them): the tokens that cover at least one
    of the candidate's characters. ``prompt`` is text as the tokenizer reads it (images written
    out, see ``Processor.write_images``)."""
    if not candidates:
        return []
    if not tokenizer.is_fast:
        raise ValueError(
            f"ranking needs a tokenizer with character offsets (a fast tokenizer); {type(tokenizer).__name__} has none"
        )
    encoded = tokenizer([prompt + c for c in candidates], return_offsets_mapping=True)
    boundary = len(prompt)
    out = []
    for candidate, ids, offsets in zip(candidates, encoded["input_ids"], encoded["offset_mapping"]):
        covering = [i for i, (s, e) in enumerate(offsets) if e > boundary and e > s]
        if not covering:
            raise ValueError(f"candidate {candidate!r} has no tokens after the prompt {prompt[-40:]!r}")
        if covering[0] == 0:
            raise ValueError(f"the prompt {prompt!r} has no token before the candidate {candidate!r}")
        out.append(CandidateTokens(list(ids), covering[0], covering[-1] + 1))
    return out


@torch.no_grad()
def rank_candidates(
    model,
    processor,
    prompts: list[str],
    images: list[list],
    candidates: list[list[str]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[list[float]]:
    """Length-normalised log-likelihood of each candidate after each prompt (see the module
    docstring): ``scores[p][c]`` for candidate ``c`` of prompt ``p``. ``prompts`` are text with
    ``<image>`` placeholders, ``images[p]`` the images of prompt ``p``. At most ``chunk_size``
    candidates (of any prompts) run through the model at once."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not len(prompts) == len(images) == len(candidates):
        raise ValueError(
            f"{len(prompts)} prompts, {len(images)} image lists and {len(candidates)} candidate lists: "
            "give one of each per prompt"
        )
    scores: list[list[float]] = [[] for _ in prompts]
    if not prompts:
        return scores
    device = model.device  # where token inputs go (the first block of a model over several GPUs)
    image_token = processor.tokens.image
    prefixes, rows = [], []
    for p, (prompt, cands) in enumerate(zip(prompts, candidates)):
        for c in cands:
            if (prompt + c).count(image_token) != prompt.count(image_token):
                raise ValueError(f"candidate {c!r} of prompt {p} adds an image token {image_token!r}")
        split = candidate_tokens(processor.tokenizer, processor.write_images(prompt), cands)
        prefix = _common_prefix([t.ids[: t.start] for t in split]) if split else []
        keep = max(len(prefix) - 1, 0)  # cached; the prefix's last token opens each row
        prefixes.append(prefix[:keep])
        rows += [_Row(p, t.ids[keep : t.end], t.end - t.start) for t in split]
    if not rows:
        return scores
    batch = processor(prompts, images=images)
    media = model.prepare_media(batch["input_ids"].to(device), batch["pixel_values"].to(device))
    cached, cached_mask = _pad(prefixes, model.ids.pad, "left", device)
    cache = None
    if cached.shape[1]:
        cache = model.step(cached, history_ids=cached, attention_mask=cached_mask, media=media, use_cache=True).cache
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start : start + chunk_size]
        for row, score in zip(chunk, _score_chunk(model, chunk, cached, cached_mask, media, cache)):
            scores[row.prompt].append(score)
    return scores


def _score_chunk(model, chunk: list[_Row], cached: Tensor, cached_mask: Tensor, media, cache) -> list[float]:
    """Mean log-probability of the scored tokens of each row, the rows continuing their prompts'
    cached prefixes."""
    device = cached.device
    index = torch.tensor([r.prompt for r in chunk], device=device)
    inputs, valid = _pad([r.ids[:-1] for r in chunk], model.ids.pad, "right", device)
    targets, _ = _pad([r.ids[1:] for r in chunk], model.ids.pad, "right", device)
    lengths = valid.sum(-1, keepdim=True)
    position = torch.arange(inputs.shape[1], device=device)
    scored = (position < lengths) & (position >= lengths - torch.tensor([[r.scored] for r in chunk], device=device))
    out = model.step(
        inputs,
        history_ids=torch.cat([cached[index], inputs], dim=1),
        attention_mask=torch.cat([cached_mask[index], valid], dim=1),
        media=media.select(index) if media is not None else None,
        cache=_cache_rows(cache, index) if cache is not None else None,
    )
    logits = model.language_model.logits(out.last_hidden_state[scored]).float()  # (scored tokens, V)
    logprobs = logits.log_softmax(-1).gather(-1, targets[scored][:, None])[:, 0]
    owner = scored.nonzero()[:, 0]  # the row of each scored token
    total = torch.zeros(len(chunk), device=device).index_add_(0, owner, logprobs)
    return (total / scored.sum(-1)).tolist()


def _cache_rows(cache, index: Tensor):
    """A cache holding rows ``index`` of ``cache`` (repeats allowed), ``cache`` left unchanged:
    its layers are copied shallowly and re-indexed, which assigns new tensors to the copies."""
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]
    rows.batch_select_indices(index)
    return rows


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    first = seqs[0]
    n = len(first)
    for seq in seqs[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], seq)) if a != b), min(n, len(seq)))
    return first[:n]


def _pad(rows: list[list[int]], pad: int, side: str, device) -> tuple[Tensor, Tensor]:
    """(B, T) ids and attention mask, padded on ``side``."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, span] = torch.tensor(row, dtype=torch.long)
        mask[b, span] = 1
    return ids.to(device), mask.to(device)

"""The one decoding loop: greedy, temperature / top-k / top-p sampling, and beam search,
with streaming. Used by the CLI, the server and the evaluation harness.

Per call, the images are encoded and every cross-attention block's keys/values are
projected once (``Flamingo.prepare_media``); each step then runs the LM on the new token
only, with the LM's KV cache (passed to the LM as ``cache``, the name transformers uses
from 5.24 on). ``use_cache=False`` recomputes everything at every step (images included):
the reference the cached path is tested against.

Stop strings. A sequence ends at the first step whose whole decoded continuation (with and
without special tokens) contains one of ``stop_strings``, however many tokens it spans. The
token ids that ``generate`` returns are left as they are, up to and including the token that
completed the stop string (a stop string can end in the middle of a token); the TEXT is what
gets trimmed: ``decode(tokenizer, ids, stop_strings)`` gives each row's text cut before its
first stop string (``trim_at_stop``), and ``stream`` yields exactly that text, never any part
of a stop string: it holds back a tail that could be the start of one until the next tokens
resolve it.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are sum(logprob) / length ** length_penalty
    stop_at_eos: bool = True
    stop_at_end_of_chunk: bool = True
    stop_at_begin_of_image: bool = True  # a model that draws: the image comes next
    stop_strings: tuple[str, ...] = ()
    use_cache: bool = True
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (not (self.do_sample and self.num_beams > 1), "sampling with beams is not supported"),
            (self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be <= max_new_tokens"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, f"seed must be in [-2**63, 2**64), got {self.seed}"),
            (all(self.stop_strings), "stop_strings must not be empty"),
            (
                self.do_sample or (self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0),
                "temperature, top_k and top_p apply only with do_sample=True",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"generation: {message}")


def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values=None, **kwargs) -> Tensor:
    """Generate from a batch of prompts. Returns the new tokens only, (B, T_new), padded
    with the pad id after each sequence's end; the stop token that ended it is included, and
    so are the tokens of a stop string: ``decode(tokenizer, ids, stop_strings)`` gives the
    texts, each cut before its stop string."""
    cfg = GenerationConfig(**_as_tuple_stop_strings(kwargs))
    last_step = deque(_decode(model, input_ids, attention_mask, pixel_values, cfg), maxlen=1)
    return last_step[0].result()


def stream(
    model, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values=None, **kwargs
) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece, as it is generated. The
    pieces join up to ``decode(model.tokenizer, ids, stop_strings)[0]`` of the same call's
    ids: no part of a stop string is ever yielded."""
    cfg = GenerationConfig(**_as_tuple_stop_strings(kwargs))
    if input_ids.shape[0] != 1 or cfg.num_beams != 1:
        raise ValueError("streaming takes one prompt and num_beams=1")
    text = TextStream(model.tokenizer, cfg.stop_strings)
    tokens: list[int] = []
    for search in _decode(model, input_ids, attention_mask, pixel_values, cfg):
        tokens = search.tokens[0]
        if piece := text.update(tokens):
            yield piece
        if text.stopped:
            break
    if piece := text.finish(tokens):
        yield piece


class TextStream:
    """The text of one growing continuation, given out in pieces that join up to exactly
    ``decode(tokenizer, ids, stop_strings)[0]`` of the final ids (special tokens skipped, cut
    before the first stop string), whatever the tokenizer.

    Each update decodes the whole continuation (it is short) and gives out the part of it
    that can no longer change: it holds back an incomplete UTF-8 character at the end (byte-
    level BPE decodes one as U+FFFD until its last byte comes), a trailing run of SentencePiece
    byte-fallback tokens (``<0xE4>``: the run decodes to text only once all of it is valid
    UTF-8), for a tokenizer that cleans up spaces on decoding (``" ' "`` -> ``"'"``, then
    ``" n't"`` -> ``"n't"``) everything from its second-to-last whitespace on, and of what is
    left, a tail that could be the start of a stop string.
    """

    def __init__(self, tokenizer, stop_strings: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(stop_strings)
        self.emitted = ""
        self.stopped = False  # the text reached a stop string: nothing more will be given out
        self._cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._special = set(getattr(tokenizer, "all_special_ids", ()))

    def update(self, ids: Sequence[int]) -> str:
        """The next piece ('' if none is ready) for the continuation ``ids`` so far."""
        if self.stopped:
            return ""
        text = _text(self.tokenizer, ids)
        cut = _first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._give(text[:cut])
        stable = self._stable(text, ids)
        return self._give(stable[: len(stable) - _stop_prefix_length(stable, self.stops)])

    def _stable(self, text: str, ids: Sequence[int]) -> str:
        """The beginning of ``text`` that the next tokens cannot change."""
        stable = text.rstrip("\ufffd")  # an incomplete UTF-8 character
        # SentencePiece byte fallback: a run of <0xNN> tokens decodes to text only once the whole
        # run is valid UTF-8 (until then every byte of it is U+FFFD): hold the run back.
        kept = [i for i in ids if i not in self._special]
        tokens = self.tokenizer.convert_ids_to_tokens(kept)
        k = len(tokens)
        while k and _BYTE_TOKEN.fullmatch(tokens[k - 1] or ""):
            k -= 1
        if k < len(tokens):
            before = _text(self.tokenizer, kept[:k])
            stable = stable[: len(before) if text.startswith(before) else 0]
        if self._cleans_up:  # " ' " -> "'", then " n't" -> "n't": the last two spaces may still go
            spaces = [i for i, c in enumerate(stable) if c.isspace()]
            stable = stable[: spaces[-2]] if len(spaces) >= 2 else ""
        return stable

    def finish(self, ids: Sequence[int]) -> str:
        """The last piece, once ``ids`` are final: the pieces now join to the whole text."""
        text = trim_at_stop(_text(self.tokenizer, ids), self.stops)
        self.stopped = True
        return self._give(text)

    def _give(self, ready: str) -> str:
        if len(ready) <= len(self.emitted) and self.emitted.startswith(ready):
            return ""
        if not ready.startswith(self.emitted):  # a decode that rewrote given-out text: a bug here
            raise RuntimeError(f"streamed text {self.emitted!r} is not a prefix of {ready!r}")
        piece, self.emitted = ready[len(self.emitted) :], ready
        return piece


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def decode(tokenizer, ids: Tensor | Sequence[Sequence[int]], stop_strings: str | Iterable[str] = ()) -> list[str]:
    """The texts of generated token ids (a (B, T) tensor from ``generate``, or a list of id
    lists): special tokens (the stop token, padding) skipped, each text cut before the
    earliest of ``stop_strings`` it contains. What the CLI and the server show."""
    stops = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    if isinstance(ids, Tensor):
        ids = (ids[None] if ids.dim() == 1 else ids).tolist()
    return [trim_at_stop(_text(tokenizer, list(row)), stops) for row in ids]


def trim_at_stop(text: str, stop_strings: Iterable[str]) -> str:
    """``text`` cut before the earliest occurrence of any of ``stop_strings`` (empty ones
    are ignored); unchanged if none occurs."""
    cut = _first_stop(text, stop_strings)
    return text if cut is None else text[:cut]


def _first_stop(text: str, stop_strings: Iterable[str]) -> int | None:
    """Where the earliest stop string in ``text`` starts, or None."""
    found = [i for s in stop_strings if s and (i := text.find(s)) >= 0]
    return min(found, default=None)


def _stop_prefix_length(text: str, stop_strings: Iterable[str]) -> int:
    """The length of the longest end of ``text`` that is the beginning of a stop string
    (and not a whole one): what streaming holds back until the next tokens resolve it."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _text(tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ids as callers see it: special tokens skipped."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def _as_tuple_stop_strings(kwargs: dict) -> dict:
    if isinstance(kwargs.get("stop_strings"), str):
        kwargs["stop_strings"] = (kwargs["stop_strings"],)
    elif "stop_strings" in kwargs:
        kwargs["stop_strings"] = tuple(kwargs["stop_strings"])
    return kwargs


@torch.no_grad()
def _decode(model, input_ids, attention_mask, pixel_values, cfg: GenerationConfig):
    """The loop. Yields the search after every step. The prompt moves to the model's device
    (the processor works on the CPU)."""
    input_ids = input_ids.to(model.device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(model.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if pixel_values is not None and pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"pixel_values hold {pixel_values.shape[0]} samples for {input_ids.shape[0]} prompts in input_ids"
        )
    stop = StopRule(model, cfg)
    search = (
        _BeamSearch(cfg, input_ids.shape[0], stop, model.ids.pad)
        if cfg.num_beams > 1
        else _Sampler(cfg, input_ids.shape[0], stop, model.ids.pad, input_ids.device)
    )
    session = _Session(model, input_ids, attention_mask, pixel_values, cfg.num_beams, cfg.use_cache)
    for step in range(cfg.max_new_tokens):
        logprobs = session.next_logprobs()
        if step < cfg.min_new_tokens:
            logprobs[:, stop.token_ids] = float("-inf")
        tokens, reorder = search.step(logprobs)
        yield search
        if search.done:
            return
        session.append(tokens, reorder)


class StopRule:
    """Whether a sequence ends with its latest token: EOS, <|endofchunk|>, the begin-of-image
    token or a stop string.
    ``StopRule(model, cfg)(generated_ids)``."""

    def __init__(self, model, cfg: GenerationConfig):
        ids = []
        if cfg.stop_at_eos and model.ids.eos is not None:
            ids.append(model.ids.eos)
        if cfg.stop_at_end_of_chunk and model.ids.end_of_chunk is not None:
            ids.append(model.ids.end_of_chunk)
        begin_of_image = getattr(model.ids, "begin_of_image", None)  # a model that draws
        if cfg.stop_at_begin_of_image and begin_of_image is not None:
            ids.append(begin_of_image)
        self.token_ids = ids
        self.strings = cfg.stop_strings
        self.tokenizer = model.tokenizer

    def __call__(self, generated: list[int]) -> bool:
        if generated and generated[-1] in self.token_ids:
            return True
        if not self.strings:
            return False
        # The whole continuation (it is short): a stop string may span any number of tokens.
        # With special tokens, so a stop string may name one; without, as callers see the text.
        texts = (self.tokenizer.decode(generated, skip_special_tokens=False), _text(self.tokenizer, generated))
        return any(s in text for text in texts for s in self.strings)


def next_token_logprobs(model, hidden: Tensor, mask: Tensor) -> Tensor:
    """(rows, V) float32 log-probabilities of the next token, from the LM's last hidden states
    (rows, T_new, D) of a step whose attention mask (rows, T) ends with those T_new tokens.
    An ``<image>`` with no image behind it, or padding, is never a valid continuation."""
    # Each row's last real token: the prompt's may sit before right padding.
    last = hidden.shape[1] - 1 - mask[:, -hidden.shape[1] :].flip(-1).argmax(-1)
    hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    logits = model.language_model.logits(hidden).float()
    logits[:, sorted({model.ids.image, model.ids.pad} - {model.ids.eos})] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


class _Session:
    """The model side of decoding: prompt, media, LM cache; rows = batch x beams."""

    def __init__(self, model, input_ids, attention_mask, pixel_values, copies: int, use_cache: bool):
        self.model = model
        self.use_cache = use_cache
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(copies)
        self.history = input_ids[rows]
        self.mask = attention_mask[rows]
        self.pixel_values = None if pixel_values is None else pixel_values[rows]
        # Each image is encoded once, then its keys/values are shared by the sample's beams.
        media = model.prepare_media(input_ids, pixel_values) if use_cache else None
        self.media = media.select(rows) if media is not None and copies > 1 else media
        self.cache = None  # the LM's KV cache (transformers' Cache), after the first step

    def next_logprobs(self) -> Tensor:
        """(rows, V) log-probabilities of the next token, float32."""
        model = self.model
        if self.use_cache:
            new = self.history if self.cache is None else self.history[:, -1:]
            out = model.step(
                new,
                history_ids=self.history,
                attention_mask=self.mask,
                media=self.media,
                cache=self.cache,
                use_cache=True,
            )
            self.cache = out.cache
        else:
            media = model.prepare_media(self.history, self.pixel_values)
            out = model.step(self.history, history_ids=self.history, attention_mask=self.mask, media=media)
        return next_token_logprobs(model, out.last_hidden_state, self.mask)

    def append(self, tokens: Tensor, reorder: Tensor | None) -> None:
        if reorder is not None:
            # Beams are reordered within their own sample, so the media rows stay valid.
            self.history, self.mask = self.history[reorder], self.mask[reorder]
            if self.cache is not None:
                self.cache.reorder_cache(reorder)
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)


@dataclass
class _Sampler:
    """Greedy decoding or sampling: one row per prompt."""

    cfg: GenerationConfig
    batch: int
    stop: StopRule
    pad: int
    device: torch.device
    tokens: list[list[int]] = field(init=False)
    finished: list[bool] = field(init=False)

    def __post_init__(self):
        self.tokens = [[] for _ in range(self.batch)]
        self.finished = [False] * self.batch
        self.generator = None
        if self.cfg.do_sample and self.cfg.seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)

    @property
    def done(self) -> bool:
        return all(self.finished)

    def step(self, logprobs: Tensor) -> tuple[Tensor, None]:
        chosen = choose_tokens(logprobs, self.cfg, self.generator)
        chosen[torch.tensor(self.finished, device=chosen.device)] = self.pad
        for row, token in enumerate(chosen.tolist()):
            if not self.finished[row]:
                self.tokens[row].append(token)
                self.finished[row] = self.stop(self.tokens[row])
        return chosen, None

    def result(self) -> Tensor:
        return _pad(self.tokens, self.pad, self.device)


def choose_tokens(logprobs: Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> Tensor:
    """(B,) the next token of each row: the argmax, or with ``cfg.do_sample`` a draw after
    temperature, top-k and top-p, from ``generator`` (the global generator if None)."""
    if not cfg.do_sample:
        return logprobs.argmax(-1)
    # The best token at 0 before dividing: however small the temperature (down to what the
    # dtype can hold; below, the limit: all mass on the best), no row becomes all -inf or NaN.
    tiny = torch.finfo(logprobs.dtype).tiny
    logits = (logprobs - logprobs.max(-1, keepdim=True).values) / max(cfg.temperature, tiny)
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        logits = _top_p(logits, max(cfg.top_p, tiny))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


def _top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (nucleus)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
    sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class _BeamSearch:
    """Beam search with length-normalised final scores; a hypothesis ends at a stop token."""

    def __init__(self, cfg: GenerationConfig, batch: int, stop: StopRule, pad: int):
        self.cfg, self.batch, self.stop, self.pad = cfg, batch, stop, pad
        self.k = cfg.num_beams
        self.beams: list[list[int]] = [[] for _ in range(batch * self.k)]
        self.scores: Tensor | None = None
        self.hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        self.sample_done = [False] * batch
        self.steps = 0

    @property
    def done(self) -> bool:
        return all(self.sample_done)

    @property
    def tokens(self) -> list[list[int]]:
        return self.beams

    def _normalised(self, score: float, length: int) -> float:
        return score / (length**self.cfg.length_penalty)

    def step(self, logprobs: Tensor) -> tuple[Tensor, Tensor]:
        k, vocab = self.k, logprobs.shape[-1]
        if self.scores is None:  # all beams start equal: keep only the first alive
            self.scores = torch.full((self.batch, k), float("-inf"), device=logprobs.device)
            self.scores[:, 0] = 0
        self.steps += 1
        candidates = (self.scores[..., None] + logprobs.view(self.batch, k, vocab)).view(self.batch, k * vocab)
        top_scores, top_ids = candidates.topk(2 * k, dim=-1)
        next_tokens = torch.full((self.batch * k,), self.pad, dtype=torch.long, device=logprobs.device)
        reorder = torch.arange(self.batch * k, device=logprobs.device)
        new_scores = torch.full_like(self.scores, float("-inf"))
        new_beams = [list(b) for b in self.beams]
        for b in range(self.batch):
            if self.sample_done[b]:
                continue
            filled = 0
            for score, flat in zip(top_scores[b].tolist(), top_ids[b].tolist()):
                beam, token = divmod(flat, vocab)
                seq = self.beams[b * k + beam] + [token]
                if self.stop(seq):
                    self._add_hyp(b, score, seq)
                    continue
                row = b * k + filled
                next_tokens[row], reorder[row], new_scores[b, filled] = token, b * k + beam, score
                new_beams[row] = seq
                filled += 1
                if filled == k:
                    break
            best_running = new_scores[b].max().item()
            worst_kept = min(s for s, _ in self.hyps[b]) if len(self.hyps[b]) == k else float("-inf")
            if worst_kept >= self._normalised(best_running, self.steps):
                self.sample_done[b] = True
        self.beams, self.scores = new_beams, new_scores
        if self.steps == self.cfg.max_new_tokens:
            for b in range(self.batch):
                for j in range(k):
                    if not self.sample_done[b] and new_scores[b, j] > float("-inf"):
                        self._add_hyp(b, new_scores[b, j].item(), new_beams[b * k + j])
                self.sample_done[b] = True
        return next_tokens, reorder

    def _add_hyp(self, b: int, score: float, seq: list[int]) -> None:
        self.hyps[b].append((self._normalised(score, len(seq)), seq))
        self.hyps[b].sort(key=lambda h: -h[0])
        del self.hyps[b][self.k :]

    def result(self) -> Tensor:
        best = [max(h, key=lambda x: x[0])[1] if h else [] for h in self.hyps]
        return _pad(best, self.pad, self.scores.device if self.scores is not None else None)


def _pad(seqs: list[list[int]], pad: int, device) -> Tensor:
    width = max((len(s) for s in seqs), default=0)
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)

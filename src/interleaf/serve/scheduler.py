"""Continuous (iteration-level) batching, as in Orca and vLLM: one engine thread decodes every
running request together, one token per step in a shared forward pass.

Each iteration:

1. requests cancelled since the last step (a client that went away) leave the batch;
2. waiting requests join, as many as there are free rows: their prompts run through the model
   together, which encodes their images and projects the cross-attention keys/values once
   (:meth:`RunningBatch.join`);
3. every row picks its next token (greedy or with its own sampling settings and seeded
   generator, exactly as ``generate`` picks it for a single prompt), and its text grows;
4. rows that stopped (EOS, end of chunk, a stop string, ``max_new_tokens``) leave at once;
5. the remaining rows run one decoding step together.

A request therefore joins at the next step after it arrives, and never waits for the others to
finish. Requests beyond ``max_batch_size`` wait in a queue of ``max_waiting``; beyond that,
:meth:`Scheduler.submit` refuses them (:class:`Busy`, a 429 for the server).

Events reach the submitter through its ``on_event`` callback, called from the engine thread.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from interleaf.generation import GenerationConfig, StopRule, TextStream, choose_tokens
from interleaf.serve.batch import Prompt, RunningBatch

log = logging.getLogger("interleaf.serve")


class Busy(RuntimeError):
    """Every batch row is taken and the waiting queue is full."""


@dataclass(frozen=True)
class Event:
    """What the engine tells a request: ``text`` (a new piece), ``done`` (with the finish reason
    ``stop`` or ``length`` and the token counts), ``error``, or ``cancelled`` (it left after
    :meth:`Request.cancel`)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: tuple[int, ...] = ()  # done: the generated ids (the stop token included)


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: Prompt
    config: GenerationConfig
    on_event: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        """Leave the batch at the next step (a client that disconnected)."""
        self.cancelled.set()


class _Row:
    """A request in the running batch: its decoding state."""

    def __init__(self, request: Request, model):
        cfg = request.config
        self.request = request
        self.stop = StopRule(model, cfg)
        self.text = TextStream(model.tokenizer, cfg.stop_strings)
        self.generator = None
        if cfg.do_sample and cfg.seed is not None:
            self.generator = torch.Generator(device=model.device).manual_seed(cfg.seed)


class Scheduler:
    def __init__(self, model, *, max_batch_size: int = 16, max_waiting: int = 64, trace: int = 10_000):
        if max_batch_size < 1 or max_waiting < 0:
            raise ValueError("max_batch_size must be >= 1 and max_waiting >= 0")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.batch = RunningBatch(model)
        self.rows: list[_Row] = []
        self.waiting: deque[Request] = deque()
        self._joining: list[Request] = []  # taken from the queue, their prompts running
        # (step, ids of the requests decoded in it): what tests and benchmarks look at
        self.trace: deque[tuple[int, tuple[int, ...]]] = deque(maxlen=trace)
        self.steps = 0
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="interleaf-engine", daemon=True)
        self._thread.start()
        # the engine thread must stop before the interpreter does (torch aborts otherwise)
        atexit.register(_close, weakref.ref(self))

    # -- the submitter's side -----------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue ``request``; it joins the batch at the next step. Raises :class:`Busy`."""
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self.rows) + len(self._joining) + len(self.waiting) >= self.max_batch_size + self.max_waiting:
                raise Busy(
                    f"{len(self.rows)} requests are running and {len(self.waiting)} waiting, the most this "
                    "server accepts; retry later"
                )
            self.waiting.append(request)
            self._wake.notify()

    def stream(self, prompt: Prompt, config: GenerationConfig) -> Iterator[Event]:
        """Submit one request and yield its events until ``done`` (an ``error`` raises
        RuntimeError). Closing the iterator early cancels the request."""
        events: queue.Queue[Event] = queue.Queue()
        request = Request(prompt, config, events.put)
        self.submit(request)
        try:
            while True:
                event = events.get()
                if event.kind == "error":
                    raise RuntimeError(event.text)
                yield event
                if event.kind == "done":
                    return
        finally:
            request.cancel()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests; those joining the batch right now count as running."""
        with self._wake:
            return len(self.rows) + len(self._joining), len(self.waiting)

    def close(self) -> None:
        """Stop the engine thread (running and waiting requests get an error event). Also done
        at interpreter exit, and by ``with Scheduler(model) as scheduler:``."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.rows and not self.waiting:
                    self._wake.wait()
                if self._closed:
                    self._fail(self.rows, "the server is shutting down")
                    self._fail(list(self.waiting), "the server is shutting down")
                    return
            try:
                self._iterate()
            except Exception as e:  # a failed step: its requests get the error, the engine goes on
                log.exception("a decoding step failed; its %d requests get the error", len(self.rows))
                with self._wake:
                    failed, self._joining = self.rows + self._joining, []
                    self.rows = []
                self._fail(failed, f"generation failed: {type(e).__name__}: {e}")
                self.batch = RunningBatch(self.model)
                self._pending = None

    _pending: torch.Tensor | None = None  # the running rows' next-token log-probabilities

    def _iterate(self) -> None:
        # 1. cancelled requests leave
        gone = [i for i, row in enumerate(self.rows) if row.request.cancelled.is_set()]
        for i in gone:
            self.rows[i].request.on_event(Event("cancelled"))
        self._leave(gone)
        # 2. waiting requests join
        with self._wake:
            joining = self._joining
            while self.waiting and len(self.rows) + len(joining) < self.max_batch_size:
                request = self.waiting.popleft()
                if request.cancelled.is_set():
                    request.on_event(Event("cancelled"))
                else:
                    joining.append(request)
        logprobs = self._pending
        if joining:
            fresh, rows = self._join(joining)
            with self._wake:
                self.rows += rows
                self._joining = []
            if rows:
                logprobs = fresh if logprobs is None else torch.cat([logprobs, fresh.to(logprobs.device)])
        if not self.rows:
            self._pending = None
            return
        # 3. every row picks its next token; a row that fails leaves alone, with its error
        self.steps += 1
        self.trace.append((self.steps, tuple(row.request.id for row in self.rows)))
        chosen = logprobs.argmax(-1)
        finished = []
        for i, row in enumerate(self.rows):
            try:
                if row.request.config.do_sample:
                    chosen[i] = choose_tokens(logprobs[i : i + 1], row.request.config, row.generator)[0]
                if self._advance(row, int(chosen[i])):
                    finished.append(i)
            except Exception as e:
                log.exception("request %d failed", row.request.id)
                row.request.on_event(Event("error", f"generation failed: {type(e).__name__}: {e}"))
                finished.append(i)
        # 4. finished rows leave at once; 5. the rest decode one step together
        self._pending = logprobs
        keep = [i for i in range(len(self.rows)) if i not in set(finished)]
        self._leave(finished)
        if self.rows:
            self._pending = self.batch.step(chosen[keep])

    def _join(self, requests: list[Request]) -> tuple[torch.Tensor | None, list[_Row]]:
        """Run the prompts of ``requests`` into the batch; their first log-probabilities and rows.
        A request that cannot join gets its error and is dropped; the others join."""
        rows = []
        for request in requests:
            try:
                rows.append(_Row(request, self.model))
            except Exception as e:
                request.on_event(Event("error", f"the request cannot start: {type(e).__name__}: {e}"))
        if not rows:
            return None, []
        try:
            return self.batch.join([row.request.prompt for row in rows]), rows
        except Exception as e:
            log.exception("the prompts of %d requests failed", len(rows))
            for row in rows:
                row.request.on_event(Event("error", f"the prompt failed: {type(e).__name__}: {e}"))
            return None, []

    def _advance(self, row: _Row, token: int) -> bool:
        """Give ``row`` its next token and its request the new text; whether it is finished."""
        request = row.request
        request.tokens.append(token)
        stopped = row.stop(request.tokens)
        if not stopped and len(request.tokens) < request.config.max_new_tokens:
            if piece := row.text.update(request.tokens):
                request.on_event(Event("text", piece))
            return False
        if piece := row.text.finish(request.tokens):
            request.on_event(Event("text", piece))
        request.on_event(
            Event(
                "done",
                finish_reason="stop" if stopped else "length",
                prompt_tokens=len(request.prompt.input_ids),
                completion_tokens=len(request.tokens),
                tokens=tuple(request.tokens),
            )
        )
        return True

    def _leave(self, rows: list[int]) -> None:
        if not rows:
            return
        self.batch.leave(rows)
        gone = set(rows)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        if self._pending is not None:
            self._pending = self._pending[keep] if keep else None

    def _fail(self, rows: list, message: str) -> None:
        for row in rows:
            request = row.request if isinstance(row, _Row) else row
            request.on_event(Event("error", message))


def _close(ref: weakref.ref) -> None:
    scheduler = ref()
    if scheduler is not None:
        scheduler.close()

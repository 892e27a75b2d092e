"""The HTTP server: OpenAI's ``/v1/chat/completions`` (plain and streamed), ``/v1/models``,
``/health`` and the chat page at ``/``, over one continuous-batching :class:`Scheduler`.

Every error, the framework's own included (an unknown route, a wrong method, a request
validation error), leaves in OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.
The API key, when set, is a bearer token compared in constant time; ``/health`` and the page
need none (the page asks for it and sends it with each call).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from interleaf.processing import Processor, chat_stop_strings, special_tokens_in
from interleaf.serve.batch import Prompt, max_sequence_length
from interleaf.serve.chat import load
from interleaf.serve.protocol import APIError, ChatRequest, Limits, bad, error_body, parse_request
from interleaf.serve.scheduler import Busy, Event, Scheduler
from interleaf.serve.scheduler import Request as EngineRequest


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    model_name: str
    api_key: str | None = None
    allow_remote_images: bool = False
    limits: Limits = field(default_factory=Limits)


def create_app(model, processor: Processor, options: ServeOptions) -> FastAPI:
    """The app, with its scheduler started; the scheduler stops when the app shuts down."""
    scheduler = Scheduler(model, max_batch_size=options.limits.max_batch_size, max_waiting=options.limits.max_waiting)
    server = _Server(model, processor, options, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="interleaf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"invalid request: {first.get('msg', exc)}", param=param), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        message = f"internal error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(message, type="server_error"), status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        running, waiting = scheduler.load()
        return {
            "status": "ok",
            "model": options.model_name,
            "running": running,
            "waiting": waiting,
            "api_key_required": options.api_key is not None,
            "limits": dataclasses.asdict(options.limits),
            "context_length": server.max_length,  # prompt + answer, in tokens (None: no limit known)
        }

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        server.authorize(request)
        server.check_model(name, param=None)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.authorize(request)
        body = await _read_body(request, options.limits.max_request_bytes)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
            reason = "it nests too deeply" if isinstance(e, RecursionError) else str(e)[:200]
            raise bad(f"the request body is not valid JSON: {reason}", code="invalid_json") from None
        server.check_model(data.get("model") if isinstance(data, dict) else None, param="model", required=False)
        chat = await run_in_threadpool(server.read, data)
        prompt, config = await run_in_threadpool(server.prepare, chat)
        return await server.respond(request, chat, prompt, config)

    return app


_PAGE = Path(str(resources.files("interleaf.serve") / "static" / "index.html"))


class _Server:
    def __init__(self, model, processor: Processor, options: ServeOptions, scheduler: Scheduler):
        self.model, self.processor, self.options, self.scheduler = model, processor, options, scheduler
        self.limits = options.limits
        self.created = int(time.time())
        self.chat_stops = chat_stop_strings(processor.tokenizer)
        self.max_length = max_sequence_length(model)

    # -- checks -------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())
        if not ok:
            message = "Incorrect API key provided" if header else "Missing API key: send 'Authorization: Bearer KEY'"
            raise APIError(401, message, code="invalid_api_key")

    def check_model(self, name, *, param: str | None, required: bool = True) -> None:
        if name is None and not required:
            return  # the request's reader says what is missing
        if isinstance(name, str) and name and name != self.options.model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.options.model_name}'",
                param=param,
                code="model_not_found",
            )

    def model_card(self) -> dict:
        return {"id": self.options.model_name, "object": "model", "created": self.created, "owned_by": "interleaf"}

    # -- a request ----------------------------------------------------------------------------

    def read(self, data) -> ChatRequest:
        remote = self._fetch if self.options.allow_remote_images else None
        chat = parse_request(data, self.limits, image_token=self.processor.tokens.image, remote_images=remote)
        self.check_model(chat.model, param="model")
        return chat

    def prepare(self, chat: ChatRequest):
        """The prompt (tokens and pixels) and the generation settings, or a 400."""
        for m, message in enumerate(chat.conversation):
            for item in message["content"]:
                found = isinstance(item, str) and special_tokens_in(item, self.processor.tokenizer)
                if found:
                    raise bad(
                        f"messages[{m}] contains {found[0]!r}, one of the model's special tokens, which a "
                        "message may not write (it could forge a turn of the conversation)",
                        param=f"messages[{m}].content",
                        code="special_token_in_text",
                    )
        try:
            batch = self.processor([chat.conversation])
        except ValueError as e:
            raise bad(str(e).replace("prompt 0, ", ""), param="messages") from None
        ids = batch["input_ids"][0]
        n_tokens = len(ids)
        if n_tokens > self.limits.max_prompt_tokens:
            raise bad(
                f"the prompt is {n_tokens} tokens, more than this server's limit of {self.limits.max_prompt_tokens}",
                param="messages",
                code="context_length_exceeded",
            )
        room = self.limits.max_tokens if self.max_length is None else self.max_length - n_tokens
        if room < 1 or (chat.max_tokens is not None and chat.max_tokens > room):
            raise bad(
                f"the prompt is {n_tokens} tokens and the model reads at most {self.max_length}: "
                f"{'no room is left' if room < 1 else f'at most {room} new tokens fit'}",
                param="max_tokens" if room >= 1 else "messages",
                code="context_length_exceeded",
            )
        max_new = chat.max_tokens or min(self.limits.max_tokens, room)
        try:
            config = chat.generation_config(max_new, self.chat_stops)
        except ValueError as e:
            raise bad(str(e)) from None
        count = int(self.processor.num_images(batch["input_ids"])[0])
        pixels = batch["pixel_values"][0, :count] if count else None
        return Prompt(ids, pixels), config

    def _fetch(self, url: str, param: str) -> bytes:
        limit = self.limits.max_image_bytes
        try:
            with httpx.stream("GET", url, timeout=self.limits.remote_image_timeout, follow_redirects=True) as r:
                if r.status_code != 200:
                    raise bad(f"{param}: fetching {url} gave HTTP {r.status_code}", param=param, code="invalid_image")
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise bad(
                            f"{param}: the image is larger than {limit:,} bytes", param=param, code="image_too_large"
                        )
                return bytes(data)
        except APIError:
            raise
        except Exception as e:  # httpx.HTTPError, httpx.InvalidURL, ...: the URL's fault, not ours
            raise bad(f"{param}: cannot fetch {url[:200]}: {e}", param=param, code="invalid_image") from None

    async def respond(self, request: Request, chat: ChatRequest, prompt: Prompt, config):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = EngineRequest(prompt, config, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            self.scheduler.submit(job)
        except Busy as e:
            raise APIError(429, str(e), type="rate_limit_error", code="server_busy") from None
        reply = _Reply(self.options.model_name)
        if chat.stream:
            return StreamingResponse(
                self._stream(job, events, reply, chat.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(_cancel_when_gone(request, job))
        try:
            text = []
            while True:
                event = await events.get()
                if event.kind == "text":
                    text.append(event.text)
                elif event.kind == "error":
                    raise APIError(500, event.text, type="server_error")
                elif event.kind == "cancelled":  # the client has gone: nobody reads this
                    return JSONResponse(error_body("the client disconnected", code="client_disconnected"), 499)
                else:
                    return reply.completion("".join(text), event)
        finally:
            watcher.cancel()
            job.cancel()

    async def _stream(self, job: EngineRequest, events: asyncio.Queue, reply: _Reply, include_usage: bool):
        try:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}))
            while True:
                event = await events.get()
                if event.kind == "text":
                    yield _sse(reply.chunk({"content": event.text}))
                elif event.kind in ("error", "cancelled"):
                    yield _sse(error_body(event.text or "cancelled", type="server_error"))
                    break
                else:
                    yield _sse(reply.chunk({}, finish_reason=event.finish_reason))
                    if include_usage:
                        yield _sse({**reply.chunk(None), "choices": [], "usage": _usage(event)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away frees its row at the next step


async def _cancel_when_gone(request: Request, job: EngineRequest, every: float = 0.1) -> None:
    """Cancel ``job`` once the client of a non-streamed request has gone (timed out, killed)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    job.cancel()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(event: Event) -> dict:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


class _Reply:
    """The response objects of one completion: one id and creation time for all its chunks."""

    def __init__(self, model_name: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def chunk(self, delta: dict | None, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def completion(self, text: str, done: Event) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(done)}


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_big = APIError(
        413, f"the request body exceeds this server's limit of {limit:,} bytes", code="request_too_large"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def run(
    model_dir: str,
    *,
    host: str,
    port: int,
    options: ServeOptions,
    device: str,
    dtype: str | None,
    log_level: str = "info",
) -> None:
    """``interleaf serve``: take the port (before the model loads, so that a port in use fails at
    once), load the model, then serve until interrupted."""
    listener = bind(host, port)
    model, processor = load(model_dir, device=device, dtype=dtype)
    app = create_app(model, processor, options)
    bound = listener.getsockname()[1]
    where = f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
    print(f"interleaf serve: model '{options.model_name}' on {model.device}, {model.dtype}")
    print(f"  chat page   {where}/")
    print(f"  API         {where}/v1/chat/completions (OpenAI-compatible)")
    if options.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"  warning: listening on {host} without an API key (--api-key or INTERLEAF_API_KEY)")
    print("  Ctrl-C stops", flush=True)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has shut down, re-raising it
        uvicorn.Server(config).run(sockets=[listener])


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port), or a one-line ValueError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return listener

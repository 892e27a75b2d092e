"""OpenAI's chat-completions protocol: reading a request into a conversation the processor
takes and the settings of one generation, every limit checked on the way, and OpenAI's error
body for every refusal.

What a request may hold (everything else is refused by name, never silently ignored):
``model``, ``messages``, ``max_tokens`` / ``max_completion_tokens``, ``temperature``,
``top_p``, ``stop``, ``seed``, ``n`` (1), ``stream``, ``stream_options.include_usage``,
``user``; and, at their neutral values only, ``frequency_penalty``, ``presence_penalty``,
``logit_bias``, ``logprobs``, ``top_logprobs``, ``response_format`` (text), ``tools``,
``tool_choice``, ``parallel_tool_calls``.

A message's ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": ...}}`` (the url a ``data:image/...;base64,``
URL; an ``http(s)`` URL only when the server allows remote images). Images go where their parts
are; or, when a message's text holds ``<image>`` placeholders, in their places, in order (then
the message must have exactly one image part per placeholder).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from interleaf.generation import GenerationConfig
from interleaf.images import ImageError, load_image


class APIError(Exception):
    """A refusal, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may ask of the server (``interleaf serve --help`` names each flag)."""

    max_request_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 16_000_000
    max_images: int = 8
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024  # the most a request may ask for; also what it gets when it does not say
    max_batch_size: int = 16  # requests decoded together
    max_waiting: int = 64  # requests queued beyond those; more get a 429
    remote_image_timeout: float = 10.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0 and not (name == "max_waiting" and value == 0):
                raise ValueError(f"serve limits: {name} must be > 0, got {value}")


@dataclass
class ChatRequest:
    """A request read: the conversation (processor form, images decoded) and the settings."""

    model: str
    conversation: list[dict]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None

    def generation_config(self, max_new_tokens: int, chat_stops: tuple[str, ...]) -> GenerationConfig:
        """``temperature`` 0 is greedy decoding (OpenAI's convention); top_p applies when sampling."""
        sample = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=self.temperature if sample else 1.0,
            top_p=self.top_p if sample else 1.0,
            seed=self.seed,
            stop_strings=tuple(dict.fromkeys((*self.stop, *chat_stops))),
        )


_KNOWN = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
}
# Parameters OpenAI defines that this server does not implement: accepted at these values only.
_NEUTRAL = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)


def parse_request(body: Any, limits: Limits, *, image_token: str, remote_images=None) -> ChatRequest:
    """Read a decoded JSON body; raises :class:`APIError` (400) naming the offending parameter.
    ``remote_images(url, param) -> bytes`` fetches http(s) images, None when they are refused."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_json_type(body)}")
    for key in body:
        if key in _NEUTRAL:
            if body[key] not in _NEUTRAL[key]:
                raise bad(f"{key}={body[key]!r} is not supported by this server", param=key, code="unsupported_value")
        elif key not in _KNOWN:
            raise bad(f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the name /v1/models lists", param="model", code="missing_required_parameter")
    n = _number(body, "n", 1, integer=True)
    if n != 1:
        raise bad("n must be 1: this server returns one choice per request", param="n", code="unsupported_value")
    max_tokens = None
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            max_tokens = _number(body, key, None, integer=True)
            if max_tokens < 1 or max_tokens > limits.max_tokens:
                raise bad(f"{key} must be in [1, {limits.max_tokens}], got {max_tokens}", param=key)
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise bad(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad(f"seed must be an integer, got {_json_type(seed)}", param="seed")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise bad("seed must be in [-2**63, 2**64)", param="seed")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad(f"stream must be a boolean, got {_json_type(stream)}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options takes only include_usage", param="stream_options")
    if options and not stream:
        raise bad("stream_options is only allowed with stream: true", param="stream_options")
    stop = _stop(body.get("stop"))
    conversation = _messages(body.get("messages"), limits, image_token, remote_images)
    return ChatRequest(
        model=model,
        conversation=conversation,
        stream=bool(stream),
        include_usage=bool(options.get("include_usage", False)),
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        stop=stop,
        seed=seed,
    )


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _number(body: dict, key: str, default, *, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad(f"{key} must be {'an integer' if integer else 'a number'}, got {_json_type(value)}", param=key)
    if not math.isfinite(value):
        raise bad(f"{key} must be finite", param=key)
    return value


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("stop must be a non-empty string or a list of up to 4 non-empty strings", param="stop")
    return tuple(stops)


def _messages(messages: Any, limits: Limits, image_token: str, remote_images) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", param="messages", code="missing_required_parameter")
    conversation, images = [], 0
    for m, message in enumerate(messages):
        at = f"messages[{m}]"
        if not isinstance(message, dict):
            raise bad(f"{at} must be an object, got {_json_type(message)}", param=at)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad(f"{at}: unsupported field(s) {', '.join(sorted(extra))}", param=f"{at}.{sorted(extra)[0]}")
        role = message.get("role")
        if role not in _ROLES:
            raise bad(f"{at}.role must be one of {', '.join(_ROLES)}, got {role!r}", param=f"{at}.role")
        items = _content(message.get("content"), f"{at}.content", limits, image_token, remote_images)
        images += sum(1 for item in items if not isinstance(item, str))
        if images > limits.max_images:
            raise bad(
                f"too many images: more than {limits.max_images} in this request", param=at, code="too_many_images"
            )
        if _ROLES[role] != "user" and len(items) != sum(isinstance(i, str) for i in items):
            raise bad(f"{at}: only user messages may hold images", param=f"{at}.content")
        conversation.append({"role": _ROLES[role], "content": items})
    return conversation


def _content(content: Any, at: str, limits: Limits, image_token: str, remote_images) -> list:
    """The message's items for the processor: strings and PIL images, in order."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise bad(f"{at} must be a string or an array of content parts, got {_json_type(content)}", param=at)
    texts, images = [], []
    order = []
    for p, part in enumerate(parts):
        where = f"{at}[{p}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{where}.text must be a string", param=f"{where}.text")
            texts.append(text)
            order.append(("text", text))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad(f"{where}.image_url.url must be a string", param=f"{where}.image_url")
            image = _image(url, f"{where}.image_url", limits, remote_images)
            images.append(image)
            order.append(("image", image))
        else:
            raise bad(
                f"{where} must be a content part with type 'text' or 'image_url', got {kind or _json_type(part)!r}",
                param=where,
            )
    placeholders = sum(t.count(image_token) for t in texts)
    if not placeholders:
        return [value for _, value in order]
    if placeholders != len(images):
        raise bad(
            f"{at} has {placeholders} {image_token} placeholder(s) but {len(images)} image part(s); "
            "each placeholder takes one image, in order",
            param=at,
            code="image_count_mismatch",
        )
    items, queue = [], list(images)
    for kind, value in order:
        if kind == "text":
            pieces = value.split(image_token)
            for i, piece in enumerate(pieces):
                if piece:
                    items.append(piece)
                if i < len(pieces) - 1:
                    items.append(queue.pop(0))
    return items


def _image(url: str, param: str, limits: Limits, remote_images) -> Image.Image:
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if match is None:
            raise bad(f"{param}: a data URL must be data:<mime type>;base64,<data>", param=param, code="invalid_image")
        encoded = re.sub(r"\s+", "", match["data"])
        if len(encoded) * 3 // 4 > limits.max_image_bytes + 3:
            raise bad(
                f"{param}: the image is larger than {limits.max_image_bytes:,} bytes",
                param=param,
                code="image_too_large",
            )
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{param}: the data URL is not valid base64", param=param, code="invalid_image") from None
    elif url[:8].lower().startswith(("http://", "https://")):
        if remote_images is None:
            raise bad(
                f"{param}: remote image URLs are disabled on this server; send the image as a data: URL "
                "(or start the server with --allow-remote-images)",
                param=param,
                code="remote_images_disabled",
            )
        raw = remote_images(url, param)
    else:
        raise bad(f"{param}: the url must be a data: URL or an http(s) URL", param=param, code="invalid_image")
    if len(raw) > limits.max_image_bytes:
        raise bad(
            f"{param}: the image is larger than {limits.max_image_bytes:,} bytes", param=param, code="image_too_large"
        )
    try:
        return load_image(raw, param, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        code = "image_too_large" if e.reason == "huge_image" else "invalid_image"
        raise bad(str(e), param=param, code=code) from None

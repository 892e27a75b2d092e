"""Processor: prompts -> ``input_ids``, ``attention_mask`` and ``pixel_values`` for the model.

A prompt takes one of three forms (``processor(prompt)`` or ``processor([prompt, ...])``):

1. An interleaved list of items: ``["A photo of", image, "and", Path("dog.png")]``. An item is
   text (``str`` or ``{"text": str}``) or an image: ``PIL.Image.Image``, ``pathlib.Path``,
   ``bytes`` (an encoded file), a ``numpy.ndarray`` (HxW or HxWxC uint8, C in 1, 3, 4) or
   ``{"image": ...}`` holding any of those or a ``str`` path. A plain ``str`` item is always
   text: give image paths as ``Path`` or ``{"image": "path"}``. Text items are joined as given,
   and must not contain the image token itself (pass images as items instead).
2. Text with image placeholders plus separate images:
   ``processor("<image>Output: a cat.<|endofchunk|><image>Output:", images=[a, b])``, or a batch
   ``processor([s1, s2], images=[[a, b], [c]])``. There, since nothing is text, a ``str`` image is
   a path. The number of placeholders must equal the number of images.
3. A chat conversation: ``[{"role": "user", "content": [{"image": "cat.png"}, "What is this?"]},
   {"role": "assistant", "content": "A cat."}]`` with roles system, user and assistant, and
   content a ``str`` or a list of items as in form 1. With a tokenizer chat template the
   conversation is rendered by it; otherwise by :data:`PLAIN_CHAT_FORMAT`.

A list is read as a batch when all its elements are ``str`` or any of them is a list; a list
of dicts with ``"role"``/``"content"`` is one conversation; any other list is one interleaved
prompt.

Each image is written into the text as ``tokens.image_prompt``; when that wraps the image
token in one repeated token (IDEFICS: ``<fake_token_around_image><image><fake_token_around_image>``),
consecutive images share the wrapping token between them, as IDEFICS writes them. Images
are converted to RGB (transparent pixels become white) and then resized, cropped and
normalised by the vision encoder's own HF image processor (decoded by
:func:`interleaf.images.load_image`, as the data pipeline decodes them). Every bad input raises a
``ValueError`` naming the prompt and the item.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import AutoImageProcessor, AutoTokenizer, BaseImageProcessor, BatchFeature, PreTrainedTokenizerBase

from interleaf.config import TokensConfig, from_dict
from interleaf.hub import native
from interleaf.images import load_image, load_image_processor
from interleaf.tokens import prepare_tokenizer, special_prefix, token_ids

PLAIN_CHAT_FORMAT = {
    "system": "System: {text}<end_of_utterance>\n",
    "user": "User: {text}<end_of_utterance>\n",
    "assistant": "Assistant: {text}<end_of_utterance>\n",
}
"""How a conversation is written when the tokenizer has no chat template (IDEFICS-instruct
style): one line per message, in order; :data:`PLAIN_CHAT_GENERATION_PROMPT` follows when the
last message is not the assistant's. Add ``"<end_of_utterance>"`` to ``TokensConfig.extra`` to
make it a single token."""
PLAIN_CHAT_GENERATION_PROMPT = "Assistant:"

CONFIG_FILE = "processor_config.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILE = "tokenizer_config.json"

PaddingSide = Literal["left", "right"]
ChatBos = Literal["text", "tokenizer"]
DEFAULT_TOKENS = TokensConfig()
ITEM_TYPES = "str (text), PIL.Image.Image, pathlib.Path, bytes, numpy.ndarray, {'image': ...} or {'text': ...}"


@dataclass(frozen=True, kw_only=True)
class _SavedConfig:
    """The content of ``processor_config.json``."""

    tokens: TokensConfig = field(default_factory=TokensConfig)
    padding_side: PaddingSide = "left"
    chat_system: str | None = None
    chat_bos: ChatBos = "text"
    placeholder_image: bool = False


@dataclass
class _Sample:
    """One prompt as text, with ``tokens.image`` where each image goes, and its images in order."""

    text: str
    images: list[Image.Image]
    add_special_tokens: bool = True


class Processor:
    """Turns prompts (interleaved lists, text with placeholders, chat) into model inputs.

    ``tokenizer`` gets the special tokens of ``tokens`` added in place (see
    :func:`interleaf.tokens.prepare_tokenizer`); ``image_processor`` is the vision encoder's HF
    image processor, e.g. ``AutoImageProcessor.from_pretrained(vision_dir)``.

    Three options reproduce a model family's own prompt format (InfiMM sets all three):
    ``chat_system``, a system message with this text opening every conversation that does not
    start with one; ``chat_bos``, how the tokenizer's BOS enters a rendered conversation:
    ``"text"`` writes it into the text, which is tokenized without special tokens (what
    ``apply_chat_template(tokenize=True)`` does), ``"tokenizer"`` tokenizes the rendered text with
    the tokenizer's own special tokens; ``placeholder_image``, a prompt without images carries
    one black image in ``pixel_values`` (no token sees it, so it changes no output).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: BaseImageProcessor,
        *,
        tokens: TokensConfig = DEFAULT_TOKENS,
        padding_side: PaddingSide = "left",
        chat_system: str | None = None,
        chat_bos: ChatBos = "text",
        placeholder_image: bool = False,
    ) -> None:
        if tokens.image_prompt.count(tokens.image) != 1:
            raise ValueError(
                f"tokens.image_prompt {tokens.image_prompt!r} must contain the image token {tokens.image!r} once"
            )
        _check_padding_side(padding_side)
        if chat_bos not in ("text", "tokenizer"):
            raise ValueError(f"chat_bos must be 'text' or 'tokenizer', got {chat_bos!r}")
        prepare_tokenizer(tokenizer, tokens)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens = tokens
        self.padding_side = padding_side
        self.chat_system = chat_system
        self.chat_bos = chat_bos
        self.placeholder_image = placeholder_image
        self.ids = token_ids(tokenizer, tokens)

    @classmethod
    def from_backbones(
        cls,
        lm_source: str,
        vision_source: str,
        *,
        tokens: TokensConfig = DEFAULT_TOKENS,
        padding_side: PaddingSide = "left",
    ) -> Processor:
        """The LM's tokenizer and the vision encoder's image processor, each a hub id or a directory."""
        tokenizer = AutoTokenizer.from_pretrained(lm_source)
        image_processor = AutoImageProcessor.from_pretrained(vision_source)
        return cls(tokenizer, image_processor, tokens=tokens, padding_side=padding_side)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        """Load what :meth:`save_pretrained` wrote, from a directory or hub id."""
        directory = native(path)
        for name in (CONFIG_FILE, IMAGE_PROCESSOR_FILE, TOKENIZER_FILE):
            if not (directory / name).is_file():
                raise ValueError(f"{path}: no {name} in this directory; write it with Processor.save_pretrained")
        config_file = directory / CONFIG_FILE
        try:
            data = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_file}: cannot read the processor config: {e}") from None
        config = from_dict(_SavedConfig, data, where=str(config_file))
        tokenizer = AutoTokenizer.from_pretrained(directory)
        image_processor = load_image_processor(directory)
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return cls(tokenizer, image_processor, **options)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer, ``preprocessor_config.json`` and ``processor_config.json`` to ``path``."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        config = _SavedConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(_SavedConfig)})
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")

    def __call__(
        self,
        prompts: Any,
        *,
        images: Sequence[Any] | None = None,
        padding_side: PaddingSide | None = None,
        return_tensors: Literal["pt", "np"] = "pt",
    ) -> BatchFeature:
        """Encode one prompt or a batch (see the module docstring for the forms).

        Returns ``input_ids`` and ``attention_mask`` (B, T), padded on ``padding_side`` (default:
        the processor's) with the pad token, and ``pixel_values`` (B, N_max, C, H, W) with the
        images of each prompt in text order and zeros in the slots beyond its image count.
        """
        side = padding_side or self.padding_side
        _check_padding_side(side)
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        batch, batched = _as_batch(prompts)
        per_prompt = _images_per_prompt(images, len(batch), batched)
        samples = [self._sample(prompt, imgs, p) for p, (prompt, imgs) in enumerate(zip(batch, per_prompt))]
        rows = [self.tokenizer(s.text, add_special_tokens=s.add_special_tokens)["input_ids"] for s in samples]
        input_ids, attention_mask = _pad(rows, self.tokenizer.pad_token_id, side)
        data = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": self.pixel_values([s.images for s in samples]),
        }
        return BatchFeature(data, tensor_type=return_tensors)

    def preprocess_images(self, images: Sequence[Image.Image]) -> Tensor:
        """(N, C, H, W) float pixels of RGB images, from the image processor."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        pixels = out["pixel_values"] if isinstance(out, Mapping) else out  # IDEFICS returns the tensor
        if pixels.ndim != 4:
            raise ValueError(
                f"{type(self.image_processor).__name__} returned pixel_values of shape {tuple(pixels.shape)}; "
                "interleaf needs one (C, H, W) image per input image"
            )
        return pixels.float()

    def num_images(self, input_ids: Tensor) -> Tensor:
        """(B,) long: the number of image tokens in each row, i.e. its number of real images."""
        return (input_ids == self.ids.image).sum(dim=-1)

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        """The tokenizer's ``batch_decode``."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """The tokenizer's ``decode``."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def _sample(self, prompt: Any, images: list[Any], p: int) -> _Sample:
        where = f"prompt {p}"
        if isinstance(prompt, str):
            sources = [Path(x) if isinstance(x, str) else x for x in images]
            sample = _Sample(prompt, [_image(x, f"{where}, image {j}") for j, x in enumerate(sources)])
        elif images:
            raise ValueError(
                f"{where}: images= goes with text prompts that mark images with {self.tokens.image!r}; "
                "put the images of an interleaved list or a conversation into the prompt itself"
            )
        elif not isinstance(prompt, (list, tuple)):
            raise ValueError(
                f"{where}: unsupported prompt type {type(prompt).__name__}; expected a str, "
                "an interleaved list of items or a conversation (a list of messages)"
            )
        elif _is_conversation(prompt):
            sample = self._chat(prompt, where)
        else:
            sample = _Sample(*self._interleaved(prompt, where))
        if not sample.text:
            raise ValueError(f"{where} is empty: it has no text, images or messages")
        found = sample.text.count(self.tokens.image)
        if found != len(sample.images):
            raise ValueError(
                f"{where}: {found} {self.tokens.image!r} placeholders in the text != {len(sample.images)} images; "
                "each placeholder takes one image, in order"
            )
        sample.text = self.write_images(sample.text)
        return sample

    def _interleaved(self, items: Sequence[Any], where: str) -> tuple[str, list[Image.Image]]:
        """The text (``tokens.image`` per image) and the images of a list of items."""
        parts, images = [], []
        last_was_text = False
        for i, item in enumerate(items):
            at = f"{where}, item {i}"
            kind, value = _classify(item, at)
            if kind == "text":
                if self.tokens.image in value:
                    raise ValueError(
                        f"{at}: the text contains the image token {self.tokens.image!r}, which is ambiguous "
                        'here; pass each image as an item of the list, e.g. ["Look:", image, "What is it?"]'
                    )
                if last_was_text:
                    parts.append(self.tokens.text_separator)
                parts.append(value.strip(" ") if self.tokens.strip_text else value)
            else:
                images.append(_image(value, at))
                parts.append(self.tokens.image)
            last_was_text = kind == "text"
        return "".join(parts), images

    def _chat(self, messages: Sequence[Any], where: str) -> _Sample:
        """Render a conversation with the tokenizer's chat template, or the plain format."""
        flat, images = [], []
        for m, message in enumerate(messages):
            role, content = _check_message(message, f"{where}, message {m}")
            text, found = self._interleaved(content, f"{where}, message {m}")
            flat.append({"role": role, "content": text})
            images += found
        by_tokenizer = self.chat_bos == "tokenizer"
        try:
            text = render_chat(
                self.tokenizer,
                flat,
                generation=flat[-1]["role"] != "assistant",
                system=self.chat_system,
                prefix=not by_tokenizer,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"{where}: the tokenizer's chat template rejects this conversation: {e}") from None
        return _Sample(text, images, add_special_tokens=by_tokenizer)

    def write_images(self, text: str) -> str:
        """Replace each image token by ``tokens.image_prompt``, sharing a repeated wrapper token
        between consecutive images. An image already written out in full (InfiMM's
        ``<|endofchunk|><image>``) counts as one image, not wrapped twice."""
        image = self.tokens.image
        before, _, after = self.tokens.image_prompt.partition(image)
        if before != after:
            text = text.replace(self.tokens.image_prompt, image)
        if not before or before != after:
            return text.replace(image, self.tokens.image_prompt)
        run = re.compile(f"(?:{re.escape(image)})+")
        return run.sub(lambda m: before + (image + after) * (len(m.group()) // len(image)), text)

    def pixel_values(self, images: list[list[Image.Image]]) -> Tensor:
        """(B, N_max, C, H, W), zeros beyond each prompt's own images (with
        ``placeholder_image``, a prompt without images has a black one in its first slot)."""
        if self.placeholder_image:
            images = [sample or [Image.new("RGB", _placeholder_size(self.image_processor))] for sample in images]
        flat = [im for sample in images for im in sample]
        # with no image in the batch, a blank one gives the processor's output shape
        pixels = self.preprocess_images(flat or [Image.new("RGB", (64, 64))])
        out = pixels.new_zeros(len(images), max(map(len, images)), *pixels.shape[1:])
        start = 0
        for b, sample in enumerate(images):
            out[b, : len(sample)] = pixels[start : start + len(sample)]
            start += len(sample)
        return out


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    *,
    generation: bool,
    system: str | None = None,
    prefix: bool = True,
) -> str:
    """A conversation (messages with ``str`` content) as the text the model reads, starting with
    the tokenizer's own special prefix (its BOS, if it adds one; not with ``prefix=False``):
    through the tokenizer's chat template, or :data:`PLAIN_CHAT_FORMAT` without one; with
    ``generation``, the prompt for the assistant's next turn follows; with ``system``, a system
    message of that text comes first unless the conversation starts with one. The one renderer
    of training (``data.collate``) and inference, so that both see the same token ids; tokenize
    the result with ``add_special_tokens=False`` (with ``prefix=False``: ``True``)."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    prefix = special_prefix(tokenizer) if prefix else ""
    if tokenizer.chat_template:
        text = (
            tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)
            if messages
            else ""
        )
        return text if text.startswith(prefix) else prefix + text
    turns = "".join(PLAIN_CHAT_FORMAT[m["role"]].format(text=m["content"]) for m in messages)
    return prefix + turns + (PLAIN_CHAT_GENERATION_PROMPT if generation else "")


def special_tokens_in(text: str, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special tokens (``</s>``, ``<|endofchunk|>``, a chat template's turn
    markers, ...) that ``text`` writes out: a user's message that holds one could end its turn
    and write the assistant's. Servers refuse such messages."""
    specials = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    }
    return sorted(t for t in specials if t and t in text)


def chat_stop_strings(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Where the assistant's turn ends in the model's chat format, as stop strings for
    generation: the text a rendered assistant message ends with (``<end_of_utterance>`` in the
    plain, IDEFICS-instruct format; ``<|im_end|>``, ``</s>``, ``<|eot_id|>``, ... in a chat
    template), and the start of the user's next turn (``\nUser:`` in the plain format)."""
    probe = "\x00probe\x00"
    text = render_chat(
        tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], generation=False
    )
    after = text[text.rindex(probe) + len(probe) :].strip()
    stops = [after] if after else []
    if not tokenizer.chat_template:
        stops.append("\n" + PLAIN_CHAT_FORMAT["user"].split("{text}")[0].strip())
    return tuple(stops)


def _placeholder_size(image_processor: BaseImageProcessor) -> tuple[int, int]:
    """(width, height) of the images the processor outputs (a black image stays black at any size)."""
    crop = getattr(image_processor, "crop_size", None) or {}
    size = getattr(image_processor, "size", None) or {}
    side = crop.get("height") or size.get("shortest_edge") or size.get("height") or 224
    return side, crop.get("width") or side


def interleaved_items(items: Sequence[Any], where: str = "prompt") -> list[str | Image.Image]:
    """The items of an interleaved list as text and RGB images (paths and ``{"image": ...}`` read)."""
    if isinstance(items, str) or not isinstance(items, (list, tuple)):
        raise ValueError(f"{where}: expected an interleaved list of text and images, got {type(items).__name__}")
    out: list[str | Image.Image] = []
    for i, item in enumerate(items):
        kind, value = _classify(item, f"{where}, item {i}")
        out.append(value if kind == "text" else _image(value, f"{where}, item {i}"))
    return out


def _image(source: Any, where: str) -> Image.Image:
    """An RGB image from a prompt item (see :func:`interleaf.images.load_image`)."""
    if not isinstance(source, (Image.Image, Path, bytes, bytearray, np.ndarray)):
        raise ValueError(f"{where}: unsupported item type {type(source).__name__}; expected {ITEM_TYPES}")
    return load_image(source, where)


def _classify(item: Any, where: str) -> tuple[Literal["text", "image"], Any]:
    """Whether an interleaved item is text or an image, and its value (a ``str`` path as ``Path``)."""
    if isinstance(item, str):
        return "text", item
    if not isinstance(item, dict):
        return "image", item
    kind, value = _dict_item(item, where)
    return kind, Path(value) if kind == "image" and isinstance(value, str) else value


def _dict_item(item: dict, where: str) -> tuple[Literal["text", "image"], Any]:
    """``("image", source)`` or ``("text", str)`` for ``{"image": ...}`` / ``{"text": ...}``; an
    optional ``"type"`` key (HF chat content style) must name the same kind."""
    kinds = [k for k in ("image", "text") if k in item]
    if len(kinds) != 1 or set(item) - {"image", "text", "type"} or item.get("type", kinds[0]) != kinds[0]:
        raise ValueError(
            f"{where}: a dict item is {{'image': ...}} or {{'text': str}} (with an optional matching 'type'), "
            f"got keys {sorted(item)}"
        )
    kind = kinds[0]
    if kind == "text" and not isinstance(item["text"], str):
        raise ValueError(f"{where}: 'text' must be a str, got {type(item['text']).__name__}")
    return kind, item[kind]


def _check_message(message: Any, where: str) -> tuple[str, list[Any]]:
    """The role and the content items of a chat message."""
    if not isinstance(message, dict) or set(message) != {"role", "content"}:
        got = f"keys {sorted(message)}" if isinstance(message, dict) else type(message).__name__
        raise ValueError(f"{where}: a message is a dict with the keys 'role' and 'content', got {got}")
    role, content = message["role"], message["content"]
    if role not in PLAIN_CHAT_FORMAT:
        raise ValueError(f"{where}: unknown role {role!r}; expected one of {', '.join(PLAIN_CHAT_FORMAT)}")
    if isinstance(content, str):
        return role, [content]
    if isinstance(content, (list, tuple)):
        return role, list(content)
    raise ValueError(f"{where}: content must be a str or a list of items, got {type(content).__name__}")


def _is_conversation(prompt: Sequence[Any]) -> bool:
    return any(isinstance(m, dict) and ("role" in m or "content" in m) for m in prompt)


def _as_batch(prompts: Any) -> tuple[list[Any], bool]:
    """The prompts as a list, and whether ``prompts`` was a batch (see the module docstring)."""
    is_list = isinstance(prompts, (list, tuple)) and len(prompts) > 0
    if is_list and (all(isinstance(p, str) for p in prompts) or any(isinstance(p, (list, tuple)) for p in prompts)):
        return list(prompts), True
    return [prompts], False


def _images_per_prompt(images: Any, n: int, batched: bool) -> list[list[Any]]:
    if images is None:
        return [[] for _ in range(n)]
    if not batched:
        return [list(images) if isinstance(images, (list, tuple)) else [images]]
    hint = f"a batch of {n} prompts takes one list of images per prompt, e.g. images=[[a, b], [c]]"
    if not isinstance(images, (list, tuple)) or len(images) != n:
        got = f"a list of {len(images)}" if isinstance(images, (list, tuple)) else type(images).__name__
        raise ValueError(f"images: {hint}; got {got}")
    for p, entry in enumerate(images):
        if not isinstance(entry, (list, tuple)):
            raise ValueError(f"images: {hint}; images[{p}] is a {type(entry).__name__}")
    return [list(entry) for entry in images]


def _pad(rows: list[list[int]], pad_id: int, side: PaddingSide) -> tuple[Tensor, Tensor]:
    """(B, T) long ids and attention mask, padded on ``side``."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, span] = torch.tensor(row, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


def _check_padding_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

"""Documents -> training batches: tokens, pixels and labels, under a token budget.

Interleaved documents and pairs are written as OpenFlamingo trains on them:
``<s><image>text<|endofchunk|><image>text<|endofchunk|></s>`` (``<s>``: whatever the tokenizer
itself puts before a text, as in the processor's prompts); the loss covers the text that
follows an image and its ``<|endofchunk|>``, never padding, image tokens, text before the first
image or the EOS (see ``model.masks.flamingo_labels`` for the same rule as a pure function).
Chat documents are written by the processor's renderer (``processing.render_chat``: the
tokenizer's chat template, or the plain format), so a conversation is the same token ids in
training and at inference; the loss covers the assistant turns only.

Truncation keeps whole images with their text: a sequence never ends in an image whose text
was cut away, and images beyond ``max_images`` end the document there, so ``<image>`` tokens
and pixel tensors always stay aligned. With ``pack=True`` several documents share a sequence,
each between its own BOS and EOS; use a model with ``cross_attention.reset_at_eos=True`` so that
an image never reaches into the next document.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from interleaf.data.schema import DataError, Document, SkipCounter, decode_image
from interleaf.images import source_key, transform_fingerprint
from interleaf.model.masks import IGNORE_INDEX
from interleaf.processing import render_chat
from interleaf.tokens import special_prefix_ids

IGNORE = IGNORE_INDEX


@dataclass(frozen=True, kw_only=True)
class CollateConfig:
    max_tokens: int = 512
    max_images: int = 8
    pack: bool = False
    min_text_after_image: int = 2  # tokens of an image's text that must fit for the image to stay

    def __post_init__(self):
        for name, low in (("max_tokens", 8), ("max_images", 1), ("min_text_after_image", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"CollateConfig.{name} must be >= {low}, got {getattr(self, name)}")


@dataclass
class Encoded:
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)  # where each image's tokens begin
    image_keys: list[str] = field(default_factory=list)  # each image's source key (images.source_key)

    def add(self, ids: list[int], learn: bool) -> None:
        self.ids += ids
        self.labels += ids if learn else [IGNORE] * len(ids)

    def add_image(self, image: Image.Image, key: str, image_ids: list[int]) -> None:
        """An image and its tokens (never learned)."""
        self.image_starts.append(len(self.ids))
        self.images.append(image)
        self.image_keys.append(key)
        self.add(image_ids, learn=False)

    def cut(self, length: int) -> Encoded:
        """The first ``length`` tokens, with the images whose tokens lie entirely inside."""
        n = sum(1 for s in self.image_starts if s < length)
        ids, labels = self.ids[:length], self.labels[:length]
        return Encoded(ids, labels, self.images[:n], self.image_starts[:n], self.image_keys[:n])


class Collator:
    """``collator(docs) -> {"input_ids", "attention_mask", "labels", "pixel_values", "image_keys"}``;
    ``image_keys[b]`` names row b's images (:func:`interleaf.images.source_key`: their encoded
    bytes and the processor's transform), which the frozen-feature cache looks features up by."""

    def __init__(self, processor, cfg: CollateConfig = CollateConfig(), counter: SkipCounter | None = None):
        self.processor, self.cfg = processor, cfg
        self.counter = counter or SkipCounter()
        tok = processor.tokenizer
        self.tok = tok
        self.image_ids = tok(processor.write_images(processor.tokens.image), add_special_tokens=False)["input_ids"]
        self.eoc = [processor.ids.end_of_chunk] if processor.ids.end_of_chunk is not None else []
        self.bos = special_prefix_ids(tok)  # what the processor's prompts start with too
        self.eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        self.begin_of_image = processor.tokens.begin_of_image
        self.transform = transform_fingerprint(processor.image_processor)

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    # -- one document -------------------------------------------------------------------

    def encode(self, doc: Document) -> Encoded | None:
        """Tokens, labels and decoded images of one document; None (counted) if unusable."""
        try:
            raws = [ref.raw() for ref in doc.images]
            images = [(decode_image(raw), source_key(raw, self.transform)) for raw in raws]
        except DataError as e:
            self.counter.skip(e.reason, f"document {doc.id!r}", str(e))
            return None
        enc = self._chat(doc, images) if doc.is_chat else self._interleaved(doc, images)
        enc = self._truncate(enc)
        if not any(label != IGNORE for label in enc.labels):
            self.counter.skip("nothing_to_learn", f"document {doc.id!r}", "no supervised token within the budget")
            return None
        self.counter.ok()
        return enc

    def _interleaved(self, doc: Document, images: list[tuple[Image.Image, str]]) -> Encoded:
        if self.begin_of_image and any(self.begin_of_image in (s.text or "") for s in doc.segments):
            return self._drawn(doc, images)
        enc = Encoded()
        enc.add(self.bos, learn=False)
        pictures = iter(images)
        chunk_open = False
        for segment in doc.segments:
            if segment.image is not None:
                if len(enc.images) == self.cfg.max_images:
                    break  # later images and their text are dropped together
                if chunk_open:
                    enc.add(self.eoc, learn=True)
                enc.add_image(*next(pictures), self.image_ids)
                chunk_open = True
            else:
                enc.add(self.text_ids(segment.text), learn=chunk_open)
        if chunk_open:
            enc.add(self.eoc, learn=True)
        enc.add(self.eos, learn=False)
        return enc

    def _drawn(self, doc: Document, images: list[tuple[Image.Image, str]]) -> Encoded:
        """A document that writes its images (MM-Interleaved): an image follows the text that
        announces it with the begin-of-image token. All its text is learned, the EOS too (the
        model learns to write the text, to announce an image and to end); no <|endofchunk|>."""
        enc = Encoded()
        enc.add(self.bos, learn=False)
        pictures = iter(images)
        for segment in doc.segments:
            if segment.image is not None:
                if len(enc.images) == self.cfg.max_images:
                    break
                enc.add_image(*next(pictures), self.image_ids)
            else:
                enc.add(self.text_ids(segment.text), learn=True)
        enc.add(self.eos, learn=True)
        return enc

    def _chat(self, doc: Document, images: list[tuple[Image.Image, str]]) -> Encoded:
        """Assistant turns are learned; everything else is context."""
        messages = _messages(doc, self.processor.tokens.image)
        enc = Encoded()
        pictures = iter(images)
        rendered = ""
        for k, message in enumerate(messages):
            before = self._render(messages[:k], generation=message["role"] == "assistant")
            after = self._render(messages[: k + 1], generation=False)
            if not after.startswith(rendered) or not before.startswith(rendered):
                raise DataError("chat_template", "the chat template does not render conversations prefix by prefix")
            self._add_text(enc, before[len(rendered) :], pictures, learn=False)
            self._add_text(enc, after[len(before) :], pictures, learn=message["role"] == "assistant")
            rendered = after
        return enc

    def _render(self, messages: list[dict], generation: bool) -> str:
        return render_chat(self.tok, messages, generation=generation, system=self.processor.chat_system)

    def _add_text(self, enc: Encoded, text: str, pictures, learn: bool) -> None:
        """Text that may hold image placeholders and special tokens (BOS), written as tokens."""
        image = self.processor.tokens.image
        for i, piece in enumerate(text.split(image)):
            if i > 0:
                enc.add_image(*next(pictures), self.image_ids)
            if piece:
                enc.add(self.text_ids(piece), learn=learn)

    def _truncate(self, enc: Encoded) -> Encoded:
        """Fit the budget without leaving an image whose text was cut away."""
        if len(enc.images) > self.cfg.max_images:  # chat: end at the first image over the limit
            enc = enc.cut(enc.image_starts[self.cfg.max_images])
        if len(enc.ids) <= self.cfg.max_tokens:
            return enc
        enc = enc.cut(self.cfg.max_tokens)
        if enc.image_starts:
            last = enc.image_starts[-1]
            if len(enc.ids) - (last + len(self.image_ids)) < self.cfg.min_text_after_image:
                enc = enc.cut(last)
        return enc

    # -- a batch ---------------------------------------------------------------------------

    def __call__(self, docs: list[Document]) -> dict[str, torch.Tensor]:
        encoded = [e for e in map(self.encode, docs) if e is not None]
        if self.cfg.pack:
            encoded = self._pack(encoded)
        if not encoded:
            raise DataError("empty_batch", "no document of this batch could be used: " + self.counter.report())
        return self._tensors(encoded)

    def _pack(self, encoded: list[Encoded]) -> list[Encoded]:
        rows: list[Encoded] = []
        for enc in encoded:
            if rows and len(rows[-1].ids) + len(enc.ids) <= self.cfg.max_tokens:
                row = rows[-1]
                offset = len(row.ids)
                row.ids += enc.ids
                row.labels += enc.labels
                row.images += enc.images
                row.image_starts += [s + offset for s in enc.image_starts]
                row.image_keys += enc.image_keys
            else:
                rows.append(
                    Encoded(
                        list(enc.ids), list(enc.labels), list(enc.images), list(enc.image_starts), list(enc.image_keys)
                    )
                )
        return rows

    def _tensors(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(r.ids) for r in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):  # right padding: training reads every row from position 0
            n = len(row.ids)
            input_ids[b, :n] = torch.tensor(row.ids)
            labels[b, :n] = torch.tensor(row.labels)
            mask[b, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": self.processor.pixel_values([row.images for row in rows]),
            "image_keys": [row.image_keys for row in rows],
        }


def _messages(doc: Document, image_token: str) -> list[dict]:
    """Chat segments -> messages with string content, images as placeholders, turns merged by role."""
    messages: list[dict] = []
    for segment in doc.segments:
        piece = image_token if segment.image is not None else segment.text
        if messages and messages[-1]["role"] == segment.role:
            messages[-1]["content"] += piece
        else:
            messages.append({"role": segment.role, "content": piece})
    return messages

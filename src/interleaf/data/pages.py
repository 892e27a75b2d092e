"""Interleaved documents written out: each image a PNG file, the documents as MM-Interleaved
``annt.json`` (which :func:`interleaf.data.formats.read_annt` reads back) and as one HTML page.

A document is a list of parts, ``{"text": str}`` or ``{"image": PIL.Image}``, with
``"generated": True`` on the parts a model wrote (what
:meth:`interleaf.model.flamingo.Flamingo.generate_interleaved` returns).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DOCUMENTS = "annt.json"
PAGE = "index.html"

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 46em; margin: 2em auto; color: #222; }
article { border: 1px solid #ccc; border-radius: 8px; padding: 1em 1.2em; margin-bottom: 1.5em; }
h2 { font-size: 1em; color: #666; margin-top: 0; }
p { margin: 0.4em 0; }
figure { display: inline-block; margin: 0.4em 0.6em 0.4em 0; }
img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #999; }
.generated { background: #eef6ff; }
figure.generated img { border: 2px solid #2a6fdb; }
figcaption, .tag { font-size: 0.75em; color: #2a6fdb; }
"""


def _safe(name: str) -> str:
    """A file-name-safe form of a document id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "document"


def write_interleaved(
    documents: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    out: str | Path,
    meta: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``(id, parts)`` documents under ``out``: ``images/<id>-<k>.png`` (the document's
    k-th image; an id met before gets ``_`` appended in file names, the JSON keeps it as given),
    ``annt.json`` and ``index.html``. Returns the paths written. The JSON keeps MM-Interleaved's
    fields (``sentences``, ``images``, ``sentence_ixs``, ``image_first``) with ``id`` and, per
    sentence and image, whether it was ``generated``; ``meta``, one dict per document, adds its
    keys to the document's record (e.g. the ``generate_mode`` and ``num_iter`` it was written
    with)."""
    out = Path(out)
    if meta is not None and len(meta) != len(documents):
        raise ValueError(f"write_interleaved: {len(meta)} meta dicts for {len(documents)} documents")
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, articles, seen, written = [], [], set(), []
    for i, (doc_id, parts) in enumerate(documents):
        name = _safe(doc_id)
        while name in seen:
            name += "_"
        seen.add(name)
        records.append({**_record(doc_id, name, parts, out), **(meta[i] if meta is not None else {})})
        written += [out / file for file in records[-1]["images"]]
        articles.append(_article(doc_id, records[-1]))
    (out / DOCUMENTS).write_text(json.dumps(records, indent=1) + "\n")
    page = "<!doctype html>\n<html><head><meta charset='utf-8'><title>interleaf: generated documents</title>"
    page += f"<style>{STYLE}</style></head><body><h1>Generated documents</h1>\n"
    page += "<p class='tag'>blue: written by the model</p>\n" + "\n".join(articles) + "\n</body></html>\n"
    (out / PAGE).write_text(page)
    return {"json": out / DOCUMENTS, "html": out / PAGE, "images": written}


def _record(doc_id: str, name: str, parts: Sequence[dict[str, Any]], out: Path) -> dict[str, Any]:
    """The annt.json record of one document: an image before the sentence that follows it, or
    after the last sentence when none follows."""
    sentences, sentence_generated, pending = [], [], []
    images, image_generated, sentence_ixs, image_first = [], [], [], []
    for k, part in enumerate(parts):
        if "text" in part:
            for file, generated in pending:
                images.append(file)
                image_generated.append(generated)
                sentence_ixs.append(len(sentences))
                image_first.append(True)
            pending = []
            sentences.append(part["text"])
            sentence_generated.append(bool(part.get("generated")))
        elif "image" in part:
            file = f"images/{name}-{len(images) + len(pending)}.png"
            part["image"].save(out / file)
            pending.append((file, bool(part.get("generated"))))
        else:
            raise ValueError(f"document {doc_id!r}, part {k}: a part is {{'text': ...}} or {{'image': ...}}")
    if pending and not sentences:
        sentences, sentence_generated = [""], [False]
    for file, generated in pending:
        images.append(file)
        image_generated.append(generated)
        sentence_ixs.append(len(sentences) - 1)
        image_first.append(False)
    return {
        "id": doc_id,
        "sentences": sentences,
        "images": images,
        "sentence_ixs": sentence_ixs,
        "image_first": image_first,
        "sentence_generated": sentence_generated,
        "image_generated": image_generated,
    }


def _article(doc_id: str, record: dict[str, Any]) -> str:
    """The document as HTML, in reading order, the generated parts marked."""
    before: dict[int, list[int]] = {}
    after: dict[int, list[int]] = {}
    for k, (ix, first) in enumerate(zip(record["sentence_ixs"], record["image_first"])):
        (before if first else after).setdefault(ix, []).append(k)

    def figure(k: int) -> str:
        generated = record["image_generated"][k]
        label = "<figcaption>drawn by the model</figcaption>" if generated else ""
        cls = " class='generated'" if generated else ""
        return f"<figure{cls}><img src='{html.escape(record['images'][k])}' alt='image {k}'>{label}</figure>"

    body = []
    for i, sentence in enumerate(record["sentences"]):
        body += [figure(k) for k in before.get(i, [])]
        if sentence:
            cls = " class='generated'" if record["sentence_generated"][i] else ""
            body.append(f"<p{cls}>{html.escape(sentence)}</p>")
        body += [figure(k) for k in after.get(i, [])]
    return f"<article><h2>{html.escape(doc_id)}</h2>\n" + "\n".join(body) + "\n</article>"

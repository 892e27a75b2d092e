"""Small documents for the data tests."""

import io

from PIL import Image

from interleaf.data.schema import Document, ImageRef, Segment


def png(colour=(200, 30, 30), size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def make_docs(n: int, prefix: str = "d") -> list[Document]:
    """Interleaved documents with 1-2 images; the text names the document."""
    docs = []
    for i in range(n):
        segments = [Segment(image=ImageRef(data=png((i % 250, 10, 10)))), Segment(text=f"{prefix}{i} first")]
        if i % 2:
            segments += [Segment(image=ImageRef(data=png((10, i % 250, 10)))), Segment(text=f"{prefix}{i} second")]
        docs.append(Document(id=f"{prefix}{i}", segments=segments, source=prefix))
    return docs

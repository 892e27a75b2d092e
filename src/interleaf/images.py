"""The one image decoder, shared by the data pipeline and the processor: the same accepted
sources, the same modes (RGB, transparent pixels composited on white), the same pixel limit
and the same errors.

An :class:`ImageError` is a ``ValueError`` with a stable ``reason`` (``missing_image``,
``empty_image``, ``corrupt_image``, ``huge_image``, ``bad_image_type``): the processor shows its
message, the data pipeline counts skipped samples by its reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessorPil

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: larger images are refused, not decoded
SOURCE_TYPES = "PIL.Image.Image, pathlib.Path, bytes or numpy.ndarray"
_TRANSPARENT_MODES = ("RGBA", "LA", "P", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short stable key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_image(source: Any, where: str = "", *, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, a ``Path``, encoded ``bytes`` or an HxW / HxWxC uint8
    array (C in 1, 3, 4). Failures are :class:`ImageError`s whose message starts with ``where``;
    an image of more than ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`) pixels is refused
    from its header, before decoding."""
    at = f"{where}: " if where else ""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, bytearray):
        source = bytes(source)
    if isinstance(source, np.ndarray):
        source = _from_array(source, at)
    elif isinstance(source, Path):
        try:
            raw = source.read_bytes()
        except OSError as e:
            raise ImageError("missing_image", f"{at}cannot read image file '{source}': {e.strerror or e}") from None
        return _decode(raw, f"{at}image file '{source}'", f"{at}cannot read image file '{source}'", max_pixels)
    elif isinstance(source, bytes):
        return _decode(source, f"{at}the image", f"{at}cannot read image bytes", max_pixels)
    elif not isinstance(source, Image.Image):
        kind = type(source).__name__
        raise ImageError("bad_image_type", f"{at}unsupported item type {kind}; expected {SOURCE_TYPES}")
    _check_size(source, f"{at}image", max_pixels)
    source.load()
    return to_rgb(source)


def _decode(raw: bytes, what: str, cannot: str, max_pixels: int) -> Image.Image:
    if not raw:
        raise ImageError("empty_image", f"{cannot}: zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                _check_size(image, what, max_pixels)
                image.load()
                return to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("huge_image", f"{what} is too large to decode safely: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("corrupt_image", f"{cannot}: not an image in a format PIL knows") from None
    except Exception as e:  # PIL raises many types for broken files; none may escape untranslated
        raise ImageError("corrupt_image", f"{cannot}: {type(e).__name__}: {e}") from None


def _check_size(image: Image.Image, what: str, max_pixels: int) -> None:
    if image.width * image.height > max_pixels:
        raise ImageError(
            "huge_image",
            f"{what} is too large to decode safely: {image.width}x{image.height} pixels exceeds {max_pixels:,}",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white (as transformers' ``convert_to_rgb``)."""
    if image.mode == "RGB":
        return image
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray, at: str) -> Image.Image:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ImageError(
            "bad_image_type",
            f"{at}an image array must be HxW or HxWxC uint8 with C in 1, 3 or 4, "
            f"got shape {array.shape} dtype {array.dtype}",
        )
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)


class OpenClipImageProcessor(CLIPImageProcessorPil):
    """HF's CLIP image processor with torchvision's centre crop, as open_clip and EVA-CLIP (and
    so InfiMM) preprocess: ``CenterCrop`` rounds the crop offset to the nearest pixel
    (``round((h - crop) / 2)``, half to even) where HF floors it, which moves the crop by one
    pixel whenever the resized side exceeds the crop by 4k + 3 pixels."""

    def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
        height, width = image.shape[-2:]  # channels first, as the PIL backend calls it
        if height < size.height or width < size.width:
            return super().center_crop(image, size, **kwargs)  # padding: as HF does it
        top, left = round((height - size.height) / 2), round((width - size.width) / 2)
        return image[..., top : top + size.height, left : left + size.width]


def load_image_processor(directory: str | Path):
    """The image processor saved in ``directory`` (``preprocessor_config.json``):
    :class:`OpenClipImageProcessor` by its name, any other through ``AutoImageProcessor``."""
    try:
        kind = json.loads((Path(directory) / "preprocessor_config.json").read_text()).get("image_processor_type")
    except (OSError, ValueError):
        kind = None
    if kind == OpenClipImageProcessor.__name__:
        return OpenClipImageProcessor.from_pretrained(directory)
    return AutoImageProcessor.from_pretrained(directory)


def transform_fingerprint(image_processor: Any) -> str:
    """A hex digest of what an image processor does to an image (its class and settings): the
    part of a feature-cache key that is not the image itself."""
    to_dict = getattr(image_processor, "to_dict", None)
    settings = to_dict() if callable(to_dict) else vars(image_processor)
    settings = {k: v for k, v in settings.items() if not k.startswith("_") and k != "processor_class"}
    head = f"{type(image_processor).__module__}.{type(image_processor).__qualname__}"
    text = head + json.dumps(settings, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def source_key(raw: bytes, transform: str) -> str:
    """The identity of one image as the data pipeline knows it, before decoding: a hash of its
    encoded bytes and of ``transform`` (:func:`transform_fingerprint` of the processor that turns
    it into pixels). Equal keys mean equal pixel tensors; computed in the data workers, so the
    training step never hashes pixels."""
    h = hashlib.blake2b(digest_size=20)
    h.update(transform.encode())
    h.update(b"|")
    h.update(raw)
    return h.hexdigest()

"""One image decoder for the data pipeline and the processor: same pixels, same limits, same errors."""

import io

import numpy as np
import pytest
from PIL import Image

from interleaf import images
from interleaf.data.schema import DataError, ImageRef, decode_image
from interleaf.images import ImageError, load_image
from interleaf.processing import Processor
from interleaf.tiny import build_tokenizer, build_vision


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.info["transparency"] = 0
    image.putpixel((0, 0), 0)
    return image


SAMPLES = {
    "rgb": encoded(Image.new("RGB", (8, 8), (10, 200, 30))),
    "rgba": encoded(Image.new("RGBA", (8, 8), (10, 200, 30, 0))),
    "la": encoded(Image.new("LA", (8, 8), (90, 128))),
    "palette-transparency": encoded(palette_with_transparency()),
    "grey-jpeg": encoded(Image.new("L", (8, 8), 77), "JPEG"),
}


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    vision = tmp_path_factory.mktemp("vision")
    build_vision(vision, "clip")
    from transformers import AutoImageProcessor

    return Processor(build_tokenizer(), AutoImageProcessor.from_pretrained(vision))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_same_pixels_through_both_paths(name):
    raw = SAMPLES[name]
    from_data = ImageRef(data=raw).load()
    from_prompt = load_image(raw, "prompt 0, item 0")
    assert from_data.mode == from_prompt.mode == "RGB"
    assert np.array_equal(np.asarray(from_data), np.asarray(from_prompt))
    if name == "palette-transparency":  # transparent pixels are white in both
        assert from_data.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("raw", "reason", "words"),
    [
        (b"", "empty_image", "zero-byte image"),
        (b"not an image", "corrupt_image", "not an image in a format PIL knows"),
        (SAMPLES["rgb"][:40], "corrupt_image", "cannot read image bytes"),
    ],
)
def test_the_same_errors_through_both_paths(processor, raw, reason, words):
    with pytest.raises(DataError) as data_error:
        decode_image(raw)
    with pytest.raises(ValueError) as prompt_error:
        processor(["a", raw])
    assert data_error.value.reason == reason
    assert words in str(data_error.value)
    assert str(prompt_error.value) == f"prompt 0, item 1: {data_error.value}"


def test_the_same_pixel_limit(processor, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 63)
    with pytest.raises(DataError) as data_error:
        ImageRef(data=SAMPLES["rgb"]).load()
    assert data_error.value.reason == "huge_image" and "8x8 pixels exceeds 63" in str(data_error.value)
    with pytest.raises(ValueError, match="prompt 0, item 1: the image is too large to decode safely: 8x8"):
        processor(["a", SAMPLES["rgb"]])
    with pytest.raises(ValueError, match="prompt 0, item 1: image is too large"):
        processor(["a", Image.new("RGB", (8, 8))])


def test_image_errors_are_value_errors_with_a_reason():
    with pytest.raises(ImageError) as info:
        load_image(np.zeros((2, 2, 2), dtype=np.uint8), "here")
    assert info.value.reason == "bad_image_type" and str(info.value).startswith("here: an image array must be")

"""Processor: prompt forms -> input_ids / attention_mask / pixel_values, and every input error."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from interleaf.config import TokensConfig
from interleaf.processing import PLAIN_CHAT_GENERATION_PROMPT, Processor
from interleaf.tiny import CHAT_TEMPLATE, build_tokenizer, build_vision

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 200, 0), (0, 0, 255), (128, 128, 128)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("processing")
    build_tokenizer(root / "tok")
    build_tokenizer(root / "chat-tok", chat_template=CHAT_TEMPLATE)
    build_vision(root / "clip", "clip")
    build_vision(root / "siglip", "siglip")
    return root


@pytest.fixture(scope="module")
def processor(dirs):
    return Processor.from_backbones(str(dirs / "tok"), str(dirs / "clip"))


def make(dirs, lm: str = "tok", vision: str = "clip", **kwargs) -> Processor:
    return Processor.from_backbones(str(dirs / lm), str(dirs / vision), **kwargs)


def solid(color, size=(40, 30), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def expected_pixels(processor: Processor, image: Image.Image) -> torch.Tensor:
    # compared exactly with the same image's slot in a larger batch: the PIL image processors
    # resize and normalise one image at a time (no batched matmul), the same computation per image
    return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def ids_of(processor: Processor, text: str, **kwargs) -> list[int]:
    return processor.tokenizer(text, **kwargs)["input_ids"]


def unpadded(batch, row: int) -> list[int]:
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


def error(processor: Processor, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        processor(*args, **kwargs)
    return str(info.value)


# interleaved lists


def test_interleaved_ids_and_shapes(processor):
    batch = processor(["a photo of", solid(RED), " a red circle.<|endofchunk|>", solid(BLUE), "two"])
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [ids_of(processor, "a photo of<image> a red circle.<|endofchunk|><image>two")]
    assert batch["attention_mask"].all()
    assert batch["pixel_values"].shape == (1, 2, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"][0, 0].item() == processor.tokenizer.bos_token_id


def test_pixel_values_follow_the_text_order(processor):
    colors = [RED, GREEN, BLUE]
    batch = processor([solid(colors[0]), "one", solid(colors[1]), "two", solid(colors[2]), "three"])
    for slot, color in enumerate(colors):
        expected = expected_pixels(processor, solid(color)).mean(dim=(1, 2))
        assert torch.allclose(batch["pixel_values"][0, slot].mean(dim=(1, 2)), expected, atol=1e-5)
    assert not torch.allclose(batch["pixel_values"][0, 0], batch["pixel_values"][0, 1])


def test_batch_pads_image_slots_with_zeros(processor):
    batch = processor([["x", solid(RED), "y", solid(GREEN)], ["text only"], [solid(BLUE), "z"]])
    pixels = batch["pixel_values"]
    assert pixels.shape == (3, 2, 3, 32, 32)
    assert torch.equal(pixels[0, 1], expected_pixels(processor, solid(GREEN)))
    assert torch.equal(pixels[2, 0], expected_pixels(processor, solid(BLUE)))
    assert not pixels[1].any() and not pixels[2, 1].any()
    assert processor.num_images(batch["input_ids"]).tolist() == [2, 0, 1]
    assert unpadded(batch, 1) == ids_of(processor, "text only")


def test_no_images_gives_zero_image_slots(processor):
    batch = processor(["one prompt", "and another one"])
    assert batch["pixel_values"].shape == (2, 0, 3, 32, 32)
    assert processor("one")["pixel_values"].shape == (1, 0, 3, 32, 32)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(processor, side):
    prompts = [["a long prompt with many words,", solid(RED), " and more"], ["short"]]
    batch = processor(prompts, padding_side=side)
    long, short = (processor(p)["input_ids"][0].tolist() for p in prompts)
    pad = len(long) - len(short)
    assert batch["input_ids"][0].tolist() == long
    assert batch["attention_mask"][0].all()
    row, mask = batch["input_ids"][1].tolist(), batch["attention_mask"][1].tolist()
    if side == "left":
        assert row == [processor.tokenizer.pad_token_id] * pad + short
        assert mask == [0] * pad + [1] * len(short)
    else:
        assert row == short + [processor.tokenizer.pad_token_id] * pad
        assert mask == [1] * len(short) + [0] * pad


def test_default_padding_side_comes_from_the_processor(dirs):
    right = make(dirs, padding_side="right")
    assert right(["a b c d e f", "a"])["attention_mask"][1, 0].item() == 1
    assert make(dirs)(["a b c d e f", "a"])["attention_mask"][1, 0].item() == 0


def test_image_prompt_with_wrapper_tokens_is_shared_between_consecutive_images(dirs):
    around = "<fake_token_around_image>"
    tokens = TokensConfig(image_prompt=f"{around}<image>{around}", extra=(around,))
    processor = make(dirs, tokens=tokens)
    batch = processor(["a", solid(RED), solid(GREEN), "b", solid(BLUE)])
    expected = f"a{around}<image>{around}<image>{around}b{around}<image>{around}"
    assert batch["input_ids"][0].tolist() == ids_of(processor, expected)
    assert processor("a<image><image>b<image>", images=[solid(RED)] * 3)["input_ids"].tolist() == [
        ids_of(processor, expected)
    ]


# image sources and modes


def test_image_sources_give_the_same_pixels(processor, tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    path = tmp_path / "img.png"
    image.save(path)
    sources = [
        path,
        {"image": str(path)},
        {"type": "image", "image": path},
        png_bytes(image),
        bytearray(png_bytes(image)),
        np.asarray(image),
    ]
    reference = processor(["x", image])
    for source in sources:
        batch = processor(["x", source])
        assert torch.equal(batch["pixel_values"], reference["pixel_values"]), type(source)
        assert torch.equal(batch["input_ids"], reference["input_ids"])


def test_text_dict_items(processor):
    batch = processor([{"text": "a"}, solid(RED), {"type": "text", "text": "b"}])
    assert batch["input_ids"][0].tolist() == ids_of(processor, "a<image>b")


def transparent_palette_image() -> Image.Image:
    image = solid(RED).convert("P")
    image.info["transparency"] = image.getpixel((0, 0))
    return image


@pytest.mark.parametrize(
    ("image", "same_as"),
    [
        (solid((*RED, 255), mode="RGBA"), solid(RED)),
        (solid((*RED, 0), mode="RGBA"), solid((255, 255, 255))),
        (solid(128, mode="L"), solid(GREY)),
        (solid(RED).convert("P"), solid(RED)),
        (transparent_palette_image(), solid((255, 255, 255))),
    ],
)
def test_image_modes_become_rgb(processor, image, same_as):
    batch = processor(["x", image])
    assert torch.equal(batch["pixel_values"][0, 0], expected_pixels(processor, same_as))


def test_single_channel_and_alpha_arrays(processor):
    grey = processor(["x", np.full((30, 40, 1), 128, dtype=np.uint8)])
    opaque = processor(["x", np.dstack([np.full((30, 40, 3), 200, np.uint8), np.full((30, 40), 255, np.uint8)])])
    assert torch.equal(grey["pixel_values"][0, 0], expected_pixels(processor, solid(GREY)))
    assert torch.equal(opaque["pixel_values"][0, 0], expected_pixels(processor, solid((200, 200, 200))))


def test_siglip_image_processor(dirs):
    processor = make(dirs, vision="siglip")
    batch = processor([solid(RED), "a", solid(BLUE)])
    assert batch["pixel_values"].shape == (1, 2, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][0, 1], expected_pixels(processor, solid(BLUE)))
    assert torch.allclose(batch["pixel_values"][0, 0].mean(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]))
    assert processor("no image")["pixel_values"].shape == (1, 0, 3, 32, 32)


# text with placeholders plus images=


def test_placeholders_with_images_equal_the_interleaved_form(processor):
    red, blue = solid(RED), solid(BLUE)
    text = "<image>Output: a cat.<|endofchunk|><image>Output:"
    single = processor(text, images=[red, blue])
    interleaved = processor([red, "Output: a cat.<|endofchunk|>", blue, "Output:"])
    assert torch.equal(single["input_ids"], interleaved["input_ids"])
    assert torch.equal(single["pixel_values"], interleaved["pixel_values"])
    batch = processor([text, "<image>b"], images=[[red, blue], [solid(GREEN)]])
    assert unpadded(batch, 0) == single["input_ids"][0].tolist()
    assert torch.equal(batch["pixel_values"][1, 0], expected_pixels(processor, solid(GREEN)))
    assert not batch["pixel_values"][1, 1].any()


def test_placeholder_images_may_be_paths(processor, tmp_path):
    path = tmp_path / "red.png"
    solid(RED).save(path)
    for source in (path, str(path)):
        batch = processor("<image>x", images=[source])
        assert torch.equal(batch["pixel_values"][0, 0], expected_pixels(processor, solid(RED)))


@pytest.mark.parametrize(
    ("text", "n_images", "counts"), [("<image>a<image>", 1, "2 '<image>'"), ("<image>a", 2, "1 '<image>'")]
)
def test_placeholder_count_mismatch(processor, text, n_images, counts):
    message = error(processor, ["<image>ok", text], images=[[solid(RED)], [solid(BLUE)] * n_images])
    assert message.startswith("prompt 1:")
    assert counts in message and f"{n_images} images" in message


def test_placeholders_without_images(processor):
    assert error(processor, "<image>a").startswith("prompt 0: 1 '<image>' placeholders in the text != 0 images")


def test_images_for_a_batch_must_be_one_list_per_prompt(processor):
    assert "a list of 1" in error(processor, ["<image>a", "<image>b"], images=[solid(RED)])
    assert "images[1] is a Image" in error(processor, ["<image>a", "<image>b"], images=[[solid(RED)], solid(BLUE)])


def test_images_argument_needs_text_prompts(processor):
    message = error(processor, [["x", solid(RED)], "<image>"], images=[[solid(RED)], [solid(BLUE)]])
    assert message.startswith("prompt 0: images= goes with text prompts")


# chat


def user_turn(image):
    return [{"role": "user", "content": [image, "What is this?"]}]


def test_chat_without_template_uses_the_plain_format(processor):
    conversation = [
        {"role": "system", "content": "Be brief."},
        *user_turn(solid(RED)),
        {"role": "assistant", "content": "A red card."},
        {"role": "user", "content": [{"image": solid(BLUE)}, "And this?"]},
    ]
    batch = processor(conversation)
    expected = (
        "System: Be brief.<end_of_utterance>\nUser: <image>What is this?<end_of_utterance>\n"
        "Assistant: A red card.<end_of_utterance>\nUser: <image>And this?<end_of_utterance>\n"
        + PLAIN_CHAT_GENERATION_PROMPT
    )
    assert batch["input_ids"][0].tolist() == ids_of(processor, expected)
    assert torch.equal(batch["pixel_values"][0, 1], expected_pixels(processor, solid(BLUE)))
    finished = processor([*user_turn(solid(RED)), {"role": "assistant", "content": "A card."}])
    assert processor.decode(finished["input_ids"][0]).endswith("Assistant: A card.<end_of_utterance>\n")


def test_chat_with_template(dirs):
    processor = make(dirs, lm="chat-tok")
    batch = processor(user_turn(solid(RED)))
    expected = "<|user|>\n<image>What is this?</s>\n<|assistant|>\n"
    assert batch["input_ids"][0].tolist() == ids_of(processor, expected)
    assert batch["input_ids"][0].tolist().count(processor.tokenizer.bos_token_id) == 1
    assert processor.num_images(batch["input_ids"]).tolist() == [1]
    answered = processor([*user_turn(solid(RED)), {"role": "assistant", "content": "red"}])
    assert processor.decode(answered["input_ids"][0], skip_special_tokens=False).endswith("<|assistant|>\nred</s>\n")


def test_chat_template_that_writes_bos_gets_no_second_bos(dirs):
    processor = make(dirs, lm="chat-tok")
    processor.tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    ids = processor(user_turn(solid(RED)))["input_ids"][0].tolist()
    assert ids == ids_of(processor, "<s><|user|>\n<image>What is this?</s>\n<|assistant|>\n", add_special_tokens=False)
    assert ids.count(processor.tokenizer.bos_token_id) == 1


def test_chat_template_errors_name_the_prompt(dirs):
    processor = make(dirs, lm="chat-tok")
    processor.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    assert error(processor, user_turn(solid(RED))).startswith("prompt 0: the tokenizer's chat template rejects")


def test_batch_of_conversations_and_mixed_forms(processor):
    batch = processor([user_turn(solid(RED)), ["plain", solid(BLUE)], "text"])
    assert processor.num_images(batch["input_ids"]).tolist() == [1, 1, 0]
    assert unpadded(batch, 0) == processor(user_turn(solid(RED)))["input_ids"][0].tolist()


@pytest.mark.parametrize(
    ("conversation", "expected"),
    [
        ([*user_turn(solid(RED)), {"role": "bot", "content": "hi"}], "prompt 1, message 1: unknown role 'bot'"),
        ([{"role": "user"}], "prompt 1, message 0: a message is a dict with the keys 'role' and 'content'"),
        ([{"content": "hi"}], "prompt 1, message 0: a message is a dict with the keys 'role' and 'content'"),
        ([{"role": "user", "content": "hi"}, "loose text"], "prompt 1, message 1: a message is a dict"),
        ([{"role": "user", "content": 3}], "prompt 1, message 0: content must be a str or a list of items, got int"),
        ([{"role": "user", "content": ["a", 3]}], "prompt 1, message 0, item 1: unsupported item type int"),
        ([{"role": "user", "content": "see <image>"}], "prompt 1, message 0, item 0: the text contains the image"),
    ],
)
def test_chat_errors(processor, conversation, expected):
    assert error(processor, [user_turn(solid(RED)), conversation]).startswith(expected)


# errors


@pytest.mark.parametrize(("prompts", "index"), [([], 0), ("", 0), (["", [""]], 0), (["a", ""], 1), ([["a"], []], 1)])
def test_empty_prompt(processor, prompts, index):
    assert error(processor, prompts).startswith(f"prompt {index} is empty")


def test_missing_image_file(processor, tmp_path):
    missing = tmp_path / "nope.png"
    message = error(processor, [["ok"], ["a", "b", solid(RED), missing]])
    assert message == f"prompt 1, item 3: cannot read image file '{missing}': No such file or directory"
    assert error(processor, ["a", {"image": str(missing)}]).startswith("prompt 0, item 1: cannot read image file")


def test_corrupt_and_truncated_images(processor, tmp_path):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    assert error(processor, ["a", b"not an image"]).startswith("prompt 0, item 1: cannot read image bytes")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    assert error(processor, ["a", truncated]).startswith(f"prompt 0, item 1: cannot read image file '{truncated}'")
    directory = tmp_path / "a-directory.png"
    directory.mkdir()
    assert error(processor, [directory]).startswith("prompt 0, item 0: cannot read image file")


@pytest.mark.parametrize("limit", [600, 300])  # warning level (> limit) and error level (> 2 * limit)
def test_decompression_bomb(processor, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    message = error(processor, ["a", png_bytes(solid(RED, size=(32, 32)))])
    assert message.startswith("prompt 0, item 1: the image is too large to decode safely")


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (3, "unsupported item type int"),
        (None, "unsupported item type NoneType"),
        (["nested"], "unsupported item type list"),
        ({"image": 3}, "unsupported item type int"),
        ({"picture": "x.png"}, "a dict item is {'image': ...} or {'text': str}"),
        ({"type": "text", "image": "x.png"}, "a dict item is"),
        (np.zeros((4, 4, 3), dtype=np.float32), "an image array must be HxW or HxWxC uint8"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "an image array must be HxW or HxWxC uint8"),
    ],
)
def test_unsupported_items(processor, item, expected):
    message = error(processor, [["fine"], [solid(RED), "text", item]])
    assert message.startswith(f"prompt 1, item 2: {expected}")


def test_unsupported_prompt_type(processor):
    assert error(processor, 3).startswith("prompt 0: unsupported prompt type int")
    assert error(processor, [["a"], 3]).startswith("prompt 1: unsupported prompt type int")


def test_literal_image_token_in_interleaved_text(processor):
    message = error(processor, [["fine"], [solid(RED), "what is <image> here"]])
    assert message.startswith("prompt 1, item 1: the text contains the image token '<image>'")
    assert "pass each image as an item" in message


def test_bad_arguments(dirs, processor):
    assert "padding_side" in error(processor, "a", padding_side="middle")
    assert "return_tensors" in error(processor, "a", return_tensors="tf")
    with pytest.raises(ValueError, match="must contain the image token"):
        make(dirs, tokens=TokensConfig(image_prompt="<img>"))


# save / load, decode


def test_save_and_load_round_trip(dirs, tmp_path):
    tokens = TokensConfig(extra=("<end_of_utterance>",))
    processor = make(dirs, lm="chat-tok", vision="siglip", tokens=tokens, padding_side="right")
    processor.save_pretrained(tmp_path)
    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.tokens == tokens and loaded.padding_side == "right" and loaded.ids == processor.ids
    calls = [([user_turn(solid(RED)), ["a", solid(BLUE), "b"]], {}), ("<image>c", {"images": [solid(GREEN)]})]
    for prompts, kwargs in calls:
        ours, theirs = processor(prompts, **kwargs), loaded(prompts, **kwargs)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "processor_config.json").read_text())["padding_side"] == "right"


@pytest.mark.parametrize("missing", ["processor_config.json", "preprocessor_config.json", "tokenizer_config.json"])
def test_load_names_the_missing_file(processor, tmp_path, missing):
    processor.save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(ValueError, match=f"{tmp_path}: no {missing}"):
        Processor.from_pretrained(tmp_path)


def test_load_rejects_a_bad_config(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"padding_side": "up"}))
    with pytest.raises(ValueError, match="padding_side: expected one of"):
        Processor.from_pretrained(tmp_path)


def test_constructor_adds_the_special_tokens(dirs):
    tokenizer = AutoTokenizer.from_pretrained(dirs / "tok")
    processor = Processor(tokenizer, AutoImageProcessor.from_pretrained(dirs / "clip"))
    vocab = tokenizer.get_vocab()
    assert processor.ids.image == vocab["<image>"] and processor.ids.end_of_chunk == vocab["<|endofchunk|>"]
    assert tokenizer.pad_token_id is not None and processor.ids.pad == tokenizer.pad_token_id


def test_decode(processor):
    batch = processor([["a photo", solid(RED), " of a cat"], ["hi"]])
    assert processor.batch_decode(batch["input_ids"]) == ["a photo of a cat", "hi"]
    assert processor.decode(batch["input_ids"][1], skip_special_tokens=False).endswith("<s>hi")


def test_numpy_tensors(processor):
    batch = processor(["a", solid(RED)], return_tensors="np")
    assert isinstance(batch["input_ids"], np.ndarray) and batch["pixel_values"].shape == (1, 1, 3, 32, 32)

import pytest
import torch
from transformers import AutoImageProcessor

from interleaf.data.collate import CollateConfig, Collator
from interleaf.data.schema import DataError, Document, ImageRef, Segment, SkipCounter
from interleaf.model.masks import flamingo_labels
from interleaf.processing import Processor
from interleaf.tiny import CHAT_TEMPLATE, build_tokenizer, build_vision

from datahelp import png

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 220, 30)]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    vision = build_vision(tmp_path_factory.mktemp("v"), "clip")
    return Processor(build_tokenizer(), AutoImageProcessor.from_pretrained(vision))


def interleaved(n_images=3, text="a photo of a square."):
    segments = [Segment(text="intro text")]
    for i in range(n_images):
        segments += [Segment(image=ImageRef(data=png(COLOURS[i % 4]))), Segment(text=f"{text} number {i}")]
    return Document(id="doc", segments=segments)


def decode(processor, ids, labels):
    tok = processor.tokenizer
    return tok.decode(ids), tok.decode([t for t, label in zip(ids, labels) if label != -100])


def image_order_matches(batch, processor):
    """Each image slot holds the pixels of the image whose <image> token comes in that order."""
    expected = processor.preprocess_images([png_image(c) for c in COLOURS])
    for b in range(batch["input_ids"].shape[0]):
        n = int((batch["input_ids"][b] == processor.ids.image).sum())
        for k in range(n):
            assert torch.allclose(batch["pixel_values"][b, k], expected[k % 4])
        assert batch["pixel_values"][b, n:].abs().sum() == 0


def png_image(colour):
    from PIL import Image

    return Image.new("RGB", (8, 8), colour)


def test_interleaved_layout_and_labels(processor):
    batch = Collator(processor)([interleaved(2)])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    text, learned = decode(processor, ids, labels)
    assert text == (
        "<s>intro text<image>a photo of a square. number 0<|endofchunk|>"
        "<image>a photo of a square. number 1<|endofchunk|></s>"
    )
    assert learned == "a photo of a square. number 0<|endofchunk|>a photo of a square. number 1<|endofchunk|>"
    # the same rule as the pure function of the model package
    pure = flamingo_labels(
        batch["input_ids"],
        batch["attention_mask"],
        image_token_id=processor.ids.image,
        end_of_chunk_id=processor.ids.end_of_chunk,
        ignore_ids=(processor.tokenizer.eos_token_id,),
    )
    assert torch.equal(pure, batch["labels"])
    image_order_matches(batch, processor)


@pytest.mark.parametrize("budget", range(16, 60, 3))
def test_truncation_keeps_images_with_their_text(processor, budget):
    batch = Collator(processor, CollateConfig(max_tokens=budget, min_text_after_image=3))([interleaved(4)])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert len(ids) <= budget
    positions = [i for i, t in enumerate(ids) if t == processor.ids.image]
    assert batch["pixel_values"].shape[1] == max(len(positions), 1) or not positions
    if positions:
        assert len(ids) - positions[-1] - 1 >= 3  # the last image keeps some of its text
    image_order_matches(batch, processor)


def test_max_images_drops_later_images_with_their_tokens(processor):
    batch = Collator(processor, CollateConfig(max_images=2))([interleaved(4)])
    assert int((batch["input_ids"] == processor.ids.image).sum()) == 2
    assert batch["pixel_values"].shape[1] == 2
    assert "number 2" not in processor.tokenizer.decode(batch["input_ids"][0])


def test_packing(processor):
    docs = [interleaved(1), interleaved(2), interleaved(1)]
    batch = Collator(processor, CollateConfig(max_tokens=200, pack=True))(docs)
    assert batch["input_ids"].shape[0] == 1
    row = batch["input_ids"][0].tolist()
    assert row.count(processor.tokenizer.bos_token_id) == 3 and row.count(processor.tokenizer.eos_token_id) == 3
    assert batch["pixel_values"].shape[1] == 4
    image_slots = [COLOURS[0], COLOURS[0], COLOURS[1], COLOURS[0]]
    expected = processor.preprocess_images([png_image(c) for c in image_slots])
    assert torch.allclose(batch["pixel_values"][0], expected)
    # text before the first image of the second document is not learned
    labels = batch["labels"][0].tolist()
    second_bos = [i for i, t in enumerate(row) if t == processor.tokenizer.bos_token_id][1]
    assert all(label == -100 for label in labels[second_bos : second_bos + 4])
    small = Collator(processor, CollateConfig(max_tokens=40, pack=True))(docs)
    assert small["input_ids"].shape[0] > 1


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE])
def test_chat_learns_assistant_turns_only(tmp_path, template):
    vision = build_vision(tmp_path / "v", "clip")
    proc = Processor(build_tokenizer(chat_template=template), AutoImageProcessor.from_pretrained(vision))
    doc = Document(
        id="chat",
        segments=[
            Segment(image=ImageRef(data=png()), role="user"),
            Segment(text="What colour is it?", role="user"),
            Segment(text="Red.", role="assistant"),
            Segment(text="And the shape?", role="user"),
            Segment(text="A square.", role="assistant"),
        ],
    )
    batch = Collator(proc)([doc])
    text, learned = decode(proc, batch["input_ids"][0].tolist(), batch["labels"][0].tolist())
    assert "Red." in learned and "A square." in learned
    assert "colour" not in learned and "shape" not in learned
    assert int((batch["input_ids"] == proc.ids.image).sum()) == 1 and batch["pixel_values"].shape[1] == 1
    assert text.count("What colour is it?") == 1 and text.count("A square.") == 1


def test_a_budget_too_small_to_learn_anything_skips_the_document(processor):
    counter = SkipCounter()
    with pytest.raises(DataError, match="nothing_to_learn"):
        Collator(processor, CollateConfig(max_tokens=10), counter=counter)([interleaved(2)])


def test_bad_images_are_skipped_and_counted(processor):
    counter = SkipCounter()
    broken = Document(id="bad", segments=[Segment(image=ImageRef(data=b"\x89PNG broken")), Segment(text="x")])
    batch = Collator(processor, counter=counter)([broken, interleaved(1)])
    assert batch["input_ids"].shape[0] == 1
    assert counter.skipped == {"corrupt_image": 1}
    with pytest.raises(DataError, match="no document of this batch"):
        Collator(processor)([broken])


def no_bos(tokenizer):
    """The tokenizer, made to add no BOS of its own (as GPT-2's or Qwen's)."""
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tokenizer("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE])
@pytest.mark.parametrize("adds_bos", [True, False])
def test_training_and_inference_render_a_conversation_alike(tmp_path, template, adds_bos):
    """The collated conversation starts with exactly the ids the processor gives the same
    conversation up to the assistant's turn: one renderer, one BOS rule."""
    tokenizer = build_tokenizer(chat_template=template)
    proc = Processor(
        tokenizer if adds_bos else no_bos(tokenizer),
        AutoImageProcessor.from_pretrained(build_vision(tmp_path / "v", "clip")),
    )
    question = [Segment(image=ImageRef(data=png()), role="user"), Segment(text="What colour is it?", role="user")]
    doc = Document(id="chat", segments=[*question, Segment(text="Red.", role="assistant")])
    collated = Collator(proc)([doc])["input_ids"][0].tolist()
    prompt = proc([{"role": "user", "content": [png_image((220, 30, 30)), "What colour is it?"]}])
    prompt = prompt["input_ids"][0].tolist()
    assert collated[: len(prompt)] == prompt
    assert (prompt[0] == tokenizer.bos_token_id) == adds_bos
    answer = proc.tokenizer.decode(collated[len(prompt) :], skip_special_tokens=True)
    assert answer.strip().startswith("Red.")

    interleaved_doc = Document(id="doc", segments=[Segment(image=ImageRef(data=png())), Segment(text="Output:")])
    collated = Collator(proc)([interleaved_doc])["input_ids"][0].tolist()
    prompt = proc([png_image((220, 30, 30)), "Output:"])["input_ids"][0].tolist()
    assert collated[: len(prompt)] == prompt

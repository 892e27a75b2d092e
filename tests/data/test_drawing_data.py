"""The documents that teach drawing, the held-out drawing prompts, captions read back, and
generated documents written as PNG + annt.json + HTML (read back by the annt reader, and
shown in a real browser)."""

import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from interleaf.data import tinyworld as tw
from interleaf.data.formats import read_annt
from interleaf.data.pages import write_interleaved

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path("/tmp/interleaf-documents.png")


def scenes(doc):
    return [tw.Scene.from_dict(image.meta["scene"]) for image in doc.images]


def test_story_documents_announce_each_picture_after_its_caption():
    docs = list(tw.iter_train_documents(seed=0, n=60, mix={"story": 1.0}))
    for doc in docs:
        texts = [s.text for s in doc.segments if s.text is not None]
        assert [s.image is not None for s in doc.segments] == [False, True] * len(doc.images)
        for text, scene in zip(texts, scenes(doc)):
            assert text.endswith(tw.BEGIN_OF_IMAGE)
            assert tw.caption(scene) in text  # the picture is what its caption says
            (group,) = scene.groups()
            assert tw.read_caption(text) == {
                "count": str(group.count),
                "size": group.size,
                "colour": group.colour,
                "shape": group.shape,
                "background": scene.background,
            }
            assert (group.colour, group.shape) in tw.TRAIN_COMBOS


def test_variation_documents_keep_what_the_text_says_to_keep():
    docs = list(tw.iter_train_documents(seed=0, n=80, mix={"variation": 1.0}))
    kept = set()
    for doc in docs:
        first, second = scenes(doc)
        (a,), (b,) = first.groups(), second.groups()
        text = doc.segments[1].text
        assert text.endswith(tw.BEGIN_OF_IMAGE) and doc.segments[0].image is not None
        assert (a.count, a.size, a.positions, first.background) == (b.count, b.size, b.positions, second.background)
        if text.startswith("the same shape in"):
            assert a.shape == b.shape and a.colour != b.colour and b.colour in text
            kept.add("shape")
        else:
            assert a.colour == b.colour and a.shape != b.shape and b.shape in text
            kept.add("colour")
    assert kept == {"shape", "colour"}


def test_drawing_prompts_are_held_out_and_deterministic():
    prompts = tw.drawing_prompts(seed=0, n=40)
    assert [p.prompt for p in prompts] == [p.prompt for p in tw.drawing_prompts(seed=0, n=40)]
    train_texts = {
        s.text.removesuffix(tw.BEGIN_OF_IMAGE)
        for doc in tw.iter_train_documents(seed=0, n=400, mix={"story": 1.0})
        for s in doc.segments
        if s.text
    }
    assert not {p.prompt[0] for p in prompts} & train_texts  # the descriptions are held out
    assert all(tw.drawing_held_out(p.scene) for p in prompts)
    taught = tw.iter_train_documents(0, 300, mix={"story": 0.5, "variation": 0.5})
    assert not any(tw.drawing_held_out(scene) for doc in taught for scene in scenes(doc))
    held_out = tw.drawing_prompts(seed=0, n=40, combos=sorted(tw.HELD_OUT))
    assert all(p.scene.combos() <= tw.HELD_OUT for p in held_out)
    same = tw.variation_prompts(seed=0, n=10, keep="shape")
    for p in same:
        image, text = p.prompt
        assert isinstance(image, Image.Image) and text.startswith("the same shape in")
        assert p.scene.groups()[0].colour in text


def test_read_caption_reads_what_caption_writes():
    for i in range(50):
        scene = tw.drawn_scene(random.Random(i))
        (group,) = scene.groups()
        found = tw.read_caption("a page from a book of shapes. here we have " + tw.caption(scene))
        assert found["count"] == str(group.count) and found["shape"] == group.shape
        assert found["colour"] == group.colour and found["background"] == scene.background
    assert tw.read_caption("the same shape in blue.") == {"colour": "blue"}
    assert tw.read_caption("nothing here") == {}


def picture(colour):
    return Image.new("RGB", (32, 32), colour)


def documents():
    return [
        (
            "story/1",
            [
                {"text": "a page of shapes. "},
                {"text": "here we have a red circle <on> a grey background.", "generated": True},
                {"image": picture("red"), "generated": True},
                {"text": "then a blue star.", "generated": True},
                {"image": picture("blue"), "generated": True},
            ],
        ),
        (
            "given",
            [
                {"image": picture("green")},
                {"text": "the same shape in yellow."},
                {"image": picture("yellow"), "generated": True},
            ],
        ),
        ("images only", [{"image": picture("white"), "generated": True}]),
    ]


def test_written_documents_read_back_in_order(tmp_path):
    paths = write_interleaved(documents(), tmp_path)
    assert len(paths["images"]) == 5
    records = json.loads(paths["json"].read_text())
    assert records[0]["image_generated"] == [True, True] and records[1]["image_generated"] == [False, True]
    back = list(read_annt(paths["json"]))
    for (doc_id, parts), doc in zip(documents(), back):
        assert len(doc.segments) <= len(parts)
        read = [s.text if s.text is not None else s.image.load().getpixel((0, 0)) for s in doc.segments]
        expected = []
        for part in parts:  # the annt reader joins a run of sentences into one text
            value = part["text"] if "text" in part else part["image"].getpixel((0, 0))
            if expected and isinstance(value, str) and isinstance(expected[-1], str):
                expected[-1] += " " + value
            else:
                expected.append(value)
        assert read == [e for e in expected if e != ""], doc_id
    page = paths["html"].read_text()
    assert "&lt;on&gt;" in page and "<on>" not in page  # text is escaped
    assert page.count("drawn by the model") == 4


def test_bad_parts_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"document 'x', part 1: a part is"):
        write_interleaved([("x", [{"text": "a"}, {"video": 1}])], tmp_path)


def test_the_page_in_a_browser(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    paths = write_interleaved(documents(), tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(paths["html"].as_uri())
            assert page.locator("article").count() == 3
            assert page.locator("figure.generated img").count() == 4
            loaded = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth)")
            assert loaded == [32] * 5  # every PNG found and decoded
            order = page.locator("article").first.evaluate(
                "el => [...el.querySelectorAll('p, img')].map(n => n.tagName)"
            )
            assert order == ["P", "P", "IMG", "P", "IMG"]
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert not errors
        finally:
            browser.close()
    shutil.copy(SCREENSHOT, tmp_path / "screenshot.png")

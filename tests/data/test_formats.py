"""Readers on fixture files written in each upstream layout, and every bad input skipped by reason."""

import hashlib
import io
import json
import tarfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from interleaf import images
from interleaf.data.formats import (
    READERS,
    read,
    read_annt,
    read_llava,
    read_mmc4,
    read_obelics,
    read_pairs_parquet,
    read_pairs_wds,
)
from interleaf.data.schema import DataError, ImageRef, Segment, SkipCounter


def encode(mode: str = "RGB", fmt: str = "PNG", size: tuple[int, int] = (4, 4), color=1) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


GOOD = encode()
BAD_IMAGES = {  # name -> (bytes, reason under check_images=True)
    "corrupt": (b"definitely not an image", "corrupt_image"),
    "truncated": (GOOD[: len(GOOD) // 2], "corrupt_image"),
    "empty": (b"", "empty_image"),
}


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 10 kB PNG that decodes to 81 megapixels: above the decoder's limit, never decoded."""
    return encode("1", size=(9000, 9000), color=0)


def text(value: str, role: str | None = None) -> Segment:
    return Segment(text=value, role=role)


def image(role: str | None = None, **ref) -> Segment:
    return Segment(image=ImageRef(**ref), role=role)


def write_jsonl(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------- MMC4


def mmc4_image(name: str, index: int, sim: float) -> dict:
    return {
        "face_detections": None,
        "image_name": name,
        "matched_sim": sim,
        "matched_text_index": index,
        "raw_url": f"http://example.com/{name}",
    }


MMC4_DOC = {
    "image_info": [mmc4_image("b9040a0dbb22.jpg", 2, 0.31), mmc4_image("db1c21bc8474.jpg", 0, 0.22)],
    "similarity_matrix": [[0.22, 0.1, 0.2], [0.1, 0.15, 0.31]],
    "text_list": ["Honda Fit.", "It is small.", "The back seats fold.", "Price on request."],
    "url": "http://www.hfitinfo.com/honda_fit_pics/3/2/index.html",
    "could_have_url_duplicate": 0,
}


def test_mmc4_images_go_before_their_matched_sentence(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [MMC4_DOC])
    counter = SkipCounter()
    (doc,) = read_mmc4(tmp_path / "docs.jsonl", image_root=tmp_path, counter=counter)
    assert doc.id == MMC4_DOC["url"] and doc.source == "mmc4"
    assert doc.segments == [
        image(path=str(tmp_path / "db1c21bc8474.jpg")),
        text("Honda Fit. It is small."),
        image(path=str(tmp_path / "b9040a0dbb22.jpg")),
        text("The back seats fold. Price on request."),
    ]
    assert counter.seen == 1 and not counter.skipped


def test_mmc4_threshold_urls_zip_and_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [MMC4_DOC])
    with zipfile.ZipFile(tmp_path / "docs_no_face_shard_0_v2.jsonl.zip", "w") as archive:
        archive.writestr("docs_no_face_shard_0_v2.jsonl", json.dumps({**MMC4_DOC, "url": "http://b"}) + "\n")
    docs = list(read_mmc4(tmp_path, similarity_threshold=0.3))
    assert [d.id for d in docs] == [MMC4_DOC["url"], "http://b"]
    assert docs[0].segments == [
        text("Honda Fit. It is small."),
        image(url="http://example.com/b9040a0dbb22.jpg"),
        text("The back seats fold. Price on request."),
    ]


def test_mmc4_bad_records_are_skipped_by_reason(tmp_path, bomb):
    names = {"good.png": GOOD, **{f"{k}.png": v for k, (v, _) in BAD_IMAGES.items()}, "bomb.png": bomb}
    for name, data in names.items():
        (tmp_path / name).write_bytes(data)
    doc = {"text_list": ["A."], "url": "u"}
    records = [
        {**doc, "image_info": [mmc4_image("good.png", 0, 0.3)]},
        "{not json",
        {"url": "no text_list", "image_info": []},
        {**doc, "text_list": "not a list", "image_info": []},
        ["a", "list"],
        {**doc, "image_info": [mmc4_image("good.png", 5, 0.3)]},
        {**doc, "image_info": [mmc4_image("absent.png", 0, 0.3)]},
        *({**doc, "image_info": [mmc4_image(f"{k}.png", 0, 0.3)]} for k in BAD_IMAGES),
        {**doc, "image_info": [mmc4_image("bomb.png", 0, 0.3)]},
        {**doc, "text_list": [], "image_info": []},
    ]
    write_jsonl(tmp_path / "docs.jsonl", records)
    counter = SkipCounter()
    docs = list(read_mmc4(tmp_path / "docs.jsonl", image_root=tmp_path, counter=counter, check_images=True))
    assert len(docs) == 1 and docs[0].images[0].load().size == (4, 4)
    assert counter.skipped == {
        "malformed_json": 1,
        "missing_field": 1,
        "bad_type": 2,
        "bad_index": 1,
        "missing_image": 1,
        "corrupt_image": 2,
        "empty_image": 1,
        "huge_image": 1,
        "empty_document": 1,
    }
    assert counter.examples["malformed_json"].startswith("docs.jsonl:2:")
    assert counter.examples["bad_index"].startswith("docs.jsonl:6:")


def test_images_are_not_decoded_unless_asked(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"junk")
    write_jsonl(tmp_path / "docs.jsonl", [{"text_list": ["A."], "image_info": [mmc4_image("corrupt.png", 0, 0.3)]}])
    counter = SkipCounter()
    (doc,) = read_mmc4(tmp_path / "docs.jsonl", image_root=tmp_path, counter=counter)
    assert doc.id == "docs.jsonl:1" and counter.seen == 1 and not counter.skipped


def test_small_limit_on_pixels_counts_as_huge(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10)
    (tmp_path / "a.png").write_bytes(GOOD)
    write_jsonl(tmp_path / "docs.jsonl", [{"text_list": ["A."], "image_info": [mmc4_image("a.png", 0, 0.3)]}])
    counter = SkipCounter()
    assert list(read_mmc4(tmp_path / "docs.jsonl", image_root=tmp_path, counter=counter, check_images=True)) == []
    assert counter.skipped == {"huge_image": 1}


def test_wrong_modes_are_read_as_rgb(tmp_path):
    variants = {"cmyk.jpg": encode("CMYK", "JPEG"), "p.png": encode("P"), "la.png": encode("LA", color=(0, 0))}
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
    write_jsonl(
        tmp_path / "docs.jsonl", [{"text_list": ["A."], "image_info": [mmc4_image(n, 0, 0.3)]} for n in variants]
    )
    counter = SkipCounter()
    docs = list(read_mmc4(tmp_path / "docs.jsonl", image_root=tmp_path, counter=counter, check_images=True))
    assert len(docs) == 3 and not counter.skipped
    assert {doc.images[0].load().mode for doc in docs} == {"RGB"}


def test_skip_rate_ceiling_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", ["{broken"] * 8 + [{"text_list": ["A."], "image_info": []}] * 2)
    with pytest.raises(DataError) as error:
        list(read_mmc4(tmp_path / "docs.jsonl", counter=SkipCounter(max_skip_rate=0.5, min_samples=4)))
    assert error.value.reason == "too_many_skips"
    assert "malformed_json: 4" in str(error.value) and "docs.jsonl:1" in str(error.value)


def test_default_counter_still_enforces_the_ceiling(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", ["{broken"] * 60)
    with pytest.raises(DataError, match="50 of 50 samples skipped") as error:
        list(read(tmp_path / "docs.jsonl", "mmc4"))
    assert error.value.reason == "too_many_skips"


# ------------------------------------------------------------------------------------------- OBELICS

URL_TYPE = pa.string()


def write_obelics(path, rows, image_type: pa.DataType = URL_TYPE) -> None:
    schema_ = pa.schema(
        [
            ("images", pa.list_(image_type)),
            ("metadata", pa.string()),
            ("general_metadata", pa.string()),
            ("texts", pa.list_(pa.string())),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema_), path)


def obelics_row(images, texts, url="http://page.example/1") -> dict:
    metadata = [{"src": i, "alt_text": "a cat"} if isinstance(i, str) else None for i in images]
    general = {"url": url, "warc_filename": "crawl.warc.gz", "warc_record_offset": 1, "warc_record_length": 2}
    return {"images": images, "metadata": json.dumps(metadata), "general_metadata": json.dumps(general), "texts": texts}


def test_obelics_urls_and_local_mirror(tmp_path):
    a, b = "http://img.example/a.jpg", "http://img.example/b.jpg"
    write_obelics(tmp_path / "train-00000.parquet", [obelics_row([a, None, b], [None, "A cat.", None])])
    (doc,) = read_obelics(tmp_path)
    assert doc.id == "http://page.example/1" and doc.meta["warc_filename"] == "crawl.warc.gz"
    assert doc.segments == [image(url=a), text("A cat."), image(url=b)]
    assert doc.images[0].meta == {"src": a, "alt_text": "a cat"}

    mirror = tmp_path / "images"
    mirror.mkdir()
    local = mirror / f"{hashlib.sha1(a.encode()).hexdigest()}.jpg"
    local.write_bytes(GOOD)
    (doc,) = read(tmp_path / "train-00000.parquet", "obelics", image_root=mirror)
    assert doc.segments == [image(path=str(local)), text("A cat."), image(url=b)]


def test_obelics_image_bytes_and_bad_rows(tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        obelics_row([None, {"bytes": GOOD, "path": "x.png"}], ["Hello.", None]),
        obelics_row([None, {"bytes": b"junk", "path": None}], ["Hello.", None]),
        obelics_row([None, None], ["Hello.", None]),
        obelics_row([None], ["Hello.", "World."]),
        {**obelics_row([None], ["Hello."]), "texts": None},
        {**obelics_row([None], ["Hello."]), "general_metadata": "{oops"},
    ]
    write_obelics(tmp_path / "a.parquet", rows, image_type=struct)
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really parquet")
    counter = SkipCounter()
    docs = list(read_obelics(tmp_path, counter=counter, check_images=True))
    assert [d.segments for d in docs] == [[text("Hello."), image(data=GOOD)]]
    assert counter.skipped == {
        "corrupt_image": 1,
        "bad_position": 1,
        "length_mismatch": 1,
        "missing_field": 1,
        "malformed_json": 1,
        "corrupt_file": 1,
    }
    assert counter.examples["bad_position"].startswith("a.parquet:2:")
    assert counter.examples["corrupt_file"].startswith("b.parquet:")


# --------------------------------------------------------------------------------------------- pairs


def test_pairs_webdataset_shards(tmp_path):
    meta = {"caption": "a blue square", "url": "http://x/1.png", "key": "000000001", "status": "success"}
    write_tar(
        tmp_path / "00000.tar",
        {
            "000000000.jpg": encode(fmt="JPEG"),
            "000000000.txt": b"a red circle",
            "000000001.png": GOOD,
            "000000001.json": json.dumps(meta).encode(),
            "000000002.jpg": GOOD,
            "000000003.txt": b"no image",
            "000000004.jpg": GOOD,
            "000000004.txt": b"  ",
            "000000005.jpg": GOOD,
            "000000005.json": b"{bad",
        },
    )
    write_tar(
        tmp_path / "00001.tar",
        {f"00001000{i}.{e}": GOOD if e == "webp" else b"x" for i in range(2) for e in ("webp", "txt")},
    )
    counter = SkipCounter()
    docs = list(read_pairs_wds(tmp_path, counter=counter))
    assert [d.id for d in docs] == ["000000000", "000000001", "000010000", "000010001"]
    assert docs[0].segments == [image(data=encode(fmt="JPEG")), text("a red circle")]
    assert docs[1].segments == [image(data=GOOD), text("a blue square")]
    assert docs[1].meta == {"url": "http://x/1.png", "key": "000000001", "status": "success"}
    assert counter.skipped == {"missing_field": 1, "missing_image": 1, "no_text": 1, "malformed_json": 1}
    assert counter.examples["missing_image"].startswith("00000.tar:000000003:")


def test_pairs_webdataset_bad_images_and_truncated_shard(tmp_path, bomb):
    members = {"a.jpg": GOOD, "a.txt": b"good"}
    for name, (data, _) in BAD_IMAGES.items():
        members |= {f"{name}.png": data, f"{name}.txt": b"caption"}
    members |= {"bomb.png": bomb, "bomb.txt": b"caption"}
    write_tar(tmp_path / "a.tar", members)
    write_tar(tmp_path / "b.tar", {"c.jpg": GOOD, "c.txt": b"kept", "d.png": GOOD, "d.txt": b"lost" * 500})
    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = tar.getmember("d.txt").offset_data + 100
    (tmp_path / "b.tar").write_bytes((tmp_path / "b.tar").read_bytes()[:cut])  # a shard cut short mid-member
    counter = SkipCounter()
    docs = list(read_pairs_wds(tmp_path, counter=counter, check_images=True))
    assert [d.id for d in docs] == ["a", "c"]
    assert counter.skipped == {"corrupt_image": 2, "empty_image": 1, "huge_image": 1, "corrupt_file": 1}


def test_pairs_parquet_column_conventions(tmp_path):
    laion = {"URL": ["http://x/1.jpg", None], "TEXT": ["a cat", "no url"], "similarity": [0.3, 0.3]}
    pq.write_table(pa.table(laion), tmp_path / "laion.parquet")
    hf = [
        {"image": {"bytes": GOOD, "path": None}, "caption": "a dog"},
        {"image": {"bytes": b"", "path": None}, "caption": "x"},
    ]
    pq.write_table(pa.Table.from_pylist(hf), tmp_path / "hf.parquet")
    img2dataset = {
        "jpg": [GOOD, GOOD, GOOD],
        "caption": ["a bird", None, ""],
        "url": ["http://y", "http://z", "http://w"],
    }
    pq.write_table(pa.table(img2dataset), tmp_path / "part-0.parquet")

    counter = SkipCounter()
    docs = list(read_pairs_parquet(tmp_path, counter=counter, check_images=True))
    assert [(d.id, d.segments) for d in docs] == [
        ("hf.parquet:0", [image(data=GOOD), text("a dog")]),
        ("part-0.parquet:0", [image(data=GOOD), text("a bird")]),
    ]
    assert counter.skipped == {"empty_image": 1, "url_image": 1, "missing_image": 1, "missing_field": 1, "no_text": 1}

    (doc,) = read_pairs_parquet(tmp_path / "laion.parquet", counter=SkipCounter())
    assert doc.segments == [image(url="http://x/1.jpg"), text("a cat")] and doc.meta == {"url": "http://x/1.jpg"}


def test_pairs_parquet_without_caption_column_raises(tmp_path):
    pq.write_table(pa.table({"jpg": [GOOD], "title": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError) as error:
        list(read_pairs_parquet(tmp_path / "a.parquet"))
    assert error.value.reason == "missing_column" and "title" in str(error.value)
    (doc,) = read_pairs_parquet(tmp_path / "a.parquet", text_column="title")
    assert doc.segments == [image(data=GOOD), text("a")]


# --------------------------------------------------------------------------------------------- LLaVA

LLAVA = [
    {
        "id": "000000033471",
        "image": "coco/train2017/000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    },
    {
        "id": 7,
        "image": "ocr_vqa/images/7.jpg",
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "Who wrote this book?\n<image>"},
            {"from": "gpt", "value": "Jane Doe"},
        ],
    },
    {"id": "i6IyJda_0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"id": "no-placeholder", "image": "a.jpg", "conversations": [{"from": "human", "value": "Q"}]},
    {"id": "no-image", "conversations": [{"from": "human", "value": "<image>\nQ"}]},
    {"id": "bad-role", "conversations": [{"from": "bot", "value": "Q"}]},
    {"id": "no-conversations", "image": "a.jpg"},
    "not a record",
]


def test_llava_chat_records(tmp_path):
    (tmp_path / "llava_v1_5_mix665k.json").write_text(json.dumps(LLAVA))
    counter = SkipCounter()
    docs = list(read_llava(tmp_path / "llava_v1_5_mix665k.json", counter=counter))
    assert [d.id for d in docs] == ["000000033471", "7", "i6IyJda_0"]
    assert all(d.is_chat and d.source == "llava" for d in docs)
    assert docs[0].segments == [
        image("user", path=str(tmp_path / "coco/train2017/000000033471.jpg")),
        text("What are the colors of the bus in the image?", "user"),
        text("The bus in the image is white and red.", "assistant"),
        text("What feature can be seen on the back of the bus?", "user"),
        text("The back of the bus features an advertisement.", "assistant"),
    ]
    assert docs[1].segments == [
        text("Answer briefly.", "system"),
        text("Who wrote this book?", "user"),
        image("user", path=str(tmp_path / "ocr_vqa/images/7.jpg")),
        text("Jane Doe", "assistant"),
    ]
    assert docs[2].segments == [text("Hi", "user"), text("Hello!", "assistant")]
    assert counter.skipped == {"image_count_mismatch": 2, "unknown_role": 1, "missing_field": 1, "bad_type": 1}
    assert counter.examples["unknown_role"].startswith("llava_v1_5_mix665k.json:5:")


def test_llava_image_root_check_images_and_broken_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(LLAVA[:2]))
    (tmp_path / "b.json").write_text('[{"id": 1,')
    root = tmp_path / "images"
    (root / "coco/train2017").mkdir(parents=True)
    (root / "coco/train2017/000000033471.jpg").write_bytes(GOOD)
    counter = SkipCounter()
    docs = list(read_llava(tmp_path, image_root=root, counter=counter, check_images=True))
    assert [d.id for d in docs] == ["000000033471"]
    assert docs[0].images == [ImageRef(path=str(root / "coco/train2017/000000033471.jpg"))]
    assert counter.skipped == {"missing_image": 1, "malformed_json": 1}
    assert counter.examples["malformed_json"].startswith("b.json:")


# ---------------------------------------------------------------------------------------------- annt

ANNT = [  # docs/examples/annt.json of MM-Interleaved
    {
        "sentences": ["a kitchen is shown with a variety of items on the counters."],
        "images": ["./assets/dataset/coco/val2014/COCO_val2014_000000384213.jpg"],
        "sentence_ixs": [0],
        "image_first": [False],
        "generate_mode": "generate_images",
        "num_iter": 1,
    },
    {
        "sentences": ["A photo of"],
        "images": ["./assets/dataset/coco/val2014/COCO_val2014_000000384213.jpg"],
        "sentence_ixs": [0],
        "image_first": [True],
        "generate_mode": "generate_texts",
        "num_iter": 1,
    },
]


def test_annt_upstream_example(tmp_path):
    (tmp_path / "annt.json").write_text(json.dumps(ANNT))
    docs = list(read_annt(tmp_path / "annt.json"))
    path = str(tmp_path / "assets/dataset/coco/val2014/COCO_val2014_000000384213.jpg")
    assert [d.id for d in docs] == ["annt.json:0", "annt.json:1"]
    assert docs[0].segments == [text("a kitchen is shown with a variety of items on the counters."), image(path=path)]
    assert docs[1].segments == [image(path=path), text("A photo of")]
    assert docs[0].meta == {"generate_mode": "generate_images", "num_iter": 1}


def test_annt_interleaving_and_bad_documents(tmp_path):
    story = {
        "sentences": ["s0", "s1", "s2"],
        "images": ["i0.png", "i1.png", "i2.png"],
        "sentence_ixs": [0, 1, 2],
        "image_first": [True, False, True],
    }
    documents = [
        story,
        {**story, "sentence_ixs": [0, 1]},
        {**story, "sentence_ixs": [0, 1, 3]},
        {**story, "image_first": [1, 0, 1]},
        {k: v for k, v in story.items() if k != "sentences"},
    ]
    (tmp_path / "annt.json").write_text(json.dumps(documents))
    counter = SkipCounter()
    docs = list(read_annt(tmp_path / "annt.json", image_root="/data", counter=counter))
    assert docs[0].segments == [
        image(path="/data/i0.png"),
        text("s0 s1"),
        image(path="/data/i1.png"),
        image(path="/data/i2.png"),
        text("s2"),
    ]
    assert len(docs) == 1
    assert counter.skipped == {"length_mismatch": 1, "bad_index": 1, "bad_type": 1, "missing_field": 1}


def test_annt_single_document_object(tmp_path):
    (tmp_path / "annt.json").write_text(json.dumps(ANNT[1]))
    (doc,) = read_annt(tmp_path / "annt.json", image_root=tmp_path)
    assert doc.segments[1] == text("A photo of")


# ------------------------------------------------------------------------------------------ dispatch


def test_read_dispatches_and_names_known_formats(tmp_path):
    assert set(READERS) == {"mmc4", "obelics", "pairs_wds", "pairs_parquet", "llava", "annt"}
    (tmp_path / "annt.json").write_text(json.dumps(ANNT))
    counter = SkipCounter()
    assert len(list(read(tmp_path, "annt", counter=counter))) == 2 and counter.seen == 2
    with pytest.raises(ValueError, match="known formats: mmc4, obelics"):
        read(tmp_path, "laion")


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_mmc4(tmp_path / "absent.jsonl")
    with pytest.raises(FileNotFoundError, match="no .tar files"):
        read_pairs_wds(tmp_path)

"""Images by URL: ``data urls`` -> img2dataset -> ``data convert --images``.

The end-to-end tests serve the tiny world's pictures from a local HTTP server (127.0.0.1 only),
with URLs that answer 404, that time out, and that serve a web page instead of an image, and run
the real img2dataset (skipped where it is not installed: ``pip install 'interleaf[prep]'``). The
join itself is also tested on img2dataset's output layout written by hand, so it is covered
without the tool.
"""

import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from interleaf.cli import main
from interleaf.data import tinyworld
from interleaf.data.downloads import Downloads, UrlList, download
from interleaf.data.formats import read_mmc4
from interleaf.data.schema import SkipCounter
from interleaf.data.shards import read_shard
from interleaf.extras import MissingExtra

HAS_IMG2DATASET = importlib.util.find_spec("img2dataset") is not None
needs_img2dataset = pytest.mark.skipif(not HAS_IMG2DATASET, reason="img2dataset is not installed (interleaf[prep])")
SLOW_S = 3  # the slow URL answers after this; img2dataset gives up after TIMEOUT_S
TIMEOUT_S = 1
PAGE = b"<html><body>This picture has moved.</body></html>"


def pictures(n: int = 4) -> dict[str, bytes]:
    rng = random.Random(0)
    return {f"p{i}.png": tinyworld.png_bytes(tinyworld.render(tinyworld.random_scene(rng), 24)) for i in range(n)}


class Site:
    """A web server on 127.0.0.1: ``/img/NAME`` serves a picture, ``/slow/NAME`` too but after
    ``SLOW_S`` s, ``/html/NAME`` a web page (200, text/html), anything else 404."""

    def __init__(self):
        self.pictures = pictures()
        self.stop = threading.Event()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                kind, _, name = self.path.strip("/").partition("/")
                body, kind_of, status = b"not found", "text/plain", 404
                if kind in ("img", "slow") and name in site.pictures:
                    if kind == "slow" and site.stop.wait(SLOW_S):
                        return
                    body, kind_of, status = site.pictures[name], "image/png", 200
                elif kind == "html":
                    body, kind_of, status = PAGE, "text/html", 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind_of)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (the slow URL)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def url(self, kind: str, name: str) -> str:
        return f"{self.base}/{kind}/{name}"

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def site():
    served = Site()
    yield served
    served.close()


def mmc4_record(doc_id: str, items: list[str]) -> dict:
    """An MMC4 record: ``items`` are sentences and image URLs (``http...``), each image placed
    before the sentence that follows it."""
    text_list, image_info = [], []
    for item in items:
        if item.startswith("http"):
            image_info.append({"raw_url": item, "image_name": "unused.jpg", "matched_text_index": len(text_list)})
        else:
            text_list.append(item)
    return {"url": doc_id, "text_list": text_list, "image_info": image_info}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_obelics(path: Path, docs: dict[str, list[str]]) -> Path:
    rows = [
        {
            "texts": [None if item.startswith("http") else item for item in items],
            "images": [item if item.startswith("http") else None for item in items],
            "general_metadata": json.dumps({"url": doc_id}),
        }
        for doc_id, items in docs.items()
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def survivors(out: Path) -> dict[str, list]:
    """Documents of ``out``'s shards: id -> segments (text, or the image's bytes)."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for doc in read_shard(shard):
            found[doc.id] = [s.text if s.text is not None else s.image.data for s in doc.segments]
    return found


def cli(*argv: str) -> subprocess.CompletedProcess:
    """The real command line, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "interleaf.cli", *argv], capture_output=True, text=True, timeout=600)


def run_img2dataset(url_list: Path, out: Path, output_format: str) -> None:
    """img2dataset through :func:`download`, in a process of its own (it starts processes, and
    imports modules that warn); no proxy for 127.0.0.1, no update check, no network otherwise."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "no_proxy": "127.0.0.1,localhost", "WANDB_MODE": "disabled"}
    env.pop("http_proxy", None), env.pop("HTTP_PROXY", None)
    code = (
        "from interleaf.data.downloads import download; "
        f"download({str(url_list)!r}, {str(out)!r}, processes=1, threads=8, timeout={TIMEOUT_S}, "
        f"output_format={output_format!r}, encode_format='png', number_sample_per_shard=4)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


# -- end to end, with img2dataset ----------------------------------------------------------------


@pytest.fixture(scope="module")
def world(site, tmp_path_factory):
    """MMC4 and OBELICS documents whose images are URLs of ``site``, their URL lists (written by
    ``data urls``, once through the real CLI) and what img2dataset downloaded of them."""
    root = tmp_path_factory.mktemp("world")
    ok = [site.url("img", name) for name in site.pictures]
    mmc4 = {
        "a": [ok[0], "a red thing.", ok[1], "and another."],
        "b": [ok[2], "fine.", site.url("img", "gone.png"), "404."],
        "c": [site.url("slow", "p0.png"), "too slow."],
        "d": [site.url("html", "p1.png"), "a web page."],
        "e": ["text first.", ok[0], "the same picture as a's first."],
    }
    obelics = {"o1": ["words.", ok[3], "more words."], "o2": [site.url("img", "gone.png"), "404 again."]}
    write_jsonl(root / "mmc4" / "docs-0.jsonl", [mmc4_record(i, items) for i, items in mmc4.items()])
    write_obelics(root / "obelics.parquet", obelics)
    done = cli("data", "urls", "mmc4", str(root / "mmc4"), str(root / "urls" / "mmc4.parquet"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote 6 distinct image URLs to {root / 'urls' / 'mmc4.parquet'} (7 image URLs in")
    assert "5 documents, 1 duplicates dropped)" in done.stdout
    assert main(["data", "urls", "obelics", str(root / "obelics.parquet"), str(root / "urls" / "obelics.parquet")]) == 0
    # documents added after the download: f's image was never downloaded, g's was (for a)
    late = [mmc4_record("f", [site.url("img", "late.png"), "late."]), mmc4_record("g", [ok[1], "fine."])]
    write_jsonl(root / "mmc4" / "docs-1.jsonl", late)
    run_img2dataset(root / "urls", root / "images", "webdataset")  # "files": tested on a layout by hand below
    return {"root": root, "mmc4": mmc4, "obelics": obelics, "images": root / "images"}


@needs_img2dataset
def test_urls_img2dataset_convert_through_the_cli(world, site):
    root, images = world["root"], world["images"]
    assert len(list(images.glob("*_stats.json"))) == 3  # shards of 4 URLs, per URL list file
    out = root / "shards-mmc4"
    done = cli("data", "convert", "mmc4", str(root / "mmc4"), str(out), "--images", str(images))
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith(f"wrote 1 shards (3 documents) to {out}; read: 7 samples, none skipped; ")
    assert "checked before writing: 7 samples, skipped failed_to_download: 2 (e.g. document 'b': image" in line
    assert "failed_to_resize: 1" in line and "not_downloaded: 1" in line
    assert line.endswith(
        f"images from {images}: 5 joined, 4 failed: failed_to_download: 2 ('HTTP Error 404: Not Found' x1, "
        "'timed out' x1); failed_to_resize: 1 ('Image decoding error' x1); not_downloaded: 1 "
        "('not in the img2dataset output' x1)"
    ), line
    docs, served = survivors(out), site.pictures
    assert docs == {
        "a": [served["p0.png"], "a red thing.", served["p1.png"], "and another."],
        "e": ["text first.", served["p0.png"], "the same picture as a's first."],
        "g": [served["p1.png"], "fine."],
    }


@needs_img2dataset
def test_obelics_and_parts_with_img2dataset(world, site, capsys):
    root, images = world["root"], world["images"]
    out = root / "shards-obelics"
    assert main(["data", "convert", "obelics", str(root / "obelics.parquet"), str(out), "--images", str(images)]) == 0
    line = capsys.readouterr().out
    assert "1 joined, 1 failed: failed_to_download: 1 ('HTTP Error 404: Not Found' x1)" in line
    assert survivors(out) == {"o1": ["words.", site.pictures["p3.png"], "more words."]}
    # the parts of an MMC4 conversion with --images (here by file: 2 files, 2 parts) join alike
    parts = root / "shards-parts"
    for i in range(2):
        argv = ["data", "convert", "mmc4", str(root / "mmc4"), str(parts), "--images", str(images), "--part"]
        assert main([*argv, f"{i}/2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "images from" in lines[0] and "4 joined, 3 failed" in lines[0]
    assert lines[1].startswith("part 1/2 (1 of 2 files): ") and "1 joined, 1 failed: not_downloaded: 1" in lines[1]
    assert set(survivors(parts)) == {"a", "e", "g"}


# -- the join, on img2dataset's layout written by hand ----------------------------------------------


def fake_download(folder: Path, shards: list[list[tuple]], layout: str = "webdataset") -> Path:
    """img2dataset's output: per shard ``NNNNN.parquet`` (one row a URL: url, key, status,
    error_message), the successes' images in ``NNNNN.tar`` or ``NNNNN/``, ``NNNNN_stats.json``.
    A row is ``(url, status, error_message, image bytes or None)``."""
    folder.mkdir(parents=True)
    for number, rows in enumerate(shards):
        stem = f"{number:05d}"
        keys = [f"{number:05d}{i:04d}" for i in range(len(rows))]
        table = {
            "url": [r[0] for r in rows],
            "key": keys,
            "status": [r[1] for r in rows],
            "error_message": [r[2] for r in rows],
            "width": [None] * len(rows),
        }
        pq.write_table(pa.table(table), folder / f"{stem}.parquet")
        found = [(key, row[3]) for key, row in zip(keys, rows) if row[3] is not None]
        if layout == "webdataset":
            with tarfile.open(folder / f"{stem}.tar", "w") as archive:
                for key, data in found:
                    for name, payload in ((f"{key}.json", b"{}"), (f"{key}.jpg", data)):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        archive.addfile(info, io.BytesIO(payload))
        else:
            (folder / stem).mkdir()
            for key, data in found:
                (folder / stem / f"{key}.jpg").write_bytes(data)
                (folder / stem / f"{key}.json").write_text("{}")
        (folder / f"{stem}_stats.json").write_text(json.dumps({"count": len(rows)}))
    return folder


@pytest.mark.parametrize("layout", ["webdataset", "files"])
def test_join_by_url(tmp_path, layout):
    pics = pictures()
    u = [f"https://x.invalid/{i}.png" for i in range(7)]
    shards = [
        [(u[0], "success", None, pics["p0.png"]), (u[1], "failed_to_download", "HTTP Error 403: Forbidden", None)],
        [
            (u[2], "success", None, pics["p2.png"]),
            (u[1], "success", None, pics["p1.png"]),  # a URL listed twice: the success counts
            (u[3], "success", None, None),  # a success whose image is not in the folder
            (u[4], "failed_to_resize", "image too small", None),
        ],
    ]
    images = fake_download(tmp_path / "images", shards, layout)
    records = [
        mmc4_record("a", [u[0], "zero.", u[1], "one."]),
        mmc4_record("b", [u[2], "two."]),
        mmc4_record("c", [u[3], "bytes lost."]),
        mmc4_record("d", [u[4], "small.", u[5], "never listed."]),
        mmc4_record("e", ["no image at all."]),
    ]
    src = write_jsonl(tmp_path / "docs.jsonl", records)
    downloads, counter = Downloads(images), SkipCounter()
    docs = {d.id: d for d in downloads.join(read_mmc4(src), counter)}
    assert list(docs) == ["a", "b", "e"]
    assert [s.image.data for s in docs["a"].segments if s.image] == [pics["p0.png"], pics["p1.png"]]
    assert docs["a"].images[1].meta["url"] == u[1]
    assert dict(counter.skipped) == {"missing_bytes": 1, "failed_to_resize": 1}
    assert counter.examples["failed_to_resize"].startswith(f"document 'd': image {u[4]!r}: image too small")
    assert downloads.counts.joined == 3
    assert dict(downloads.counts.failed) == {"missing_bytes": 1, "failed_to_resize": 1, "not_downloaded": 1}
    assert downloads.counts.report() == (
        "3 joined, 3 failed: missing_bytes: 1 ('no image for key 000010002 in 00001' x1); "
        "failed_to_resize: 1 ('image too small' x1); not_downloaded: 1 ('not in the img2dataset output' x1)"
    )


def test_convert_with_images_parts_and_workers(tmp_path, capsys):
    """--images with --workers: each worker joins its own documents; the total is the one job's."""
    pics = pictures()
    urls = [f"https://x.invalid/{i}.png" for i in range(12)]
    rows = [(url, "success", None, pics[f"p{i % 4}.png"]) for i, url in enumerate(urls[:9])]
    rows += [(url, "failed_to_download", "timed out", None) for url in urls[9:]]
    images = fake_download(tmp_path / "images", [rows[:6], rows[6:]])
    src = write_jsonl(tmp_path / "docs.jsonl", [mmc4_record(f"d{i}", [url, f"doc {i}."]) for i, url in enumerate(urls)])
    base = ["data", "convert", "mmc4", str(src)]
    assert main([*base, str(tmp_path / "one"), "--images", str(images), "--max-skip-rate", "0.5"]) == 0
    one = capsys.readouterr().out.splitlines()
    assert one[0].endswith("9 joined, 3 failed: failed_to_download: 3 ('timed out' x3)")
    assert main([*base, str(tmp_path / "w"), "--images", str(images), "--workers", "2", "--max-skip-rate", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("the whole input by 2 workers: wrote 2 shards (9 documents)")
    assert lines[-1].endswith("9 joined, 3 failed: failed_to_download: 3 ('timed out' x3)")
    assert survivors(tmp_path / "w") == survivors(tmp_path / "one") and len(survivors(tmp_path / "one")) == 9


def test_url_lists(tmp_path, capsys):
    urls = ["https://x.invalid/a.png", "https://x.invalid/b.png"]
    src = write_jsonl(
        tmp_path / "docs.jsonl",
        [mmc4_record("a", [urls[0], "x.", urls[1], "y."]), mmc4_record("b", [urls[1], "z."]), mmc4_record("c", ["t."])],
    )
    assert main(["data", "urls", "mmc4", str(src), str(tmp_path / "urls.parquet")]) == 0
    assert capsys.readouterr().out.startswith("wrote 2 distinct image URLs to ")
    assert pq.read_table(tmp_path / "urls.parquet").column("url").to_pylist() == urls
    assert main(["data", "urls", "mmc4", str(src), str(tmp_path / "urls.txt"), "--part", "1/2"]) == 0
    assert capsys.readouterr().out.startswith("part 1/2: wrote 1 distinct image URLs")
    assert (tmp_path / "urls.txt").read_text() == f"{urls[1]}\n"
    listed = UrlList()
    listed.add(read_mmc4(src))
    assert (list(listed.urls), listed.occurrences, listed.documents) == (urls, 3, 3)


# -- bad input --------------------------------------------------------------------------------------


def one_line(capsys, argv: list[str], verb: str, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"interleaf data {verb}: error: "), err
    assert all(word in err[0] for word in words), (words, err[0])
    return err[0]


def test_bad_images_folders(tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", [mmc4_record("a", ["https://x.invalid/a.png", "x."])])
    out = tmp_path / "out"
    convert = ["data", "convert", "mmc4", str(src), str(out), "--images"]
    one_line(capsys, [*convert, str(tmp_path / "nowhere")], "convert", "argument --images", "no such directory")
    (tmp_path / "empty").mkdir()
    one_line(capsys, [*convert, str(tmp_path / "empty")], "convert", "not an img2dataset output folder", "empty")
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"url": ["u"], "caption": ["c"]}), other / "pairs.parquet")
    one_line(capsys, [*convert, str(other)], "convert", "pairs.parquet is not img2dataset's metadata", "key, status")
    (other / "pairs.parquet").write_bytes(b"not parquet")
    one_line(capsys, [*convert, str(other)], "convert", "cannot read pairs.parquet")
    inside = tmp_path / "inside"
    inside.mkdir()
    table = {"url": ["u"], "key": ["0"], "status": ["success"], "error_message": [None], "jpg": [b"\xff\xd8\xff"]}
    pq.write_table(pa.table(table), inside / "00000.parquet")
    one_line(capsys, [*convert, str(inside)], "convert", "output_format parquet", "webdataset or files")
    images = fake_download(tmp_path / "images", [[("https://x.invalid/a.png", "success", None, pictures()["p0.png"])]])
    one_line(capsys, [*convert, str(images), "--image-root", str(tmp_path)], "convert", "--image-root", "not both")
    assert not out.exists()
    assert main([*convert, str(images)]) == 0


def test_bad_url_lists(tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", [mmc4_record("a", ["https://x.invalid/a.png", "x."])])
    one_line(capsys, ["data", "urls", "mmc4", str(src), str(tmp_path / "urls.csv")], "urls", "urls.csv", ".parquet")
    one_line(capsys, ["data", "urls", "mmc4", str(tmp_path / "no.jsonl"), "u.parquet"], "urls", "no.jsonl")
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "hi"}]}]))
    one_line(capsys, ["data", "urls", "llava", str(chat), str(tmp_path / "u.parquet")], "urls", "no image URL")
    assert not (tmp_path / "u.parquet").exists()


def test_download_without_img2dataset_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "img2dataset", None)  # as in a base install
    with pytest.raises(MissingExtra, match=r"pip install 'interleaf\[prep\]'"):
        download(tmp_path / "urls.parquet", tmp_path / "images")

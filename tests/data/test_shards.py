import itertools
import tarfile

import pytest

from interleaf.data.schema import DataError, Document, ImageRef, Segment, SkipCounter
from interleaf.data.shards import ShardStream, expand, read_shard, write_shards

from datahelp import make_docs, png


def texts(docs):
    return [s.text for d in docs for s in d.segments if s.text is not None]


def test_round_trip_and_shard_sizes(tmp_path):
    docs = make_docs(25)
    shards = write_shards(docs, tmp_path, max_samples=10)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    back = [d for s in shards for d in read_shard(s)]
    assert [d.id for d in back] == [d.id for d in docs]
    assert texts(back) == texts(docs)
    assert [im.data for d in back for im in d.images] == [im.data for d in docs for im in d.images]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert "000000000.json" in names and "000000000.img0.png" in names


def test_unreadable_images_are_skipped_when_writing(tmp_path):
    good = make_docs(2)
    bad = [
        Document(id="url", segments=[Segment(image=ImageRef(url="http://x/y.jpg")), Segment(text="t")]),
        Document(id="gone", segments=[Segment(image=ImageRef(path=str(tmp_path / "nope.png"))), Segment(text="t")]),
    ]
    counter = SkipCounter()
    shards = write_shards([good[0], *bad, good[1]], tmp_path / "out", counter=counter)
    assert [d.id for s in shards for d in read_shard(s)] == ["d0", "d1"]
    assert counter.skipped == {"url_image": 1, "missing_image": 1}


def test_broken_samples_and_shards_are_counted(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "a", "json": b"{not json"})
        sink.write({"__key__": "b", "txt": b"no json member"})
        sink.write({"__key__": "c", "json": b'{"id": "c", "segments": [{"image": "img0.png"}]}'})
        sink.write({"__key__": "d", "json": b'{"id": "d", "segments": [{"text": "ok"}]}'})
    counter = SkipCounter()
    assert [d.id for d in read_shard(tmp_path / "bad.tar", counter)] == ["d"]
    assert counter.skipped == {"malformed_sample": 1, "missing_field": 1, "missing_image": 1}
    (tmp_path / "truncated.tar").write_bytes((tmp_path / "bad.tar").read_bytes()[:700])
    counter = SkipCounter()
    list(read_shard(tmp_path / "truncated.tar", counter))
    assert sum(counter.skipped.values()) >= 1


def test_skip_rate_ceiling(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        for i in range(60):
            sink.write({"__key__": f"{i:03d}", "json": b"{broken"})
    with pytest.raises(DataError, match=r"60 of 60 samples skipped|skipped \(") as err:
        list(read_shard(tmp_path / "bad.tar", SkipCounter(max_skip_rate=0.1, min_samples=50)))
    assert err.value.reason == "too_many_skips" and "malformed_sample" in str(err.value)


@pytest.mark.parametrize("n_shards", [8, 3])  # split by shard, and by sample when shards < slots
def test_two_ranks_two_workers_read_disjoint_samples_covering_the_epoch(tmp_path, n_shards):
    docs = make_docs(40)
    shards = write_shards(docs, tmp_path, max_samples=-(-40 // n_shards))
    assert len(shards) == n_shards
    seen = []
    for rank, worker in itertools.product(range(2), range(2)):
        stream = ShardStream(shards, slot=rank * 2 + worker, num_slots=4, seed=3)
        seen.append([d.id for d in stream])
    flat = [i for ids in seen for i in ids]
    assert sorted(flat) == sorted(d.id for d in docs) and len(flat) == len(set(flat))
    assert all(ids for ids in seen)


def test_epochs_reshuffle_and_resume_mid_shard(tmp_path):
    shards = write_shards(make_docs(30), tmp_path, max_samples=5)
    stream = ShardStream(shards, seed=1, epochs=2)
    full = [d.id for d in stream]
    assert len(full) == 60 and sorted(full[:30]) == sorted(full[30:]) and full[:30] != full[30:]
    partial = ShardStream(shards, seed=1, epochs=2)
    it = iter(partial)
    head = [next(it).id for _ in range(37)]
    resumed = ShardStream(shards, seed=1, epochs=2)
    resumed.load_state_dict(partial.state_dict())
    assert head + [d.id for d in resumed] == full


def test_infinite_stream_resamples(tmp_path):
    shards = write_shards(make_docs(6), tmp_path, max_samples=2)
    ids = [d.id for d in itertools.islice(ShardStream(shards, epochs=None), 20)]
    assert len(ids) == 20


def test_expand_specs(tmp_path):
    shards = write_shards(make_docs(6), tmp_path, max_samples=2)
    assert expand(tmp_path) == [str(s) for s in shards]
    assert expand(str(tmp_path / "shard-*.tar")) == [str(s) for s in shards]
    assert expand(str(tmp_path / "shard-{000000..000002}.tar")) == [str(s) for s in shards]
    with pytest.raises(ValueError, match="no shards found"):
        expand(tmp_path / "empty-dir-*.tar")
    assert png()


def test_data_verbs_convert_and_inspect(tmp_path, capsys):
    import json

    from interleaf.cli import main

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png())
    lines = [
        {
            "url": "u1",
            "text_list": ["one.", "two."],
            "image_info": [
                {"image_name": "a.png", "raw_url": "http://x/a.png", "matched_text_index": 1, "matched_sim": 0.3}
            ],
        },
        {"url": "u2", "text_list": ["alone."], "image_info": []},
        "not json",
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    code = main(
        [
            "data",
            "convert",
            "mmc4",
            str(tmp_path / "docs.jsonl"),
            str(tmp_path / "shards"),
            "--image-root",
            str(images),
            "--max-skip-rate",
            "0.9",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "wrote 1 shards" in out and "malformed_json: 1" in out
    assert main(["data", "inspect", str(tmp_path / "shards"), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 documents, 1 images" in out and "'one.'" in out

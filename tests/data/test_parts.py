"""``data convert --part I/N`` and ``--workers K``: the parts of a conversion, run apart or by
local worker processes, hold every document of the one-job conversion exactly once."""

import json
from pathlib import Path

import pytest

from interleaf.cli import main
from interleaf.data.formats import read_mmc4
from interleaf.data.parts import Part
from interleaf.data.shards import expand, read_shard

from datahelp import png


def write_mmc4(root: Path, sizes: list[int], bad: tuple[int, ...] = ()) -> tuple[Path, Path]:
    """MMC4 jsonl files (``sizes[f]`` records in file ``f``) whose documents have 1-2 PNG images in
    ``root/images``; the records numbered in ``bad`` (over all files) lose an image file or their JSON."""
    docs, images = root / "docs", root / "images"
    docs.mkdir(parents=True)
    images.mkdir()
    number = 0
    for f, size in enumerate(sizes):
        lines = []
        for _ in range(size):
            info = []
            for k in range(1 + number % 2):
                name = f"{number}-{k}.png"
                if not (number in bad and number % 2 == 0):
                    (images / name).write_bytes(png((number % 250, 40 * k, 90), size=(4 + k, 4)))
                info.append({"image_name": name, "raw_url": f"https://x.invalid/{name}", "matched_text_index": k})
            record = {
                "url": f"doc{number}",
                "text_list": [f"doc {number} first.", f"then {number}."],
                "image_info": info,
            }
            lines.append("{not json" if number in bad and number % 2 else json.dumps(record))
            number += 1
        (docs / f"docs-{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return docs, images


def documents(out: Path, pattern: str = "*.tar") -> list[tuple]:
    """Every document in ``out``'s shards as (id, segments with image bytes, source), sorted."""
    found = []
    for shard in sorted(out.glob(pattern)):
        for doc in read_shard(shard):
            segments = tuple((s.text, s.image.data if s.image else None, s.role) for s in doc.segments)
            found.append((doc.id, segments, doc.source, json.dumps(doc.meta, sort_keys=True)))
    return sorted(found)


def keys(out: Path) -> list[str]:
    import tarfile

    names = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as archive:
            names += [m.name.split(".")[0] for m in archive if m.name.endswith(".json")]
    return names


def convert(capsys, src, out, images, *extra: str) -> list[str]:
    argv = ["data", "convert", "mmc4", str(src), str(out), "--image-root", str(images), "--shard-size", "4"]
    assert main([*argv, *extra]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.splitlines()


@pytest.fixture
def mmc4(tmp_path):
    """One file of 20 records, two of them bad (a missing image, a malformed line)."""
    return write_mmc4(tmp_path / "in", [20], bad=(4, 7))


# -- the split --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[9], [3, 0, 5], [2, 2, 2, 2, 2], [1, 4, 0, 3, 2, 6, 1]])
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_the_parts_of_any_split_hold_every_record_once(tmp_path, sizes, count):
    docs, images = write_mmc4(tmp_path, sizes)
    everything = [d.id for d in read_mmc4(docs, image_root=images)]
    parts = [[d.id for d in read_mmc4(docs, image_root=images, part=Part(i, count))] for i in range(count)]
    assert sorted(i for part in parts for i in part) == sorted(everything)
    sizes_of = sorted(len(part) for part in parts)
    if len(sizes) < count:  # by record: balanced to one record
        assert sizes_of[-1] - sizes_of[0] <= 1
    # the workers of a part split it again, exactly
    for i, part in enumerate(parts):
        workers = [[d.id for d in read_mmc4(docs, image_root=images, part=p)] for p in Part(i, count).split(3)]
        assert sorted(j for w in workers for j in w) == sorted(part)


def test_by_file_when_there_are_as_many_files_as_parts(tmp_path):
    files = [Path(f"f{i}") for i in range(7)]
    assert Part(1, 3).select(files) == (files[1::3], 1, 0)
    assert Part(1, 3).split(2)[1].select(files) == (files[1::3][1::2], 1, 0)
    assert Part(1, 8).select(files) == (files, 8, 1)  # fewer files than parts: by record
    assert Part(1, 3).split(4)[2].select(files) == (files[1::3], 4, 2)  # 3 files, 4 workers
    assert Part(1, 8).split(2)[1].select(files) == (files, 16, 9)
    assert (Part(3, 8).name, Part(1, 2, Part(3, 8)).name) == ("part-00003-of-00008", "part-00003-of-00008-w001-of-002")


@pytest.mark.parametrize(
    "spec, words",
    [
        ("3/2", ["'3/2'", "0..1"]),
        ("2/2", ["'2/2'", "0..1"]),
        ("0/0", ["'0/0'", "N must be >= 1"]),
        ("x", ["expected I/N", "'x'"]),
        ("-1/2", ["expected I/N", "'-1/2'"]),
        ("1/2/3", ["expected I/N"]),
        ("1.5/2", ["expected I/N"]),
        ("", ["expected I/N"]),
    ],
)
def test_a_bad_part_is_one_line(capsys, tmp_path, mmc4, spec, words):
    docs, _ = mmc4
    for verb in ("convert", "urls"):
        out = tmp_path / ("out" if verb == "convert" else "urls.parquet")
        assert main(["data", verb, "mmc4", str(docs), str(out), f"--part={spec}"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"interleaf data {verb}: error: argument --part: "), err
        assert all(word in err[0] for word in words), err[0]
        assert not out.exists()
    with pytest.raises(ValueError):
        Part.parse(spec)


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_bad_workers_is_one_line(capsys, tmp_path, mmc4, workers):
    assert main(["data", "convert", "mmc4", str(mmc4[0]), str(tmp_path / "out"), "--workers", workers]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "argument --workers" in err[0]


# -- conversions ------------------------------------------------------------------------------------


def test_parts_in_separate_calls_equal_the_one_job_conversion(capsys, tmp_path, mmc4):
    docs, images = mmc4
    one = convert(capsys, docs, tmp_path / "one", images)
    assert one[0].startswith("wrote 5 shards (18 documents) to ")
    assert "read: 20 samples, skipped malformed_json: 1" in one[0] and "missing_image: 1" in one[0]
    lines = [convert(capsys, docs, tmp_path / "parts", images, "--part", f"{i}/3") for i in range(3)]
    assert [len(part) for part in lines] == [1, 1, 1]
    assert lines[1][0].startswith("part 1/3 (records j % 3 == 1 of 1 file(s)): wrote 2 shards (5 documents) to ")
    assert lines[1][0].split("; ")[0].endswith("as part-00001-of-00003-*.tar")
    # record 4 (missing image) is in part 1, record 7 (malformed) in part 1 too
    assert "read: 7 samples, skipped malformed_json: 1" in lines[1][0] and "missing_image: 1" in lines[1][0]
    assert documents(tmp_path / "parts") == documents(tmp_path / "one")
    assert len(documents(tmp_path / "one")) == 18
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names[0] == "part-00000-of-00003-000000.tar" and all(n.startswith("part-0000") for n in names)
    assert len(set(keys(tmp_path / "parts"))) == 18  # sample keys are unique across the parts


def test_workers_equal_the_one_job_conversion(capsys, tmp_path, mmc4):
    docs, images = mmc4
    convert(capsys, docs, tmp_path / "one", images)
    lines = convert(capsys, docs, tmp_path / "w2", images, "--workers", "2")
    assert len(lines) == 3 and lines[0].startswith("part 0/2 ") and lines[1].startswith("part 1/2 ")
    assert lines[2].startswith("the whole input by 2 workers: wrote ")
    assert "(18 documents)" in lines[2] and "read: 20 samples, skipped " in lines[2]
    assert documents(tmp_path / "w2") == documents(tmp_path / "one")
    # --workers K writes exactly what K runs of --part k/K write
    for i in range(2):
        convert(capsys, docs, tmp_path / "p2", images, "--part", f"{i}/2")
    for a, b in zip(sorted((tmp_path / "w2").iterdir()), sorted((tmp_path / "p2").iterdir())):
        assert a.name == b.name and documents(a.parent, a.name) == documents(b.parent, b.name)
    # a part run by workers, beside parts run alone: still every document once
    convert(capsys, docs, tmp_path / "mixed", images, "--part", "0/3")
    lines = convert(capsys, docs, tmp_path / "mixed", images, "--part", "1/3", "--workers", "2")
    assert lines[0].startswith("part 1/3 worker 0/2 (records j % 6 == 1 of 1 file(s))")
    assert lines[-1].startswith("part 1/3 by 2 workers: wrote ")
    convert(capsys, docs, tmp_path / "mixed", images, "--part", "2/3")
    assert any(p.name.startswith("part-00001-of-00003-w001-of-002-") for p in (tmp_path / "mixed").iterdir())
    assert documents(tmp_path / "mixed") == documents(tmp_path / "one")


def test_more_workers_or_parts_than_records(capsys, tmp_path):
    docs, images = write_mmc4(tmp_path / "in", [2])
    convert(capsys, docs, tmp_path / "one", images)
    lines = convert(capsys, docs, tmp_path / "w", images, "--workers", "4")
    assert lines[2] == "part 2/4: holds no record (records j % 4 == 2 of 1 file(s)); wrote nothing"
    assert lines[3] == "part 3/4: holds no record (records j % 4 == 3 of 1 file(s)); wrote nothing"
    assert lines[4].startswith("the whole input by 4 workers: wrote 2 shards (2 documents)")
    assert documents(tmp_path / "w") == documents(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "part-00000-of-00004-000000.tar",
        "part-00001-of-00004-000000.tar",
    ]
    lines = convert(capsys, docs, tmp_path / "p", images, "--part", "5/8")
    assert lines == ["part 5/8: holds no record (records j % 8 == 5 of 1 file(s)); wrote nothing"]
    assert not (tmp_path / "p").exists()


def test_by_file_parts(capsys, tmp_path):
    docs, images = write_mmc4(tmp_path / "in", [3, 1, 4, 2, 5])
    convert(capsys, docs, tmp_path / "one", images)
    lines = [convert(capsys, docs, tmp_path / "parts", images, "--part", f"{i}/2")[0] for i in range(2)]
    assert lines[0].startswith("part 0/2 (3 of 5 files): wrote 3 shards (12 documents)")
    assert lines[1].startswith("part 1/2 (2 of 5 files): wrote 1 shards (3 documents)")
    assert documents(tmp_path / "parts") == documents(tmp_path / "one")


def test_a_rerun_part_replaces_its_shards(capsys, tmp_path, mmc4):
    docs, images = mmc4
    out = tmp_path / "out"
    convert(capsys, docs, out, images, "--part", "0/2", "--workers", "3")
    convert(capsys, docs, out, images, "--part", "1/2")
    before = documents(out)
    (out / ".part-00001-of-00002.staging").mkdir()  # what a killed run leaves
    (out / ".part-00001-of-00002.staging" / "part-00001-of-00002-000000.tar").write_bytes(b"partial")
    convert(capsys, docs, out, images, "--part", "0/2")  # the workers' shards of part 0 go
    convert(capsys, docs, out, images, "--part", "1/2")
    assert documents(out) == before and len(before) == 18
    assert sorted(p.name for p in out.iterdir()) == [
        f"part-0000{i}-of-00002-00000{k}.tar" for i in (0, 1) for k in (0, 1, 2)
    ]


def test_shards_of_another_layout_are_refused(capsys, tmp_path, mmc4):
    docs, images = mmc4
    out = tmp_path / "out"
    convert(capsys, docs, out, images)
    for extra in (["--part", "0/3"], ["--workers", "2"]):
        argv = ["data", "convert", "mmc4", str(docs), str(out), "--image-root", str(images), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "already holds 5 .tar file(s) of another layout" in err[0], err
        assert "shard-000000.tar" in err[0]
    convert(capsys, docs, out, images)  # the same layout again: replaced
    assert len(documents(out)) == 18 and len(list(out.iterdir())) == 5


def test_a_failing_part_leaves_nothing(capsys, tmp_path):
    docs, images = write_mmc4(tmp_path / "in", [6], bad=(0, 1, 2, 3, 4, 5))
    out = tmp_path / "out"
    argv = ["data", "convert", "mmc4", str(docs), str(out), "--image-root", str(images)]
    assert main([*argv, "--part", "0/2"]) == 2  # records 0, 2, 4: their images are missing
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "wrote no mmc4 document" in err[0] and "missing_image: 3" in err[0]
    assert not out.exists()
    assert main([*argv, "--part", "1/2"]) == 2  # records 1, 3, 5: malformed
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no usable mmc4 document read" in err[0] and "malformed_json: 3" in err[0], err
    assert main([*argv, "--workers", "2"]) == 2  # checked on the total, as one job
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "wrote no mmc4 document" in err[0] and "missing_image: 3" in err[0], err
    assert not out.exists()


def test_a_worker_past_the_skip_ceiling_fails_the_run(capsys, tmp_path):
    docs, images = write_mmc4(tmp_path / "in", [120], bad=tuple(range(0, 120, 2)))  # even records: no image
    out = tmp_path / "out"
    out.mkdir()
    argv = ["data", "convert", "mmc4", str(docs), str(out), "--image-root", str(images), "--workers", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("interleaf data convert: error: part 0/2: "), err
    assert "50 of 50 samples skipped" in err[0] and "missing_image" in err[0]
    assert list(out.iterdir()) == []  # worker 1's shards were not published either


def test_the_shards_of_a_part_read_back_through_expand(capsys, tmp_path, mmc4):
    docs, images = mmc4
    for i in range(3):
        convert(capsys, docs, tmp_path / "out", images, "--part", f"{i}/3")
    shards = expand(tmp_path / "out")
    assert len(shards) == 6 and sum(1 for s in shards for _ in read_shard(s)) == 18

"""A source whose shards hold no readable document is an error, not an endless loop."""

import tarfile

import pytest

from interleaf.cli import main
from interleaf.data.schema import DataError
from interleaf.data.shards import ShardStream


def empty_shard(path):
    with tarfile.open(path, "w"):
        pass
    return path


def test_an_endless_stream_over_empty_shards_stops_with_an_error(tmp_path):
    stream = ShardStream([empty_shard(tmp_path / "a.tar"), empty_shard(tmp_path / "b.tar")], epochs=None)
    with pytest.raises(DataError, match=r"a whole pass over 2 shard\(s\) .* read no document") as info:
        next(iter(stream))
    assert info.value.reason == "empty_source"


def test_data_inspect_of_empty_shards_is_an_error(tmp_path, capsys):
    empty_shard(tmp_path / "shard-000000.tar")
    assert main(["data", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no readable document in its shards" in err[0]


def test_a_failed_convert_leaves_no_shard_behind(tmp_path, capsys):
    import json

    record = {"id": "1", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>hi"}]}
    record["conversations"].append({"from": "gpt", "value": "a picture"})
    (tmp_path / "chat.json").write_text(json.dumps([record, {**record, "id": "2"}]))
    out = tmp_path / "shards"
    assert main(["data", "convert", "llava", str(tmp_path / "chat.json"), str(out)]) == 2
    assert "missing_image" in capsys.readouterr().err
    assert not out.exists()

"""The sidecar layout: aligned shards of only the new members and columns, the base named in the
index, and the keys checked against the base shard before anything is committed."""
from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq
import pytest

from helpers.loader_output import write_output
from helpers.sidecar_output import SCORE, input_batch, side_npy, sidecar_sink, write_sidecar
from pipeline.core import schema
from pipeline.executors.base import Failure, Payload, write_shard
from pipeline.sinks.sidecar import base_keys, key_difference

SIZES = [5, 3]


@pytest.fixture()
def base(tmp_path):
    write_output(tmp_path / "base", SIZES)
    return tmp_path / "base"


def names(tar_path):
    with tarfile.open(tar_path) as tar:
        return [m.name for m in tar.getmembers()]


def test_a_sidecar_holds_only_the_new_members_aligned_with_the_base(tmp_path, base):
    write_sidecar(tmp_path / "side", base, reject=lambda key: key.endswith("2"))
    side = tmp_path / "side"
    assert sorted(p.name for p in side.glob("*.tar")) == ["00000.tar", "00001.tar"]
    base_keys0 = [k for k in input_batch(base / "00000.tar")[schema.KEY]]
    kept = [k for k in base_keys0 if not k.endswith("2")]
    assert names(side / "00000.tar") == [n for k in kept for n in (f"{k}.json", f"{k}.side.npy")]  # no jpg, txt
    with tarfile.open(side / "00000.tar") as tar:
        assert json.loads(tar.extractfile(f"{kept[0]}.json").read()) == {"key": kept[0], SCORE: int(kept[0]) / 1000}
        assert tar.extractfile(f"{kept[0]}.side.npy").read() == side_npy(kept[0])
    table = pq.read_table(side / "00000.parquet").to_pydict()
    assert list(table) == ["key", "status", "error_kind", "error_message", SCORE]  # no url, caption, sizes
    assert table["key"] == base_keys0  # one row per base sample, in the base's order
    assert [s for s in table["status"]] == ["filtered" if k.endswith("2") else "success" for k in base_keys0]
    index = json.loads((side / "index.json").read_text())
    assert index["layout"] == "sidecar" and index["base"] == str(base)
    assert [(e["url"], e["nsamples"], e["rows"], e["base"]) for e in index["shardlist"]] == [
        ("00000.tar", len(kept), SIZES[0], str(base / "00000.tar")),
        ("00001.tar", SIZES[1] - sum(k.endswith("2") for k in input_batch(base / "00001.tar")[schema.KEY]),
         SIZES[1], str(base / "00001.tar"))]


def test_keys_that_differ_from_the_base_fail_the_shard_and_commit_nothing(tmp_path, base):
    sink = sidecar_sink(tmp_path / "side", base)
    batch = input_batch(base / "00000.tar")
    batch[schema.KEY][1], batch[schema.KEY][2] = batch[schema.KEY][2], batch[schema.KEY][1]  # out of order
    result = write_shard(sink, 0, Payload(batch))
    assert isinstance(result, Failure)
    assert "KeyMismatch" in result.error and str(base / "00000.tar") in result.error
    assert "00000.tar" in result.error and "row 1 is key" in result.error
    assert not sink.is_complete(0) and not list((tmp_path / "side").glob("00000*"))

    short = input_batch(base / "00001.tar")
    for column in short.values():
        del column[-1]
    result = write_shard(sink, 1, Payload(short))
    assert isinstance(result, Failure) and "is missing here" in result.error
    # a shard the base does not have
    result = write_shard(sink, 2, Payload(input_batch(base / "00001.tar")))
    assert isinstance(result, Failure) and "has no base shard: the base has 2 shards" in result.error


def test_the_base_keys_come_from_the_tar_when_the_base_has_no_status_table(tmp_path, base):
    (base / "00000.parquet").unlink()  # a plain webdataset: tars only
    expected = input_batch(base / "00000.tar")[schema.KEY]
    assert base_keys(str(base / "00000.tar")) == expected
    write_sidecar(tmp_path / "side", base)
    assert pq.read_table(tmp_path / "side" / "00000.parquet").column("key").to_pylist() == expected


def test_a_resumed_sidecar_skips_complete_shards_and_keeps_the_layout_index(tmp_path, base):
    sink = write_sidecar(tmp_path / "side", base)
    assert sink.complete_shards() == {0, 1}
    first = (tmp_path / "side" / "index.json").read_bytes()
    assert sink.finish() == json.loads(first) and sink.verified_stats(0, checksums=True)["count"] == SIZES[0]


def test_key_difference_names_the_first_difference():
    assert key_difference(["a", "b"], ["a", "b"]) is None
    assert key_difference(["a", "c"], ["a", "b"]) == "row 1 is key 'c' here, 'b' in the base (2 rows here, 2 there)"
    assert key_difference(["a", "b", "x"], ["a", "b"]) == "3 rows here, 2 in the base: key 'x' is missing in the base"

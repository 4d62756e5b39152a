"""The WebDataset sink: deterministic tars grouped by key, one column type across shards, stats
written last as the commit marker, the index, and partial files of a killed run swept."""
import io
import json
import tarfile

import pyarrow.dataset as ds

from pipeline.core import schema
from pipeline.executors.base import Payload, write_shard
from pipeline.sinks import Directory, WebDatasetSink

TYPES = {**schema.COLUMN_TYPES, "clip_score": "double"}


def batch(n, scored=True):
    b = {schema.KEY: [f"00000{i:04d}" for i in range(n)], schema.URL: [f"http://x.test/{i}" for i in range(n)],
         schema.CAPTION: [f"c{i}" for i in range(n)], schema.STATUS: [schema.PENDING] * n,
         schema.ERROR_KIND: [None] * n, schema.ERROR_MESSAGE: [None] * n, schema.WIDTH: [8] * n,
         schema.HEIGHT: [8] * n, schema.ORIGINAL_WIDTH: [9] * n, schema.ORIGINAL_HEIGHT: [9] * n,
         schema.SHA256: ["ab"] * n, schema.FILES: [{"jpg": b"J", "clip.npy": b"N"} for _ in range(n)],
         "clip_score": [0.5 if scored else None] * n}
    schema.mark(b, 1, "http_status", "404 Not Found")
    return b


def sink(path, types=TYPES):
    s = WebDatasetSink(Directory(path), types, "t")
    s.open()
    return s


def test_tar_is_deterministic_and_grouped_by_key(tmp_path):
    write_shard(sink(tmp_path / "a"), 0, Payload(batch(3)))
    write_shard(sink(tmp_path / "b"), 0, Payload(batch(3)))
    data = (tmp_path / "a" / "00000.tar").read_bytes()
    assert data == (tmp_path / "b" / "00000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "000000000.jpg", "000000000.txt", "000000000.json", "000000000.clip.npy",
            "000000002.jpg", "000000002.txt", "000000002.json", "000000002.clip.npy"]
        assert {(m.mtime, m.uid, m.uname) for m in members} == {(0, 0, "")}
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert meta["clip_score"] == 0.5 and meta["status"] == "success" and "files" not in meta


def test_columns_keep_their_declared_type_across_shards(tmp_path):
    out = sink(tmp_path)
    write_shard(out, 0, Payload(batch(3, scored=True)))
    write_shard(out, 1, Payload(batch(3, scored=False)))  # no row reached the scoring filter
    table = ds.dataset(sorted(str(p) for p in tmp_path.glob("*.parquet"))).to_table()
    assert table.schema.field("clip_score").type == "double"
    assert table.schema.field("width").type == "int32"
    assert table.column("status").to_pylist().count("success") == 4


def test_stats_mark_the_shard_complete_and_the_index_lists_it(tmp_path):
    out = sink(tmp_path)
    assert not out.is_complete(3)
    stats = write_shard(out, 3, Payload(batch(3)))
    assert out.is_complete(3) and out.read_stats(3) == {k: v for k, v in stats.items() if k != "timings"} | {
        "timings": {}}
    assert stats["status_counts"] == {"failed_to_download": 1, "success": 2}
    assert stats["error_kinds"] == {"http_status": 1} and stats["filtered"] == {}
    assert out.read_status(3)["status"] == ["success", "failed_to_download", "success"]
    (tmp_path / "00003_stats.json").unlink()  # the commit marker is what makes a shard complete
    assert not out.is_complete(3)


def test_finish_writes_the_index_of_complete_shards(tmp_path):
    out = sink(tmp_path)
    write_shard(out, 3, Payload(batch(3)))
    (tmp_path / ".00004.tar.tmp").write_bytes(b"partial")
    assert out.open() == 1 and not list(tmp_path.glob(".*"))  # a rerun sweeps what a kill left
    index = out.finish()
    assert index["shardlist"] == [{"url": "00003.tar", "nsamples": 2,
                                   "filesize": (tmp_path / "00003.tar").stat().st_size}]
    assert json.loads((tmp_path / "index.json").read_text()) == index


class RecordingDirectory(Directory):
    def __init__(self, root):
        super().__init__(root)
        self.written = []

    def write(self, name, data):
        self.written.append(name)
        super().write(name, data)


def test_stats_are_committed_last(tmp_path):
    directory = RecordingDirectory(tmp_path)
    out = WebDatasetSink(directory, TYPES, "t")
    out.open()
    write_shard(out, 2, Payload(batch(3)))
    assert directory.written == ["00002.tar", "00002.parquet", "00002_stats.json"]


def test_files_of_an_interrupted_shard_are_ignored_then_swept(tmp_path):
    out = sink(tmp_path)
    write_shard(out, 0, Payload(batch(3)))
    write_shard(out, 1, Payload(batch(3)))
    (tmp_path / "00001_stats.json").unlink()  # killed after the tar and the status table
    assert out.complete_shards() == {0}
    assert [s["url"] for s in out.finish()["shardlist"]] == ["00000.tar"]
    assert out.open() == 2  # the tar and the parquet of shard 1
    assert sorted(p.name for p in tmp_path.glob("0*")) == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_a_sink_on_s3_commits_reads_and_indexes_like_a_local_one(tmp_path, s3):
    local, remote = sink(tmp_path), sink(s3.url("out"))
    for out in (local, remote):
        write_shard(out, 0, Payload(batch(3)))
        write_shard(out, 4, Payload(batch(2)))
    assert remote.complete_shards() == local.complete_shards() == {0, 4}
    assert remote.read_status(4) == local.read_status(4) and remote.read_stats(0) == local.read_stats(0)
    index = remote.finish()
    assert index["shardlist"] == local.finish()["shardlist"]
    assert s3.client().get_object(Bucket="mmcurate-test", Key="out/00000.tar")["Body"].read() == (
        tmp_path / "00000.tar").read_bytes()


def test_values_arrow_cannot_hold_are_kept_as_text():
    """An extra column with an int over 64 bits or mixed types must not fail the shard's write."""
    from pipeline.sinks.webdataset import status_table

    table = status_table({"key": ["a", "b", "c"], "big": [2**70, 1, None], "mixed": [1, "x", {"k": 1}]}, {})
    assert table.column("big").to_pylist() == [str(2**70), "1", None]
    assert table.column("mixed").to_pylist() == ["1", "x", '{"k": 1}']


def test_shards_whose_extra_column_types_differ_still_read_as_one_table(tmp_path):
    """A column kept from the input may be a struct in one shard and text in another: the output
    must still read back whole (reports, inspect and retries read every status table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sinks.webdataset import read_status_tables

    pq.write_table(pa.table({"key": ["0"], "meta": [{"a": 1}], "n": [1]}), tmp_path / "00000.parquet")
    pq.write_table(pa.table({"key": ["1"], "meta": ["plain"], "n": [2.5]}), tmp_path / "00001.parquet")
    pq.write_table(pa.table({"key": ["2"], "meta": pa.array([None], pa.null()), "n": [3]}), tmp_path / "00002.parquet")
    table = read_status_tables(str(tmp_path))
    assert table.column("key").to_pylist() == ["0", "1", "2"]
    assert table.column("meta").to_pylist() == ['{"a": 1}', "plain", None]
    assert table.column("n").to_pylist() == [1.0, 2.5, 3.0]

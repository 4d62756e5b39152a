import io
import json
import tarfile

import pyarrow.dataset as ds

from pipeline.core import schema
from pipeline.sinks.webdataset import remove_temporaries, write_index, write_shard


def batch(n, scored=True):
    b = {schema.KEY: [f"00000{i:04d}" for i in range(n)], schema.URL: [f"http://x.test/{i}" for i in range(n)],
         schema.CAPTION: [f"c{i}" for i in range(n)], schema.STATUS: [schema.SUCCESS] * n,
         schema.ERROR_KIND: [None] * n, schema.ERROR_MESSAGE: [None] * n, schema.WIDTH: [8] * n,
         schema.HEIGHT: [8] * n, schema.ORIGINAL_WIDTH: [9] * n, schema.ORIGINAL_HEIGHT: [9] * n,
         schema.SHA256: ["ab"] * n, schema.FILES: [{"jpg": b"J", "clip.npy": b"N"} for _ in range(n)],
         "clip_score": [0.5 if scored else None] * n}
    schema.mark(b, 1, "http_status", "404 Not Found")
    return b


def test_tar_is_deterministic_and_grouped_by_key(tmp_path):
    write_shard(tmp_path / "a", 0, batch(3))
    write_shard(tmp_path / "b", 0, batch(3))
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


def test_columns_keep_one_type_across_shards(tmp_path):
    write_shard(tmp_path, 0, batch(3, scored=True))
    write_shard(tmp_path, 1, batch(3, scored=False))  # no row reached the scoring filter
    table = ds.dataset(sorted(str(p) for p in tmp_path.glob("*.parquet"))).to_table()
    assert table.schema.field("clip_score").type == "double"
    assert table.schema.field("width").type == "int32"
    assert table.column("status").to_pylist().count("success") == 4


def test_stats_index_and_leftovers(tmp_path):
    stats = write_shard(tmp_path, 3, batch(3))
    assert stats["status_counts"] == {"failed_to_download": 1, "success": 2}
    assert stats["error_kinds"] == {"http_status": 1}
    (tmp_path / ".00004.tar.tmp").write_bytes(b"partial")
    assert remove_temporaries(tmp_path) == 1 and not list(tmp_path.glob(".*"))
    index = write_index(tmp_path, "t")
    assert index["shardlist"] == [{"url": "00003.tar", "nsamples": 2,
                                   "filesize": (tmp_path / "00003.tar").stat().st_size}]

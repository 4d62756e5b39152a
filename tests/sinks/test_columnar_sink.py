"""The column file a shard's tar gets beside it (NNNNN.columns.arrow): written by a real job with
tokenize stages, holding exactly the tar's .npy members, recorded in the stats, swept when its
write was interrupted, and a shard whose column file is damaged is redone."""
from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from helpers.sidecar_output import write_sidecar
from helpers.loader_output import write_output
from helpers.tokenize_fixtures import pairs_server, tokenize_job
from pipeline.core import schema
from pipeline.executors.base import Payload, write_shard
from pipeline.job.runner import run_job
from pipeline.media.npy import npy_bytes, read_npy
from pipeline.sinks import Directory, WebDatasetSink

N = 20


@pytest.fixture(scope="module")
def server():
    with pairs_server(N, seed=2, dead=5) as srv:
        yield srv


def token_job(tmp_path, server, name="tok"):
    return tokenize_job(tmp_path, server, name)


@pytest.fixture(scope="module")
def job_out(tmp_path_factory, server):
    tmp = tmp_path_factory.mktemp("coljob")
    spec = token_job(tmp, server)
    assert run_job(spec).ok
    return tmp, spec


def tar_samples(tar_path) -> list[tuple[str, dict[str, bytes]]]:
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(m).read()
    return samples


def column_rows(path, ext) -> list[np.ndarray]:
    """Each row's array, read with pyarrow alone (not the loader's reader)."""
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    meta = table.schema.field(ext).metadata
    dtype = np.dtype(meta[b"dtype"].decode())
    if meta[b"layout"] == b"fixed":
        shape = json.loads(meta[b"shape"])
        return [np.asarray(v, dtype).reshape(shape) for v in table.column(ext).to_pylist()]
    shapes = table.column(ext + "#shape").to_pylist()
    return [np.asarray(v, dtype).reshape(s) for v, s in zip(table.column(ext).to_pylist(), shapes)]


def test_a_tokenize_job_writes_each_tars_npy_members_as_columns(job_out):
    tmp, spec = job_out
    out = tmp / "tok"
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == 3
    lengths = set()
    for tar in tars:
        columns = tar.with_suffix(".columns.arrow")
        samples = tar_samples(tar)
        table = pa.ipc.open_file(pa.memory_map(str(columns))).read_all()
        assert table.column("__key__").to_pylist() == [k for k, _ in samples]  # tar order
        meta = table.schema.metadata
        assert int(meta[b"tar_bytes"]) == tar.stat().st_size and int(meta[b"rows"]) == len(samples)
        assert json.loads(meta[b"not_columnar"]) == []
        for ext in ("text_ids.npy", "image_ids.npy"):
            rows = column_rows(columns, ext)
            for (key, files), row in zip(samples, rows):
                expected = read_npy(files[ext])
                assert row.dtype == expected.dtype and row.shape == expected.shape
                assert np.array_equal(row, expected), (key, ext)
            if ext == "text_ids.npy":
                shard_lengths = {len(r) for r in rows}
                layout = table.schema.field(ext).metadata[b"layout"]
                assert layout == (b"ragged" if len(shard_lengths) > 1 else b"fixed")
                lengths |= shard_lengths
        stats = json.loads(tar.with_name(tar.stem + "_stats.json").read_text())
        data = columns.read_bytes()
        assert stats["files"][columns.name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert len(lengths) > 1  # captions of different lengths: text ids are ragged


def test_a_damaged_column_file_makes_its_shard_redone(job_out, server):
    tmp, _ = job_out
    work = tmp / "redo"
    work.mkdir()
    spec = token_job(work, server)
    assert run_job(spec).ok
    columns = work / "tok" / "00001.columns.arrow"
    good = columns.read_bytes()
    columns.write_bytes(good[:-64])  # truncated after the commit
    assert run_job(spec).ok
    assert columns.read_bytes() == good  # redone: the same bytes again


def test_an_interrupted_writes_column_file_is_swept(tmp_path):
    write_output(tmp_path, [4, 4])
    assert (tmp_path / "00001.columns.arrow").exists()
    (tmp_path / "00001_stats.json").unlink()  # killed after the tar, the status table and the columns
    sink = WebDatasetSink(Directory(tmp_path), schema.COLUMN_TYPES, "t")
    assert sink.open() == 3
    assert sorted(p.name for p in tmp_path.glob("0*")) == [
        "00000.columns.arrow", "00000.parquet", "00000.tar", "00000_stats.json"]


def test_members_that_cannot_be_columns_stay_in_the_tar_only(tmp_path):
    n = 4
    batch = {c: [None] * n for c in schema.STATUS_COLUMNS}
    batch[schema.KEY] = [f"00000{i:04d}" for i in range(n)]
    batch[schema.CAPTION] = ["c"] * n
    batch[schema.STATUS] = [schema.PENDING] * n
    batch[schema.FILES] = [{"a.npy": npy_bytes(np.arange(i + 1, dtype=np.int64)),  # ragged
                            "b.npy": npy_bytes(np.zeros(2, bool)),                # bool: no column
                            **({"c.npy": npy_bytes(np.ones(3, np.float32))} if i else {})}  # one lacks it
                           for i in range(n)]
    sink = WebDatasetSink(Directory(tmp_path), schema.COLUMN_TYPES, "t")
    sink.open()
    write_shard(sink, 0, Payload(batch))
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "00000.columns.arrow"))).read_all()
    assert table.column_names == ["__key__", "a.npy", "a.npy#shape"]
    assert json.loads(table.schema.metadata[b"not_columnar"]) == ["b.npy", "c.npy"]
    assert [list(r) for r in column_rows(tmp_path / "00000.columns.arrow", "a.npy")] == [
        list(range(i + 1)) for i in range(n)]


def test_shards_without_npy_members_get_no_column_file(tmp_path):
    write_output(tmp_path, [3], npy=False)
    assert not list(tmp_path.glob("*.columns.arrow"))


def test_a_sidecar_shard_gets_the_columns_of_its_own_members(tmp_path):
    base = tmp_path / "base"
    write_output(base, [5, 4])  # the base has text_ids.npy and clip.npy: not the sidecar's
    side = tmp_path / "side"
    write_sidecar(side, base, reject=lambda key: int(key) % 3 == 0)
    for tar in sorted(side.glob("*.tar")):
        samples = tar_samples(tar)
        npy_exts = sorted({e for _, files in samples for e in files if e.endswith(".npy")})
        assert npy_exts == ["side.npy"]
        table = pa.ipc.open_file(pa.memory_map(str(tar.with_suffix(".columns.arrow")))).read_all()
        assert table.column("__key__").to_pylist() == [k for k, _ in samples]
        for ext in npy_exts:
            assert [r.tolist() for r in column_rows(tar.with_suffix(".columns.arrow"), ext)] == [
                read_npy(files[ext]).tolist() for _, files in samples]
        assert table.column_names == ["__key__", "side.npy"]

"""The sink against an output that is not what it wrote (a truncated, rotten or missing file, on
disk and on S3) and against a second holder of its directory (a lock on disk, a lease on a store)."""
import json
import time

import pytest

from pipeline.core import schema
from pipeline.executors.base import Payload, write_shard
from pipeline.sinks import Directory, WebDatasetSink
from pipeline.sinks.base import DamagedShard
from pipeline.sinks.lock import LOCK, OutputInUse, hold

TYPES = dict(schema.COLUMN_TYPES)


def batch(n):
    return {schema.KEY: [f"00000{i:04d}" for i in range(n)], schema.URL: [f"http://x.test/{i}" for i in range(n)],
            schema.CAPTION: [f"c{i}" for i in range(n)], schema.STATUS: [schema.PENDING] * n,
            schema.ERROR_KIND: [None] * n, schema.ERROR_MESSAGE: [None] * n,
            schema.FILES: [{"jpg": bytes([i]) * 3000} for i in range(n)]}


def written(where):
    """A sink at ``where`` holding shards 0 and 1."""
    sink = WebDatasetSink(Directory(where), TYPES, "t")
    sink.open()
    for shard in (0, 1):
        write_shard(sink, shard, Payload(batch(4)))
    return sink


def reopened(where):
    sink = WebDatasetSink(Directory(where), TYPES, "t")
    assert sink.complete_shards() == {0, 1}  # the listing the size check reads
    return sink


def test_sizes_come_from_one_listing_and_hide_what_names_hides(tmp_path, s3):
    for where in (str(tmp_path), s3.url("out")):
        sink = written(where)
        sink.directory.write(".hidden", b"x")
        sizes = sink.directory.sizes("[0-9]*")
        assert set(sizes) == set(sink.directory.names("[0-9]*")) and len(sizes) == 6
        assert all(sizes[n] == len(sink.directory.read_bytes(n)) for n in sizes)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_truncated_file_un_commits_its_shard(tmp_path, store, request):
    where = str(tmp_path) if store == "local" else request.getfixturevalue("s3").url("out")
    directory = written(where).directory
    directory.write("00001.tar", directory.read_bytes("00001.tar")[:-512])
    sink = reopened(where)
    assert sink.verified_stats(0)["count"] == 4
    with pytest.raises(DamagedShard, match=r"00001.tar is \d+ bytes, \d+ when written"):
        sink.verified_stats(1)
    assert sink.complete_shards() == {0}  # its stats are gone: incomplete until redone


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_changed_byte_is_seen_by_the_checksum_only(tmp_path, store, request):
    where = str(tmp_path) if store == "local" else request.getfixturevalue("s3").url("out")
    directory = written(where).directory
    data = bytearray(directory.read_bytes("00000.parquet"))
    data[10] ^= 1
    directory.write("00000.parquet", bytes(data))
    sink = reopened(where)
    assert sink.verified_stats(0)["count"] == 4  # same size
    with pytest.raises(DamagedShard, match=r"00000.parquet has sha256 \w+, \w+ when written"):
        sink.verified_stats(0, checksums=True)


def test_a_missing_stats_field_or_unreadable_status_table_is_damage_not_a_crash(tmp_path):
    sink = written(tmp_path)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 4}))  # neither files nor tar_bytes
    (tmp_path / "00001.parquet").write_bytes(b"PAR1")
    sink = reopened(tmp_path)
    with pytest.raises(DamagedShard, match="cannot be read"):
        sink.verified_stats(0)
    with pytest.raises(DamagedShard):
        sink.verified_stats(1, status=True)
    assert sink.complete_shards() == set()


def test_a_local_lock_refuses_a_second_holder_and_goes_with_its_release(tmp_path):
    directory = Directory(tmp_path)
    with hold(directory):
        holder = json.loads((tmp_path / LOCK).read_text())
        with pytest.raises(OutputInUse, match=rf"pid {holder['pid']} on {holder['host']}"):
            with hold(Directory(tmp_path)):
                pass
        assert directory.names() == []  # never listed as output
    assert not (tmp_path / LOCK).exists()
    with hold(directory):
        pass


def test_a_lease_refuses_while_renewed_and_is_removed_on_release(s3):
    directory = Directory(s3.url("leased"))
    with hold(directory, lease_seconds=0.9):
        first = json.loads(directory.read_bytes(LOCK))
        time.sleep(1.2)  # longer than the lease: only renewals keep it fresh
        renewed = json.loads(directory.read_bytes(LOCK))
        assert renewed["token"] == first["token"] and renewed["expires"] > time.time()
        with pytest.raises(OutputInUse, match=rf"pid {first['pid']} on {first['host']}"):
            with hold(Directory(s3.url("leased"))):
                pass
    assert not directory.exists(LOCK)

"""Resuming over an output or an input that is not what the interrupted run left: damaged shards
are redone, changed input is refused, a second instance is refused while the first one runs, and
a job stopped by a bad input file or a full disk says why in one line and resumes once fixed.
Real jobs on a real server on 127.0.0.1, real files, real processes."""
import errno
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers.jobs import N, image_server, job_file, tars
from pipeline.cli.main import main
from pipeline.core.config import ConfigError
from pipeline.job.runner import JobFailed, run_job
from pipeline.job.spec import load_job
from pipeline.sinks import Directory


def stats_of(out, shard):
    return json.loads((out / f"{shard:05d}_stats.json").read_text())


def with_filters(path, filters):
    data = yaml.safe_load(path.read_text())
    data["filters"] = filters
    path.write_text(yaml.safe_dump(data))
    return path


def as_old_stats(out, shard):
    """Rewrite a shard's stats as a version without file sizes and checksums wrote them."""
    stats = stats_of(out, shard)
    stats.pop("files", None)
    (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats))


# -- 1. a complete shard changed on disk -----------------------------------------------------------
def test_a_truncated_tar_is_redone_on_resume(tmp_path, server, reference, caplog):
    path = job_file(tmp_path, server)
    run_job(load_job(path))
    out = tmp_path / "job"
    tar = out / "00002.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])  # a disk error, a partial copy
    result = run_job(load_job(path))
    assert (result.shards_skipped, result.shards_written) == (7, 1)
    assert tars(out) == tars(reference)
    assert "shard 00002 was complete but 00002.tar is" in caplog.text


def test_stats_record_size_and_sha256_of_each_file(tmp_path, server):
    import hashlib

    run_job(load_job(job_file(tmp_path, server)))
    out = tmp_path / "job"
    files = stats_of(out, 0)["files"]
    assert set(files) == {"00000.tar", "00000.parquet"}
    for name, record in files.items():
        data = (out / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_changed_byte_is_found_with_verify(tmp_path, server, reference, capsys):
    path = job_file(tmp_path, server)
    run_job(load_job(path))
    out = tmp_path / "job"
    data = bytearray((out / "00003.tar").read_bytes())
    data[700] ^= 0xFF  # bit rot: same size
    (out / "00003.tar").write_bytes(bytes(data))
    assert run_job(load_job(path)).shards_written == 0  # sizes only by default: not seen
    assert main(["run", str(path), "--no-progress", "--verify"]) == 0
    assert "7 already complete, 1 written" in capsys.readouterr().out
    assert tars(out) == tars(reference)


def test_old_stats_without_checksums_still_resume_and_check_the_tar_size(tmp_path, server, reference):
    path = job_file(tmp_path, server)
    run_job(load_job(path))
    out = tmp_path / "job"
    for shard in range(8):
        as_old_stats(out, shard)
    result = run_job(load_job(path), verify=True)
    assert (result.shards_skipped, result.shards_written) == (8, 0)  # nothing to verify: kept
    (out / "00005.tar").write_bytes(b"")
    result = run_job(load_job(path))
    assert (result.shards_skipped, result.shards_written) == (7, 1)
    assert tars(out) == tars(reference)


# -- 4. the status table of a complete shard, replayed to an ordered stage --------------------------
@pytest.mark.parametrize("damage", ["empty parquet, old stats", "garbage parquet", "garbage stats"])
def test_an_unreadable_status_table_or_stats_is_redone_not_a_crash(tmp_path, server, damage, caplog):
    path = with_filters(job_file(tmp_path, server), [{"dedup_exact": {}}])
    assert run_job(load_job(path)).ok
    out = tmp_path / "job"
    before = tars(out)
    if damage == "empty parquet, old stats":
        as_old_stats(out, 1)
        (out / "00001.parquet").write_bytes(b"")
    elif damage == "garbage parquet":
        size = (out / "00001.parquet").stat().st_size
        (out / "00001.parquet").write_bytes(b"\0" * size)  # same size: only the footer check sees it
    else:
        (out / "00001_stats.json").write_text('{"count": 8, "succ')
    result = run_job(load_job(path))
    assert result.ok and (result.shards_skipped, result.shards_written) == (7, 1)
    assert tars(out) == before
    assert pq.read_table(out / "00001.parquet").num_rows == 8
    assert "shard 00001 was complete but" in caplog.text


# -- 2. input that changed under the same spec ---------------------------------------------------
def test_resuming_over_a_changed_input_file_is_refused_naming_it(tmp_path, server, capsys):
    path = job_file(tmp_path, server)
    run_job(load_job(path))
    urls = tmp_path / f"urls{N}.parquet"
    table = pq.read_table(urls)
    pq.write_table(table.set_column(1, "caption", pa.array([f"another caption {i}" for i in range(N)])), urls)
    with pytest.raises(ConfigError, match=rf"{urls} changed \(.*size \d+ -> \d+.*modified .* -> .*delete "):
        run_job(load_job(path))
    assert main(["run", str(path), "--no-progress"]) == 2
    assert f"{urls} changed" in capsys.readouterr().err


def test_a_touched_input_file_is_refused_too(tmp_path, server):
    path = job_file(tmp_path, server)
    run_job(load_job(path))
    urls = tmp_path / f"urls{N}.parquet"
    os.utime(urls, ns=(urls.stat().st_atime_ns, urls.stat().st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match=r"changed \(modified .* -> "):
        run_job(load_job(path))


def test_a_manifest_without_input_fingerprints_resumes_and_records_them(tmp_path, server):
    path = job_file(tmp_path, server)
    run_job(load_job(path))
    manifest_path = tmp_path / "job" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["inputs"]  # as an earlier version wrote it
    manifest_path.write_text(json.dumps(manifest))
    assert run_job(load_job(path)).shards_skipped == 8
    assert list(json.loads(manifest_path.read_text())["inputs"]) == [str(tmp_path / f"urls{N}.parquet")]


def test_a_changed_input_object_on_s3_is_refused_by_its_etag(tmp_path, server, s3):
    local = job_file(tmp_path, server)
    client = s3.client()
    client.put_object(Bucket="mmcurate-test", Key="in/urls.parquet", Body=(tmp_path / f"urls{N}.parquet").read_bytes())
    path = job_file(tmp_path, server, "s3in", input__files=[s3.url("in/urls.parquet")])
    run_job(load_job(path))
    assert "etag" in json.loads((tmp_path / "s3in" / "manifest.json").read_text())["inputs"][s3.url("in/urls.parquet")]
    assert run_job(load_job(path)).shards_skipped == 8  # unchanged: resumes
    table = pq.read_table(local.parent / f"urls{N}.parquet").slice(0, N - 1)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    client.put_object(Bucket="mmcurate-test", Key="in/urls.parquet", Body=sink.getvalue().to_pybytes())
    with pytest.raises(ConfigError, match=r"s3://mmcurate-test/in/urls.parquet changed \(ETag \w+ -> \w+\)"):
        run_job(load_job(path))


# -- 3. one run at a time per output directory ---------------------------------------------------
@pytest.fixture
def held_server():
    """The image server, answering in 3 s while ``srv.slow`` is set (a first job then runs for
    half a minute, whatever the machine's load), at once when it is cleared."""
    import threading

    slow = threading.Event()
    slow.set()
    with image_server(latency=lambda: 3.0 if slow.is_set() else 0.0) as srv:
        srv.slow = slow
        yield srv


def wait_for_lock(out, timeout=30.0):
    """The holder's record once the running job has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            holder = json.loads(Directory(out).read_bytes(".mmcurate.lock"))
            if holder:
                return holder
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no lock appeared in {out}")


HOLDER = """
import sys, time
from pipeline.sinks import Directory
from pipeline.sinks.lock import hold
directory = Directory(sys.argv[1])
directory.create()
with hold(directory):
    print("held", flush=True)
    time.sleep(600)
"""


def output_of(where, tmp_path, request):
    return str(tmp_path / "job") if where == "local" else request.getfixturevalue("s3").url("jobs/lock")


def refused_then_resumed_after_sigkill(holder, out, path, capsys, after_kill=lambda: None):
    """A run into ``out`` is refused naming ``holder`` (a process holding it); once the holder is
    killed with SIGKILL, the run goes through and releases the directory at the end."""
    try:
        assert main(["run", str(path), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"in use by another mmcurate run (pid {holder.pid} on {socket.gethostname()}" in err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert holder.poll() is None, "the refused run disturbed the holder"
        assert not Directory(out).exists("manifest.json") or json.loads(
            Directory(out).read_bytes("manifest.json"))["status"] != "failed"  # the refused run wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the kernel drops a lock; a lease's holder is gone from this host
        holder.wait()
        after_kill()
    assert main(["run", str(path), "--no-progress"]) == 0
    assert json.loads(Directory(out).read_bytes("manifest.json"))["status"] == "complete"
    assert not Directory(out).exists(".mmcurate.lock")  # released at the end


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_is_refused_while_another_process_holds_the_output(tmp_path, server, where, request, capsys):
    out = output_of(where, tmp_path, request)
    path = job_file(tmp_path, server, rows=16, output__dir=out)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, out], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"held\n"
    assert wait_for_lock(out)["pid"] == holder.pid
    refused_then_resumed_after_sigkill(holder, out, path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_job_is_refused_while_the_first_runs(tmp_path, held_server, where, request, capsys):
    out = output_of(where, tmp_path, request)
    path = job_file(tmp_path, held_server, rows=32, output__dir=out)  # 4 shards
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path), "--no-progress"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_lock(out, timeout=60)["pid"] == first.pid
    refused_then_resumed_after_sigkill(first, out, path, capsys, after_kill=held_server.slow.clear)
    assert len(tars(out)) == 4


def lease(s3, key, **fields):
    body = {"pid": 4242, "host": "elsewhere.example", "since": "2026-01-01T00:00:00+00:00", "token": "x", **fields}
    s3.client().put_object(Bucket="mmcurate-test", Key=key, Body=json.dumps(body).encode())


def test_a_fresh_lease_of_another_host_refuses_and_a_stale_one_is_taken_over(tmp_path, server, s3, caplog):
    path = job_file(tmp_path, server, output__dir=s3.url("jobs/lease"))
    lease(s3, "jobs/lease/.mmcurate.lock", expires=time.time() + 600)
    with pytest.raises(Exception, match=r"pid 4242 on elsewhere.example.*lease expires at"):
        run_job(load_job(path))
    lease(s3, "jobs/lease/.mmcurate.lock", expires=time.time() - 1)  # its holder crashed a while ago
    assert run_job(load_job(path)).ok
    assert "taking over the lease" in caplog.text and "expired" in caplog.text
    assert "jobs/lease/.mmcurate.lock" not in s3.keys("jobs/lease/")


# -- 5. a job stopped by a bad input file or a full disk ----------------------------------------
def urls_jsonl_gz(server, path, rows, first):
    lines = "".join(json.dumps({"url": server.url(f"{(first + i) % N}.jpg"), "caption": f"picture number {first + i}"})
                    + "\n" for i in range(rows))
    path.write_bytes(gzip.compress(lines.encode(), mtime=0))
    return path


def manifest_of(out):
    return json.loads((out / "manifest.json").read_text())


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("mmcurate: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_truncated_gz_input_stops_the_job_in_one_line_and_resumes_once_replaced(tmp_path, server, capsys):
    gz = urls_jsonl_gz(server, tmp_path / "more.jsonl.gz", 40, 16)
    full = gz.read_bytes()
    path = job_file(tmp_path, server, rows=16)
    fresh = job_file(tmp_path, server, "fresh", input__files=[str(tmp_path / "urls16.parquet"), str(gz)])
    assert main(["run", str(fresh), "--no-progress"]) == 0  # what an uninterrupted run writes
    data = yaml.safe_load(path.read_text())
    data["input"]["files"] = [str(tmp_path / "urls16.parquet"), str(gz)]
    path.write_text(yaml.safe_dump(data))
    gz.write_bytes(full[:len(full) // 2])  # a download cut short
    out = tmp_path / "job"

    assert main(["run", str(path), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert "reading the input" in err and str(gz) in err
    manifest = manifest_of(out)
    assert manifest["status"] == "failed" and str(gz) in manifest["error"] and manifest["error_input"] == str(gz)
    assert sorted(p.name for p in out.glob("*_stats.json")) == ["00000_stats.json", "00001_stats.json"]

    gz.write_bytes(full)  # the file fixed: the changed fingerprint of the file at fault is the fix
    assert main(["run", str(path), "--no-progress"]) == 0
    assert "2 already complete, 5 written" in capsys.readouterr().out
    manifest = manifest_of(out)
    assert manifest["status"] == "complete" and "error" not in manifest and "error_input" not in manifest
    assert tars(out) == tars(tmp_path / "fresh")


def test_a_zero_byte_parquet_input_stops_the_job_in_one_line(tmp_path, server, capsys):
    path = job_file(tmp_path, server, input__files=[str(tmp_path / "empty.parquet")])  # writes urls60.parquet too
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(JobFailed, match=r"^reading the input: .*empty\.parquet.*rerun the same command"):
        run_job(load_job(path))
    assert main(["run", str(path), "--no-progress"]) == 1
    assert str(tmp_path / "empty.parquet") in one_line_error(capsys)
    assert manifest_of(tmp_path / "job")["status"] == "failed"
    shutil.copy(tmp_path / f"urls{N}.parquet", tmp_path / "empty.parquet")
    assert main(["run", str(path), "--no-progress"]) == 0
    assert manifest_of(tmp_path / "job")["status"] == "complete"


def test_a_full_disk_at_the_index_write_fails_cleanly_and_the_rerun_completes(tmp_path, server, reference,
                                                                               monkeypatch, capsys):
    # No small filesystem without root: the storage write of index.json fails as a full disk fails it.
    write = Directory.write

    def full_disk(self, name, data):
        if name == "index.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, name, data)

    path = job_file(tmp_path, server)
    out = tmp_path / "job"
    monkeypatch.setattr(Directory, "write", full_disk)
    assert main(["run", str(path), "--no-progress"]) == 1
    err = one_line_error(capsys)
    assert "index.json" in err and "No space left on device" in err
    manifest = manifest_of(out)
    assert manifest["status"] == "failed" and "No space left on device" in manifest["error"]
    assert not (out / "index.json").exists() and len(list(out.glob("*_stats.json"))) == 8
    monkeypatch.setattr(Directory, "write", write)  # space freed
    assert main(["run", str(path), "--no-progress"]) == 0
    assert "8 already complete, 0 written" in capsys.readouterr().out
    assert manifest_of(out)["status"] == "complete" and (out / "index.json").exists()
    assert tars(out) == tars(reference)

"""The local engine decodes and resizes in worker processes when it has more than one CPU: the
output is byte for byte what threads make, no worker outlives the job, and an image that kills
its worker (a decoder segfault) is that sample's decode_error, never the shard's failure."""
import io
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers.hostile_server import hostile_server
from pipeline.core import schema
from pipeline.core.stage import ProcessPool
from pipeline.download import image as image_download
from pipeline.download.image import ImageDownloadConfig, ImageDownloadStage
from pipeline.fetch import FetchConfig
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.media.resize import ResizeConfig, hash_and_resize
from pipeline.testing.serve import LocalServer

CRASH_MARKER = b"KILL-MY-WORKER"  # bytes after a JPEG's end: the fetch and the sniffer accept it


def crash_on_marker(data: bytes, config: ResizeConfig):
    """What a segfaulting decoder does to the process it runs in, for the marked body only."""
    if data.endswith(CRASH_MARKER):
        os.kill(os.getpid(), signal.SIGSEGV)
    return hash_and_resize(data, config)


def jpegs(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (60 + 7 * i, 40 + 5 * i), (30 * i % 256, 90, 200 - 3 * i)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run(tmp: Path, server: LocalServer, paths: list[str], cpus: int, name: str):
    pq.write_table(pa.table({"url": [server.url(p) for p in paths], "caption": paths}), tmp / f"{name}.parquet")
    spec = load_job(data={
        "input": {"files": [str(tmp / f"{name}.parquet")]},
        "download": {"image_size": 32, "timeout": 5, "retries": 0, "allowed_networks": ["127.0.0.0/8"],
                     "concurrency": 32},
        "output": {"dir": str(tmp / name), "samples_per_shard": 12},
        "execution": {"engine": "local", "progress": False, "cpus_per_task": cpus}})
    return run_job(spec), tmp / name


def rows_of(out: Path) -> dict[str, dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet"))).to_pydict()
    return {c: {k: table[k][i] for k in table} for i, c in enumerate(table["caption"])}


def spawned_children() -> set[int]:
    """This process's children that are multiprocessing workers (not its resource tracker)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == os.getpid() and b"spawn_main" in cmdline:
            found.add(int(entry.name))
    return found


@pytest.fixture
def served():
    images = jpegs(30)
    files = {f"img/{i}.jpg": body for i, body in enumerate(images)}
    files["img/crash.jpg"] = images[0] + CRASH_MARKER
    with LocalServer(files, content_type="image/jpeg") as server:
        yield server, [f"img/{i}.jpg" for i in range(30)]


def test_worker_processes_make_the_same_files_as_threads(tmp_path, served):
    server, paths = served
    threads, thread_out = run(tmp_path, server, paths, 1, "threads")
    processes, process_out = run(tmp_path, server, paths, 2, "processes")
    assert threads.ok and processes.ok
    def shard_files(out: Path) -> list[str]:  # the stats files hold timings
        return sorted(p.name for p in out.glob("0*") if p.suffix in (".tar", ".parquet"))

    names = shard_files(thread_out)
    assert len(names) == 6 and names == shard_files(process_out)
    for name in names:
        assert (thread_out / name).read_bytes() == (process_out / name).read_bytes(), name
    assert all(r["status"] == schema.SUCCESS for r in rows_of(process_out).values())


def test_no_worker_process_outlives_the_job(tmp_path, served, monkeypatch):
    server, paths = served
    seen: list[int] = []
    close = ProcessPool.close

    def record_then_close(pool):
        seen.extend(pool.pids())
        close(pool)

    monkeypatch.setattr(ProcessPool, "close", record_then_close)
    result, _ = run(tmp_path, server, paths, 2, "out")
    assert result.ok
    assert len(seen) == 2  # one worker per CPU did the work...
    assert not any(Path(f"/proc/{pid}").exists() for pid in seen)  # ...and all have exited
    assert not spawned_children()


def test_an_image_that_kills_its_worker_is_a_decode_error_of_that_sample_only(tmp_path, served, monkeypatch):
    server, paths = served
    monkeypatch.setattr(image_download, "hash_and_resize", crash_on_marker)
    with_crash = paths[:10] + ["img/crash.jpg"] + paths[10:]
    result, out = run(tmp_path, server, with_crash, 2, "crash")
    assert result.ok  # every shard written
    rows = rows_of(out)
    crashed = rows["img/crash.jpg"]
    assert (crashed["status"], crashed["error_kind"]) == (schema.FAILED_TO_DECODE, schema.ErrorKind.DECODE_ERROR)
    assert "worker process died" in crashed["error_message"]
    # The images that shared the broken pool, and those after it, are all resized.
    assert {r["status"] for c, r in rows.items() if c != "img/crash.jpg"} == {schema.SUCCESS}
    assert not spawned_children()


def test_every_hostile_image_ends_in_its_documented_status_in_worker_processes(tmp_path):
    with hostile_server() as (_, cases):
        names = sorted(n for n, c in cases.items() if c.media != "video")
        pq.write_table(pa.table({"url": [cases[n].url for n in names], "caption": names}), tmp_path / "urls.parquet")
        spec = load_job(data={
            "input": {"files": [str(tmp_path / "urls.parquet")]},
            "download": {"image_size": 32, "timeout": 1.5, "retries": 0, "max_bytes": 8_000_000,
                         "allowed_networks": ["127.0.0.0/8"], "concurrency": 64},
            "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 20},
            "execution": {"engine": "local", "progress": False, "cpus_per_task": 2}})
        assert run_job(spec).ok
    rows = rows_of(tmp_path / "out")
    wrong = {n: (rows[n]["status"], rows[n]["error_kind"]) for n in names
             if (rows[n]["status"], rows[n]["error_kind"]) != (cases[n].status, cases[n].error_kind)}
    assert not wrong, wrong


def test_processes_only_on_an_engine_that_allows_them_and_with_more_than_one_cpu():
    def stage(cpus: int) -> ImageDownloadStage:
        return ImageDownloadStage(ImageDownloadConfig(FetchConfig(), ResizeConfig(), cpus=cpus))

    on_ray = stage(4)  # Ray never calls allow_processes: each task already is a process
    assert on_ray.worker_processes() == 0
    local, single = stage(4), stage(1)
    local.allow_processes()
    single.allow_processes()
    assert local.worker_processes() == 4 and single.worker_processes() == 0

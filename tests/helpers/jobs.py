"""What the end-to-end job tests share: an image server and a job file over it, a job's tars, its
status tables, and the SIGKILL-then-rerun check that a killed `mmcurate run` leaves only final
shards and, rerun, writes the same bytes."""
from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipeline.sinks import Directory
from pipeline.testing.serve import LocalServer

N = 60  # the image server's URLs


def jpeg(i: int) -> bytes:
    rng = random.Random(i)
    img = Image.new("RGB", (rng.randint(80, 300), rng.randint(80, 300)), (rng.randrange(256), 40, 200))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@contextlib.contextmanager
def image_server(latency: Optional[Callable[[], float]] = None) -> Iterator[LocalServer]:
    """N images on 127.0.0.1 with a little latency (or ``latency()`` seconds); every 10th+3 is
    a dead link."""
    files = {f"{i}.jpg": jpeg(i) for i in range(N) if i % 10 != 3}
    rng = random.Random(0)
    with LocalServer(files, latency=latency or (lambda: rng.uniform(0.005, 0.03))) as srv:
        yield srv


def job_file(tmp_path: Path, server: LocalServer, name: str = "job", rows: int = N, **overrides) -> Path:
    """A job over ``rows`` of the image server's URLs (they repeat after N): 48 px, 8 rows per
    shard, local engine, into ``tmp_path/name``; ``section__field=value`` overrides a setting."""
    urls = tmp_path / f"urls{rows}.parquet"
    if not urls.exists():
        pq.write_table(pa.table({"url": [server.url(f"{i % N}.jpg") for i in range(rows)],
                                 "caption": [f"picture number {i}" for i in range(rows)]}), urls)
    data = {"name": name, "input": {"files": [str(urls)]},
            "download": {"image_size": 48, "allow_private_addresses": True, "timeout": 5, "concurrency": 4},
            "output": {"dir": str(tmp_path / name), "samples_per_shard": 8},
            "execution": {"engine": "local", "progress": False}}
    for key, value in overrides.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tars(out_dir) -> dict[str, bytes]:
    """``{name: bytes}`` of every tar in an output directory (a path or a URL)."""
    directory = Directory(out_dir)
    return {name: directory.read_bytes(name) for name in directory.names("*.tar")}


def samples(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """``{key: {extension: bytes}}`` of every sample in an output directory's tars."""
    found: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(Path(out_dir).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                found.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return found


def status_tables(out_dir: Path) -> list[dict]:
    """Every status table of an output directory, in shard order, without ``error_message``."""
    return [pq.read_table(p).drop(["error_message"]).to_pydict() for p in sorted(out_dir.glob("*.parquet"))]


def complete_shards(out_dir) -> int:
    """How many shards of an output directory (a path or a URL) are committed (their stats)."""
    try:
        return len(Directory(out_dir).names("*_stats.json"))
    except (FileNotFoundError, OSError):
        return 0  # not created yet


def kill_then_rerun(job_file: Path, out, reference: Path, *, attempts: int, seed: int) -> None:
    """Start ``mmcurate run job_file`` up to ``attempts`` times, each killed with SIGKILL at a moment
    drawn (seeded): once the output holds a drawn number of complete shards, fewer than the job
    writes, and a drawn fraction of a second later (the middle of a write, of a fetch, of start-up).
    The job's progress, not the clock, decides, so a fast machine kills it as surely as a slow one.
    After each kill whatever is under a final name in ``out`` is complete and already identical to
    ``reference``. At least one run must have been killed. Then one run to the end: ``out`` holds
    the same tars as ``reference``."""
    cmd = [sys.executable, "-m", "pipeline", "run", str(job_file), "--no-progress"]
    rng = random.Random(seed)
    total = len(tars(reference))
    kills = 0
    for _ in range(attempts):
        done = complete_shards(out)
        if done >= total - 1:
            break  # no shard left to kill a run in the middle of
        target, extra = rng.randint(done, total - 2), rng.uniform(0.0, 0.2)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and complete_shards(out) < target:
            time.sleep(0.02)
        time.sleep(extra)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        for name, data in tars(out).items():
            assert data == tars(reference)[name], f"{name} differs after a kill"
    assert kills >= 1, "the job finished before it could be killed"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    assert tars(out) == tars(reference)

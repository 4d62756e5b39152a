"""What the end-to-end job tests share: a job's tars, its status tables, and the SIGKILL-then-rerun
check that a killed `mmcurate run` leaves only final shards and, rerun, writes the same bytes."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq


def tars(out_dir: Path) -> dict[str, bytes]:
    """``{name: bytes}`` of every tar in an output directory."""
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.tar"))}


def status_tables(out_dir: Path) -> list[dict]:
    """Every status table of an output directory, in shard order, without ``error_message``."""
    return [pq.read_table(p).drop(["error_message"]).to_pydict() for p in sorted(out_dir.glob("*.parquet"))]


def kill_then_rerun(job_file: Path, out: Path, reference: Path, *, attempts: int, seed: int,
                    pause: tuple[float, float]) -> None:
    """Start ``mmcurate run job_file`` up to ``attempts`` times, each killed with SIGKILL after a
    pause drawn (seeded) from ``pause``; after each kill, whatever is under a final name in ``out``
    is complete and already identical to ``reference``. At least one run must have been killed.
    Then one run to the end: ``out`` holds the same tars as ``reference``."""
    cmd = [sys.executable, "-m", "pipeline", "run", str(job_file), "--no-progress"]
    rng = random.Random(seed)
    kills = 0
    for _ in range(attempts):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(*pause))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        for name, data in tars(out).items():
            assert data == tars(reference)[name], f"{name} differs after a kill"
    assert kills >= 1, "the job finished before it could be killed; slow it down"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    assert tars(out) == tars(reference)

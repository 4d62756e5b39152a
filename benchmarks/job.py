"""One whole job, end to end: its wall and CPU time, optionally side by side with another checkout.

    .venv/bin/python benchmarks/job.py                     # this checkout, 5 runs
    .venv/bin/python benchmarks/job.py --vs /path/to/other/checkout --runs 5

A server on 127.0.0.1 (in this process) serves synthetic images with captions (a fifth of them
mismatched, a few duplicates); each run is a fresh `mmcurate run` (`python -m pipeline`) of one
job on the local engine: download and resize, caption, aspect-ratio, size, exact-dedup, CLIP
(the tiny CLIP) and near-dedup filters, text and VQ (the tiny VQ) tokenization, shards written.
With ``--vs``, the two checkouts run in turn (A B A B ...) with the same job, the same models and
the same inputs, each with its own code on PYTHONPATH, so their ratio is taken under the same
machine load. The outputs of both are compared byte for byte. Wall and CPU times are the child
process's, start-up included; the median is reported.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS, TINY_VQ
from pipeline.testing.serve import LocalServer
from pipeline.testing.synthetic import make_pairs

REPO = Path(__file__).resolve().parents[1]


def inputs(n: int) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    rng = random.Random(0)
    pairs = make_pairs(n, seed=0, size=96)
    files, rows = {}, []
    for i, (image, caption) in enumerate(pairs):
        side = rng.choice([80, 96, 128, 160])
        buf = io.BytesIO()
        image.resize((side, side)).save(buf, "JPEG", quality=92)
        path = f"img/{i:05d}.jpg"
        files[path] = files[f"img/{rng.randrange(i):05d}.jpg"] if i > 10 and rng.random() < 0.05 else buf.getvalue()
        rows.append((path, pairs[rng.randrange(n)][1] if rng.random() < 0.2 else caption))
    return files, rows


def job(urls: Path, out: Path) -> dict:
    return {"name": "bench-job", "input": {"files": [str(urls)]},
            "download": {"image_size": 64, "timeout": 10, "allow_private_addresses": True},
            "filters": [{"caption": {"min_words": 3}}, {"aspect_ratio": {"max": 3}}, {"image_size": {"min_side": 10}},
                        {"dedup_exact": {}},
                        {"clip_score": {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS),
                                        "min": 0.7}},
                        {"dedup_near": {"method": "phash", "max_distance": 4}}],
            "tokenize": {"text": {"tokenizer": "open_clip", "max_length": 32},
                         "image": {"model": str(TINY_VQ), "resolution": 64, "batch_size": 64}},
            "output": {"dir": str(out), "samples_per_shard": 500},
            "execution": {"engine": "local", "progress": False}}


def run_once(checkout: Path, spec: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of one `mmcurate run` with ``checkout``'s code."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "RAY_USAGE_STATS_ENABLED": "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec), "--no-progress"], cwd=checkout, env=env,
                   check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("*.tar")) + sorted(out.glob("*.parquet")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--vs", type=Path, default=None, help="another checkout to run side by side")
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench-job")
    a = p.parse_args(argv)
    checkouts = {"this checkout": REPO, **({f"--vs {a.vs}": a.vs.resolve()} if a.vs else {})}
    files, rows = inputs(a.images)
    a.work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in checkouts}
    digests: dict[str, set[str]] = {name: set() for name in checkouts}
    with LocalServer(files, content_type="image/jpeg") as server:
        urls = a.work / "urls.parquet"
        pq.write_table(pa.table({"url": [server.url(r[0]) for r in rows], "caption": [r[1] for r in rows]}), urls)
        for run in range(a.runs + 1):  # the first round warms the page cache and is not counted
            for n, (name, checkout) in enumerate(checkouts.items()):
                out = a.work / f"out-{n}"
                spec = a.work / "job.yaml"
                spec.write_text(yaml.safe_dump(job(urls, out)))
                subprocess.run(["rm", "-rf", str(out)], check=True)
                measured = run_once(checkout, spec)
                digests[name].add(digest(out))
                if run:
                    times[name].append(measured)
    load = os.getloadavg()
    print(f"{a.images} images, {a.runs} runs each, {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f}")
    print("| checkout | wall s (median) | CPU s (median) | images/s | CPU ms/image |")
    print("|---|---|---|---|---|")
    medians = {}
    for name, got in times.items():
        wall, cpu = statistics.median(w for w, _ in got), statistics.median(c for _, c in got)
        medians[name] = wall
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {a.images / wall:.0f} | {1000 * cpu / a.images:.1f} |")
    if a.vs:
        first, second = medians.values()
        print(f"wall time ratio (this / --vs): {first / second:.3f}")
        print("outputs identical:", len(set().union(*digests.values())) == 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

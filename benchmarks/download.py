"""Download benchmark: img2dataset against mmcurate on the same URLs, same settings, one run.

A loopback server with realistic latency (lognormal, median 40 ms) serves varied JPEGs
(320-1600 px). Both tools download them at 256 px center_crop, jpg q95, all cores; we print ok/s
for each, the ratio, and the decode-resize-encode limit of this machine (CPU cost per image of
that path alone). Then peak memory of mmcurate at 10k and 100k input rows (it must stay flat).

    bash benchmarks/peer_env.sh                      # once: img2dataset in its own venv
    .venv/bin/python benchmarks/download.py          # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/download.py --urls 1000 --memory-rows 10000
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_limit import make_jpegs, measure  # noqa: E402

from pipeline.testing.serve import LocalServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER_BIN = ROOT / ".benchvenv" / "bin" / "img2dataset"
MMCURATE = [sys.executable, "-m", "pipeline"]
CONCURRENCY = 128  # requests in flight per worker, the same for both tools


def write_urls(path: Path, server: LocalServer, n: int, n_images: int) -> None:
    urls = [server.url(f"img/{i % n_images}/{i}.jpg") for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(n)]}), path)


def peak_rss_run(cmd: list[str], env=None) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) of the command's process tree, measured by a wrapper."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, check=True)
    wall, rss_kb, rc = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{cmd[:4]} exited {rc}")
    return float(wall), int(rss_kb) // 1024


def successes(out_dir: Path) -> int:
    return sum(json.loads(p.read_text()).get("successes", 0) for p in out_dir.glob("*_stats.json"))


def startup_of(run, urls: Path, work: Path, name: str, *args) -> float:
    """A tool's fixed cost: the same command over a one-URL list (imports, workers, Ray start-up,
    one shard written)."""
    one = work / f"one-{name}.parquet"
    pq.write_table(pq.read_table(urls).slice(0, 1), one)
    return run(one, work / f"one-{name}", *args)["seconds"]


def run_img2dataset(urls: Path, out: Path, cores: int) -> dict:
    cmd = [str(PEER_BIN), "--url_list", str(urls), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
           "--processes_count", str(cores), "--thread_count", str(CONCURRENCY), "--image_size", "256",
           "--resize_mode", "center_crop", "--encode_format", "jpg", "--encode_quality", "95",
           "--number_sample_per_shard", "1000", "--distributor", "multiprocessing", "--timeout", "10",
           "--retries", "0", "--enable_wandb", "False"]
    wall, rss = peak_rss_run(cmd, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    return {"tool": "img2dataset", "seconds": wall, "ok": successes(out), "peak_rss_mib": rss}


def mmcurate_job(urls: Path, out: Path, engine: str, cores: int, per_shard: int = 1000, size: int = 256) -> Path:
    spec = {"name": out.name, "input": {"files": [str(urls)]},
            "download": {"image_size": size, "resize_mode": "center_crop", "encode_format": "jpg",
                         "encode_quality": 95, "timeout": 10, "retries": 0, "allow_private_addresses": True,
                         "concurrency": CONCURRENCY, "per_host_limit": CONCURRENCY},
            "output": {"dir": str(out), "samples_per_shard": per_shard},
            "execution": {"engine": engine, "progress": False,
                          "cpus_per_task": cores if engine == "local" else 1}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(spec))
    return path


def run_mmcurate(urls: Path, out: Path, engine: str, cores: int) -> dict:
    wall, rss = peak_rss_run(MMCURATE + ["run", str(mmcurate_job(urls, out, engine, cores)), "--no-progress"])
    return {"tool": f"mmcurate ({engine})", "seconds": wall, "ok": successes(out), "peak_rss_mib": rss}


def memory_flatness(work: Path, rows_list: list[int], cores: int) -> list[dict]:
    """Peak RSS of a local run over N rows of one small image (no latency): it must not grow with N."""
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (120, 30, 200)).save(buf, "JPEG")
    results = []
    with LocalServer({"img/0/0.jpg": buf.getvalue()}) as server:
        for rows in rows_list:
            urls = work / f"mem{rows}.parquet"
            pq.write_table(pa.table({"url": [server.url("img/0/0.jpg")] * rows,
                                     "caption": [f"image {i}" for i in range(rows)]}), urls)
            out = work / f"mem{rows}"
            job = mmcurate_job(urls, out, "local", cores, per_shard=1000, size=64)
            wall, rss = peak_rss_run(MMCURATE + ["run", str(job), "--no-progress"])
            results.append({"rows": rows, "seconds": round(wall, 1), "ok": successes(out), "peak_rss_mib": rss})
            shutil.rmtree(out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=3000, help="URLs in the speed comparison")
    parser.add_argument("--images", type=int, default=500, help="distinct JPEGs behind those URLs")
    parser.add_argument("--memory-rows", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--work", default=str(ROOT / "out" / "bench-download"))
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    limit = measure("ours", n=200)
    limit_rate = limit["images_per_s_per_core"] * cores
    print(f"decode-resize-encode limit: {limit['cpu_ms_per_image']:.1f} CPU ms/image -> "
          f"{limit_rate:.0f} img/s on {cores} cores ({limit['mean_megapixels']} MP mean)")

    images = make_jpegs(args.images)
    files = {f"img/{i % args.images}/{i}.jpg": images[i % args.images] for i in range(args.urls)}
    rng = random.Random(0)
    latency = lambda: rng.lognormvariate(math.log(0.040), 0.6)  # noqa: E731
    runs = []
    with LocalServer(files, latency=latency, content_type="image/jpeg") as server:
        urls = work / "urls.parquet"
        write_urls(urls, server, args.urls, args.images)
        if not args.skip_peer:
            if not PEER_BIN.exists():
                sys.exit("no peer venv: run `bash benchmarks/peer_env.sh` first (or pass --skip-peer)")
            runs.append({**run_img2dataset(urls, work / "img2dataset", cores),
                         "startup": startup_of(run_img2dataset, urls, work, "img2dataset", cores)})
        for engine in ("local", "ray"):
            runs.append({**run_mmcurate(urls, work / f"mmcurate-{engine}", engine, cores),
                         "startup": startup_of(run_mmcurate, urls, work, engine, engine, cores)})
    print(f"\n{args.urls} URLs ({args.images} distinct JPEGs, 320-1600 px), lognormal latency median 40 ms, "
          f"256 center_crop jpg q95, {cores} cores, {CONCURRENCY} requests in flight per worker")
    print(f"machine: {cores} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    base = runs[0] if not args.skip_peer else None
    for r in runs:
        rate = r["ok"] / r["seconds"]
        steady = r["ok"] / max(r["seconds"] - r["startup"], 1e-9)  # without the fixed start-up cost
        ratio = (f"  {rate / (base['ok'] / base['seconds']):.2f}x img2dataset, "
                 f"{steady / (base['ok'] / (base['seconds'] - base['startup'])):.2f}x without start-up") if base else ""
        print(f"  {r['tool']:<18} {r['ok']:>6} ok in {r['seconds']:6.1f} s = {rate:7.1f} ok/s "
              f"({100 * rate / limit_rate:5.1f}% of the decode limit); start-up {r['startup']:.1f} s, "
              f"{steady:.1f} ok/s after it; peak RSS {r['peak_rss_mib']} MiB{ratio}")
    if args.memory_rows:
        print("\npeak memory of mmcurate (local engine, 64 px, 1000 rows per shard) by input size:")
        for r in memory_flatness(work, args.memory_rows, cores):
            print(f"  {r['rows']:>7} rows: {r['ok']} ok in {r['seconds']} s, peak RSS {r['peak_rss_mib']} MiB")


if __name__ == "__main__":
    main()

"""Download benchmark: img2dataset against mmcurate on the same URLs, same settings, one run.

A loopback server with realistic latency (lognormal, median 40 ms) serves varied JPEGs
(320-1600 px). Both tools download them at 256 px center_crop, jpg q95, all cores; we print ok/s
for each, the ratio, the CPU each spends per image and how much of the cores it used (CPU seconds
over wall seconds x cores, the server's share apart), and the fraction of the decode-resize-encode
limit of this machine (CPU cost per image of that path alone, times the cores) each reaches. Then
peak memory of mmcurate at 10k and 100k input rows (it must stay flat). The load average before
and after is printed: on a shared machine the figures are only as good as it.

    bash benchmarks/peer_env.sh                      # once: img2dataset in its own venv
    .venv/bin/python benchmarks/download.py          # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/download.py --urls 1000 --memory-rows 10000
    .venv/bin/python benchmarks/download.py --engines local --memory-rows    # img2dataset and local only
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
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


def peak_rss_run(cmd: list[str], env=None) -> dict:
    """Run the command under a wrapper: wall seconds; CPU seconds and peak RSS of its process tree.

    The wrapper's ``getrusage(RUSAGE_CHILDREN)`` counts every descendant that was waited for
    (CPU summed, RSS the largest single process). A sampler also reads /proc every 0.2 s: the
    peak of the tree's summed RSS (worker processes together) and each process's last CPU time,
    which also counts processes nobody waits for (Ray's daemons), less their last 0.2 s."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
             "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
             "print(time.perf_counter() - t, u.ru_maxrss, u.ru_utime + u.ru_stime, rc)")
    proc = subprocess.Popen([sys.executable, "-c", probe, *cmd], stdout=subprocess.PIPE, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    sampler.stop()
    wall, rss_kb, cpu, rc = out.split()
    if proc.returncode or rc != "0":
        raise RuntimeError(f"{cmd[:4]} exited {rc}")
    return {"seconds": float(wall), "peak_rss_mib": int(rss_kb) // 1024, "tree_rss_mib": sampler.peak_rss_mib,
            "cpu_s": max(float(cpu), sampler.cpu_s)}


class TreeSampler(threading.Thread):
    """Polls /proc for the descendants of ``root``: peak summed RSS and CPU time per process."""

    TICKS = os.sysconf("SC_CLK_TCK")
    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak_rss_mib, self._cpu = root, 0, {}
        self._done = threading.Event()

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values())

    def run(self) -> None:
        while not self._done.wait(0.2):
            self._sample()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def _sample(self) -> None:
        stats = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                # after the name: state ppid ... utime(12) stime(13) ... rss(22), in ticks / pages
                stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21]))
        tree, frontier = set(), {self.root}
        while frontier:
            tree |= frontier
            frontier = {pid for pid, (ppid, _, _) in stats.items() if ppid in frontier and pid not in tree}
        tree.discard(self.root)  # the wrapper itself is idle
        rss = 0
        for pid in tree & stats.keys():
            _, ticks, pages = stats[pid]
            self._cpu[pid] = ticks / self.TICKS
            rss += pages * self.PAGE
        self.peak_rss_mib = max(self.peak_rss_mib, rss // 2**20)


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
    run = peak_rss_run(cmd, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    return {"tool": "img2dataset", **run, "ok": successes(out)}


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
    run = peak_rss_run(MMCURATE + ["run", str(mmcurate_job(urls, out, engine, cores)), "--no-progress"])
    return {"tool": f"mmcurate ({engine})", **run, "ok": successes(out)}


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
            run = peak_rss_run(MMCURATE + ["run", str(job), "--no-progress"])
            results.append({"rows": rows, "seconds": round(run["seconds"], 1), "ok": successes(out),
                            "peak_rss_mib": run["peak_rss_mib"], "tree_rss_mib": run["tree_rss_mib"]})
            shutil.rmtree(out)
    return results


def serving(run, *args) -> dict:
    """``run(*args)``, adding the CPU seconds this process (the server) spent meanwhile."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = run(*args)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {**result, "server_cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def loadavg(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=3000, help="URLs in the speed comparison")
    parser.add_argument("--images", type=int, default=500, help="distinct JPEGs behind those URLs")
    parser.add_argument("--memory-rows", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--work", default=str(ROOT / "out" / "bench-download"))
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--engines", nargs="*", default=["local", "ray"], choices=["local", "ray"])
    args = parser.parse_args()
    load_before = os.getloadavg()
    cores = os.cpu_count() or 1
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    limit = measure("ours", n=200)
    limit_rate = limit["images_per_s_per_core"] * cores
    print(f"decode-resize-encode limit: {limit['cpu_ms_per_image']:.1f} CPU ms/image -> "
          f"{limit_rate:.0f} img/s on {cores} cores ({limit['mean_megapixels']} MP mean); measured "
          f"{limit['images_per_s_all']:.0f} img/s on {cores} threads, "
          f"{measure('ours', n=200, pool='process')['images_per_s_all']:.0f} img/s on {cores} processes")

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
            runs.append({**serving(run_img2dataset, urls, work / "img2dataset", cores),
                         "startup": startup_of(run_img2dataset, urls, work, "img2dataset", cores)})
        for engine in args.engines:
            runs.append({**serving(run_mmcurate, urls, work / f"mmcurate-{engine}", engine, cores),
                         "startup": startup_of(run_mmcurate, urls, work, engine, engine, cores)})
    print(f"\n{args.urls} URLs ({args.images} distinct JPEGs, 320-1600 px), lognormal latency median 40 ms, "
          f"256 center_crop jpg q95, {cores} cores, {CONCURRENCY} requests in flight per worker")
    print(f"machine: {cores} cores, load average {loadavg(load_before)} before, {loadavg(os.getloadavg())} "
          f"after (1, 5, 15 min)")
    base = runs[0] if not args.skip_peer else None
    for r in runs:
        rate = r["ok"] / r["seconds"]
        steady = r["ok"] / max(r["seconds"] - r["startup"], 1e-9)  # without the fixed start-up cost
        ratio = (f"  {rate / (base['ok'] / base['seconds']):.2f}x img2dataset, "
                 f"{steady / (base['ok'] / (base['seconds'] - base['startup'])):.2f}x without start-up") if base else ""
        print(f"  {r['tool']:<18} {r['ok']:>6} ok in {r['seconds']:6.1f} s = {rate:7.1f} ok/s "
              f"({100 * rate / limit_rate:5.1f}% of the decode limit); start-up {r['startup']:.1f} s, "
              f"{steady:.1f} ok/s after it; peak RSS {r['peak_rss_mib']} MiB (largest process), "
              f"{r['tree_rss_mib']} MiB (all its processes){ratio}")
        print(f"  {'':<18} CPU {1000 * r['cpu_s'] / max(r['ok'], 1):5.1f} ms per ok image, cores "
              f"{100 * r['cpu_s'] / (r['seconds'] * cores):3.0f}% used (CPU s / wall s x {cores}); the server "
              f"(this process) {1000 * r['server_cpu_s'] / max(r['ok'], 1):.1f} CPU ms per image, "
              f"{100 * (r['cpu_s'] + r['server_cpu_s']) / (r['seconds'] * cores):3.0f}% with it")
    if args.memory_rows:
        print("\npeak memory of mmcurate (local engine, 64 px, 1000 rows per shard) by input size:")
        for r in memory_flatness(work, args.memory_rows, cores):
            print(f"  {r['rows']:>7} rows: {r['ok']} ok in {r['seconds']} s, peak RSS {r['peak_rss_mib']} MiB "
                  f"(largest process), {r['tree_rss_mib']} MiB (all its processes together)")


if __name__ == "__main__":
    main()

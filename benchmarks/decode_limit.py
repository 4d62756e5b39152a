"""The decode limit: CPU cost of decode -> resize -> encode alone, ours vs img2dataset's Resizer.

No network, no tar writing: this is the ceiling a downloader cannot beat however many requests it
keeps in flight. Both implementations run on the same deterministic set of JPEGs (320-1600 px a
side, like web images), resized to 256 px center_crop, jpg q95.

    .venv/bin/python benchmarks/decode_limit.py                      # ours, then img2dataset (if .benchvenv)
    .venv/bin/python benchmarks/decode_limit.py --impl ours --json
    .benchvenv/bin/python benchmarks/decode_limit.py --impl img2dataset

Parallel throughput uses each tool's own model by default: ours a thread pool (the download stage
on one CPU, and each Ray task, resize on threads; PIL releases the GIL), img2dataset a process pool
(its resize runs in each worker process's main thread, and its stdout/stderr suppression is not
thread-safe). ``--pool process`` measures ours as the local engine runs it with more than one CPU
(one worker process per CPU).

Other code (the download benchmark) calls :func:`measure` for ours and :func:`measure_peer` for
img2dataset, which re-runs this file under the peer venv.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".benchvenv" / "bin" / "python"
NOISE = 12  # texture amplitude: gives ~2.4 bits/pixel at q85-95, typical of web photos
SETTINGS = {"image_size": 256, "resize_mode": "center_crop", "encode_format": "jpg", "encode_quality": 95}

_IMAGES: list[bytes] = []   # module global so forked workers inherit it without copying
_RESIZE: Optional[Callable[[bytes], bool]] = None


def make_jpegs(n: int = 300, seed: int = 0, min_side: int = 320, max_side: int = 1600) -> list[bytes]:
    """Photo-like JPEGs: a coarse random colour field upscaled (smooth regions and edges) plus
    fine noise (texture), random sizes and aspect ratios, quality 85-95, 1 in 5 progressive."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        coarse = rng.integers(0, 256, (max(h // 48, 2), max(w // 48, 2), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC), np.int16)
        img = (img + rng.integers(-NOISE, NOISE + 1, img.shape, dtype=np.int16)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, "JPEG", quality=int(rng.integers(85, 96)),
                                         progressive=bool(rng.random() < 0.2))
        out.append(buf.getvalue())
    return out


def _ours() -> Callable[[bytes], bool]:
    sys.path.insert(0, str(ROOT))
    from pipeline.media.resize import ResizeConfig, resize_image

    config = ResizeConfig(**SETTINGS)
    return lambda data: resize_image(data, config).ok


def _img2dataset() -> Callable[[bytes], bool]:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it checks for updates online on import
    from img2dataset.resizer import Resizer

    resizer = Resizer(image_size=SETTINGS["image_size"], resize_mode=SETTINGS["resize_mode"],
                      resize_only_if_bigger=False, encode_format=SETTINGS["encode_format"],
                      encode_quality=SETTINGS["encode_quality"])
    return lambda data: resizer(io.BytesIO(data))[-1] is None


IMPLS = {"ours": _ours, "img2dataset": _img2dataset}


def _one(index: int) -> bool:
    return _RESIZE(_IMAGES[index])


def _single(n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) for one pass in this thread."""
    wall, cpu = time.perf_counter(), time.process_time()
    ok = sum(_one(i) for i in range(n))
    assert ok == n, f"only {ok}/{n} images resized"
    return time.perf_counter() - wall, time.process_time() - cpu


def _parallel(n: int, workers: int, pool_kind: str) -> float:
    """Wall seconds for one pass over the images with ``workers`` threads or processes; the pool
    does a warm-up pass first so start-up is not counted."""
    if pool_kind == "thread":
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(_one, range(n)))
            start = time.perf_counter()
            ok = sum(pool.map(_one, range(n)))
            elapsed = time.perf_counter() - start
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_one, range(n), chunksize=4)
            start = time.perf_counter()
            ok = sum(pool.map(_one, range(n), chunksize=4))
            elapsed = time.perf_counter() - start
    assert ok == n, f"only {ok}/{n} images resized"
    return elapsed


def measure(impl: str = "ours", n: int = 300, workers: Optional[int] = None,
            pool: Optional[str] = None) -> dict:
    """Measure one implementation in this interpreter. Returns ms/image (wall and CPU, one
    thread) and images/s on one thread and on ``workers`` (default: all cores)."""
    global _IMAGES, _RESIZE
    workers = workers or os.cpu_count() or 1
    pool = pool or ("thread" if impl == "ours" else "process")
    _IMAGES = make_jpegs(n)
    _RESIZE = IMPLS[impl]()
    _single(min(n, 20))  # warm-up: imports, first-call allocations
    wall, cpu = _single(n)
    par = _parallel(n, workers, pool)
    pixels = sum(_size(d) for d in _IMAGES) / n
    return {"impl": impl, "images": n, "mean_megapixels": round(pixels / 1e6, 3), "settings": SETTINGS,
            "ms_per_image": round(1000 * wall / n, 3), "cpu_ms_per_image": round(1000 * cpu / n, 3),
            # CPU time is the figure that survives a busy machine: the per-core decode limit.
            "images_per_s_per_core": round(n / cpu, 1),
            "images_per_s_1": round(n / wall, 1), "workers": workers, "pool": pool,
            "images_per_s_all": round(n / par, 1), "cores": os.cpu_count()}


def _size(data: bytes) -> int:
    w, h = Image.open(io.BytesIO(data)).size
    return w * h


def measure_peer(n: int = 300, workers: Optional[int] = None, python: Path = PEER_PYTHON) -> Optional[dict]:
    """img2dataset's numbers, measured by running this file under the peer venv; None when that
    venv is missing (create it with benchmarks/peer_env.sh)."""
    if not Path(python).exists():
        return None
    cmd = [str(python), __file__, "--impl", "img2dataset", "--json", "-n", str(n)]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _report(r: dict) -> str:
    return (f"{r['impl']:>12}: {r['ms_per_image']:7.2f} ms/image ({r['cpu_ms_per_image']:.2f} CPU ms), "
            f"{r['images_per_s_1']:7.1f} img/s on 1 thread, {r['images_per_s_all']:7.1f} img/s on "
            f"{r['workers']} {r['pool']} workers ({r['cores']} cores); CPU-bound limit "
            f"{r['images_per_s_per_core']:.0f} img/s per core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=["ours", "img2dataset", "both"], default="both")
    parser.add_argument("-n", type=int, default=300, help="number of images")
    parser.add_argument("--workers", type=int, default=None, help="parallel workers (default: all cores)")
    parser.add_argument("--pool", choices=["thread", "process"], default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON line per implementation")
    args = parser.parse_args()

    results = []
    if args.impl in ("ours", "img2dataset"):
        results.append(measure(args.impl, args.n, args.workers, args.pool))
    else:
        results.append(measure("ours", args.n, args.workers, args.pool))
        peer = measure_peer(args.n, args.workers)
        if peer is None:
            print(f"(img2dataset skipped: no {PEER_PYTHON}; run benchmarks/peer_env.sh)", file=sys.stderr)
        else:
            results.append(peer)
    for r in results:
        print(json.dumps(r) if args.json else _report(r))
    if len(results) == 2 and not args.json:
        ours, peer = results
        print(f"ratio ours/img2dataset: {peer['cpu_ms_per_image'] / ours['cpu_ms_per_image']:.2f}x less CPU "
              f"per image, {ours['images_per_s_1'] / peer['images_per_s_1']:.2f}x img/s on 1 thread, "
              f"{ours['images_per_s_all'] / peer['images_per_s_all']:.2f}x on all cores; {images_note(ours)}")


def images_note(r: dict) -> str:
    return f"{r['images']} JPEGs, mean {r['mean_megapixels']} MP -> 256 center_crop jpg q95"


if __name__ == "__main__":
    main()

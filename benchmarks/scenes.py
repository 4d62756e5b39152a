"""Scene cuts: mmcurate's content detector (pipeline.media.scenes) against PySceneDetect's CLI.

The same synthetic videos for both: H.264 made with PyAV, shots of seeded random lengths (1 to 6
s) joined by hard cuts, each shot a noise texture of its own hue with a white square moving across
it, keyframes every 2 s (never on the cuts). Both run their defaults (threshold 27, min scene
length 15 frames, frames compared at about 256 px wide): mmcurate in-process (``detect_cuts``,
one decoder thread, and ``--threads``), PySceneDetect as ``scenedetect -i VIDEO detect-content
list-scenes`` (a fresh process per video, as a user runs it; its start-up time is printed apart).
Agreement: a cut of one list matches a cut of the other within one frame; also against the cuts
the generator made.

Setup, once:  bash benchmarks/scene_env.sh        # .scenevenv with scenedetect 0.7.2 + OpenCV
Run:          .venv/bin/python benchmarks/scenes.py [--videos 4] [--seconds 30] [--size 640x360]
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.media.scenes import SceneConfig, detect_cuts  # noqa: E402

SCENEVENV = Path(os.environ.get("SCENEVENV", ROOT / ".scenevenv"))


def write_video(path: Path, seconds: float, fps: Fraction, width: int, height: int, seed: int) -> list[int]:
    """A video of textured shots with hard cuts; returns the frame indices of the cuts."""
    rng = random.Random(seed)
    total = int(seconds * fps)
    cuts, n = [], 0
    while True:
        n += int(rng.uniform(1, 6) * fps)
        if n >= total:
            break
        cuts.append(n)
    bounds = [0, *cuts, total]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        gop = int(2 * fps)
        stream.options = {"preset": "veryfast", "crf": "23",
                          "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=2"}
        frame_no = 0
        for shot, (a, b) in enumerate(zip(bounds, bounds[1:])):
            hue = np.array(_colour(seed * 100 + shot), np.int16)
            texture = np.random.default_rng(seed * 100 + shot).integers(-40, 40, (height, width, 1))
            base = np.clip(hue + texture, 0, 255).astype(np.uint8)
            for i in range(b - a):
                img = base.copy()
                x = (i * 4) % (width - 32)
                img[height // 3: height // 3 + 32, x:x + 32] = 255
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = frame_no, 1 / fps
                out.mux(stream.encode(frame.reformat(format="yuv420p")))
                frame_no += 1
        out.mux(stream.encode(None))
    return cuts


def _colour(seed: int) -> tuple[int, int, int]:
    """A saturated colour whose hue differs from the previous shot's by at least 60 degrees."""
    import colorsys

    hue = (seed * 0.37) % 1.0
    return tuple(int(c * 220) for c in colorsys.hsv_to_rgb(hue, 0.8, 0.9))


def ours(path: Path, threads: int) -> tuple[list[int], float]:
    started = time.perf_counter()
    cuts = detect_cuts(path, SceneConfig(), threads=threads)
    return cuts.frames, time.perf_counter() - started


def pyscenedetect(path: Path, fps: Fraction, out_dir: Path) -> tuple[list[int], float]:
    cli = SCENEVENV / "bin" / "scenedetect"
    started = time.perf_counter()
    subprocess.run([str(cli), "-i", str(path), "-o", str(out_dir), "-q", "detect-content", "list-scenes", "-s"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - started
    table = next(out_dir.glob(f"{path.stem}-Scenes.csv"))
    with table.open() as f:
        rows = list(csv.DictReader(f))
    starts = [int(round(float(r["Start Time (seconds)"]) * float(fps))) for r in rows]
    table.unlink()
    return [s for s in starts if s > 0], seconds


def agreement(a: list[int], b: list[int]) -> tuple[int, int, int]:
    """(matched within one frame, only in a, only in b)."""
    left, matched = list(b), 0
    for cut in a:
        near = next((c for c in left if abs(c - cut) <= 1), None)
        if near is not None:
            left.remove(near)
            matched += 1
    return matched, len(a) - matched, len(left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not (SCENEVENV / "bin" / "scenedetect").exists():
        sys.exit(f"no PySceneDetect at {SCENEVENV}: run bash benchmarks/scene_env.sh")
    width, height = (int(v) for v in args.size.split("x"))
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}")
    start_up = time.perf_counter()
    subprocess.run([str(SCENEVENV / "bin" / "scenedetect"), "version"], check=True, capture_output=True)
    start_up = time.perf_counter() - start_up
    print(f"scenedetect CLI start-up (scenedetect version): {start_up:.2f} s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmcurate-scenes-") as tmp:
        tmp = Path(tmp)
        for v in range(args.videos):
            fps = Fraction(30000, 1001) if v % 2 else Fraction(25)
            path = tmp / f"v{v}.mp4"
            truth = write_video(path, args.seconds, fps, width, height, seed=v + 1)
            frames = int(args.seconds * fps)
            ours1, t1 = ours(path, 1)
            oursn, tn = ours(path, args.threads)
            assert ours1 == oursn, "the cut list must not depend on decoder threads"
            theirs, tp = pyscenedetect(path, fps, tmp)
            rows.append((v, float(fps), frames, len(truth), t1, tn, tp, agreement(ours1, theirs),
                         agreement(ours1, truth), agreement(theirs, truth)))
    print(f"\n{args.videos} videos, {args.seconds:g} s, {args.size}, H.264 (B-frames)\n")
    print(f"| video | fps | frames | true cuts | mmcurate 1 thread s | mmcurate {args.threads} threads s | "
          "scenedetect CLI s | CLI minus start-up s | speed-up (1 thread, vs CLI / vs CLI minus start-up) | ours vs theirs (match/only ours/only theirs) | "
          "ours vs truth | theirs vs truth |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v, fps, frames, n_truth, t1, tn, tp, ot, ou, th in rows:
        print(f"| v{v} | {fps:.3f} | {frames} | {n_truth} | {t1:.2f} | {tn:.2f} | {tp:.2f} | {tp - start_up:.2f} | "
              f"{tp / t1:.2f}x / {(tp - start_up) / t1:.2f}x | "
              f"{ot[0]}/{ot[1]}/{ot[2]} | {ou[0]}/{ou[1]}/{ou[2]} | {th[0]}/{th[1]}/{th[2]} |")
    t1, tn, tp = (sum(r[i] for r in rows) for i in (4, 5, 6))
    frames, n = sum(r[2] for r in rows), len(rows)
    print(f"| all | | {frames} | {sum(r[3] for r in rows)} | {t1:.2f} ({frames / t1:.0f} fps) | "
          f"{tn:.2f} ({frames / tn:.0f} fps) | {tp:.2f} ({frames / tp:.0f} fps) | "
          f"{tp - n * start_up:.2f} ({frames / (tp - n * start_up):.0f} fps) | "
          f"{tp / t1:.2f}x / {(tp - n * start_up) / t1:.2f}x | | | |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

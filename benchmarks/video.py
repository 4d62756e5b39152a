"""Video clips per second: mmcurate's video stage against video2dataset and a plain ffmpeg loop.

The same job for every implementation: direct MP4 links served on 127.0.0.1 (synthetic 640x360
H.264 videos with B-frames, a keyframe every second), several spans per video, each span cut into
its own H.264 MP4. Two modes:

* ``exact``: clips exact to the frame, scaled to a short side of 224, libx264. mmcurate re-encodes
  each span once (PyAV, in-process); video2dataset (ClippingSubsampler precision "exact" +
  ResolutionSubsampler) re-encodes the whole video with forced keyframes, then each clip again
  (ffmpeg subprocesses); the loop runs one ``ffmpeg -ss S -i SRC -t D -vf scale=-2:224`` per clip.
* ``keyframe``: cuts on keyframes, stream copy (mmcurate clip_precision "keyframe", video2dataset
  "keyframe_adjusted", the loop ``ffmpeg -ss S -i SRC -t D -c copy``). The clips differ in length:
  video2dataset shrinks a span to the keyframes inside it, mmcurate widens it to keyframes around it.

video2dataset starts a pool of spawned processes that import torch; on a small job that start
dominates, so its rate is also printed without the wall time of a one-clip run ("steady").

Wall time includes the downloads and writing shards (mmcurate and video2dataset write WebDataset
tars; the loop writes files). Clips/s counts clips that came out.

Setup, once:
    apt-get install -y ffmpeg                           # the ffmpeg CLI (loop and video2dataset)
    .venv/bin/python benchmarks/video.py --setup-peer   # .benchvenv-v2d with video2dataset (pins torch 2.1)
Run (a few minutes):
    .venv/bin/python benchmarks/video.py [--videos 12] [--clips-per-video 4] [--modes exact,keyframe]
Without the peer venv (or when video2dataset cannot run), only mmcurate and the loop are compared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

PEER_VENV = ROOT / ".benchvenv-v2d"
PEER_PY = PEER_VENV / "bin" / "python"
SHORT_SIDE = 224
PRESET, CRF = "veryfast", 23

# video2dataset, run in its own venv: arguments as JSON on argv[1], result as JSON on stdout.
V2D_DRIVER = r"""
import json, sys, time, glob, tarfile
args = json.loads(sys.argv[1])
from video2dataset import video2dataset
t = time.perf_counter()
video2dataset(url_list=args["input"], input_format="parquet", output_format="webdataset",
              output_folder=args["out"], url_col="url", caption_col="caption", clip_col="clips",
              encode_formats={"video": "mp4"}, config=args["config"], tmp_dir=args["tmp"])
seconds = time.perf_counter() - t
clips = 0
for path in glob.glob(args["out"] + "/*.tar"):
    with tarfile.open(path) as tar:
        clips += sum(1 for m in tar.getmembers() if m.name.endswith(".mp4"))
print(json.dumps({"clips": clips, "seconds": seconds}))
"""


def setup_peer() -> None:
    """Create the video2dataset venv (its own: it pins numpy<2, torch 2.1.2, transformers 4.37)."""
    if not PEER_PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    lock = ["flock", "/tmp/mmcurate-pip.lock"] if shutil.which("flock") else []
    # Its pins (numpy<2) predate pyarrow 18 and pandas 3, which need numpy 2: hold those back too.
    subprocess.run(lock + [str(PEER_PY), "-m", "pip", "install", "--quiet", "video2dataset==1.3.0", "pyarrow<18",
                           "pandas<3"], check=True)
    subprocess.run([str(PEER_PY), "-c", "import video2dataset"], check=True)
    patch_peer()
    print(f"video2dataset ready in {PEER_VENV}")


def patch_peer() -> None:
    """Fix a bug of video2dataset 1.3.0 that fails every shard using ResolutionSubsampler.

    Its download worker reads ``ResolutionSubsampler.encode_formats``, which the class never sets
    (it stores ``encode_format``): "'ResolutionSubsampler' object has no attribute 'encode_formats'".
    The fix sets it, as the other video subsamplers do. Idempotent.
    """
    found = subprocess.run([str(PEER_PY), "-c", "import video2dataset.subsamplers.resolution_subsampler as m; "
                            "print(m.__file__)"], capture_output=True, text=True, check=True)
    path = Path(found.stdout.strip())
    source = path.read_text()
    old = "        self.encode_format = encode_format\n"
    if old in source and "self.encode_formats" not in source:
        path.write_text(source.replace(old, old + '        self.encode_formats = {"video": encode_format}\n', 1))


def peer_available() -> tuple[bool, str]:
    if not PEER_PY.exists():
        return False, f"no {PEER_VENV} (run with --setup-peer)"
    if shutil.which("ffmpeg") is None:
        return False, "no ffmpeg CLI (apt-get install -y ffmpeg)"
    got = subprocess.run([str(PEER_PY), "-c", "import video2dataset"], capture_output=True, text=True)
    if got.returncode:
        return False, "video2dataset does not import: " + got.stderr.strip().splitlines()[-1]
    patch_peer()
    return True, ""


# -- the workload --------------------------------------------------------------------------------
def make_sources(work: Path, distinct: int, seconds: float) -> list[bytes]:
    from pipeline.testing.video_synth import write_counter_video

    return [write_counter_video(work / f"src{i}.mp4", int(seconds * 25), fps=25, width=640, height=360,
                                gop=25, bframes=3).read_bytes() for i in range(distinct)]


def spans_for(video: int, clips: int, seconds: float) -> list[tuple[float, float]]:
    """Sorted, non-overlapping spans that start between keyframes (so exact cuts must decode)."""
    slot = seconds / clips
    return [(round(k * slot + 0.3 + 0.1 * (video % 3), 2), round(k * slot + 0.3 + 0.1 * (video % 3) + 0.7 * slot, 2))
            for k in range(clips)]


# -- implementations -----------------------------------------------------------------------------
def run_mmcurate(work: Path, jobs: list[tuple[str, list]], mode: str) -> tuple[int, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.job.runner import run_job
    from pipeline.job.spec import load_job

    rows = [(url, s, e) for url, spans in jobs for s, e in spans]
    table = work / f"mm-{mode}.parquet"
    pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [f"clip {i}" for i in range(len(rows))],
                             "clip_start": [r[1] for r in rows], "clip_end": [r[2] for r in rows]}), table)
    video = {"clip_precision": mode, "preset": PRESET, "crf": CRF}
    if mode == "exact":
        video["resolution"] = SHORT_SIDE
    spec = load_job(data={
        "input": {"files": [str(table)], "save_additional_columns": ["clip_start", "clip_end"]},
        "download": {"media": "video", "allow_private_addresses": True, "timeout": 60, "max_bytes": 500_000_000},
        "video": video, "output": {"dir": str(work / f"mm-{mode}"), "samples_per_shard": 10_000},
        "execution": {"engine": "local", "progress": False, "cpus_per_task": os.cpu_count() or 1}})
    t = time.perf_counter()
    result = run_job(spec)
    return result.status_counts.get("success", 0), time.perf_counter() - t


def run_ffmpeg_loop(work: Path, jobs: list[tuple[str, list]], mode: str) -> tuple[int, float]:
    out = work / f"ffmpeg-{mode}"
    out.mkdir()
    codec = (["-vf", f"scale=-2:{SHORT_SIDE}", "-c:v", "libx264", "-preset", PRESET, "-crf", str(CRF)]
             if mode == "exact" else ["-c", "copy"])
    done = 0
    t = time.perf_counter()
    for n, (url, spans) in enumerate(jobs):
        src = out / f"{n}.src.mp4"
        with urllib.request.urlopen(url, timeout=60) as resp, open(src, "wb") as f:
            shutil.copyfileobj(resp, f)
        for k, (s, e) in enumerate(spans):
            dst = out / f"{n:05d}_{k:02d}.mp4"
            cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-ss", str(s), "-i", str(src),
                   "-t", str(round(e - s, 3)), *codec, "-an", str(dst)]
            done += subprocess.run(cmd).returncode == 0 and dst.stat().st_size > 0
        src.unlink()
    return done, time.perf_counter() - t


def run_video2dataset(work: Path, jobs: list[tuple[str, list]], mode: str, tag: str = "") -> tuple[int, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    mode_tag = f"{mode}{tag}"
    table = work / f"v2d-{mode_tag}.parquet"
    pq.write_table(pa.table({"url": [u for u, _ in jobs], "caption": [f"video {i}" for i in range(len(jobs))],
                             "clips": [[[s, e] for s, e in spans] for _, spans in jobs]}), table)
    subsampling = {"ClippingSubsampler": {"args": {"precision": "exact" if mode == "exact" else "keyframe_adjusted",
                                                   "min_length": 0.0}}}
    if mode == "exact":
        subsampling["ResolutionSubsampler"] = {"args": {"video_size": SHORT_SIDE, "resize_mode": "scale"}}
    else:
        subsampling["FFProbeSubsampler"] = {"args": {"extract_keyframes": True}}  # keyframe_adjusted needs them
    config = {"subsampling": subsampling,
              "reading": {"yt_args": {"download_size": 360, "download_audio_rate": 44100, "yt_metadata_args": None},
                          "timeout": 60, "sampler": None},
              "storage": {"number_sample_per_shard": 10_000, "oom_shard_count": 5, "captions_are_subtitles": False},
              "distribution": {"processes_count": os.cpu_count() or 1, "thread_count": 8, "subjob_size": 1000,
                               "distributor": "multiprocessing"}}
    config_path = work / f"v2d-{mode_tag}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    tmp = work / f"v2d-tmp-{mode_tag}"
    tmp.mkdir()
    args = {"input": str(table), "out": str(work / f"v2d-{mode_tag}"), "config": str(config_path), "tmp": str(tmp)}
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    got = subprocess.run([str(PEER_PY), "-c", V2D_DRIVER, json.dumps(args)], capture_output=True, text=True, env=env)
    if got.returncode:
        raise RuntimeError(f"video2dataset failed: {got.stderr[-2000:]}")
    result = json.loads(got.stdout.strip().splitlines()[-1])
    return result["clips"], result["seconds"]


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup-peer", action="store_true", help="create the video2dataset venv and exit")
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--clips-per-video", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each source video")
    ap.add_argument("--distinct", type=int, default=3, help="distinct source videos (served under many URLs)")
    ap.add_argument("--modes", default="exact,keyframe")
    ap.add_argument("--skip-peer", action="store_true")
    args = ap.parse_args()
    if args.setup_peer:
        setup_peer()
        return
    if shutil.which("ffmpeg") is None:
        sys.exit("the ffmpeg CLI is needed for the baseline: apt-get install -y ffmpeg")
    from pipeline.testing.serve import LocalServer

    peer, why = (False, "skipped") if args.skip_peer else peer_available()
    work = Path(tempfile.mkdtemp(prefix="mmcurate-bench-video-"))
    try:
        sources = make_sources(work, args.distinct, args.seconds)
        files = {f"v{i}.mp4": sources[i % len(sources)] for i in range(args.videos)}
        with LocalServer(files, content_type="video/mp4") as server:
            jobs = [(server.url(f"v{i}.mp4"), spans_for(i, args.clips_per_video, args.seconds))
                    for i in range(args.videos)]
            clips = sum(len(s) for _, s in jobs)
            print(f"{args.videos} videos ({args.seconds:g} s, 640x360, H.264 with B-frames), {clips} clips, "
                  f"{os.cpu_count()} CPUs; ffmpeg {ffmpeg_version()}")
            for mode in args.modes.split(","):
                results = {"mmcurate": run_mmcurate(work, jobs, mode)}
                if peer:
                    try:
                        done, seconds = results["video2dataset"] = run_video2dataset(work, jobs, mode)
                        _, start = run_video2dataset(work, [(jobs[0][0], jobs[0][1][:1])], mode, tag="start")
                        if seconds > start:
                            results["v2d steady"] = (done - 1, seconds - start)
                    except RuntimeError as e:
                        print(f"  video2dataset: {e}")
                results["ffmpeg loop"] = run_ffmpeg_loop(work, jobs, mode)
                report(mode, results, clips)
        if not peer:
            print(f"video2dataset not compared: {why}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ffmpeg_version() -> str:
    out = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split()
    return out[2] if len(out) > 2 else "?"


def report(mode: str, results: dict[str, tuple[int, float]], clips: int) -> None:
    ours = results["mmcurate"][0] / results["mmcurate"][1]
    print(f"\nmode {mode}:")
    print(f"  {'implementation':<15} {'clips':>7} {'seconds':>8} {'clips/s':>8}  mmcurate is")
    for name, (done, seconds) in results.items():
        rate = done / seconds
        ratio = "" if name == "mmcurate" else f"{ours / rate:.2f}x faster" if rate else "n/a"
        print(f"  {name:<15} {done:>3}/{clips:<3} {seconds:>8.2f} {rate:>8.2f}  {ratio}")


if __name__ == "__main__":
    main()

"""A video job with scene cuts and the motion rule, end to end over a local HTTP server: a long
video without a span becomes one sample whose clips are members KEY.clip_000.mp4, ...; a still
video is filtered by ``motion``; a video of short scenes only by ``scenes``; a corrupt video fails
its row, not its shard; a shard redone after an interruption is byte-identical."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers.jobs import status_tables, tars
from pipeline.core.schema import ErrorKind
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing.serve import LocalServer

pytestmark = pytest.mark.timeout(240)
FPS = 25
LONG_SHOTS = [60, 40, 110, 30, 20]  # cuts at frames 60, 100, 210, 240; the last shot (0.8 s) is too short
MIN_CLIP, MAX_CLIP, MIN_MOTION = 1.0, 3.0, 0.5
PALETTE = [(200, 40, 40), (40, 180, 60), (50, 60, 200), (220, 200, 40), (180, 50, 200), (40, 200, 200)]


def write_shot_video(path: Path, shots: list[int], moving: bool = True) -> bytes:
    """Solid-colour shots joined by hard cuts, a white square moving across them (or not)."""
    rate = Fraction(FPS)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20", "threads": "1",
                          "x264-params": "keyint=50:min-keyint=50:scenecut=0:bframes=2"}
        n = 0
        for s, length in enumerate(shots):
            for i in range(length):
                frame = np.empty((96, 128, 3), np.uint8)
                frame[:] = PALETTE[s % len(PALETTE)]
                if moving:
                    frame[32:48, (i * 3) % 112:(i * 3) % 112 + 16] = 255
                video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
                video_frame.pts, video_frame.time_base = n, 1 / rate
                out.mux(stream.encode(video_frame.reformat(format="yuv420p")))
                n += 1
        out.mux(stream.encode(None))
    return path.read_bytes()


def zero_frames(mp4: bytes) -> bytes:
    """The video with its frame data zeroed but its index intact: it probes, then fails to decode
    (in the scene detector, not in the probe)."""
    data = bytearray(mp4)
    start, index = data.find(b"mdat") + 104, data.find(b"moov") - 8
    assert 0 < start < index
    data[start:index] = bytes(index - start)
    return bytes(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    long = write_shot_video(d / "long.mp4", LONG_SHOTS)
    files = {"long.mp4": long, "still.mp4": write_shot_video(d / "still.mp4", [75], moving=False),
             "flashes.mp4": write_shot_video(d / "flashes.mp4", [20, 20, 20]),
             "corrupt.mp4": long[:300] + b"\x00" * 4000, "zeroed.mp4": zero_frames(long)}
    with LocalServer(files, content_type="video/mp4") as srv:
        yield srv


ROWS = [("long.mp4", None, None), ("still.mp4", None, None), ("corrupt.mp4", None, None),
        ("flashes.mp4", None, None), ("long.mp4", 0.0, 2.0), ("still.mp4", 0.0, 2.0), ("zeroed.mp4", None, None)]


def job_file(tmp_path: Path, server, name: str) -> Path:
    urls = tmp_path / "videos.parquet"
    pq.write_table(pa.table({"url": [server.url(r[0]) for r in ROWS], "caption": [r[0] for r in ROWS],
                             "clip_start": pa.array([r[1] for r in ROWS], pa.float64()),
                             "clip_end": pa.array([r[2] for r in ROWS], pa.float64())}), urls)
    data = {"name": name,
            "input": {"files": [str(urls)], "save_additional_columns": ["clip_start", "clip_end"]},
            "download": {"media": "video", "allow_private_addresses": True, "timeout": 10},
            "video": {"resolution": 64, "store_frames": True, "num_frames": 2, "min_motion": MIN_MOTION,
                      "scenes": {"detect": "content", "threshold": 27, "min_clip": MIN_CLIP, "max_clip": MAX_CLIP}},
            "output": {"dir": str(tmp_path / name), "samples_per_shard": 2},
            "execution": {"engine": "local", "progress": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server):
    tmp = tmp_path_factory.mktemp("reference")
    result = run_job(load_job(job_file(tmp, server, "ref")))
    assert result.ok and result.shards_written == 4
    return tmp


def rows_of(out: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted(out.glob("*.parquet"))]
    return pa.concat_tables(tables, promote_options="default").to_pylist()


def samples_of(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in sorted(tars(out).items()):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_every_input_row_has_one_status_row_with_its_outcome(reference):
    rows = rows_of(reference / "ref")
    assert [r["caption"] for r in rows] == [r[0] for r in ROWS]
    outcome = [(r["status"], r["error_kind"]) for r in rows]
    assert outcome == [("success", None), ("filtered", "motion"), (ErrorKind.DECODE_ERROR.status, "decode_error"),
                       ("filtered", "scenes"), ("success", None), ("filtered", "motion"),
                       (ErrorKind.DECODE_ERROR.status, "decode_error")]
    assert rows[6]["source_duration"] is not None  # probed: it failed in the scene detector
    assert rows[5]["motion_score"] < MIN_MOTION < rows[4]["motion_score"]


def test_a_long_video_without_span_becomes_its_scene_clips_in_one_sample(reference):
    row = rows_of(reference / "ref")[0]
    # scenes [0, 2.4) [2.4, 4) [4, 8.4) [8.4, 9.6); [9.6, 10.4) is under min_clip; 4.4 s splits in two
    expected = [(0.0, 2.4), (2.4, 4.0), (4.0, 6.2), (6.2, 8.4), (8.4, 9.6)]
    scenes = row["scenes"]
    assert len(scenes) == len(expected)
    for scene, (start, end) in zip(scenes, expected):
        assert abs(scene["start"] - start) <= 1 / FPS + 1e-6 and abs(scene["end"] - end) <= 1 / FPS + 1e-6
        assert scene["end"] - scene["start"] <= MAX_CLIP + 1e-6
        assert scene["motion_score"] > MIN_MOTION
    sample = samples_of(reference / "ref")[row["key"]]
    clips = sorted(ext for ext in sample if ext.endswith(".mp4"))
    assert clips == [f"clip_{n:03d}.mp4" for n in range(len(expected))]
    assert {f"clip_{n:03d}.frames.npy" for n in range(len(expected))} <= set(sample)
    meta = json.loads(sample["json"])
    assert meta["scenes"] == scenes and meta["clip_start"] == 0.0
    for ext, scene in zip(clips, scenes):
        with av.open(io.BytesIO(sample[ext])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == scene["frame_count"]
        colours = {tuple(np.median(f[-4:], axis=(0, 1)).round(-1)) for f in frames}
        assert len(colours) == 1  # each clip holds one shot, no frame across a cut


def test_a_shard_redone_after_an_interruption_is_byte_identical(tmp_path, server, reference):
    out = tmp_path / "ref"
    shutil.copytree(reference / "ref", out)
    assert b"clip_000.mp4" in (out / "00000.tar").read_bytes()  # shard 0 holds the scene clips
    for name in ("00000_stats.json", "00000.tar", "00000.parquet"):  # as if killed before its commit
        (out / name).unlink()
    data = yaml.safe_load((reference / "ref.yaml").read_text())  # the same input files
    data["output"]["dir"] = str(out)
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(data))
    assert run_job(load_job(tmp_path / "resume.yaml")).ok
    assert tars(out) == tars(reference / "ref")
    assert status_tables(out) == status_tables(reference / "ref")


def test_a_row_with_a_span_stays_one_clip_with_its_motion_score(reference):
    row = rows_of(reference / "ref")[4]
    assert row["scenes"] is None and (row["clip_start"], row["clip_end"]) == (0.0, 2.0)
    sample = samples_of(reference / "ref")[row["key"]]
    assert "mp4" in sample and not any(ext.startswith("clip_") for ext in sample)
    assert json.loads(sample["json"])["motion_score"] == row["motion_score"] > MIN_MOTION


def test_a_job_without_scenes_or_motion_gets_no_new_columns(tmp_path, server):
    from pipeline.job.build import download_stage

    data = yaml.safe_load(job_file(tmp_path, server, "plain").read_text())
    for key in ("scenes", "min_motion"):
        del data["video"][key]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(data))
    columns = download_stage(load_job(tmp_path / "plain.yaml")).columns
    assert "scenes" not in columns and "motion_score" not in columns
    data["video"]["motion"] = True
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(data))
    assert download_stage(load_job(tmp_path / "plain.yaml")).columns["motion_score"] == "double"

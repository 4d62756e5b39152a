"""A video job end to end (local HTTP server, scene cuts, the tiny CLIP's frame-level clip_score),
then ``mmcurate report`` on its output: the clips that do not match the caption are dropped
from their sample, and the page plots the clip duration and the match scores, per clip."""
from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.report import summarize, write_report
from pipeline.core import schema
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.serve import LocalServer

av = pytest.importorskip("av")
pytestmark = pytest.mark.timeout(240)
SEED, FPS, SHOT = 424242, 25, 40  # shots of 1.6 s: one clip each (min_clip 1, max_clip 3)
MATCH, OTHER = 0, 4  # synthetic scenes on black and on gray: a hard cut between them


def shot_video(scenes: list[int]) -> bytes:
    """One shot of SHOT frames per synthetic scene, joined by hard cuts (H.264 MP4)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "threads": "1", "x264-params": "keyint=40:min-keyint=40:scenecut=0"}
        n = 0
        for k in scenes:
            rgb = np.asarray(synthetic.scene(k, SEED).render(64))
            for _ in range(SHOT):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = n
                out.mux(stream.encode(frame))
                n += 1
        out.mux(stream.encode(None))
    return buf.getvalue()


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("video-report")
    match, other = (synthetic.scene(k, SEED).caption() for k in (MATCH, OTHER))
    with LocalServer({"shots.mp4": shot_video([MATCH, OTHER, MATCH])}, content_type="video/mp4") as server:
        url = server.url("shots.mp4")
        rows = pa.table({"url": [url] * 3, "caption": [match, match, other],
                         "clip_start": pa.array([None, 0.0, 0.0], pa.float64()),
                         "clip_end": pa.array([None, 1.2, 1.2], pa.float64())})
        pq.write_table(rows, tmp / "videos.parquet")
        spec = load_job(data={
            "name": "video-report",
            "input": {"files": [str(tmp / "videos.parquet")], "save_additional_columns": ["clip_start", "clip_end"]},
            "download": {"media": "video", "allow_private_addresses": True, "timeout": 10},
            "video": {"scenes": {"min_clip": 1.0, "max_clip": 3.0}},
            "filters": [{"clip_score": {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS),
                                        "min": 0.5, "frames": 3}}],
            "output": {"dir": str(tmp / "out"), "samples_per_shard": 10},
            "execution": {"engine": "local", "progress": False}})
        result = run_job(spec)
    assert result.ok
    return tmp / "out"


def test_a_scene_sample_keeps_the_clips_that_match_its_caption(output):
    rows = pq.read_table(output / "00000.parquet").to_pylist()
    scene, span, mismatched = rows
    assert (scene[schema.STATUS], span[schema.STATUS]) == (schema.SUCCESS, schema.SUCCESS), rows
    assert (mismatched[schema.STATUS], mismatched[schema.ERROR_KIND]) == (schema.FILTERED, "clip_score")
    assert [round(s["start"], 1) for s in scene["scenes"]] == [0.0, 3.2]  # the other scene's clip is gone
    assert len(scene["clip_scores"]) == 2 and min(scene["clip_scores"]) >= 0.5
    assert scene["clip_score"] == min(scene["clip_scores"]) and span["clip_score"] >= 0.5
    with tarfile.open(output / "00000.tar") as tar:
        names = tar.getnames()
    key = scene[schema.KEY]
    assert [n for n in names if n.startswith(key) and n.endswith(".mp4")] == \
        [f"{key}.clip_000.mp4", f"{key}.clip_001.mp4"]


def test_report_plots_clip_durations_and_match_scores_per_clip(output):
    summary = summarize(output)
    duration = summary.histograms["duration"]
    assert duration.total == 4  # 2 clips of the scene sample, the span clip, the filtered span clip
    assert duration.kept.sum() == 3 and duration.dropped.sum() == 1
    per_clip = summary.histograms["clip_scores"]
    assert per_clip.total == 2 and per_clip.marks == [(0.5, "min 0.5")]
    assert summary.histograms["clip_score"].total == 3
    page = write_report(output).read_text()
    for title in ("Clip duration", "clip_score", "clip_scores"):
        assert f"<figure><img alt='{title}' src='data:image/png;base64," in page, title
    assert re.search(r"Clip duration: 4 samples", page)


def test_an_image_output_has_no_video_figures(tmp_path):
    from pipeline.testing.output import write_shards

    batch = synthetic.make_batch(synthetic.make_pairs(3, size=32))
    write_shards(tmp_path / "images", [batch])
    summary = summarize(tmp_path / "images")
    assert "duration" not in summary.histograms and "clip_scores" not in summary.histograms
    assert "Clip duration" not in write_report(tmp_path / "images").read_text()

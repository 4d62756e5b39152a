"""The video path: clip cutting by spans, frame sampling, hostile downloads, repeatable bytes.

Every test video is generated here with PyAV and shows its frame index as a binary counter
(pipeline.video_synth), so a test can decode a clip and say exactly which source frames it holds.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from aiohttp import web

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.testing.serve import LocalServer
from pipeline.job.spec import load_job
from pipeline.job.build import download_stage
from pipeline.media.video import CutConfig, MediaError, cut_clips, frame_indices
from pipeline.testing.video_synth import read_counter, write_counter_video

pytestmark = pytest.mark.timeout(120)


# -- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "bframes": write_counter_video(d / "bframes.mp4", 100, fps=25, gop=25, bframes=2),
        "plain": write_counter_video(d / "plain.mp4", 100, fps=25, gop=25, bframes=0),
        "mpeg4": write_counter_video(d / "mpeg4.avi", 100, fps=25, gop=12, codec="mpeg4"),
        "ntsc": write_counter_video(d / "ntsc.mp4", 150, fps=Fraction(30000, 1001), gop=30, bframes=1),
        "long": write_counter_video(d / "long.mp4", 160, fps=8, gop=16),  # 20 s
        # no duration in the container, no timestamps, no seeking: a raw H.264 stream (8 s)
        "raw": write_counter_video(d / "raw.h264", 200, fps=25, container_format="h264"),
        "mkv": write_counter_video(d / "clip.mkv", 100, fps=25, gop=25, container_format="matroska"),
    }


def decoded(data: bytes) -> list[tuple[float, int]]:
    """(time, counter) of every frame of an encoded clip."""
    with av.open(io.BytesIO(data)) as container:
        return [(float(f.time), read_counter(f.to_ndarray(format="rgb24")))
                for f in container.decode(video=0)]


def source_fps(path: Path) -> float:
    with av.open(str(path)) as container:
        return float(container.streams.video[0].average_rate)


def expected_frames(span, fps: float, n_frames: int) -> list[int]:
    """Frames whose midpoint lies in [start, end): the contract of a cut."""
    start, end = span or (0.0, math.inf)
    first = max(0, math.ceil(start * fps - 0.5 - 1e-9))
    last = n_frames - 1 if end == math.inf else min(n_frames - 1, math.ceil(end * fps - 0.5 - 1e-9) - 1)
    return list(range(first, last + 1))


def cut_one(path: Path, span, tmp_path: Path, **config):
    _, results = cut_clips(path, [span], CutConfig(**config), tmp_path)
    return results[0]


def job_spec(tmp_path: Path, video: dict | None = None, **download):
    data = {"input": {"files": [str(tmp_path / "unused.parquet")]},
            "download": {"media": "video", "allow_private_addresses": True, "timeout": 5, **download},
            "video": video or {}, "execution": {"cpus_per_task": 2}}
    return load_job(data=data)


def make_batch(rows: list[tuple]) -> dict[str, list]:
    """rows: (url, clip_start, clip_end)."""
    n = len(rows)
    return {"key": [f"{i:09d}" for i in range(n)], "url": [r[0] for r in rows],
            "caption": [f"clip {i}" for i in range(n)], "status": [schema.PENDING] * n,
            "error_kind": [None] * n, "error_message": [None] * n, "width": [None] * n, "height": [None] * n,
            "original_width": [None] * n, "original_height": [None] * n, "sha256": [None] * n,
            "files": [{} for _ in range(n)], "clip_start": [r[1] for r in rows], "clip_end": [r[2] for r in rows]}


# -- cutting -------------------------------------------------------------------------------------
SPANS = [(1.0, 2.0), (1.3, 2.1), (0.5, 0.62), None, (3.5, 10.0), (0.0, 0.9)]


@pytest.mark.parametrize("name", ["bframes", "plain", "mpeg4", "ntsc"])
@pytest.mark.parametrize("span", SPANS, ids=str)
def test_exact_cut_holds_the_frames_of_the_span(videos, tmp_path, name, span):
    path = videos[name]
    fps = source_fps(path)
    with av.open(str(path)) as c:
        n_frames = c.streams.video[0].frames
    clip = cut_one(path, span, tmp_path)
    assert not isinstance(clip, MediaError), clip.message
    frames = decoded(clip.data)
    want = expected_frames(span, fps, n_frames)
    assert [c for _, c in frames] == want
    assert frames[0][0] == pytest.approx(0, abs=1e-6)  # the clip's own clock starts at 0
    start, end = span or (0.0, math.inf)
    end = min(end, n_frames / fps)
    assert abs(clip.start - start) <= 1 / fps and abs(clip.end - end) <= 1 / fps
    assert clip.frame_count == len(want)
    # Remux needs H.264, a keyframe at the start and, with B-frames, one at the end too
    # (every source has keyframes at 0, 1 and 2 s, within half a frame).
    remux = name != "mpeg4" and (span in (None, (1.0, 2.0)) or (span == (0.0, 0.9) and name == "plain"))
    assert clip.method == ("remux" if remux else "reencode")


def test_keyframe_precision_moves_the_start_back_and_copies(videos, tmp_path):
    clip = cut_one(videos["bframes"], (1.3, 2.1), tmp_path, precision="keyframe")
    counters = [c for _, c in decoded(clip.data)]
    assert clip.method == "remux" and clip.start == pytest.approx(1.0)
    assert counters[0] == 25 and counters[-1] >= 52  # covers the span; with B-frames up to a keyframe
    assert counters == list(range(25, 25 + len(counters)))
    plain = cut_one(videos["plain"], (1.3, 2.1), tmp_path, precision="keyframe")
    assert plain.method == "remux"
    assert [c for _, c in decoded(plain.data)] == list(range(25, 52))  # no B-frames: the end is exact


def test_resize_and_frame_rate_change(videos, tmp_path):
    clip = cut_one(videos["bframes"], (1.0, 3.0), tmp_path, resolution=48, fps=10)
    assert (clip.width, clip.height, clip.fps, clip.method) == (64, 48, 10.0, "reencode")
    frames = decoded(clip.data)
    assert len(frames) == 20
    with av.open(io.BytesIO(clip.data)) as c:
        stream = c.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 64, 48)
        assert float(stream.average_rate) == 10
    for k, (t, counter) in enumerate(frames):
        assert t == pytest.approx(k / 10, abs=1e-3)
        # each output frame shows the source frame on screen at that instant
        assert abs(counter / 25 - (1.0 + k / 10)) <= 0.5 / 25 + 1e-9
    up = cut_one(videos["mpeg4"], (0.0, 1.0), tmp_path, fps=50)
    assert [c for _, c in decoded(up.data)] == [i // 2 for i in range(50)]


def test_output_size_is_even_and_keeps_the_aspect(videos, tmp_path):
    clip = cut_one(videos["plain"], (0.0, 0.4), tmp_path, resolution=33)
    assert (clip.width, clip.height) == (44, 34)  # 128x96 -> short side 33, made even


def test_sources_without_duration_or_seeking(videos, tmp_path):
    raw = videos["raw"]
    whole = cut_one(raw, None, tmp_path, max_duration=10.0)
    assert [c for _, c in decoded(whole.data)] == list(range(200)) and whole.end == pytest.approx(8.0)
    span = cut_one(raw, (2.0, 4.0), tmp_path)  # cannot seek: read from the start, same frames
    assert [c for _, c in decoded(span.data)] == list(range(50, 100))
    too_long = cut_one(raw, None, tmp_path, max_duration=5.0)  # found out while decoding
    assert isinstance(too_long, MediaError) and too_long.kind == "too_long"


def test_h264_in_another_container_is_copied_into_mp4(videos, tmp_path):
    clip = cut_one(videos["mkv"], (1.0, 3.0), tmp_path)
    assert clip.method == "remux" and [c for _, c in decoded(clip.data)] == list(range(25, 75))
    with av.open(io.BytesIO(clip.data)) as c:
        assert c.format.name.startswith("mov,mp4")


# -- frame sampling ------------------------------------------------------------------------------
def test_frame_sampling_returns_the_frames_it_promises(videos, tmp_path):
    clip = cut_one(videos["bframes"], (1.0, 2.0), tmp_path, store_frames=True, num_frames=5)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (5, 96, 128, 3)
    assert [read_counter(f) for f in clip.frames] == [25, 31, 37, 43, 49]  # first to last, evenly

    by_rate = cut_one(videos["bframes"], (1.0, 2.0), tmp_path, store_frames=True, num_frames=None, frames_fps=5)
    assert [read_counter(f) for f in by_rate.frames] == [25, 30, 35, 40, 45]

    small = cut_one(videos["mpeg4"], (0.0, 1.0), tmp_path, store_frames=True, num_frames=3, frames_size=48)
    assert small.frames.shape == (3, 48, 64, 3)
    assert [read_counter(f) for f in small.frames] == [0, 12, 24]

    more = cut_one(videos["plain"], (1.0, 1.4), tmp_path, store_frames=True, num_frames=16)
    counters = [read_counter(f) for f in more.frames]
    assert len(counters) == 16 and counters[0] == 25 and counters[-1] == 34 and counters == sorted(counters)


def test_frame_indices():
    assert frame_indices(25, 25.0, 5, None) == [0, 6, 12, 18, 24]
    assert frame_indices(25, 25.0, None, 5) == [0, 5, 10, 15, 20]
    assert frame_indices(10, 30.0, None, 1.0) == [0]
    assert frame_indices(3, 25.0, 5, None) == [0, 0, 1, 2, 2]
    assert frame_indices(0, 25.0, 5, None) == []


# -- failures of one file ------------------------------------------------------------------------
def test_failures_of_a_local_file_are_error_kinds(videos, tmp_path):
    def kind(path, span=None, **config):
        result = cut_one(path, span, tmp_path, **config)
        assert isinstance(result, MediaError)
        schema.error_kind(result.kind)  # one of the schema's kinds
        return result.kind

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 400)
    half = tmp_path / "half.mp4"
    half.write_bytes(videos["bframes"].read_bytes()[: videos["bframes"].stat().st_size // 2])
    assert kind(garbage) == "decode_error"
    assert kind(half) == "decode_error"  # the index (moov) is at the end: gone
    assert kind(videos["long"], max_duration=5.0) == "too_long"
    assert kind(videos["long"], (2.0, 9.0), max_duration=5.0) == "too_long"
    assert not isinstance(cut_one(videos["long"], (2.0, 6.0), tmp_path, max_duration=5.0), MediaError)
    assert kind(videos["plain"], (5.0, 6.0)) == "bad_span"  # the video lasts 4 s
    assert kind(videos["plain"], (2.0, 1.0)) == "bad_span"
    assert kind(videos["plain"], max_pixels=128 * 96 - 1) == "decompression_bomb"


# -- the stage over HTTP -------------------------------------------------------------------------
class VideoServer(LocalServer):
    """Serves the test videos and hostile variants; counts requests per path."""

    def __init__(self, videos: dict[str, Path]):
        self.requests: Counter = Counter()
        bframes = videos["bframes"].read_bytes()
        files = {f"{name}.{path.suffix[1:]}": path.read_bytes() for name, path in videos.items()}
        files["garbage.mp4"] = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 4000
        page = b"<!DOCTYPE html><html><body>This video is no longer available</body></html>" * 20
        handlers = {"truncated.mp4": self._truncated(bframes), "endless.mp4": self._endless(bframes, 0),
                    "endless_slow.mp4": self._endless(bframes, 0.2), "page.html": self._html(page)}
        super().__init__(files, handlers, content_type="video/mp4")

    async def _dispatch(self, request):
        self.requests[request.path.lstrip("/")] += 1
        return await super()._dispatch(request)

    @staticmethod
    def _html(body: bytes):
        async def handler(request):
            return web.Response(body=body, content_type="text/html")
        return handler

    @staticmethod
    def _truncated(body: bytes):
        async def handler(request):
            resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            request.transport.close()  # half the promised bytes, then hang up
            return resp
        return handler

    @staticmethod
    def _endless(body: bytes, pause: float):
        async def handler(request):
            resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
            await resp.prepare(request)
            await resp.write(body[:4096])  # a real MP4 head, then zeros forever
            while True:
                await asyncio.sleep(pause)
                await resp.write(b"\0" * 65536)
        return handler


@pytest.fixture(scope="module")
def server(videos):
    with VideoServer(videos) as srv:
        yield srv


def test_stage_downloads_each_video_once_and_fills_the_row(server, tmp_path):
    url, avi = server.url("bframes.mp4"), server.url("mpeg4.avi")
    batch = make_batch([(url, 0.0, 1.0), (avi, None, None), (url, 1.0, 2.0), (url, 2.5, 3.5)])
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    stale = downloads / "mmcurate-video-999999999-abc"  # left by a killed process
    stale.mkdir()
    stage = download_stage(job_spec(tmp_path, {"resolution": 48, "store_frames": True, "num_frames": 4,
                                                   "tmp_dir": str(downloads)}))
    before = server.requests.copy()
    batch = stage.process(batch)
    assert batch["status"] == [schema.SUCCESS] * 4, batch["error_message"]
    assert server.requests["bframes.mp4"] - before["bframes.mp4"] == 1  # three clips, one download
    # 2.5 s is the middle of frame 62 (2.48 s to 2.52 s): the clip starts with it
    assert [batch["clip_start"][i] for i in (0, 2, 3)] == [0.0, 1.0, 2.48]
    assert batch["clip_end"][1] == pytest.approx(4.0) and batch["duration"][1] == pytest.approx(4.0)
    for i, files in enumerate(batch["files"]):
        assert set(files) == {"mp4", "frames.npy"}
        assert batch["sha256"][i] == hashlib.sha256(files["mp4"]).hexdigest()
        frames = np.load(io.BytesIO(files["frames.npy"]))
        assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
        assert (batch["width"][i], batch["height"][i]) == (64, 48)
        assert (batch["original_width"][i], batch["original_height"][i]) == (128, 96)
        assert (batch["fps"][i], batch["codec"][i], batch["cut"][i]) == (25.0, "h264", "reencode")
    assert batch["source_codec"] == ["h264", "mpeg4", "h264", "h264"]
    assert batch["source_url"][1] == avi and batch["source_duration"][0] == pytest.approx(4.0)
    clip_counters = [c for _, c in decoded(batch["files"][3]["mp4"])]
    assert clip_counters == list(range(62, 87))
    json.dumps({k: v for k, v in batch.items() if k != "files"})  # scalar columns are JSON-able
    assert not list(downloads.iterdir())  # sources deleted, the dead process's directory too


def test_hostile_downloads_end_in_their_documented_status(server, tmp_path):
    cases = {  # name -> (url, span, status, error kind)
        "ok": (server.url("plain.mp4"), 1.0, 2.0, schema.SUCCESS, None),
        "corrupt": (server.url("garbage.mp4"), None, None, schema.FAILED_TO_DECODE, "decode_error"),
        "html": (server.url("page.html"), None, None, schema.FAILED_TO_DOWNLOAD, "not_media"),
        "truncated": (server.url("truncated.mp4"), None, None, schema.FAILED_TO_DOWNLOAD, "truncated"),
        "endless": (server.url("endless.mp4"), None, None, schema.FAILED_TO_DOWNLOAD, "too_large"),
        "endless_slow": (server.url("endless_slow.mp4"), None, None, schema.FAILED_TO_DOWNLOAD, "timeout"),
        "too_long": (server.url("long.mp4"), None, None, schema.FAILED_TO_DECODE, "too_long"),
        "long_ok_span": (server.url("long.mp4"), 10.0, 14.0, schema.SUCCESS, None),
        "missing": (server.url("nothing-here.mp4"), None, None, schema.FAILED_TO_DOWNLOAD, "http_status"),
        "after_end": (server.url("plain.mp4"), 7.0, 8.0, schema.INVALID_INPUT, "bad_span"),
    }
    batch = make_batch([c[:3] for c in cases.values()])
    stage = download_stage(job_spec(tmp_path, {"max_duration": 5.0}, max_bytes=2_000_000, timeout=1.5))
    batch = stage.process(batch)
    got = {name: (batch["status"][i], batch["error_kind"][i]) for i, name in enumerate(cases)}
    assert got == {name: c[3:] for name, c in cases.items()}
    for i, name in enumerate(cases):
        if cases[name][3] != schema.SUCCESS:
            assert batch["files"][i] == {} and batch["error_message"][i]


def test_private_addresses_are_refused_by_default(server, tmp_path):
    stage = download_stage(job_spec(tmp_path, allow_private_addresses=False))
    batch = stage.process(make_batch([(server.url("plain.mp4"), None, None)]))
    assert (batch["status"][0], batch["error_kind"][0]) == (schema.FAILED_TO_DOWNLOAD, "forbidden_address")


def test_same_input_gives_the_same_bytes(server, tmp_path):
    rows = [(server.url("bframes.mp4"), 0.3, 2.7), (server.url("mpeg4.avi"), None, None),
            (server.url("plain.mp4"), 1.0, 3.0)]
    spec = job_spec(tmp_path, {"resolution": 64, "store_frames": True})
    runs = [download_stage(spec).process(make_batch(rows)) for _ in range(3)]
    for run in runs[1:]:
        assert run["files"] == runs[0]["files"] and run["sha256"] == runs[0]["sha256"]
    remuxed = [download_stage(job_spec(tmp_path)).process(make_batch(rows[2:])) for _ in range(2)]
    assert remuxed[0]["cut"] == ["remux"] and remuxed[0]["files"] == remuxed[1]["files"]


def test_missing_span_values_mean_the_whole_video(server, tmp_path):
    url = server.url("plain.mp4")
    batch = make_batch([(url, float("nan"), float("nan")), (url, 3.0, None), (url, "soon", 2.0)])
    batch = download_stage(job_spec(tmp_path)).process(batch)
    assert batch["status"][:2] == [schema.SUCCESS, schema.SUCCESS]
    assert (batch["clip_start"][0], batch["clip_end"][0]) == (0.0, 4.0)
    assert (batch["clip_start"][1], batch["clip_end"][1]) == (3.0, 4.0)
    assert batch["error_kind"][2] == "bad_span"


def test_rows_already_failed_are_left_alone(server, tmp_path):
    batch = make_batch([(server.url("plain.mp4"), None, None), (server.url("plain.mp4"), 0.0, 1.0)])
    schema.mark(batch, 0, "bad_span", "set by the planner")
    batch = download_stage(job_spec(tmp_path)).process(batch)
    assert batch["error_message"][0] == "set by the planner" and batch["status"][1] == schema.SUCCESS


def test_video_spec_validation(tmp_path):
    with pytest.raises(ConfigError, match="num_frames, frames_fps"):
        job_spec(tmp_path, {"num_frames": 4, "frames_fps": 2.0})
    with pytest.raises(ConfigError, match="video.crf"):
        job_spec(tmp_path, {"crf": 60})
    with pytest.raises(ConfigError, match="video.resolution"):
        job_spec(tmp_path, {"resolution": 0})


# -- yt-dlp backend ------------------------------------------------------------------------------
def test_ytdlp_backend_without_ytdlp_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yt_dlp", None)  # import yt_dlp now raises ImportError
    with pytest.raises(ConfigError, match=r"mmcurate\[ytdlp\]"):
        download_stage(job_spec(tmp_path, {"backend": "yt-dlp"})).check()


def test_ytdlp_backend_fetches_and_fails_like_http(server, tmp_path):
    pytest.importorskip("yt_dlp")
    rows = [(server.url("plain.mp4"), 1.0, 2.0), (server.url("nothing-here.mp4"), None, None),
            (server.url("page.html"), None, None), (server.url("endless.mp4"), None, None)]
    stage = download_stage(job_spec(tmp_path, {"backend": "yt-dlp"}, max_bytes=2_000_000))
    batch = stage.process(make_batch(rows))
    assert batch["status"][0] == schema.SUCCESS, batch["error_message"][0]
    assert [c for _, c in decoded(batch["files"][0]["mp4"])] == list(range(25, 50))
    assert batch["error_kind"][1:] == ["http_status", "not_media", "too_large"]
    refused = download_stage(job_spec(tmp_path, {"backend": "yt-dlp"}, allow_private_addresses=False))
    batch = refused.process(make_batch(rows[:1]))
    assert batch["error_kind"] == ["forbidden_address"]

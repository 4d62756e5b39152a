"""Downloading videos (pipeline.download, built by pipeline.job.build.download_stage): the stage
over HTTP against a server on 127.0.0.1, hostile downloads, repeatable bytes, the video spec, and
the yt-dlp backend.

Every test video shows its frame index as a binary counter (pipeline.testing.video_synth, through
helpers.videos), so a test can decode a clip and say exactly which source frames it holds.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from helpers.videos import decoded, make_batch
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.job.build import download_stage
from pipeline.job.spec import load_job
from pipeline.testing.serve import LocalServer

pytestmark = pytest.mark.timeout(120)


# -- helpers -------------------------------------------------------------------------------------
def job_spec(tmp_path: Path, video: dict | None = None, **download):
    data = {"input": {"files": [str(tmp_path / "unused.parquet")]},
            "download": {"media": "video", "allow_private_addresses": True, "timeout": 5, **download},
            "video": video or {}, "execution": {"cpus_per_task": 2}}
    return load_job(data=data)


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
    with pytest.raises(ConfigError, match=r"video.audio_rate: must be one of the AAC rates .*got 12345"):
        job_spec(tmp_path, {"audio_rate": 12345})
    with pytest.raises(ConfigError, match=r"video.audio_channels: .*got 6"):
        job_spec(tmp_path, {"audio_channels": 6})


# -- audio and rotation --------------------------------------------------------------------------
def test_audio_and_rotation_reach_the_row(tmp_path):
    from pipeline.testing.video_synth import write_counter_video

    files = {"phone.mp4": write_counter_video(tmp_path / "phone.mp4", 50, rotation=90, audio_rate=48000),
             "talk.mp4": write_counter_video(tmp_path / "talk.mp4", 50, audio_rate=44100),
             "mute.mp4": write_counter_video(tmp_path / "mute.mp4", 50)}
    with LocalServer({name: path.read_bytes() for name, path in files.items()}, content_type="video/mp4") as srv:
        rows = [(srv.url("phone.mp4"), 0.0, 1.0), (srv.url("talk.mp4"), 0.0, 1.0), (srv.url("mute.mp4"), 0.0, 1.0)]
        batch = download_stage(job_spec(tmp_path, {"audio_rate": 16000, "audio_channels": 1})).process(make_batch(rows))
        off = download_stage(job_spec(tmp_path, {"audio": False})).process(make_batch(rows[1:2]))
    assert batch["status"] == [schema.SUCCESS] * 3, batch["error_message"]
    audio = [(batch["audio_codec"][i], batch["audio_rate"][i], batch["audio_channels"][i]) for i in range(3)]
    assert audio == [("aac", 16000, 1), ("aac", 16000, 1), (None, None, None)]
    # the phone video is stored 96x128 and shown 128x96: every size is the shown one, the clip upright
    assert (batch["width"][0], batch["height"][0], batch["original_width"][0], batch["original_height"][0]) \
        == (128, 96, 128, 96)
    assert batch["cut"] == ["reencode", "remux", "remux"]  # resampled audio beside a copied video
    assert [c for _, c in decoded(batch["files"][0]["mp4"])] == list(range(25))
    assert (off["status"][0], off["audio_codec"][0], off["cut"][0]) == (schema.SUCCESS, None, "remux")


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

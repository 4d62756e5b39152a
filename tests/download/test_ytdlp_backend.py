"""The yt-dlp backend (pipeline.download.ytdlp) through the video stage, never against YouTube:
yt-dlp's real YouTube extractor is kept for URL matching, its extraction replaced by a fake that
answers from a table (an info dict pointing at a server on 127.0.0.1, or the error YouTube would
give), and yt-dlp's real downloaders (its HTTP one, ffmpeg for sections) fetch the media.

The videos show their frame index as a binary counter (helpers.videos), so a clip says exactly
which source frames it holds.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web

from helpers.videos import decoded, make_batch
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.download.ytdlp import (TokenBucket, YtdlpOptions, download, failure_kind, ffmpeg_location,
                                     youtube_url)
from pipeline.job.build import download_stage, ytdlp_options
from pipeline.job.spec import load_job
from pipeline.media.video import probe_file
from pipeline.testing.serve import LocalServer

yt_dlp = pytest.importorskip("yt_dlp")
pytestmark = pytest.mark.timeout(120)
from yt_dlp.extractor.youtube import YoutubeIE  # noqa: E402
from yt_dlp.utils import ExtractorError, GeoRestrictedError  # noqa: E402

LONG_FPS = 8  # helpers.videos "long": 160 frames at 8 fps, a keyframe every 2 s


# -- the fake YouTube ----------------------------------------------------------------------------
class MediaServer(LocalServer):
    """The media files; counts requests and the most in flight at once; /slow/ paths answer after
    a pause, /429/ paths with HTTP 429."""

    def __init__(self, files: dict[str, bytes]):
        self.requests: Counter = Counter()
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        super().__init__(files, content_type="video/mp4")

    async def _dispatch(self, request):
        path = request.path.lstrip("/")
        self.requests[path] += 1
        if path.startswith("429/"):
            return web.Response(status=429, text="Too Many Requests")
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if path.startswith("slow/"):
                await asyncio.sleep(0.3)
                request = request.clone(rel_url="/" + path.removeprefix("slow/"))
            return self._ranged(request) or await super()._dispatch(request)
        finally:
            with self.lock:
                self.in_flight -= 1


    def _ranged(self, request):
        """A Range request answered with 206, as YouTube's media servers do (ffmpeg seeks an MP4)."""
        body = self.files.get(request.path.lstrip("/"))
        ranges = request.http_range
        if body is None or (ranges.start is None and ranges.stop is None):
            return None
        start, stop = ranges.indices(len(body))[:2]
        return web.Response(status=206, body=body[start:stop], content_type="video/mp4",
                            headers={"Content-Range": f"bytes {start}-{stop - 1}/{len(body)}",
                                     "Accept-Ranges": "bytes"})


@pytest.fixture(autouse=True)
def ffmpeg_on_path(tmp_path_factory, monkeypatch):
    """An ffmpeg on PATH for section downloads: the system's, else imageio-ffmpeg's binary."""
    if shutil.which("ffmpeg") is None:
        try:
            import imageio_ffmpeg
        except ImportError:
            return
        bin_dir = tmp_path_factory.mktemp("bin")
        (bin_dir / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture(scope="module")
def server(videos):
    files = {f"{name}.mp4": path.read_bytes() for name, path in videos.items() if path.suffix == ".mp4"}
    with MediaServer(files) as srv:
        yield srv


class FakeYoutube(dict):
    """video id -> what the extraction gives: a media path on the server, or the exception to raise;
    ``extracted``: the ids extracted, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.extracted: list[str] = []


@pytest.fixture
def youtube(monkeypatch, server):
    table = FakeYoutube()

    def fake_extract(ie, url):
        video_id = ie._match_id(url)
        table.extracted.append(video_id)
        answer = table.get(video_id, ExtractorError("Video unavailable", expected=True))
        if isinstance(answer, Exception):
            raise answer
        return {"id": video_id, "title": video_id, "url": server.url(answer), "ext": "mp4",
                "duration": 20.0, "webpage_url": f"https://www.youtube.com/watch?v={video_id}"}

    monkeypatch.setattr(YoutubeIE, "_real_initialize", lambda ie: None)
    monkeypatch.setattr(YoutubeIE, "_real_extract", fake_extract)
    return table


def job_spec(tmp_path: Path, video: dict | None = None, catalog: str | None = None, **download):
    data = {"input": {"files": [str(tmp_path / "unused.parquet")], **({"catalog": catalog} if catalog else {})},
            "download": {"media": "video", "allow_private_addresses": True, "timeout": 10, **download},
            "video": {"ytdlp_rate": None, **(video or {})}, "execution": {"cpus_per_task": 2}}
    return load_job(data=data)


def counters(batch, i: int) -> list[int]:
    return [c for _, c in decoded(batch["files"][i]["mp4"])]


# -- which backend -------------------------------------------------------------------------------
def test_youtube_ids_and_urls_are_recognised():
    assert youtube_url("dQw4w9WgXcQ") == "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
    for url in ("https://www.youtube.com/watch?v=dQw4w9WgXcQ", "https://youtu.be/dQw4w9WgXcQ",
                "https://m.youtube.com/shorts/dQw4w9WgXcQ", "http://YouTube.com/watch?v=dQw4w9WgXcQ"):
        assert youtube_url(url) == url
    for other in ("https://example.com/watch?v=dQw4w9WgXcQ", "dQw4w9WgXcQx", "dQw4w9WgXc", "ftp://youtu.be/x",
                  "https://www.youtube.com.evil.test/watch?v=dQw4w9WgXcQ"):
        assert youtube_url(other) is None


def test_auto_backend_uses_ytdlp_for_youtube_ids_and_http_for_plain_urls(youtube, server, tmp_path):
    youtube["vidAAAAAAA1"] = "plain.mp4"
    stage = download_stage(job_spec(tmp_path))  # video.backend defaults to auto
    stage.check()
    before = server.requests["bframes.mp4"]
    batch = stage.process(make_batch([("vidAAAAAAA1", 1.0, 2.0), (server.url("bframes.mp4"), 0.0, 1.0)]))
    assert batch["status"] == [schema.SUCCESS, schema.SUCCESS], batch["error_message"]
    assert youtube.extracted == ["vidAAAAAAA1"]  # only the YouTube row went through yt-dlp
    assert batch["source_url"][0] == "https://www.youtube.com/watch?v=vidAAAAAAA1"
    assert batch["source_url"][1] == server.url("bframes.mp4")
    assert server.requests["bframes.mp4"] == before + 1
    assert counters(batch, 0) == list(range(25, 50))


def test_a_youtube_card_without_ytdlp_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yt_dlp", None)  # import yt_dlp now raises ImportError
    with pytest.raises(ConfigError, match=r"backend.*auto.*YouTube.*mmcurate\[ytdlp\]"):
        download_stage(job_spec(tmp_path, catalog="panda-70m")).check()
    download_stage(job_spec(tmp_path)).check()  # auto without a card: only YouTube rows need it


def test_backend_follows_the_card(tmp_path):
    assert ytdlp_options(job_spec(tmp_path, catalog="panda-70m")).every_url  # card media: youtube
    assert not ytdlp_options(job_spec(tmp_path, catalog="webvid-10m")).every_url  # media: urls
    assert not ytdlp_options(job_spec(tmp_path)).every_url
    assert ytdlp_options(job_spec(tmp_path, {"backend": "yt-dlp"})).every_url
    assert ytdlp_options(job_spec(tmp_path, {"backend": "http"}, catalog="panda-70m")) is None


@pytest.mark.parametrize("name", ["panda-70m", "internvid", "hd-vila-100m", "lvd-2m"])
def test_shipped_youtube_jobs_send_every_row_through_ytdlp(name):
    spec = load_job(Path(__file__).parents[2] / "jobs" / f"{name}.yaml")
    options = ytdlp_options(spec)
    assert options is not None and options.every_url and options.sections


# -- sections ------------------------------------------------------------------------------------
@pytest.fixture
def needs_ffmpeg(ffmpeg_on_path):
    if ffmpeg_location() is None:
        pytest.skip("section downloads need ffmpeg (on PATH, or imageio-ffmpeg)")  # reason: optional binary


@pytest.mark.usefixtures("needs_ffmpeg")
def test_section_download_holds_the_span_not_the_whole_video(youtube, tmp_path):
    youtube["vidSECTION1"] = "long.mp4"  # 20 s
    options = ytdlp_options(job_spec(tmp_path))
    got, section = download("vidSECTION1", tmp_path, options, section=(8.0, 11.0))
    assert got.ok, got.error_message
    assert (section.start, section.end, section.source_duration) == (8.0, 11.0, 20.0)
    info = probe_file(got.path, 10**8)
    assert 3.0 <= info.duration < 6.0  # the section (from the keyframe before it), not 20 s


@pytest.mark.usefixtures("needs_ffmpeg")
def test_clips_of_a_section_are_the_requested_source_frames(youtube, server, tmp_path):
    youtube["vidSECTION2"] = "long.mp4"
    stage = download_stage(job_spec(tmp_path))
    rows = [("vidSECTION2", 9.0, 10.0), ("vidSECTION2", 11.5, 12.5)]
    batch = stage.process(make_batch(rows))
    assert batch["status"] == [schema.SUCCESS] * 2, batch["error_message"]
    assert youtube.extracted == ["vidSECTION2"]  # one download for the video's clips
    assert counters(batch, 0) == list(range(9 * LONG_FPS, 10 * LONG_FPS))
    assert counters(batch, 1) == list(range(92, 100))
    assert batch["clip_start"] == [9.0, 11.5] and batch["clip_end"] == [10.0, 12.5]  # source time
    assert batch["source_duration"] == [20.0, 20.0]


@pytest.mark.usefixtures("needs_ffmpeg")
def test_a_section_over_the_byte_cap_is_too_large(youtube, tmp_path):
    youtube["vidSECTION3"] = "long.mp4"
    options = ytdlp_options(job_spec(tmp_path, max_bytes=10_000))
    got, section = download("vidSECTION3", tmp_path, options, section=(2.0, 18.0))
    assert (got.error_kind, section) == ("too_large", None)


def test_whole_video_when_a_clip_has_no_span(youtube, tmp_path):
    youtube["vidWHOLEVD1"] = "long.mp4"
    stage = download_stage(job_spec(tmp_path))
    batch = stage.process(make_batch([("vidWHOLEVD1", 2.0, 3.0), ("vidWHOLEVD1", None, None)]))
    assert batch["status"] == [schema.SUCCESS] * 2, batch["error_message"]
    assert counters(batch, 0) == list(range(16, 24))
    assert len(counters(batch, 1)) == 160


# -- failures ------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, kind", [
    (ExtractorError("Video unavailable. This video has been removed by the uploader", expected=True),
     "video_removed"),
    (ExtractorError("Video unavailable. This video is no longer available because the YouTube account "
                    "associated with this video has been terminated.", expected=True), "video_removed"),
    (ExtractorError("Private video. Sign in if you've been granted access to this video", expected=True),
     "video_private"),
    (GeoRestrictedError("The uploader has not made this video available in your country"), "geo_blocked"),
    (ExtractorError("Video unavailable. The uploader has not made this video available in your country",
                    expected=True), "geo_blocked"),
    (ExtractorError("Sign in to confirm you\u2019re not a bot. Use --cookies-from-browser or --cookies for "
                    "the authentication.", expected=True), "bot_check"),
    (ExtractorError("Video unavailable. This content isn't available, try again later. The current session "
                    "has been rate-limited by YouTube for up to an hour.", expected=True), "rate_limited"),
    ("429/plain.mp4", "rate_limited"),  # the media URL answers HTTP 429
    (ExtractorError("Unable to download API page: The read operation timed out", expected=True), "timeout"),
    (ExtractorError("Requested format is not available", expected=True), "ytdlp_error"),
])
def test_each_failure_has_its_kind(youtube, tmp_path, answer, kind):
    youtube["vidFAILURE1"] = answer
    stage = download_stage(job_spec(tmp_path, retries=0))
    batch = stage.process(make_batch([("https://youtu.be/vidFAILURE1", None, None)]))
    assert batch["error_kind"] == [kind], batch["error_message"]
    assert batch["status"] == [schema.FAILED_TO_DOWNLOAD]
    assert batch["error_message"][0]


def test_failure_phrases_pick_the_specific_kind_first():
    assert failure_kind("Video unavailable. This video is private") == "video_private"
    assert failure_kind("Video unavailable") == "video_removed"
    assert failure_kind("Some extractor bug") is None


# -- caps ----------------------------------------------------------------------------------------
def test_no_more_than_ytdlp_concurrency_videos_in_flight(youtube, server, tmp_path):
    ids = [f"vidCONCUR{n:02d}" for n in range(6)]
    for video_id in ids:
        youtube[video_id] = "slow/plain.mp4"
    server.most_in_flight = 0
    stage = download_stage(job_spec(tmp_path, {"ytdlp_concurrency": 2, "concurrency": 6}))
    batch = stage.process(make_batch([(video_id, 0.0, 1.0) for video_id in ids]))
    assert batch["status"] == [schema.SUCCESS] * 6, batch["error_message"]
    assert sorted(youtube.extracted) == ids
    assert server.most_in_flight in (1, 2)


def test_token_bucket_spaces_acquisitions_at_the_rate():
    now = [0.0]
    starts: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    async def run() -> None:
        bucket = TokenBucket(2.0, clock=lambda: now[0], sleep=fake_sleep)
        for _ in range(5):
            await bucket.acquire()
            starts.append(now[0])

    asyncio.run(run())
    assert starts == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


def test_rate_and_caps_reach_ytdlp(tmp_path):
    spec = job_spec(tmp_path, {"ytdlp_rate": 0.5, "ytdlp_ratelimit": 1_000_000, "ytdlp_sleep": 2,
                               "ytdlp_force_keyframes": True})
    options = ytdlp_options(spec)
    assert isinstance(options, YtdlpOptions)
    assert (options.rate, options.ratelimit, options.sleep_interval, options.force_keyframes_at_cuts) == \
        (0.5, 1_000_000, 2, True)
    with pytest.raises(Exception, match="ytdlp_rate"):
        job_spec(tmp_path, {"ytdlp_rate": 0})


# -- bare ids in plain URL lists -----------------------------------------------------------------
def planned_rows(tmp_path: Path, lines: list[str], media: str = "video", video: dict | None = None):
    """The rows of a .txt URL list as the job's input shards hold them."""
    from pipeline.download.ytdlp import bare_ids
    from pipeline.sources.shards import plan_shards, table_chunks

    (tmp_path / "urls.txt").write_text("".join(f"{line}\n" for line in lines))
    spec = load_job(data={"input": {"files": [str(tmp_path / "urls.txt")], "caption_col": None},
                          "download": {"media": media, "allow_private_addresses": True, "timeout": 10},
                          "video": {"ytdlp_rate": None, **(video or {})}})
    accepted = bare_ids(spec.download.media, ytdlp_options(spec))
    [shard] = plan_shards(table_chunks([str(tmp_path / "urls.txt")], spec.input), 100, bare_ids=accepted)
    return spec, shard.batch


def test_bare_youtube_ids_in_a_url_list_reach_ytdlp(youtube, server, tmp_path):
    youtube["vidBAREID01"] = "plain.mp4"
    spec, batch = planned_rows(tmp_path, ["vidBAREID01", "hello", server.url("bframes.mp4")])
    assert batch["status"] == [schema.PENDING, schema.INVALID_INPUT, schema.PENDING]
    assert batch["error_kind"][1] == "bad_scheme"  # a bare word that is no id is still refused
    batch = download_stage(spec).process(batch)
    assert batch["status"] == [schema.SUCCESS, schema.INVALID_INPUT, schema.SUCCESS], batch["error_message"]
    assert youtube.extracted == ["vidBAREID01"]
    assert batch["source_url"][0] == "https://www.youtube.com/watch?v=vidBAREID01"
    assert len(counters(batch, 0)) == 100  # the whole video behind the id


@pytest.mark.parametrize("media, video", [("image", None), ("video", {"backend": "http"})])
def test_bare_ids_are_refused_where_no_ytdlp_fetches_them(tmp_path, media, video):
    _, batch = planned_rows(tmp_path, ["vidBAREID02"], media, video)
    assert (batch["status"], batch["error_kind"]) == ([schema.INVALID_INPUT], ["bad_scheme"])


def test_the_default_format_merges_the_audio_only_when_clips_keep_it_and_ffmpeg_is_there(monkeypatch):
    from pipeline.download import ytdlp

    monkeypatch.setattr(ytdlp, "ffmpeg_location", lambda: "/usr/bin/ffmpeg")
    assert ytdlp.format_selector(audio=True).startswith("bv*[ext=mp4]+ba[ext=m4a]")
    assert "+" not in ytdlp.format_selector(audio=False)
    monkeypatch.setattr(ytdlp, "ffmpeg_location", lambda: None)
    assert "+" not in ytdlp.format_selector(audio=True)  # no merge without ffmpeg: one file with sound, or none


def test_the_job_passes_its_own_format_or_the_default_for_its_audio_setting(tmp_path):
    from pipeline.download.ytdlp import format_selector
    from pipeline.job.build import ytdlp_options
    from pipeline.job.spec import load_job

    base = {"name": "yt", "input": {"files": [str(tmp_path / "ids.txt")]}, "download": {"media": "video"},
            "output": {"dir": str(tmp_path / "out")}}
    assert ytdlp_options(load_job(data=base)).format == format_selector(True)
    silent = load_job(data={**base, "video": {"audio": False}})
    assert ytdlp_options(silent).format == format_selector(False)
    own = load_job(data={**base, "video": {"ytdlp_format": "worst"}})
    assert ytdlp_options(own).format == "worst"

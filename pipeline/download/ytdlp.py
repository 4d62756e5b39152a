"""The yt-dlp backend of the video stage, for pages that need an extractor (YouTube, Vimeo...).

Which rows: ``video.backend: yt-dlp`` sends every row through yt-dlp; ``auto`` (the default) sends
the YouTube ones (:func:`youtube_url`: a watch, Shorts or youtu.be URL, or a bare 11-character id,
which becomes a watch URL) and fetches the others over HTTP, decided per row. ``job/build.py``
makes ``auto`` mean every row when the job's catalog card says its media are on YouTube. A plain
URL list of a video job with either yt-dlp backend may hold bare ids: :func:`bare_ids` tells the
input check (``sources/shards.py``) to let them through, where any other job refuses a bare word
(``bad_scheme``).

yt-dlp is an extra (``pip install 'mmcurate[ytdlp]'``); a job that needs it for every row fails
before any shard runs when it is missing, with a message that says what to install. A download
ends in a :class:`pipeline.fetch.FetchResult` like the HTTP backend's, with the same error kinds
where they apply and the yt-dlp kinds of :func:`failure_kind` (removed, private, geo-blocked,
bot-check, rate-limited, timeout), so the stage treats both alike.

Sections: when every clip of a video has a span, only the section covering them (plus a margin) is
fetched (yt-dlp's ``download_ranges``, which runs the ffmpeg on PATH; without one, the whole video);
the stage shifts the spans into the section and the clips back (:class:`Section`). One section per
video, not one per clip: one extraction per video is what YouTube's rate limits and bot checks
count, and a dataset's clips of one video (Panda-70M's shots) lie close together.

Caps: ``concurrency`` videos in flight per task and ``rate`` extractions started per second (a
token bucket), both held by the stage (:class:`Gate`); yt-dlp's own ``ratelimit`` (bytes/s) and
``sleep_interval`` where set. The byte cap and the timeout are enforced from yt-dlp's progress hook
(its own ``max_filesize`` only sees a declared size); a section goes through ffmpeg, capped by its
``-fs`` and ``-rw_timeout``. Safety: the page URL's host is vetted by the stage (private addresses)
before yt-dlp runs, YouTube's own hosts excepted; the media URLs yt-dlp extracts from the page, and
X-Robots-Tag headers, are not seen by mmcurate.
"""
from __future__ import annotations

import asyncio
import math
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from pipeline.core.config import ConfigError
from pipeline.core.schema import ErrorKind
from pipeline.fetch import FetchResult, sniff

INSTALL_HINT = "pip install 'mmcurate[ytdlp]'"
YOUTUBE_HOSTS = frozenset({"youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com",
                           "youtu.be", "youtube-nocookie.com", "www.youtube-nocookie.com"})
YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
WATCH_URL = "https://www.youtube.com/watch?v={}"
SECTION_MARGIN = 1.0  # seconds fetched either side of the clips: a copied section starts at a keyframe


def youtube_url(value: str) -> Optional[str]:
    """The URL to give yt-dlp for a YouTube id or URL; None when ``value`` is neither."""
    value = value.strip()
    if YOUTUBE_ID.fullmatch(value):
        return WATCH_URL.format(value)
    try:
        parts = urlsplit(value)
        host = (parts.hostname or "").lower()
    except ValueError:
        return None
    return value if parts.scheme in ("http", "https") and host in YOUTUBE_HOSTS else None


def is_youtube_id(value: str) -> bool:
    """Whether ``value`` is a bare YouTube video id (11 characters of ``[A-Za-z0-9_-]``)."""
    return YOUTUBE_ID.fullmatch(value.strip()) is not None


def bare_ids(media: str, options: Optional[YtdlpOptions]) -> Optional[Callable[[str], bool]]:
    """What a plain URL list of this job may hold besides http(s) URLs: bare YouTube ids on a video
    job whose backend is yt-dlp (``auto`` or ``yt-dlp``), which sends them to their watch page;
    None for any other job (an image job, or ``video.backend: http``), which refuses a bare word."""
    return is_youtube_id if media == "video" and options is not None else None


def require_ytdlp() -> None:
    """Raise a ConfigError naming the extra when yt-dlp cannot be imported."""
    try:
        import yt_dlp  # noqa: F401
    except ImportError:
        raise ConfigError(f"video.backend: this job fetches its videos with yt-dlp (backend 'yt-dlp', or 'auto' "
                          f"with a card whose media are on YouTube), which is not installed; install it with "
                          f"{INSTALL_HINT}, or use video.backend: http") from None


@dataclass(frozen=True)
class YtdlpOptions:
    format: str
    timeout: float          # seconds for the whole download (extraction included)
    max_bytes: int
    retries: int
    user_agent: str
    every_url: bool = True  # False (backend auto): only YouTube ids/URLs, the rest over HTTP
    sections: bool = True   # fetch only the section covering a video's clips
    force_keyframes_at_cuts: bool = False  # re-encode the section at its cuts rather than copy
    concurrency: int = 2    # videos in flight through yt-dlp, per task
    rate: Optional[float] = None        # extractions started per second, per task
    ratelimit: Optional[int] = None     # bytes per second per download (yt-dlp's ratelimit)
    sleep_interval: Optional[float] = None  # seconds yt-dlp sleeps before each download

    def handles(self, url: str) -> bool:
        """Whether ``url`` goes through yt-dlp (else over HTTP)."""
        return self.every_url or youtube_url(url) is not None


def format_selector(audio: bool) -> str:
    """The default format: the best mp4 video (one file, no merge) and, when the clips keep their
    audio and ffmpeg is there to merge, the best m4a audio with it (YouTube serves its good video
    formats without sound)."""
    video_only = "bv*[ext=mp4]/b[ext=mp4]/bv*/b"
    if audio and ffmpeg_location() is not None:
        return "bv*[ext=mp4]+ba[ext=m4a]/b[ext=mp4]/bv*+ba/b"
    return video_only


# -- caps ----------------------------------------------------------------------------------------
class TokenBucket:
    """At most ``rate`` acquisitions per second on average, bursts of ``burst`` (one event loop)."""

    def __init__(self, rate: float, burst: int = 1, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = asyncio.sleep) -> None:
        if rate <= 0:
            raise ValueError(f"rate: must be > 0, got {rate}")
        self.rate, self.burst, self.clock, self.sleep = rate, burst, clock, sleep
        self.tokens, self.stamp = float(burst), clock()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self.lock:  # first come, first served
            while True:
                now = self.clock()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await self.sleep((1 - self.tokens) / self.rate)


class Gate:
    """The yt-dlp caps of one task: videos in flight and extractions per second."""

    def __init__(self, options: YtdlpOptions) -> None:
        self.slots = asyncio.Semaphore(options.concurrency)
        self.bucket = TokenBucket(options.rate) if options.rate else None

    async def __aenter__(self) -> "Gate":
        await self.slots.acquire()
        try:
            if self.bucket is not None:
                await self.bucket.acquire()
        except BaseException:
            self.slots.release()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.slots.release()


# -- sections ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """The part of a source video that was fetched: file time 0 is source time ``start``."""
    start: float
    end: float
    source_duration: Optional[float] = None  # the whole video's, as yt-dlp reports it

    def to_file(self, span):
        """A source span in the section file's time."""
        return (span[0] - self.start, span[1] - self.start)

    def to_source(self, clip):
        """A clip cut from the section file, with its times in the source's."""
        return replace(clip, start=clip.start + self.start, end=clip.end + self.start)

    def source_info(self, info):
        """The probe of the section file, with the whole video's duration."""
        return replace(info, duration=self.source_duration)


def covering_section(spans: list) -> Optional[tuple[float, float]]:
    """The section to fetch for the clips with these spans; None (the whole video) when a clip has
    none, or an open or invalid one."""
    bounds = []
    for span in spans:
        start, end = span if span is not None else (None, None)
        start = 0.0 if start is None else start
        if end is None or not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
            return None
        bounds.append((start, end))
    if not bounds:
        return None
    return max(0.0, min(s for s, _ in bounds) - SECTION_MARGIN), max(e for _, e in bounds) + SECTION_MARGIN


def ffmpeg_location() -> Optional[str]:
    """The ffmpeg yt-dlp cuts sections with, None when there is none: the one on PATH (yt-dlp's
    check for partial downloads looks only there, whatever its ffmpeg_location says)."""
    return shutil.which("ffmpeg")


# -- the download --------------------------------------------------------------------------------
class _Quiet:
    """yt-dlp logger: keep the last error line for the message, print nothing."""

    def __init__(self) -> None:
        self.last_error = ""

    def debug(self, msg: str) -> None:
        pass

    info = warning = debug

    def error(self, msg: str) -> None:
        self.last_error = msg


def _cap_hook(options: YtdlpOptions, started: float):
    from yt_dlp.utils import DownloadCancelled

    class _CapReached(DownloadCancelled):
        pass

    def hook(progress: dict) -> None:
        got = progress.get("downloaded_bytes") or 0
        if got > options.max_bytes:
            raise _CapReached(f"too_large: body exceeds {options.max_bytes} bytes")
        if time.monotonic() - started > options.timeout:
            raise _CapReached(f"timeout: no complete download in {options.timeout:.3g} s")

    return hook


def _params(options: YtdlpOptions, dest_dir: Path, logger: _Quiet, started: float,
            section: Optional[tuple[float, float]]) -> dict:
    params = {
        "outtmpl": {"default": str(dest_dir / "source.%(ext)s")}, "format": options.format,
        "quiet": True, "no_warnings": True, "noprogress": True, "noplaylist": True, "playlistend": 1,
        "socket_timeout": options.timeout, "retries": options.retries, "fragment_retries": options.retries,
        "extractor_retries": 0, "max_filesize": options.max_bytes, "cachedir": False, "logger": logger,
        "http_headers": {"User-Agent": options.user_agent}, "progress_hooks": [_cap_hook(options, started)],
        "overwrites": True, "updatetime": False,
        "merge_output_format": "mp4",  # a video and an audio format merged (format_selector) stay MP4
    }
    if options.ratelimit:
        params["ratelimit"] = options.ratelimit
    if options.sleep_interval:
        params["sleep_interval"] = options.sleep_interval
    if section is not None:
        from yt_dlp.utils import download_range_func

        params.update({
            "download_ranges": download_range_func(None, [section]),
            "force_keyframes_at_cuts": options.force_keyframes_at_cuts, "ffmpeg_location": ffmpeg_location(),
            # ffmpeg: give up on a stalled read, stop writing at the byte cap
            "external_downloader_args": {"ffmpeg_i": ["-rw_timeout", str(int(options.timeout * 1e6))],
                                         "ffmpeg_o": ["-fs", str(options.max_bytes)]}})
    return params


def download(url: str, dest_dir: Path, options: YtdlpOptions,
             section: Optional[tuple[float, float]] = None) -> tuple[FetchResult, Optional[Section]]:
    """Fetch the video behind ``url`` (a YouTube id becomes its watch URL) into ``dest_dir``, only
    ``section`` (source seconds) of it when given and ffmpeg is there (blocking: run it in a thread).
    The Section says which part the file holds; None: the whole video."""
    try:
        import yt_dlp
        from yt_dlp.utils import DownloadCancelled, DownloadError
    except ImportError:
        return FetchResult(url=url, error_kind=ErrorKind.YTDLP_ERROR,
                           error_message=f"this URL needs yt-dlp, which is not installed: {INSTALL_HINT}"), None
    if section is not None and (not options.sections or ffmpeg_location() is None):
        section = None  # the whole video; the stage cuts the clips from it
    started = time.monotonic()
    logger = _Quiet()
    page = youtube_url(url) or url
    try:
        with yt_dlp.YoutubeDL(_params(options, dest_dir, logger, started, section)) as ydl:
            info = ydl.extract_info(page, download=True)
    except DownloadCancelled as e:  # our cap hook: "kind: message"
        kind, _, message = str(e).partition(": ")
        if kind not in (ErrorKind.TOO_LARGE, ErrorKind.TIMEOUT):
            kind, message = ErrorKind.YTDLP_ERROR, str(e)
        return FetchResult(url=url, error_kind=kind, error_message=message), None
    except DownloadError as e:
        return _failure(url, e), None
    path = _downloaded_path(info, dest_dir)
    if path is None:  # yt-dlp skips, without raising, a format whose declared size is over the cap
        kind = ErrorKind.TOO_LARGE if "max-filesize" in logger.last_error or _declared_too_large(info, options) \
            else failure_kind(logger.last_error) if logger.last_error else ErrorKind.YTDLP_ERROR
        return FetchResult(url=url, error_kind=kind, error_message=logger.last_error or "nothing was downloaded"), None
    if section is not None and path.stat().st_size >= options.max_bytes:  # ffmpeg stopped at -fs
        return FetchResult(url=url, error_kind=ErrorKind.TOO_LARGE,
                           error_message=f"the section exceeds {options.max_bytes} bytes"), None
    with open(path, "rb") as f:
        media_type = sniff(f.read(512))
    if media_type is None or not media_type.startswith("video/"):
        return FetchResult(url=url, error_kind=ErrorKind.NOT_MEDIA,
                           error_message=f"yt-dlp fetched {media_type or 'non-video bytes'}"), None
    got = FetchResult(url=url, ok=True, path=str(path), media_type=media_type,
                      final_url=(info or {}).get("webpage_url") or page, attempts=1)
    if section is None:
        return got, None
    # the section's own info says its length; the extraction's, the whole video's
    return got, Section(section[0], section[1], (info or {}).get("duration"))


def _downloaded_path(info: Optional[dict], dest_dir: Path) -> Optional[Path]:
    for entry in (info or {}).get("requested_downloads") or ():
        path = entry.get("filepath")
        if path and Path(path).is_file():
            return Path(path)
    found = sorted(p for p in dest_dir.glob("source.*") if not p.name.endswith((".part", ".ytdl")))
    return found[0] if found else None


def _declared_too_large(info: Optional[dict], options: YtdlpOptions) -> bool:
    size = (info or {}).get("filesize") or (info or {}).get("filesize_approx") or 0
    return size > options.max_bytes


# -- failures ------------------------------------------------------------------------------------
# What YouTube's pages and yt-dlp say, lowercased, per kind; tried in this order (a removed video's
# "Video unavailable" also heads the private, geo-blocked and rate-limited messages).
FAILURE_PHRASES: tuple[tuple[ErrorKind, tuple[str, ...]], ...] = (
    (ErrorKind.RATE_LIMITED, ("http error 429", "too many requests", "rate-limited", "rate limited",
                              "try again later")),
    (ErrorKind.BOT_CHECK, ("confirm you're not a bot", "confirm you are not a bot", "captcha")),
    (ErrorKind.VIDEO_PRIVATE, ("private video", "video is private")),
    (ErrorKind.GEO_BLOCKED, ("in your country", "from your location", "geo restrict", "geo-restrict")),
    (ErrorKind.VIDEO_REMOVED, ("video unavailable", "video is unavailable", "has been removed",
                               "removed by the uploader", "account associated with this video has been terminated",
                               "no longer available", "video does not exist")),
    (ErrorKind.TIMEOUT, ("timed out", "timeout")),
)


def failure_kind(message: str) -> Optional[ErrorKind]:
    """The error kind a yt-dlp message names; None when it names none of them."""
    text = message.lower().replace("\u2019", "'")  # YouTube writes "you’re"
    for kind, phrases in FAILURE_PHRASES:
        if any(p in text for p in phrases):
            return kind
    return None


def _failure(url: str, error) -> FetchResult:
    """Map a yt-dlp DownloadError to an error kind: the yt-dlp taxonomy first, then the HTTP
    backend's kinds, else ytdlp_error."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError
    from yt_dlp.utils import GeoRestrictedError, UnsupportedError

    cause = error.exc_info[1] if getattr(error, "exc_info", None) else None
    message = str(error).removeprefix("ERROR: ")[:500]
    status = cause.status if isinstance(cause, HTTPError) else None
    if status == 429:
        return FetchResult(url=url, error_kind=ErrorKind.RATE_LIMITED, error_message=message, http_status=status)
    if isinstance(cause, GeoRestrictedError):
        return FetchResult(url=url, error_kind=ErrorKind.GEO_BLOCKED, error_message=message)
    if status is not None:
        return FetchResult(url=url, error_kind=ErrorKind.HTTP_STATUS, error_message=message, http_status=status)
    if isinstance(cause, UnsupportedError):
        return FetchResult(url=url, error_kind=ErrorKind.NOT_MEDIA, error_message=message)
    kind = failure_kind(message)
    if kind is None and isinstance(cause, TransportError):
        kind = ErrorKind.CONNECTION
    return FetchResult(url=url, error_kind=kind or ErrorKind.YTDLP_ERROR, error_message=message)

"""The optional yt-dlp backend of the video stage, for pages that need an extractor (YouTube, Vimeo...).

yt-dlp is an extra (``pip install 'mmcurate[ytdlp]'``); a job that asks for it without it installed
fails before any shard runs, with a message that says what to install. A download ends in a
:class:`pipeline.fetch.FetchResult` like the HTTP backend's, with the same error kinds where they
apply, so the stage treats both alike.

Caps: the byte cap and the timeout are enforced from yt-dlp's progress hook (its own
``max_filesize`` only sees a declared size); the body is streamed to disk by yt-dlp. Safety: the
page URL's host is vetted by the stage (private addresses) before yt-dlp runs; the media URLs
yt-dlp extracts from the page, and X-Robots-Tag headers, are not seen by mmcurate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.core.config import ConfigError
from pipeline.core.schema import ErrorKind
from pipeline.fetch import FetchResult, sniff

INSTALL_HINT = "pip install 'mmcurate[ytdlp]'"


def require_ytdlp() -> None:
    """Raise a ConfigError naming the extra when yt-dlp cannot be imported."""
    try:
        import yt_dlp  # noqa: F401
    except ImportError:
        raise ConfigError(f"video.backend: 'yt-dlp' needs the yt-dlp package, which is not installed; "
                          f"install it with {INSTALL_HINT}, or use video.backend: http") from None


@dataclass(frozen=True)
class YtdlpOptions:
    format: str
    timeout: float          # seconds for the whole download (extraction included)
    max_bytes: int
    retries: int
    user_agent: str


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


def download(url: str, dest_dir: Path, options: YtdlpOptions) -> FetchResult:
    """Fetch the video behind ``url`` into ``dest_dir`` (blocking: run it in a thread)."""
    import yt_dlp
    from yt_dlp.utils import DownloadCancelled, DownloadError

    started = time.monotonic()
    logger = _Quiet()
    params = {
        "outtmpl": {"default": str(dest_dir / "source.%(ext)s")}, "format": options.format,
        "quiet": True, "no_warnings": True, "noprogress": True, "noplaylist": True, "playlistend": 1,
        "socket_timeout": options.timeout, "retries": options.retries, "fragment_retries": options.retries,
        "extractor_retries": 0, "max_filesize": options.max_bytes, "cachedir": False, "logger": logger,
        "http_headers": {"User-Agent": options.user_agent}, "progress_hooks": [_cap_hook(options, started)],
        "overwrites": True, "updatetime": False,
    }
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            info = ydl.extract_info(url, download=True)
    except DownloadCancelled as e:  # our cap hook: "kind: message"
        kind, _, message = str(e).partition(": ")
        if kind not in (ErrorKind.TOO_LARGE, ErrorKind.TIMEOUT):
            kind, message = ErrorKind.YTDLP_ERROR, str(e)
        return FetchResult(url=url, error_kind=kind, error_message=message)
    except DownloadError as e:
        return _failure(url, e)
    path = _downloaded_path(info, dest_dir)
    if path is None:  # yt-dlp skips, without raising, a format whose declared size is over the cap
        kind = ErrorKind.TOO_LARGE if "max-filesize" in logger.last_error or _declared_too_large(info, options) \
            else ErrorKind.YTDLP_ERROR
        return FetchResult(url=url, error_kind=kind, error_message=logger.last_error or "nothing was downloaded")
    with open(path, "rb") as f:
        media_type = sniff(f.read(512))
    if media_type is None or not media_type.startswith("video/"):
        return FetchResult(url=url, error_kind=ErrorKind.NOT_MEDIA, error_message=f"yt-dlp fetched {media_type or 'non-video bytes'}")
    return FetchResult(url=url, ok=True, path=str(path), media_type=media_type,
                       final_url=(info or {}).get("webpage_url") or url, attempts=1)


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


def _failure(url: str, error) -> FetchResult:
    """Map a yt-dlp DownloadError to the download error kinds the HTTP backend uses."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError
    from yt_dlp.utils import UnsupportedError

    cause = error.exc_info[1] if getattr(error, "exc_info", None) else None
    message = str(error).removeprefix("ERROR: ")[:500]
    if isinstance(cause, HTTPError):
        return FetchResult(url=url, error_kind=ErrorKind.HTTP_STATUS, error_message=message, http_status=cause.status)
    if isinstance(cause, UnsupportedError):
        return FetchResult(url=url, error_kind=ErrorKind.NOT_MEDIA, error_message=message)
    if isinstance(cause, TransportError) or "timed out" in message:
        kind = ErrorKind.TIMEOUT if "timed out" in message.lower() else ErrorKind.CONNECTION
        return FetchResult(url=url, error_kind=kind, error_message=message)
    return FetchResult(url=url, error_kind=ErrorKind.YTDLP_ERROR, error_message=message)

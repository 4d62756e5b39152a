"""The video download stage: fetch each source video once, cut one clip per row, sample frames.

Rows are clips: a URL, a caption and optionally a span (``clip_start`` / ``clip_end`` in seconds,
absent or None for the whole video). Per shard the stage groups the pending rows by URL, streams
each video to a temporary file (never whole in memory; several downloads in flight on one event
loop), cuts its clips in a thread pool (PyAV and decord release the GIL), then deletes the file.
A video is on disk only from its download to the end of its cuts, and at most
``video.concurrency`` of them at once, so disk use is bounded too.

Each successful row gets ``files["mp4"]`` (H.264 MP4), optionally ``files["frames.npy"]`` (uint8
(T, H, W, 3)), and scalar columns for the parquet table and KEY.json: the span the clip really
covers (``clip_start``/``clip_end``; failed rows keep the requested span), ``duration``, ``fps``,
``width``/``height``, ``codec``, ``frame_count``, ``cut`` (remux or reencode), ``source_url`` (after
redirects), ``source_duration``/``source_fps``/``source_codec`` and ``original_width``/``original_height``.
``sha256`` is the hash of the clip's MP4 bytes. Failures end as per-row statuses (see
:mod:`pipeline.core.schema`); the output bytes depend only on the input, so resumed shards are identical.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from yarl import URL

from pipeline.core import schema
from pipeline.core.schema import Batch, ErrorKind
from pipeline.core.stage import ThreadPoolStage
from pipeline.download.ytdlp import YtdlpOptions, require_ytdlp
from pipeline.fetch import FetchConfig, Fetcher, FetchResult, ForbiddenAddress, normal_host
from pipeline.media.npy import npy_bytes
from pipeline.media.video import Clip, CutConfig, MediaError, SourceInfo, Span, probe_file, try_cut_clip

TMP_PREFIX = "mmcurate-video-"  # + pid: lets a later run delete what a killed one left
# Columns this stage fills (None where a row failed), with their Arrow types; created up front so
# every shard has them.
VIDEO_COLUMNS = {schema.CLIP_START: "double", schema.CLIP_END: "double", "duration": "double", "fps": "double",
                 "frame_count": "int32", "codec": "string", "cut": "string", "source_url": "string",
                 "source_duration": "double", "source_fps": "double", "source_codec": "string"}


@dataclass(frozen=True)
class VideoDownloadConfig:
    fetch: FetchConfig                     # media "video"; its concurrency: videos downloading or
    cut: CutConfig                         # being cut at once, per task
    tmp_dir: Optional[str] = None          # where sources are downloaded; None: the system temp dir
    ytdlp: Optional[YtdlpOptions] = None   # the yt-dlp backend's options; None: plain HTTP
    cpus: int = 1                          # threads cutting clips


class VideoDownloadStage(ThreadPoolStage):
    name = "download"

    def __init__(self, config: VideoDownloadConfig) -> None:
        super().__init__(config, config.cpus)

    @property
    def columns(self) -> dict[str, str]:
        return VIDEO_COLUMNS

    def check(self) -> None:
        if self.config.ytdlp is not None:
            require_ytdlp()  # fail at job start, not in every sample

    def process(self, batch: Batch) -> Batch:
        self.setup()
        for column in VIDEO_COLUMNS:
            batch.setdefault(column, [None] * schema.batch_len(batch))
        groups = group_by_url(batch)
        if groups:
            tmp_dir = self.config.tmp_dir
            sweep_stale_dirs(tmp_dir)
            with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=tmp_dir) as tmp:
                asyncio.run(self._run(batch, groups, Path(tmp)))
        return batch

    # -- per video -------------------------------------------------------------------------------
    async def _run(self, batch: Batch, groups: dict[str, list[int]], tmp: Path) -> None:
        # One slot per video from its download to its last clip: bounds videos on disk. A video
        # waiting to retry (Retry-After) has nothing on disk and gives its slot up meanwhile.
        slots = asyncio.Semaphore(self.config.fetch.concurrency)
        async with Fetcher(self.config.fetch) as fetcher:

            async def one(n: int, url: str, rows: list[int]) -> None:
                async with slots:
                    workdir = tmp / f"{n:06d}"
                    workdir.mkdir()
                    try:
                        await self._video(fetcher, batch, url, rows, workdir, slots)
                    finally:
                        _remove_tree(workdir)

            await asyncio.gather(*(one(n, url, rows) for n, (url, rows) in enumerate(groups.items())))

    async def _video(self, fetcher: Fetcher, batch: Batch, url: str, rows: list[int], workdir: Path,
                     slot: asyncio.Semaphore) -> None:
        got = await self._download(fetcher, url, workdir, slot)
        if not got.ok:
            for i in rows:
                schema.mark(batch, i, got.error_kind or ErrorKind.CONNECTION, got.error_message or "")
            return
        loop = asyncio.get_running_loop()
        try:
            info = await loop.run_in_executor(self._pool, probe_file, got.path, self.config.cut.max_pixels)
        except MediaError as e:
            for i in rows:
                record(batch, i, got, None, e)
            return
        # Clips are cut in parallel: one video may hold most of a shard's clips (Panda-70M).
        results = await asyncio.gather(*(
            loop.run_in_executor(self._pool, try_cut_clip, got.path, info, span_of(batch, i), self.config.cut,
                                 workdir / f"clip{i}.mp4") for i in rows))
        for i, result in zip(rows, results):
            record(batch, i, got, info, result)

    async def _download(self, fetcher: Fetcher, url: str, workdir: Path, slot: asyncio.Semaphore) -> FetchResult:
        if self.config.ytdlp is None:
            return await fetcher.get_to_file(url, str(workdir / "source"), slot=slot)
        refused = await _vet_host(fetcher, url)
        if refused is not None:
            return refused
        from pipeline.download.ytdlp import download

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, download, url, workdir, self.config.ytdlp)


# -- batch helpers -------------------------------------------------------------------------------
def group_by_url(batch: Batch) -> dict[str, list[int]]:
    """Pending rows by URL, in first-appearance order (many clips of one video share a download)."""
    groups: dict[str, list[int]] = {}
    for i in schema.alive(batch):
        if batch[schema.STATUS][i] == schema.PENDING:
            groups.setdefault(batch[schema.URL][i], []).append(i)
    return groups


def span_of(batch: Batch, i: int) -> Span:
    """Row ``i``'s span in seconds, or None (the whole video) when it has none."""
    starts, ends = batch.get(schema.CLIP_START), batch.get(schema.CLIP_END)
    start = _seconds(None if starts is None else starts[i])
    end = _seconds(None if ends is None else ends[i])
    return None if start is None and end is None else (start, end)


def _seconds(value: Any) -> Optional[float]:
    """Seconds as a float; None and NaN (a missing value in CSV or pandas) mean no bound."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return -1.0  # not a number: resolve_span reports it as bad_span
    return None if math.isnan(seconds) else seconds


def record(batch: Batch, i: int, got: FetchResult, info: Optional[SourceInfo],
           result: Union[Clip, MediaError]) -> None:
    """Write one clip (or its failure) into row ``i``."""
    batch["source_url"][i] = got.final_url or batch[schema.URL][i]
    if info is not None:
        batch[schema.ORIGINAL_WIDTH][i], batch[schema.ORIGINAL_HEIGHT][i] = info.width, info.height
        batch["source_duration"][i] = None if info.duration is None else round(info.duration, 6)
        batch["source_fps"][i] = round(float(info.fps), 6)
        batch["source_codec"][i] = info.codec
    if isinstance(result, MediaError):
        schema.mark(batch, i, result.kind, result.message)
        return
    batch[schema.FILES][i]["mp4"] = result.data
    if result.frames is not None:
        batch[schema.FILES][i]["frames.npy"] = npy_bytes(result.frames)
    batch[schema.SHA256][i] = hashlib.sha256(result.data).hexdigest()
    batch[schema.WIDTH][i], batch[schema.HEIGHT][i] = result.width, result.height
    values = {"clip_start": round(result.start, 6), "clip_end": round(result.end, 6),
              "duration": round(result.duration, 6), "fps": round(result.fps, 6),
              "frame_count": result.frame_count, "codec": result.codec, "cut": result.method}
    for column, value in values.items():
        batch[column][i] = value
    batch[schema.STATUS][i] = schema.SUCCESS


async def _vet_host(fetcher: Fetcher, url: str) -> Optional[FetchResult]:
    """The fetcher's address policy, for a URL handed to yt-dlp; None when it may be fetched."""
    try:
        host = URL(url).raw_host
        if host:
            normal_host(host)  # a..example, a label over 63 characters: the same bad_url as over HTTP
    except (ValueError, UnicodeError) as e:
        return FetchResult(url=url, error_kind=ErrorKind.BAD_URL, error_message=str(e))
    if not host:
        return FetchResult(url=url, error_kind=ErrorKind.BAD_URL, error_message=f"no host in {url[:200]!r}")
    try:
        await fetcher.resolver.addresses(host)
    except ForbiddenAddress as e:
        return FetchResult(url=url, error_kind=ErrorKind.FORBIDDEN_ADDRESS, error_message=str(e))
    except OSError as e:
        return FetchResult(url=url, error_kind=ErrorKind.DNS, error_message=f"cannot resolve {host}: {e}")
    return None


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def sweep_stale_dirs(tmp_dir: Optional[str]) -> None:
    """Delete the download directories of processes that died without cleaning up (SIGKILL).

    The directory name carries the owner's pid; a live pid (even a reused one) keeps its directory.
    """
    for path in Path(tmp_dir or tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        pid = path.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove_tree(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True

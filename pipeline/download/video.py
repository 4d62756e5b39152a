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
redirects), ``source_duration``/``source_fps``/``source_codec`` and ``original_width``/``original_height``
(sizes as displayed: a source's rotation metadata applied), and the clip's audio track
``audio_codec``/``audio_rate``/``audio_channels`` (None when it has none: the source had none, or
``video.audio`` is off; :mod:`pipeline.media.audio`).
``sha256`` is the hash of the clip's MP4 bytes. Failures end as per-row statuses (see
:mod:`pipeline.core.schema`); the output bytes depend only on the input, so resumed shards are identical.

With ``scenes`` a row without a span is cut at its shot boundaries into several clips, members
``clip_000.mp4``, ... of its one sample (the rule and why: :mod:`pipeline.media.scenes`); its
columns then describe them together: ``clip_start`` of the first, ``clip_end`` of the last,
``duration`` and ``frame_count`` summed, ``sha256`` of their MP4 bytes one after the other, the
size, fps, codec and audio of the first, and ``scenes`` one entry per clip. A video whose scenes are all
shorter than ``min_clip`` is filtered (error kind ``scenes``). With ``motion`` every clip gets
``motion_score`` (a scene row: its least moving clip's); with ``min_motion`` a clip below it is
dropped, and a row left without a clip is filtered (error kind ``motion``).
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

import pyarrow as pa
from yarl import URL

from pipeline.core import schema
from pipeline.core.schema import Batch, ErrorKind
from pipeline.core.stage import ThreadPoolStage
from pipeline.download.ytdlp import Gate, Section, YtdlpOptions, covering_section, require_ytdlp, youtube_url
from pipeline.fetch import FetchConfig, Fetcher, FetchResult, ForbiddenAddress, normal_host
from pipeline.media.npy import npy_bytes
from pipeline.media.scenes import SceneConfig, detect_cuts, motion_score, scene_summary, scene_spans
from pipeline.media.video import Clip, CutConfig, MediaError, SourceInfo, Span, probe_file, try_cut_clip

TMP_PREFIX = "mmcurate-video-"  # + pid: lets a later run delete what a killed one left
# Columns this stage fills (None where a row failed), with their Arrow types; created up front so
# every shard has them.
VIDEO_COLUMNS = {schema.CLIP_START: "double", schema.CLIP_END: "double", "duration": "double", "fps": "double",
                 "frame_count": "int32", "codec": "string", "cut": "string", "source_url": "string",
                 "source_duration": "double", "source_fps": "double", "source_codec": "string",
                 "audio_codec": "string", "audio_rate": "int32", "audio_channels": "int32"}
MOTION_COLUMNS = {"motion_score": "double"}
SCENE_TYPE = pa.list_(pa.struct([("start", pa.float64()), ("end", pa.float64()), ("frame_count", pa.int32()),
                                 ("motion_score", pa.float64())]))
SCENE_COLUMNS = {"scenes": SCENE_TYPE}  # one entry per clip of a row cut into scenes
MOTION_FILTER, SCENES_FILTER = "motion", "scenes"  # error kinds of the rows these rules drop


@dataclass(frozen=True)
class VideoDownloadConfig:
    fetch: FetchConfig                     # media "video"; its concurrency: videos downloading or
    cut: CutConfig                         # being cut at once, per task
    tmp_dir: Optional[str] = None          # where sources are downloaded; None: the system temp dir
    ytdlp: Optional[YtdlpOptions] = None   # the yt-dlp backend's options; None: plain HTTP
    cpus: int = 1                          # threads cutting clips
    scenes: Optional[SceneConfig] = None   # cut rows without a span at their shot boundaries
    motion: bool = False                   # score each clip's motion (motion_score)
    min_motion: Optional[float] = None     # clips moving less are dropped (implies motion)

    @property
    def scores_motion(self) -> bool:
        return self.motion or self.min_motion is not None


class VideoDownloadStage(ThreadPoolStage):
    name = "download"

    def __init__(self, config: VideoDownloadConfig) -> None:
        super().__init__(config, config.cpus)

    @property
    def columns(self) -> dict[str, str]:
        return {**VIDEO_COLUMNS, **schema.DOWNLOAD_COLUMNS, **self._rule_columns()}

    def _rule_columns(self) -> dict[str, Any]:
        """Only jobs that ask for scenes or motion get their columns (others' KEY.json unchanged)."""
        return {**(MOTION_COLUMNS if self.config.scores_motion else {}),
                **(SCENE_COLUMNS if self.config.scenes is not None else {})}

    def check(self) -> None:
        if self.config.ytdlp is not None and self.config.ytdlp.every_url:
            require_ytdlp()  # fail at job start, not in every sample

    def process(self, batch: Batch) -> Batch:
        self.setup()
        for column in (*VIDEO_COLUMNS, *self._rule_columns()):
            batch.setdefault(column, [None] * schema.batch_len(batch))
        schema.count_attempt(batch, schema.alive(batch))
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
        gate = Gate(self.config.ytdlp) if self.config.ytdlp is not None else None  # yt-dlp's own caps
        async with Fetcher(self.config.fetch) as fetcher:

            async def one(n: int, url: str, rows: list[int]) -> None:
                async with slots:
                    workdir = tmp / f"{n:06d}"
                    workdir.mkdir()
                    try:
                        await self._video(fetcher, batch, url, rows, workdir, slots, gate)
                    finally:
                        _remove_tree(workdir)

            await asyncio.gather(*(one(n, url, rows) for n, (url, rows) in enumerate(groups.items())))

    async def _video(self, fetcher: Fetcher, batch: Batch, url: str, rows: list[int], workdir: Path,
                     slot: asyncio.Semaphore, gate: Optional[Gate] = None) -> None:
        got, section = await self._download(fetcher, url, workdir, slot, gate, [span_of(batch, i) for i in rows])
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
        scene_rows = [i for i in rows if self.config.scenes is not None and span_of(batch, i) is None]
        span_rows = [i for i in rows if i not in scene_rows]
        # Clips are cut in parallel: one video may hold most of a shard's clips (Panda-70M).
        results = await asyncio.gather(*(
            loop.run_in_executor(self._pool, self._cut, got.path, info, _file_span(batch, i, section),
                                 workdir / f"clip{i}.mp4")
            for i in span_rows))
        if section is not None:  # cut in the section's time, recorded in the source's
            info = section.source_info(info)
            results = [section.to_source(r) if isinstance(r, Clip) else r for r in results]
        for i, result in zip(span_rows, results):
            record(batch, i, got, info, result)
            if isinstance(result, Clip):
                self._judge_motion(batch, i, result.motion)
        if scene_rows:
            clips = await self._scenes(got.path, info, workdir)
            for i in scene_rows:
                self._record_scenes(batch, i, got, info, clips)

    def _cut(self, path: Path, info: SourceInfo, span: Span, out_path: Path) -> Union[Clip, MediaError]:
        """One clip, with its motion score when the job asks for it."""
        clip = try_cut_clip(path, info, span, self.config.cut, out_path)
        if isinstance(clip, Clip) and self.config.scores_motion:
            try:
                clip.motion = motion_score(clip.data)
            except MediaError as e:
                return e
        return clip

    async def _scenes(self, path: Path, info: SourceInfo, workdir: Path) -> Union[list[Clip], MediaError, str]:
        """The video's scene clips in time order; a MediaError, or why there is none (a str)."""
        loop = asyncio.get_running_loop()
        config = self.config.scenes
        try:
            cuts = await loop.run_in_executor(self._pool, detect_cuts, path, config, self.config.cut.decode_threads)
        except MediaError as e:
            return e
        spans = scene_spans(cuts, config)
        if not spans:
            return f"no scene lasts min_clip {config.min_clip}s (cuts at {cuts.times[:20]}s, end {cuts.end}s)"
        clips = await asyncio.gather(*(loop.run_in_executor(self._pool, self._cut, path, info, span,
                                                            workdir / f"scene{n}.mp4")
                                       for n, span in enumerate(spans)))
        failed = next((c for c in clips if isinstance(c, MediaError)), None)
        return failed if failed is not None else list(clips)

    def _record_scenes(self, batch: Batch, i: int, got: FetchResult, info: SourceInfo,
                       clips: Union[list[Clip], MediaError, str]) -> None:
        if isinstance(clips, str):
            record_source(batch, i, got, info)
            schema.reject(batch, i, SCENES_FILTER, clips)
            return
        if isinstance(clips, MediaError):
            record(batch, i, got, info, clips)
            return
        floor = self.config.min_motion
        kept = [c for c in clips if floor is None or c.motion >= floor]
        record_scene_clips(batch, i, got, info, kept or clips)
        if not kept:
            schema.reject(batch, i, MOTION_FILTER, f"every clip moves less than min_motion {floor} "
                                                   f"(most: {max(c.motion for c in clips):.3f})")

    def _judge_motion(self, batch: Batch, i: int, motion: Optional[float]) -> None:
        if motion is None:
            return
        batch["motion_score"][i] = motion
        floor = self.config.min_motion
        if floor is not None and motion < floor:
            schema.reject(batch, i, MOTION_FILTER, f"motion_score {motion:.3f} < min_motion {floor}")

    async def _download(self, fetcher: Fetcher, url: str, workdir: Path, slot: asyncio.Semaphore,
                        gate: Optional[Gate], spans: list[Span]) -> tuple[FetchResult, Optional[Section]]:
        """The source in ``workdir``; through yt-dlp, maybe only the Section covering ``spans``."""
        ytdlp = self.config.ytdlp
        if ytdlp is None or not ytdlp.handles(url):
            return await fetcher.get_to_file(url, str(workdir / "source"), slot=slot), None
        refused = await _vet_host(fetcher, url)
        if refused is not None:
            return refused, None
        from pipeline.download.ytdlp import download

        loop = asyncio.get_running_loop()
        async with gate:
            return await loop.run_in_executor(None, download, url, workdir, ytdlp, covering_section(spans))


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


def _file_span(batch: Batch, i: int, section: Optional[Section]) -> Span:
    """Row ``i``'s span in the downloaded file's time (a section starts later than the source)."""
    span = span_of(batch, i)
    return span if section is None else section.to_file(span)


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
    record_source(batch, i, got, info)
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
              "frame_count": result.frame_count, "codec": result.codec, "cut": result.method,
              "audio_codec": result.audio_codec, "audio_rate": result.audio_rate,
              "audio_channels": result.audio_channels}
    for column, value in values.items():
        batch[column][i] = value
    batch[schema.STATUS][i] = schema.SUCCESS


def record_source(batch: Batch, i: int, got: FetchResult, info: Optional[SourceInfo]) -> None:
    """Where row ``i``'s video came from and what it is."""
    batch["source_url"][i] = got.final_url or batch[schema.URL][i]
    if info is not None:
        batch[schema.ORIGINAL_WIDTH][i], batch[schema.ORIGINAL_HEIGHT][i] = info.display_size
        batch["source_duration"][i] = None if info.duration is None else round(info.duration, 6)
        batch["source_fps"][i] = round(float(info.fps), 6)
        batch["source_codec"][i] = info.codec


def record_scene_clips(batch: Batch, i: int, got: FetchResult, info: SourceInfo, clips: list[Clip]) -> None:
    """Write the scene clips of row ``i``: members clip_NNN.mp4, columns summing them up."""
    record(batch, i, got, info, clips[0])  # the source's and the first clip's columns
    files = batch[schema.FILES][i]
    files.pop("mp4", None)
    files.pop("frames.npy", None)
    for n, clip in enumerate(clips):
        files[f"clip_{n:03d}.mp4"] = clip.data
        if clip.frames is not None:
            files[f"clip_{n:03d}.frames.npy"] = npy_bytes(clip.frames)
    batch["cut"][i] = "+".join(sorted({c.method for c in clips}))
    batch["scenes"][i] = [{"start": round(c.start, 6), "end": round(c.end, 6), "frame_count": c.frame_count,
                           "motion_score": c.motion} for c in clips]
    for column, value in scene_summary(batch["scenes"][i], [c.data for c in clips]).items():
        if column in batch:
            batch[column][i] = value


async def _vet_host(fetcher: Fetcher, url: str) -> Optional[FetchResult]:
    """The fetcher's address policy, for a URL handed to yt-dlp; None when it may be fetched.
    YouTube's own hosts (and bare ids) are public: no lookup."""
    if youtube_url(url) is not None:
        return None
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

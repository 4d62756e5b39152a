"""Build a job's parts from its spec: the input shards, the stages, the sink and the executor.

This is the only module that reads a :class:`~pipeline.job.spec.JobSpec` to make things. Every
part gets a config object of its own, built here field by field (so renaming a spec field is an
error here, never a silent fall-back to a default somewhere else).
"""
from __future__ import annotations

from typing import Iterator, Optional

from pipeline.core import schema
from pipeline.core.stage import Stage
from pipeline.download.image import ImageDownloadConfig, ImageDownloadStage
from pipeline.download.video import VideoDownloadConfig, VideoDownloadStage
from pipeline.download.ytdlp import YtdlpOptions
from pipeline.executors import EXECUTORS, Executor
from pipeline.fetch import FetchConfig
from pipeline.job.spec import DownloadSpec, JobSpec
from pipeline.media.resize import ResizeConfig
from pipeline.media.video import CutConfig
from pipeline.sinks import Directory, WebDatasetSink
from pipeline.sources.formats import count_rows
from pipeline.sources.locations import expand_files
from pipeline.sources.shards import InputShard, plan_shards, table_chunks

DEFAULT_NUM_FRAMES = 8  # frames sampled per clip when neither num_frames nor frames_fps is set


# -- input ---------------------------------------------------------------------------------------
def input_files(spec: JobSpec) -> list[str]:
    """The files (or, for a catalog, the entries) that the job reads, in order."""
    options = spec.input.storage_options
    if not spec.input.catalog:
        return expand_files(spec.input.files, options)
    # Globs and URL folders are expanded here; local folders and hf:// entries are the card's to
    # resolve (its file patterns in a local copy, the Hub's cache when offline).
    return [f for e in spec.input.files
            for f in ([e] if e.startswith("hf://") else expand_files([e], options, folders="://" in e))]


def input_chunks(spec: JobSpec) -> Iterator[dict[str, list]]:
    """Column chunks with normalised names (url, caption, spans, extra columns), before validation:
    through the catalog card's reader, or straight from plain URL files."""
    if not spec.input.catalog:
        return table_chunks(input_files(spec), spec.input)
    from catalogs import load_card
    from catalogs.readers import read_rows

    return read_rows(load_card(spec.input.catalog), input_files(spec), spec.input)


def input_shards(spec: JobSpec) -> Iterator[InputShard]:
    return plan_shards(input_chunks(spec), spec.output.samples_per_shard, spec.input.limit)


def input_rows(spec: JobSpec) -> Optional[int]:
    """Input rows, when cheap to know (parquet footers, no catalog reshaping); else None."""
    if spec.input.catalog:
        return None
    options = spec.input.storage_options
    total = count_rows(expand_files(spec.input.files, options), spec.input.format, options)
    return total if total is None or spec.input.limit is None else min(total, spec.input.limit)


# -- stage configs -------------------------------------------------------------------------------
def fetch_config(download: DownloadSpec, media: str = "image", concurrency: Optional[int] = None) -> FetchConfig:
    return FetchConfig(
        timeout=download.timeout, retries=download.retries, max_bytes=download.max_bytes,
        concurrency=download.concurrency if concurrency is None else concurrency,
        per_host_limit=download.per_host_limit, per_address_limit=download.per_address_limit,
        max_retry_wait=download.max_retry_wait, sample_deadline=download.sample_deadline,
        max_bytes_in_flight=download.max_bytes_in_flight, user_agent=download.user_agent,
        respect_optouts=download.respect_optouts, allow_private_addresses=download.allow_private_addresses,
        allowed_networks=tuple(download.allowed_networks), media=media)


def resize_config(download: DownloadSpec) -> ResizeConfig:
    return ResizeConfig(
        image_size=download.image_size, resize_mode=download.resize_mode,
        resize_only_if_bigger=download.resize_only_if_bigger, encode_format=download.encode_format,
        encode_quality=download.encode_quality, min_image_size=download.min_image_size,
        max_image_area=download.max_image_area, max_aspect_ratio=download.max_aspect_ratio,
        max_pixels=download.max_pixels)


def cut_config(spec: JobSpec) -> CutConfig:
    """The video section, plus the download section's pixel cap."""
    v = spec.video
    num_frames = v.num_frames if v.num_frames is not None or v.frames_fps is not None else DEFAULT_NUM_FRAMES
    return CutConfig(resolution=v.resolution, fps=v.fps, precision=v.clip_precision, crf=v.crf, preset=v.preset,
                     max_duration=v.max_duration, max_pixels=spec.download.max_pixels,
                     store_frames=v.store_frames, num_frames=num_frames, frames_fps=v.frames_fps,
                     frames_size=v.frames_size, decode_threads=v.decode_threads)


def ytdlp_options(spec: JobSpec) -> Optional[YtdlpOptions]:
    """The yt-dlp backend's options; None for the plain HTTP backend."""
    if spec.video.backend != "yt-dlp":
        return None
    d = spec.download
    return YtdlpOptions(format=spec.video.ytdlp_format, timeout=d.timeout, max_bytes=d.max_bytes,
                        retries=d.retries, user_agent=d.user_agent)


def download_stage(spec: JobSpec) -> Stage:
    cpus = spec.execution.cpus_per_task
    if spec.download.media == "video":
        return VideoDownloadStage(VideoDownloadConfig(
            fetch=fetch_config(spec.download, "video", spec.video.concurrency), cut=cut_config(spec),
            tmp_dir=spec.video.tmp_dir, ytdlp=ytdlp_options(spec), cpus=cpus))
    return ImageDownloadStage(ImageDownloadConfig(fetch=fetch_config(spec.download),
                                                  resize=resize_config(spec.download), cpus=cpus))


# -- the job's parts -----------------------------------------------------------------------------
def build_stages(spec: JobSpec, check: bool = True) -> list[Stage]:
    """download (image or video) -> filters -> tokenizers, as the spec declares them. With
    ``check`` every stage checks, here in the driver, that what it needs exists."""
    from filters import build_filters
    from pipeline.tokenize import build_tokenizers

    download = download_stage(spec)
    if check:
        download.check()
    return [download, *build_filters(spec.filters, check), *build_tokenizers(spec.tokenize, check)]


def column_types(stages: list[Stage]) -> dict[str, str]:
    """The Arrow type of every status-table column: the schema's and those the stages declare."""
    types = dict(schema.COLUMN_TYPES)
    for stage in stages:
        types.update(stage.columns)
    return types


def build_sink(spec: JobSpec, stages: list[Stage]) -> WebDatasetSink:
    return WebDatasetSink(Directory(spec.output.dir, spec.output.storage_options), column_types(stages), spec.name)


def build_executor(spec: JobSpec) -> Executor:
    return EXECUTORS[spec.execution.engine](spec.execution)

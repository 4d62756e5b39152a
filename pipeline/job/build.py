"""Build a job's parts from its spec: the input shards, the stages, the sink and the executor.

This is the only module that reads a :class:`~pipeline.job.spec.JobSpec` to make things. Every
part gets a config object of its own, built here field by field (so renaming a spec field is an
error here, never a silent fall-back to a default somewhere else).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Optional

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.document import DocumentRule, for_documents
from pipeline.core.stage import Stage
from pipeline.download.document import DocumentCountStage, DocumentDownloadConfig, DocumentDownloadStage
from pipeline.download.image import ImageDownloadConfig, ImageDownloadStage
from pipeline.download.video import VideoDownloadConfig, VideoDownloadStage
from pipeline.download.ytdlp import YtdlpOptions, bare_ids, format_selector
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
    """The files (or, for a catalog, the entries; for ``input.shards``, the tars) that the job
    reads, in order."""
    options = spec.input.storage_options
    if spec.input.shards:
        from pipeline.sources.shard_input import expand_shards

        return expand_shards(spec.input.shards, options)
    if not spec.input.catalog:
        return expand_files(spec.input.files, options)
    # Globs and URL folders are expanded here; local folders and hf:// entries are the card's to
    # resolve (its file patterns in a local copy, the Hub's cache when offline).
    return [f for e in spec.input.files
            for f in ([e] if e.startswith("hf://") else expand_files([e], options, folders="://" in e))]


def reader_input(spec: JobSpec):
    """The input section as the readers see it: the extra columns the job keeps are the spec's
    ``save_additional_columns`` plus those its stages read (the hash column, metadata filters')."""
    from filters import build_filters

    wanted = list(spec.input.save_additional_columns)
    if spec.input.hash_col:
        wanted.append(spec.input.hash_col)
    for f in build_filters(spec.filters):
        wanted.extend(f.input_columns)
    return dataclasses.replace(spec.input, save_additional_columns=list(dict.fromkeys(wanted)))


def input_chunks(spec: JobSpec) -> Iterator[dict[str, list]]:
    """Column chunks with normalised names (url, caption, spans, extra columns), before validation:
    through the catalog card's reader, or straight from plain URL files (input shards: one chunk
    of each tar's columns, no media)."""
    if spec.input.shards:
        return _shard_columns(spec)
    if not spec.input.catalog:
        if spec.download.media == "document":
            return _document_chunks(spec)
        return table_chunks(input_files(spec), reader_input(spec))
    from catalogs import load_card
    from catalogs.readers import read_rows

    return read_rows(load_card(spec.input.catalog), input_files(spec), reader_input(spec),
                     documents=spec.download.media == "document")


def _document_chunks(spec: JobSpec) -> Iterator[dict[str, list]]:
    """Plain files of documents (jsonl/parquet rows in the form of pipeline.core.document): the
    ``document`` column (an object, or its JSON text), the page URL from ``input.url_col`` when the
    file has one, and the extra columns; a file without ``document`` is a ConfigError naming it."""
    from pipeline.sources.formats import INVALID, iter_records

    inp = reader_input(spec)
    wanted = list(dict.fromkeys([schema.DOCUMENT, inp.url_col, *inp.save_additional_columns]))
    for path in input_files(spec):
        for chunk in iter_records(path, inp.format, columns=wanted, storage_options=inp.storage_options):
            _has_document(path, chunk)
            n = len(next(iter(chunk.values())))
            out = {schema.URL: chunk.get(inp.url_col, [None] * n), schema.CAPTION: [None] * n}
            for col in inp.save_additional_columns:
                out[col] = chunk.get(col, [None] * n)
            out[schema.DOCUMENT] = [_parsed(v) for v in chunk.get(schema.DOCUMENT, [None] * n)]
            if INVALID in chunk:
                out[INVALID] = chunk[INVALID]
            yield out


def _parsed(value):
    """A document given as JSON text (a parquet string column) as its object; anything else as it is
    (the shard planner judges it)."""
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _has_document(path: str, chunk: dict[str, list]) -> None:
    from pipeline.sources.formats import INVALID

    if schema.DOCUMENT not in chunk and set(chunk) != {INVALID}:
        raise ConfigError(f"download.media: 'document' reads the column 'document' of each row; {path} has none "
                          f"(columns: {', '.join(c for c in chunk if c != INVALID)})")


def input_columns(spec: JobSpec, names: list[str]) -> Iterator[dict[str, list]]:
    """Chunks of only the input columns ``names`` over the whole input (the first ``input.limit``
    rows), e.g. for an exact percentile of a published score. Plain URL files are read for those
    columns alone, and a file without one is a ConfigError naming it; other inputs go through
    their reader."""
    limit, seen = spec.input.limit, 0
    if spec.input.catalog or spec.input.shards:
        chunks = ({n: c[n] for n in names if n in c} for c in input_chunks(spec))
    else:
        chunks = _plain_columns(spec, names)
    for chunk in chunks:
        n = len(next(iter(chunk.values()), []))
        if limit is not None:
            n = min(n, limit - seen)
        yield {k: v[:n] for k, v in chunk.items()}
        seen += n
        if limit is not None and seen >= limit:
            return


def _plain_columns(spec: JobSpec, names: list[str]) -> Iterator[dict[str, list]]:
    from pipeline.sources.formats import iter_records

    inp = spec.input
    for path in input_files(spec):
        first = True
        for chunk in iter_records(path, inp.format, columns=names, storage_options=inp.storage_options):
            if first:
                _has_columns(path, chunk, names)
                first = False
            rows = len(next(iter(chunk.values()), []))
            yield {n: chunk.get(n, [None] * rows) for n in names}


def check_input_columns(spec: JobSpec) -> None:
    """Every plain input file has the columns the metadata filters read (its first row is read:
    a parquet footer, a header line), so a wrong column fails before the job writes anything; a
    document job's files have the column ``document``."""
    from filters import build_filters
    from pipeline.sources.formats import iter_records

    if spec.input.catalog:  # a document job reads a card's documents, any other job its pairs
        from catalogs import load_card
        from catalogs.readers import reader_layout

        reader_layout(load_card(spec.input.catalog), documents=spec.download.media == "document")
    elif spec.download.media == "document" and not spec.input.shards:
        for path in input_files(spec):
            for chunk in iter_records(path, spec.input.format, columns=[schema.DOCUMENT], batch_rows=1,
                                      storage_options=spec.input.storage_options):
                _has_document(path, chunk)
                break
    names = list(dict.fromkeys(c for f in build_filters(spec.filters) if f.metadata_only for c in f.input_columns))
    if not names or spec.input.catalog or spec.input.shards:
        return
    for path in input_files(spec):
        for chunk in iter_records(path, spec.input.format, columns=names, batch_rows=1,
                                  storage_options=spec.input.storage_options):
            _has_columns(path, chunk, names)
            break


def _has_columns(path: str, chunk: dict[str, list], names: list[str]) -> None:
    from pipeline.sources.formats import INVALID

    missing = [n for n in names if n not in chunk]
    if missing and set(chunk) != {INVALID}:  # a row that did not parse says nothing of the columns
        raise ConfigError(f"input.files: {path} has no column {', '.join(map(repr, missing))} that a "
                          f"metadata filter reads (columns: {', '.join(c for c in chunk if c != INVALID)})")


def _shard_columns(spec: JobSpec) -> Iterator[dict[str, list]]:
    from pipeline.sources.shard_input import tar_rows

    for tar in input_files(spec):
        rows = [{k: v for k, v in r.items() if k not in (schema.FILES, schema.INPUT_MEMBERS)}
                for r in tar_rows(tar, spec.input.storage_options)]
        names = list(dict.fromkeys(k for r in rows for k in r))
        if rows:
            yield {n: [r.get(n) for r in rows] for n in names}


def input_shards(spec: JobSpec) -> Iterator[InputShard]:
    if spec.input.shards:
        from pipeline.sources.shard_input import plan_shard_input

        return plan_shard_input(input_files(spec), spec.output.samples_per_shard, spec.output.layout,
                                spec.input.limit, spec.input.storage_options)
    return plan_shards(input_chunks(spec), spec.output.samples_per_shard, spec.input.limit,
                       bare_ids(spec.download.media, ytdlp_options(spec)))


def input_rows(spec: JobSpec) -> Optional[int]:
    """Input rows, when cheap to know (parquet footers, no catalog reshaping); else None."""
    if spec.input.catalog or spec.input.shards:
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
                     frames_size=v.frames_size, decode_threads=v.decode_threads, audio=v.audio,
                     audio_rate=v.audio_rate, audio_channels=v.audio_channels)


def ytdlp_options(spec: JobSpec) -> Optional[YtdlpOptions]:
    """The yt-dlp backend's options; None for the plain HTTP backend. ``auto`` sends every row
    through yt-dlp when the catalog card's media are on YouTube, else only YouTube ids/URLs."""
    v, d = spec.video, spec.download
    if v.backend == "http":
        return None
    every_url = v.backend == "yt-dlp" or _card_media(spec) == "youtube"
    return YtdlpOptions(format=v.ytdlp_format or format_selector(v.audio), timeout=d.timeout,
                        max_bytes=d.max_bytes, retries=d.retries, user_agent=d.user_agent, every_url=every_url,
                        sections=v.ytdlp_sections,
                        force_keyframes_at_cuts=v.ytdlp_force_keyframes, concurrency=v.ytdlp_concurrency,
                        rate=v.ytdlp_rate, ratelimit=v.ytdlp_ratelimit, sleep_interval=v.ytdlp_sleep)


def _card_media(spec: JobSpec) -> Optional[str]:
    if not spec.input.catalog:
        return None
    from catalogs import load_card

    return load_card(spec.input.catalog).metadata.media


def download_stage(spec: JobSpec) -> Stage:
    cpus = spec.execution.task_cpus()
    if spec.download.media == "video":
        return VideoDownloadStage(VideoDownloadConfig(
            fetch=fetch_config(spec.download, "video", spec.video.concurrency), cut=cut_config(spec),
            tmp_dir=spec.video.tmp_dir, ytdlp=ytdlp_options(spec), cpus=cpus, scenes=spec.video.scenes,
            motion=spec.video.motion, min_motion=spec.video.min_motion))
    if spec.download.media == "document":
        return DocumentDownloadStage(DocumentDownloadConfig(
            image=image_download_config(spec.download, spec.input.hash_col, cpus), rule=document_rule(spec),
            max_images=spec.documents.max_images))
    return ImageDownloadStage(image_download_config(spec.download, spec.input.hash_col, cpus))


def image_download_config(download: DownloadSpec, hash_col: Optional[str] = None, cpus: int = 1) -> ImageDownloadConfig:
    return ImageDownloadConfig(fetch=fetch_config(download), resize=resize_config(download), cpus=cpus,
                               verify_hash=download.verify_hash, hash_col=hash_col)


def document_rule(spec: JobSpec) -> DocumentRule:
    return DocumentRule(min_images=spec.documents.min_images, all_images=spec.documents.all_images)


# -- the job's parts -----------------------------------------------------------------------------
def build_stages(spec: JobSpec, check: bool = True) -> list[Stage]:
    """metadata filters -> download (image or video; none for ``input.shards``) -> the other
    filters -> tokenizers, each group in the spec's order. With ``check`` every stage checks, here
    in the driver, that what it needs exists. On documents (``download.media: document``) a stage
    with a ``document_view`` runs on its view through SegmentStage (the others on the document rows
    as they are), and a last stage counts each document's kept images again."""
    from filters import build_filters

    filters = build_filters(spec.filters, check, documents=spec.download.media == "document")
    early = [f for f in filters if f.metadata_only]  # the rows they drop are never fetched
    media: list[Stage] = []
    if not spec.input.shards:
        media = [download_stage(spec)]
        if check:
            media[0].check()
    tokenizers: list[Stage] = []
    if spec.tokenize:  # its package imports PyTorch: a job without tokenizers does not
        from pipeline.tokenize import build_tokenizers

        tokenizers = build_tokenizers(spec.tokenize, check)
    stages = [*early, *media, *(f for f in filters if not f.metadata_only), *tokenizers]
    if spec.download.media != "document":
        return stages
    rule = document_rule(spec)
    stages = [s if s in media else for_documents(s, rule) for s in stages]
    later = len(stages) > len(early) + len(media)  # stages after the download may drop images
    return stages + [DocumentCountStage()] if later else stages


def column_types(stages: list[Stage]) -> dict[str, str]:
    """The Arrow type of every status-table column: the schema's and those the stages declare."""
    types = dict(schema.COLUMN_TYPES)
    for stage in stages:
        types.update(stage.columns)
    return types


def build_sink(spec: JobSpec, stages: list[Stage]) -> WebDatasetSink:
    """The full layout's sink, or (``output.layout: sidecar``) the sidecar sink aligned with the
    input shards: shard id -> base tar, as the shard reader numbers them."""
    directory = Directory(spec.output.dir, spec.output.storage_options)
    if spec.output.layout != "sidecar":
        types = column_types(stages)
        if spec.input.shards:  # a reshard keeps where each sample came from
            from pipeline.sources.shard_input import LINEAGE_TYPES

            types.update(LINEAGE_TYPES)
        return WebDatasetSink(directory, types, spec.name)
    from pipeline.sinks.sidecar import SidecarSink
    from pipeline.sources.shard_input import expand_shards, shard_number

    base_shards: dict[int, str] = {}
    for position, tar in enumerate(expand_shards(spec.input.shards, spec.input.storage_options)):
        shard_id = shard_number(tar, position)
        if shard_id in base_shards:
            raise ConfigError(f"input.shards: {base_shards[shard_id]} and {tar} are both shard {shard_id:05d}; "
                              "a sidecar needs one tar per shard id")
        base_shards[shard_id] = tar
    folders = sorted({tar.rsplit("/", 1)[0] for tar in base_shards.values()})
    if directory.url in folders:
        raise ConfigError(f"output.dir: {spec.output.dir!r} holds the input shards; a sidecar goes in a directory "
                          "of its own (it would overwrite them)")
    return SidecarSink(directory, column_types(stages), spec.name, base=", ".join(folders), base_shards=base_shards,
                       stage_columns=[c for stage in stages for c in stage.columns],
                       base_options=spec.input.storage_options)


def build_executor(spec: JobSpec) -> Executor:
    return EXECUTORS[spec.execution.engine](spec.execution)

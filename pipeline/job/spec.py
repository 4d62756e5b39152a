"""The job spec (YAML): one dataclass per section, validated by :mod:`pipeline.core.config`.

``filters`` and ``tokenize`` hold per-stage option mappings; their own modules validate them
(``filters.build_filters``, ``pipeline.tokenize.build_tokenizers``). Defaults that are facts of a
lower layer (the pixel cap, the User-Agent, resize modes, encoders, engines) are imported from
the module that owns them. Only :mod:`pipeline.job.build` turns a spec into stages, a sink and
an executor.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.core.config import ConfigError, apply_override, from_dict, parse_override, to_dict
from pipeline.executors import EXECUTORS
from pipeline.fetch.client import DEFAULT_MAX_BYTES_IN_FLIGHT
from pipeline.fetch.headers import DEFAULT_USER_AGENT
from pipeline.media.audio import AAC_RATES, AUDIO_CHANNELS
from pipeline.media.geometry import MAX_PIXELS, RESIZE_MODES
from pipeline.media.resize import ENCODE_FORMATS
from pipeline.media.scenes import SceneConfig

ResizeMode = Literal[RESIZE_MODES]
EncodeFormat = Literal[tuple(ENCODE_FORMATS)]
Engine = Literal[tuple(EXECUTORS)]


@dataclass
class InputSpec:
    files: list[str] = field(default_factory=list)  # local paths, globs or fsspec URLs
    catalog: Optional[str] = None                    # a card name: its reader and column map apply
    # existing WebDataset shards instead of URL files: folders, URLs, brace patterns (ours,
    # img2dataset's, any webdataset); no download, media are decoded from the tars
    shards: list[str] = field(default_factory=list)
    hash_col: Optional[str] = None                   # the column with each file's published hash (verify_hash)
    format: Optional[Literal["parquet", "csv", "tsv", "jsonl", "txt"]] = None  # default: from the suffix
    url_col: str = "url"
    caption_col: Optional[str] = "caption"
    save_additional_columns: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    storage_options: dict[str, Any] = field(default_factory=dict)  # for fsspec URLs (endpoint, key, ...)

    def validate(self) -> None:
        if self.shards and (self.files or self.catalog):
            raise ConfigError("shards: reads existing shards; set it instead of files and catalog, not with them")
        if not self.files and not self.shards:
            raise ConfigError("files: at least one input file is required (or shards: existing shards)")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit: must be >= 0, got {self.limit}")


@dataclass
class DownloadSpec:
    """How samples are fetched (and images resized); the network options apply to videos too.

    Retries and waits: a sample that failed in a retryable way (timeout, connection, truncated,
    429, 5xx) is tried again up to ``retries`` times, after ``Retry-After`` or an exponential
    backoff, each wait capped at ``max_retry_wait`` seconds; while it waits it holds no download
    slot, so other samples (and hosts) proceed. ``sample_deadline`` bounds one sample's network time
    plus its waits over all attempts (time queued for a slot is not counted); null: unbounded.
    Caps: ``per_host_limit`` requests in flight to one host (its name in lower case, IDNA, without
    a trailing dot), ``per_address_limit`` to one IP address over all its names (null: a few times
    per_host_limit, ``pipeline.fetch.client.ADDRESS_LIMIT_PER_HOST_LIMIT``), and ``max_bytes_in_flight`` bytes of image bodies in memory at once per
    download task (each body reserves its Content-Length, or ``max_bytes`` when the length is not
    known; null: unbounded, i.e. concurrency x max_bytes).
    """
    media: Literal["image", "video", "document"] = "image"  # document: every image of interleaved documents
    image_size: int = 256
    resize_mode: ResizeMode = "center_crop"
    resize_only_if_bigger: bool = False
    encode_format: EncodeFormat = "jpg"
    encode_quality: int = 95
    timeout: float = 10.0              # seconds per request (connect + headers + body)
    retries: int = 0
    max_retry_wait: float = 60.0       # cap on one Retry-After / backoff wait, seconds
    sample_deadline: Optional[float] = 120.0  # network time + retry waits per sample, seconds; null: unbounded
    min_image_size: int = 0
    max_image_area: Optional[float] = None
    max_aspect_ratio: Optional[float] = None
    max_pixels: int = MAX_PIXELS       # pixel cap read from the header (PIL's bomb limit)
    max_bytes: int = 50_000_000        # body cap, streamed
    concurrency: int = 256             # requests in flight per download task
    per_host_limit: int = 16           # concurrent requests to one host
    per_address_limit: Optional[int] = None  # concurrent requests to one IP address; null: a few x per_host_limit
    max_bytes_in_flight: Optional[int] = DEFAULT_MAX_BYTES_IN_FLIGHT  # image bodies in memory per task; >= max_bytes
    user_agent: str = DEFAULT_USER_AGENT
    respect_optouts: bool = True       # X-Robots-Tag noai / noimageai / noindex / noimageindex
    allow_private_addresses: bool = False
    allowed_networks: list[str] = field(default_factory=list)  # CIDRs let through anyway (e.g. an internal mirror)
    verify_hash: Optional[Literal["sha256", "md5"]] = None  # check the bytes against input.hash_col

    def validate(self) -> None:
        for name in ("image_size", "concurrency", "per_host_limit", "max_pixels", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 0 <= self.encode_quality <= 100:
            raise ConfigError(f"encode_quality: must be in 0..100, got {self.encode_quality}")
        if self.timeout <= 0:
            raise ConfigError(f"timeout: must be > 0, got {self.timeout}")
        if self.retries < 0:
            raise ConfigError(f"retries: must be >= 0, got {self.retries}")
        if self.max_retry_wait < 0:
            raise ConfigError(f"max_retry_wait: must be >= 0, got {self.max_retry_wait}")
        for name in ("sample_deadline", "per_address_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be > 0 or null, got {value}")
        if self.max_bytes_in_flight is not None and self.max_bytes_in_flight < self.max_bytes:
            raise ConfigError(f"max_bytes_in_flight: must be >= max_bytes ({self.max_bytes}) so that any body "
                              f"fits, got {self.max_bytes_in_flight}")
        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"allowed_networks: not a network (CIDR), got {net!r}") from None


X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                     "veryslow"]


@dataclass
class VideoSpec:
    """The video path (``download.media: video``); network options, caps and opt-outs are download's."""
    # auto: yt-dlp for YouTube ids/URLs, row by row (every row when the catalog card's media are on
    # YouTube), HTTP for the others; yt-dlp: every row (pages that need an extractor; extra: mmcurate[ytdlp])
    backend: Literal["auto", "http", "yt-dlp"] = "auto"
    # yt-dlp format selector; null: the best mp4 video, with the best m4a audio merged in when
    # video.audio is on and ffmpeg is on PATH (download.ytdlp.format_selector)
    ytdlp_format: Optional[str] = None
    ytdlp_sections: bool = True          # spans: fetch only the section covering a video's clips (ffmpeg)
    ytdlp_force_keyframes: bool = False  # re-encode a section at its cuts rather than copy from a keyframe
    ytdlp_concurrency: int = 2           # videos in flight through yt-dlp, per task
    ytdlp_rate: Optional[float] = 1.0    # yt-dlp extractions started per second, per task; null: no cap
    ytdlp_ratelimit: Optional[int] = None  # bytes per second per yt-dlp download; null: no cap
    ytdlp_sleep: Optional[float] = None  # seconds yt-dlp sleeps before each download (its sleep_interval)
    resolution: Optional[int] = None     # short side of the clips (made even); null keeps the source size
    fps: Optional[float] = None          # clip frame rate; null keeps the source's
    # exact: within half a frame of the span; keyframe: copied from the keyframe before the span,
    # not re-encoded (H.264 sources, no resolution/fps change)
    clip_precision: Literal["exact", "keyframe"] = "exact"
    max_duration: Optional[float] = 600.0  # longest clip in seconds (the whole video when no span) -> too_long
    crf: int = 23                        # libx264 quality when a clip is re-encoded
    preset: X264Preset = "veryfast"
    store_frames: bool = False           # sample frames with decord into KEY.frames.npy, uint8 (T, H, W, 3)
    num_frames: Optional[int] = None     # that many frames, evenly spaced (8 when frames_fps is null too)
    frames_fps: Optional[float] = None   # or frames at this rate from the clip's start
    frames_size: Optional[int] = None    # short side of sampled frames; null: the clip's size
    concurrency: int = 8                 # videos downloading or being cut at once, per task
    decode_threads: int = 1              # decoder threads per clip (clips already run in parallel)
    tmp_dir: Optional[str] = None        # where sources are downloaded; null: the system temp dir
    # rows without a span cut at their shot boundaries into clips KEY.clip_000.mp4, ... (null: off);
    # e.g. {detect: content, threshold: 27, min_clip: 2, max_clip: 60}, see pipeline.media.scenes
    scenes: Optional[SceneConfig] = None
    motion: bool = False                 # motion_score per clip (mean absolute frame difference, 0..255)
    min_motion: Optional[float] = None   # clips with a lower motion_score are dropped (filtered: motion)
    # the source's audio track in each clip as AAC (copied when the video is, else encoded, the
    # same span); false: video only. A source without audio gives clips without (pipeline.media.audio)
    audio: bool = True
    audio_rate: Optional[int] = None     # resample to this AAC rate (e.g. 16000); null keeps the source's
    audio_channels: Optional[int] = None  # 1 or 2; null keeps the source's (more than 2: mixed to stereo)

    def validate(self) -> None:
        if self.min_motion is not None and self.min_motion < 0:
            raise ConfigError(f"min_motion: must be >= 0, got {self.min_motion}")
        for name in ("resolution", "fps", "max_duration", "num_frames", "frames_fps", "frames_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be > 0, got {value}")
        if self.num_frames is not None and self.frames_fps is not None:
            raise ConfigError("num_frames, frames_fps: set one of them, not both")
        if not 0 <= self.crf <= 51:
            raise ConfigError(f"crf: must be in 0..51, got {self.crf}")
        for name in ("concurrency", "decode_threads", "ytdlp_concurrency"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.audio_rate is not None and self.audio_rate not in AAC_RATES:
            raise ConfigError(f"audio_rate: must be one of the AAC rates {list(AAC_RATES)}, got {self.audio_rate}")
        if self.audio_channels is not None and self.audio_channels not in AUDIO_CHANNELS:
            raise ConfigError(f"audio_channels: must be one of {list(AUDIO_CHANNELS)}, got {self.audio_channels}")
        for name in ("ytdlp_rate", "ytdlp_ratelimit", "ytdlp_sleep"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be > 0 (or null: no cap), got {value}")


@dataclass
class DocumentsSpec:
    """Interleaved documents (``download.media: document``): rows with a ``document`` column (a
    catalog card's document reader, jsonl/parquet rows in the form of pipeline.core.document, or
    the shards of a document output: ``input.shards``, nothing fetched).
    A document keeps its failed images as slots with their status; it is dropped (too_few_images,
    or filtered by the filter whose rejections left too few) when fewer than ``min_images`` images
    are left, or, with ``all_images``, when any image failed. A document with more image slots than
    ``max_images`` is not fetched: it fails malformed_row (documents are kept whole)."""
    min_images: int = 1
    all_images: bool = False
    max_images: Optional[int] = None  # null: any number

    def validate(self) -> None:
        if self.min_images < 0:
            raise ConfigError(f"min_images: must be >= 0, got {self.min_images}")
        if self.max_images is not None and self.max_images <= 0:
            raise ConfigError(f"max_images: must be > 0 or null, got {self.max_images}")
        if self.max_images is not None and self.max_images < self.min_images:
            raise ConfigError(f"max_images: {self.max_images} is below min_images={self.min_images}; "
                              "no document could pass")


@dataclass
class OutputSpec:
    dir: str = "out/job"               # a local path (a shared mount on a cluster) or an fsspec URL
    layout: Literal["full", "sidecar"] = "full"  # sidecar: only the new fields, aligned with input.shards
    samples_per_shard: int = 10_000
    storage_options: dict[str, Any] = field(default_factory=dict)  # for fsspec URLs (endpoint, key, ...)

    def validate(self) -> None:
        if self.samples_per_shard <= 0:
            raise ConfigError(f"samples_per_shard: must be > 0, got {self.samples_per_shard}")


@dataclass
class ExecutionSpec:
    engine: Engine = "ray"
    address: Optional[str] = None      # null: RAY_ADDRESS's cluster, else a local Ray; "local"; "auto",
                                       # host:port or ray://host:port join a cluster
    cpus_per_task: Optional[int] = None  # CPUs each download task decodes/resizes on; null: all cores (local), 1 (ray)
    max_shards_in_flight: Optional[int] = None  # backpressure window; default 2x the CPU task slots
    shard_retries: int = 1             # times a shard whose task crashed is tried again in this run
    progress: bool = True

    def validate(self) -> None:
        if self.cpus_per_task is not None and self.cpus_per_task <= 0:
            raise ConfigError(f"cpus_per_task: must be > 0, got {self.cpus_per_task}")

    def task_cpus(self) -> int:
        """CPUs of one download task: the local engine's one process may use every core (worker
        processes decode and resize); a Ray task asks for one unless told, and Ray runs many."""
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        return (os.cpu_count() or 1) if self.engine == "local" else 1


@dataclass
class JobSpec:
    input: InputSpec
    name: str = "job"
    download: DownloadSpec = field(default_factory=DownloadSpec)
    video: VideoSpec = field(default_factory=VideoSpec)
    documents: DocumentsSpec = field(default_factory=DocumentsSpec)
    filters: list[dict[str, Any]] = field(default_factory=list)   # [{name: {options}}], in order
    tokenize: dict[str, Any] = field(default_factory=dict)        # {text: {...}, image: {...}, sequence: {...}}
    output: OutputSpec = field(default_factory=OutputSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)

    def validate(self) -> None:
        if self.output.layout == "sidecar" and not self.input.shards:
            raise ConfigError("output.layout: 'sidecar' writes fields aligned with existing shards; it needs input.shards")
        if self.download.verify_hash and not self.input.hash_col:
            raise ConfigError(f"download.verify_hash: {self.download.verify_hash!r} needs input.hash_col, "
                              "the column holding each file's hash")
        if self.output.dir.startswith("memory://") and self.execution.engine != "local":
            raise ConfigError(f"output.dir: {self.output.dir!r} lives in one process's memory, which "
                              f"{self.execution.engine!r} workers do not share; use execution.engine: local")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_job(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> JobSpec:
    """Read a job spec from YAML (or ``data``), apply ``--set`` overrides and validate everything.

    Relative paths (input files, output dir) are relative to the current directory, as in any CLI.
    """
    if data is None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = dict(data)
    for text in overrides:
        apply_override(data, *parse_override(text), JobSpec)
    spec = from_dict(JobSpec, data)
    _validate_stages(spec)
    return spec


def _validate_stages(spec: JobSpec) -> None:
    """Filters and tokenizers validate their own options (no model or file is touched here). The
    tokenizers' package imports PyTorch (about 800 MB, 2 s): a job without them does not."""
    from filters import build_filters

    build_filters(spec.filters)
    if spec.tokenize:
        from pipeline.tokenize import build_tokenizers

        build_tokenizers(spec.tokenize)

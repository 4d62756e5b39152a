"""The sample schema: column names, status values and error kinds. One place; everything imports it.

A *batch* is a ``dict[str, list]`` of equal-length columns, one entry per input row of a shard.
Every batch carries the status-table columns below plus ``files``: for each row a dict mapping a
tar member extension (``"jpg"``, ``"clip.npy"``, ...) to its bytes. Stages add files and score
columns; the writer turns ``files`` into tar members and every other column into the parquet table.
"""
from __future__ import annotations

from typing import Any

# -- columns -------------------------------------------------------------------------------------
KEY = "key"
URL = "url"
CAPTION = "caption"
STATUS = "status"
ERROR_KIND = "error_kind"
ERROR_MESSAGE = "error_message"
WIDTH = "width"
HEIGHT = "height"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
SHA256 = "sha256"
FILES = "files"  # per row: {extension: bytes}; never written to parquet
# Optional input columns that readers normalise to (clip spans in seconds, interleaved documents).
CLIP_START = "clip_start"
CLIP_END = "clip_end"
DOC_ID = "doc_id"
POSITION = "position"

STATUS_COLUMNS = (KEY, URL, CAPTION, STATUS, ERROR_KIND, ERROR_MESSAGE, WIDTH, HEIGHT,
                  ORIGINAL_WIDTH, ORIGINAL_HEIGHT, SHA256)
# Arrow type of each column in NNNNN.parquet that mmcurate itself produces, fixed so that every
# shard's table has one schema even when no row of a shard reached the stage that fills a column.
COLUMN_TYPES = {
    **{c: ("int32" if c in (WIDTH, HEIGHT, ORIGINAL_WIDTH, ORIGINAL_HEIGHT) else "string") for c in STATUS_COLUMNS},
    # filters
    "clip_score": "double", "exact_group": "string", "near_group": "string", "phash": "string", "dhash": "string",
    # tokenizers
    "text_tokenizer": "string", "text_length": "int32", "image_tokenizer": "string", "image_policy": "string",
    "image_grid": "string", "vae_scaling_factor": "double", "vae_shift_factor": "double",
    # video
    CLIP_START: "double", CLIP_END: "double", "duration": "double", "fps": "double", "frame_count": "int32",
    "codec": "string", "cut": "string", "source_url": "string", "source_duration": "double",
    "source_fps": "double", "source_codec": "string",
}

# -- status values (img2dataset-compatible where they overlap) -----------------------------------
SUCCESS = "success"
INVALID_INPUT = "invalid_input"            # the row itself is malformed
FAILED_TO_DOWNLOAD = "failed_to_download"  # network, HTTP, safety, opt-out, caps
FAILED_TO_DECODE = "failed_to_resize"      # img2dataset's name: decode, resize and size rules
FAILED_TO_PROCESS = "failed_to_process"    # a later stage (tokenizer, model) failed on the sample
FILTERED = "filtered"                      # a filter rejected it; error_kind names the filter
PENDING = "pending"                        # not yet processed (never written by a finished stage)

STATUSES = (SUCCESS, INVALID_INPUT, FAILED_TO_DOWNLOAD, FAILED_TO_DECODE, FAILED_TO_PROCESS, FILTERED)

# -- error kinds: kind -> (status it belongs to, what it means) ----------------------------------
ERROR_KINDS: dict[str, tuple[str, str]] = {
    # malformed input rows
    "malformed_row": (INVALID_INPUT, "the input line could not be parsed"),
    "missing_url": (INVALID_INPUT, "the row has no URL"),
    "invalid_utf8": (INVALID_INPUT, "the URL or caption is not valid UTF-8"),
    "bad_scheme": (INVALID_INPUT, "the URL is not http(s)"),
    "bad_url": (INVALID_INPUT, "the URL cannot be parsed (no host, bad port, bad IDNA name)"),
    "bad_span": (INVALID_INPUT, "the clip span is missing, negative or has end <= start"),
    # download
    "http_status": (FAILED_TO_DOWNLOAD, "the server answered with a non-2xx status"),
    "timeout": (FAILED_TO_DOWNLOAD, "the request or the body took longer than the timeout"),
    "connection": (FAILED_TO_DOWNLOAD, "the connection failed or was reset"),
    "dns": (FAILED_TO_DOWNLOAD, "the host name could not be resolved"),
    "too_many_redirects": (FAILED_TO_DOWNLOAD, "more than the allowed number of redirects"),
    "redirect_loop": (FAILED_TO_DOWNLOAD, "a redirect led back to a URL already visited"),
    "forbidden_address": (FAILED_TO_DOWNLOAD,
                          "the host resolves to a private, loopback, link-local, multicast or reserved address"),
    "forbidden_scheme": (FAILED_TO_DOWNLOAD, "a redirect led to a scheme other than http(s)"),
    "opted_out": (FAILED_TO_DOWNLOAD, "X-Robots-Tag forbids use (noai, noimageai, noindex, noimageindex)"),
    "too_large": (FAILED_TO_DOWNLOAD, "the body is larger than the byte cap"),
    "truncated": (FAILED_TO_DOWNLOAD, "the body ended before Content-Length bytes arrived"),
    "not_media": (FAILED_TO_DOWNLOAD, "the bytes are not an image or video (e.g. an HTML page)"),
    "ytdlp_error": (FAILED_TO_DOWNLOAD, "yt-dlp could not fetch the video (unsupported page, removed, private)"),
    # decode / resize
    "decode_error": (FAILED_TO_DECODE, "the bytes could not be decoded"),
    "encode_error": (FAILED_TO_DECODE, "the output cannot be encoded: beyond the format's size limits or the pixel cap"),
    "decompression_bomb": (FAILED_TO_DECODE, "the header announces more pixels than the pixel cap"),
    "too_small": (FAILED_TO_DECODE, "smaller than min_image_size"),
    "too_large_area": (FAILED_TO_DECODE, "larger than max_image_area"),
    "bad_aspect_ratio": (FAILED_TO_DECODE, "aspect ratio above max_aspect_ratio"),
    "too_long": (FAILED_TO_DECODE, "the video is longer than the duration cap"),
    "cut_error": (FAILED_TO_DECODE, "the clip could not be cut or encoded"),
    # later stages
    "stage_error": (FAILED_TO_PROCESS, "a processing stage raised on this sample"),
}


def status_of(kind: str) -> str:
    """The status an error kind belongs to; unknown kinds are filter names, hence FILTERED."""
    return ERROR_KINDS[kind][0] if kind in ERROR_KINDS else FILTERED


def mark(batch: dict[str, list], i: int, kind: str, message: str = "") -> None:
    """Record that row ``i`` failed (or was filtered) with ``kind``; drops its files."""
    batch[STATUS][i] = status_of(kind)
    batch[ERROR_KIND][i] = kind
    batch[ERROR_MESSAGE][i] = message[:500] if message else ERROR_KINDS.get(kind, ("", kind))[1]
    batch[FILES][i] = {}


def alive(batch: dict[str, list]) -> list[int]:
    """Indices of rows still in the running (not failed, not filtered)."""
    return [i for i, s in enumerate(batch[STATUS]) if s in (SUCCESS, PENDING)]


def batch_len(batch: dict[str, list]) -> int:
    return len(batch[KEY])


def set_column(batch: dict[str, list], name: str, index: list[int], values: list[Any], fill: Any = None) -> None:
    """Set ``name`` for the rows in ``index``, creating the column (filled with ``fill``) if needed."""
    col = batch.setdefault(name, [fill] * batch_len(batch))
    for i, v in zip(index, values):
        col[i] = v


def make_key(shard_id: int, index: int, samples_per_shard: int) -> str:
    """``{shard:05d}{index:0Nd}``: digits only, sortable, N wide enough for samples_per_shard."""
    width = max(4, len(str(max(samples_per_shard - 1, 0))))
    return f"{shard_id:05d}{index:0{width}d}"

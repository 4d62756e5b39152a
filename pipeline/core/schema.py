"""The sample schema: column names and types, statuses, error kinds and media extensions, and the
rules for setting a row's status. One place; everything imports it.

A *batch* is a ``dict[str, list]`` of equal-length columns, one entry per input row of a shard.
Every batch carries the status-table columns below plus ``files``: for each row a dict mapping a
tar member extension (``"jpg"``, ``"clip.npy"``, ...) to its bytes. Columns in ``TRANSIENT_COLUMNS``
(CLIP embeddings shared between filters) are never written. Stages add files and columns
(each stage declares its columns and their Arrow types, see :class:`pipeline.core.stage.Stage`);
the sink turns ``files`` into tar members and every other column into the status table.
"""
from __future__ import annotations

import enum
from collections import Counter
from typing import Any, Optional

Batch = dict[str, list]

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
FILES = "files"  # per row: {extension: bytes}; never written to the status table
# Per row the L2-normalised float32 CLIP image embedding (or None), put there by clip_score for the
# filters after it (filters.clip_score.IMAGE_EMBEDDING).
CLIP_IMAGE_EMBEDDING = "clip_image_embedding"
# Per row cut into scenes the list of its kept clips' embeddings (each the normalised mean of its
# frames'), in the order of its clip_NNN members (None for other rows), beside the row's one above:
# the heads score such a row clip by clip (filters.frames keeps it in step when clips are dropped).
CLIP_IMAGE_EMBEDDINGS = "clip_image_embeddings"
# Per row the member extensions read from input shards (``input.shards``): the sidecar layout
# writes every member but these.
INPUT_MEMBERS = "input_members"
# Columns that travel between stages (and between workers) but are never written: not to the
# status table, KEY.json nor the tar.
TRANSIENT_COLUMNS = frozenset({CLIP_IMAGE_EMBEDDING, CLIP_IMAGE_EMBEDDINGS, INPUT_MEMBERS})
# Optional input columns that readers normalise to (clip spans in seconds, interleaved documents).
CLIP_START = "clip_start"
CLIP_END = "clip_end"
DOC_ID = "doc_id"
POSITION = "position"
# An interleaved document's segments and per-image outcomes (a dict; :mod:`pipeline.core.document`).
DOCUMENT = "document"
# Set by the download stage: how many times the job tried the row (1 on the first run, one more per
# ``mmcurate retry``; a fetch's own retries within one try are not counted) and, for a row a retry
# tried again, when (UTC, ISO 8601). Null in a plain run, so that two runs give the same bytes.
ATTEMPTS = "attempts"
LAST_ATTEMPT = "last_attempt"
DOWNLOAD_COLUMNS = {ATTEMPTS: "int32", LAST_ATTEMPT: "string"}

STATUS_COLUMNS = (KEY, URL, CAPTION, STATUS, ERROR_KIND, ERROR_MESSAGE, WIDTH, HEIGHT,
                  ORIGINAL_WIDTH, ORIGINAL_HEIGHT, SHA256)
# Arrow types of the columns every job has; stages declare the types of the columns they add.
# Fixed, so that every shard's table has one schema even where no row reached the stage.
COLUMN_TYPES = {
    **{c: ("int32" if c in (WIDTH, HEIGHT, ORIGINAL_WIDTH, ORIGINAL_HEIGHT) else "string") for c in STATUS_COLUMNS},
    CLIP_START: "double", CLIP_END: "double",
}

# -- media members -------------------------------------------------------------------------------
# Image members a sample may carry, in the order a reader looks for them (ours are jpg/png/webp,
# other datasets' shards may hold the rest).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
VIDEO_EXTENSIONS = ("mp4",)
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS


def is_media(ext: str) -> bool:
    """Whether a member extension is media: ``jpg``, a document's ``image_003.jpg``, a video's
    ``clip_001.mp4``."""
    return ext.rpartition(".")[2] in MEDIA_EXTENSIONS


def image_of(files: dict[str, bytes]) -> Optional[bytes]:
    """The bytes of a sample's image member, or None when it has none."""
    for ext in IMAGE_EXTENSIONS:
        data = files.get(ext)
        if data:
            return data
    return None


# -- statuses (img2dataset-compatible where they overlap) ----------------------------------------
SUCCESS = "success"
INVALID_INPUT = "invalid_input"            # the row itself is malformed
FAILED_TO_DOWNLOAD = "failed_to_download"  # network, HTTP, safety, opt-out, caps
FAILED_TO_DECODE = "failed_to_resize"      # img2dataset's name: decode, resize and size rules
FAILED_TO_PROCESS = "failed_to_process"    # a later stage (tokenizer, model) failed on the sample
FILTERED = "filtered"                      # a filter rejected it; error_kind names the filter
PENDING = "pending"                        # still in the running; a finished shard has none left

STATUSES = (SUCCESS, INVALID_INPUT, FAILED_TO_DOWNLOAD, FAILED_TO_DECODE, FAILED_TO_PROCESS, FILTERED)


class ErrorKind(str, enum.Enum):
    """Why a row failed. Each kind belongs to one status and has one meaning; a filter's
    rejection is not an error kind (its error_kind is the filter's name, its status FILTERED)."""

    def __new__(cls, value: str, status: str, meaning: str) -> "ErrorKind":
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.meaning = meaning
        return member

    # Compare, hash and print as the plain string the status table holds.
    __hash__ = str.__hash__
    __str__ = str.__str__
    __format__ = str.__format__

    # malformed input rows
    MALFORMED_ROW = "malformed_row", INVALID_INPUT, "the input line could not be parsed"
    MISSING_URL = "missing_url", INVALID_INPUT, "the row has no URL"
    INVALID_UTF8 = "invalid_utf8", INVALID_INPUT, "the URL or caption is not valid UTF-8"
    BAD_SCHEME = "bad_scheme", INVALID_INPUT, "the URL is not http(s)"
    BAD_URL = "bad_url", INVALID_INPUT, "the URL cannot be parsed (no host, bad port, bad IDNA name)"
    BAD_SPAN = "bad_span", INVALID_INPUT, "the clip span is missing, negative or has end <= start"
    # download
    HTTP_STATUS = "http_status", FAILED_TO_DOWNLOAD, "the server answered with a non-2xx status"
    TIMEOUT = "timeout", FAILED_TO_DOWNLOAD, "the request or the body took longer than the timeout"
    CONNECTION = "connection", FAILED_TO_DOWNLOAD, "the connection failed or was reset"
    DNS = "dns", FAILED_TO_DOWNLOAD, "the host name could not be resolved"
    TOO_MANY_REDIRECTS = "too_many_redirects", FAILED_TO_DOWNLOAD, "more than the allowed number of redirects"
    REDIRECT_LOOP = "redirect_loop", FAILED_TO_DOWNLOAD, "a redirect led back to a URL already visited"
    FORBIDDEN_ADDRESS = ("forbidden_address", FAILED_TO_DOWNLOAD,
                         "the host resolves to a private, loopback, link-local, multicast or reserved address")
    FORBIDDEN_SCHEME = "forbidden_scheme", FAILED_TO_DOWNLOAD, "a redirect led to a scheme other than http(s)"
    OPTED_OUT = ("opted_out", FAILED_TO_DOWNLOAD,
                 "X-Robots-Tag forbids use (noai, noimageai, noindex, noimageindex)")
    TOO_LARGE = "too_large", FAILED_TO_DOWNLOAD, "the body is larger than the byte cap"
    TRUNCATED = "truncated", FAILED_TO_DOWNLOAD, "the body ended before Content-Length bytes arrived"
    NOT_MEDIA = "not_media", FAILED_TO_DOWNLOAD, "the bytes are not an image or video (e.g. an HTML page)"
    HASH_MISMATCH = ("hash_mismatch", FAILED_TO_DOWNLOAD,
                     "the downloaded bytes do not have the hash the input's hash column gives")
    BAD_ENCODING = ("bad_encoding", FAILED_TO_DOWNLOAD,
                    "the body starts like its Content-Encoding (gzip, deflate) but does not decode")
    YTDLP_ERROR = ("ytdlp_error", FAILED_TO_DOWNLOAD,
                   "yt-dlp could not fetch the video for another reason (extractor error, no format)")
    VIDEO_REMOVED = ("video_removed", FAILED_TO_DOWNLOAD,
                     "the video is gone: unavailable, removed by the uploader, or its account terminated")
    VIDEO_PRIVATE = "video_private", FAILED_TO_DOWNLOAD, "the video is private"
    GEO_BLOCKED = "geo_blocked", FAILED_TO_DOWNLOAD, "the video is not available in the downloader's country"
    BOT_CHECK = ("bot_check", FAILED_TO_DOWNLOAD,
                 "the site asks to sign in to confirm we are not a bot (or a captcha) before serving the video")
    RATE_LIMITED = ("rate_limited", FAILED_TO_DOWNLOAD,
                    "the site rate-limits this client (HTTP 429, too many requests, try again later)")
    # decode / resize
    DECODE_ERROR = "decode_error", FAILED_TO_DECODE, "the bytes could not be decoded"
    ENCODE_ERROR = ("encode_error", FAILED_TO_DECODE,
                    "the output cannot be encoded: beyond the format's size limits or the pixel cap")
    DECOMPRESSION_BOMB = "decompression_bomb", FAILED_TO_DECODE, "the header announces more pixels than the pixel cap"
    TOO_SMALL = "too_small", FAILED_TO_DECODE, "smaller than min_image_size"
    TOO_LARGE_AREA = "too_large_area", FAILED_TO_DECODE, "larger than max_image_area"
    BAD_ASPECT_RATIO = "bad_aspect_ratio", FAILED_TO_DECODE, "aspect ratio above max_aspect_ratio"
    TOO_LONG = "too_long", FAILED_TO_DECODE, "the video is longer than the duration cap"
    CUT_ERROR = "cut_error", FAILED_TO_DECODE, "the clip could not be cut or encoded"
    # documents
    TOO_FEW_IMAGES = ("too_few_images", FAILED_TO_DOWNLOAD,
                      "the document has fewer usable images than min_images (or one failed, with all_images)")
    # later stages
    STAGE_ERROR = "stage_error", FAILED_TO_PROCESS, "a processing stage raised on this sample"


def error_kind(name: str) -> ErrorKind:
    """The ErrorKind called ``name``; anything else is a programming error, never a filter."""
    try:
        return ErrorKind(name)
    except ValueError:
        raise ValueError(f"unknown error kind {name!r} (a filter's rejection goes through reject(), "
                         f"not mark())") from None


# -- setting a row's status ----------------------------------------------------------------------
def mark(batch: Batch, i: int, kind: str, message: str = "") -> None:
    """Record that row ``i`` failed with ``kind`` (an ErrorKind or its name); drops its files."""
    kind = error_kind(kind)
    end_row(batch, i, kind.status, kind.value, message or kind.meaning)


def reject(batch: Batch, i: int, filter_name: str, message: str) -> None:
    """Record that the filter ``filter_name`` rejected row ``i``; drops its files."""
    end_row(batch, i, FILTERED, filter_name, message or filter_name)


def end_row(batch: Batch, i: int, status: str, kind: str, message: str) -> None:
    """Row ``i`` ends with ``status`` and ``kind`` (a failure or rejection already decided); drops its files."""
    batch[STATUS][i] = status
    batch[ERROR_KIND][i] = kind
    batch[ERROR_MESSAGE][i] = message[:500]
    batch[FILES][i] = {}


def alive(batch: Batch) -> list[int]:
    """Indices of rows still in the running (not failed, not filtered)."""
    return [i for i, s in enumerate(batch[STATUS]) if s in (SUCCESS, PENDING)]


def batch_len(batch: Batch) -> int:
    return len(batch[KEY])


def count_attempt(batch: Batch, rows: list[int]) -> None:
    """The download stage is trying ``rows`` (once more, for rows a retry brought back)."""
    attempts = batch.setdefault(ATTEMPTS, [None] * batch_len(batch))
    batch.setdefault(LAST_ATTEMPT, [None] * batch_len(batch))
    for i in rows:
        attempts[i] = (attempts[i] or 0) + 1


def set_column(batch: Batch, name: str, index: list[int], values: list[Any], fill: Any = None) -> None:
    """Set ``name`` for the rows in ``index``, creating the column (filled with ``fill``) if needed."""
    col = batch.setdefault(name, [fill] * batch_len(batch))
    for i, v in zip(index, values):
        col[i] = v


def make_key(shard_id: int, index: int, samples_per_shard: int) -> str:
    """``{shard:05d}{index:0Nd}``: digits only, sortable, N wide enough for samples_per_shard."""
    width = max(4, len(str(max(samples_per_shard - 1, 0))))
    return f"{shard_id:05d}{index:0{width}d}"


# -- a finished shard ----------------------------------------------------------------------------
def settle(batch: Batch) -> None:
    """After the last stage: the rows still pending are the job's successes."""
    batch[STATUS] = [SUCCESS if s == PENDING else s for s in batch[STATUS]]


def shard_stats(batch: Batch, shard_id: int, timings: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """What NNNNN_stats.json records of a settled shard: counts per status, error kind and filter."""
    statuses = Counter(batch[STATUS])
    kinds = Counter(k for k in batch[ERROR_KIND] if k)
    filtered = Counter(k for k, s in zip(batch[ERROR_KIND], batch[STATUS]) if s == FILTERED)
    return {
        "shard": f"{shard_id:05d}",
        "count": batch_len(batch),
        "successes": statuses.get(SUCCESS, 0),
        "status_counts": dict(sorted(statuses.items())),
        "error_kinds": dict(sorted(kinds.items())),
        "filtered": dict(sorted(filtered.items())),
        "timings": timings or {},
    }

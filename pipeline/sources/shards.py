"""Cut a stream of input rows into input shards: fixed row slices with stable ids.

Shard ``i`` always holds input rows ``[i*S, (i+1)*S)`` (S = ``samples_per_shard``), with keys
``{shard:05d}{row:04d}``. Every row is validated here; a malformed row becomes a per-row failure
(``invalid_input`` with its error kind), never an exception, so the shard still runs.

Every value leaving here is one that the stages and the writer can take, whatever the input held:

* ``url`` and ``caption`` are ``str`` or None. A caption that is a number or a bool becomes its
  ``str()`` (as img2dataset does) and NaN (pandas' missing value) None; a list or an object is a
  ``malformed_row`` naming the column (a list of captions is no one caption). A URL that is not a
  string is a ``bad_url`` (None, NaN or blank: ``missing_url``). A failed row keeps a readable
  text of the value it held.
* other columns hold JSON values that the status table can store too: dates and times become
  ISO-8601 text, other objects (decimals, durations) and integers beyond int64 their ``str()``,
  an empty object null; bytes, and undecodable bytes in strings, inside lists and objects become
  text with replacement characters.
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch, ErrorKind
from pipeline.sources.formats import INVALID, detect_format, iter_records


@dataclass
class InputShard:
    shard_id: int
    batch: Batch  # status-table columns, files={}, status pending or invalid_input

    def fresh_batch(self) -> Batch:
        """A copy to run the stages on: stages own the batch they get and change it in place, and
        a retried shard must start again from the rows as read."""
        return {k: [dict(f) for f in v] if k == schema.FILES else list(v) for k, v in self.batch.items()}


def table_chunks(files: list[str], input_spec: Any) -> Iterator[dict[str, list]]:
    """Column chunks of plain URL files (each one file: ``expand_files`` has expanded globs and
    folders) with normalised names (url, caption, extra columns), before validation;
    ``input_spec`` (the job's input section) names the columns, the format and the storage options."""
    inp = input_spec
    wanted = [inp.url_col] + ([inp.caption_col] if inp.caption_col else []) + list(inp.save_additional_columns)
    options = getattr(inp, "storage_options", None)
    for path in files:
        fmt = inp.format or detect_format(path)
        for chunk in iter_records(path, fmt, columns=wanted, storage_options=options):
            for key, col in (("url_col", inp.url_col), ("caption_col", inp.caption_col)):
                if col and col not in chunk and INVALID not in chunk and (key == "url_col" or fmt != "txt"):
                    hint = "; set input.caption_col: null for files without captions" if key == "caption_col" else ""
                    raise ConfigError(f"input.{key}: column {col!r} is not in {path} "
                                      f"(columns: {', '.join(chunk)}){hint}")
            n = len(next(iter(chunk.values())))
            out = {schema.URL: chunk.get(inp.url_col, [None] * n),
                   schema.CAPTION: chunk.get(inp.caption_col, [None] * n) if inp.caption_col else [None] * n}
            for col in inp.save_additional_columns:
                out[col] = chunk.get(col, [None] * n)
            if INVALID in chunk:
                out[INVALID] = chunk[INVALID]
            yield out


def _row_problem(url: Any, caption: Any, start: Any, end: Any, invalid: Any,
                 bare_ids: Optional[Callable[[str], bool]] = None) -> Optional[tuple[str, str]]:
    if invalid:
        return ErrorKind.MALFORMED_ROW, str(invalid)
    if url is None or _is_nan(url) or (isinstance(url, str) and not url.strip()):
        return ErrorKind.MISSING_URL, "the row has no URL"
    if isinstance(url, bytes) or isinstance(caption, bytes):
        return ErrorKind.INVALID_UTF8, "the URL or caption is not valid UTF-8"
    if not isinstance(url, str):
        return ErrorKind.BAD_URL, _not_text(schema.URL, url)
    # bare_ids: what the job's backend takes besides http(s) URLs (a video job's yt-dlp: YouTube ids)
    if not url.strip().lower().startswith(("http://", "https://")) and not (bare_ids and bare_ids(url)):
        return ErrorKind.BAD_SCHEME, f"only http(s) URLs are fetched: {url[:100]!r}"
    if isinstance(caption, (list, tuple, dict)):
        return ErrorKind.MALFORMED_ROW, _not_text(schema.CAPTION, caption)
    if start is not None or end is not None:
        try:
            s = 0.0 if start is None else float(start)
            e = None if end is None else float(end)
        except (TypeError, ValueError):
            return ErrorKind.BAD_SPAN, f"clip span is not numeric: {start!r}..{end!r}"
        if s < 0 or (e is not None and e <= s):
            return ErrorKind.BAD_SPAN, f"clip span {start!r}..{end!r} is empty or negative"
    return None


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _not_text(column: str, value: Any) -> str:
    return f"column {column!r} holds a {type(value).__name__}, not text: {_text(value)}"[:200]


def _text(value: Any) -> Optional[str]:
    """What a URL or caption cell shows: text as it is, NaN as None, bytes decoded with
    replacement characters, a list or object as JSON, anything else its ``str()``."""
    if value is None or isinstance(value, str):
        return value
    if _is_nan(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_json_value(value), ensure_ascii=False)
    return str(value)


_JSON_SCALARS = (str, float, bool, type(None))
_INT64 = (-(1 << 63), (1 << 63) - 1)  # what an Arrow column infers for Python ints


def _json_value(value: Any, top: bool = True) -> Any:
    """``value`` made of JSON values only, which the status table can also store (see the module
    docstring); top-level bytes stay bytes (the writer decodes those itself, and the planner
    flags an undecodable URL or caption)."""
    if isinstance(value, str) and not top and not value.isascii():
        return _repaired(value)
    if isinstance(value, _JSON_SCALARS) or (top and isinstance(value, bytes)):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return _json_value(value.tolist(), top)
    if isinstance(value, (list, tuple)):
        return [_json_value(v, False) for v in value]
    if isinstance(value, dict):  # {} is null: Parquet cannot store a struct without fields
        return {str(k): _json_value(v, False) for k, v in value.items()} or None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return value.isoformat()
    return str(value)


def _repaired(text: str) -> str:
    """``text`` with undecodable bytes (and, defensively, any lone surrogate) replaced by U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def plan_shards(chunks: Iterable[dict[str, list]], samples_per_shard: int,
                limit: Optional[int] = None, bare_ids: Optional[Callable[[str], bool]] = None) -> Iterator[InputShard]:
    """Validate the rows of ``chunks`` and cut them into input shards of ``samples_per_shard`` rows
    (the first ``limit`` rows only, when set). ``bare_ids`` says which values that are no http(s)
    URL the job's backend fetches (:func:`pipeline.download.ytdlp.bare_ids`); None: none."""
    size = samples_per_shard
    rows: list[dict] = []
    shard_id = 0
    seen = 0
    for chunk in chunks:
        n = len(next(iter(chunk.values())))
        if limit is not None:
            n = min(n, limit - seen)
        for j in range(n):
            rows.append({k: v[j] for k, v in chunk.items()})
            if len(rows) == size:
                yield _shard(shard_id, rows, size, bare_ids)
                shard_id += 1
                rows = []
        seen += n
        if limit is not None and seen >= limit:
            break
    if rows:
        yield _shard(shard_id, rows, size, bare_ids)


def _shard(shard_id: int, rows: list[dict], size: int, bare_ids: Optional[Callable[[str], bool]] = None
           ) -> InputShard:
    n = len(rows)
    batch = {
        schema.KEY: [schema.make_key(shard_id, i, size) for i in range(n)],
        schema.STATUS: [schema.PENDING] * n,
        schema.ERROR_KIND: [None] * n,
        schema.ERROR_MESSAGE: [None] * n,
        schema.WIDTH: [None] * n,
        schema.HEIGHT: [None] * n,
        schema.ORIGINAL_WIDTH: [None] * n,
        schema.ORIGINAL_HEIGHT: [None] * n,
        schema.SHA256: [None] * n,
        schema.FILES: [{} for _ in range(n)],
    }
    names = [k for k in dict.fromkeys(k for r in rows for k in r) if k != INVALID]
    for name in names:
        text = name in (schema.URL, schema.CAPTION)  # made text below, after validation
        batch[name] = [r.get(name) if text else _json_value(r.get(name)) for r in rows]
    batch.setdefault(schema.URL, [None] * n)
    batch.setdefault(schema.CAPTION, [None] * n)
    documents = batch.get(schema.DOCUMENT)  # document rows: the page URL is no media URL
    for i, r in enumerate(rows):
        problem = (_document_problem(documents[i], r.get(INVALID)) if documents is not None else
                   _row_problem(r.get(schema.URL), r.get(schema.CAPTION), r.get(schema.CLIP_START),
                                r.get(schema.CLIP_END), r.get(INVALID), bare_ids))
        if problem:
            schema.mark(batch, i, *problem)
        for col in (schema.URL, schema.CAPTION):  # text or None from here on, failed rows included
            batch[col][i] = _text(batch[col][i])
    return InputShard(shard_id, batch)


def _document_problem(document: Any, invalid: Any) -> Optional[tuple[str, str]]:
    """Why a document row fails as a whole (``malformed_row``), or None. On the way its text
    segments are made text and each image segment gets its status: ``pending``, or
    ``invalid_input`` with the kind of its URL's problem (the image stays in the document)."""
    if invalid:
        return ErrorKind.MALFORMED_ROW, str(invalid)
    if not isinstance(document, dict) or not isinstance(document.get("segments"), list):
        return ErrorKind.MALFORMED_ROW, f"column {schema.DOCUMENT!r} is not a document with a segments list"
    segments = document["segments"]
    for n, seg in enumerate(segments):
        if not isinstance(seg, dict) or seg.get("type") not in ("text", "image"):
            return ErrorKind.MALFORMED_ROW, f"segment {n} is not a text or an image: {_text(seg)}"[:200]
        if seg["type"] == "text":
            seg["text"] = _text(seg.get("text")) or ""
            continue
        kind, message = _segment_url_problem(seg.get("url")) or (None, None)
        seg.update({schema.STATUS: kind.status if kind else schema.PENDING,  # plain text, as in KEY.json
                    schema.ERROR_KIND: kind.value if kind else None, schema.ERROR_MESSAGE: message})
        if not isinstance(seg.get("url"), str):
            seg["url"] = _text(seg.get("url"))
    if not any(s["type"] == "image" or s["text"] for s in segments):
        return ErrorKind.MALFORMED_ROW, "the document has no image and no text"
    return None


def _segment_url_problem(url: Any) -> Optional[tuple[str, str]]:
    """An image segment's URL checked as a row's is (:func:`_row_problem`), and that it parses."""
    from urllib.parse import urlsplit

    problem = _row_problem(url, None, None, None, None)
    if problem:
        return problem
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError as exc:
        return ErrorKind.BAD_URL, f"cannot parse {url[:100]!r}: {exc}"
    if not parts.hostname:
        return ErrorKind.BAD_URL, f"no host in {url[:100]!r}"
    return None

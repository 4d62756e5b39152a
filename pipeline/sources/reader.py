"""Read URL lists into input shards: fixed row slices with stable ids, streamed, never whole.

``iter_records`` streams column chunks from one file (parquet, csv, tsv, jsonl, txt; optionally
gzip'd; local or fsspec URL). ``plan_shards`` maps the job's columns, validates every row (a
malformed row becomes a per-row failure, never an exception) and cuts the stream into shards of
``output.samples_per_shard`` rows: shard ``i`` always holds input rows ``[i*S, (i+1)*S)``.
"""
from __future__ import annotations

import csv
import glob
import io
import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import fsspec

from pipeline.core import schema
from pipeline.core.config import ConfigError

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")


@dataclass
class InputShard:
    shard_id: int
    batch: dict[str, list]  # status-table columns, files={}, status pending or invalid_input


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz").removesuffix(".gzip")
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                        (".json", "jsonl"), (".ndjson", "jsonl"), (".txt", "txt")):
        if name.endswith(suffix):
            return fmt
    raise ConfigError(f"input.files: cannot tell the format of {path!r}; set input.format to one of {FORMATS}")


def expand_files(files: list[str]) -> list[str]:
    """Expand local globs (sorted, so shards are stable); URLs and plain paths pass through."""
    out: list[str] = []
    for f in files:
        if "://" not in f and any(c in f for c in "*?["):
            matches = sorted(glob.glob(f))
            if not matches:
                raise ConfigError(f"input.files: {f!r} matches no file")
            out.extend(matches)
        else:
            out.append(f)
    return out


def undecodable_to_bytes(value: Any) -> Any:
    """Strings holding undecodable bytes (surrogate-escaped) go back to bytes: flagged later."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape")
    return value


def _chunks(rows: Iterator[dict], batch_rows: int) -> Iterator[dict[str, list]]:
    buf: list[dict] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= batch_rows:
            yield _columns(buf)
            buf = []
    if buf:
        yield _columns(buf)


def _columns(rows: list[dict]) -> dict[str, list]:
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    return {n: [r.get(n) for r in rows] for n in names}


def _text_lines(f) -> io.TextIOWrapper:
    return io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")


def _delimited_rows(f, delimiter: str, header: bool, names: Optional[list[str]]) -> Iterator[dict]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(_text_lines(f), delimiter=delimiter, quoting=quoting)
    if header:
        head = next(reader, None)
        if head is None:
            return
        names = names or head
    for fields in reader:
        if not fields:
            continue
        cols = names or [f"col{i}" for i in range(len(fields))]
        yield {n: undecodable_to_bytes(v) if v != "" else None for n, v in zip(cols, fields)}


def _jsonl_rows(f) -> Iterator[dict]:
    for n, line in enumerate(_text_lines(f), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield {"_invalid": f"line {n}: not valid JSON ({e.msg})"}
            continue
        if not isinstance(obj, dict):
            yield {"_invalid": f"line {n}: expected a JSON object"}
            continue
        yield {k: undecodable_to_bytes(v) for k, v in obj.items()}


def _txt_rows(f, names: Optional[list[str]]) -> Iterator[dict]:
    name = (names or ["url"])[0]
    for line in _text_lines(f):
        line = line.strip()
        if line:
            yield {name: undecodable_to_bytes(line)}


def iter_records(path: str, fmt: Optional[str] = None, *, header: bool = True, names: Optional[list[str]] = None,
                 delimiter: Optional[str] = None, batch_rows: int = 8192,
                 columns: Optional[list[str]] = None) -> Iterator[dict[str, list]]:
    """Stream column chunks (``{name: [values]}``) of at most ``batch_rows`` rows from one file.

    Strings come as ``str``, or ``bytes`` when they are not valid UTF-8; JSON values keep their
    types. ``columns`` restricts parquet reads to those columns. A JSONL line that does not parse
    yields a row with only ``_invalid`` set (it becomes an ``invalid_input`` failure).
    """
    fmt = fmt or detect_format(path)
    with fsspec.open(path, "rb", compression="infer") as f:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
            for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
                yield rb.to_pydict()
            return
        if fmt in ("csv", "tsv"):
            rows = _delimited_rows(f, delimiter or ("," if fmt == "csv" else "\t"), header, names)
        elif fmt == "jsonl":
            rows = _jsonl_rows(f)
        elif fmt == "txt":
            rows = _txt_rows(f, names)
        else:
            raise ConfigError(f"input.format: expected one of {FORMATS}, got {fmt!r}")
        yield from _chunks(rows, batch_rows)


# -- from files to validated rows ----------------------------------------------------------------

def iter_input_chunks(spec) -> Iterator[dict[str, list]]:
    """Column chunks with normalised names (url, caption, spans, extra columns), before validation."""
    inp = spec.input
    files = expand_files(inp.files)
    if inp.catalog:
        from catalogs import load_card
        from catalogs.readers import read_rows

        yield from read_rows(load_card(inp.catalog), files, inp)
        return
    wanted = [inp.url_col] + ([inp.caption_col] if inp.caption_col else []) + list(inp.save_additional_columns)
    for path in files:
        fmt = inp.format or detect_format(path)
        for chunk in iter_records(path, fmt, columns=wanted):
            for key, col in (("url_col", inp.url_col), ("caption_col", inp.caption_col)):
                if col and col not in chunk and "_invalid" not in chunk and (key == "url_col" or fmt != "txt"):
                    hint = "; set input.caption_col: null for files without captions" if key == "caption_col" else ""
                    raise ConfigError(f"input.{key}: column {col!r} is not in {path} "
                                      f"(columns: {', '.join(chunk)}){hint}")
            n = len(next(iter(chunk.values())))
            out = {schema.URL: chunk.get(inp.url_col, [None] * n),
                   schema.CAPTION: chunk.get(inp.caption_col, [None] * n) if inp.caption_col else [None] * n}
            for col in inp.save_additional_columns:
                out[col] = chunk.get(col, [None] * n)
            if "_invalid" in chunk:
                out["_invalid"] = chunk["_invalid"]
            yield out


def _row_problem(url: Any, caption: Any, start: Any, end: Any, invalid: Any) -> Optional[tuple[str, str]]:
    if invalid:
        return "malformed_row", str(invalid)
    if url is None or (isinstance(url, str) and not url.strip()):
        return "missing_url", "the row has no URL"
    if isinstance(url, bytes) or isinstance(caption, bytes):
        return "invalid_utf8", "the URL or caption is not valid UTF-8"
    if not isinstance(url, str):
        return "missing_url", f"the URL is not a string: {url!r}"[:200]
    if not url.strip().lower().startswith(("http://", "https://")):
        return "bad_scheme", f"only http(s) URLs are fetched: {url[:100]!r}"
    if start is not None or end is not None:
        try:
            s = 0.0 if start is None else float(start)
            e = None if end is None else float(end)
        except (TypeError, ValueError):
            return "bad_span", f"clip span is not numeric: {start!r}..{end!r}"
        if s < 0 or (e is not None and e <= s):
            return "bad_span", f"clip span {start!r}..{end!r} is empty or negative"
    return None


EXCLUDED_EXTRA = {"_invalid"}


def plan_shards(spec) -> Iterator[InputShard]:
    """Validate rows and cut them into input shards of ``output.samples_per_shard`` rows."""
    size = spec.output.samples_per_shard
    limit = spec.input.limit
    rows: list[dict] = []
    shard_id = 0
    seen = 0
    for chunk in iter_input_chunks(spec):
        n = len(next(iter(chunk.values())))
        if limit is not None:
            n = min(n, limit - seen)
        for j in range(n):
            rows.append({k: v[j] for k, v in chunk.items()})
            if len(rows) == size:
                yield _shard(shard_id, rows, size)
                shard_id += 1
                rows = []
        seen += n
        if limit is not None and seen >= limit:
            break
    if rows:
        yield _shard(shard_id, rows, size)


def _shard(shard_id: int, rows: list[dict], size: int) -> InputShard:
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
    names = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in EXCLUDED_EXTRA]
    for name in names:
        batch[name] = [r.get(name) for r in rows]
    batch.setdefault(schema.CAPTION, [None] * n)
    for i, r in enumerate(rows):
        problem = _row_problem(r.get(schema.URL), r.get(schema.CAPTION), r.get(schema.CLIP_START),
                               r.get(schema.CLIP_END), r.get("_invalid"))
        if problem:
            schema.mark(batch, i, *problem)
            # keep what can be shown: undecodable values are stored with replacement characters
            for col in (schema.URL, schema.CAPTION):
                if isinstance(batch[col][i], bytes):
                    batch[col][i] = batch[col][i].decode("utf-8", "replace")
    return InputShard(shard_id, batch)


def count_rows(spec) -> Optional[int]:
    """Input rows, when cheap to know (parquet footers, no catalog reshaping); else None."""
    if spec.input.catalog:
        return None
    total = 0
    try:
        import pyarrow.parquet as pq

        for path in expand_files(spec.input.files):
            if (spec.input.format or detect_format(path)) != "parquet":
                return None
            with fsspec.open(path, "rb", compression="infer") as f:
                total += pq.ParquetFile(f).metadata.num_rows
    except (OSError, ConfigError):
        return None
    return min(total, spec.input.limit) if spec.input.limit is not None else total

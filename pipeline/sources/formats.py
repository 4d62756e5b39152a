"""Read tabular files as streams of column chunks: parquet, csv, tsv, jsonl and txt, optionally
gzip'd, local or behind an fsspec URL, never whole in memory.

Which files ``input.files`` names is :mod:`pipeline.sources.locations`' business;
``input.storage_options`` reach every filesystem that opens a URL, next to the ecosystem's own
credentials (``AWS_*`` variables, ...).

``iter_records`` streams ``{column: [values]}`` chunks from one file; strings that are not valid
UTF-8 come back as bytes, so the shard planner can flag them instead of failing on them.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Iterator, Optional

import fsspec

from pipeline.core.config import ConfigError
from pipeline.core.location import is_remote

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
INVALID = "_invalid"  # the one column of a row that could not be parsed: why


SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
            ".ndjson": "jsonl", ".txt": "txt"}


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz").removesuffix(".gzip")
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise ConfigError(f"input.files: cannot tell the format of {path!r}; set input.format to one of {FORMATS}")


def open_input(path: str, storage_options: Optional[dict[str, Any]] = None) -> Any:
    """``path`` (a local path or fsspec URL) opened for binary reading, decompressed by its suffix.
    ``storage_options`` go to the filesystem of a remote URL as they are (local files take none)."""
    options = dict(storage_options or {}) if is_remote(path) else {}
    return fsspec.open(path, "rb", compression="infer", **options)


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
            yield {INVALID: f"line {n}: not valid JSON ({e.msg})"}
            continue
        if not isinstance(obj, dict):
            yield {INVALID: f"line {n}: expected a JSON object"}
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
                 columns: Optional[list[str]] = None,
                 storage_options: Optional[dict[str, Any]] = None) -> Iterator[dict[str, list]]:
    """Stream column chunks (``{name: [values]}``) of at most ``batch_rows`` rows from one file
    (a local path or fsspec URL; ``storage_options`` as :func:`open_input` takes them).

    Strings come as ``str``, or ``bytes`` when they are not valid UTF-8; JSON values keep their
    types. ``columns`` restricts parquet reads to those columns. A JSONL line that does not parse
    yields a row with only ``INVALID`` set (it becomes an ``invalid_input`` failure).
    """
    fmt = fmt or detect_format(path)
    with open_input(path, storage_options) as f:
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


def count_rows(files: list[str], fmt: Optional[str] = None,
               storage_options: Optional[dict[str, Any]] = None) -> Optional[int]:
    """Rows in ``files`` (expanded: see ``locations.expand_files``) when cheap to know (parquet
    footers); else None."""
    total = 0
    try:
        import pyarrow.parquet as pq

        for path in files:
            if (fmt or detect_format(path)) != "parquet":
                return None
            with open_input(path, storage_options) as f:
                total += pq.ParquetFile(f).metadata.num_rows
    except (OSError, ConfigError):
        return None
    return total

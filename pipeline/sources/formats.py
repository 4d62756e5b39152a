"""Read tabular files as streams of column chunks: parquet, csv, tsv, jsonl and txt, optionally
gzip'd, local or behind an fsspec URL, never whole in memory.

Which files ``input.files`` names is :mod:`pipeline.sources.locations`' business;
``input.storage_options`` reach every filesystem that opens a URL, next to the ecosystem's own
credentials (``AWS_*`` variables, ...).

``iter_records`` streams ``{column: [values]}`` chunks from one file; strings that are not valid
UTF-8 come back as bytes, so the shard planner can flag them instead of failing on them. A row
that cannot be parsed comes back as a row with only ``INVALID`` set (why, with its line number):

* CSV is parsed strictly, so an unclosed quote ends its record at the next stray quote or at the
  end of the file; that record is one bad row and the lines it swallowed are read again. A field
  longer than ``MAX_FIELD_CHARS`` is a bad row too.
* A JSONL line that is not a JSON object, nests deeper than ``MAX_JSON_DEPTH`` or holds a string
  that is not text (a lone surrogate such as ``"\\ud800"``) is a bad row.

A leading byte-order mark is dropped from text files. A file that cannot be read at all (missing,
truncated, not the format it claims) raises :class:`InputFileError` naming it.
"""
from __future__ import annotations

import csv
import io
import json
import zlib
from typing import Any, Iterator, Optional

import fsspec
import pyarrow as pa

from pipeline.core.config import ConfigError
from pipeline.core.location import is_remote

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
INVALID = "_invalid"  # the one column of a row that could not be parsed: why
MAX_FIELD_CHARS = 1 << 20  # a CSV/TSV field longer than this (1 Mi characters) makes its row invalid
MAX_JSON_DEPTH = 64  # a JSONL value nested deeper makes its row invalid (no caption or metadata is)


SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
            ".ndjson": "jsonl", ".txt": "txt"}


class InputFileError(ValueError):
    """An input file that cannot be read at all (missing, truncated, not the format it claims);
    the message names the file, how far it was read and the problem."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class _Unreadable(Exception):
    """A problem that makes the rest of a file unreadable, found by a row reader (which has no path)."""


# What reading a broken file raises: missing or unreadable (OSError, gzip's BadGzipFile included),
# a compressed stream cut short (EOFError, zlib.error), not parquet (ArrowException).
_READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowException)


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


def _read_problem(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file (it is missing or vanished)"
    if isinstance(error, (EOFError, zlib.error)):
        return f"the compressed data is truncated or corrupt ({error})"
    if isinstance(error, pa.ArrowException):
        return f"not a readable parquet file ({error})"
    return f"cannot be read ({type(error).__name__}: {error})"


def _chunks(rows: Iterator[dict], batch_rows: int, read: list[int]) -> Iterator[dict[str, list]]:
    """Rows gathered into column chunks; ``read[0]`` counts the rows read so far (for messages)."""
    buf: list[dict] = []
    for row in rows:
        buf.append(row)
        read[0] += 1
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
    # utf-8-sig drops a leading byte-order mark (else it sticks to the first URL or header name)
    return io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")


# -- csv / tsv -------------------------------------------------------------------------------------
class _Lines:
    """The physical lines of a text file, numbered from 1, as the csv reader takes them. The lines
    handed out since ``start()`` are ``taken``; lines given back are handed out again first."""

    def __init__(self, text: Iterator[str]):
        self._text = text
        self._back: list[tuple[int, str]] = []  # a stack: the next line to hand out is last
        self._count = 0
        self.taken: list[tuple[int, str]] = []

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        if self._back:
            number, line = self._back.pop()
        else:
            line = next(self._text)
            self._count += 1
            number = self._count
        self.taken.append((number, line))
        return line

    def start(self) -> None:
        self.taken = []

    def give_back(self, lines: list[tuple[int, str]]) -> None:
        self._back.extend(reversed(lines))


def _csv_records(lines: _Lines, delimiter: str) -> Iterator[tuple[int, Optional[list[str]], Optional[str]]]:
    """``(line, fields, None)`` per record, or ``(line, None, why)`` for one that is not valid CSV;
    the lines after the first of a bad record are read again (an unclosed quote swallowed them)."""
    csv.field_size_limit(MAX_FIELD_CHARS)  # process-wide; the csv module has no per-reader limit
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True)
    while True:
        lines.start()
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            (first, _), *swallowed = lines.taken
            yield first, None, _csv_problem(e, swallowed)
            lines.give_back(swallowed)
            reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True)
            continue
        yield lines.taken[0][0], fields, None


def _csv_problem(error: csv.Error, swallowed: list[tuple[int, str]]) -> str:
    why = (f"a field is longer than {MAX_FIELD_CHARS} characters" if "field limit" in str(error)
           else f"not valid CSV ({error})")
    if swallowed:
        why += (f"; a quote opened here is not closed where expected (lines {swallowed[0][0]}-"
                f"{swallowed[-1][0]} are read again as rows of their own)")
    return why


def _delimited_rows(f, delimiter: str, header: bool, names: Optional[list[str]]) -> Iterator[dict]:
    records = _csv_records(_Lines(_text_lines(f)), delimiter)
    if header:
        first = next(records, None)
        if first is None:
            return
        line, head, why = first
        if head is None:
            raise _Unreadable(f"line {line}: the header is {why}")
        names = names or head
    for line, fields, why in records:
        if why is not None:
            yield {INVALID: f"line {line}: {why}"}
            continue
        if not fields:
            continue
        cols = names or [f"col{i}" for i in range(len(fields))]
        yield {n: undecodable_to_bytes(v) if v != "" else None for n, v in zip(cols, fields)}


# -- jsonl -----------------------------------------------------------------------------------------
def _json_problem(line: str, obj: dict) -> Optional[str]:
    """Why the object parsed from ``line`` cannot be a row (too deep, or a string or key that is not
    text), or None. Undecodable bytes in strings are not a problem here: a column's value goes back
    to bytes (:func:`undecodable_to_bytes`), flagged ``invalid_utf8`` later, and the readers of
    nested values treat them alike."""
    shallow = line.count("[") + line.count("{") <= MAX_JSON_DEPTH
    if shallow and "\\ud" not in line and "\\uD" not in line and _is_text(line):
        return None  # the common case, without a walk: too few brackets, no surrogate escape or byte
    for column, value in obj.items():
        if not _is_text(column):
            return f"a column name is not text: {column!r}"[:200]
        stack = [(value, 1)]
        while stack:
            v, depth = stack.pop()
            if depth > MAX_JSON_DEPTH:
                return f"column {column!r} nests deeper than {MAX_JSON_DEPTH} levels"
            if isinstance(v, str) and not _bytes_or_text(v):
                return f"column {column!r} holds a string that is not text (a lone surrogate such as \\ud800)"
            if isinstance(v, dict):
                if not all(_is_text(k) for k in v):
                    return f"column {column!r} holds a key that is not text"
                stack.extend((x, depth + 1) for x in v.values())
            elif isinstance(v, list):
                stack.extend((x, depth + 1) for x in v)
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _bytes_or_text(s: str) -> bool:
    """Text, or text with surrogate-escaped bytes (what the reader made of undecodable input): no
    lone surrogate from a JSON escape such as ``\\ud800``."""
    try:
        s.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def _jsonl_rows(f) -> Iterator[dict]:
    for n, line in enumerate(_text_lines(f), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
            yield {INVALID: f"line {n}: not valid JSON ({getattr(e, 'msg', e)})"}
            continue
        except RecursionError:
            yield {INVALID: f"line {n}: nests deeper than {MAX_JSON_DEPTH} levels"}
            continue
        if not isinstance(obj, dict):
            yield {INVALID: f"line {n}: expected a JSON object"}
            continue
        why = _json_problem(line, obj)
        if why:
            yield {INVALID: f"line {n}: {why}"}
            continue
        yield {k: undecodable_to_bytes(v) for k, v in obj.items()}


# -- txt, parquet ----------------------------------------------------------------------------------
def _txt_rows(f, names: Optional[list[str]]) -> Iterator[dict]:
    name = (names or ["url"])[0]
    for line in _text_lines(f):
        line = line.strip()
        if line:
            yield {name: undecodable_to_bytes(line)}


def _parquet_chunks(f, batch_rows: int, columns: Optional[list[str]], read: list[int]) -> Iterator[dict[str, list]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
    for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
        read[0] += rb.num_rows
        yield {name: _parquet_values(column) for name, column in zip(rb.schema.names, rb.columns)}


def _parquet_values(column: pa.Array) -> list:
    """A column's values; binary columns as text where it is valid UTF-8, else bytes (flagged later),
    and string columns alike (writers that skip validation leave invalid UTF-8 in them)."""
    if pa.types.is_dictionary(column.type):  # categoricals: judged by their values, as plain columns are
        column = column.dictionary_decode()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            return column.to_pylist()
        except UnicodeDecodeError:
            column = column.view(pa.binary() if pa.types.is_string(column.type) else pa.large_binary())
    elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return column.to_pylist()
    try:
        return column.cast(pa.large_string()).to_pylist()  # all valid: one check in Arrow
    except pa.ArrowInvalid:
        return [_utf8_or_bytes(v) for v in column.to_pylist()]


def _utf8_or_bytes(value: Optional[bytes]) -> Any:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


# -- one file --------------------------------------------------------------------------------------
def iter_records(path: str, fmt: Optional[str] = None, *, header: bool = True, names: Optional[list[str]] = None,
                 delimiter: Optional[str] = None, batch_rows: int = 8192,
                 columns: Optional[list[str]] = None,
                 storage_options: Optional[dict[str, Any]] = None) -> Iterator[dict[str, list]]:
    """Stream column chunks (``{name: [values]}``) of at most ``batch_rows`` rows from one file
    (a local path or fsspec URL; ``storage_options`` as :func:`open_input` takes them).

    Strings come as ``str``, or ``bytes`` when they are not valid UTF-8 (parquet binary columns
    too); JSON values keep their types. ``columns`` restricts parquet reads to those columns. A row
    that does not parse yields a row with only ``INVALID`` set (it becomes an ``invalid_input``
    failure). A file that cannot be read raises :class:`InputFileError`, after the chunks read
    before the problem.
    """
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ConfigError(f"input.format: expected one of {FORMATS}, got {fmt!r}")
    read = [0]  # rows read so far, for the message of a file that breaks off
    try:
        with open_input(path, storage_options) as f:
            if fmt == "parquet":
                yield from _parquet_chunks(f, batch_rows, columns, read)
                return
            if fmt in ("csv", "tsv"):
                rows = _delimited_rows(f, delimiter or ("," if fmt == "csv" else "\t"), header, names)
            elif fmt == "jsonl":
                rows = _jsonl_rows(f)
            else:
                rows = _txt_rows(f, names)
            yield from _chunks(rows, batch_rows, read)
    except _READ_ERRORS as e:
        raise InputFileError(path, f"{_read_problem(e)}, after {read[0]} rows") from e
    except _Unreadable as e:
        raise InputFileError(path, str(e)) from None


def count_rows(files: list[str], fmt: Optional[str] = None,
               storage_options: Optional[dict[str, Any]] = None) -> Optional[int]:
    """Rows in ``files`` (expanded: see ``locations.expand_files``) when cheap to know (parquet
    footers); else None. A parquet file whose footer cannot be read raises :class:`InputFileError`."""
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        try:
            if (fmt or detect_format(path)) != "parquet":
                return None
        except ConfigError:
            return None
        try:
            with open_input(path, storage_options) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        except _READ_ERRORS as e:
            raise InputFileError(path, _read_problem(e)) from e
    return total

"""Read a catalogued dataset's published files into chunks of normalised columns.

``read_rows(card, files, input_spec)`` streams ``{column: [values]}`` chunks, one row per output
sample, with the names of :data:`catalogs.card.COLUMNS` (``url``, ``caption``, ``clip_start`` ...).
The card's ``reader`` section says how:

* ``layout: table`` -- one source row is one sample (CC3M/CC12M TSV, LAION/COYO/DataComp parquet,
  WebVid CSV, InternVid JSONL). Columns are renamed without touching each value, except time
  columns (ISO-8601 durations, ``HH:MM:SS.mmm``) and ids expanded through ``url_template``.
* ``layout: explode`` -- one source row holds lists, taken in parallel, one sample per element
  (Panda-70M timestamp/caption lists, HD-VILA clip lists, OBELICS and MMC4 documents).

Rows are parsed, never validated: a value that cannot be parsed is passed on as it is, and a row
whose lists cannot be exploded becomes one row carrying ``INVALID`` (the shard planner records it
as a failed input row). Values in ``input.save_additional_columns`` are source paths, kept under
their own names.
"""
from __future__ import annotations

import ast
import json
from typing import Any, Iterator, Optional

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.sources.formats import FORMATS, INVALID, iter_records, undecodable_to_bytes

from .card import TIME_COLUMNS, Card, Reader
from .locate import resolve_files
from .rowpath import Path, compile_path
from .timeparse import to_seconds


def read_rows(card: Card, files: list[str], input_spec: Any = None,
              batch_rows: int = 8192) -> Iterator[dict[str, list]]:
    """Stream normalised column chunks of ``files`` read with ``card``'s layout and column map."""
    plan = ReadPlan(card, input_spec)
    fmt = getattr(input_spec, "format", None) or card.metadata.format
    if fmt not in FORMATS:
        raise ConfigError(f"input.catalog: {card.name} is published as {card.metadata.format!r}, "
                          "which has no reader; set input.format if you converted the files")
    for path in resolve_files(card, files):
        first = True
        for chunk in iter_records(path, fmt, header=card.metadata.header, names=card.metadata.names or None,
                                  batch_rows=batch_rows, columns=sorted(plan.source_columns),
                                  storage_options=getattr(input_spec, "storage_options", None)):
            if first:
                plan.check_columns(chunk, path)
                first = False
            out = plan.apply(chunk)
            if out and len(next(iter(out.values()))):
                yield out


class ReadPlan:
    """A card's reader compiled once: which source columns to read and how to map them."""

    def __init__(self, card: Card, input_spec: Any = None):
        if card.reader is None:
            raise ConfigError(
                f"input.catalog: the column layout of {card.name} is not confirmed, so it has no reader; "
                "list the files under input.files with url_col / caption_col instead")
        self.card = card
        self.reader: Reader = card.reader
        columns = dict(self.reader.columns)
        # The job's url_col / caption_col override the card when they differ from the defaults.
        url_col = getattr(input_spec, "url_col", "url")
        caption_col = getattr(input_spec, "caption_col", "caption")
        if url_col and url_col != "url":
            columns["url"] = url_col
        if caption_col and caption_col != "caption":
            columns["caption"] = caption_col
        self.columns = {name: compile_path(p) for name, p in columns.items()}
        extras = list(getattr(input_spec, "save_additional_columns", []) or [])
        self.extras = {name: compile_path(name) for name in extras if name not in self.columns}
        self.explode = [compile_path(p) for p in self.reader.explode]
        self.skip_null: Optional[Path] = compile_path(self.reader.skip_null) if self.reader.skip_null else None
        self.parse = list(self.reader.parse)
        used = [*self.columns.values(), *self.extras.values(), *self.explode,
                *([self.skip_null] if self.skip_null else [])]
        self.source_columns = {c for p in used for c in p.columns()} - {"@index"}

    def check_columns(self, chunk: dict[str, list], path: str) -> None:
        """The URL column and the lists to explode must exist; a wrong file fails loudly, not row by row."""
        if set(chunk) <= {INVALID}:
            return
        needed = [self.columns["url"], *self.explode]
        missing = [p.text for p in needed if not (p.columns() - {"@index"}) & set(chunk)]
        if missing:
            raise ConfigError(f"input.files: {path} has no column {', '.join(map(repr, missing))} that the "
                              f"{self.card.name} card reads (columns: {', '.join(sorted(chunk))})")

    # -- chunk level -------------------------------------------------------------------------------
    def apply(self, chunk: dict[str, list]) -> dict[str, list]:
        if self.reader.layout == "table" and not self.parse:
            return self._table(chunk)
        return self._rows(chunk)

    def _names(self) -> list[str]:
        names = [n for n in self.columns if n != "clip_span"]
        if "clip_span" in self.columns:
            names += [schema.CLIP_START, schema.CLIP_END]
        return names + list(self.extras)

    def _table(self, chunk: dict[str, list]) -> dict[str, list]:
        n = _length(chunk)
        out: dict[str, list] = {}
        rows = None
        for name, path in [*self.columns.items(), *self.extras.items()]:
            path = path.pick(chunk)
            if isinstance(path, Path) and path.is_column:
                values = chunk.get(path.column, [None] * n)
            else:
                rows = rows if rows is not None else _row_dicts(chunk, n)
                values = [undecodable_to_bytes(path.resolve(r)) for r in rows]
            self._put(out, name, list(values))
        if INVALID in chunk:
            out[INVALID] = chunk[INVALID]
        return out

    def _put(self, out: dict[str, list], name: str, values: list) -> None:
        if name == "clip_span":
            out[schema.CLIP_START], out[schema.CLIP_END] = _split_spans(values)
            return
        if name in TIME_COLUMNS:
            values = [to_seconds(v) for v in values]
        elif name == "url" and self.reader.url_template:
            values = [_expand(self.reader.url_template, v) for v in values]
        out[name] = values

    # -- row level (parse and explode) -----------------------------------------------------------
    def _rows(self, chunk: dict[str, list]) -> dict[str, list]:
        names = self._names()
        out: dict[str, list] = {n: [] for n in names}
        out[INVALID] = []
        raw: dict[str, list] = {n: [] for n in self.columns if n in TIME_COLUMNS or n in ("clip_span", "url")}
        for row in _row_dicts(chunk, _length(chunk)):
            for element, problem in self._elements(row):
                if problem:
                    for n in names:
                        out[n].append(None)
                    for n in raw:
                        raw[n].append(None)
                    out[INVALID].append(problem)
                    continue
                for name, path in self.columns.items():
                    value = undecodable_to_bytes(path.resolve(element))
                    if name in raw:
                        raw[name].append(value)
                    else:
                        out[name].append(value)
                for name, path in self.extras.items():
                    out[name].append(undecodable_to_bytes(path.resolve(element)))
                out[INVALID].append(None)
        for name, values in raw.items():
            self._put(out, name, values)
        if not any(out[INVALID]):
            del out[INVALID]
        return out

    def _elements(self, row: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Optional[str]]]:
        if row.get(INVALID):
            yield row, str(row[INVALID])
            return
        for col in self.parse:
            value = row.get(col)
            if isinstance(value, (str, bytes)):
                parsed, ok = parse_literal(value)
                if not ok:
                    yield row, f"column {col!r} is not a JSON or Python literal: {_short(value)}"
                    return
                row[col] = parsed
        if self.reader.layout == "table":
            yield row, None
            return
        lists = []
        for path in self.explode:
            value = path.resolve(row)
            if not isinstance(value, (list, tuple)):
                yield row, f"{path.text!r} is not a list: {_short(value)}"
                return
            lists.append(value)
        if len({len(v) for v in lists}) > 1:
            sizes = ", ".join(f"{p.text}={len(v)}" for p, v in zip(self.explode, lists))
            yield row, f"lists to explode differ in length ({sizes})"
            return
        for i, items in enumerate(zip(*lists)):
            element = dict(row)
            element["@index"] = i
            for path, item in zip(self.explode, items):
                element[path.column] = item if path.is_column else _set_in(row[path.column], path, item)
            if self.skip_null is not None and self.skip_null.resolve(element) is None:
                continue
            yield element, None


# -- helpers ---------------------------------------------------------------------------------------

def parse_literal(value: str | bytes) -> tuple[Any, bool]:
    """JSON first, then a Python literal (Panda-70M writes lists with single quotes)."""
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    if not text.strip():
        return None, True
    try:
        return json.loads(text), True
    except ValueError:
        pass
    try:
        return ast.literal_eval(text.strip()), True
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None, False


def _set_in(container: Any, path: Path, item: Any) -> Any:
    """Explode a nested list (``doc.images``): a copy of the container with the list replaced by one item."""
    if not isinstance(container, dict) or len(path.segments) != 2:
        return item
    copy = dict(container)
    copy[path.segments[1].name] = item
    return copy


def _split_spans(values: list) -> tuple[list, list]:
    starts, ends = [], []
    for v in values:
        if v is None:
            starts.append(None)
            ends.append(None)
        elif isinstance(v, (list, tuple)) and len(v) == 2:
            starts.append(to_seconds(v[0]))
            ends.append(to_seconds(v[1]))
        else:  # not a pair: pass it on so the planner reports a bad span with the original value
            starts.append(v if not isinstance(v, (list, tuple)) else repr(v))
            ends.append(None)
    return starts, ends


def _expand(template: str, value: Any) -> Any:
    if isinstance(value, str) and value.strip() and "://" not in value:
        return template.format(value.strip())
    return value


def _length(chunk: dict[str, list]) -> int:
    return len(next(iter(chunk.values()))) if chunk else 0


def _row_dicts(chunk: dict[str, list], n: int) -> list[dict[str, Any]]:
    names = list(chunk)
    cols = [chunk[k] for k in names]
    return [dict(zip(names, vals)) for vals in zip(*cols)] if names else [{} for _ in range(n)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

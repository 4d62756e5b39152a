"""Read a catalogued dataset's published files into chunks of normalised columns.

``read_rows(card, files, input_spec)`` streams ``{column: [values]}`` chunks, one row per output
sample, with the names of :data:`catalogs.card.COLUMNS` (``url``, ``caption``, ``clip_start`` ...).
The card's ``reader`` section says how:

* ``layout: table`` -- one source row is one sample (CC3M/CC12M TSV, LAION/COYO/DataComp parquet,
  WebVid CSV, InternVid JSONL). Columns are renamed without touching each value, except time
  columns (ISO-8601 durations, ``HH:MM:SS.mmm``) and ids expanded through ``url_template``.
* ``layout: explode`` -- one source row holds lists, taken in parallel, one sample per element
  (Panda-70M timestamp/caption lists, HD-VILA clip lists; OBELICS and MMC4 as image-text pairs).
* ``layout: document`` -- one source row is one interleaved document (OBELICS, MMC4, OmniCorpus):
  the column ``document`` (:mod:`catalogs.documents`), ``url`` the page, plus the card's
  ``document.columns``. It is such a card's default; ``documents=False`` reads its pair layout.

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
from .documents import DocumentPlan, short as _short
from .locate import resolve_files
from .rowpath import Path, compile_path
from .timeparse import to_seconds


def read_rows(card: Card, files: list[str], input_spec: Any = None, batch_rows: int = 8192,
              documents: Optional[bool] = None) -> Iterator[dict[str, list]]:
    """Stream normalised column chunks of ``files`` read with ``card``'s layout and column map:
    one row per document (``documents=True``), per image-text sample (False), or as the card
    says (None: its ``reader.layout``)."""
    plan = ReadPlan(card, input_spec, documents)
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


def reader_layout(card: Card, documents: Optional[bool] = None) -> str:
    """The layout a read of ``card`` uses (see :func:`read_rows`); a ConfigError when it has none."""
    if card.reader is None:
        raise ConfigError(
            f"input.catalog: the column layout of {card.name} is not confirmed, so it has no reader; "
            "list the files under input.files with url_col / caption_col instead")
    if documents is None:
        return card.reader.layout
    if documents:
        if card.reader.document is None:
            raise ConfigError(f"download.media: 'document' reads one document per row, and the {card.name} "
                              "card has no document reader (its samples are not interleaved documents)")
        return "document"
    if card.reader.pair_layout is None:
        raise ConfigError(f"input.catalog: the {card.name} card reads documents only; "
                          "set download.media: document")
    return card.reader.pair_layout


class ReadPlan:
    """A card's reader compiled once: which source columns to read and how to map them."""

    def __init__(self, card: Card, input_spec: Any = None, documents: Optional[bool] = None):
        self.layout = reader_layout(card, documents)
        self.card = card
        self.reader: Reader = card.reader
        self.document = DocumentPlan(self.reader.document) if self.layout == "document" else None
        columns = dict(self.reader.columns) if self.layout != "document" else {}
        # The job's url_col / caption_col override the card when they differ from the defaults.
        url_col = getattr(input_spec, "url_col", "url")
        caption_col = getattr(input_spec, "caption_col", "caption")
        if url_col and url_col != "url" and self.document is None:
            columns["url"] = url_col
        if caption_col and caption_col != "caption" and self.document is None:
            columns["caption"] = caption_col
        self.columns = {name: compile_path(p) for name, p in columns.items()}
        extras = list(getattr(input_spec, "save_additional_columns", []) or [])
        self.extras = {name: compile_path(name) for name in extras if name not in self.columns}
        self.explode = [compile_path(p) for p in self.reader.explode]
        self.skip_null: Optional[Path] = compile_path(self.reader.skip_null) if self.reader.skip_null else None
        self.parse = list(self.reader.parse)
        if self.document is not None:
            self.explode, self.skip_null = [], None
        used = [*self.columns.values(), *self.extras.values(), *self.explode,
                *([self.skip_null] if self.skip_null else []), *(self.document.paths() if self.document else [])]
        self.source_columns = {c for p in used for c in p.columns()} - {"@index"}

    def check_columns(self, chunk: dict[str, list], path: str) -> None:
        """The URL column and the lists to explode must exist; a wrong file fails loudly, not row by row."""
        if chunk and set(chunk) <= {INVALID}:  # rows that did not parse say nothing of the columns
            return
        needed = self.document.required() if self.document else [self.columns["url"], *self.explode]
        missing = [p.text for p in needed if not (p.columns() - {"@index"}) & set(chunk)]
        if missing:
            raise ConfigError(f"input.files: {path} has no column {', '.join(map(repr, missing))} that the "
                              f"{self.card.name} card reads (columns: {', '.join(sorted(chunk))})")

    # -- chunk level -------------------------------------------------------------------------------
    def apply(self, chunk: dict[str, list]) -> dict[str, list]:
        if self.document is not None:
            return self._documents(chunk)
        if self.layout == "table" and not self.parse:
            return self._table(chunk)
        return self._rows(chunk)

    def _documents(self, chunk: dict[str, list]) -> dict[str, list]:
        """One row per source row: its document, the document's columns and the extra columns."""
        names = [schema.URL, *[n for n in self.document.columns if n != schema.URL], *self.extras]
        out: dict[str, list] = {n: [] for n in [*names, schema.DOCUMENT, INVALID]}
        for row in _row_dicts(chunk, _length(chunk)):
            document, problem = None, None
            for element, problem in self._elements(row):  # parse only: layout document is not exploded
                row = element
            if not problem:
                document, problem = self.document.build(row)
            values = {} if problem else {**self.document.row_columns(row),
                                         **{n: undecodable_to_bytes(p.resolve(row)) for n, p in self.extras.items()}}
            for n in names:
                out[n].append(values.get(n))
            out[schema.DOCUMENT].append(document)
            out[INVALID].append(problem)
        if not any(out[INVALID]):
            del out[INVALID]
        return out

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
        if self.layout in ("table", "document"):
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

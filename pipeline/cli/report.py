"""``mmcurate report OUTPUT_DIR``: one self-contained HTML page about a job's output.

Totals, statuses, error kinds, rejections per filter, time per stage, and histograms drawn with
matplotlib and embedded as PNG: every score (those the job's filters computed and the published
ones kept from the input, found by :mod:`pipeline.cli.report_scores`, with the thresholds drawn
and written under each), original size, aspect ratio and caption length, each split into
samples written and samples dropped. A video output adds the clip duration, per clip (a row cut
into scenes counts each clip of its ``scenes``; any other row its ``duration``, else ``clip_end -
clip_start``), and its per-clip match scores (``clip_scores``) next to the rows' ``clip_score``;
clips a filter dropped from a row it kept are no longer in the status table, so they are not drawn. It reads the per-shard sidecars (``NNNNN_stats.json``,
``NNNNN.parquet``) and ``manifest.json`` one shard at a time, in two passes (the scores' ranges,
then fixed-bin histograms over them), so memory does not grow with the job. OUTPUT_DIR is a local
path or an fsspec URL (``s3://``, ``gs://``, ``memory://`` ...), read through
:class:`pipeline.sinks.storage.Directory`; the page is written next to the shards unless ``--out``
says where (a path or URL).
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cli import report_scores
from pipeline.cli.inspect import open_output
from pipeline.core import document, schema
from pipeline.sinks.storage import Directory

SHARD_STATS = re.compile(r"^(\d{5,})_stats\.json$")
SCORE_BINS = 100
MARK_COLOURS = ("black", "#c0392b", "#27ae60", "#8e44ad")
SCORE_LIMIT = 1e12  # no score is this large; a value that is still gets drawn


@dataclass
class Histogram:
    """Counts over fixed bin edges, split into samples written to the tars and samples dropped;
    values outside the edges land in the first or last bin."""

    title: str
    xlabel: str
    edges: np.ndarray
    log_x: bool = False
    kept: np.ndarray = field(init=False)
    dropped: np.ndarray = field(init=False)
    marks: list[tuple[float, str]] = field(default_factory=list)  # vertical lines: (x, label)
    note: str = ""  # what it shows, under the plot

    def __post_init__(self) -> None:
        self.kept = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.dropped = np.zeros(len(self.edges) - 1, dtype=np.int64)

    def add(self, values: np.ndarray, kept: np.ndarray) -> None:
        ok = np.isfinite(values)
        values, kept = values[ok], kept[ok]
        bins = np.clip(np.searchsorted(self.edges, values, side="right") - 1, 0, len(self.edges) - 2)
        self.kept += np.bincount(bins[kept], minlength=len(self.kept))
        self.dropped += np.bincount(bins[~kept], minlength=len(self.dropped))

    @property
    def total(self) -> int:
        return int(self.kept.sum() + self.dropped.sum())

    def png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        used = np.nonzero(self.kept + self.dropped)[0]
        marked = np.searchsorted(self.edges, [x for x, _ in self.marks], side="right") - 1
        used = np.concatenate([used, np.clip(marked, 0, len(self.kept) - 1)])  # thresholds stay in view
        lo, hi = max(used.min() - 3, 0), min(used.max() + 4, len(self.kept))  # a little margin
        edges = self.edges[lo:hi + 1]
        fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
        widths = np.diff(edges)
        ax.bar(edges[:-1], self.kept[lo:hi], width=widths, align="edge", color="#3b7dd8", label="written")
        ax.bar(edges[:-1], self.dropped[lo:hi], width=widths, align="edge", bottom=self.kept[lo:hi],
               color="#d8893b", label="dropped")
        for n, (x, label) in enumerate(self.marks):  # one colour per threshold (min, max, top_fraction ...)
            ax.axvline(x, color=MARK_COLOURS[n % len(MARK_COLOURS)], linestyle="--", linewidth=1, label=label)
        if self.log_x:
            from matplotlib.ticker import FormatStrFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(FormatStrFormatter("%g" if edges[-1] / edges[0] < 10 else ""))
        ax.set_title(self.title)
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        plt.close(fig)
        return buf.getvalue()


def _histograms() -> dict[str, Histogram]:
    return {
        "size": Histogram("Original size", "longer side (pixels)", np.geomspace(1, 65536, 97), log_x=True),
        "aspect": Histogram("Aspect ratio", "width / height", np.geomspace(1 / 16, 16, 97), log_x=True),
        "caption": Histogram("Caption length", "words", np.arange(0, 102, 2)),
        # video outputs only (left out of the page elsewhere): 0.1 s to 1 h
        DURATION: Histogram("Clip duration", "seconds", np.geomspace(0.1, 3600, 97), log_x=True,
                            note="per clip: each scene of a row cut into scenes"),
        # document outputs only
        IMAGES: Histogram("Images per document", "image slots", np.arange(0, 66, 1) - 0.5,
                          note="kept or dropped: the document; sizes and aspect ratios above are per image"),
    }


DURATION, SCENES = "duration", "scenes"  # the video stage's columns
IMAGES = "images_total"                  # the document stage's column
OPTIONAL = (DURATION, IMAGES)  # histograms an output without videos, or without documents, leaves out


def _per_row(table: pa.Table, values: Optional[np.ndarray]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    return None if values is None else (values, np.arange(table.num_rows))


def _list_column(table: pa.Table, name: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """A list-of-numbers column flattened: its values and the row each belongs to."""
    if name not in table.column_names:
        return None
    column = table.column(name).combine_chunks()
    if not pa.types.is_list(column.type) or not (pa.types.is_floating(column.type.value_type)
                                                 or pa.types.is_integer(column.type.value_type)):
        return None
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float64)
    return values, pc.list_parent_indices(column).to_numpy(zero_copy_only=False)


def _clip_durations(table: pa.Table) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Seconds per clip and the row of each: a scene row's clips from ``scenes``, other rows'
    ``duration`` (else ``clip_end - clip_start``); None for an output without clips."""
    per_row = _column(table, DURATION)
    start, end = _column(table, schema.CLIP_START), _column(table, schema.CLIP_END)
    if per_row is None and start is not None and end is not None:
        per_row = end - start
    if per_row is None:
        per_row = np.full(table.num_rows, np.nan)
    rows = np.arange(table.num_rows)
    column = table.column(SCENES).combine_chunks() if SCENES in table.column_names else None
    if column is None or not pa.types.is_list(column.type) or not pa.types.is_struct(column.type.value_type) \
            or {"start", "end"} - {f.name for f in column.type.value_type}:
        return None if np.isnan(per_row).all() else (per_row, rows)
    clips = pc.list_flatten(column)
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    seconds = (pc.struct_field(clips, "end").to_numpy(zero_copy_only=False).astype(np.float64)
               - pc.struct_field(clips, "start").to_numpy(zero_copy_only=False).astype(np.float64))
    plain = np.setdiff1d(rows, parents)  # rows with one clip (a span, or no scene cut)
    return np.concatenate([per_row[plain], seconds]), np.concatenate([plain, parents])


def _segment_scores(table: pa.Table, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A document output's per-image scores (``clip_score`` of image 2 is a field of its segment):
    per score its values, the row of each, and whether the image itself is kept."""
    found: dict[str, tuple[list, list, list]] = {n: ([], [], []) for n in names}
    if schema.DOCUMENT in table.column_names:
        for row, value in enumerate(table.column(schema.DOCUMENT).to_pylist()):
            for seg in document.image_slots(document.as_document(value) if value else {}):
                for name in names:
                    if isinstance(seg.get(name), (int, float)):
                        found[name][0].append(float(seg[name]))
                        found[name][1].append(row)
                        found[name][2].append(seg.get(schema.STATUS) == schema.SUCCESS)
    return {n: (np.array(v, np.float64), np.array(r, np.int64), np.array(k, bool)) for n, (v, r, k) in found.items() if v}


def _document_values(table: pa.Table, kept: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """A document output's sizes and aspect ratios per image (kept: the image is in a kept
    document) and its text's words per document, from the ``document`` column; none elsewhere."""
    if schema.DOCUMENT not in table.column_names:
        return []
    sizes, aspects, image_kept, words = [], [], [], []
    for row, value in enumerate(table.column(schema.DOCUMENT).to_pylist()):
        doc = document.as_document(value) if value else {}
        words.append(len(document.full_text(doc).split()))
        for seg in document.image_slots(doc):
            w, h = seg.get(schema.ORIGINAL_WIDTH), seg.get(schema.ORIGINAL_HEIGHT)
            if w and h:
                sizes.append(max(w, h))
                aspects.append(w / h)
                image_kept.append(bool(kept[row]) and seg.get(schema.STATUS) == schema.SUCCESS)
    image_kept = np.array(image_kept, dtype=bool)
    return [("size", np.array(sizes, np.float64), image_kept), ("aspect", np.array(aspects, np.float64), image_kept),
            ("caption", np.array(words, np.float64), kept)]


def _column(table: pa.Table, name: str) -> Optional[np.ndarray]:
    if name not in table.column_names:
        return None
    column = table.column(name)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        return None  # e.g. all null: the stage never scored anything here; or text, not a score
    return column.to_numpy(zero_copy_only=False).astype(np.float64)


def _words(table: pa.Table) -> Optional[np.ndarray]:
    if schema.CAPTION not in table.column_names:
        return None
    captions = table.column(schema.CAPTION)
    if not pa.types.is_string(captions.type) and not pa.types.is_large_string(captions.type):
        return None
    words = pc.list_value_length(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(captions)))
    return words.to_numpy(zero_copy_only=False).astype(np.float64)


@dataclass
class Summary:
    output_dir: str  # a path or URL
    manifest: dict[str, Any]
    shards: int = 0
    tar_bytes: int = 0
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)  # the kinds that are filters' names
    timings: Counter = field(default_factory=Counter)
    histograms: dict[str, Histogram] = field(default_factory=_histograms)  # scores by column, then the rest
    notes: list[str] = field(default_factory=list)  # what the report could not use, and why

    @property
    def rows(self) -> int:
        return sum(self.statuses.values())


def summarize(output_dir: str | Path | Directory, storage_options: Optional[dict[str, Any]] = None) -> Summary:
    directory = open_output(output_dir, storage_options)
    names = directory.names()
    stats_files = [n for n in names if SHARD_STATS.match(n)]
    if not stats_files:
        raise FileNotFoundError(f"{directory.url}: no complete shard (no NNNNN_stats.json) to report on")
    manifest = json.loads(directory.read_bytes("manifest.json")) if "manifest.json" in names else {}
    tables = [t for t in (n.replace("_stats.json", ".parquet") for n in stats_files) if t in names]
    scores = report_scores.plan(manifest if isinstance(manifest, dict) else {})
    summary = Summary(directory.url, manifest, notes=scores.notes)
    drawn = _score_histograms(directory, tables, scores)
    for clash in sorted(drawn.keys() & summary.histograms.keys()):  # an input column called "aspect"
        summary.notes.append(f"{clash}: the name of one of the report's own histograms; not drawn")
        del drawn[clash]
    summary.histograms = h = {**drawn, **summary.histograms}
    for name in stats_files:
        stats = json.loads(directory.read_bytes(name))
        summary.shards += 1
        summary.tar_bytes += stats.get("tar_bytes", 0)
        summary.statuses.update(stats.get("status_counts", stats.get("counts", {})))
        summary.kinds.update(stats.get("error_kinds", {}))
        summary.filtered.update(stats.get("filtered", {}))
        summary.timings.update(stats.get("timings", {}))
    for name in tables:
        table = _status_table(directory, name, list(drawn))
        kept = pc.fill_null(pc.equal(table.column(schema.STATUS), schema.SUCCESS), False).to_numpy(
            zero_copy_only=False)
        width, height = _column(table, schema.ORIGINAL_WIDTH), _column(table, schema.ORIGINAL_HEIGHT)
        score_values = ((s, _list_column(table, s) if s in scores.scores and scores.scores[s].per_clip
                         else _per_row(table, _column(table, s))) for s in drawn)
        for key, values in (*score_values, ("caption", _per_row(table, _words(table))),
                            ("size", _per_row(table, None if width is None else np.fmax(width, height))),
                            ("aspect", _per_row(table, None if width is None else width / height)),
                            (DURATION, _clip_durations(table)), (IMAGES, _per_row(table, _column(table, IMAGES)))):
            if values is not None:
                h[key].add(values[0], kept[values[1]])
        for key, values, kept_values in _document_values(table, kept):
            h[key].add(values, kept_values)
        for key, (values, rows, image_kept) in _segment_scores(table, list(drawn)).items():
            h[key].add(values, kept[rows] & image_kept)
    for key in OPTIONAL:
        if not h[key].total:
            del h[key]
    return summary


def _status_table(directory: Directory, name: str, scores: list[str]) -> pa.Table:
    """The columns of one status table the report draws (those it has)."""
    wanted = [schema.STATUS, schema.CAPTION, schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT, DURATION,
              schema.CLIP_START, schema.CLIP_END, SCENES, schema.DOCUMENT, IMAGES, *scores]
    return _read(directory, name, wanted)


def _read(directory: Directory, name: str, columns: list[str]) -> pa.Table:
    with directory.open(name) as f:
        table = pq.ParquetFile(f)
        return table.read(columns=[c for c in columns if c in table.schema_arrow.names])


def _score_histograms(directory: Directory, tables: list[str],
                      plan: report_scores.Plan) -> dict[str, Histogram]:
    """A histogram per score with values, its bins over the range of its values in every shard
    and of its thresholds (the first pass). A computed score without values gets an empty one
    (the page says so); a published column without numbers is not a score, and is left out."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for name in tables if plan.scores else ():
        table = _read(directory, name, [*plan.scores, schema.DOCUMENT])
        in_segments = _segment_scores(table, list(plan.scores))
        for column, score in plan.scores.items():
            flat = _list_column(table, column) if score.per_clip else in_segments.get(column)
            values = flat[0] if flat is not None else None if score.per_clip else _column(table, column)
            values = values[np.isfinite(values)] if values is not None else values
            if values is not None and len(values):
                lo[column] = min(lo.get(column, np.inf), values.min())
                hi[column] = max(hi.get(column, -np.inf), values.max())
    out = {}
    for column, score in plan.scores.items():
        if column not in lo and (not score.computed or score.per_clip):  # per clip: video outputs only
            continue
        marks = [x for x, _ in score.marks]
        edges = _edges(min([lo.get(column, np.inf), *marks]), max([hi.get(column, -np.inf), *marks]))
        kind = "computed score" if score.computed else "published score"
        out[column] = Histogram(column, kind, edges, marks=list(score.marks), note=score.note)
    return out


def _edges(lo: float, hi: float) -> np.ndarray:
    """SCORE_BINS equal bins from lo to hi, within +-SCORE_LIMIT (values beyond pile into the end
    bins: no plot spans such a range); a single value gets a bin around it."""
    if not np.isfinite(lo) or not np.isfinite(hi):  # no value and no threshold: any bins do
        lo, hi = 0.0, 1.0
    lo, hi = max(lo, -SCORE_LIMIT), min(hi, SCORE_LIMIT)
    if lo >= hi:
        pad = max(abs(lo), 1.0) * 0.05
        lo, hi = lo - pad, lo + pad
    return np.linspace(lo, hi, SCORE_BINS + 1)


# -- HTML ----------------------------------------------------------------------------------------
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:.25em .8em;border-bottom:1px solid #ddd;
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}.grid{display:flex;flex-wrap:wrap;gap:1em}
.muted{color:#777}"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<td class="n">{v:,}</td>' if isinstance(v, int) else f'<td class="n">{v:,.2f}</td>'
        return f"<td>{html.escape(str(v))}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def render(summary: Summary) -> str:
    rows, ok = summary.rows, summary.statuses.get(schema.SUCCESS, 0)
    name = summary.manifest.get("name") or summary.output_dir.rstrip("/").rsplit("/", 1)[-1]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mmcurate report: {html.escape(name)}</title>"
             f"<style>{STYLE}</style></head><body><h1>mmcurate report: {html.escape(name)}</h1>",
             f"<p class='muted'>{html.escape(str(summary.output_dir))} · status "
             f"{html.escape(str(summary.manifest.get('status', 'unknown')))}</p>",
             "<h2>Totals</h2>",
             _table(["", "value"], [["input rows", rows], ["samples written", ok], ["success rate", _pct(ok, rows)],
                                    ["shards", summary.shards], ["tar size (MiB)", summary.tar_bytes / 2 ** 20]]),
             "<h2>Statuses</h2>",
             _table(["status", "samples", "share"],
                    [[s, n, _pct(n, rows)] for s, n in summary.statuses.most_common()])]
    errors = [(schema.error_kind(k), n) for k, n in summary.kinds.most_common() if k not in summary.filtered]
    filtered = summary.filtered.most_common()
    parts += ["<h2>Error kinds</h2>",
              _table(["kind", "status", "samples", "share", "meaning"],
                     [[k.value, k.status, n, _pct(n, rows), k.meaning] for k, n in errors])
              if errors else "<p>No errors.</p>",
              "<h2>Filters</h2>",
              _table(["filter", "samples removed", "share of input"], [[k, n, _pct(n, rows)] for k, n in filtered])
              if filtered else "<p>No sample was filtered.</p>"]
    if summary.timings:
        parts += ["<h2>Time per stage</h2><p class='muted'>seconds, summed over shards and workers</p>",
                  _table(["stage", "seconds"], [[k, float(v)] for k, v in summary.timings.most_common()])]
    parts.append("<h2>Distributions</h2><div class='grid'>")
    parts += [_figure(hist) for hist in summary.histograms.values()]
    parts.append("</div>")
    if summary.notes:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{html.escape(n)}</li>" for n in summary.notes), "</ul>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _figure(hist: Histogram) -> str:
    """A histogram as an embedded PNG, captioned with its count, what it shows and its thresholds
    (also as text: the legend is inside the picture)."""
    title = html.escape(hist.title)
    if not hist.total:
        return f"<p class='muted'>{title}: no values in this output.</p>"
    data = base64.b64encode(hist.png()).decode()
    about = "".join(f"<br>{html.escape(t)}" for t in (
        hist.note, "thresholds: " + ", ".join(label for _, label in hist.marks) if hist.marks else "") if t)
    return (f"<figure><img alt='{title}' src='data:image/png;base64,{data}'>"
            f"<figcaption class='muted'>{title}: {hist.total:,} samples{about}</figcaption></figure>")


def write_report(output_dir: str | Path | Directory, out_path: str | Path | None = None,
                 storage_options: Optional[dict[str, Any]] = None) -> Path | str:
    """Write the report (default ``OUTPUT_DIR/report.html``) and return where: a Path for a local
    file, else its URL. ``storage_options`` go to the filesystem of a URL (the output directory's
    and ``out_path``'s)."""
    directory = open_output(output_dir, storage_options)
    page = render(summarize(directory)).encode("utf-8")
    if out_path is not None:
        head, name = os.path.split(os.fspath(out_path))
        directory = Directory(head or ".", storage_options)
    else:
        name = "report.html"
    directory.write(name, page)
    return Path(directory.local, name) if directory.local else directory.path(name)


def _report(args: argparse.Namespace) -> int:
    path = write_report(args.output_dir, args.out)
    print(path)
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="write an HTML report (counts, errors, filters, histograms)",
                              description="Write one self-contained HTML page about a job's output: totals, "
                              "error kinds, rejections per filter and histograms.")
    p.add_argument("output_dir")
    p.add_argument("--out", default=None, help="where to write it (default OUTPUT_DIR/report.html)")
    p.set_defaults(func=_report)


"""Text and JSON views of cards, shared by the CLI and the HTML page."""
from __future__ import annotations

import re
import textwrap
from typing import Any, Optional

from pipeline.core.config import ConfigError, to_dict

from .card import COLUMNS, REQUIRED_FACTS, Card, fact_value
from .suggest import job_file, job_spec, recommended_job, run_line

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def human_count(n: Optional[float]) -> str:
    if n is None:
        return ""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            text = f"{n / scale:.2f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return f"{n:g}"


def parse_count(text: str) -> float:
    """``12.5M`` / ``1B`` / ``400000`` -> a number; raises ConfigError with the accepted forms."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise ConfigError(f"--min-samples: expected a number such as 400000, 12.5M or 1B, got {text!r}")
    return float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1)


def licence_label(card: Card) -> str:
    return card.license.name or "unconfirmed"


def status_label(card: Card) -> str:
    if card.status.state is None:
        return "unconfirmed"
    return card.status.state + (f" ({card.status.date})" if card.status.date else "")


MODALITY_ALIASES = {"image": "image-text", "video": "video-text", "interleaved": "interleaved"}


def size_label(card: Card) -> str:
    """``3.32M image-text pairs``: a size never goes without its unit."""
    return f"{human_count(card.size.samples)} {card.size.unit}" if card.size.samples else ""


def summary(card: Card) -> dict[str, Any]:
    """The row shown by ``catalog list`` / ``search`` (and their --json).

    ``commercial_use`` is the licence's answer; ``commercial`` is the answer for a person choosing,
    which also honours withdrawals and research-only requests (``commercial_reason`` says which).
    """
    commercial, why = card.commercial()
    return {
        "name": card.name, "title": card.title, "modality": card.modality,
        "samples": card.size.samples, "unit": card.size.unit, "size": size_label(card) or None,
        "hours": card.size.hours, "year": card.year,
        "license": card.license.name, "commercial_use": card.license.commercial_use,
        "commercial": commercial, "commercial_reason": why,
        "status": card.status.state, "status_date": card.status.date,
        "metadata": card.metadata.location(), "media": card.metadata.media, "reader": card.reader is not None,
        "disk_256px_gb": card.download.disk_256px_gb, "success_rate": card.download.success_rate,
        "job": recommended_job(card)[0], "verified": card.verified, "arxiv": card.paper.arxiv,
    }


def details(card: Card) -> dict[str, Any]:
    """Everything ``catalog show --json`` prints: the card, per-fact sources and how to run it."""
    data = to_dict(card)
    data["facts"] = {fact: {"value": _plain(fact_value(card, fact)),
                            "confirmed": fact not in card.unconfirmed,
                            "sources": [] if fact in card.unconfirmed else [s.url for s in card.sources_for(fact)]}
                     for fact in REQUIRED_FACTS}
    data["run"] = run_line(card)
    data["job_spec"] = job_spec(card) if card.reader else None
    bundled = job_file(card)
    data["job_file"] = f"jobs/{bundled.name}" if bundled else None
    data["recommended_job"], data["recommended_job_reason"] = recommended_job(card)
    data["commercial"], data["commercial_reason"] = card.commercial()
    return data


def _plain(value: Any) -> Any:
    return to_dict(value) if hasattr(value, "__dataclass_fields__") else value


LICENCE_WIDTH = 30  # long licence names are cut in the table; `show` has them whole


def table(rows: list[dict[str, Any]]) -> str:
    """Aligned text table of summaries."""
    headers = ["NAME", "MODALITY", "SIZE", "HOURS", "YEAR", "LICENCE", "COMMERCIAL", "STATUS", "READER", "MEDIA",
               "VERIFIED"]
    lines = [[r["name"], r["modality"], r["size"] or "-", human_count(r["hours"]) or "-",
              str(r["year"] or "-"), _cut(r["license"] or "unconfirmed", LICENCE_WIDTH),
              {"unconfirmed": "?"}.get(r["commercial"], r["commercial"]),
              (r["status"] or "unconfirmed") + (f" {r['status_date']}" if r["status_date"] else ""),
              "yes" if r["reader"] else "no", r["media"], r["verified"]]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _note(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), 100, initial_indent=" " * 17, subsequent_indent=" " * 17)


def render_show(card: Card) -> str:
    """The human-readable ``catalog show`` page."""
    lines = [f"{card.title}  [{card.name}]", "=" * min(78, len(card.title) + len(card.name) + 4)]
    if card.status.state == "withdrawn":
        # The note says why; the successor is a field of its own, so the banner names it once.
        lines.append(textwrap.fill(f"WITHDRAWN{' ' + card.status.date if card.status.date else ''}: "
                                   + " ".join(card.status.note.split()), 100))
        if card.status.successor:
            lines.append(f"Use instead: {card.status.successor}")
        lines.append("")
    lines.append(textwrap.fill(" ".join(card.description.split()), 100))
    lines.append("")

    def fact(label: str, key: str, text: Optional[str]) -> None:
        refs = ", ".join(f"[{card.sources.index(s) + 1}]" for s in card.sources_for(key))
        if key in card.unconfirmed:
            text, refs = "(unconfirmed)", ""
        lines.append(f"  {label:<14} {text or '-'}{'  ' + refs if refs and text else ''}")

    size_text = f"{size_label(card)} ({card.size.samples:,})" if card.size.samples else None
    fact("size", "size.samples", size_text if size_text else f"- {card.size.unit}")
    extra = [f"{human_count(v)} {k}" for k, v in (("hours", card.size.hours), ("videos", card.size.videos),
                                                  ("images", card.size.images), ("documents", card.size.documents),
                                                  ("tokens", card.size.tokens)) if v]
    if extra:
        lines.append(f"  {'':<14} {', '.join(extra)}")
    if card.size.note:
        lines.append(_note(card.size.note))
    fact("year", "year", str(card.year) if card.year else None)
    paper = " - ".join(x for x in (card.paper.title, card.paper.venue, card.paper.link()) if x)
    fact("paper", "paper", paper or None)
    fact("homepage", "homepage", card.homepage)
    fact("licence", "license.name", card.license.name)
    commercial, why = card.commercial()
    fact("commercial use", "license.commercial_use", f"{commercial} ({why})")
    if card.license.research_only:
        fact("research only", "license.research_only", "yes")
    if card.license.note:
        lines.append(_note(card.license.note))
    fact("status", "status", status_label(card))
    if card.status.note and card.status.state != "withdrawn":
        lines.append(_note(card.status.note))
    fact("verified", "verified", card.verified)
    download = [f"{human_count(card.download.disk_256px_gb)} GB at 256 px" if card.download.disk_256px_gb else "",
                f"{card.download.success_rate:.0%} of URLs downloaded" if card.download.success_rate else ""]
    if any(download):
        fact("download", "download", ", ".join(d for d in download if d))
        if card.download.note:
            lines.append(_note(card.download.note))
    lines.append("")
    lines.append("Metadata")
    fact("location", "metadata.location", card.metadata.location())
    for url in card.metadata.urls[1:]:
        lines.append(f"  {'':<14} {url}")
    fmt = card.metadata.format
    if fmt:
        fmt += f" ({card.metadata.compression})" if card.metadata.compression else ""
        fmt += "" if card.metadata.header else f", no header; columns {', '.join(card.metadata.names)}"
    fact("format", "metadata.format", fmt)
    lines.append(f"  {'media':<14} {card.metadata.media}")
    if card.metadata.access:
        lines.append(f"  {'access':<14} " + _note(card.metadata.access).lstrip())
    lines.append("")
    if card.reader:
        doc = card.reader.document if card.reader.layout == "document" else None
        pairs = f"one row per element of {', '.join(card.reader.explode)}" if card.reader.explode else "one row per source row"
        if doc:
            lines.append(f"Column map (layout document: one row per document, images in {doc.order} order)")
            for name, path in [("texts", doc.texts), ("images", doc.images),
                               *((f"image {n}", p) for n, p in doc.image.items()), *doc.columns.items()]:
                lines.append(f"  {name:<20} <- {path}")
            if card.reader.columns:
                lines.append(f"As image-text pairs (download.media: image; {pairs})")
        else:
            lines.append(f"Column map (layout {card.reader.layout}: {pairs})")
        for name, path in card.reader.columns.items():
            lines.append(f"  {name:<20} <- {path:<34} {COLUMNS[name]}")
        if card.reader.url_template:
            lines.append(f"  {'url template':<20}    {card.reader.url_template}")
        if card.reader.notes:
            lines.append(textwrap.fill(" ".join(card.reader.notes.split()), 100, initial_indent="  ",
                                       subsequent_indent="  "))
    else:
        lines.append("Column map: not confirmed - no catalog reader for this dataset.")
    if card.unconfirmed:
        lines += ["", f"Unconfirmed (left empty): {', '.join(card.unconfirmed)}"]
    if card.notes:
        lines += ["", textwrap.fill(" ".join(card.notes.split()), 100)]
    if card.related:
        lines += ["", f"Related: {', '.join(card.related)}"]
    lines += ["", "Sources"]
    for i, src in enumerate(card.sources, 1):
        lines.append(f"  [{i}] {src.title or src.url}")
        lines.append(f"      {src.url}")
        lines.append(f"      supports: {', '.join(src.facts)}")
    job, why = recommended_job(card)
    lines += ["", "Run", f"  {run_line(card)}", f"  recommended job: {job or 'none'} ({why})"]
    return "\n".join(lines)

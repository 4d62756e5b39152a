"""``mmcurate catalog``: browse the dataset cards (list, show, search, spec, html; --json everywhere)."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import yaml

from pipeline.core.config import ConfigError

from . import all_cards, load_card
from .card import Card, normalise
from .present import MODALITY_ALIASES, details, parse_count, render_show, summary, table
from .suggest import job_spec

SORT_KEYS = ("name", "samples", "hours", "year", "modality", "status")

DESCRIPTION = """Browse the catalogued datasets: size, licence, availability, where the metadata lives and
how to run them. Every fact on a card names its source; facts that could not be confirmed are
left empty and listed as unconfirmed."""

EPILOG = """examples:
  mmcurate catalog list --modality video --status available --sort samples
  mmcurate catalog list --commercial --min-samples 100M --json
  mmcurate catalog show panda-70m
  mmcurate catalog search youtube
  mmcurate catalog spec cc3m --files data/cc3m/Train_GCC-training.tsv > cc3m.yaml
  mmcurate catalog html catalog.html"""


def add_parser(subparsers) -> None:
    """Register ``catalog`` and its subcommands on the top-level ``mmcurate`` parser."""
    cat = subparsers.add_parser("catalog", help="browse the dataset catalog (list, show, search, spec, html)",
                                description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = cat.add_subparsers(dest="catalog_command", required=True, metavar="SUBCOMMAND")

    ls = sub.add_parser("list", help="list datasets, with filters and sorting",
                        description="List catalogued datasets. Filters combine (all must match).")
    ls.add_argument("--modality", choices=["image", "video", "interleaved", "image-text", "video-text"],
                    help="image (image-text), video (video-text) or interleaved")
    ls.add_argument("--status", choices=["available", "gated", "withdrawn"],
                    help="availability: available (open download), gated (terms, forms, login) or withdrawn")
    ls.add_argument("--commercial", action="store_true",
                    help="only datasets a person may use commercially: the licence allows it, not withdrawn, no "
                    "research-only request (media rights are separate)")
    ls.add_argument("--min-samples", metavar="N", type=_count,
                    help="only datasets with at least N published samples, e.g. 1000000, 10M, 1.5B")
    ls.add_argument("--has-reader", action="store_true",
                    help="only datasets with a confirmed column map (usable as input.catalog)")
    _sorting(ls)
    _json(ls)
    ls.set_defaults(func=quiet_pipe(_list))

    show = sub.add_parser("show", help="every fact of one dataset, its sources and a ready run line",
                          description="Show one card: facts with their sources, unconfirmed fields, where the "
                          "metadata lives, the column map and how to run it.")
    show.add_argument("name", help="card name or alias (case and dashes ignored), e.g. laion-400m, CC3M")
    _json(show)
    show.set_defaults(func=quiet_pipe(_show))

    search = sub.add_parser("search", help="find datasets by text (name, description, licence, repo, columns)",
                            description="Case-insensitive search over names, aliases, titles, descriptions, "
                            "notes, licences, Hugging Face repos and source column names; all words must match.")
    search.add_argument("text", nargs="+", help="words to look for")
    _sorting(search, default=None)
    _json(search)
    search.set_defaults(func=quiet_pipe(_search))

    spec = sub.add_parser("spec", help="print a ready job spec (YAML) that reads a dataset through its card",
                          description="Print a job spec for `mmcurate run`: input.catalog set to the card, "
                          "download settings suited to the modality (256px center crop for images; video "
                          "limits for video), output under out/NAME.")
    spec.add_argument("name", help="card name or alias")
    spec.add_argument("--files", nargs="+", metavar="FILE",
                      help="metadata files, folders or hf://datasets/ORG/NAME (default: the card's hub repo "
                      "or data/NAME/)")
    spec.add_argument("--out", metavar="DIR", help="output directory (default out/NAME)")
    _json(spec)
    spec.set_defaults(func=quiet_pipe(_spec))

    page = sub.add_parser("html", help="write one self-contained HTML page with a sortable, filterable table",
                          description="Write the whole catalog as a single HTML file (inline CSS/JS, no network).")
    page.add_argument("out", metavar="OUT.html", help="file to write")
    _json(page)
    page.set_defaults(func=quiet_pipe(_html))


def _count(text: str) -> float:
    try:
        return parse_count(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--min-samples: ")) from None


def _sorting(p: argparse.ArgumentParser, default: str | None = "name") -> None:
    p.add_argument("--sort", choices=SORT_KEYS, default=default,
                   help="sort key" + (f" (default {default})" if default else " (default: best match first)"))
    p.add_argument("--reverse", action="store_true", help="reverse the order (largest / newest first)")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def quiet_pipe(handler):
    """Wrap a handler so that a reader that stops early (``| head``) ends the command quietly.

    Python raises BrokenPipeError on the write, and again when it flushes stdout at exit; pointing
    stdout at /dev/null after the first one lets the process end without a traceback.
    """
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            code = handler(args)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    return run


# -- handlers ----------------------------------------------------------------------------------------

def filter_cards(cards: list[Card], modality: str | None = None, status: str | None = None,
                 commercial: bool = False, min_samples: float | None = None, has_reader: bool = False) -> list[Card]:
    want = MODALITY_ALIASES.get(modality, modality) if modality else None
    return [c for c in cards
            if (want is None or c.modality == want)
            and (status is None or c.status.state == status)
            and (not commercial or c.commercial_label == "yes")
            and (min_samples is None or (c.size.samples or 0) >= min_samples)
            and (not has_reader or c.reader is not None)]


def sort_cards(cards: list[Card], key: str | None, reverse: bool = False) -> list[Card]:
    if key is None:
        return list(reversed(cards)) if reverse else cards

    def k(c: Card):
        value = {"name": c.name, "samples": c.size.samples, "hours": c.size.hours, "year": c.year,
                 "modality": c.modality, "status": c.status.state}[key]
        return (value is None, value if value is not None else 0, c.name)

    ordered = sorted(cards, key=k)
    if reverse:  # unknown values stay last
        known = [c for c in ordered if k(c)[0] is False]
        return list(reversed(known)) + [c for c in ordered if k(c)[0] is True]
    return ordered


def search_cards(cards: list[Card], words: list[str]) -> list[Card]:
    """Cards containing every word; name/alias hits rank before title hits before body hits."""
    terms = [w.lower() for w in words if w.strip()]
    scored = []
    for c in cards:
        head = " ".join([c.name, *c.aliases]).lower()
        title = c.title.lower()
        body = " ".join([c.description, c.notes, c.license.name or "", c.license.note, c.metadata.hf_repo or "",
                         c.metadata.access, c.modality, c.status.note, c.size.unit,
                         *(c.reader.columns.values() if c.reader else []),
                         *(c.reader.columns if c.reader else [])]).lower()
        everything = " ".join([head, title, body])
        if not all(t in everything or normalise(t) in normalise(everything) for t in terms):
            continue
        score = sum(3 if t in head else 2 if t in title else 1 for t in terms)
        scored.append((-score, c.name, c))
    return [c for _, _, c in sorted(scored, key=lambda x: (x[0], x[1]))]


def _print_rows(cards: list[Card], as_json: bool) -> int:
    rows = [summary(c) for c in cards]
    if as_json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print(table(rows))
    else:
        print("no dataset matches", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    cards = filter_cards(all_cards(), args.modality, args.status, args.commercial, args.min_samples,
                         args.has_reader)
    return _print_rows(sort_cards(cards, args.sort, args.reverse), args.json)


def _show(args: argparse.Namespace) -> int:
    card = load_card(args.name)
    print(json.dumps(details(card), indent=1) if args.json else render_show(card))
    return 0


def _search(args: argparse.Namespace) -> int:
    cards = search_cards(all_cards(), args.text)
    return _print_rows(sort_cards(cards, args.sort, args.reverse), args.json)


def _spec(args: argparse.Namespace) -> int:
    card = load_card(args.name)
    if card.reader is None:
        raise ConfigError(f"{card.name}: no confirmed column map, so no catalog job spec; convert the metadata "
                          "and write a spec with input.files, input.url_col and input.caption_col")
    data = job_spec(card, args.files, args.out)
    print(json.dumps(data, indent=1) if args.json else yaml.safe_dump(data, sort_keys=False), end="" if not args.json else "\n")
    return 0


def _html(args: argparse.Namespace) -> int:
    from .html import render

    cards = all_cards()
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True)
    out.write_text(render(cards), encoding="utf-8")
    print(json.dumps({"path": str(out), "cards": len(cards)}) if args.json else f"wrote {out} ({len(cards)} datasets)")
    return 0

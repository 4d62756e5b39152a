"""The dataset catalog: one YAML card per dataset in this folder, validated by :mod:`catalogs.card`.

    from catalogs import load_card, all_cards
    card = load_card("cc3m")          # case-, dash- and alias-insensitive
"""
from __future__ import annotations

import difflib
import functools
from pathlib import Path

import yaml

from pipeline.core.config import ConfigError, from_dict

from .card import COLUMNS, Card, normalise

CARD_DIR = Path(__file__).resolve().parent
SAMPLE_DIR = CARD_DIR / "samples"

__all__ = ["COLUMNS", "Card", "CatalogError", "all_cards", "load_card", "parse_card", "SAMPLE_DIR"]


class CatalogError(ConfigError):
    """A card is missing, ambiguous or invalid."""


def parse_card(path: str | Path) -> Card:
    """Read and validate one card file; errors name the file and the bad key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CatalogError(f"{path.name}: not valid YAML: {e}") from None
    try:
        card = from_dict(Card, data)
    except ConfigError as e:
        raise CatalogError(f"{path.name}: {e}") from None
    if card.name != path.stem:
        raise CatalogError(f"{path.name}: name {card.name!r} must match the file name {path.stem!r}")
    return card


@functools.lru_cache(maxsize=None)
def _cards(directory: str) -> tuple[Card, ...]:
    cards = tuple(parse_card(p) for p in sorted(Path(directory).glob("*.yaml")))
    seen: dict[str, str] = {}
    for card in cards:
        for key in card.keys():
            if key in seen and seen[key] != card.name:
                raise CatalogError(f"{card.name}: name or alias {key!r} is also used by {seen[key]}")
            seen[key] = card.name
    names = {c.name for c in cards}
    for card in cards:
        for ref in [*card.related, *([card.status.successor] if card.status.successor else [])]:
            if ref not in names:
                raise CatalogError(f"{card.name}: refers to unknown card {ref!r}")
    return cards


def all_cards(directory: str | Path = CARD_DIR) -> list[Card]:
    """Every card, sorted by name (parsed once per process)."""
    return list(_cards(str(directory)))


def load_card(name: str, directory: str | Path = CARD_DIR) -> Card:
    """The card called ``name`` (or with that alias), ignoring case, dashes, dots and spaces."""
    cards = all_cards(directory)
    key = normalise(name)
    for card in cards:
        if key in card.keys():
            return card
    candidates = {k: c.name for c in cards for k in c.keys()}
    close = difflib.get_close_matches(key, list(candidates), n=5, cutoff=0.5)
    close_names = list(dict.fromkeys(candidates[k] for k in close))
    close_names += [c.name for c in cards if key and key in normalise(c.name) and c.name not in close_names]
    hint = f"; did you mean {', '.join(close_names[:5])}?" if close_names else ""
    raise CatalogError(f"no catalog card named {name!r}{hint} (see `mmcurate catalog list`)")


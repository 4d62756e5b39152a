"""Which score columns ``mmcurate report`` draws, what each is, and the thresholds drawn on them.

* **Computed scores**: the ``double`` columns of the job's filters, and their lists of doubles:
  one score per clip of a video row cut into scenes (clip_score's ``clip_scores``), drawn per
  clip with the thresholds of the filter's score and only when the output has such values. The filters are rebuilt from
  manifest.json's ``job.filters`` with :func:`filters.build_filters` (options parsed, no model or
  file touched), so a new filter is drawn without a change here. A filter's thresholds apply to
  its score, its first ``double`` column: ``min`` / ``max`` (or ``threshold``, ``min_score`` ...)
  from its config, the ``top_fraction`` cut from its stage state in the manifest
  (``{"threshold": x, ...}``). A filter this mmcurate does not know (or whose options no longer
  parse) is skipped with a note.
* **Published scores**: the input's extra columns (``input.save_additional_columns``, and a
  catalog card's published score columns under their normalised names) other than geometry and
  ids; the report draws those that hold numbers. Known names are labelled from the catalog cards.

Thresholds come from :data:`THRESHOLD_SOURCES`, functions ``(manifest, filters) -> marks``; a new
source (a metadata rule on a published column, say) is one more function there.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa

from pipeline.core import schema
from pipeline.core.config import ConfigError

# The normalised catalog columns (catalogs.card.COLUMNS) that hold a published score.
PUBLISHED_SCORES = ("clip_similarity", "clip_l14_similarity", "nsfw", "watermark", "aesthetic", "match_score")
# Extra columns that are geometry, positions, times or ids, not scores (source_width, sample_id,
# clip_start, face_bboxes, image_phash ...).
NOT_A_SCORE = re.compile(r"(^|_)(id|uid|key|idx|index|width|height|start|end|position|offset|duration|"
                         r"time|timestamp|size|bytes|hash|phash|bboxes?|count|fps|frames?)$", re.I)
CORE_COLUMNS = frozenset(schema.COLUMN_TYPES)

Mark = tuple[float, str]  # a vertical line on a histogram: (x, label)


@dataclass
class Score:
    """One score column the report draws."""

    column: str
    note: str                                   # where it comes from, shown under the histogram
    computed: bool                              # by one of the job's filters, else kept from the input
    marks: list[Mark] = field(default_factory=list)
    per_clip: bool = False                      # a list per row (one value per clip), drawn value by value


@dataclass
class Plan:
    scores: dict[str, Score] = field(default_factory=dict)  # by column, computed ones first
    notes: list[str] = field(default_factory=list)          # what the report could not use, and why


def plan(manifest: dict[str, Any]) -> Plan:
    """The score columns of the job in ``manifest`` and their thresholds."""
    result = Plan()
    job = manifest.get("job") if isinstance(manifest.get("job"), dict) else {}
    stages = _filters(job.get("filters") or [], result.notes)
    per_clip: dict[str, str] = {}  # list column -> the score column whose thresholds it shares
    for key, stage in stages:
        for column, arrow_type in stage.columns.items():
            if column in result.scores:
                continue
            if _is_double(arrow_type):
                result.scores[column] = Score(column, f"computed by the {key} filter", True)
            elif _is_double_list(arrow_type) and _score_column(stage):
                result.scores[column] = Score(column, f"computed by the {key} filter, one value per clip",
                                              True, per_clip=True)
                per_clip[column] = _score_column(stage)
    for column, why in _published(job.get("input"), result.notes):
        if column not in result.scores:
            result.scores[column] = Score(column, why, False)
    for source in THRESHOLD_SOURCES:
        for column, mark in source(manifest, stages):
            if column in result.scores:
                result.scores[column].marks.append(mark)
    for column, score_column in per_clip.items():  # each clip is judged by the row score's rules
        result.scores[column].marks = list(result.scores[score_column].marks)
    return result


def _is_double(arrow_type: Any) -> bool:
    return arrow_type == "double" if isinstance(arrow_type, str) else arrow_type == pa.float64()


def _is_double_list(arrow_type: Any) -> bool:
    return isinstance(arrow_type, pa.DataType) and pa.types.is_list(arrow_type) and \
        pa.types.is_floating(arrow_type.value_type)


# -- the job's filters --------------------------------------------------------------------------
def _filters(entries: Any, notes: list[str]) -> list[tuple[str, Any]]:
    """``(manifest stage key, filter)`` for the job's filters this mmcurate can build."""
    from filters import FILTERS, build_filters
    from pipeline.job.manifest import stage_keys

    if not isinstance(entries, list):
        notes.append(f"job.filters: expected a list, got {type(entries).__name__}; no computed score is drawn")
        return []
    known = []  # (index in job.filters, entry)
    for n, entry in enumerate(entries):
        name = next(iter(entry)) if isinstance(entry, dict) and len(entry) == 1 else None
        if name in FILTERS:
            known.append((n, entry))
        else:
            what = name if isinstance(name, str) else repr(entry)
            notes.append(f"filters[{n}]: {what} is not a filter this mmcurate knows; its scores are not drawn")
    try:
        stages = build_filters([entry for _, entry in known])
    except ConfigError:  # options of another version: build what still parses, one by one
        stages = []
        for n, entry in known:
            try:
                stages += build_filters([entry])
            except ConfigError as e:  # its message names the entry as filters[0]: name the job's
                notes.append(f"{str(e).replace('filters[0]', f'filters[{n}]', 1)}; its scores are not drawn")
    return list(zip(stage_keys(stages), stages))


def _score_column(stage: Any) -> Optional[str]:
    """The column a filter's thresholds apply to: its first ``double`` column."""
    return next((c for c, t in stage.columns.items() if _is_double(t)), None)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# -- threshold sources --------------------------------------------------------------------------
def config_thresholds(manifest: dict[str, Any], stages: list[tuple[str, Any]]) -> Iterator[tuple[str, Mark]]:
    """``min``, ``max`` and the names some filters give them (semantic_dedup's ``threshold``,
    language's ``min_score``) from each filter's config."""
    for _, stage in stages:
        column = _score_column(stage)
        for bound in ("min", "max", "threshold", "min_score", "max_score"):
            x = _number(getattr(stage.config, bound, None))
            if column and x is not None:
                yield column, (x, f"{bound} {x:g}")


def state_thresholds(manifest: dict[str, Any], stages: list[tuple[str, Any]]) -> Iterator[tuple[str, Mark]]:
    """The ``top_fraction`` cut each filter computed once and kept in the manifest's stage state."""
    states = manifest.get("stage_state")
    states = states if isinstance(states, dict) else {}
    for key, stage in stages:
        state, column = states.get(key), _score_column(stage)
        x = _number(state.get("threshold")) if isinstance(state, dict) else None
        if column is None or x is None:
            continue
        fraction = _number(state.get("top_fraction", getattr(stage.config, "top_fraction", None)))
        yield column, (x, f"top {fraction:.0%} → {x:.3f}" if fraction is not None else f"threshold {x:.3f}")


ThresholdSource = Callable[[dict[str, Any], list[tuple[str, Any]]], Iterator[tuple[str, Mark]]]
THRESHOLD_SOURCES: tuple[ThresholdSource, ...] = (config_thresholds, state_thresholds)


# -- published columns --------------------------------------------------------------------------
def _published(input_spec: Any, notes: list[str]) -> list[tuple[str, str]]:
    """``(column, label)`` for the input's extra columns that may hold a published score."""
    if not isinstance(input_spec, dict):
        return []
    extras = input_spec.get("save_additional_columns") or []
    columns = [c for c in extras if isinstance(c, str)] if isinstance(extras, list) else []
    catalog = input_spec.get("catalog")
    labels = _labels()
    if isinstance(catalog, str):
        try:
            from catalogs import load_card

            reader = load_card(catalog).reader
        except ConfigError as e:
            notes.append(f"input.catalog: {e}; its published scores are not drawn")
        else:
            columns = [c for c in PUBLISHED_SCORES if reader and c in reader.columns] + columns
    return [(c, labels.get(c, "kept from the input")) for c in dict.fromkeys(columns)
            if c not in CORE_COLUMNS and (c in labels or not NOT_A_SCORE.search(c))]


def _labels() -> dict[str, str]:
    """What each published score column is: the normalised names, and every card's source names
    (``similarity``, ``punsafe`` ...) with the datasets that publish them."""
    try:
        from catalogs import COLUMNS, all_cards

        cards = all_cards()
    except ConfigError:  # a broken card must not stop a report; the columns are drawn unlabelled
        return {}
    labels = {c: COLUMNS[c] for c in PUBLISHED_SCORES}
    sources: dict[str, tuple[str, list[str]]] = {}
    for card in cards:
        for name, path in (card.reader.columns.items() if card.reader else ()):
            if name in PUBLISHED_SCORES and path not in labels:
                sources.setdefault(path, (name, []))[1].append(card.title)
    for path, (name, titles) in sources.items():
        labels[path] = f"{COLUMNS[name]}: {', '.join(titles)}"
    return labels

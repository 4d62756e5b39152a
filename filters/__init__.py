"""Sample filters, declared in a job's ``filters:`` list and run in that order after download:

    filters:
      - image_size: {min_side: 200}
      - aspect_ratio: {max: 3}
      - caption: {min_words: 3}
      - dedup_exact: {}
      - clip_score: {preset: laion}          # or {model: ..., pretrained: ..., min: / top_fraction:}
      - dedup_near: {method: phash, max_distance: 4}

One module per filter; each is a :class:`filters.base.Filter` registered in ``FILTERS`` below. A
sample it rejects gets status ``filtered`` with the filter's name as its error kind.
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import ConfigError

from .aspect_ratio import AspectRatioFilter
from .base import Filter
from .caption import CaptionFilter
from .clip_score import ClipScoreFilter
from .dedup_exact import ExactDedupFilter
from .dedup_near import NearDedupFilter
from .image_size import ImageSizeFilter

FILTERS: dict[str, type[Filter]] = {cls.name: cls for cls in (
    ImageSizeFilter, AspectRatioFilter, CaptionFilter, ExactDedupFilter, NearDedupFilter, ClipScoreFilter)}


def build_filters(entries: list[dict[str, Any]], check: bool = False) -> list[Filter]:
    """Filter stages for the job's ``filters:`` entries (one-key mappings ``{name: options}``).

    Options are always validated, without touching models or files; errors name the entry
    (``filters[0].clip_score.min: ...``). With ``check`` each filter's ``check()`` also runs (the
    driver does this before any shard): what it needs at run time (model configs, checkpoints)
    must exist, so a job fails before downloading anything.
    """
    stages: list[Filter] = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"filters[{n}]: expected a mapping with one filter name, got {entry!r}")
        (name, raw), = entry.items()
        cls = FILTERS.get(name)
        if cls is None:
            raise ConfigError(f"filters[{n}]: unknown filter {name!r} (known: {', '.join(sorted(FILTERS))})")
        stage = cls(cls.parse(raw, f"filters[{n}].{name}"))
        _check_order(stages, stage, n)
        stages.append(stage)
    for n, stage in enumerate(stages if check else ()):
        try:
            stage.check()
        except ConfigError as e:
            raise ConfigError(f"filters[{n}].{e}") from None
    return stages


def _check_order(before: list[Filter], stage: Filter, n: int) -> None:
    """Cross-filter requirements: near dedup on CLIP embeddings needs a clip_score that stores them."""
    if isinstance(stage, NearDedupFilter) and stage.config.method == "clip":
        if not any(isinstance(s, ClipScoreFilter) and s.config.store_embeddings for s in before):
            raise ConfigError(f"filters[{n}].dedup_near.method: clip needs an earlier clip_score filter with "
                              "store_embeddings: true")

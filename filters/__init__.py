"""Sample filters, declared in a job's ``filters:`` list and run in that order after download:

    filters:
      - image_size: {min_side: 200}
      - aspect_ratio: {max: 3}
      - caption: {min_words: 3}
      - dedup_exact: {}
      - clip_score: {preset: laion}          # or {model: ..., pretrained: ..., min: / top_fraction:}
      - dedup_near: {method: phash, max_distance: 4}
      - aesthetic: {checkpoint: sac+logos+ava1-l14-linearMSE.pth, min: 5}   # CLIP heads (clip_heads.py)
      - nsfw: {checkpoint: clip_autokeras_binary_nsfw.pth, max: 0.5}
      - semantic_dedup: {threshold: 0.95, n_clusters: 50}   # CLIP embeddings, across the job
      - watermark: {preset: laion, checkpoint: watermark_model_v1.pt, max: 0.5}
      - language: {languages: [en]}
      - metadata: {column: clip_l14_similarity_score, top_fraction: 0.3}  # published columns, before download
      - image_count: {min: 1, max: null}     # interleaved documents: their kept images

One module per filter; each is a :class:`filters.base.Filter` registered in ``FILTERS`` below. A
sample it rejects gets status ``filtered`` with the filter's name as its error kind (``metadata``:
``metadata:<column>``). ``metadata`` rules run before the download (``Filter.metadata_only``).

On interleaved documents each filter runs over its ``document_view`` (``core/document.py``): per
image (size, aspect ratio, CLIP score against the image's nearest text, dedup, the CLIP heads,
watermark; their scores land in the image's segment), per document (caption: the whole text's
words and characters; language: the whole text), or on the document row (``image_count``, a
documents-only filter). A document whose images a filter drops below ``min_images`` is filtered
by that filter.

Filters that read CLIP image embeddings (``Filter.clip_embedding()``: aesthetic, nsfw, ...) share
one image pass per CLIP: the job's clip_score stage of that CLIP, which must come before them, or
one added (image tower only) just before the first of them.
"""
from __future__ import annotations

from typing import Any, Optional

from pipeline.core.config import ConfigError

from .aspect_ratio import AspectRatioFilter
from .base import Filter
from .caption import CaptionFilter
from .clip_heads import AestheticFilter, NsfwFilter
from .clip_score import ClipScoreFilter
from .dedup_exact import ExactDedupFilter
from .dedup_near import NearDedupFilter
from .dedup_semantic import SemanticDedupFilter
from .image_count import ImageCountFilter
from .image_size import ImageSizeFilter
from .language import LanguageFilter
from .metadata import MetadataFilter
from .watermark import WatermarkFilter

FILTERS: dict[str, type[Filter]] = {cls.name: cls for cls in (
    ImageSizeFilter, AspectRatioFilter, CaptionFilter, ExactDedupFilter, NearDedupFilter, ClipScoreFilter,
    AestheticFilter, NsfwFilter, SemanticDedupFilter, WatermarkFilter, LanguageFilter, MetadataFilter,
    ImageCountFilter)}


def build_filters(entries: list[dict[str, Any]], check: bool = False,
                  documents: Optional[bool] = None) -> list[Filter]:
    """Filter stages for the job's ``filters:`` entries (one-key mappings ``{name: options}``).

    Options are always validated, without touching models or files; errors name the entry
    (``filters[0].clip_score.min: ...``). With ``check`` each filter's ``check()`` also runs (the
    driver does this before any shard): what it needs at run time (model configs, checkpoints)
    must exist, so a job fails before downloading anything. A filter that reads CLIP embeddings
    gets a clip_score stage of its CLIP before it (the job's own, or an added image-only one).
    ``documents=False`` (the job's rows are pairs) refuses the filters that count documents only
    (``Filter.documents_only``); None does not know.
    """
    stages: list[Filter] = []
    labels: list[str] = []  # how errors name each stage: its entry (an added CLIP stage: its reader's)
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"filters[{n}]: expected a mapping with one filter name, got {entry!r}")
        (name, raw), = entry.items()
        cls = FILTERS.get(name)
        if cls is None:
            raise ConfigError(f"filters[{n}]: unknown filter {name!r} (known: {', '.join(sorted(FILTERS))})")
        stage = cls(cls.parse(raw, f"filters[{n}].{name}"))
        if documents is False and stage.documents_only:
            raise ConfigError(f"filters[{n}].{name}: applies to interleaved documents only, and this job's rows "
                              "are image-caption pairs (a document job sets download.media: document)")
        _check_order(stages, stage, n)
        if _share_clip(stages, stage, n):
            labels.append(f"filters[{n}].{name}: its CLIP: ")
            stages.append(ClipScoreFilter.embedder(*stage.clip_embedding()))
        labels.append(f"filters[{n}].")
        stages.append(stage)
    _check_shared(stages, labels)
    for label, stage in zip(labels, stages) if check else ():
        try:
            stage.check()
        except ConfigError as e:
            raise ConfigError(f"{label}{e}") from None
    return stages


def _share_clip(before: list[Filter], stage: Filter, n: int) -> bool:
    """Make the latest earlier clip_score of the CLIP ``stage`` reads share its embeddings, or
    say that one must be added. A clip_score of a CLIP that an earlier filter reads must not
    come after that filter: it would be a second image pass."""
    if isinstance(stage, ClipScoreFilter):
        readers = [s for s in before if s.clip_embedding() == stage.config.clip]
        if readers:
            raise ConfigError(f"filters[{n}].clip_score: {readers[0].name} before it reads the image embeddings "
                              f"of the same CLIP ({stage.config.model}, {stage.config.pretrained}): put clip_score "
                              "first, so each image goes through that CLIP once")
        return False
    clip = stage.clip_embedding()
    if clip is None:
        return False
    source = next((s for s in reversed(before) if isinstance(s, ClipScoreFilter) and s.config.clip == clip), None)
    if source is None:
        return True
    source.share_embeddings = True
    return False


def _check_shared(stages: list[Filter], labels: list[str]) -> None:
    """Each reader of embeddings gets its CLIP's: no other sharing clip_score between them (the
    embedding column holds one CLIP's at a time)."""
    for k, stage in enumerate(stages):
        clip = stage.clip_embedding()
        if clip is None:
            continue
        for s in reversed(stages[:k]):
            if isinstance(s, ClipScoreFilter) and s.config.clip == clip:
                break
            if isinstance(s, ClipScoreFilter) and s.share_embeddings:
                raise ConfigError(f"{labels[k]}{stage.name}: reads the image embeddings of {clip[0]} ({clip[1]}), "
                                  f"but a clip_score of {s.config.model} ({s.config.pretrained}) replaces them "
                                  "before it: put the filters of one CLIP together")


def _check_order(before: list[Filter], stage: Filter, n: int) -> None:
    """Cross-filter requirements: near dedup on CLIP embeddings needs a clip_score that stores them."""
    if isinstance(stage, NearDedupFilter) and stage.config.method == "clip":
        if not any(isinstance(s, ClipScoreFilter) and s.config.store_embeddings for s in before):
            raise ConfigError(f"filters[{n}].dedup_near.method: clip needs an earlier clip_score filter with "
                              "store_embeddings: true")

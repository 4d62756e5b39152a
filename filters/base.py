"""What every filter shares. A filter is a stage that rejects rows; a subclass sets ``name`` and
``Config`` (a dataclass of its options, read with :func:`pipeline.core.config.from_dict`) and
writes one of:

* ``problem(row) -> str | None``: a rule on one row (why it is rejected, None to keep it); the
  base runs it over the rows still in the running;
* ``process(batch)``: work over the whole batch (a model, dedup across rows), calling ``reject``.

A rejected row gets status ``filtered`` with the filter's name as its error kind, so every shard's
stats count rejections per filter.

A filter that reads CLIP image embeddings (aesthetic, nsfw, semantic dedup) overrides
``clip_embedding()`` to return the ``(model, pretrained)`` it needs; ``filters.build_filters`` then
makes one ``clip_score`` stage of that CLIP, before it, put them in the batch under
``filters.clip_score.IMAGE_EMBEDDING`` (one image pass per sample, however many filters read it).

On interleaved documents a filter runs unchanged through ``core/document.SegmentStage`` over its
``document_view``: "image" (the default: one row per live image, its nearest text as caption; a
rejection fails that image and may drop the document under ``min_images``, as filtered by this
filter), "document" (the whole text as caption) or None (the document row as it is;
``documents_only`` filters such as ``image_count`` are refused in a job of pairs).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal, Optional

from pipeline.core import schema
from pipeline.core.config import ConfigError, from_dict, to_dict
from pipeline.core.schema import Batch
from pipeline.core.stage import Stage

Which = Literal["original", "stored"]  # the downloaded image, or the one written after resizing


class Row:
    """One row of a batch, read by column name: ``row["caption"]``, ``row[schema.URL]``."""

    __slots__ = ("batch", "i")

    def __init__(self, batch: Batch, i: int) -> None:
        self.batch, self.i = batch, i

    def __getitem__(self, column: str) -> Any:
        return self.batch[column][self.i]

    def size(self, which: Which = "original") -> tuple[Optional[int], Optional[int]]:
        """(width, height) of the image as downloaded ("original") or as stored after resizing."""
        if which == "original":
            return self[schema.ORIGINAL_WIDTH], self[schema.ORIGINAL_HEIGHT]
        return self[schema.WIDTH], self[schema.HEIGHT]


class Filter(Stage):
    Config: ClassVar[type]
    # A rule on input columns only (published scores, sizes, language): it runs before the
    # download, so the rows it drops are never fetched.
    metadata_only: ClassVar[bool] = False
    # On documents a filter judges each image against its nearest text unless it reads text only.
    document_view: ClassVar[Optional[str]] = "image"
    # A rule on documents only (image_count): build_filters refuses it in a job without documents.
    documents_only: ClassVar[bool] = False

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Input columns this filter reads; the reader keeps them (as save_additional_columns)."""
        return ()

    @classmethod
    def parse(cls, raw: Any, path: str) -> Any:
        """The config from the job spec mapping (``path`` names it in error messages)."""
        return from_dict(cls.Config, raw, path)

    def problem(self, row: Row) -> Optional[str]:
        raise NotImplementedError(f"{type(self).__name__} defines neither problem() nor process()")

    def process(self, batch: Batch) -> Batch:
        for i in schema.alive(batch):
            message = self.problem(Row(batch, i))
            if message:
                self.reject(batch, i, message)
        return batch

    def reject(self, batch: Batch, i: int, message: str) -> None:
        schema.reject(batch, i, self.name, message)

    def record_scores(self, batch: Batch, column: str, rows: list[int], scores: list[float],
                      problem: Callable[[float], Optional[str]]) -> None:
        """Put each scored row's score in ``column`` and reject those ``problem(score)`` refuses."""
        schema.set_column(batch, column, rows, scores)
        for i, score in zip(rows, scores):
            why = problem(score)
            if why:
                self.reject(batch, i, why)

    def clip_embedding(self) -> Optional[tuple[str, Optional[str]]]:
        """The CLIP ``(model, pretrained)`` whose image embeddings this filter reads from the batch
        (column ``filters.clip_score.IMAGE_EMBEDDING``), or None when it reads none."""
        return None

    def fingerprint(self) -> Optional[dict[str, Any]]:
        return {"filter": self.name, "options": to_dict(self.config)}


def alive_with_image(batch: Batch) -> tuple[list[int], list[bytes]]:
    """Alive rows that carry an image, and those images (rows without one are left alone)."""
    idx, images = [], []
    for i in schema.alive(batch):
        data = schema.image_of(batch[schema.FILES][i])
        if data is not None:
            idx.append(i)
            images.append(data)
    return idx, images


def with_preset(raw: Any, presets: dict[str, dict[str, Any]], path: str) -> dict[str, Any]:
    """A filter's options over the values of the ``preset`` they name; keys given next to it win."""
    raw = dict(raw or {})
    preset = raw.pop("preset", None)
    if preset is None:
        return raw
    if preset not in presets:
        raise ConfigError(f"{path}.preset: unknown preset {preset!r} (known: {', '.join(presets)})")
    return {**presets[preset], **raw}


def score_problem(label: str, score: float, min: Optional[float], max: Optional[float],
                  threshold: Optional[float], top_fraction: Optional[float],
                  higher_is_better: bool = True) -> Optional[str]:
    """Why a score breaks its rules (``min``, ``max``, the ``top_fraction`` cut ``threshold``; which
    side of the cut is kept: ``higher_is_better``), or None."""
    if min is not None and score < min:
        return f"{label} {score:.4f} below min {min:g}"
    if max is not None and score > max:
        return f"{label} {score:.4f} above max {max:g}"
    if threshold is not None and (score < threshold if higher_is_better else score > threshold):
        side = "below" if higher_is_better else "above"
        return f"{label} {score:.4f} {side} the top {top_fraction:.0%} threshold {threshold:.4f}"
    return None

"""``image_count``: keep documents whose kept images number within ``min`` .. ``max``.

    filters:
      - image_count: {min: 2, max: 30}

A rule on the interleaved document row (``document_view`` None: it reads the row as it is), placed
after the per-image filters it should count the work of: the images still in the running
(downloaded, neither failed nor filtered, :func:`pipeline.core.document.live_images`) are counted,
the count recorded in the row's ``image_count`` (status table and KEY.json).

It counts documents only: a job without documents is refused when its filters are built
(``build_filters(..., documents=False)``: a ConfigError naming the entry). A row without a
document that reaches it all the same (a pair) counts its image: 1, or 0 once it has none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.core import document, schema
from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch

from .base import Filter

COLUMN = "image_count"


@dataclass
class ImageCountConfig:
    min: int = 1
    max: Optional[int] = None

    def validate(self) -> None:
        if self.min < 0:
            raise ConfigError(f"min: must be >= 0, got {self.min}")
        if self.max is not None and self.max < self.min:
            raise ConfigError(f"max: {self.max} is below min {self.min}")


def kept_images(batch: Batch, i: int) -> int:
    """Row ``i``'s images still in the running (a pair row: its one image, if it still has it)."""
    value = batch[schema.DOCUMENT][i] if schema.DOCUMENT in batch else None
    if value is None:
        return int(schema.image_of(batch[schema.FILES][i]) is not None)
    return len(document.live_images(document.as_document(value)))


class ImageCountFilter(Filter):
    name = "image_count"
    Config = ImageCountConfig
    document_view = None   # the document row itself
    documents_only = True

    @property
    def columns(self) -> dict[str, str]:
        return {COLUMN: "int32"}

    def process(self, batch: Batch) -> Batch:
        rows = schema.alive(batch)
        counts = [kept_images(batch, i) for i in rows]
        self.record_scores(batch, COLUMN, rows, counts, self.problem_with)
        return batch

    def problem_with(self, count: int) -> Optional[str]:
        c = self.config
        if count < c.min:
            return f"{count} images kept, fewer than min {c.min}"
        if c.max is not None and count > c.max:
            return f"{count} images kept, more than max {c.max}"
        return None

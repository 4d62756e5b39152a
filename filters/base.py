"""What every filter shares. A filter is a stage that rejects rows; a subclass sets ``name`` and
``Config`` (a dataclass of its options, read with :func:`pipeline.core.config.from_dict`) and
writes one of:

* ``problem(row) -> str | None``: a rule on one row (why it is rejected, None to keep it); the
  base runs it over the rows still in the running;
* ``process(batch)``: work over the whole batch (a model, dedup across rows), calling ``reject``.

A rejected row gets status ``filtered`` with the filter's name as its error kind, so every shard's
stats count rejections per filter.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pipeline.core import schema
from pipeline.core.config import from_dict, to_dict
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

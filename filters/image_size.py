"""``image_size``: keep images whose sides and area are within bounds (DataComp's basic filter uses
``min_side: 200`` on the original image). Sizes come from the status table, so nothing is decoded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.stage import Batch

from .base import Filter

Which = Literal["original", "stored"]  # the downloaded image, or the one written after resizing


def dimensions(batch: Batch, i: int, which: Which) -> tuple[Optional[int], Optional[int]]:
    if which == "original":
        return batch[schema.ORIGINAL_WIDTH][i], batch[schema.ORIGINAL_HEIGHT][i]
    return batch[schema.WIDTH][i], batch[schema.HEIGHT][i]


@dataclass
class ImageSizeOptions:
    min_side: int = 0
    max_side: Optional[int] = None
    min_width: int = 0
    min_height: int = 0
    min_area: int = 0
    max_area: Optional[int] = None
    which: Which = "original"

    def validate(self) -> None:
        for name in ("min_side", "min_width", "min_height", "min_area"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_side is not None and self.max_side < self.min_side:
            raise ConfigError(f"max_side: {self.max_side} is below min_side {self.min_side}")
        if self.max_area is not None and self.max_area < self.min_area:
            raise ConfigError(f"max_area: {self.max_area} is below min_area {self.min_area}")


class ImageSizeFilter(Filter):
    name = "image_size"
    Options = ImageSizeOptions

    def problem(self, w: int, h: int) -> Optional[str]:
        o = self.options
        if min(w, h) < o.min_side:
            return f"{w}x{h}: shorter side below {o.min_side}"
        if o.max_side is not None and max(w, h) > o.max_side:
            return f"{w}x{h}: longer side above {o.max_side}"
        if w < o.min_width or h < o.min_height:
            return f"{w}x{h}: below {o.min_width}x{o.min_height}"
        if w * h < o.min_area:
            return f"{w}x{h}: area below {o.min_area}"
        if o.max_area is not None and w * h > o.max_area:
            return f"{w}x{h}: area above {o.max_area}"
        return None

    def __call__(self, batch: Batch) -> Batch:
        for i in schema.alive(batch):
            w, h = dimensions(batch, i, self.options.which)
            if w is None or h is None:  # no size to judge (e.g. not an image): leave it to others
                continue
            message = self.problem(w, h)
            if message:
                self.reject(batch, i, message)
        return batch

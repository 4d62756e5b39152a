"""``aspect_ratio``: keep images whose long side is at most ``max`` times the short side (DataComp's
basic filter uses 3), optionally at least ``min`` times (e.g. to keep only panoramas)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.stage import Batch

from .base import Filter
from .image_size import Which, dimensions


@dataclass
class AspectRatioOptions:
    max: Optional[float] = 3.0
    min: float = 1.0
    which: Which = "original"

    def validate(self) -> None:
        if self.min < 1.0:
            raise ConfigError(f"min: the ratio is long side / short side, so >= 1; got {self.min}")
        if self.max is not None and self.max < self.min:
            raise ConfigError(f"max: {self.max} is below min {self.min}")


class AspectRatioFilter(Filter):
    name = "aspect_ratio"
    Options = AspectRatioOptions

    def __call__(self, batch: Batch) -> Batch:
        o = self.options
        for i in schema.alive(batch):
            w, h = dimensions(batch, i, o.which)
            if not w or not h:
                continue
            ratio = max(w, h) / min(w, h)
            if o.max is not None and ratio > o.max:
                self.reject(batch, i, f"{w}x{h}: aspect ratio {ratio:.2f} above {o.max:g}")
            elif ratio < o.min:
                self.reject(batch, i, f"{w}x{h}: aspect ratio {ratio:.2f} below {o.min:g}")
        return batch

"""``aspect_ratio``: keep images whose long side is at most ``max`` times the short side (DataComp's
basic filter uses 3), optionally at least ``min`` times (e.g. to keep only panoramas)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.core.config import ConfigError

from .base import Filter, Row, Which


@dataclass
class AspectRatioConfig:
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
    Config = AspectRatioConfig

    def problem(self, row: Row) -> Optional[str]:
        w, h = row.size(self.config.which)
        if not w or not h:
            return None
        c = self.config
        ratio = max(w, h) / min(w, h)
        if c.max is not None and ratio > c.max:
            return f"{w}x{h}: aspect ratio {ratio:.2f} above {c.max:g}"
        if ratio < c.min:
            return f"{w}x{h}: aspect ratio {ratio:.2f} below {c.min:g}"
        return None

"""``image_size``: keep images whose sides and area are within bounds (DataComp's basic filter uses
``min_side: 200`` on the original image). Sizes come from the status table, so nothing is decoded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.core.config import ConfigError

from .base import Filter, Row, Which


@dataclass
class ImageSizeConfig:
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
    Config = ImageSizeConfig

    def problem(self, row: Row) -> Optional[str]:
        w, h = row.size(self.config.which)
        if w is None or h is None:  # no size to judge (e.g. not an image): leave it to others
            return None
        c = self.config
        if min(w, h) < c.min_side:
            return f"{w}x{h}: shorter side below {c.min_side}"
        if c.max_side is not None and max(w, h) > c.max_side:
            return f"{w}x{h}: longer side above {c.max_side}"
        if w < c.min_width or h < c.min_height:
            return f"{w}x{h}: below {c.min_width}x{c.min_height}"
        if w * h < c.min_area:
            return f"{w}x{h}: area below {c.min_area}"
        if c.max_area is not None and w * h > c.max_area:
            return f"{w}x{h}: area above {c.max_area}"
        return None

"""Resolution policies: the pixel size a tokenizer sees for an image of a given size.

Both policies scale the image to cover the target and crop the centre (PIL's ``ImageOps.fit``,
bicubic); they differ in the target: one square, or the aspect-ratio bucket closest to the image.
The label of what was applied (``center_crop:256x256``, ``bucket:192x320``) goes with each sample.
"""
from __future__ import annotations

import math
from typing import Optional

from PIL import Image, ImageOps

from pipeline.core.config import ConfigError
from pipeline.media.geometry import round_to_multiple

# Height/width ratios of the default buckets: portrait 1:2 .. square .. landscape 2:1.
DEFAULT_RATIOS = (2.0, 16 / 9, 3 / 2, 4 / 3, 1.0, 3 / 4, 2 / 3, 9 / 16, 1 / 2)
RESAMPLE = Image.Resampling.BICUBIC


class ResolutionPolicy:
    name: str

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the tokenizer gets for an image of this size."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def label(self, width: int, height: int) -> str:
        w, h = self.target(width, height)
        return f"{self.name}:{h}x{w}"


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to cover ``size`` (width, height), crop the centre; RGB. A JPEG not yet
    loaded is decoded at the smallest DCT scale that still covers the size (much faster)."""
    if image.format == "JPEG":  # a no-op once the image is loaded
        image.draft("RGB", size)
    image = image.convert("RGB")
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=RESAMPLE, centering=(0.5, 0.5))


class CenterCrop(ResolutionPolicy):
    name = "center_crop"

    def __init__(self, resolution: int):
        self.resolution = resolution

    def target(self, width: int, height: int) -> tuple[int, int]:
        return self.resolution, self.resolution

    def describe(self) -> dict:
        return {"policy": self.name, "resolution": self.resolution, "resample": "bicubic"}


class AspectBuckets(ResolutionPolicy):
    """The (height, width) bucket whose aspect ratio is closest to the image's (in log ratio)."""

    name = "bucket"

    def __init__(self, buckets: list[tuple[int, int]]):
        self.buckets = sorted({(int(h), int(w)) for h, w in buckets})

    def target(self, width: int, height: int) -> tuple[int, int]:
        ratio = math.log(height / width)
        h, w = min(self.buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), b))
        return w, h

    def describe(self) -> dict:
        return {"policy": "buckets", "buckets": [list(b) for b in self.buckets], "resample": "bicubic"}


def default_buckets(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """Buckets of about resolution² pixels at common ratios, sides a multiple of the grid cell."""
    out = []
    for r in DEFAULT_RATIOS:
        h = round_to_multiple(resolution * math.sqrt(r), multiple)
        w = round_to_multiple(resolution / math.sqrt(r), multiple)
        out.append((h, w))
    return out


def make_policy(policy: str, resolution: int, buckets: Optional[list[list[int]]], multiple: int) -> ResolutionPolicy:
    """The policy, checked against the tokenizer's grid cell (``multiple`` pixels)."""
    if policy == "center_crop":
        if resolution % multiple:
            raise ConfigError(f"resolution: {resolution} is not a multiple of the model's "
                              f"downsampling factor {multiple}")
        return CenterCrop(resolution)
    chosen = [tuple(b) for b in buckets] if buckets else default_buckets(resolution, multiple)
    for h, w in chosen:
        if h % multiple or w % multiple:
            raise ConfigError(f"buckets: [{h}, {w}] is not a multiple of the model's downsampling factor {multiple}")
    return AspectBuckets(chosen)

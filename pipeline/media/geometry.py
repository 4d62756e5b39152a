"""Output sizes: every rule the project uses to scale a size to a target, in one place.

Pure arithmetic, sizes in and sizes out. The rules differ on purpose, each to match what its
consumer expects, so they carry the name of whom they match:

* :func:`plan_geometry`: img2dataset's resize modes (the download stage, the loader's resize).
  Each side becomes ``max(1, round(side * target / reference))`` with Python's round-half-even,
  the same float expression as albumentations' Smallest/LongestMaxSize that img2dataset uses.
* :func:`even_short_side`: video frames for H.264 in yuv420p, where both sides must be even;
  halves round up.
* :func:`torchvision_short_side`: torchvision's ``Resize(int)`` (the long side is truncated), so
  the GPU decode path of the CLIP filter computes what open_clip's own transform computes.
* :func:`round_to_multiple`: aspect-ratio buckets whose sides are whole tokenizer grid cells.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The largest width x height decoded, checked on the header before decoding: PIL's own
# decompression-bomb limit, for images and video frames alike.
MAX_PIXELS = 89_478_485
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
_SHORT_SIDE_MODES = ("keep_ratio", "center_crop")  # the others scale the long side


@dataclass(frozen=True)
class Geometry:
    """What to do to a ``width x height`` image (as displayed): resize the whole image to
    ``resized``, keep the ``crop`` box of that, then paste it at ``offset`` on a white ``canvas``
    (``canvas`` None: no padding). ``downscale`` picks the filter, as img2dataset does."""

    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    canvas: Optional[tuple[int, int]]
    offset: tuple[int, int]
    downscale: bool

    @property
    def output_size(self) -> tuple[int, int]:
        if self.canvas is not None:
            return self.canvas
        x0, y0, x1, y1 = self.crop
        return x1 - x0, y1 - y0


def scale_to(width: int, height: int, side: int, target: int) -> tuple[int, int]:
    """Scale so that ``side`` (one of the two) becomes ``target``: img2dataset's rounding."""
    scale = target / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def center_offset(outer: int, inner: int) -> int:
    """Where a centred ``inner`` span starts inside ``outer`` (the extra pixel goes after it)."""
    return (outer - inner) // 2


def plan_geometry(width: int, height: int, size: int, mode: str, only_if_bigger: bool = False) -> Geometry:
    """img2dataset's output geometry for an image of ``width x height`` (as displayed).

    ``only_if_bigger``: resize (and crop / pad) only when the short side (keep_ratio,
    center_crop) or the long side (border, keep_ratio_largest) is strictly above ``size``.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    keep = Geometry((width, height), (0, 0, width, height), None, (0, 0), False)
    if mode == "no":
        return keep
    side = min(width, height) if mode in _SHORT_SIDE_MODES else max(width, height)
    downscale = side > size
    if only_if_bigger and not downscale:
        return keep
    rw, rh = scale_to(width, height, side, size)
    crop, canvas, offset = (0, 0, rw, rh), None, (0, 0)
    if mode == "center_crop":
        x0, y0 = center_offset(rw, size), center_offset(rh, size)
        crop = (x0, y0, x0 + size, y0 + size)
    elif mode == "border":
        canvas = (max(rw, size), max(rh, size))
        offset = (int((canvas[0] - rw) / 2.0), int((canvas[1] - rh) / 2.0))
    return Geometry((rw, rh), crop, canvas, offset, downscale)


def even_short_side(width: int, height: int, target: Optional[int]) -> tuple[int, int]:
    """Scale so the short side is ``target`` (aspect kept; None keeps the size), both sides even."""
    if target is not None:
        scale = target / min(width, height)
        width, height = width * scale, height * scale
    return max(2, 2 * int(width / 2 + 0.5)), max(2, 2 * int(height / 2 + 0.5))


def torchvision_short_side(width: int, height: int, target: int) -> tuple[int, int]:
    """(height, width) after torchvision's ``Resize(target)``: the short side becomes ``target``."""
    return (target, int(target * width / height)) if height <= width else (int(target * height / width), target)


def torchvision_center_offset(outer: int, inner: int) -> int:
    """Where torchvision's ``CenterCrop`` starts an ``inner`` span inside ``outer``: the half
    margin rounded (half to even, Python's ``round``), not floored as :func:`center_offset`."""
    return int(round((outer - inner) / 2.0))


def round_to_multiple(value: float, multiple: int) -> int:
    """``value`` to the nearest multiple of ``multiple``, at least one multiple."""
    return max(multiple, round(value / multiple) * multiple)

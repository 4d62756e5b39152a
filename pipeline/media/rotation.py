"""Rotation metadata: how a source's stored frames become the frames a player shows.

Phones store portrait video as landscape frames plus a **display matrix** (MP4/MOV ``tkhd``
matrix, the ``rotate`` tag of old FFmpeg versions), which players apply when they show it. The
steps here are the ones ffmpeg's autorotate inserts (``transpose``, ``hflip``, ``vflip``), decided
from the matrix the same way, so a clip comes out as ffmpeg and players display the source. A
matrix that is not a quarter turn (with or without a mirror) is left as stored: ffmpeg would
rotate by an arbitrary angle and fill the corners, which no dataset wants.

The video path re-encodes every rotated source (the cut never copies its packets): readers that
trainers use (decord, which also samples our frames, and torchvision) ignore the display matrix,
so a copied clip would reach training sideways. Clips are written upright, without a matrix, and
their ``width``/``height`` are the displayed ones.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

# ffmpeg filter name and argument -> the same step on an (H, W, ...) array
_ARRAY_STEPS = {
    ("transpose", "clock"): lambda a: np.rot90(a, -1),         # 90 degrees clockwise
    ("transpose", "cclock"): lambda a: np.rot90(a, 1),         # 90 degrees counterclockwise
    ("transpose", "cclock_flip"): lambda a: a.swapaxes(0, 1),  # counterclockwise, then vertical flip
    ("transpose", "clock_flip"): lambda a: np.rot90(a, -1)[::-1],
    ("hflip", None): lambda a: a[:, ::-1],
    ("vflip", None): lambda a: a[::-1],
}


@dataclass(frozen=True)
class Orientation:
    """The steps from stored to displayed frames, in order; none for an upright source."""
    steps: tuple[tuple[str, Optional[str]], ...] = ()

    @property
    def upright(self) -> bool:
        return not self.steps

    @property
    def swaps_sides(self) -> bool:
        """A quarter turn: the displayed width is the stored height."""
        return any(name == "transpose" for name, _ in self.steps)

    def display_size(self, width: int, height: int) -> tuple[int, int]:
        return (height, width) if self.swaps_sides else (width, height)

    def stored_size(self, width: int, height: int) -> tuple[int, int]:
        """The stored size whose display is ``width`` x ``height``."""
        return (height, width) if self.swaps_sides else (width, height)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """A stored frame (H, W, ...) as displayed (contiguous)."""
        for step in self.steps:
            array = _ARRAY_STEPS[step](array)
        return np.ascontiguousarray(array)

    def describe(self) -> str:
        return ",".join(name if arg is None else f"{name}={arg}" for name, arg in self.steps) or "upright"


UPRIGHT = Orientation()


def display_rotation(matrix: tuple[int, ...]) -> float:
    """``av_display_rotation_get``: the counterclockwise angle the matrix rotates by (NaN when degenerate)."""
    a, b, _, c, d = (v / 65536 for v in matrix[:5])
    scale0, scale1 = math.hypot(a, c), math.hypot(b, d)
    if scale0 == 0 or scale1 == 0:
        return math.nan
    return -math.degrees(math.atan2(b / scale1, a / scale0))


def from_matrix(matrix: Optional[tuple[int, ...]]) -> Orientation:
    """ffmpeg's autorotate decision for a display matrix (9 int32, 16.16 fixed point)."""
    if matrix is None or len(matrix) != 9:
        return UPRIGHT
    rotation = display_rotation(matrix)
    if math.isnan(rotation):
        return UPRIGHT
    theta = -round(rotation)
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)  # into [0, 360)
    if abs(theta - 90) < 1:
        return Orientation((("transpose", "cclock_flip" if matrix[3] > 0 else "clock"),))
    if abs(theta - 180) < 1:
        return Orientation(tuple(s for s, flip in ((("hflip", None), matrix[0] < 0), (("vflip", None), matrix[4] < 0))
                                 if flip))
    if abs(theta - 270) < 1:
        return Orientation((("transpose", "clock_flip" if matrix[3] < 0 else "cclock"),))
    if abs(theta) < 1 and matrix[4] < 0:
        return Orientation((("vflip", None),))
    return UPRIGHT  # upright, or an angle that is not a quarter turn: left as stored


def from_rotate_tag(tag: Optional[str]) -> Orientation:
    """The ``rotate`` stream tag (degrees clockwise), which some demuxers still report."""
    try:
        degrees = int(float(tag)) % 360 if tag is not None else 0
    except ValueError:
        return UPRIGHT
    steps = {90: (("transpose", "clock"),), 180: (("hflip", None), ("vflip", None)),
             270: (("transpose", "cclock"),)}
    return Orientation(steps.get(degrees, ()))


def frame_orientation(frame, rotate_tag: Optional[str] = None) -> Orientation:
    """The orientation of a decoded frame: its display-matrix side data (the decoder copies the
    stream's onto every frame), else the stream's ``rotate`` tag."""
    for side_data in frame.side_data:
        if side_data.type.name == "DISPLAYMATRIX":
            raw = bytes(side_data)
            if len(raw) == 36:
                return from_matrix(struct.unpack("<9i", raw))
    return from_rotate_tag(rotate_tag)


class FrameRotator:
    """Applies an orientation to yuv420p frames of one size with ffmpeg's own filters (no RGB
    round trip); one filter graph per clip."""

    def __init__(self, orientation: Orientation, width: int, height: int):
        import av

        self.graph = av.filter.Graph()
        nodes = [self.graph.add_buffer(width=width, height=height, format="yuv420p", time_base=Fraction(1, 1000))]
        for name, arg in orientation.steps:
            nodes.append(self.graph.add(name, arg))
        nodes.append(self.graph.add("buffersink"))
        self.graph.link_nodes(*nodes).configure()
        self.pts = 0

    def __call__(self, frame):
        frame.pts, frame.time_base = self.pts, Fraction(1, 1000)  # the buffer wants rising timestamps
        self.pts += 1
        self.graph.push(frame)
        return self.graph.pull()

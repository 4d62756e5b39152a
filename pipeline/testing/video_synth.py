"""Synthetic test videos whose every frame carries its own index, for the video tests and benchmark.

Each frame is a grid of 8 x 6 cells. The top two rows are a 16-bit binary counter (white = 1,
black = 0) holding the frame index; the other rows hold a pattern that moves from frame to frame
so that the encoder has real motion to code. The counter survives lossy coding and any
aspect-preserving resize, so :func:`read_counter` recovers the index of a decoded frame and the
tests can check exactly which source frames a cut clip or a frame sample contains.
"""
from __future__ import annotations

import functools
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

GRID_COLS, GRID_ROWS = 8, 6
COUNTER_BITS = 16  # the top two rows of the grid


def counter_frame(index: int, width: int = 128, height: int = 96) -> np.ndarray:
    """An RGB frame (H, W, 3) uint8 showing ``index`` in its counter cells."""
    frame = np.empty((height, width, 3), np.uint8)
    diag, anti = _diagonals(width, height)
    # Moving diagonal stripes with a colour drift: cheap, but real motion for the encoder.
    frame[..., 0] = diag + np.uint8((12 * index) % 256)  # uint8 arithmetic wraps: modulo 256
    frame[..., 1] = anti + np.uint8((10 * index) % 256)
    frame[..., 2] = (index * 7) % 256
    cell_w, cell_h = width / GRID_COLS, height / GRID_ROWS
    for bit in range(COUNTER_BITS):
        row, col = divmod(bit, GRID_COLS)
        y0, y1 = round(row * cell_h), round((row + 1) * cell_h)
        x0, x1 = round(col * cell_w), round((col + 1) * cell_w)
        frame[y0:y1, x0:x1] = 235 if (index >> bit) & 1 else 16
    return frame


@functools.lru_cache(maxsize=8)
def _diagonals(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width]
    return ((xs + ys) * 4 % 256).astype(np.uint8), ((xs - ys) * 2 % 256).astype(np.uint8)


def read_counter(frame: np.ndarray) -> int:
    """The index drawn by :func:`counter_frame` into ``frame`` (H, W, 3), after coding or resizing."""
    height, width = frame.shape[:2]
    cell_w, cell_h = width / GRID_COLS, height / GRID_ROWS
    value = 0
    for bit in range(COUNTER_BITS):
        row, col = divmod(bit, GRID_COLS)
        # Read the middle half of the cell: its borders bleed into neighbours after coding.
        y0, y1 = int((row + 0.25) * cell_h), max(int((row + 0.75) * cell_h), int((row + 0.25) * cell_h) + 1)
        x0, x1 = int((col + 0.25) * cell_w), max(int((col + 0.75) * cell_w), int((col + 0.25) * cell_w) + 1)
        if frame[y0:y1, x0:x1].mean() > 128:
            value |= 1 << bit
    return value


def write_counter_video(path: str | Path, n_frames: int, fps: float | Fraction = 25, width: int = 128,
                        height: int = 96, codec: str = "libx264", gop: int = 25, bframes: int = 0,
                        container_format: Optional[str] = None) -> Path:
    """Encode ``n_frames`` counter frames to ``path`` (format from the suffix unless given).

    ``gop`` is the keyframe interval in frames (fixed: no scene-cut keyframes), ``bframes`` the
    number of B-frames, so tests can build sources where a span does or does not start on a
    keyframe and where decode order differs from display order.
    """
    import av

    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "20", "threads": "1",
                              "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}"}
        else:
            stream.codec_context.gop_size = gop
            stream.codec_context.max_b_frames = bframes
            stream.options = {"threads": "1", "qscale": "3"} if codec == "mpeg4" else {"threads": "1"}
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(counter_frame(i, width, height), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode(None))
    return path


def counter_video_bytes(tmp_dir: str | Path, name: str, **kwargs) -> bytes:
    """The bytes of a counter video written under ``tmp_dir`` (see :func:`write_counter_video`)."""
    return write_counter_video(Path(tmp_dir) / name, **kwargs).read_bytes()

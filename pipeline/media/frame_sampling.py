"""Sampling the stored frames of an encoded clip (decord): which frames, and the uint8
(T, H, W, 3) array that becomes ``KEY.frames.npy``.

Clips are written upright (:mod:`pipeline.media.rotation`), so the sampled frames are too.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pipeline.core.schema import ErrorKind
from pipeline.media.geometry import even_short_side
from pipeline.media.video_source import CutConfig, MediaError


def frame_indices(n_frames: int, fps: float, num_frames: Optional[int], frames_fps: Optional[float]) -> list[int]:
    """Which frames of an ``n_frames`` clip to sample.

    ``num_frames``: exactly that many, evenly spaced from the first frame to the last (repeats when
    the clip is shorter). ``frames_fps``: one frame every ``1 / frames_fps`` seconds from the start.
    """
    if n_frames <= 0:
        return []
    if frames_fps is not None:
        every = fps / frames_fps
        count = max(1, math.ceil(n_frames / every - 1e-9))
        return [min(n_frames - 1, int(math.floor(k * every + 1e-9))) for k in range(count)]
    count = num_frames or 1
    if count == 1:
        return [0]
    return [int(round(k * (n_frames - 1) / (count - 1))) for k in range(count)]


def sample_frames(path: Union[str, Path], config: CutConfig) -> np.ndarray:
    """Frames of an encoded clip as uint8 (T, H, W, 3), read with decord."""
    import decord

    try:
        probe_reader = decord.VideoReader(str(path), num_threads=1)
    except (decord.DECORDError, RuntimeError, AssertionError) as e:
        raise MediaError(ErrorKind.DECODE_ERROR, f"decord cannot read the clip: {e}") from None
    width, height = -1, -1
    if config.frames_size is not None:
        h0, w0 = probe_reader[0].shape[:2]
        width, height = even_short_side(w0, h0, config.frames_size)
        probe_reader = decord.VideoReader(str(path), num_threads=1, width=width, height=height)
    reader = probe_reader
    indices = frame_indices(len(reader), reader.get_avg_fps(), config.num_frames, config.frames_fps)
    return reader.get_batch(indices).asnumpy()

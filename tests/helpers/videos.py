"""The counter videos that the clip-cutting tests (tests/media) and the video-download tests
(tests/download) share. Every video is generated with PyAV and shows its frame index as a binary
counter (pipeline.testing.video_synth), so a test can decode a clip and say exactly which source
frames it holds."""
from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av

from pipeline.core import schema
from pipeline.testing.video_synth import read_counter, write_counter_video


def make_batch(rows: list[tuple]) -> dict[str, list]:
    """A video stage's input batch; rows: (url, clip_start, clip_end)."""
    n = len(rows)
    return {"key": [f"{i:09d}" for i in range(n)], "url": [r[0] for r in rows],
            "caption": [f"clip {i}" for i in range(n)], "status": [schema.PENDING] * n,
            "error_kind": [None] * n, "error_message": [None] * n, "width": [None] * n, "height": [None] * n,
            "original_width": [None] * n, "original_height": [None] * n, "sha256": [None] * n,
            "files": [{} for _ in range(n)], "clip_start": [r[1] for r in rows], "clip_end": [r[2] for r in rows]}


def write_videos(d: Path) -> dict[str, Path]:
    """The test videos, written into ``d``, by name."""
    return {
        "bframes": write_counter_video(d / "bframes.mp4", 100, fps=25, gop=25, bframes=2),
        "plain": write_counter_video(d / "plain.mp4", 100, fps=25, gop=25, bframes=0),
        "mpeg4": write_counter_video(d / "mpeg4.avi", 100, fps=25, gop=12, codec="mpeg4"),
        "ntsc": write_counter_video(d / "ntsc.mp4", 150, fps=Fraction(30000, 1001), gop=30, bframes=1),
        "long": write_counter_video(d / "long.mp4", 160, fps=8, gop=16),  # 20 s
        # no duration in the container, no timestamps, no seeking: a raw H.264 stream (8 s)
        "raw": write_counter_video(d / "raw.h264", 200, fps=25, container_format="h264"),
        "mkv": write_counter_video(d / "clip.mkv", 100, fps=25, gop=25, container_format="matroska"),
    }


def decoded(data: bytes) -> list[tuple[float, int]]:
    """(time, counter) of every frame of an encoded clip."""
    with av.open(io.BytesIO(data)) as container:
        return [(float(f.time), read_counter(f.to_ndarray(format="rgb24")))
                for f in container.decode(video=0)]

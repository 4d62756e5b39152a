"""Scene cuts and motion: frame differences of a video, decoded at reduced size with PyAV.

**Shot boundaries** (:func:`detect_cuts`) follow PySceneDetect's ``ContentDetector``: each frame is
scaled to ``downscale_width`` pixels wide, turned into HSV (OpenCV's 8-bit ranges: H 0..179, S and
V 0..255), and its score is the mean over H, S and V of the mean absolute difference from the
previous frame. A frame whose score is at least ``threshold`` starts a new scene, unless fewer
than ``min_scene_len`` frames have passed since the last cut (or the start). Frames are compared
as displayed: a source's rotation metadata is applied first (:mod:`pipeline.media.rotation`), as
OpenCV, which PySceneDetect reads with, does.

**Scenes to clips** (:func:`scene_spans`): the spans between cuts (the last one ends one frame
after the last frame). A scene shorter than ``min_clip`` seconds is **dropped**, never merged
into its neighbour (a merged clip would hold the very cut this stage exists to remove). A scene
longer than ``max_clip`` is split into the fewest **equal** pieces of at most ``max_clip``
seconds (so no tiny remainder: every piece lasts more than ``max_clip / 2``).

**How one row becomes several clips** (the download stage, :mod:`pipeline.download.video`): a row
without a span keeps its one key (``schema.make_key``: digits only, one per input row) and its one
status row; its clips are members of its sample, ``KEY.clip_000.mp4``, ``KEY.clip_001.mp4``, ...
(and ``KEY.clip_000.frames.npy`` ... when frames are stored), numbered in time order, and
``KEY.json`` lists them in ``scenes`` (``start``, ``end``, ``frame_count``, ``motion_score`` per
clip). Webdataset's key rule and the status-table promise hold unchanged, and since detection and
cutting depend only on the source bytes, a resumed shard is byte-identical.

**Motion** (:func:`motion_score`): the mean absolute difference (0..255) between consecutive
grey frames, scaled to ``MOTION_SIZE`` pixels on the short side, at ``MOTION_PAIRS`` evenly
spaced places in a clip; about 0 for a still shot.
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np

from pipeline.core.config import ConfigError
from pipeline.core.schema import ErrorKind
from pipeline.media.rotation import frame_orientation
from pipeline.media.video_source import MediaError
from pipeline.media.video_source import open_source as _open
from pipeline.media.video_source import video_stream as _video_stream

MOTION_SIZE = 64   # short side of the frames the motion score compares
MOTION_PAIRS = 8   # consecutive frame pairs compared per clip


@dataclass(frozen=True)
class SceneConfig:
    """``video.scenes``: cut rows without a span into scenes (PySceneDetect's defaults)."""
    detect: Literal["content"] = "content"
    threshold: float = 27.0       # content score (0..255) at which a frame starts a new scene
    min_scene_len: int = 15       # frames between two cuts at least
    min_clip: float = 2.0         # seconds; shorter scenes are dropped
    max_clip: float = 60.0        # seconds; longer scenes are split into equal pieces
    downscale_width: int = 256    # frames are compared at this width (or less)

    def validate(self) -> None:
        for name in ("threshold", "min_clip", "max_clip", "min_scene_len", "downscale_width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.min_clip > self.max_clip:
            raise ConfigError(f"min_clip: must be <= max_clip ({self.max_clip}), got {self.min_clip}")


@dataclass(frozen=True)
class Cuts:
    times: list[float]   # seconds (from the first frame) of the first frame of each new scene
    frames: list[int]    # their frame indices
    end: float           # where the video ends: one frame after its last frame
    frame_count: int


def detect_cuts(path: Union[str, Path], config: SceneConfig, threads: int = 1) -> Cuts:
    """The content cuts of the video at ``path``; any failure to read it is a MediaError."""
    import av

    try:
        with _open(path) as container:
            return _detect(container, config, threads)
    except MediaError:
        raise
    except av.FFmpegError as e:
        raise MediaError(ErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a bad video fails its rows, never the shard
        raise MediaError(ErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}") from None


def _detect(container, config: SceneConfig, threads: int) -> Cuts:
    vs = _video_stream(container)
    vs.thread_type = "AUTO" if threads > 1 else "SLICE"
    vs.codec_context.thread_count = threads
    rate = float(vs.average_rate or vs.guessed_rate or 25)
    times, frames = [], []
    previous, last_cut, n, t = None, 0, 0, -1 / rate
    for t, small in displayed_frames(container, config.downscale_width):
        hsv = _hsv(small)
        if previous is not None:
            # the mean over H, S and V of each one's mean difference (equal weights, equal sizes)
            score = float(np.abs(hsv - previous).mean())
            if score >= config.threshold and n - last_cut >= config.min_scene_len:
                times.append(round(t, 6))
                frames.append(n)
                last_cut = n
        previous = hsv
        n += 1
    if n == 0:
        raise MediaError(ErrorKind.DECODE_ERROR, "no frame could be decoded")
    return Cuts(times=times, frames=frames, end=round(t + 1 / rate, 6), frame_count=n)


def displayed_frames(container, max_width: int):
    """(time in seconds, RGB (H, W, 3) uint8) of every frame of the first video stream, as displayed
    (rotation metadata applied, :mod:`pipeline.media.rotation`) and at most ``max_width`` wide."""
    from av.video.reformatter import Interpolation, VideoReformatter

    vs = _video_stream(container)
    tb, origin = vs.time_base, vs.start_time or 0
    step = 1 / float(vs.average_rate or vs.guessed_rate or 25)
    t, size, orientation = -step, None, None
    scaler = VideoReformatter()  # one scaler for every frame: a new one per frame costs ~10x the decode
    for frame in container.decode(vs):
        pts = frame.pts if frame.pts is not None else frame.dts
        t = float((pts - origin) * tb) if pts is not None else t + step  # raw streams: count frames
        if size is None:
            orientation = frame_orientation(frame, vs.metadata.get("rotate"))
            shown = _reduced_size(*orientation.display_size(frame.width, frame.height), max_width)
            size = orientation.stored_size(*shown)  # scaled as stored, then turned: fewer pixels to turn
        small = scaler.reformat(frame, width=size[0], height=size[1], format="rgb24",
                                interpolation=Interpolation.FAST_BILINEAR)
        yield t, orientation.apply(small.to_ndarray())


def _reduced_size(width: int, height: int, max_width: int) -> tuple[int, int]:
    if width <= max_width:
        return width, height
    return max_width, max(1, round(height * max_width / width))


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit RGB -> HSV (H in 0..179), as int16 so differences do not wrap.

    Channel by channel (a reduction over the last axis is ~10x slower), in float32."""
    r, g, b = (rgb[..., k].astype(np.float32) for k in range(3))
    v = np.maximum(np.maximum(r, g), b)
    spread = v - np.minimum(np.minimum(r, g), b)
    s = 255.0 * spread / np.maximum(v, 1.0)
    safe = np.maximum(spread, 1e-6)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)) * 30.0
    h[h < 0] += 180.0
    h[spread == 0] = 0.0
    out = np.empty(rgb.shape, np.int16)
    out[..., 0], out[..., 1], out[..., 2] = np.rint(h), np.rint(s), v
    return out


def scene_spans(cuts: Cuts, config: SceneConfig) -> list[tuple[float, float]]:
    """The clips of a video: its scenes, the short ones dropped and the long ones split."""
    bounds = [0.0, *cuts.times, cuts.end]
    spans = []
    for start, end in zip(bounds, bounds[1:]):
        length = end - start
        if length < config.min_clip - 1e-6:
            continue
        pieces = max(1, math.ceil(length / config.max_clip - 1e-9))
        step = length / pieces
        spans.extend((round(start + k * step, 6), round(start + (k + 1) * step, 6) if k + 1 < pieces else end)
                     for k in range(pieces))
    return spans


def scene_summary(entries: list[dict], clips: list[bytes]) -> dict:
    """The columns of a row cut into scenes, summed up over its clips (their ``scenes`` entries
    and bytes, in time order): one sha256 over the clips, the span from the first start to the
    last end, the clips' total duration and frames, the lowest motion score."""
    digest = hashlib.sha256()
    for data in clips:
        digest.update(data)
    motions = [e["motion_score"] for e in entries if e.get("motion_score") is not None]
    return {"sha256": digest.hexdigest(), "clip_start": entries[0]["start"], "clip_end": entries[-1]["end"],
            "duration": round(sum(e["end"] - e["start"] for e in entries), 6),
            "frame_count": sum(e["frame_count"] or 0 for e in entries),
            "motion_score": min(motions) if motions else None}


def motion_score(mp4: bytes) -> float:
    """Mean absolute grey-level difference (0..255) between consecutive frames of an encoded clip,
    at ``MOTION_PAIRS`` evenly spaced places; 0.0 for a clip of one frame."""
    import av
    from av.video.reformatter import Interpolation, VideoReformatter

    try:
        with av.open(io.BytesIO(mp4)) as container:
            vs = _video_stream(container)
            grey = []
            size = None
            scaler = VideoReformatter()
            for frame in container.decode(vs):
                if size is None:
                    size = _short_side(frame.width, frame.height, MOTION_SIZE)
                grey.append(scaler.reformat(frame, width=size[0], height=size[1], format="gray",
                                            interpolation=Interpolation.FAST_BILINEAR).to_ndarray())
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - the clip fails alone
        raise MediaError(ErrorKind.DECODE_ERROR, f"cannot score motion: {type(e).__name__}: {e}") from None
    if len(grey) < 2:
        return 0.0
    pairs = min(MOTION_PAIRS, len(grey) - 1)
    starts = sorted({int(round(k * (len(grey) - 2) / max(pairs - 1, 1))) for k in range(pairs)})
    diffs = [np.abs(grey[k + 1].astype(np.int16) - grey[k]).mean() for k in starts]
    return round(float(np.mean(diffs)), 6)


def _short_side(width: int, height: int, short: int) -> tuple[int, int]:
    scale = min(1.0, short / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


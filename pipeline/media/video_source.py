"""What every video module shares: the cut's config, the source's probe, the clip, the failure,
and opening a source (PyAV) at a time or an output MP4.

* A source's time is seconds from its first video frame (``start_time`` of the video stream).
* ``SourceInfo.width`` / ``height`` are the stored frame size; ``display_size`` is what players
  show once the rotation metadata is applied (:mod:`pipeline.media.rotation`).
* Failures raise :class:`MediaError` with an error kind from :mod:`pipeline.core.schema`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pipeline.core.schema import ErrorKind
from pipeline.media.geometry import MAX_PIXELS
from pipeline.media.rotation import UPRIGHT, Orientation, frame_orientation, from_rotate_tag

Span = Optional[tuple[Optional[float], Optional[float]]]

MUX_OPTIONS = {"movflags": "+faststart", "fflags": "+bitexact"}


class MediaError(Exception):
    """A clip could not be produced; ``kind`` is an error kind from :class:`pipeline.core.schema.ErrorKind`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class CutConfig:
    resolution: Optional[int] = None      # short side of the output, even; None keeps the source size
    fps: Optional[float] = None           # output frame rate; None keeps the source's (average) rate
    precision: str = "exact"              # exact | keyframe
    crf: int = 23
    preset: str = "veryfast"
    max_duration: Optional[float] = None  # longest clip in seconds
    max_pixels: int = MAX_PIXELS          # width * height cap of the source
    store_frames: bool = False
    num_frames: Optional[int] = 8
    frames_fps: Optional[float] = None
    frames_size: Optional[int] = None     # short side of sampled frames; None: the clip's size
    decode_threads: int = 1
    audio: bool = True                    # keep the source's audio track (AAC); False: video only
    audio_rate: Optional[int] = None      # resample the audio to this rate; None keeps the source's
    audio_channels: Optional[int] = None  # 1 or 2; None keeps the source's

    @property
    def transforms(self) -> bool:
        return self.resolution is not None or self.fps is not None


@dataclass(frozen=True)
class AudioInfo:
    """The source's first audio stream."""
    codec: str              # the decoder's name ("aac", "mp3", ...), or the codec's when none decodes it
    rate: int
    channels: int
    decodable: bool = True  # PyAV has a decoder for it
    copyable: bool = False  # AAC with its AudioSpecificConfig: the packets can go into MP4 as they are


@dataclass(frozen=True)
class SourceInfo:
    duration: Optional[float]  # seconds; None when the container does not say
    fps: Fraction
    width: int                 # as stored
    height: int
    codec: str
    pix_fmt: Optional[str] = None
    orientation: Orientation = UPRIGHT
    audio: Optional[AudioInfo] = None  # the first audio stream; None when there is none

    @property
    def copyable(self) -> bool:
        """Packets can go to the output as they are: H.264 in the 4:2:0 every player decodes,
        upright (readers that trainers use ignore rotation metadata: see pipeline.media.rotation)."""
        return self.codec == "h264" and self.pix_fmt in ("yuv420p", "yuvj420p") and self.orientation.upright

    @property
    def display_size(self) -> tuple[int, int]:
        return self.orientation.display_size(self.width, self.height)


@dataclass
class Clip:
    data: bytes                # the MP4
    start: float               # where the clip really starts and ends in the source (seconds)
    end: float
    frame_count: int
    fps: float
    width: int                 # as displayed (clips are written upright)
    height: int
    method: str                # remux | reencode
    codec: str = "h264"
    frames: Optional[np.ndarray] = None  # (T, H, W, 3) uint8 when frames are sampled
    motion: Optional[float] = None       # pipeline.media.scenes.motion_score, when asked for
    audio_codec: Optional[str] = None    # the clip's audio track ("aac"); None when it has none
    audio_rate: Optional[int] = None
    audio_channels: Optional[int] = None

    @property
    def duration(self) -> float:
        return self.end - self.start


# -- opening -------------------------------------------------------------------------------------
def open_source(path: Union[str, Path]):
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise MediaError(ErrorKind.DECODE_ERROR, f"cannot open the video: {e}") from None


def video_stream(container):
    if not container.streams.video:
        raise MediaError(ErrorKind.DECODE_ERROR, "the file has no video stream")
    return container.streams.video[0]


def open_at(path, seconds: float, stream_of=video_stream):
    """The source, positioned at the keyframe at or before ``seconds`` (from its first video
    frame) in the stream ``stream_of(container)`` picks.

    A format that cannot seek (a raw H.264 stream) is opened again and read from the beginning:
    slower, same frames.
    """
    import av

    container = open_source(path)
    try:
        origin = video_origin(container)
        stream = stream_of(container)
        target = int((origin + seconds) / stream.time_base)
        if seconds > 0 and target > (stream.start_time or 0):
            container.seek(target, stream=stream, backward=True)
        return container
    except av.FFmpegError:
        container.close()
        return open_source(path)
    except BaseException:
        container.close()
        raise


def video_origin(container) -> Fraction:
    """Where the source's time starts, in seconds of the container: its first video frame."""
    vs = video_stream(container)
    return Fraction(vs.start_time or 0) * vs.time_base


def open_output(out_path: Path):
    import av

    return av.open(str(out_path), "w", format="mp4", options=dict(MUX_OPTIONS))


# -- probing -------------------------------------------------------------------------------------
def probe(container, max_pixels: int) -> SourceInfo:
    """Size, rate, duration, codec, orientation and audio of the source; enforces the pixel cap."""
    vs = video_stream(container)
    ctx = vs.codec_context
    width, height = ctx.width or 0, ctx.height or 0
    if width <= 0 or height <= 0:
        raise MediaError(ErrorKind.DECODE_ERROR, "the video stream has no frame size")
    if width * height > max_pixels:
        raise MediaError(ErrorKind.DECOMPRESSION_BOMB, f"{width}x{height} is more than {max_pixels} pixels")
    rate = vs.average_rate or vs.guessed_rate or vs.base_rate
    if not rate or rate <= 0 or rate > 1000:
        rate = Fraction(25)
    duration = None
    if vs.duration is not None and vs.time_base is not None:
        duration = float(vs.duration * vs.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    audio = probe_audio(container)
    return SourceInfo(duration=duration, fps=Fraction(rate), width=width, height=height, codec=ctx.name,
                      pix_fmt=ctx.pix_fmt, orientation=_orientation(container, vs), audio=audio)


def probe_audio(container) -> Optional[AudioInfo]:
    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    ctx = stream.codec_context
    if ctx is None:  # no decoder in this FFmpeg build
        return AudioInfo(codec=getattr(stream, "name", None) or "unknown", rate=0, channels=0, decodable=False)
    return AudioInfo(codec=ctx.name, rate=int(ctx.sample_rate or 0), channels=int(ctx.channels or 0),
                     copyable=ctx.name == "aac" and bool(ctx.extradata))


def _orientation(container, vs) -> Orientation:
    """Read from the first decoded frame: PyAV shows a stream's display matrix only there."""
    import av

    tag = vs.metadata.get("rotate")
    try:
        for frame in container.decode(vs):
            return frame_orientation(frame, tag)
    except av.FFmpegError:
        pass  # the cut decodes again and reports it; a copy needs no decoding
    return from_rotate_tag(tag)


def probe_file(path: Union[str, Path], max_pixels: int) -> SourceInfo:
    """:func:`probe` on a file; any failure to read it is a MediaError (decode_error)."""
    try:
        with open_source(path) as container:
            return probe(container, max_pixels)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - odd containers must fail their rows, not the shard
        raise MediaError(ErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}") from None


def resolve_span(span: Span, info: SourceInfo, max_duration: Optional[float]) -> tuple[float, float]:
    """``[start, end)`` in seconds; ``end`` may be ``inf`` when neither span nor container knows it."""
    start, end = (span or (None, None))
    start = 0.0 if start is None else float(start)
    end = math.inf if end is None else float(end)
    if not (start >= 0 and end > start) or math.isnan(start) or math.isnan(end):
        raise MediaError(ErrorKind.BAD_SPAN, f"invalid span [{start}, {end})")
    if info.duration is not None:
        if start >= info.duration:
            raise MediaError(ErrorKind.BAD_SPAN, f"the span starts at {start:.3f}s, after the video's end "
                                                 f"({info.duration:.3f}s)")
        end = min(end, info.duration)
    if max_duration is not None and math.isfinite(end) and end - start > max_duration + 1e-6:
        raise MediaError(ErrorKind.TOO_LONG, f"the clip lasts {end - start:.3f}s, more than max_duration "
                                             f"{max_duration}s")
    return start, end


def hard_end(start: float, end: float, max_duration: Optional[float]) -> float:
    """Where to stop at the latest: the end, or the duration cap when the end is unknown (the
    container does not say how long the video is); a known end was checked by resolve_span."""
    if math.isfinite(end) or max_duration is None:
        return end
    return start + max_duration

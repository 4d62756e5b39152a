"""Cut clips out of a local video file (PyAV), encode them as H.264 MP4 and sample frames (decord).

Pure functions over files on disk, so the download stage can run them in a thread pool (PyAV and
decord release the GIL while they decode and encode) and tests can run them without a server.

* A clip is a span ``[start, end)`` in seconds from the first frame of the source (``None`` for
  the whole video). A frame belongs to the clip when its midpoint lies inside the span, so a clip
  starts and ends within half a frame of the span.
* **Remux** (stream copy, no quality loss, no decode) when the source is H.264, no resize or fps
  change is asked for, and the span starts on a keyframe (``exact``) or may be moved back to one
  (``keyframe``). Otherwise **re-encode**: seek to the keyframe before the span, decode, pick the
  frames, resize, encode with libx264 in one thread with fixed options, so the same input always
  gives the same bytes (resume compares shards byte for byte).
* Failures raise :class:`MediaError` with an error kind from :mod:`pipeline.core.schema`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pipeline.core.schema import ErrorKind
from pipeline.media.geometry import MAX_PIXELS, even_short_side

Span = Optional[tuple[Optional[float], Optional[float]]]

# x264 options that keep encodes repeatable, so a resumed job writes the same bytes: one thread,
# and no macroblock-tree rate control, whose SIMD code is not repeatable in the x264 that PyAV
# bundles (measured: 7 different outputs from 20 encodes of the same frames; 1 with mbtree=0).
_X264_PARAMS = "mbtree=0"
_MUX_OPTIONS = {"movflags": "+faststart", "fflags": "+bitexact"}


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

    @property
    def transforms(self) -> bool:
        return self.resolution is not None or self.fps is not None


@dataclass(frozen=True)
class SourceInfo:
    duration: Optional[float]  # seconds; None when the container does not say
    fps: Fraction
    width: int
    height: int
    codec: str
    pix_fmt: Optional[str] = None

    @property
    def copyable(self) -> bool:
        """Packets can go to the output as they are: H.264 in the 4:2:0 every player decodes."""
        return self.codec == "h264" and self.pix_fmt in ("yuv420p", "yuvj420p")


@dataclass
class Clip:
    data: bytes                # the MP4
    start: float               # where the clip really starts and ends in the source (seconds)
    end: float
    frame_count: int
    fps: float
    width: int
    height: int
    method: str                # remux | reencode
    codec: str = "h264"
    frames: Optional[np.ndarray] = None  # (T, H, W, 3) uint8 when frames are sampled
    motion: Optional[float] = None       # pipeline.media.scenes.motion_score, when asked for

    @property
    def duration(self) -> float:
        return self.end - self.start


# -- probing -------------------------------------------------------------------------------------
def _open(path: Union[str, Path]):
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise MediaError(ErrorKind.DECODE_ERROR, f"cannot open the video: {e}") from None


def _video_stream(container):
    if not container.streams.video:
        raise MediaError(ErrorKind.DECODE_ERROR, "the file has no video stream")
    return container.streams.video[0]


def probe(container, max_pixels: int) -> SourceInfo:
    """Size, rate, duration and codec of the first video stream; enforces the pixel cap."""
    vs = _video_stream(container)
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
    return SourceInfo(duration=duration, fps=Fraction(rate), width=width, height=height, codec=ctx.name,
                      pix_fmt=ctx.pix_fmt)


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


# -- cutting -------------------------------------------------------------------------------------
def probe_file(path: Union[str, Path], max_pixels: int) -> SourceInfo:
    """:func:`probe` on a file; any failure to read it is a MediaError (decode_error)."""
    try:
        with _open(path) as container:
            return probe(container, max_pixels)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - odd containers must fail their rows, not the shard
        raise MediaError(ErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}") from None


def cut_clips(path: Union[str, Path], spans: list[Span], config: CutConfig, workdir: Union[str, Path]
              ) -> tuple[Optional[SourceInfo], list[Union[Clip, MediaError]]]:
    """Cut every span of one source file, one after the other; one result per span.

    A failure to open or probe the source fails every span with the same error.
    """
    try:
        info = probe_file(path, config.max_pixels)
    except MediaError as e:
        return None, [e] * len(spans)
    return info, [try_cut_clip(path, info, span, config, Path(workdir) / f"clip{n}.mp4")
                  for n, span in enumerate(spans)]


def try_cut_clip(path: Union[str, Path], info: SourceInfo, span: Span, config: CutConfig,
                 out_path: Union[str, Path]) -> Union[Clip, MediaError]:
    """:func:`cut_clip`, with its failure returned instead of raised (for thread pools)."""
    try:
        return cut_clip(path, info, span, config, out_path)
    except MediaError as e:
        return e


def cut_clip(path: Union[str, Path], info: SourceInfo, span: Span, config: CutConfig,
             out_path: Union[str, Path]) -> Clip:
    """One clip of ``path`` as MP4 bytes (plus sampled frames when configured)."""
    import av

    start, end = resolve_span(span, info, config.max_duration)
    out_path = Path(out_path)
    try:
        clip = None
        if info.copyable and not config.transforms:
            clip = _remux(path, info, start, end, config, out_path)
        if clip is None:
            clip = _reencode(path, info, start, end, config, out_path)
        if config.store_frames:
            clip.frames = sample_frames(out_path, config)
        clip.data = out_path.read_bytes()
        return clip
    except MediaError:
        raise
    except av.FFmpegError as e:
        raise MediaError(ErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a sample must fail alone, never the shard
        raise MediaError(ErrorKind.CUT_ERROR, f"{type(e).__name__}: {e}") from None
    finally:
        out_path.unlink(missing_ok=True)


def _open_output(out_path: Path):
    import av

    return av.open(str(out_path), "w", format="mp4", options=dict(_MUX_OPTIONS))


def _remux(path, info: SourceInfo, start: float, end: float, config: CutConfig, out_path: Path) -> Optional[Clip]:
    """Copy the packets of the span without decoding; None when the span does not allow it.

    The copy must begin on a keyframe: in ``exact`` mode one within half a frame of ``start``,
    in ``keyframe`` mode the last one at or before it. Every prefix of the decode order is
    decodable, so the end is cut at the first packet past ``end`` when decode order equals display
    order (no B-frames); with B-frames the end moves to the next keyframe, which ``exact`` mode
    refuses (it then re-encodes). Packets are streamed to the output, never all held.
    """
    exact = config.precision == "exact"
    with _open_at(path, start - 2 / float(info.fps)) as container:
        vs = _video_stream(container)
        tb, origin = vs.time_base, vs.start_time or 0
        tol = int(0.5 / float(info.fps) / tb)  # half a frame, in stream ticks
        start_pts = origin + int(round(start / tb))
        end_pts = origin + int(round(end / tb)) if math.isfinite(end) else None
        hard_end = _hard_end(start, end, config.max_duration)
        limit = origin + int(round(hard_end / tb)) if math.isfinite(hard_end) and hard_end < end else None
        packets = _from_keyframe(container.demux(vs), start_pts + tol)
        head = next(packets, None)
        if head is None or (exact and abs(head.pts - start_pts) > tol):
            return None
        first, last_end, count, at_eof = head.pts, head.pts, 0, True
        in_order = not vs.codec_context.has_b_frames
        with _open_output(out_path) as out:
            ostream = out.add_stream_from_template(vs)
            for pkt in itertools.chain([head], packets):
                if count:
                    in_order = in_order and pkt.pts == pkt.dts
                    if pkt.pts < first:
                        continue  # open-GOP leading frames: they reference the previous GOP
                    if end_pts is not None and pkt.pts >= end_pts - tol:
                        if in_order or pkt.is_keyframe:
                            at_eof = False
                            break
                        if exact:
                            return None
                if limit is not None and pkt.pts >= limit:
                    raise MediaError(ErrorKind.TOO_LONG, f"the video runs past max_duration {config.max_duration}s")
                last_end = max(last_end, pkt.pts + (pkt.duration or 0))
                pkt.pts, pkt.dts, pkt.stream = pkt.pts - first, pkt.dts - first, ostream
                out.mux(pkt)
                count += 1
    if exact and not at_eof and abs(last_end - end_pts) > tol:
        return None  # e.g. open-GOP frames missing before the next keyframe
    return Clip(data=b"", start=float((first - origin) * tb), end=float((last_end - origin) * tb),
                frame_count=count, fps=float(info.fps), width=info.width, height=info.height, method="remux")


def _open_at(path, seconds: float):
    """The source, positioned at the keyframe at or before ``seconds`` (from its first frame).

    A format that cannot seek (a raw H.264 stream) is opened again and read from the beginning:
    slower, same frames.
    """
    import av

    container = _open(path)
    try:
        vs = _video_stream(container)
        origin = vs.start_time or 0
        target = origin + int(seconds / vs.time_base)
        if target > origin:
            container.seek(target, stream=vs, backward=True)
        return container
    except av.FFmpegError:
        container.close()
        return _open(path)
    except BaseException:
        container.close()
        raise


def _hard_end(start: float, end: float, max_duration: Optional[float]) -> float:
    """Where to stop at the latest: the end, or the duration cap when the end is unknown (the
    container does not say how long the video is); a known end was checked by resolve_span."""
    if math.isfinite(end) or max_duration is None:
        return end
    return start + max_duration


def _from_keyframe(demux, start_limit: int):
    """Packets in decode order from the last keyframe whose pts is at most ``start_limit``.

    Packets are held only until that keyframe is certain: once a packet's dts passes the limit no
    later keyframe can qualify (a keyframe's pts is at least its dts). Yields nothing when the
    first timed packet is already past the limit.
    """
    held: list = []
    settled = False
    for pkt in demux:
        if pkt.pts is None or pkt.dts is None or not pkt.size:
            continue
        if settled:
            yield pkt
            continue
        if pkt.is_keyframe and pkt.pts <= start_limit:
            held = [pkt]
        elif held:
            held.append(pkt)
        elif pkt.pts > start_limit:
            return
        if held and pkt.dts > start_limit:
            settled = True
            yield from held
            held = []
    yield from held  # the source ended before the start was settled


def _reencode(path, info: SourceInfo, start: float, end: float, config: CutConfig, out_path: Path) -> Clip:
    """Decode from the keyframe before ``start``, resample to the output rate, resize, encode."""
    rate = Fraction(config.fps).limit_denominator(1001) if config.fps else info.fps
    step, src_half = 1 / float(rate), 0.5 / float(info.fps)
    width, height = even_short_side(info.width, info.height, config.resolution)
    hard_end = _hard_end(start, end, config.max_duration)
    with _open_at(path, start - 2 * src_half) as container:
        vs = _video_stream(container)
        vs.thread_type = "AUTO" if config.decode_threads > 1 else "SLICE"
        vs.codec_context.thread_count = config.decode_threads
        tb, origin = vs.time_base, vs.start_time or 0
        with _open_output(out_path) as out:
            ostream = _add_h264_stream(out, rate, width, height, config)
            encoder = _Resampler(ostream, out, start, hard_end, rate, src_half, width, height)
            t = -2 * src_half
            for frame in container.decode(vs):
                pts = frame.pts if frame.pts is not None else frame.dts
                # Raw streams carry no timestamps (and cannot seek): count frames from the start.
                t = float((pts - origin) * tb) if pts is not None else t + 2 * src_half
                encoder.push(frame, t)
                if encoder.done:
                    break
            if encoder.done and hard_end < end:  # frames past the cap: the unknown end is too far
                raise MediaError(ErrorKind.TOO_LONG, f"the video runs past max_duration {config.max_duration}s")
            encoder.finish()
            out.mux(ostream.encode(None))
    if encoder.count == 0:
        raise MediaError(ErrorKind.DECODE_ERROR, f"no frame could be decoded in [{start:.3f}, {end:.3f})")
    return Clip(data=b"", start=encoder.first_time, end=encoder.first_time + encoder.count * step,
                frame_count=encoder.count, fps=float(rate), width=width, height=height, method="reencode")


def _add_h264_stream(out, rate: Fraction, width: int, height: int, config: CutConfig):
    stream = out.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.time_base = 1 / rate
    stream.options = {"crf": str(config.crf), "preset": config.preset, "threads": "1",
                      "x264-params": _X264_PARAMS}
    return stream


class _Resampler:
    """Turns decoded source frames (in display order) into output frames at a constant rate.

    Output frame ``k`` shows the source frame on screen at ``t0 + k * step`` (the last one starting
    no later than that instant, within half a source frame), where ``t0`` is the first source
    frame whose midpoint is inside the span; frames are emitted while their midpoint is before
    ``end``.
    """

    def __init__(self, ostream, out, start: float, end: float, rate: Fraction, src_half: float,
                 width: int, height: int):
        self.ostream, self.out = ostream, out
        self.time_base = 1 / rate
        self.start, self.end, self.step, self.src_half = start, end, 1 / float(rate), src_half
        self.width, self.height = width, height
        self.first_time = start  # the time of the first source frame in the clip, once seen
        self.count = 0
        self.done = False
        self._held = None  # the source frame currently on screen, and its time
        self._held_time = 0.0
        # One scaler for the clip: frame.reformat() would build a new one for every frame.
        from av.video.reformatter import VideoReformatter

        self._scaler = VideoReformatter()

    def _next_time(self) -> float:
        return self.first_time + self.count * self.step

    def _past_end(self) -> bool:
        """The next output frame's midpoint is at or after the span's end (the end is exclusive)."""
        return self._next_time() + self.step / 2 >= self.end - 1e-9

    def push(self, frame, t: float) -> None:
        if self._held is None:
            if t + self.src_half < self.start:
                return  # mostly before the span: decoded only to reach it
            self.first_time = t
        else:
            # Output instants before the new frame takes over show the held frame (ties: the held one).
            while not self.done and self._next_time() + self.src_half <= t + 1e-9:
                self._emit()
        self._held, self._held_time = frame, t
        if self._past_end():
            self.done = True

    def finish(self) -> None:
        """At the end of the source or span: the last frame stays on screen for one source frame."""
        if self._held is None:
            return
        last_end = self._held_time + 2 * self.src_half
        while not self.done and self._next_time() + self.step / 2 <= last_end + 1e-9:
            self._emit()

    def _emit(self) -> None:
        if self._past_end():
            self.done = True
            return
        from av.video.frame import PictureType

        frame = self._scaler.reformat(self._held, width=self.width, height=self.height, format="yuv420p",
                                      interpolation="BICUBIC")
        frame.pts = self.count
        frame.time_base = self.time_base  # the muxer may change the stream's time base: not that one
        frame.pict_type = PictureType.NONE  # else x264 copies the source's frame types
        self.out.mux(self.ostream.encode(frame))
        self.count += 1


# -- frame sampling ------------------------------------------------------------------------------
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

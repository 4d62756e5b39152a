"""Re-encoding a clip: decode from the keyframe before the span, pick the frames of the output
rate, resize and turn them upright, encode H.264 (libx264) with the audio track beside it.

libx264 runs in one thread with fixed options, so the same input always gives the same bytes
(resume compares shards byte for byte). Sizes are display sizes (:mod:`pipeline.media.rotation`):
a frame is scaled in its stored orientation to the size that, turned, is the output's.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from pipeline.core.schema import ErrorKind
from pipeline.media.audio import AudioTrack, audio_plan, clip_fields
from pipeline.media.geometry import even_short_side
from pipeline.media.rotation import FrameRotator
from pipeline.media.video_source import (Clip, CutConfig, MediaError, SourceInfo, hard_end, open_at, open_output,
                                         video_stream)

# x264 options that keep encodes repeatable, so a resumed job writes the same bytes: one thread,
# and no macroblock-tree rate control, whose SIMD code is not repeatable in the x264 that PyAV
# bundles (measured: 7 different outputs from 20 encodes of the same frames; 1 with mbtree=0).
X264_PARAMS = "mbtree=0"


def reencode(path, info: SourceInfo, start: float, end: float, config: CutConfig, out_path: Path) -> Clip:
    """Decode from the keyframe before ``start``, resample to the output rate, resize, encode."""
    rate = Fraction(config.fps).limit_denominator(1001) if config.fps else info.fps
    step, src_half = 1 / float(rate), 0.5 / float(info.fps)
    width, height = even_short_side(*info.display_size, config.resolution)
    stored = info.orientation.stored_size(width, height)
    last = hard_end(start, end, config.max_duration)
    plan = audio_plan(info, config, copy_video=False)
    with open_at(path, start - 2 * src_half) as container:
        vs = video_stream(container)
        vs.thread_type = "AUTO" if config.decode_threads > 1 else "SLICE"
        vs.codec_context.thread_count = config.decode_threads
        tb, origin = vs.time_base, vs.start_time or 0
        with open_output(out_path) as out:
            ostream = _add_h264_stream(out, rate, width, height, config)
            track = AudioTrack(path, info, out, plan, config) if plan else None
            try:
                rotator = None if info.orientation.upright else FrameRotator(info.orientation, *stored)
                encoder = _Resampler(ostream, out, start, last, rate, src_half, stored, rotator, track)
                t = -2 * src_half
                for frame in container.decode(vs):
                    pts = frame.pts if frame.pts is not None else frame.dts
                    # Raw streams carry no timestamps (and cannot seek): count frames from the start.
                    t = float((pts - origin) * tb) if pts is not None else t + 2 * src_half
                    encoder.push(frame, t)
                    if encoder.done:
                        break
                if encoder.done and last < end:  # frames past the cap: the unknown end is too far
                    raise MediaError(ErrorKind.TOO_LONG, f"the video runs past max_duration {config.max_duration}s")
                encoder.finish()
                out.mux(ostream.encode(None))
                if track is not None and encoder.count:
                    track.finish(encoder.first_time + encoder.count * step)
            finally:
                if track is not None:
                    track.close()
    if encoder.count == 0:
        raise MediaError(ErrorKind.DECODE_ERROR, f"no frame could be decoded in [{start:.3f}, {end:.3f})")
    return Clip(data=b"", start=encoder.first_time, end=encoder.first_time + encoder.count * step,
                frame_count=encoder.count, fps=float(rate), width=width, height=height, method="reencode",
                **clip_fields(track))


def _add_h264_stream(out, rate: Fraction, width: int, height: int, config: CutConfig):
    stream = out.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.time_base = 1 / rate
    stream.options = {"crf": str(config.crf), "preset": config.preset, "threads": "1",
                      "x264-params": X264_PARAMS}
    return stream


class _Resampler:
    """Turns decoded source frames (in display order) into output frames at a constant rate.

    Output frame ``k`` shows the source frame on screen at ``t0 + k * step`` (the last one starting
    no later than that instant, within half a source frame), where ``t0`` is the first source
    frame whose midpoint is inside the span; frames are emitted while their midpoint is before
    ``end``. The audio track, when there is one, is written up to each frame's time before it.
    """

    def __init__(self, ostream, out, start: float, end: float, rate: Fraction, src_half: float,
                 stored_size: tuple[int, int], rotator=None, track=None):
        self.ostream, self.out = ostream, out
        self.time_base = 1 / rate
        self.start, self.end, self.step, self.src_half = start, end, 1 / float(rate), src_half
        self.width, self.height = stored_size
        self.rotator, self.track = rotator, track
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
        if self.rotator is not None:
            frame = self.rotator(frame)
        if self.track is not None:
            if self.count == 0:
                self.track.begin(self.first_time)
            self.track.until(self._next_time())
        frame.pts = self.count
        frame.time_base = self.time_base  # the muxer may change the stream's time base: not that one
        frame.pict_type = PictureType.NONE  # else x264 copies the source's frame types
        self.out.mux(self.ostream.encode(frame))
        self.count += 1

"""The audio track of a clip: the source's first audio stream over the clip's span, as AAC.

* **Copy** when the video is copied too (remux) and the source's audio is AAC that MP4 can hold as
  it is (it has its AudioSpecificConfig) at the rate and channels asked for: the AAC frames whose
  midpoint lies in the clip's span, unchanged. A copied track starts within half an AAC frame
  (about 11 ms at 48 kHz) of the video: packets cannot be split.
* **Encode** otherwise: decode from half a second before the span, resample (planar float at
  ``audio_rate``, ``audio_channels``; the source's rate, or the nearest AAC rate, and its channels,
  more than two mixed down to stereo, when they are None), keep exactly the samples of the
  clip's span (silence where the source's audio starts later), encode with FFmpeg's native
  ``aac`` encoder at 64 kb/s per channel. That encoder is deterministic in one process and
  across runs (float code, one thread): the same input gives the same bytes, which resume needs.
* Either way audio is written interleaved with the video, by time (:meth:`AudioTrack.until`).
* A source without audio, or whose audio does not reach the clip's span, gives a clip without
  audio (its ``audio_*`` columns None); audio that starts late is preceded by silence, audio that
  ends early leaves the track shorter than the video. An audio stream that cannot be decoded
  (or encoded) fails the clip (``cut_error``, the message starting with ``audio:``) rather than dropping its
  sound: a dataset promised sound keeps it in every clip; ``video.audio: false`` keeps such
  videos without it. A copied track is not decoded, so only an encoded one can fail this way.
"""
from __future__ import annotations

from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from pipeline.core.schema import ErrorKind
from pipeline.media.video_source import AudioInfo, CutConfig, MediaError, SourceInfo, open_source, video_origin

# The sampling rates AAC can signal (ISO 14496-3); ``video.audio_rate`` must be one of them.
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
AUDIO_CHANNELS = (1, 2)
BIT_RATE_PER_CHANNEL = 64_000
SEEK_MARGIN = 0.5  # seconds decoded before the span: the AAC decoder's first frames overlap the previous


def audio_plan(info: SourceInfo, config: CutConfig, copy_video: bool) -> Optional[str]:
    """``copy``, ``encode`` or None (no audio in the clip)."""
    audio = info.audio
    if not config.audio or audio is None:
        return None
    if copy_video and audio.copyable and config.audio_rate in (None, audio.rate) \
            and config.audio_channels in (None, audio.channels):
        return "copy"
    if not audio.decodable:
        raise MediaError(ErrorKind.CUT_ERROR, f"audio: no decoder for its codec {audio.codec!r} "
                                              f"(video.audio: false keeps the video without sound)")
    return "encode"


def output_format(audio: AudioInfo, config: CutConfig) -> tuple[int, int]:
    """(rate, channels) of an encoded track."""
    rate = config.audio_rate or nearest_aac_rate(audio.rate)
    channels = config.audio_channels or (audio.channels if audio.channels in AUDIO_CHANNELS else 2)
    return rate, channels


def nearest_aac_rate(rate: int) -> int:
    return min(AAC_RATES, key=lambda r: (abs(r - rate), -r)) if rate > 0 else 48000


def _layout(channels: int) -> str:
    return "mono" if channels == 1 else "stereo"


def clip_fields(track: Optional["AudioTrack"]) -> dict:
    """The Clip's audio fields once ``track`` is finished: all None when the clip got no audio."""
    if track is None or not track.present:
        return {"audio_codec": None, "audio_rate": None, "audio_channels": None}
    return {"audio_codec": track.codec, "audio_rate": track.rate, "audio_channels": track.channels}


@contextmanager
def _audio_failures():
    """Any failure while handling the audio fails the clip as cut_error naming the audio."""
    try:
        yield
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad audio stream fails its clip, never the shard
        raise MediaError(ErrorKind.CUT_ERROR, f"audio: {type(e).__name__}: {e}") from None


class AudioTrack:
    """Writes one clip's audio into ``out`` (an open MP4 that has not started muxing): call
    :meth:`begin` with the clip's start, :meth:`until` before each video packet, :meth:`finish`
    with its end, :meth:`close` always. Times are seconds in the source (from its first video frame)."""

    def __init__(self, path: Union[str, Path], info: SourceInfo, out, mode: str, config: CutConfig):
        self.out, self.mode, self.path = out, mode, path
        self.container = open_source(path)
        try:
            with _audio_failures():
                self.source = self.container.streams.audio[0]
                self.origin = float(video_origin(self.container))
                if mode == "copy":
                    self.stream = out.add_stream_from_template(self.source)
                    self.rate, self.channels = info.audio.rate, info.audio.channels
                else:
                    self.rate, self.channels = output_format(info.audio, config)
                    self.stream = out.add_stream("aac", rate=self.rate, layout=_layout(self.channels))
                    self.stream.bit_rate = BIT_RATE_PER_CHANNEL * self.channels
                    self.stream.time_base = Fraction(1, self.rate)
        except BaseException:
            self.container.close()
            raise
        self.codec = "aac"
        self.start = 0.0
        self._items: Optional[Iterator] = None
        self._pending = None   # the packet or (offset, samples) read but not written yet
        self._offset: Optional[int] = None  # copy: the pts that becomes 0
        self._written = 0      # encode: samples written (the clip's sample index)

    # -- the calls ---------------------------------------------------------------------------------
    def begin(self, start: float) -> None:
        import av

        self.start = start
        with _audio_failures():
            try:
                if start > SEEK_MARGIN:
                    target = int((self.origin + start - SEEK_MARGIN) / self.source.time_base)
                    self.container.seek(target, stream=self.source, backward=True)
            except av.FFmpegError:  # a source that cannot seek: read from its beginning
                self.container.close()
                self.container = open_source(self.path)
                self.source = self.container.streams.audio[0]
            self._items = self._packets() if self.mode == "copy" else self._samples()

    def until(self, seconds: float) -> None:
        """Write the audio before ``seconds``."""
        with _audio_failures():
            if self.mode == "copy":
                self._copy_until(seconds)
            else:
                self._encode_until(int(round((seconds - self.start) * self.rate)))

    def finish(self, end: float) -> None:
        self.until(end)
        if self.mode == "encode":
            with _audio_failures():
                self.out.mux(self.stream.encode(None))

    @property
    def present(self) -> bool:
        """Some audio went into the clip (a span the source's audio does not reach gets none)."""
        return self._offset is not None if self.mode == "copy" else self._written > 0

    def close(self) -> None:
        self.container.close()

    # -- copy ----------------------------------------------------------------------------------------
    def _packets(self):
        for pkt in self.container.demux(self.source):
            if pkt.pts is not None and pkt.size:
                yield pkt

    def _copy_until(self, seconds: float) -> None:
        tb = self.source.time_base
        while True:
            pkt = self._pending if self._pending is not None else next(self._items, None)
            self._pending = None
            if pkt is None:
                return
            middle = float((pkt.pts + (pkt.duration or 0) / 2) * tb) - self.origin
            if middle < self.start:
                continue
            if middle >= seconds:
                self._pending = pkt
                return
            if self._offset is None:  # never negative: the first packet may start before the span
                self._offset = min(int(round((self.start + self.origin) / tb)), pkt.pts)
            pkt.pts -= self._offset
            pkt.dts = pkt.pts
            pkt.stream = self.stream
            self.out.mux(pkt)

    # -- encode --------------------------------------------------------------------------------------
    def _samples(self):
        """(clip sample index of the first sample, planar float32 (channels, n)) in order."""
        import av

        resampler = av.AudioResampler(format="fltp", layout=_layout(self.channels), rate=self.rate)
        position = None
        for frame in self.container.decode(self.source):
            if position is None:
                first = float(frame.pts * frame.time_base) - self.origin if frame.pts is not None else self.start
                position = int(round((first - self.start) * self.rate))
            for out in resampler.resample(frame):
                samples = out.to_ndarray()
                yield position, samples
                position += samples.shape[1]
        if position is not None:
            for out in resampler.resample(None):
                yield position, out.to_ndarray()
                position += out.samples

    def _encode_until(self, count: int) -> None:
        while self._written < count:
            item = self._pending if self._pending is not None else next(self._items, None)
            self._pending = None
            if item is None:
                return  # the source's audio has ended: the track is shorter than the clip
            position, samples = item
            if position > self._written:  # the audio starts late: silence before it, once it comes
                if position >= count:
                    self._pending = item
                    return
                self._write(np.zeros((self.channels, position - self._written), np.float32))
            skip = self._written - position
            if skip >= samples.shape[1]:
                continue
            take = samples[:, skip:skip + count - self._written]
            self._write(take)
            if skip + take.shape[1] < samples.shape[1]:
                self._pending = (self._written, samples[:, skip + take.shape[1]:])

    def _write(self, samples: np.ndarray) -> None:
        import av

        if samples.shape[1] == 0:
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32), format="fltp",
                                           layout=_layout(self.channels))
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self._written, Fraction(1, self.rate)
        self._written += samples.shape[1]
        self.out.mux(self.stream.encode(frame))

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


TONE_HZ = 440.0  # the synthetic audio: a sine at this pitch, sounding in the first half of every second


def tone(n_samples: int, rate: int, channels: int, first: int = 0) -> np.ndarray:
    """Samples ``first .. first + n_samples`` of the test tone, planar float32 (channels, n): a
    sine of amplitude 0.5 during the first half of every second, silence in the second half, so a
    test can tell where in the source a clip's audio starts and ends."""
    index = np.arange(first, first + n_samples)
    on = (index % rate) < rate // 2
    wave = (0.5 * np.sin(2 * np.pi * TONE_HZ * index / rate) * on).astype(np.float32)
    return np.repeat(wave[None, :], channels, axis=0)


def tone_on(samples: np.ndarray, rate: int, window: float = 0.01) -> np.ndarray:
    """Per ``window`` seconds of decoded audio (channels, n): whether the tone sounds there."""
    mono = np.abs(np.asarray(samples, np.float32)).mean(axis=0)
    size = max(1, int(rate * window))
    usable = mono[: len(mono) // size * size].reshape(-1, size)
    return usable.mean(axis=1) > 0.1


def stored_frame(display: np.ndarray, rotation: int, hflip: bool) -> np.ndarray:
    """The frame to store so that a player applying ``rotation`` (degrees counterclockwise, as
    PyAV's set_display_rotation and VideoFrame.rotation count) then the mirror shows ``display``."""
    if hflip:
        display = display[:, ::-1]
    return np.ascontiguousarray(np.rot90(display, k=-(rotation // 90)))


def write_counter_video(path: str | Path, n_frames: int, fps: float | Fraction = 25, width: int = 128,
                        height: int = 96, codec: str = "libx264", gop: int = 25, bframes: int = 0,
                        container_format: Optional[str] = None, rotation: int = 0, hflip: bool = False,
                        audio_rate: Optional[int] = None, audio_channels: int = 2, audio_codec: str = "aac",
                        audio_seconds: Optional[float] = None, audio_delay: float = 0.0) -> Path:
    """Encode ``n_frames`` counter frames to ``path`` (format from the suffix unless given).

    ``gop`` is the keyframe interval in frames (fixed: no scene-cut keyframes), ``bframes`` the
    number of B-frames, so tests can build sources where a span does or does not start on a
    keyframe and where decode order differs from display order. ``rotation`` (a multiple of 90)
    and ``hflip`` write a display matrix and store the frames turned, so the video as displayed
    is ``width`` x ``height`` with the counter upright (a phone video). ``audio_rate`` adds the
    test tone (:func:`tone`) in ``audio_codec``, as long as the video or ``audio_seconds``,
    starting ``audio_delay`` seconds after the first video frame.
    """
    import av

    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    stored_w, stored_h = (height, width) if rotation % 180 else (width, height)
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = stored_w, stored_h
        stream.pix_fmt = "yuv420p"
        if rotation or hflip:
            stream.set_display_rotation(rotation, hflip=hflip)
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "20", "threads": "1",
                              "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}"}
        else:
            stream.codec_context.gop_size = gop
            stream.codec_context.max_b_frames = bframes
            stream.options = {"threads": "1", "qscale": "3"} if codec == "mpeg4" else {"threads": "1"}
        sound = None
        if audio_rate is not None:
            total = round((audio_seconds if audio_seconds is not None else n_frames / float(rate)) * audio_rate)
            sound = _ToneWriter(out, audio_codec, audio_rate, audio_channels, total, round(audio_delay * audio_rate))
        for i in range(n_frames):
            display = counter_frame(i, width, height)
            frame = av.VideoFrame.from_ndarray(stored_frame(display, rotation, hflip), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            out.mux(stream.encode(frame.reformat(format="yuv420p")))
            if sound is not None:
                sound.until((i + 1) / float(rate))
        out.mux(stream.encode(None))
        if sound is not None:
            sound.finish()
    return path


class _ToneWriter:
    """The test tone into an output container, in 1024-sample frames, interleaved by time."""

    def __init__(self, out, codec: str, rate: int, channels: int, total: int, delay: int = 0):
        self.out, self.rate, self.channels, self.total, self.delay = out, rate, channels, total, delay
        self.layout = "mono" if channels == 1 else "stereo"
        self.stream = out.add_stream(codec, rate=rate, layout=self.layout)
        self.written = 0

    def until(self, seconds: float) -> None:
        import av

        target = min(self.total, round(seconds * self.rate) - self.delay)
        while self.written < target:
            n = min(1024, target - self.written)
            frame = av.AudioFrame.from_ndarray(tone(n, self.rate, self.channels, self.written), format="fltp",
                                               layout=self.layout)
            frame.sample_rate, frame.time_base = self.rate, Fraction(1, self.rate)
            frame.pts = self.written + self.delay
            self.out.mux(self.stream.encode(frame))
            self.written += n

    def finish(self) -> None:
        self.until((self.total + self.delay) / self.rate)
        self.out.mux(self.stream.encode(None))


def counter_video_bytes(tmp_dir: str | Path, name: str, **kwargs) -> bytes:
    """The bytes of a counter video written under ``tmp_dir`` (see :func:`write_counter_video`)."""
    return write_counter_video(Path(tmp_dir) / name, **kwargs).read_bytes()

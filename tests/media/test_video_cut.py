"""Cutting clips from files (pipeline.media.video): clips by spans, frame sampling, failures of one file.

Every test video shows its frame index as a binary counter (pipeline.testing.video_synth, through
helpers.videos), so a test can decode a clip and say exactly which source frames it holds.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import av
import numpy as np
import pytest

from helpers.videos import decoded
from pipeline.core import schema
from pipeline.media.video import CutConfig, MediaError, cut_clips, frame_indices
from pipeline.testing.video_synth import read_counter

pytestmark = pytest.mark.timeout(120)


# -- helpers -------------------------------------------------------------------------------------
def source_fps(path: Path) -> float:
    with av.open(str(path)) as container:
        return float(container.streams.video[0].average_rate)


def expected_frames(span, fps: float, n_frames: int) -> list[int]:
    """Frames whose midpoint lies in [start, end): the contract of a cut."""
    start, end = span or (0.0, math.inf)
    first = max(0, math.ceil(start * fps - 0.5 - 1e-9))
    last = n_frames - 1 if end == math.inf else min(n_frames - 1, math.ceil(end * fps - 0.5 - 1e-9) - 1)
    return list(range(first, last + 1))


def cut_one(path: Path, span, tmp_path: Path, **config):
    _, results = cut_clips(path, [span], CutConfig(**config), tmp_path)
    return results[0]


# -- cutting -------------------------------------------------------------------------------------
SPANS = [(1.0, 2.0), (1.3, 2.1), (0.5, 0.62), None, (3.5, 10.0), (0.0, 0.9)]


@pytest.mark.parametrize("name", ["bframes", "plain", "mpeg4", "ntsc"])
@pytest.mark.parametrize("span", SPANS, ids=str)
def test_exact_cut_holds_the_frames_of_the_span(videos, tmp_path, name, span):
    path = videos[name]
    fps = source_fps(path)
    with av.open(str(path)) as c:
        n_frames = c.streams.video[0].frames
    clip = cut_one(path, span, tmp_path)
    assert not isinstance(clip, MediaError), clip.message
    frames = decoded(clip.data)
    want = expected_frames(span, fps, n_frames)
    assert [c for _, c in frames] == want
    assert frames[0][0] == pytest.approx(0, abs=1e-6)  # the clip's own clock starts at 0
    start, end = span or (0.0, math.inf)
    end = min(end, n_frames / fps)
    assert abs(clip.start - start) <= 1 / fps and abs(clip.end - end) <= 1 / fps
    assert clip.frame_count == len(want)
    # Remux needs H.264, a keyframe at the start and, with B-frames, one at the end too
    # (every source has keyframes at 0, 1 and 2 s, within half a frame).
    remux = name != "mpeg4" and (span in (None, (1.0, 2.0)) or (span == (0.0, 0.9) and name == "plain"))
    assert clip.method == ("remux" if remux else "reencode")


def test_keyframe_precision_moves_the_start_back_and_copies(videos, tmp_path):
    clip = cut_one(videos["bframes"], (1.3, 2.1), tmp_path, precision="keyframe")
    counters = [c for _, c in decoded(clip.data)]
    assert clip.method == "remux" and clip.start == pytest.approx(1.0)
    assert counters[0] == 25 and counters[-1] >= 52  # covers the span; with B-frames up to a keyframe
    assert counters == list(range(25, 25 + len(counters)))
    plain = cut_one(videos["plain"], (1.3, 2.1), tmp_path, precision="keyframe")
    assert plain.method == "remux"
    assert [c for _, c in decoded(plain.data)] == list(range(25, 52))  # no B-frames: the end is exact


def test_resize_and_frame_rate_change(videos, tmp_path):
    clip = cut_one(videos["bframes"], (1.0, 3.0), tmp_path, resolution=48, fps=10)
    assert (clip.width, clip.height, clip.fps, clip.method) == (64, 48, 10.0, "reencode")
    frames = decoded(clip.data)
    assert len(frames) == 20
    with av.open(io.BytesIO(clip.data)) as c:
        stream = c.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 64, 48)
        assert float(stream.average_rate) == 10
    for k, (t, counter) in enumerate(frames):
        assert t == pytest.approx(k / 10, abs=1e-3)
        # each output frame shows the source frame on screen at that instant
        assert abs(counter / 25 - (1.0 + k / 10)) <= 0.5 / 25 + 1e-9
    up = cut_one(videos["mpeg4"], (0.0, 1.0), tmp_path, fps=50)
    assert [c for _, c in decoded(up.data)] == [i // 2 for i in range(50)]


def test_output_size_is_even_and_keeps_the_aspect(videos, tmp_path):
    clip = cut_one(videos["plain"], (0.0, 0.4), tmp_path, resolution=33)
    assert (clip.width, clip.height) == (44, 34)  # 128x96 -> short side 33, made even


def test_sources_without_duration_or_seeking(videos, tmp_path):
    raw = videos["raw"]
    whole = cut_one(raw, None, tmp_path, max_duration=10.0)
    assert [c for _, c in decoded(whole.data)] == list(range(200)) and whole.end == pytest.approx(8.0)
    span = cut_one(raw, (2.0, 4.0), tmp_path)  # cannot seek: read from the start, same frames
    assert [c for _, c in decoded(span.data)] == list(range(50, 100))
    too_long = cut_one(raw, None, tmp_path, max_duration=5.0)  # found out while decoding
    assert isinstance(too_long, MediaError) and too_long.kind == "too_long"


def test_h264_in_another_container_is_copied_into_mp4(videos, tmp_path):
    clip = cut_one(videos["mkv"], (1.0, 3.0), tmp_path)
    assert clip.method == "remux" and [c for _, c in decoded(clip.data)] == list(range(25, 75))
    with av.open(io.BytesIO(clip.data)) as c:
        assert c.format.name.startswith("mov,mp4")


# -- frame sampling ------------------------------------------------------------------------------
def test_frame_sampling_returns_the_frames_it_promises(videos, tmp_path):
    clip = cut_one(videos["bframes"], (1.0, 2.0), tmp_path, store_frames=True, num_frames=5)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (5, 96, 128, 3)
    assert [read_counter(f) for f in clip.frames] == [25, 31, 37, 43, 49]  # first to last, evenly

    by_rate = cut_one(videos["bframes"], (1.0, 2.0), tmp_path, store_frames=True, num_frames=None, frames_fps=5)
    assert [read_counter(f) for f in by_rate.frames] == [25, 30, 35, 40, 45]

    small = cut_one(videos["mpeg4"], (0.0, 1.0), tmp_path, store_frames=True, num_frames=3, frames_size=48)
    assert small.frames.shape == (3, 48, 64, 3)
    assert [read_counter(f) for f in small.frames] == [0, 12, 24]

    more = cut_one(videos["plain"], (1.0, 1.4), tmp_path, store_frames=True, num_frames=16)
    counters = [read_counter(f) for f in more.frames]
    assert len(counters) == 16 and counters[0] == 25 and counters[-1] == 34 and counters == sorted(counters)


def test_frame_indices():
    assert frame_indices(25, 25.0, 5, None) == [0, 6, 12, 18, 24]
    assert frame_indices(25, 25.0, None, 5) == [0, 5, 10, 15, 20]
    assert frame_indices(10, 30.0, None, 1.0) == [0]
    assert frame_indices(3, 25.0, 5, None) == [0, 0, 1, 2, 2]
    assert frame_indices(0, 25.0, 5, None) == []


# -- failures of one file ------------------------------------------------------------------------
def test_failures_of_a_local_file_are_error_kinds(videos, tmp_path):
    def kind(path, span=None, **config):
        result = cut_one(path, span, tmp_path, **config)
        assert isinstance(result, MediaError)
        schema.error_kind(result.kind)  # one of the schema's kinds
        return result.kind

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 400)
    half = tmp_path / "half.mp4"
    half.write_bytes(videos["bframes"].read_bytes()[: videos["bframes"].stat().st_size // 2])
    assert kind(garbage) == "decode_error"
    assert kind(half) == "decode_error"  # the index (moov) is at the end: gone
    assert kind(videos["long"], max_duration=5.0) == "too_long"
    assert kind(videos["long"], (2.0, 9.0), max_duration=5.0) == "too_long"
    assert not isinstance(cut_one(videos["long"], (2.0, 6.0), tmp_path, max_duration=5.0), MediaError)
    assert kind(videos["plain"], (5.0, 6.0)) == "bad_span"  # the video lasts 4 s
    assert kind(videos["plain"], (2.0, 1.0)) == "bad_span"
    assert kind(videos["plain"], max_pixels=128 * 96 - 1) == "decompression_bomb"

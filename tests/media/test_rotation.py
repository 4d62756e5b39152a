"""Rotation metadata (pipeline.media.rotation): clips of phone-style videos come out as displayed.

The sources are counter videos (pipeline.testing.video_synth) stored turned, with a display matrix,
so that a player shows the counter upright; a frame read upright gives its index back, a frame
left sideways or mirrored does not. ffmpeg's autorotate, when an ffmpeg binary is at hand, checks
that the synthetic sources are what players show.
"""
from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Optional

import av
import numpy as np
import pytest

from pipeline.media.rotation import UPRIGHT, Orientation, from_matrix, from_rotate_tag
from pipeline.media.scenes import SceneConfig, detect_cuts, displayed_frames
from pipeline.media.video import CutConfig, MediaError, cut_clips, probe_file
from pipeline.testing.video_synth import read_counter, write_counter_video

pytestmark = pytest.mark.timeout(120)
ORIENTATIONS = [(0, True), (90, False), (90, True), (180, False), (180, True), (270, False), (270, True)]


def clip_frames(data: bytes) -> list[tuple[int, np.ndarray]]:
    """(display rotation the clip still asks for, RGB frame) of every frame of a clip."""
    with av.open(io.BytesIO(data)) as container:
        return [(f.rotation, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def ffmpeg_frames(path: Path, width: int, height: int) -> Optional[list[int]]:
    """The counters of the frames ffmpeg shows (its autorotate on); None without an ffmpeg binary
    (on PATH, or imageio-ffmpeg's), when only our own reading of the matrix is checked."""
    from pipeline.download.ytdlp import ffmpeg_location

    exe = ffmpeg_location()
    if exe is None:
        try:
            import imageio_ffmpeg
            exe = imageio_ffmpeg.get_ffmpeg_exe()
        except (ImportError, RuntimeError):
            return None
    raw = subprocess.run([exe, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)
    return [read_counter(f) for f in frames]


@pytest.mark.parametrize("rotation,hflip", ORIENTATIONS, ids=str)
def test_a_rotated_source_is_cut_upright_as_ffmpeg_shows_it(tmp_path, rotation, hflip):
    source = write_counter_video(tmp_path / "phone.mp4", 12, rotation=rotation, hflip=hflip)
    assert ffmpeg_frames(source, 128, 96) in (None, list(range(12)))  # players show the counter upright
    info = probe_file(source, 10**8)
    assert not info.orientation.upright and info.display_size == (128, 96)
    _, (clip,) = cut_clips(source, [None], CutConfig(), tmp_path)
    assert clip.method == "reencode"  # a copy would keep frames that trainers' readers show sideways
    assert (clip.width, clip.height) == (128, 96)
    frames = clip_frames(clip.data)
    assert [read_counter(f) for _, f in frames] == list(range(12))
    assert {r for r, _ in frames} == {0} and frames[0][1].shape == (96, 128, 3)  # no display matrix left


def test_resize_and_frames_of_a_rotated_source_are_in_display_geometry(tmp_path):
    source = write_counter_video(tmp_path / "portrait.mp4", 50, width=96, height=128, rotation=270)
    with av.open(str(source)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (128, 96)  # stored landscape
    _, (small,) = cut_clips(source, [(1.0, 2.0)], CutConfig(resolution=48), tmp_path)
    assert not isinstance(small, MediaError), small.message
    assert (small.width, small.height) == (48, 64)  # portrait as displayed, short side 48
    assert [read_counter(f) for _, f in clip_frames(small.data)] == list(range(25, 50))
    _, (sampled,) = cut_clips(source, [(1.0, 2.0)], CutConfig(store_frames=True, num_frames=3), tmp_path)
    assert sampled.frames.shape == (3, 128, 96, 3) and [read_counter(f) for f in sampled.frames] == [25, 37, 49]


def test_frames_for_scene_detection_are_upright(tmp_path):
    upright = write_counter_video(tmp_path / "upright.mp4", 30)
    turned = write_counter_video(tmp_path / "turned.mp4", 30, rotation=90)
    with av.open(str(turned)) as container:
        frames = list(displayed_frames(container, 128))
    assert [f.shape for _, f in frames[:1]] == [(96, 128, 3)]
    assert [read_counter(f) for _, f in frames] == list(range(30))
    config = SceneConfig(threshold=5.0, min_scene_len=1, downscale_width=64)
    assert detect_cuts(turned, config) == detect_cuts(upright, config)  # same pictures, same cuts


def test_orientation_from_the_display_matrix_and_the_rotate_tag():
    one = 1 << 16
    w = 1 << 30
    assert from_matrix((one, 0, 0, 0, one, 0, 0, 0, w)) == UPRIGHT
    assert from_matrix((0, -one, 0, one, 0, 0, 0, 0, w)) == Orientation((("transpose", "cclock"),))
    assert from_matrix((0, one, 0, -one, 0, 0, 0, 0, w)) == Orientation((("transpose", "clock"),))
    assert from_matrix((-one, 0, 0, 0, -one, 0, 0, 0, w)).steps == (("hflip", None), ("vflip", None))
    assert from_matrix((0, 0, 0, 0, 0, 0, 0, 0, w)) == UPRIGHT  # degenerate: left as stored
    tilted = (round(one * 0.866), round(-one * 0.5), 0, round(one * 0.5), round(one * 0.866), 0, 0, 0, w)
    assert from_matrix(tilted) == UPRIGHT  # 30 degrees is no quarter turn
    assert from_rotate_tag("90") == Orientation((("transpose", "clock"),)) and from_rotate_tag("x") == UPRIGHT
    turn = Orientation((("transpose", "clock"),))
    assert turn.display_size(1920, 1080) == (1080, 1920) and turn.stored_size(1080, 1920) == (1920, 1080)
    grid = np.arange(6).reshape(2, 3)
    assert turn.apply(grid).tolist() == [[3, 0], [4, 1], [5, 2]]

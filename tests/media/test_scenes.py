"""Scene cuts and motion (pipeline.media.scenes) on videos with known hard cuts, made with PyAV:
each shot a solid colour or a noise texture of its own hue, optionally with a moving square."""
from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.core import schema
from pipeline.core.config import ConfigError, from_dict
from pipeline.job.spec import VideoSpec
from pipeline.media.scenes import Cuts, SceneConfig, detect_cuts, motion_score, scene_spans
from pipeline.media.video import CutConfig, MediaError, cut_clips, probe_file

pytestmark = pytest.mark.timeout(120)
PALETTE = [(200, 40, 40), (40, 180, 60), (50, 60, 200), (220, 200, 40), (180, 50, 200), (40, 200, 200)]


def shot_frame(shot: int, i: int, width: int, height: int, texture: bool, moving: bool) -> np.ndarray:
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = PALETTE[shot % len(PALETTE)]
    if texture:  # a fixed noise pattern per shot, around the shot's colour
        noise = np.random.default_rng(shot).integers(-30, 30, (height, width, 1))
        frame = np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    if moving:
        x = (i * 3) % (width - 16)
        frame[height // 3: height // 3 + 16, x:x + 16] = 255
    return frame


def write_shot_video(path: Path, shots: list[int], fps=25, texture=False, moving=True, bframes=0,
                     width=128, height=96) -> Path:
    """Shots of ``shots[k]`` frames each, joined by hard cuts; keyframes only every 50 frames."""
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20", "threads": "1",
                          "x264-params": f"keyint=50:min-keyint=50:scenecut=0:bframes={bframes}"}
        n = 0
        for s, length in enumerate(shots):
            for i in range(length):
                frame = av.VideoFrame.from_ndarray(shot_frame(s, i, width, height, texture, moving), format="rgb24")
                frame.pts, frame.time_base = n, 1 / rate
                out.mux(stream.encode(frame.reformat(format="yuv420p")))
                n += 1
        out.mux(stream.encode(None))
    return path


def cut_frames(shots: list[int]) -> list[int]:
    return list(np.cumsum(shots)[:-1])


@pytest.mark.parametrize("texture,bframes,fps", [(False, 0, 25), (True, 2, 25), (True, 0, Fraction(30000, 1001))])
def test_hard_cuts_are_found_within_one_frame(tmp_path, texture, bframes, fps):
    shots = [60, 40, 100, 30, 45]
    path = write_shot_video(tmp_path / "v.mp4", shots, fps=fps, texture=texture, bframes=bframes)
    cuts = detect_cuts(path, SceneConfig())
    assert len(cuts.frames) == len(shots) - 1
    for found, true in zip(cuts.frames, cut_frames(shots)):
        assert abs(found - true) <= 1
    for t, frame in zip(cuts.times, cuts.frames):
        assert t == pytest.approx(frame / float(fps), abs=1e-3)
    assert cuts.frame_count == sum(shots)
    assert cuts.end == pytest.approx(sum(shots) / float(fps), abs=1e-3)


def test_a_video_without_a_cut_is_one_scene(tmp_path):
    path = write_shot_video(tmp_path / "v.mp4", [120], texture=True)
    cuts = detect_cuts(path, SceneConfig())
    assert cuts.frames == [] and cuts.frame_count == 120
    assert scene_spans(cuts, SceneConfig(min_clip=1, max_clip=60)) == [(0.0, pytest.approx(4.8))]


def test_cuts_closer_than_min_scene_len_count_once(tmp_path):
    path = write_shot_video(tmp_path / "v.mp4", [50, 5, 50])  # a 5-frame flash
    assert detect_cuts(path, SceneConfig(min_scene_len=15)).frames == [50]
    assert detect_cuts(path, SceneConfig(min_scene_len=3)).frames == [50, 55]


def test_short_scenes_are_dropped_and_long_ones_split_into_equal_pieces():
    cuts = Cuts(times=[1.0, 11.0, 12.5], frames=[25, 275, 312], end=20.0, frame_count=500)
    spans = scene_spans(cuts, SceneConfig(min_clip=2, max_clip=4))
    # [0, 1): too short, dropped; [11, 12.5) too; [1, 11): 3 pieces of 3.333 s; [12.5, 20): 2 of 3.75 s
    assert spans == [(1.0, pytest.approx(4.333333)), (pytest.approx(4.333333), pytest.approx(7.666667)),
                     (pytest.approx(7.666667), 11.0), (12.5, 16.25), (16.25, 20.0)]
    assert all(end - start <= 4 + 1e-6 for start, end in spans)
    assert scene_spans(Cuts([], [], 1.5, 37), SceneConfig(min_clip=2)) == []  # nothing long enough


def test_the_scene_spans_cut_clips_that_hold_one_shot_each(tmp_path):
    shots = [60, 40, 100]
    path = write_shot_video(tmp_path / "v.mp4", shots, texture=True)
    spans = scene_spans(detect_cuts(path, SceneConfig()), SceneConfig(min_clip=1, max_clip=60))
    _, clips = cut_clips(path, spans, CutConfig(), tmp_path)
    assert [c.frame_count for c in clips] == shots
    for clip, shot in zip(clips, range(len(shots))):
        with av.open(io.BytesIO(clip.data)) as container:
            colours = {tuple(np.median(f.to_ndarray(format="rgb24")[-8:], axis=(0, 1)).round(-1))
                       for f in container.decode(video=0)}
        assert len(colours) == 1  # one shot: no frame of the next one


def test_a_corrupt_video_raises_a_decode_error_for_its_rows(tmp_path):
    good = write_shot_video(tmp_path / "v.mp4", [60, 60]).read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(good[:200] + b"\x00" * 5000)
    zeroed = bytearray(good)  # its index intact (it probes), its frame data zeroed
    start, index = zeroed.find(b"mdat") + 104, zeroed.find(b"moov") - 8
    zeroed[start:index] = bytes(index - start)
    (tmp_path / "zeroed.mp4").write_bytes(bytes(zeroed))
    assert probe_file(tmp_path / "zeroed.mp4", 10**8).duration == pytest.approx(4.8)
    for path in (broken, tmp_path / "zeroed.mp4", tmp_path / "missing.mp4"):
        with pytest.raises(MediaError) as err:
            detect_cuts(path, SceneConfig())
        assert err.value.kind == schema.ErrorKind.DECODE_ERROR


def test_motion_score_tells_a_still_shot_from_a_moving_one(tmp_path):
    still = write_shot_video(tmp_path / "still.mp4", [50], texture=True, moving=False).read_bytes()
    moving = write_shot_video(tmp_path / "moving.mp4", [50], texture=True, moving=True).read_bytes()
    assert motion_score(still) < 0.5
    assert motion_score(moving) > 1.0
    with pytest.raises(MediaError):
        motion_score(b"not a video")


def test_bad_scene_options_name_the_key():
    with pytest.raises(ConfigError, match=r"scenes\.min_clip: must be <= max_clip"):
        from_dict(VideoSpec, {"scenes": {"min_clip": 5, "max_clip": 2}})
    with pytest.raises(ConfigError, match=r"scenes\.detect"):
        from_dict(VideoSpec, {"scenes": {"detect": "histogram"}})
    assert from_dict(VideoSpec, {"scenes": {"threshold": 30}}).scenes == SceneConfig(threshold=30.0)

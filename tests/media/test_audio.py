"""The audio track of clips (pipeline.media.audio through pipeline.media.video.cut_clips).

Sources are counter videos with the test tone (pipeline.testing.video_synth.tone): a sine during
the first half of every second, so the decoded audio of a clip says which part of the source it
holds: a clip starting at 1.28 s sounds until 0.22 s, is silent until 0.72 s, then sounds again.
"""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.media.audio import nearest_aac_rate
from pipeline.media.video import CutConfig, MediaError, cut_clips
from pipeline.testing.video_synth import tone_on, write_counter_video

pytestmark = pytest.mark.timeout(120)
WINDOW = 0.01  # seconds per tone_on window


def audio_of(data: bytes):
    """(codec, rate, channels, planar samples, packet payloads) of a clip's audio; None without audio."""
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        payloads = [bytes(p) for p in container.demux(stream) if p.size]
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=1)
        return stream.codec_context.name, stream.rate, stream.channels, samples, payloads


def tone_changes(samples: np.ndarray, rate: int, until: float = None) -> list[float]:
    """Where (seconds into the clip, before ``until``) the tone starts or stops; the decoder may
    add a few silent padding samples after the clip's end."""
    if until is not None:
        samples = samples[:, :int(round(until * rate))]
    on = tone_on(samples, rate, WINDOW)
    return [round(float(k) * WINDOW, 2) for k in np.flatnonzero(np.diff(on.astype(np.int8))) + 1]


def cut_one(path: Path, span, tmp_path: Path, **config):
    _, (clip,) = cut_clips(path, [span], CutConfig(**config), tmp_path)
    assert not isinstance(clip, MediaError), clip.message
    return clip


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audio")
    return {
        "aac": write_counter_video(d / "aac.mp4", 100, audio_rate=48000),
        "mp3": write_counter_video(d / "mp3.mkv", 100, audio_rate=44100, audio_codec="libmp3lame",
                                   container_format="matroska"),
        "mono": write_counter_video(d / "mono.mp4", 100, audio_rate=22050, audio_channels=1),
        "short": write_counter_video(d / "short.mp4", 100, audio_rate=48000, audio_seconds=2.5),
        "late": write_counter_video(d / "late.mp4", 100, audio_rate=48000, audio_delay=0.5),
        "silent": write_counter_video(d / "silent.mp4", 100),
        "after": write_counter_video(d / "after.mp4", 100, audio_rate=48000, audio_delay=3.0),  # sound from 3 s
    }


def test_an_aac_track_is_copied_beside_a_copied_video(sources, tmp_path):
    clip = cut_one(sources["aac"], (1.0, 2.0), tmp_path)
    assert clip.method == "remux"
    assert (clip.audio_codec, clip.audio_rate, clip.audio_channels) == ("aac", 48000, 2)
    codec, rate, channels, samples, payloads = audio_of(clip.data)
    assert (codec, rate, channels) == ("aac", 48000, 2)
    with av.open(str(sources["aac"])) as source:
        original = [bytes(p) for p in source.demux(source.streams.audio[0]) if p.size]
    first = original.index(payloads[0])
    assert payloads == original[first:first + len(payloads)]  # the source's AAC frames, unchanged
    assert abs(len(payloads) * 1024 / rate - clip.duration) <= 1024 / rate  # the same span as the video
    assert tone_changes(samples, rate)[-1:] == [0.5]  # 1.0 s .. 2.0 s of the source: on, then off


def test_encoded_audio_holds_exactly_the_span_of_the_video(sources, tmp_path):
    clip = cut_one(sources["aac"], (1.3, 2.1), tmp_path)  # 1.3 s is no keyframe: re-encoded
    assert clip.method == "reencode" and clip.start == pytest.approx(1.28)
    codec, rate, channels, samples, _ = audio_of(clip.data)
    assert (codec, rate, channels) == ("aac", 48000, 2)
    assert tone_changes(samples, rate, clip.duration) == [0.22, 0.72]  # off at 1.5 s, on at 2.0 s of the source
    assert tone_on(samples[:, :int(clip.duration * rate)], rate, WINDOW)[-1]  # sounding up to the clip's end
    assert abs(samples.shape[1] / rate - clip.duration) <= 1024 / rate


def test_resampled_audio_and_other_codecs_become_aac(sources, tmp_path):
    small = cut_one(sources["aac"], (1.3, 2.1), tmp_path, audio_rate=16000, audio_channels=1)
    assert (small.audio_codec, small.audio_rate, small.audio_channels) == ("aac", 16000, 1)
    codec, rate, channels, samples, _ = audio_of(small.data)
    assert (codec, rate, channels) == ("aac", 16000, 1) and tone_changes(samples, rate, small.duration) == [0.22, 0.72]

    mp3 = cut_one(sources["mp3"], (1.0, 2.0), tmp_path)  # the video is copied, MP3 is encoded as AAC
    assert mp3.method == "remux" and (mp3.audio_codec, mp3.audio_rate, mp3.audio_channels) == ("aac", 44100, 2)
    codec, rate, _, samples, _ = audio_of(mp3.data)
    assert codec == "aac" and tone_changes(samples, rate) == [0.5]

    mono = cut_one(sources["mono"], (1.0, 2.0), tmp_path, resolution=48, audio_channels=2)
    assert (mono.audio_rate, mono.audio_channels) == (22050, 2)
    assert nearest_aac_rate(37800) == 32000 and nearest_aac_rate(48000) == 48000


def test_audio_that_starts_late_or_ends_early_stays_in_step_with_the_video(sources, tmp_path):
    clip = cut_one(sources["short"], (2.0, 3.0), tmp_path, fps=10)  # the audio stops at 2.5 s
    _, rate, _, samples, _ = audio_of(clip.data)
    assert tone_changes(samples, rate) == [0.5] and samples.shape[1] / rate <= 0.5 + 2048 / rate
    late = cut_one(sources["late"], (0.0, 1.0), tmp_path, fps=10)  # the audio starts at 0.5 s: silence first
    _, rate, _, samples, _ = audio_of(late.data)
    on = tone_on(samples[:, :rate], rate, WINDOW)
    assert tone_changes(samples, rate, 1.0) == [0.5] and not on[0] and on[-1]


def test_reencoded_audio_is_byte_identical_across_runs(sources, tmp_path):
    clips = [cut_one(sources["mp3"], (0.3, 2.7), tmp_path, resolution=64, audio_rate=16000).data for _ in range(2)]
    assert clips[0] == clips[1]
    # and in another process (what a resumed job is)
    script = ("import sys; from pipeline.media.video import CutConfig, cut_clips; "
              "config = CutConfig(resolution=64, audio_rate=16000); "
              "_, (c,) = cut_clips(sys.argv[1], [(0.3, 2.7)], config, sys.argv[2]); sys.stdout.buffer.write(c.data)")
    other = subprocess.run([sys.executable, "-c", script, str(sources["mp3"]), str(tmp_path)], capture_output=True,
                           check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert other == clips[0]


def test_no_audio_in_the_source_its_span_or_the_config_gives_a_clip_without_audio(sources, tmp_path):
    for clip in (cut_one(sources["silent"], (1.0, 2.0), tmp_path),
                 cut_one(sources["silent"], (1.3, 2.1), tmp_path),
                 cut_one(sources["after"], (1.0, 2.0), tmp_path),  # copied: no AAC frame in the span
                 cut_one(sources["after"], (1.3, 2.1), tmp_path),  # encoded: no sample in the span
                 cut_one(sources["aac"], (1.0, 2.0), tmp_path, audio=False),
                 cut_one(sources["aac"], (1.3, 2.1), tmp_path, audio=False)):
        assert (clip.audio_codec, clip.audio_rate, clip.audio_channels) == (None, None, None)
        assert audio_of(clip.data) is None


def test_audio_that_cannot_be_decoded_fails_the_clip_naming_the_audio(sources, tmp_path):
    broken = tmp_path / "broken.mp4"
    data = bytearray(sources["aac"].read_bytes())
    with av.open(str(sources["aac"])) as source:  # in MP4 a packet's pos is where its payload lies
        spots = [(p.pos, p.size) for p in source.demux(source.streams.audio[0]) if p.size]
    noise = np.random.default_rng(0)
    for pos, size in spots:
        data[pos:pos + size] = noise.integers(0, 256, size, dtype=np.uint8).tobytes()
    broken.write_bytes(bytes(data))
    _, (failed,) = cut_clips(broken, [(1.3, 2.1)], CutConfig(), tmp_path)
    assert isinstance(failed, MediaError) and failed.kind == "cut_error" and failed.message.startswith("audio:")
    assert cut_one(broken, (1.3, 2.1), tmp_path, audio=False).audio_codec is None  # the way to keep it

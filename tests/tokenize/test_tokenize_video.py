"""Video clips through the visual tokenizer: (t, h, w) ids from a tiny Emu3 VQ with temporal
compression, frames taken from ``frames.npy`` or decoded from the mp4 with PyAV."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from helpers.tokenize_fixtures import encode_image, make_batch, random_image, save_tiny_emu3
from pipeline.core import schema
from pipeline.media.npy import npy_bytes
from pipeline.media.npy import read_npy as load_npy
from pipeline.testing.video_synth import counter_frame, counter_video_bytes, read_counter
from pipeline.tokenize import build_tokenizers
from pipeline.tokenize.media import read_media, uniform_indices
from pipeline.tokenize.visual import prepare, to_pixels

FRAMES, TEMPORAL = 4, 2


@pytest.fixture(scope="module")
def video_vq(tmp_path_factory):
    return save_tiny_emu3(tmp_path_factory.mktemp("vq") / "emu3-video", temporal=TEMPORAL)


@pytest.fixture(scope="module")
def clip():
    return np.stack([counter_frame(i, 128, 96) for i in range(12)])  # (12, 96, 128, 3)


def stage_for(model, **options):
    (stage,) = build_tokenizers({"image": {"model": str(model), "device": "cpu", "resolution": 32,
                                           "frames": FRAMES, **options}})
    return stage


def direct_encode(model_path, pixels):
    """Emu3VQVAE.encode on a clip; image_sizes big enough that its image-style crop is a no-op."""
    from transformers import Emu3VQVAE

    model = Emu3VQVAE.from_pretrained(model_path).eval()
    with torch.inference_mode():
        return model.encode(pixels, torch.tensor([[10_000, 10_000]] * len(pixels))).image_tokens


def test_frames_are_sampled_uniformly_from_npy_and_mp4(clip, tmp_path):
    assert uniform_indices(12, 4) == [1, 4, 7, 10] and uniform_indices(3, 4) == [0, 1, 1, 2]
    mp4 = counter_video_bytes(tmp_path, "clip.mp4", n_frames=12)
    for files in ({"frames.npy": npy_bytes(clip), "mp4": mp4}, {"mp4": mp4}):
        frames, is_video = read_media(files, 4)
        assert is_video and [read_counter(np.asarray(f)) for f in frames] == [1, 4, 7, 10]


def test_clip_ids_have_the_t_h_w_grid_and_equal_the_model(video_vq, clip, tmp_path):
    mp4 = counter_video_bytes(tmp_path, "clip.mp4", n_frames=12)
    batch = make_batch([{"mp4": mp4, "frames.npy": npy_bytes(clip)}, {"mp4": mp4},
                        {"jpg": encode_image(random_image(40, 40, 0))}])
    stage = stage_for(video_vq)
    stage.process(batch)
    assert batch[schema.STATUS] == [schema.SUCCESS] * 3
    ids = [load_npy(f["image_ids.npy"]) for f in batch["files"]]
    assert [a.shape for a in ids] == [(2, 16, 16), (2, 16, 16), (16, 16)]
    assert ids[0].dtype == np.uint16
    assert batch["image_policy"] == ["center_crop:32x32,frames:4"] * 2 + ["center_crop:32x32"]
    assert batch["image_grid"][:2] == ["2x16x16"] * 2
    assert stage.fingerprint()["video_grid"] == [2, 16, 16] and stage.fingerprint()["temporal_factor"] == 2

    pixels = to_pixels([prepare(batch_files, stage.policy, FRAMES).pixels
                        for batch_files in ({"frames.npy": npy_bytes(clip)},)])
    np.testing.assert_array_equal(ids[0], direct_encode(video_vq, pixels)[0].numpy())
    assert len(np.unique(ids[0])) > 1
    # the frames decoded from the mp4 are the same frames (up to lossy coding)
    assert (ids[0] == ids[1]).mean() > 0.5


def test_non_square_clip_keeps_its_grid(video_vq, clip):
    """Emu3VQVAE.encode crops a clip's grid as if it were an image; the stage must not."""
    stage = stage_for(video_vq, policy="buckets")
    batch = make_batch([{"frames.npy": npy_bytes(clip)}])
    stage.process(batch)
    ids = load_npy(batch["files"][0]["image_ids.npy"])
    assert batch["image_policy"] == ["bucket:28x36,frames:4"] and ids.shape == (2, 14, 18)
    pixels = to_pixels([prepare({"frames.npy": npy_bytes(clip)}, stage.policy, FRAMES).pixels])
    np.testing.assert_array_equal(ids, direct_encode(video_vq, pixels)[0].numpy())


def test_undecodable_video_is_marked(video_vq, clip):
    bad_array = io.BytesIO()
    np.save(bad_array, clip.astype(np.float32))
    batch = make_batch([{"mp4": b"\x00\x00\x00\x18ftypmp42 not really"}, {"frames.npy": bad_array.getvalue()},
                        {"frames.npy": npy_bytes(clip)}])
    stage_for(video_vq).process(batch)
    assert batch[schema.STATUS] == [schema.FAILED_TO_PROCESS, schema.FAILED_TO_PROCESS, schema.SUCCESS]
    assert "mp4" in batch[schema.ERROR_MESSAGE][0] and "uint8" in batch[schema.ERROR_MESSAGE][1]


def test_per_frame_models_code_each_frame(clip):
    from pipeline.testing.assets import TINY_VQ

    stage = stage_for(TINY_VQ, resolution=64)
    batch = make_batch([{"frames.npy": npy_bytes(clip)}])
    stage.process(batch)
    assert load_npy(batch["files"][0]["image_ids.npy"]).shape == (4, 8, 8)

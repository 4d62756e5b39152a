"""The visual tokenizer's GPU paths, run here on the CPU with stand-ins: the model's ``encode``
raising what CUDA raises (out of memory; an error that poisons the context), a stage configured
for ``cuda`` (its decisions are made before any model loads), and torch calls counted per thread."""
from __future__ import annotations

import json
import struct
import weakref
import zlib

import numpy as np
import pytest
import torch

from filters import build_filters
from helpers.tokenize_fixtures import encode_image, make_batch, random_image, save_tiny_vae
from helpers.torch_calls import Calls
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.model_stage import DeviceLost
from pipeline.media.npy import read_npy
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS, TINY_VQ
from pipeline.tokenize import VisualTokenizeStage, build_tokenizers
from pipeline.tokenize.visual import to_pixels

torch.set_num_threads(2)


def image_stage(model, **options) -> VisualTokenizeStage:
    (stage,) = build_tokenizers({"image": {"model": str(model), "device": "cpu", "resolution": 32, **options}},
                                check=True)
    return stage


def images_batch(n: int, size: int = 32):
    return make_batch([{"jpg": encode_image(random_image(size, size, s), quality=95)} for s in range(n)])


# -- finding 1: a GPU that cannot exist fails in the driver ---------------------------------------
def test_device_cuda_without_any_gpu_fails_in_the_driver():
    stage = image_stage(TINY_VQ, device="cuda")
    with pytest.raises(ConfigError, match=r"^tokenize_image\.device: 'cuda', but the executor has no GPU"):
        stage.place(0)
    [clip] = build_filters([{"clip_score": {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS),
                                            "device": "cuda"}}], check=True)
    with pytest.raises(ConfigError, match=r"^clip_score\.device: 'cuda'"):
        clip.place(0)
    stage.place(1)  # one GPU is enough
    assert stage.resources.gpus == 1


# -- finding 3: out of memory, and a poisoned context ---------------------------------------------
def test_an_out_of_memory_batch_is_retried_sample_by_sample_after_it_is_freed():
    reference = image_stage(TINY_VQ, batch_size=4).process(images_batch(4))
    stage = image_stage(TINY_VQ, batch_size=4)
    model = stage.model
    real, failed, freed = model.encode, [], []

    def encode(pixels):
        if pixels.shape[0] > 1:
            failed.append(weakref.ref(pixels))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        freed.append(failed[0]() is None)  # the failed batch's pixels are gone before the retry
        return real(pixels)

    model.encode = encode
    out = stage.process(images_batch(4))
    assert freed == [True] * 4
    assert out[schema.STATUS] == [schema.SUCCESS] * 4
    assert [f["image_ids.npy"] for f in out[schema.FILES]] == [f["image_ids.npy"] for f in reference[schema.FILES]]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_poisoned_cuda_context_fails_the_shard_instead_of_every_later_sample(batch_size):
    stage = image_stage(TINY_VQ, batch_size=batch_size)

    def encode(pixels):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    stage.model.encode = encode
    with pytest.raises(DeviceLost, match="illegal memory access"):
        stage.process(images_batch(4))
    assert stage.device_lost


# -- finding 7: force_upcast ----------------------------------------------------------------------
def test_a_force_upcast_vae_runs_in_float32_when_float16_is_asked(tmp_path):
    path = save_tiny_vae(tmp_path / "vae")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "force_upcast": True}))
    upcast = image_stage(path, device="cuda", dtype="float16")
    assert upcast.compute_dtype == "float32" and upcast.fingerprint()["dtype"] == "float32"
    assert image_stage(path, device="cuda", dtype="bfloat16").compute_dtype == "bfloat16"  # bf16 has fp32's range
    (path / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert image_stage(path, device="cuda", dtype="float16").compute_dtype == "float16"


# -- finding 8: one copy to the host per batch ----------------------------------------------------
def test_emu3_copies_a_batch_of_ids_to_the_host_once():
    stage = image_stage(TINY_VQ)
    arrays = [np.asarray(random_image(32, 32, s))[None] for s in range(5)]
    with torch.inference_mode(), Calls() as calls:
        ids = stage.model.encode(to_pixels(arrays))
    assert calls.names.count("cpu") == 1, calls.names.count("cpu")
    assert len(ids) == 5 and all(i.shape == ids[0].shape for i in ids)


# -- images open through the whitelist and the pixel cap ------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` (a decompression bomb's shape)."""
    data = bytearray(encode_image(random_image(1, 1, 0), "PNG"))
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_a_rejected_image_fails_with_its_own_kind():
    batch = images_batch(3)
    batch[schema.FILES][1] = {"png": png_claiming(30_000, 30_000)}
    batch[schema.FILES][2] = {"jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n"}  # PIL opens EPS (Ghostscript); we never do
    out = image_stage(TINY_VQ).process(batch)
    assert out[schema.ERROR_KIND][1] == "decompression_bomb", out[schema.ERROR_MESSAGE][1]
    assert out[schema.ERROR_KIND][2] == "decode_error", out[schema.ERROR_MESSAGE][2]
    assert out[schema.STATUS][0] == schema.SUCCESS and read_npy(out[schema.FILES][0]["image_ids.npy"]).size

"""clip_score's GPU paths, run here on the CPU with stand-ins: a driver told the executor has a
GPU (``place(1)``), a worker whose ``torch.cuda`` says a GPU is there, and ``decode_jpeg`` stubbed
to fail the way nvJPEG does (the batched call raises, then single images it does not support)."""
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from filters import build_filters
from filters.clip_scorer import ClipScorer, PilDecoder, TorchDecoder
from helpers.torch_calls import Calls
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.model_stage import DeviceLost
from pipeline.core.stage import JobContext
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS

torch.set_num_threads(2)


def clip_stage(**options):
    entry = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS), "batch_size": 32, **options}
    [stage] = build_filters([{"clip_score": entry}], check=True)
    return stage


def pairs_batch(n, seed=7, size=64):
    return synthetic.make_batch(synthetic.make_pairs(n, seed=seed, size=size))


def encoded(array: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    return synthetic.encode(Image.fromarray(array), fmt, quality)


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` (a decompression bomb's shape)."""
    import struct
    import zlib

    data = bytearray(encoded(noise(1, 1, 0), "png"))
    ihdr = data[12:29]  # b"IHDR" + width, height, depth, colour, ...
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clip():
    return clip_stage().model.clip


def reference_pixels(clip, images: list[bytes]) -> torch.Tensor:
    """open_clip's own transform on PIL images: what every decoder must give."""
    import io

    return torch.stack([clip.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])


# -- finding 4: one device, precision and decoder, chosen in the driver --------------------------
def test_a_cpu_driver_decides_for_workers_that_see_a_gpu(monkeypatch):
    stage = clip_stage()
    stage.place(0)  # the executor has no GPU
    blob = pickle.dumps(stage)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the worker's process sees one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    worker = pickle.loads(blob)
    assert worker.device == "cpu" and worker.resources.gpus == 0
    fp = worker.fingerprint()
    assert (fp["device"], fp["precision"], fp["decode"]) == ("cpu", "fp32", "pil"), fp
    worker.setup()
    assert not worker.model.autocast and isinstance(worker.model.decoder, PilDecoder)


def test_the_threshold_is_computed_as_the_gpu_workers_score_and_the_driver_frees_its_model():
    batches = [pairs_batch(60, seed=11)]
    stage = clip_stage(top_fraction=0.5, sample_size=60)
    stage.place(1)  # a cluster with a GPU; this driver has none
    fp = stage.fingerprint()
    assert (fp["device"], fp["precision"], fp["decode"]) == ("cuda", "bf16", "torch"), fp
    state = stage.prepare(JobContext(lambda n: iter([{k: list(v) for k, v in b.items()} for b in batches])))
    assert (state["precision"], state["decode"]) == ("bf16", "torch")
    assert stage._model is None  # the driver's copy of the model is released after the sample pass
    # the same numbers as a worker scoring with bf16 and the tensor decoder
    same = clip_stage(device="cpu", precision="bf16", decode="torch").process(pairs_batch(60, seed=11))
    assert state["threshold"] == pytest.approx(float(np.quantile(np.asarray(same["clip_score"]), 0.5)), abs=1e-6)
    fp32 = clip_stage(device="cpu").process(pairs_batch(60, seed=11))
    assert not np.allclose(same["clip_score"], fp32["clip_score"], atol=1e-4)  # the choice matters


# -- finding 3, for the CLIP worker too: a poisoned context fails the shard and flags the worker --
def test_a_poisoned_cuda_context_fails_the_shard_and_marks_the_worker_lost():
    stage = clip_stage()

    def embed(pixels, tokens):
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    stage.model._embed = embed
    with pytest.raises(DeviceLost, match="device-side assert"):
        stage.process(pairs_batch(4))
    assert stage.device_lost


# -- finding 2: the decoder follows the model's preprocessing -------------------------------------
def test_a_squashing_preset_gets_the_pil_decoder_on_cuda_and_torch_is_refused_in_check():
    [siglip] = build_filters([{"clip_score": {"model": "ViT-B-16-SigLIP", "pretrained": "webli"}}], check=True)
    siglip.place(1)
    assert siglip.fingerprint()["decode"] == "pil"  # open_clip squashes for this tag
    with pytest.raises(ConfigError, match=r"decode: 'torch' .*resize_mode 'squash'"):
        build_filters([{"clip_score": {"model": "ViT-B-16-SigLIP", "pretrained": "webli", "decode": "torch"}}],
                      check=True)
    tiny = clip_stage()
    tiny.place(1)
    assert tiny.fingerprint()["decode"] == "torch"  # shortest side + center crop: the tensor path fits


# -- finding 5: what the GPU decoder rejects, PIL decodes -----------------------------------------
def test_a_jpeg_the_gpu_decoder_rejects_is_decoded_by_pil(clip, monkeypatch):
    import torchvision.io

    real = torchvision.io.decode_jpeg
    images = [encoded(noise(40, 48, s), "jpg", 90) for s in range(4)]
    rejected = images[2]

    def nvjpeg(data, mode=None, device="cpu"):
        if isinstance(data, list):
            raise RuntimeError("batched decode failed")
        if bytes(data.numpy()) == rejected:
            raise RuntimeError("nvjpeg: unsupported JPEG (arithmetic coding)")
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", nvjpeg)
    pixels, ok, errors = TorchDecoder(clip).decode(images)
    assert errors == {} and sorted(ok) == [0, 1, 2, 3]
    ref = reference_pixels(clip, images)
    got = pixels[ok.index(2)]
    assert torch.allclose(got, ref[2], atol=0.05)


# -- finding 6: the crop offset of torchvision's CenterCrop ---------------------------------------
def test_the_tensor_path_crops_where_torchvision_centercrop_does(clip):
    side = clip.image_size  # 32: odd margins of 3 (rounded to 2, not floored to 1) and 5
    images = [encoded(noise(side, side + 3, 1), "png"), encoded(noise(side + 3, side, 2), "png"),
              encoded(noise(side + 5, side, 3), "png")]
    pixels, ok, errors = TorchDecoder(clip).decode(images)
    assert not errors
    ref = reference_pixels(clip, images)
    for p, k in enumerate(ok):
        torch.testing.assert_close(pixels[p], ref[k], atol=1e-5, rtol=0)


# -- finding 8: no batch-sized copies on the model thread -----------------------------------------
def test_the_pil_decoder_stacks_the_batch_off_the_model_thread(clip):
    images = [encoded(noise(48, 40, s), "jpg", 90) for s in range(6)]
    decoder = PilDecoder(clip, draft=False)
    with ThreadPoolExecutor(2) as pool:
        result = decoder.start(pool, images)
        with Calls() as calls:  # the model thread: it only takes the batch
            pixels, ok, errors = result()
    assert not {"stack", "pin_memory", "cat"} & set(calls.names), calls.names
    assert ok == list(range(6)) and not errors
    torch.testing.assert_close(pixels, reference_pixels(clip, images), atol=1e-6, rtol=0)


def test_the_tensor_decoder_makes_no_indexed_copy_per_image_size(clip):
    side = clip.image_size  # lossless, three sizes that need no resize: rows can be compared exactly
    images = [encoded(noise(side + 2 * (s % 3), side, s), "png") for s in range(6)]
    with Calls() as calls:
        pixels, ok, errors = TorchDecoder(clip).decode(images)
    assert "__setitem__" not in calls.names and "index_put_" not in calls.names, calls.names
    assert sorted(ok) == list(range(6)) and not errors
    ref = reference_pixels(clip, images)
    for p, k in enumerate(ok):  # row p of the batch is image ok[p]
        torch.testing.assert_close(pixels[p], ref[k], atol=1e-5, rtol=0)


def test_captions_tokenized_in_their_own_process_give_the_same_ids_and_scores(clip):
    batch = pairs_batch(40, seed=5)
    images, captions = [f["jpg"] for f in batch[schema.FILES]], batch[schema.CAPTION]
    here = ClipScorer(clip, batch_size=16, tokenize_processes=0)
    away = ClipScorer(clip, batch_size=16, tokenize_processes=1)  # what a CUDA scorer does
    try:
        assert away.text_pool is not None
        tokens = torch.cat([b.tokens for b in away.batches(images, captions)])
        assert torch.equal(tokens, clip.tokenizer(captions))
        np.testing.assert_array_equal(away.score(images, captions).scores, here.score(images, captions).scores)
    finally:
        away.close()
        here.close()


def test_a_rejected_image_keeps_its_kind(clip):
    bomb = png_claiming(30_000, 30_000)  # 9e8 pixels: rejected from the header, never decoded
    batch = synthetic.make_batch(synthetic.make_pairs(3, seed=1, size=48))
    batch[schema.FILES][1] = {"png": bomb}
    batch[schema.FILES][2] = {"jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n"}  # PIL opens EPS; we never do
    stage = clip_stage(decode="pil")
    out = stage.process(batch)
    assert out[schema.ERROR_KIND][1] == "decompression_bomb", out[schema.ERROR_MESSAGE][1]
    assert out[schema.ERROR_KIND][2] == "decode_error"
    assert isinstance(out["clip_score"][0], float)

"""The tokenizer stages: options, text ids, VQ ids, latents, fingerprints, failures."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from helpers.tokenize_fixtures import (encode_image, make_batch, random_image, save_tiny_chameleon, save_tiny_emu3,
                                       save_tiny_emu3_full, save_tiny_vae)
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.media.npy import read_npy as load_npy
from pipeline.testing.assets import TINY_VQ
from pipeline.testing.synthetic import make_pairs
from pipeline.tokenize import VisualTokenizeStage, build_tokenizers
from pipeline.tokenize.visual import prepare, to_pixels


def image_stage(model, **options) -> VisualTokenizeStage:
    (stage,) = build_tokenizers({"image": {"model": str(model), "device": "cpu", **options}}, check=True)
    return stage


def shapes_batch(n: int = 6, seed: int = 3, size: int = 64):
    pairs = make_pairs(n, seed=seed, size=size)
    return make_batch([{"jpg": encode_image(im, quality=95)} for im, _ in pairs], [c for _, c in pairs])


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, message", [
    ({"image": {}}, "tokenize.image.model: required key is missing"),
    ({"image": {"model": "m", "resolutoin": 64}}, "tokenize.image.resolutoin: unknown key (did you mean 'resolution'?)"),
    ({"image": {"model": "m", "policy": "pad"}}, "tokenize.image.policy: expected"),
    ({"image": {"model": "m", "batch_size": 0}}, "tokenize.image.batch_size: must be > 0"),
    ({"image": {"model": "m", "buckets": [[64, 64]]}}, "tokenize.image.buckets: only used with policy: buckets"),
    ({"text": {"max_length": 0}}, "tokenize.text.max_length: must be > 0"),
    ({"text": {"truncation": False}}, "tokenize.text.truncation: open_clip's tokenizer always truncates"),
    ({"txt": {}}, "tokenize.txt: unknown key (did you mean 'text'?)"),
])
def test_options_are_validated_without_loading(cfg, message):
    with pytest.raises(ConfigError) as e:
        build_tokenizers(cfg)
    assert str(e.value).startswith(message)


def test_model_dependent_options_fail_at_build(tmp_path):
    with pytest.raises(ConfigError, match=r"^tokenize\.image\.model: .*neither a checkpoint directory nor a hub id"):
        build_tokenizers({"image": {"model": str(tmp_path / "missing.bin")}}, check=True)
    with pytest.raises(ConfigError, match=r"^tokenize\.image\.resolution: 60 is not a multiple of .* 8"):
        image_stage(TINY_VQ, resolution=60)
    with pytest.raises(ConfigError, match=r"^tokenize\.image\.model_class: AutoencoderKL given but the checkpoint holds a Emu3VQVAE"):
        image_stage(TINY_VQ, model_class="AutoencoderKL")
    with pytest.raises(ConfigError, match=r"^tokenize\.image\.frames: 3 is not a multiple of the model's temporal factor 2"):
        image_stage(save_tiny_emu3(tmp_path / "video-vq", temporal=2), frames=3)
    # without check nothing touches the model
    assert [s.name for s in build_tokenizers({"image": {"model": "nowhere/none"}})] == ["tokenize_image"]


# -- text ----------------------------------------------------------------------------------------
def test_open_clip_ids_equal_its_own_output():
    import open_clip

    captions = ["a photo of a large black square at the top on beige", "", "!!! wow !!!", "word " * 200]
    batch = make_batch([{} for _ in captions], captions)
    batch[schema.STATUS][1] = schema.FILTERED  # not alive: left alone
    (stage,) = build_tokenizers({"text": {"tokenizer": "open_clip", "max_length": 77}})
    stage.process(batch)
    reference = open_clip.get_tokenizer("ViT-B-32")(captions).numpy()
    for i in (0, 2, 3):
        ids = load_npy(batch["files"][i]["text_ids.npy"])
        assert ids.dtype == np.uint16
        assert ids[-1] == 49407 and ids[0] == 49406
        np.testing.assert_array_equal(ids, reference[i, : len(ids)])
        assert not reference[i, len(ids):].any()  # only padding was dropped
        assert batch["text_length"][i] == len(ids)
        assert batch["text_tokenizer"][i] == stage.fingerprint()["id"]
    assert len(load_npy(batch["files"][3]["text_ids.npy"])) == 77  # truncated to max_length
    assert "text_ids.npy" not in batch["files"][1] and batch["text_tokenizer"][1] is None


def _tiny_bpe():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([c for _, c in make_pairs(200, seed=5)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "[BOS]", "[EOS]", "[PAD]"]))
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)])
    return tok


def test_hf_tokenizer_directory_and_file_ids_equal_the_library(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = _tiny_bpe()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    tok.save(str(tmp_path / "tokenizer.json"))
    captions = [c for _, c in make_pairs(8, seed=9)] + ["a zebra-coloured hexagon " * 20]

    batch = make_batch([{} for _ in captions], captions)
    build_tokenizers({"text": {"tokenizer": str(tmp_path / "tok"), "max_length": 12}})[0].process(batch)
    expected = AutoTokenizer.from_pretrained(tmp_path / "tok")(captions, truncation=True, max_length=12)["input_ids"]
    got = [load_npy(f["text_ids.npy"]).tolist() for f in batch["files"]]
    assert got == expected and max(map(len, got)) == 12

    batch = make_batch([{} for _ in captions], captions)
    build_tokenizers({"text": {"tokenizer": str(tmp_path / "tokenizer.json"), "truncation": False}})[0].process(batch)
    assert [load_npy(f["text_ids.npy"]).tolist() for f in batch["files"]] == \
        [e.ids for e in Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode_batch(captions)]


def test_text_fingerprint_tracks_vocab_and_options(tmp_path):
    a = build_tokenizers({"text": {"max_length": 77}})[0].fingerprint()
    assert a == build_tokenizers({"text": {}})[0].fingerprint()
    assert a["id"] != build_tokenizers({"text": {"max_length": 32}})[0].fingerprint()["id"]
    _tiny_bpe().save(str(tmp_path / "tokenizer.json"))
    b = build_tokenizers({"text": {"tokenizer": str(tmp_path / "tokenizer.json")}})[0].fingerprint()
    assert b["vocab_sha256"] != a["vocab_sha256"] and b["class"] == "tokenizers.Tokenizer"


# -- images: the tiny VQ -------------------------------------------------------------------------
def test_vq_ids_equal_a_direct_call_of_the_model():
    from transformers import Emu3VQVAE

    stage = image_stage(TINY_VQ, resolution=64, batch_size=4)
    batch = shapes_batch(6)
    stage.process(batch)
    model = Emu3VQVAE.from_pretrained(TINY_VQ).eval()  # the user's route
    pixels = to_pixels([prepare(f, stage.policy, 8).pixels for f in make_batch_files(6)])
    with torch.inference_mode():
        direct = model.encode(pixels[:, 0], torch.tensor([[64, 64]] * 6)).image_tokens
    for i in range(6):
        ids = load_npy(batch["files"][i]["image_ids.npy"])
        assert ids.shape == (8, 8) and ids.dtype == np.uint16
        np.testing.assert_array_equal(ids, direct[i].numpy())
        assert batch["image_policy"][i] == "center_crop:64x64" and batch["image_grid"][i] == "8x8"
        assert batch["image_tokenizer"][i] == stage.fingerprint()["id"]
    assert len({load_npy(f["image_ids.npy"]).tobytes() for f in batch["files"]}) == 6
    fp = stage.fingerprint()
    assert fp["class"] == "Emu3VQVAE" and fp["codebook_size"] == 512 and fp["grid"] == [8, 8]
    assert fp["ids_dtype"] == "uint16" and fp["preprocessing"]["policy"] == "center_crop" and fp["dtype"] == "float32"
    assert len(fp["weights_sha256"]) == 64


def make_batch_files(n):
    return shapes_batch(n)["files"]


def test_tiny_vq_reconstructs_its_domain_better_than_trivial_baselines():
    """Held-out synthetic images through the stage (ids) and the model's decoder."""
    from transformers import Emu3VQVAE

    from pipeline.testing.tiny_vq import HELDOUT_SEED, mean_colour_baseline, pooled_baseline, psnr, to_uint8

    pairs = make_pairs(64, seed=HELDOUT_SEED, size=64, start=1000)
    batch = make_batch([{"png": encode_image(im, "PNG")} for im, _ in pairs])
    image_stage(TINY_VQ, resolution=64).process(batch)
    ids = torch.from_numpy(np.stack([load_npy(f["image_ids.npy"]) for f in batch["files"]]).astype(np.int64))
    model = Emu3VQVAE.from_pretrained(TINY_VQ).eval()
    with torch.inference_mode():
        rec = to_uint8(model.decode(ids))
    originals = torch.from_numpy(np.stack([np.asarray(im) for im, _ in pairs])).permute(0, 3, 1, 2)
    vq, mean_colour, pooled = psnr(rec, originals), psnr(mean_colour_baseline(originals), originals), psnr(pooled_baseline(originals), originals)
    print(f"tiny-vq PSNR {vq:.2f} dB; mean colour {mean_colour:.2f} dB; 8x8 pooled {pooled:.2f} dB")
    assert vq > mean_colour + 6
    assert vq > pooled


def test_fingerprint_changes_with_the_weights_not_the_location(tmp_path):
    from transformers import Emu3VQVAE

    a = image_stage(save_tiny_emu3(tmp_path / "a", seed=0), resolution=32).fingerprint()
    b = image_stage(save_tiny_emu3(tmp_path / "b", seed=0), resolution=32).fingerprint()
    assert a["id"] == b["id"] and a["source"] != b["source"]
    model = Emu3VQVAE.from_pretrained(tmp_path / "b")
    with torch.no_grad():
        model.encoder.conv_in.bias[0] += 1e-3
    model.save_pretrained(tmp_path / "c")
    c = image_stage(tmp_path / "c", resolution=32).fingerprint()
    assert c["weights_sha256"] != a["weights_sha256"] and c["id"] != a["id"]
    assert image_stage(tmp_path / "a", resolution=64).fingerprint()["id"] != a["id"]


def test_aspect_buckets_pick_the_closest_ratio_and_batch_by_size():
    wide, tall, square = random_image(200, 100, 0), random_image(90, 160, 1), random_image(70, 70, 2)
    files = [{"jpg": encode_image(im)} for im in (wide, tall, square, wide, tall)]
    batch = make_batch(files)
    stage = image_stage(TINY_VQ, resolution=64, policy="buckets", batch_size=2)
    stage.process(batch)
    assert batch["image_policy"] == ["bucket:48x88", "bucket:88x48", "bucket:64x64", "bucket:48x88", "bucket:88x48"]
    assert [load_npy(f["image_ids.npy"]).shape for f in batch["files"]] == [(6, 11), (11, 6), (8, 8), (6, 11), (11, 6)]
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in stage.policy.buckets)
    assert stage.fingerprint()["preprocessing"]["policy"] == "buckets" and "grid" not in stage.fingerprint()


def test_bad_samples_are_marked_and_the_rest_tokenized(monkeypatch):
    batch = shapes_batch(4)
    batch["files"][1]["jpg"] = batch["files"][1]["jpg"][:200]  # truncated JPEG
    batch["files"][2] = {"txt": b"no media"}
    batch[schema.STATUS][3] = schema.FILTERED
    stage = image_stage(TINY_VQ, resolution=64)
    stage.process(batch)
    # cut inside its header: refused when opened (image_open), as the download stage would
    assert batch[schema.STATUS] == [schema.SUCCESS, schema.FAILED_TO_DECODE, schema.FAILED_TO_PROCESS, schema.FILTERED]
    assert batch[schema.ERROR_KIND][1] == "decode_error" and "tokenize_image" in batch[schema.ERROR_MESSAGE][1]
    assert "no image or video" in batch[schema.ERROR_MESSAGE][2]
    assert "image_ids.npy" in batch["files"][0] and batch["image_tokenizer"][3] is None

    # A model failure on one sample of a batch: only that sample fails.
    real = stage.encode
    def flaky(arrays):
        if any(a.min() == 255 for a in arrays):
            raise RuntimeError("boom")
        return real(arrays)
    monkeypatch.setattr(stage, "encode", flaky)
    good = shapes_batch(3)
    good["files"][1]["png"] = encode_image(random_image(64, 64, 0).point(lambda v: 255), "PNG")
    del good["files"][1]["jpg"]
    stage.process(good)
    assert good[schema.STATUS] == [schema.SUCCESS, schema.FAILED_TO_PROCESS, schema.SUCCESS]
    assert "boom" in good[schema.ERROR_MESSAGE][1]


def test_stage_pickles_without_its_model():
    stage = image_stage(TINY_VQ, resolution=64)
    stage.setup()
    clone = pickle.loads(pickle.dumps(stage))
    assert clone._model is None and clone.fingerprint() == stage.fingerprint()
    a, b = shapes_batch(2), shapes_batch(2)
    stage.process(a), clone.process(b)
    assert [f["image_ids.npy"] for f in a["files"]] == [f["image_ids.npy"] for f in b["files"]]
    assert stage.resources.gpus == 0 and stage.stateful

    text = build_tokenizers({"text": {}})[0]
    text.fingerprint()
    clone = pickle.loads(pickle.dumps(text))
    assert clone._tokenizer is None and not clone.stateful
    batch = clone.process(make_batch([{}], ["a red circle"]))
    assert load_npy(batch["files"][0]["text_ids.npy"]).tolist() == [49406, 320, 736, 7117, 49407]


# -- other model classes -------------------------------------------------------------------------
def test_vae_latents_equal_a_direct_encoder_call(tmp_path):
    from diffusers import AutoencoderKL

    path = save_tiny_vae(tmp_path / "vae", scaling_factor=0.5)
    stage = image_stage(path, resolution=32)
    batch = shapes_batch(3, size=48)
    stage.process(batch)
    vae = AutoencoderKL.from_pretrained(path).eval()
    pixels = to_pixels([prepare(f, stage.policy, 8).pixels for f in shapes_batch(3, size=48)["files"]])
    with torch.inference_mode():
        mean = vae.encode(pixels[:, 0]).latent_dist.mean.numpy()
    for i in range(3):
        z = load_npy(batch["files"][i]["latents.npy"])
        assert z.dtype == np.float16 and z.shape == (4, 16, 16)
        np.testing.assert_allclose(z, mean[i], rtol=1e-3, atol=1e-3)
    assert batch["vae_scaling_factor"] == [0.5] * 3 and batch["image_grid"][0] == "4x16x16"
    fp = stage.fingerprint()
    assert fp["kind"] == "vae" and fp["scaling_factor"] == 0.5 and fp["latents"] == "mean"

    moments = image_stage(path, resolution=32, latents="moments")
    batch = shapes_batch(1, size=48)
    moments.process(batch)
    assert load_npy(batch["files"][0]["latents.npy"]).shape == (8, 16, 16)
    assert moments.fingerprint()["id"] != fp["id"]


def test_chameleon_ids_equal_a_direct_call(tmp_path):
    from transformers import ChameleonVQVAE

    path = save_tiny_chameleon(tmp_path / "chameleon")
    stage = image_stage(path, resolution=32)
    batch = shapes_batch(3)
    stage.process(batch)
    model = ChameleonVQVAE.from_pretrained(path).eval()
    pixels = to_pixels([prepare(f, stage.policy, 8).pixels for f in shapes_batch(3)["files"]])
    with torch.inference_mode():
        direct = model.encode(pixels[:, 0]).image_tokens.view(3, 16, 16).numpy()
    got = np.stack([load_npy(f["image_ids.npy"]) for f in batch["files"]])
    assert got.dtype == np.uint16 and got.shape == (3, 16, 16)
    np.testing.assert_array_equal(got, direct)
    assert len(np.unique(got)) > 1


def test_vq_inside_a_full_emu3_checkpoint_loads_alone(tmp_path):
    full = save_tiny_emu3_full(tmp_path / "emu3")
    stage = image_stage(tmp_path / "emu3", resolution=32)
    batch = shapes_batch(2)
    stage.process(batch)
    pixels = to_pixels([prepare(f, stage.policy, 8).pixels for f in shapes_batch(2)["files"]])
    with torch.inference_mode():
        direct = full.model.vqmodel.encode(pixels[:, 0], torch.tensor([[32, 32]] * 2)).image_tokens
    for i in range(2):
        np.testing.assert_array_equal(load_npy(batch["files"][i]["image_ids.npy"]), direct[i].numpy())
    assert stage.info.submodel and stage.fingerprint()["class"] == "Emu3VQVAE"


def test_hub_id_resolves_through_the_hub_cache(tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1 in conftest): a hub id loads from the hub cache."""
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--mmcurate--tiny-vq"
    shutil.copytree(TINY_VQ, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id = image_stage("mmcurate/tiny-vq", resolution=64)
    by_path = image_stage(TINY_VQ, resolution=64)
    assert by_id.fingerprint()["revision"] == commit
    assert by_id.fingerprint()["id"] == by_path.fingerprint()["id"]
    a, b = shapes_batch(2), shapes_batch(2)
    by_id.process(a), by_path.process(b)
    assert [f["image_ids.npy"] for f in a["files"]] == [f["image_ids.npy"] for f in b["files"]]


@pytest.mark.parametrize("array", [np.arange(15, dtype=np.uint16), np.zeros((8, 8), np.uint16),
                                   np.arange(512, dtype=np.int32).reshape(2, 16, 16), np.ones((4, 8, 8), np.float16),
                                   np.zeros((0,), np.uint16), np.arange(6, dtype=">i4").reshape(3, 2).T])
def test_npy_bytes_are_np_save_bytes(array):
    import io

    from pipeline.media.npy import npy_bytes

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    assert npy_bytes(array) == buf.getvalue()
    np.testing.assert_array_equal(load_npy(npy_bytes(array)), array)


def test_ids_dtype_follows_the_vocabulary_size():
    from pipeline.tokenize.common import ids_dtype

    assert ids_dtype(512) == np.uint16 and ids_dtype(65536) == np.uint16  # ids 0..65535
    assert ids_dtype(65537) == np.int32 and ids_dtype(151_643 + 32_768) == np.int32

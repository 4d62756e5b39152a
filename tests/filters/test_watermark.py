"""The watermark filter: tiny timm and transformers classifiers saved by the test in each layout it
reads (LAION's timm name + state dict with an MLP head, timm's hub folder, a transformers folder, a
hub id in the local cache), scores checked against LAION's own transform, thresholds with the
filter's name as error kind, hostile images as per-sample failures, and a real job."""
import io
import json
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
import torch.nn as nn
import yaml
from PIL import Image

from filters import build_filters
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.stage import JobContext
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing import synthetic
from pipeline.testing.serve import LocalServer

torch.set_num_threads(2)
TINY = "test_efficientnet"  # a timm architecture of 100k parameters, same family as LAION's


def laion_head(in_features, hidden=(32, 16)):
    """LAION's head, narrower: Linear, ReLU, Dropout, Linear, ReLU, Linear (2 classes)."""
    return nn.Sequential(nn.Linear(in_features, hidden[0]), nn.ReLU(), nn.Dropout(p=0.3),
                         nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Linear(hidden[1], 2))


def spread(model, size=64):
    """Random weights give nearly the same probability for every image; set the last layer to
    read the direction in which the images' penultimate features differ most, so the scores
    spread over (0, 1) and a threshold has something to cut."""
    last = model.classifier[-1] if isinstance(model.classifier, nn.Sequential) else model.classifier
    seen = []
    hook = last.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
    images = [im.resize((size, size)) for im, _ in synthetic.make_pairs(16, seed=123, size=size)]
    pixels = torch.stack([torch.from_numpy(np.asarray(im, np.float32).transpose(2, 0, 1) / 255) for im in images])
    with torch.no_grad():
        model.eval()(pixels)
        hook.remove()
        h = seen[0]
        centre = h.mean(0)
        _, _, v = torch.pca_lowrank(h - centre, q=1)
        direction = v[:, 0] * (4 / (h - centre).matmul(v[:, 0]).std())
        last.weight.zero_(), last.bias.zero_()  # classes past the first two: a constant logit of 0
        last.weight[:2] = torch.stack([direction, -direction])
        last.bias[:2] = torch.stack([-centre @ direction, centre @ direction])
    return model


@pytest.fixture(scope="module")
def laion_checkpoint(tmp_path_factory):
    """LAION's layout: a timm name and a torch.save'd state dict whose classifier is an MLP."""
    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False, num_classes=2)
    model.classifier = laion_head(model.num_features)
    path = tmp_path_factory.mktemp("laion") / "watermark_model_v1.pt"
    torch.save(spread(model).state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    """timm's hub layout, written by timm itself: config.json + model.safetensors."""
    torch.manual_seed(1)
    model = spread(timm.create_model(TINY, pretrained=False, num_classes=2))
    folder = tmp_path_factory.mktemp("timm") / "tiny-watermark"
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory):
    """A transformers image-classification folder with its image processor (squash to 48 x 48)."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(2)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=2, id2label={0: "watermark", 1: "clear"}, label2id={"watermark": 0, "clear": 1})
    model = ResNetForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(40)
    folder = tmp_path_factory.mktemp("hf") / "tiny-resnet-watermark"
    model.save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 48, "width": 48})
    processor.save_pretrained(folder)
    return folder, model, processor


def laion(path, **options):
    """The laion preset on the tiny backbone, at 64 px (the preset's 256 px is checked once)."""
    return {"preset": "laion", "model": TINY, "checkpoint": str(path), "image_size": 64, **options}


def build(**options):
    [stage] = build_filters([{"watermark": {"device": "cpu", **options}}], check=True)
    return stage


def images_batch(n=8, seed=0, size=80):
    return synthetic.make_batch(synthetic.make_pairs(n, seed=seed, size=size))


def laion_reference(model, batch, size=256):
    """LAION-5B-WatermarkDetection's example: Resize((256, 256)), ToTensor, Normalize, softmax[:, 0]."""
    import torchvision.transforms as T

    transform = T.Compose([T.Resize((size, size)), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    pixels = torch.stack([transform(Image.open(io.BytesIO(f["jpg"])).convert("RGB")) for f in batch[schema.FILES]])
    with torch.inference_mode():
        return torch.softmax(model.eval()(pixels), dim=1)[:, 0].numpy()


# -- the layouts ----------------------------------------------------------------------------------
def test_laion_layout_scores_as_laions_own_transform(laion_checkpoint):
    path, model = laion_checkpoint
    stage = build(preset="laion", model=TINY, checkpoint=str(path))  # 256 px, as LAION
    batch = stage.process(images_batch(3))
    expected = laion_reference(model, images_batch(3))
    np.testing.assert_allclose(batch["watermark_score"], expected, atol=1e-5)
    assert stage.fingerprint()["checkpoint_sha256"] and stage.fingerprint()["image_size"] == 256
    small = build(**laion(path)).process(images_batch())["watermark_score"]
    np.testing.assert_allclose(small, laion_reference(model, images_batch(), size=64), atol=1e-5)
    assert np.ptp(small) > 0.1  # the scores differ, so the comparison means something


def test_watermark_class_picks_the_other_output(laion_checkpoint):
    path, _ = laion_checkpoint
    zero = build(**laion(path)).process(images_batch(4))
    one = build(**laion(path, watermark_class=1)).process(images_batch(4))
    np.testing.assert_allclose(np.add(zero["watermark_score"], one["watermark_score"]), 1.0, atol=1e-5)


def test_timm_name_with_a_plain_head_in_safetensors(tmp_path):
    """A state dict whose head is one Linear (``classifier.weight``): its width comes from the weights."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = spread(timm.create_model(TINY, pretrained=False, num_classes=3))
    save_file(model.state_dict(), tmp_path / "wm.safetensors")
    batch = build(model=TINY, checkpoint=str(tmp_path / "wm.safetensors"), image_size=64).process(images_batch(4))
    np.testing.assert_allclose(batch["watermark_score"], laion_reference(model, images_batch(4), size=64), atol=1e-5)


def test_timm_hub_folder_loads_with_its_own_input_size(timm_folder):
    folder, model = timm_folder
    stage = build(model=str(folder))
    batch = stage.process(images_batch())
    expected = laion_reference(model, images_batch(), size=model.pretrained_cfg["input_size"][1])
    np.testing.assert_allclose(batch["watermark_score"], expected, atol=1e-5)
    assert stage.fingerprint()["weights_sha256"]


def test_transformers_folder_scores_as_its_image_processor(transformers_folder):
    folder, model, processor = transformers_folder
    batch = build(model=str(folder)).process(images_batch())
    images = [Image.open(io.BytesIO(f["jpg"])).convert("RGB") for f in images_batch()[schema.FILES]]
    with torch.inference_mode():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    expected = torch.softmax(logits, dim=1)[:, 0].numpy()
    np.testing.assert_allclose(batch["watermark_score"], expected, atol=1e-4)
    assert np.ptp(expected) > 0.01


def test_hub_id_resolves_from_the_local_cache_only(timm_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder, _ = timm_folder
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--mmcurate--tiny-watermark"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id, by_path = build(model="hf-hub:mmcurate/tiny-watermark"), build(model=str(folder))
    assert by_id.process(images_batch(4))["watermark_score"] == by_path.process(images_batch(4))["watermark_score"]
    assert by_id.fingerprint()["revision"] == commit
    assert by_id.fingerprint()["weights_sha256"] == by_path.fingerprint()["weights_sha256"]
    with pytest.raises(ConfigError, match=r"watermark\.model: 'mmcurate/not-cached' is not a folder and not in the local"):
        build(model="mmcurate/not-cached")


@pytest.mark.slow
def test_the_real_laion_architecture_and_head_load(tmp_path):
    """efficientnet_b3 with LAION's full head (1536 -> 625 -> 256 -> 2), random weights: the
    checkpoint LAION publishes has exactly these keys and shapes."""
    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = laion_head(1536, hidden=(625, 256))
    torch.save(model.state_dict(), tmp_path / "watermark_model_v1.pt")
    batch = build(preset="laion", checkpoint=str(tmp_path / "watermark_model_v1.pt")).process(images_batch(2))
    np.testing.assert_allclose(batch["watermark_score"], laion_reference(model, images_batch(2)), atol=1e-5)


# -- rules -----------------------------------------------------------------------------------------
def test_max_and_min_reject_with_the_filter_name(laion_checkpoint):
    path, _ = laion_checkpoint
    scores = build(**laion(path)).process(images_batch())["watermark_score"]
    cut = float(np.median(scores))
    for rule, bad in (("max", lambda s: s > cut), ("min", lambda s: s < cut)):
        batch = build(**laion(path, **{rule: cut})).process(images_batch())
        rejected = [bad(s) for s in scores]
        assert 0 < sum(rejected) < len(scores)
        assert [st == schema.FILTERED for st in batch[schema.STATUS]] == rejected
        assert {k for k, r in zip(batch[schema.ERROR_KIND], rejected) if r} == {"watermark"}
        assert all(f"{rule} {cut:g}" in m for m, r in zip(batch[schema.ERROR_MESSAGE], rejected) if r)
        assert batch["watermark_score"] == scores  # rejected rows keep their score in the table


def test_top_fraction_threshold_from_the_sample_is_kept_and_restored(laion_checkpoint):
    path, _ = laion_checkpoint
    stage = build(**laion(path, top_fraction=0.5, sample_size=8))
    with pytest.raises(RuntimeError, match="top_fraction needs its threshold"):
        stage.process(images_batch())
    state = stage.prepare(JobContext(sample_batches=lambda n: iter([images_batch(n)])))
    assert state["top_fraction"] == 0.5 and state["sample_size"] == 8
    again = build(**laion(path, top_fraction=0.5, sample_size=8))
    again.restore(json.loads(json.dumps(state)))  # as read back from manifest.json
    batch = again.process(images_batch())
    kept = [s for s, st in zip(batch["watermark_score"], batch[schema.STATUS]) if st == schema.PENDING]
    assert len(kept) == 4 and max(kept) <= state["threshold"]  # the cleanest half
    assert "above the top 50% threshold" in next(m for m in batch[schema.ERROR_MESSAGE] if m)


# -- hostile images --------------------------------------------------------------------------------
def png_claiming(width, height):
    """A real PNG whose IHDR (CRC fixed) announces another size: a decompression bomb header."""
    data = bytearray(synthetic.encode(Image.new("RGB", (8, 8)), "png"))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


HOSTILE = {
    "not_an_image": (b"<html><body>not an image</body></html>", "decode_error"),
    "truncated_png": (synthetic.encode(Image.effect_noise((64, 64), 40).convert("RGB"), "png")[:300], "decode_error"),
    "truncated_jpeg": (synthetic.encode(Image.new("RGB", (64, 64), "red"), "jpg")[:200], "decode_error"),
    "bomb_png": (png_claiming(60000, 60000), "decompression_bomb"),
    "text_as_gif": (b"GIF89a" + b"\x00" * 20, "decode_error"),
}


def test_undecodable_images_fail_alone_with_the_open_image_kind(laion_checkpoint):
    path, _ = laion_checkpoint
    batch = images_batch(2 + len(HOSTILE))
    for n, (data, _) in enumerate(HOSTILE.values()):
        batch[schema.FILES][2 + n] = {"jpg": data}
    batch[schema.FILES][0] = {}  # a row without an image is not this filter's business
    build(**laion(path, batch_size=3)).process(batch)
    assert batch[schema.ERROR_KIND][:2] == [None, None] and batch["watermark_score"][0] is None
    assert isinstance(batch["watermark_score"][1], float)
    assert batch[schema.ERROR_KIND][2:] == [kind for _, kind in HOSTILE.values()]
    assert all(m.startswith("watermark: ") for m in batch[schema.ERROR_MESSAGE][2:])
    assert batch["watermark_score"][2:] == [None] * len(HOSTILE)


# -- options and checks ----------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"max": 1.5}, "filters[0].watermark.max: a probability, in 0..1; got 1.5"),
    ({"top_fraction": 0}, "filters[0].watermark.top_fraction: must be in (0, 1], got 0"),
    ({"watermark_class": -1}, "filters[0].watermark.watermark_class: an output index, >= 0; got -1"),
    ({"checkpoint": "weights.onnx"}, "filters[0].watermark.checkpoint: a state dict file"),
    ({"preset": "nope"}, "filters[0].watermark.preset: unknown preset 'nope' (known: laion)"),
    ({"checkpoint": "/nonexistent/watermark_model_v1.pt"}, "filters[0].watermark.checkpoint: no such file: /nonexistent"),
    ({"model": "not_a_timm_model", "checkpoint": "x.pt"}, "filters[0].watermark.model: 'not_a_timm_model' is not a timm"),
    ({"model": "efficientnet_b3"}, "filters[0].watermark.checkpoint: required with the timm architecture name"),
])
def test_bad_options_name_their_key_and_value(options, message):
    with pytest.raises(ConfigError) as e:
        build(**options)
    assert message in str(e.value)


def test_a_folder_without_config_fails_in_check(tmp_path):
    with pytest.raises(ConfigError, match=r"filters\[0\]\.watermark\.model: .* has no config.json"):
        build(model=str(tmp_path))


def test_watermark_class_beyond_the_outputs_fails_at_load(laion_checkpoint):
    path, _ = laion_checkpoint
    with pytest.raises(ConfigError, match="watermark_class: 2, but test_efficientnet has 2 output classes"):
        build(**laion(path, watermark_class=2)).process(images_batch(1))


@pytest.mark.parametrize("layout", ["timm_folder", "transformers_folder"])
def test_watermark_class_beyond_a_folders_classes_fails_in_check(layout, request):
    folder = request.getfixturevalue(layout)[0]
    with pytest.raises(ConfigError, match=r"filters\[0\]\.watermark\.watermark_class: 5, but .* declares 2 output"):
        build(model=str(folder), watermark_class=5)


def test_a_checkpoint_of_another_architecture_fails_loudly(laion_checkpoint):
    path, _ = laion_checkpoint
    with pytest.raises(RuntimeError, match="state_dict"):
        build(model="resnet10t", checkpoint=str(path)).process(images_batch(1))


# -- in a job --------------------------------------------------------------------------------------
def test_job_writes_watermark_scores_to_the_status_table_key_json_and_manifest(laion_checkpoint, tmp_path):
    path, _ = laion_checkpoint
    pairs = synthetic.make_pairs(12, seed=7, size=64)
    files = {f"{i}.jpg": synthetic.encode(im, "jpg", 90) for i, (im, _) in enumerate(pairs)}
    files["11.jpg"] = b"<html>gone</html>"  # served as image/jpeg: the download stage decides, not us
    with LocalServer(files, content_type="image/jpeg") as server:
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [server.url(f"{i}.jpg") for i in range(12)],
                                 "caption": [c for _, c in pairs]}), urls)
        spec = {"name": "wm", "input": {"files": [str(urls)]},
                "download": {"image_size": 48, "allow_private_addresses": True, "timeout": 5},
                "filters": [{"watermark": {"preset": "laion", "model": TINY, "checkpoint": str(path),
                                           "image_size": 64, "top_fraction": 0.5, "sample_size": 12}},
                            {"language": {}}],
                "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 6},
                "execution": {"engine": "local", "progress": False}}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        assert run_job(load_job(tmp_path / "job.yaml")).ok
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    state = manifest["stage_state"]["watermark"]
    assert state["top_fraction"] == 0.5 and state["sample_size"] == 11
    assert manifest["fingerprints"]["watermark"]["checkpoint_sha256"]
    t = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).to_pydict()
    assert pq.read_schema(out / "00000.parquet").field("watermark_score").type == pa.float64()
    scored = [(s, st, k) for s, st, k in zip(t["watermark_score"], t["status"], t["error_kind"]) if s is not None]
    assert len(scored) == 11 and t["watermark_score"][11] is None
    assert all(s <= state["threshold"] for s, st, _ in scored if st == "success")
    assert all(k == "watermark" and s > state["threshold"] for s, st, k in scored if st == "filtered")
    assert sum(st == "filtered" for _, st, _ in scored) >= 4
    assert {lang for lang, st in zip(t["language"], t["status"]) if st == "success"} == {"en"}
    assert all(lang is None for lang, k in zip(t["language"], t["error_kind"]) if k == "watermark")  # stopped before
    metas = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == sum(st == "success" for st in t["status"]) > 0
    assert all(isinstance(m["watermark_score"], float) and m["language"] == "en" for m in metas)

"""The clip_score filter with the project's tiny CLIP (models/tiny-clip), loaded through the same
``model: CONFIG.json, pretrained: CHECKPOINT`` path users take for any open_clip model."""
import io
import json
import pickle

import numpy as np
import pytest
import torch

from filters import build_filters
from pipeline.core import schema
from pipeline.core.stage import JobContext
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP, TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.tiny_clip import roc_auc

torch.set_num_threads(2)

MODEL_DIR, CONFIG, WEIGHTS = TINY_CLIP, TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
HELD_OUT_SEED = 424242  # the model trained on seed 0 and was evaluated on seed 1


def clip_stage(**options):
    entry = {"model": str(CONFIG), "pretrained": str(WEIGHTS), "batch_size": 64, **options}
    [stage] = build_filters([{"clip_score": entry}], check=True)
    return stage


def pairs_batch(n, seed=HELD_OUT_SEED, shuffle_odd=True, size=64, shard_id=0):
    """Held-out pairs; odd rows get another image's caption (a mismatched pair)."""
    pairs = synthetic.make_pairs(n, seed=seed, size=size)
    captions = [c for _, c in pairs]
    wrong = synthetic.shuffled_captions(captions, seed)
    if shuffle_odd:
        pairs = [(im, wrong[i] if i % 2 else c) for i, (im, c) in enumerate(pairs)]
    return synthetic.make_batch(pairs, shard_id=shard_id)


@pytest.fixture(scope="module")
def scored():
    """One stage run over 400 held-out pairs, half of them mismatched, with no rule."""
    stage = clip_stage()
    return stage.process(pairs_batch(400))


def test_tiny_clip_separates_matched_from_shuffled_captions(scored):
    s = np.asarray(scored["clip_score"])
    auc = roc_auc(s[0::2], s[1::2])
    assert auc >= 0.95, auc
    assert all(st == schema.PENDING for st in scored[schema.STATUS])  # no rule: nothing filtered


def test_min_rule_removes_shuffled_captions():
    threshold = json.loads((MODEL_DIR / "metrics.json").read_text())["threshold"]
    out = clip_stage(min=threshold).process(pairs_batch(200))
    matched_kept = np.mean([s == schema.PENDING for s in out[schema.STATUS][0::2]])
    shuffled_removed = np.mean([k == "clip_score" for k in out[schema.ERROR_KIND][1::2]])
    assert matched_kept >= 0.9 and shuffled_removed >= 0.9, (matched_kept, shuffled_removed)
    i = out[schema.ERROR_KIND].index("clip_score")
    assert out[schema.STATUS][i] == schema.FILTERED and out[schema.FILES][i] == {}
    assert out[schema.ERROR_MESSAGE][i].startswith("clip score ") and f"below min {threshold:g}" in \
        out[schema.ERROR_MESSAGE][i]


def plain_open_clip_scores(images, captions):
    """What a user would write with open_clip alone."""
    import open_clip
    from PIL import Image

    open_clip.add_model_config(CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(WEIGHTS))
    tokenizer = open_clip.get_tokenizer("tiny-clip", bpe_path=str(MODEL_DIR / "bpe.txt.gz"))
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        img = model.encode_image(pixels)
        txt = model.encode_text(tokenizer(captions))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).numpy()


def test_scores_equal_a_plain_open_clip_computation():
    b = pairs_batch(150)
    images = [f["jpg"] for f in b[schema.FILES]]
    expected = plain_open_clip_scores(images, b[schema.CAPTION])
    exact = clip_stage(draft=False, decode_threads=3).process(b)  # 150 rows: 3 model batches of 64
    np.testing.assert_allclose(exact["clip_score"], expected, atol=1e-4)
    # stored images under twice the model's input (like 256 px for a 224 px model): the default is exact
    small = pairs_batch(40, size=48)
    np.testing.assert_allclose(clip_stage().process(small)["clip_score"],
                               plain_open_clip_scores([f["jpg"] for f in small[schema.FILES]], small[schema.CAPTION]),
                               atol=1e-4)
    # the default decodes these 64 px JPEGs at 32 px in the DCT domain: close, not identical
    fast = clip_stage().process(pairs_batch(150))
    np.testing.assert_allclose(fast["clip_score"], expected, atol=0.05)
    # nvJPEG-style tensor path, run on the CPU here: same model, tensor resize
    tensor = clip_stage(decode="torch").process(pairs_batch(150))
    np.testing.assert_allclose(tensor["clip_score"], expected, atol=0.05)


def test_top_fraction_threshold_comes_from_the_sample_pass_and_is_reused():
    shards = [pairs_batch(100, shard_id=s, seed=HELD_OUT_SEED + s) for s in range(3)]

    def sample_batches(n_rows):  # as the job does: the first n rows, through earlier stages
        left = n_rows
        for shard in shards:
            yield {k: list(v[:left]) if k != schema.FILES else [dict(f) for f in v[:left]] for k, v in shard.items()}
            left -= len(shard[schema.KEY])
            if left <= 0:
                return

    stage = clip_stage(top_fraction=0.5, sample_size=150)
    with pytest.raises(RuntimeError, match="top_fraction needs its threshold"):
        stage.process(pairs_batch(4))
    state = stage.prepare(JobContext(sample_batches=sample_batches))
    assert state["sample_size"] == 150 and state["top_fraction"] == 0.5
    again = clip_stage(top_fraction=0.5, sample_size=150).prepare(JobContext(sample_batches))
    assert again == state  # deterministic for a given input
    json.dumps(state)  # stored in manifest.json

    resumed = clip_stage(top_fraction=0.5, sample_size=150)
    resumed.restore(json.loads(json.dumps(state)))
    out = resumed.process(shards[2])  # a shard the sample pass never saw
    kept = [s == schema.PENDING for s in out[schema.STATUS]]
    assert 0.35 <= np.mean(kept) <= 0.65
    scores = np.asarray(out["clip_score"])
    assert scores[kept].min() >= state["threshold"] > scores[~np.asarray(kept)].max()
    assert "below the top 50% threshold" in out[schema.ERROR_MESSAGE][kept.index(False)]


def test_embeddings_are_stored_for_kept_samples():
    out = clip_stage(min=-1.0, store_embeddings=True).process(pairs_batch(6))
    emb = np.load(io.BytesIO(out[schema.FILES][0]["clip.npy"]))
    assert emb.dtype == np.float16 and emb.shape == (64,)
    assert abs(np.linalg.norm(emb.astype(np.float32)) - 1) < 1e-2
    assert all("clip.npy" in f for f in out[schema.FILES])


def test_undecodable_image_fails_alone_and_dead_rows_are_skipped():
    b = pairs_batch(5)
    b[schema.FILES][1] = {"jpg": b"\xff\xd8\xff\xe0 truncated"}
    b[schema.STATUS][3] = schema.FAILED_TO_DOWNLOAD
    b[schema.FILES][3] = {}
    for decode in ("pil", "torch"):
        out = clip_stage(decode=decode).process({k: list(v) for k, v in b.items()})
        assert out[schema.ERROR_KIND][1] == "decode_error" and out[schema.STATUS][1] == schema.FAILED_TO_DECODE
        assert out["clip_score"][1] is None and out["clip_score"][3] is None
        assert all(isinstance(out["clip_score"][i], float) for i in (0, 2, 4))


def test_stage_travels_to_workers_without_its_model():
    stage = clip_stage(min=0.2)
    stage.setup()
    assert stage.resources.gpus == (1.0 if torch.cuda.is_available() else 0)
    blob = pickle.dumps(stage)
    assert len(blob) < 10_000  # options and threshold only
    worker = pickle.loads(blob)
    worker.setup()
    np.testing.assert_allclose(worker.process(pairs_batch(4))["clip_score"], stage.process(pairs_batch(4))["clip_score"],
                               atol=1e-6)


def test_fingerprint_names_the_weights():
    fp = clip_stage().fingerprint()
    assert fp["pretrained"] == "tiny-clip.safetensors" and len(fp["pretrained_sha256"]) == 64
    assert fp["model"] == "tiny-clip.json"

"""The aesthetic and NSFW heads: tiny ones in the published layouts, read from the embeddings the
one CLIP pass leaves in the batch; the same numbers as a direct computation; thresholds, the
width check, a hub id from a local cache."""
import io

import numpy as np
import pytest
import torch

from filters import build_filters
from filters.clip_score import IMAGE_EMBEDDING, ClipScoreFilter
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.stage import JobContext
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.clip_heads import aesthetic_state, hub_cache, nsfw_state, save_head

torch.set_num_threads(2)

CLIP = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS)}
WIDTH = 64  # the tiny CLIP's embedding width


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {"aesthetic": save_head(root / "aesthetic.pth", aesthetic_state(WIDTH, seed=1)),
            "nsfw": save_head(root / "nsfw.pth", nsfw_state(WIDTH, seed=2))}


def batch(n=12, seed=7):
    # 48 px: under twice the model's 32 px input, so the default decode is exact (no JPEG draft)
    return synthetic.make_batch(synthetic.make_pairs(n, seed=seed, size=48))


def plain_embeddings(images):
    """L2-normalised image embeddings as a user would compute them with open_clip alone."""
    import open_clip
    from PIL import Image

    open_clip.add_model_config(TINY_CLIP_CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(TINY_CLIP_WEIGHTS))
    model.eval()
    with torch.no_grad():
        x = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]))
    return (x / x.norm(dim=-1, keepdim=True)).numpy().astype(np.float64)


def direct_aesthetic(state, x):
    for i in (0, 2, 4, 6, 7):  # Dropouts are the identity at inference; no activations
        x = x @ state[f"layers.{i}.weight"].double().numpy().T + state[f"layers.{i}.bias"].double().numpy()
    return x[:, 0]


def direct_nsfw(state, x):
    x = (x - state["norm.mean"].double().numpy()) / np.sqrt(state["norm.variance"].double().numpy())
    for k in (1, 2, 3, 4):
        x = x @ state[f"linear_{k}.weight"].double().numpy().T + state[f"linear_{k}.bias"].double().numpy()
        x = np.maximum(x, 0) if k < 4 else 1 / (1 + np.exp(-x))
    return x[:, 0]


def run(stages, b):
    for stage in stages:
        b = stage.process(b)
    return b


def test_heads_give_the_numbers_of_a_direct_computation(heads):
    stages = build_filters([{"aesthetic": {"checkpoint": str(heads["aesthetic"]), **CLIP}},
                            {"nsfw": {"checkpoint": str(heads["nsfw"]), **CLIP}}], check=True)
    assert [type(s).__name__ for s in stages] == ["ClipScoreFilter", "AestheticFilter", "NsfwFilter"]
    assert stages[0].config.captions is False and stages[0].columns == {}  # embed-only: no text tower
    b = run(stages, batch())
    x = plain_embeddings([f["jpg"] for f in b[schema.FILES]])
    np.testing.assert_allclose(np.stack(b[IMAGE_EMBEDDING]), x, atol=1e-5)
    np.testing.assert_allclose(b["aesthetic_score"], direct_aesthetic(aesthetic_state(WIDTH, 1), x), atol=1e-4)
    nsfw = np.asarray(b["nsfw_score"])
    np.testing.assert_allclose(nsfw, direct_nsfw(nsfw_state(WIDTH, 2), x), atol=1e-5)
    assert ((nsfw > 0) & (nsfw < 1)).all() and nsfw.std() > 0.01  # a probability, not saturated
    assert all(s == schema.PENDING for s in b[schema.STATUS])  # no rule: nothing filtered
    assert "clip_score" not in b


def test_min_and_max_reject_with_the_filter_name(heads):
    b = run(build_filters([{"aesthetic": {"checkpoint": str(heads["aesthetic"]), **CLIP}},
                           {"nsfw": {"checkpoint": str(heads["nsfw"]), **CLIP}}]), batch(30))
    a_mid, n_mid = float(np.median(b["aesthetic_score"])), float(np.median(b["nsfw_score"]))
    out = run(build_filters([{"aesthetic": {"checkpoint": str(heads["aesthetic"]), "min": a_mid, **CLIP}},
                             {"nsfw": {"checkpoint": str(heads["nsfw"]), "max": n_mid, **CLIP}}]), batch(30))
    for i, (a, n) in enumerate(zip(b["aesthetic_score"], b["nsfw_score"])):
        if a < a_mid:
            assert out[schema.ERROR_KIND][i] == "aesthetic" and out[schema.STATUS][i] == schema.FILTERED
            assert f"below min {a_mid:g}" in out[schema.ERROR_MESSAGE][i] and out[schema.FILES][i] == {}
        elif n > n_mid:
            assert out[schema.ERROR_KIND][i] == "nsfw" and f"above max {n_mid:g}" in out[schema.ERROR_MESSAGE][i]
            assert out["nsfw_score"][i] == pytest.approx(n, abs=1e-6)
        else:
            assert out[schema.STATUS][i] == schema.PENDING
    assert out["nsfw_score"][out[schema.ERROR_KIND].index("aesthetic")] is None  # rejected before nsfw


def test_top_fraction_state_keeps_the_best_and_is_reused(heads):
    entries = [{"aesthetic": {"checkpoint": str(heads["aesthetic"]), "top_fraction": 0.5, "sample_size": 20, **CLIP}},
               {"nsfw": {"checkpoint": str(heads["nsfw"]), "top_fraction": 0.5, "sample_size": 20, **CLIP}}]
    clip, aesthetic, nsfw = build_filters(entries, check=True)
    with pytest.raises(RuntimeError, match="top_fraction needs its threshold"):
        run([clip, aesthetic], batch(4))

    def sample(stages_before):  # as the job runs it: the first rows through the stages before
        return JobContext(lambda n: iter([run(stages_before, batch(n, seed=3))]))

    a_state = aesthetic.prepare(sample([clip]))
    aesthetic.restore(a_state)
    n_state = nsfw.prepare(sample([clip, aesthetic]))
    nsfw.restore(n_state)
    assert a_state["keep"] == "above" and n_state["keep"] == "below" and a_state["sample_size"] == 20
    out = run([clip, aesthetic, nsfw], batch(40, seed=11))  # rows the sample never saw
    kept = [i for i, s in enumerate(out[schema.STATUS]) if s == schema.PENDING]
    assert 0.1 <= len(kept) / 40 <= 0.45
    assert min(out["aesthetic_score"][i] for i in kept) >= a_state["threshold"]
    assert max(out["nsfw_score"][i] for i in kept) <= n_state["threshold"]
    i = out[schema.ERROR_KIND].index("nsfw")
    assert "above the top 50% threshold" in out[schema.ERROR_MESSAGE][i]


def test_head_width_must_match_the_clip(heads, tmp_path):
    wide = save_head(tmp_path / "l14.pth", aesthetic_state(768))
    with pytest.raises(ConfigError, match=r"filters\[0\]\.aesthetic\.checkpoint: l14\.pth takes 768-wide .*"
                                          r"tiny-clip\.json .* gives 64-wide"):
        build_filters([{"aesthetic": {"checkpoint": str(wide), **CLIP}}], check=True)
    # the default CLIP is OpenAI ViT-L-14 (768 wide): a 64-wide head is refused before any weights load
    with pytest.raises(ConfigError, match="takes 64-wide embeddings, but ViT-L-14 \\(openai\\) gives 768-wide"):
        build_filters([{"nsfw": {"checkpoint": str(heads["nsfw"])}}], check=True)
    build_filters([{"nsfw": {"checkpoint": str(save_head(tmp_path / "n.pth", nsfw_state(768)))}}], check=True)


def test_bad_checkpoints_are_refused_in_check(heads, tmp_path):
    cases = {
        "missing.pth": "is not a file",
        "garbage.pth": "cannot be read as a state dict",
        "nsfw-layout.pth": r"not in the aesthetic head's layout \(missing \['layers.0.bias'",
    }
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    save_head(tmp_path / "nsfw-layout.pth", nsfw_state(WIDTH))
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_filters([{"aesthetic": {"checkpoint": str(tmp_path / name), **CLIP}}], check=True)
    for options, message in [({}, "checkpoint: required"), ({"checkpoint": "x.pth", "min": 0.9, "max": 0.1},
                                                           "min: 0.9 is above max 0.1"),
                             ({"checkpoint": "x.pth", "max": 2}, "probability, in 0..1; got 2"),
                             ({"checkpoint": "hf-hub:owner/repo"}, "hf-hub:OWNER/REPO/FILE")]:
        with pytest.raises(ConfigError, match=message):
            build_filters([{"nsfw": options}])


def test_a_hub_id_resolves_from_the_local_cache(heads, tmp_path):
    cache = tmp_path / "hub"
    hub_cache(cache, "someone/aesthetic-head", "weights/sac+logos+ava1-l14-linearMSE.pth", heads["aesthetic"])
    entry = {"checkpoint": "hf-hub:someone/aesthetic-head/weights/sac+logos+ava1-l14-linearMSE.pth",
             "cache_dir": str(cache), **CLIP}
    [_, stage] = build_filters([{"aesthetic": entry}], check=True)
    local = build_filters([{"aesthetic": {"checkpoint": str(heads["aesthetic"]), **CLIP}}])
    np.testing.assert_allclose(run([_, stage], batch(6))["aesthetic_score"],
                               run(local, batch(6))["aesthetic_score"], atol=1e-6)
    assert stage.fingerprint()["checkpoint_sha256"] == local[1].fingerprint()["checkpoint_sha256"]
    with pytest.raises(ConfigError, match=r"not in the local Hugging Face cache .* \(huggingface-cli download "
                                          "someone/other x.pth"):
        build_filters([{"aesthetic": {**entry, "checkpoint": "hf-hub:someone/other/x.pth"}}], check=True)


def test_a_batch_without_embeddings_is_a_bug_not_a_filter(heads):
    [_, stage] = build_filters([{"aesthetic": {"checkpoint": str(heads["aesthetic"]), **CLIP}}])
    with pytest.raises(RuntimeError, match="no 'clip_image_embedding' column"):
        stage.process(batch(2))


def test_rows_without_an_embedding_are_left_alone(heads):
    clip, stage = build_filters([{"aesthetic": {"checkpoint": str(heads["aesthetic"]), "min": 100, **CLIP}}])
    b = batch(4)
    b[schema.FILES][1] = {"jpg": b"\xff\xd8\xff\xe0 truncated"}
    b[schema.FILES][2] = {}  # no image (a row of another kind)
    out = run([clip, stage], b)
    assert out[schema.ERROR_KIND][1] == "decode_error" and out[IMAGE_EMBEDDING][1] is None
    assert out[schema.STATUS][2] == schema.PENDING and out["aesthetic_score"][2] is None
    assert out[schema.ERROR_KIND][0] == out[schema.ERROR_KIND][3] == "aesthetic"
    assert isinstance(clip, ClipScoreFilter) and not clip.config.captions


def test_a_safetensors_checkpoint_gives_the_same_scores(heads, tmp_path):
    from safetensors.torch import save_file

    save_file(nsfw_state(WIDTH, seed=2), str(tmp_path / "nsfw.safetensors"))
    pth = build_filters([{"nsfw": {"checkpoint": str(heads["nsfw"]), **CLIP}}])
    st = build_filters([{"nsfw": {"checkpoint": str(tmp_path / "nsfw.safetensors"), **CLIP}}], check=True)
    np.testing.assert_allclose(run(st, batch(5))["nsfw_score"], run(pth, batch(5))["nsfw_score"], atol=1e-7)

"""The rule filters (size, aspect ratio, caption), exact and near dedup, and build_filters."""
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from filters import FILTERS, build_filters
from filters.perceptual import HammingIndex, dhash, phash
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.job.spec import load_job
from pipeline.testing import synthetic


def build(name, **options):
    [stage] = build_filters([{name: options}])
    return stage


def batch(n=6, seed=0, size=64):
    return synthetic.make_batch(synthetic.make_pairs(n, seed=seed, size=size))


def statuses(b):
    return [(s, k) for s, k in zip(b[schema.STATUS], b[schema.ERROR_KIND])]


# -- build_filters -------------------------------------------------------------------------------
def test_unknown_filter_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"filters\[1\]: unknown filter 'clip'.*aspect_ratio, caption, clip_score"):
        build_filters([{"caption": {}}, {"clip": {}}])


@pytest.mark.parametrize("entry, message", [
    ({"clip_score": {"pretrained": "random", "min": 1.5}}, r"filters\[0\]\.clip_score\.min: a cosine"),
    ({"clip_score": {"pretrained": "random", "mni": 0.2}},
     r"filters\[0\]\.clip_score\.mni: unknown key \(did you mean 'min'"),
    ({"clip_score": {"min": 0.2}}, r"filters\[0\]\.clip_score\.pretrained: required"),
    ({"clip_score": {"preset": "openai"}},
     r"filters\[0\]\.clip_score\.preset: unknown preset 'openai' \(known: laion, datacomp\)"),
    ({"clip_score": {"pretrained": "random", "top_fraction": 0}}, r"top_fraction: must be in \(0, 1\]"),
    ({"image_size": {"min_side": "big"}}, r"filters\[0\]\.image_size\.min_side: expected an integer"),
    ({"aspect_ratio": {"max": 0.5}}, r"aspect_ratio\.max: 0.5 is below min 1.0"),
    ({"caption": {"must_not_match": ["[a-"]}}, r"caption\.must_not_match\[0\]: not a valid regular expression"),
    ({"dedup_near": {"max_distance": 64}}, r"dedup_near\.max_distance: must be in 0..63"),
    ({"dedup_near": {"method": "clip", "scope": "shard"}}, r"dedup_near\.method: clip needs an earlier clip_score"),
])
def test_bad_options_name_their_path(entry, message):
    with pytest.raises(ConfigError, match=message):
        build_filters([entry])


def test_presets_fill_in_and_keys_next_to_them_win():
    laion = build("clip_score", preset="laion").config
    assert (laion.model, laion.pretrained, laion.min, laion.top_fraction) == ("ViT-B-32", "openai", 0.28, None)
    datacomp = build("clip_score", preset="datacomp", batch_size=64).config
    assert (datacomp.model, datacomp.top_fraction, datacomp.batch_size) == ("ViT-L-14", 0.3, 64)
    assert build("clip_score", preset="laion", min=0.3).config.min == 0.3


def test_load_checks_that_the_checkpoint_exists(tmp_path):
    entry = [{"clip_score": {"model": "ViT-B-32", "pretrained": str(tmp_path / "missing.pt")}}]
    build_filters(entry)  # validation alone does not look for files
    with pytest.raises(ConfigError, match=r"filters\[0\]\.clip_score\.pretrained: .*missing.pt' is not a "
                                          r"checkpoint file nor an open_clip tag of ViT-B-32"):
        build_filters(entry, check=True)
    with pytest.raises(ConfigError, match=r"filters\[0\]\.clip_score\.model: 'ViT-Q-99' is neither an open_clip model"):
        build_filters([{"clip_score": {"model": "ViT-Q-99", "pretrained": "random"}}], check=True)


def test_job_spec_validates_filters(tmp_path):
    data = {"input": {"files": ["urls.parquet"]}, "filters": [{"caption": {"min_words": -1}}]}
    with pytest.raises(ConfigError, match=r"filters\[0\]\.caption\.min_words: must be >= 0"):
        load_job(data=data)
    data["filters"] = [{"caption": {"min_words": 2}}, {"dedup_exact": {}}]
    assert load_job(data=data).filters[1] == {"dedup_exact": {}}


def test_every_filter_is_a_small_stage_with_a_name():
    for name, cls in FILTERS.items():
        assert cls.name == name
        assert cls.Config.__dataclass_fields__ is not None


# -- rule filters --------------------------------------------------------------------------------
def test_image_size_uses_original_sizes_by_default():
    b = batch(4)
    b[schema.ORIGINAL_WIDTH] = [300, 150, 300, 5000]
    b[schema.ORIGINAL_HEIGHT] = [300, 300, 199, 4000]
    b[schema.STATUS][2] = schema.FAILED_TO_DOWNLOAD  # already failed rows are left alone
    out = build("image_size", min_side=200, max_area=10_000_000).process(b)
    assert statuses(out) == [("pending", None), ("filtered", "image_size"), ("failed_to_download", None),
                             ("filtered", "image_size")]
    assert "shorter side below 200" in out[schema.ERROR_MESSAGE][1]
    assert "area above 10000000" in out[schema.ERROR_MESSAGE][3]
    assert out[schema.FILES][1] == {}  # a filtered sample's files are dropped
    stored = build("image_size", min_side=100, which="stored").process(batch(1))  # stored images are 64 px
    assert statuses(stored) == [("filtered", "image_size")]


def test_aspect_ratio():
    b = batch(4)
    b[schema.ORIGINAL_WIDTH] = [300, 1000, 100, 250]
    b[schema.ORIGINAL_HEIGHT] = [300, 300, 301, None]  # unknown size: not judged
    out = build("aspect_ratio", max=3.0).process(b)
    assert [k for _, k in statuses(out)] == [None, "aspect_ratio", "aspect_ratio", None]
    assert out[schema.ERROR_MESSAGE][1] == "1000x300: aspect ratio 3.33 above 3"
    wide = build("aspect_ratio", min=2.0, max=None).process(batch(1))
    assert statuses(wide) == [("filtered", "aspect_ratio")]


def test_caption_rules_default_to_datacomp_basic():
    b = batch(7)
    b[schema.CAPTION] = ["a red circle", "red circle", "a b c", None, "IMG_0042.JPG from my camera",
                         "a photo of a cat", "buy cheap pills now"]
    out = build("caption", min_alpha_fraction=0.5, must_not_match=[r"\bcheap\b"]).process(b)
    kinds = [k for _, k in statuses(out)]
    assert kinds == [None, "caption", "caption", "caption", None, None, "caption"]
    msgs = out[schema.ERROR_MESSAGE]
    assert msgs[1] == "2 words, fewer than 3" and msgs[2] == "5 characters, fewer than 6"
    assert msgs[6] == r"matches must_not_match '\\bcheap\\b'"
    out = build("caption", min_alpha_fraction=0.8, must_match=["photo|picture"]).process(batch(2))
    assert [k for _, k in statuses(out)] == [None, "caption"]  # caption 1 has no "photo"


# -- exact dedup ---------------------------------------------------------------------------------
def duplicated_shards():
    """Two shards of 6 where images repeat within and across shards."""
    pairs = synthetic.make_pairs(8, seed=3)
    first = synthetic.make_batch([pairs[0], pairs[1], pairs[0], pairs[2], pairs[3], pairs[1]], shard_id=0)
    second = synthetic.make_batch([pairs[4], pairs[2], pairs[5], pairs[4], pairs[6], pairs[0]], shard_id=1)
    return first, second


def test_dedup_exact_keeps_the_first_by_key_across_shards():
    stage = build("dedup_exact")
    assert stage.ordered
    a, b = (stage.process(s) for s in duplicated_shards())
    assert [k for _, k in statuses(a)] == [None, None, "dedup_exact", None, None, "dedup_exact"]
    assert [k for _, k in statuses(b)] == [None, "dedup_exact", None, "dedup_exact", None, "dedup_exact"]
    k = b[schema.KEY]
    assert b["exact_group"] == [k[0], a[schema.KEY][3], k[2], k[0], k[4], a[schema.KEY][0]]
    assert b[schema.ERROR_MESSAGE][5] == f"same bytes as {a[schema.KEY][0]}"


def test_dedup_exact_per_shard_scope_forgets_between_shards():
    stage = build("dedup_exact", scope="shard")
    assert not stage.ordered
    stage.process(duplicated_shards()[0])
    b = stage.process(duplicated_shards()[1])
    assert [k for _, k in statuses(b)] == [None, None, None, "dedup_exact", None, None]


def test_dedup_exact_resume_matches_an_uninterrupted_run():
    """Rows dropped by an earlier filter never reached dedup; rows dropped after it did: resume
    must rebuild exactly the seen set the uninterrupted run had."""
    def run(stage, shards, resume_first=False):
        first, second = shards
        first[schema.CAPTION][1] = "x"  # the caption filter (before dedup) drops row 1
        caption = build("caption", min_words=1, min_chars=2)
        first = stage.process(caption.process(first))
        first[schema.STATUS][3] = schema.FILTERED  # a later filter drops row 3 (its hash was seen)
        first[schema.ERROR_KIND][3] = "clip_score"
        if resume_first:
            table = {k: v for k, v in first.items() if k != schema.FILES}  # what the parquet holds
            stage = build("dedup_exact")
            stage.resume(table)
        return stage.process(caption.process(second))

    straight = run(build("dedup_exact"), duplicated_shards())
    resumed = run(build("dedup_exact"), duplicated_shards(), resume_first=True)
    assert statuses(resumed) == statuses(straight)
    assert resumed["exact_group"] == straight["exact_group"]
    # pairs[2] is remembered though a later filter dropped it; pairs[1] is not (dropped before dedup)
    assert [k for _, k in statuses(straight)] == [None, "dedup_exact", None, "dedup_exact", None, "dedup_exact"]


def test_dedup_exact_hashes_images_without_sha256():
    b = batch(3)
    b[schema.FILES][2] = dict(b[schema.FILES][0])
    b[schema.SHA256] = [None, None, None]
    out = build("dedup_exact").process(b)
    assert [k for _, k in statuses(out)] == [None, None, "dedup_exact"]
    assert out[schema.SHA256][0] == out[schema.SHA256][2] is not None


# -- perceptual hashes and near dedup ------------------------------------------------------------
def jpeg(image, quality=95):
    return synthetic.encode(image, "jpg", quality)


def test_perceptual_hashes_survive_reencoding_and_resizing_but_tell_images_apart():
    images = [im for im, _ in synthetic.make_pairs(12, seed=7, size=128)]
    for fn in (phash, dhash):
        for im in images[:4]:
            base = fn(jpeg(im))
            variants = [jpeg(im, quality=40), jpeg(im.resize((96, 96))), synthetic.encode(im, "png"),
                        jpeg(im.filter(ImageFilter.GaussianBlur(0.6)))]
            assert max((base ^ fn(v)).bit_count() for v in variants) <= 6, fn.__name__
        hashes = [fn(jpeg(im)) for im in images]
        distances = [(a ^ b).bit_count() for i, a in enumerate(hashes) for b in hashes[i + 1:]]
        assert np.median(distances) >= 14, fn.__name__


def test_phash_matches_the_reference_definition():
    """imagehash's pHash: 8x8 low frequencies of the DCT of a 32x32 LANCZOS grayscale copy, above
    their median; computed here independently with an explicit DCT sum."""
    im = synthetic.make_pairs(1, seed=11, size=32)[0][0]
    data = synthetic.encode(im, "png")  # lossless, no JPEG draft: the exact reference input
    x = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    n = np.arange(32)
    basis = np.array([np.cos(np.pi * k * (2 * n + 1) / 64) for k in range(8)])
    low = np.array([[np.sum(x * np.outer(basis[u], basis[v])) for v in range(8)] for u in range(8)])
    bits = (low > np.median(low)).ravel()
    assert phash(data) == int("".join("1" if b else "0" for b in bits), 2)


def test_hamming_index_finds_exactly_the_hashes_within_the_distance():
    rng = np.random.default_rng(0)
    stored = [int(v) for v in rng.integers(0, 2**63, 400)]
    index = HammingIndex(max_distance=5)
    for i, h in enumerate(stored):
        index.add(h, f"k{i}")
    for trial in range(300):
        base = stored[trial % len(stored)]
        flips = rng.choice(64, size=int(rng.integers(0, 9)), replace=False)
        query = base
        for bit in flips:
            query ^= 1 << int(bit)
        brute = [i for i, h in enumerate(stored) if (h ^ query).bit_count() <= 5]
        found = index.find(query)
        assert (found is None) == (not brute)
        if brute:
            assert found == (f"k{brute[0]}", (stored[brute[0]] ^ query).bit_count())


def near_duplicate_batch(shard_id=0, seed=5):
    pairs = synthetic.make_pairs(5, seed=seed, size=96)
    rows = [pairs[0], (pairs[0][0].resize((80, 80)), "same picture, smaller"), pairs[1], pairs[2],
            (pairs[2][0].filter(ImageFilter.GaussianBlur(0.5)), "same picture, blurred"), pairs[3]]
    return synthetic.make_batch(rows, shard_id=shard_id)


def test_dedup_near_drops_resized_and_blurred_copies_across_shards():
    stage = build("dedup_near", method="phash", max_distance=6)
    assert stage.ordered
    a = stage.process(near_duplicate_batch())
    assert [k for _, k in statuses(a)] == [None, "dedup_near", None, None, "dedup_near", None]
    assert a["near_group"][1] == a[schema.KEY][0] and a["near_group"][4] == a[schema.KEY][3]
    assert all(len(h) == 16 for h in a["phash"])
    b = stage.process(near_duplicate_batch(shard_id=1))  # the same images again in the next shard
    assert [k for _, k in statuses(b)] == ["dedup_near"] * 6
    assert b["near_group"] == [a[schema.KEY][g] for g in (0, 0, 2, 3, 3, 5)]


def test_dedup_near_resume_rebuilds_the_index():
    straight = build("dedup_near", method="dhash", max_distance=6)
    straight.process(near_duplicate_batch())
    expected = straight.process(near_duplicate_batch(shard_id=1))
    written = {k: v for k, v in build("dedup_near", method="dhash", max_distance=6).process(near_duplicate_batch()).items()
               if k != schema.FILES}
    resumed = build("dedup_near", method="dhash", max_distance=6)
    resumed.resume(written)
    assert statuses(resumed.process(near_duplicate_batch(shard_id=1))) == statuses(expected)


def test_dedup_near_on_clip_embeddings():
    b = batch(4)
    vectors = np.array([[1, 0, 0], [0.99, 0.14, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float16)
    for files, v in zip(b[schema.FILES], vectors):
        buf = io.BytesIO()
        np.save(buf, v)
        files["clip.npy"] = buf.getvalue()
    stage = build_filters([{"clip_score": {"pretrained": "random", "store_embeddings": True}},
                           {"dedup_near": {"method": "clip", "scope": "shard", "min_cosine": 0.95}}])[1]
    out = stage.process(b)
    assert [k for _, k in statuses(out)] == [None, "dedup_near", None, None]
    assert out[schema.ERROR_MESSAGE][1].startswith("clip cosine 0.99")
    assert not stage.ordered


def test_undecodable_images_fail_alone():
    b = batch(3)
    b[schema.FILES][1] = {"jpg": b"\xff\xd8\xff not really a jpeg"}
    out = build("dedup_near").process(b)
    assert [s for s, _ in statuses(out)] == ["pending", "failed_to_resize", "pending"]
    assert out[schema.ERROR_KIND][1] == "decode_error"

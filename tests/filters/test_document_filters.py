"""The real filters on interleaved documents, each through SegmentStage over its document_view:
per image (CLIP score of each image against its nearest text or MMC4's matched one, sizes, exact
and near dedup across documents and shards, the CLIP heads and semantic dedup on the shared
embedding kept per slot), per document (caption, language) and on the document row
(image_count); percentile rules prepared on views of document sample batches; ordered stages
resumed from a document shard written by the real sink (its document column read back as a
struct or as JSON text); per-image scores in the segments of KEY.json."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from filters import build_filters
from helpers.documents import document_batch, jpeg
from filters.clip_score import IMAGE_EMBEDDING
from pipeline.core import document as doc
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.document import DocumentRule, for_documents
from pipeline.core.stage import JobContext
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.clip_heads import aesthetic_state, nsfw_state, save_head
from pipeline.testing.output import write_shards

torch.set_num_threads(2)
CLIP = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS)}
PAIRS = synthetic.make_pairs(16, seed=424242, size=48)  # held out from the tiny CLIP's training
IMAGES, CAPTIONS = [im for im, _ in PAIRS], [c for _, c in PAIRS]
WRONG = synthetic.shuffled_captions(CAPTIONS, 424242)


def wrapped(entries, rule=DocumentRule(), check=True):
    return [for_documents(s, rule) for s in build_filters(entries, check=check, documents=True)]


def run(stages, batch):
    for stage in stages:
        batch = stage.process(batch)
    return batch


def slots(batch, i):
    return doc.image_slots(batch[schema.DOCUMENT][i])


def field(batch, name):
    """Per document, per image slot, the segment's ``name``."""
    return [[s.get(name) for s in doc.image_slots(d)] for d in batch[schema.DOCUMENT]]


def context(batches, before=()):
    """As the job's sample pass: the first documents, through the (wrapped) stages before."""
    def sample_batches(n_rows):
        for b in batches:
            yield run(before, {k: list(v[:n_rows]) for k, v in b.items()})
    return JobContext(sample_batches)


def written(tmp_path, batch, stages, as_json=False):
    """``batch`` written by the real WebDataset sink, its status table read back (an ordered
    stage's resume sees that); ``as_json``: the document column as JSON text."""
    out = {k: v for k, v in batch.items() if k != IMAGE_EMBEDDING}
    if as_json:
        out[schema.DOCUMENT] = [json.dumps(d) for d in out[schema.DOCUMENT]]
    types = {c: t for s in stages for c, t in s.columns.items()}
    sink = write_shards(tmp_path, [out], column_types=types)
    return sink.read_status(0), tmp_path


# -- CLIP score against the nearest text -----------------------------------------------------------
@pytest.fixture(scope="module")
def pair_scores():
    """Each image's score with its own caption and with a wrong one, scored as plain pairs."""
    [stage] = build_filters([{"clip_score": CLIP}], check=True)
    right = stage.process(synthetic.make_batch(list(zip(IMAGES, CAPTIONS))))["clip_score"]
    wrong = stage.process(synthetic.make_batch(list(zip(IMAGES, WRONG))))["clip_score"]
    return right, wrong


def mixed(k, second=WRONG):
    """Image k next to its caption, image k + 1 next to ``second[k + 1]``, a filler text between."""
    return [IMAGES[k], CAPTIONS[k], "filler words", second[k + 1], IMAGES[k + 1]]


def test_each_image_is_scored_against_its_nearest_text_or_its_matched_one(pair_scores):
    right, wrong = pair_scores
    docs = [mixed(0),                                                 # image 1: its nearest text is a wrong one
            [CAPTIONS[2], "filler words", WRONG[3], (IMAGES[2], 0), (IMAGES[3], 2)]]  # MMC4's matches
    b = run(wrapped([{"clip_score": CLIP}]), document_batch(docs))
    got = field(b, "clip_score")
    assert got[0] == pytest.approx([right[0], wrong[1]], abs=1e-5)
    assert got[1] == pytest.approx([right[2], wrong[3]], abs=1e-5)
    assert "clip_score" not in b  # a field of each image, not a document column


def test_a_min_score_drops_mismatched_images_and_then_documents_under_min_images(pair_scores):
    right, wrong = pair_scores
    cut = (min(right[:4]) + max(wrong[:4])) / 2
    docs = [mixed(0), mixed(2, CAPTIONS)]
    b = run(wrapped([{"clip_score": {**CLIP, "min": cut}}], DocumentRule(min_images=2)), document_batch(docs))
    assert field(b, schema.STATUS) == [["success", "filtered"], ["success", "success"]]
    assert list(zip(b[schema.STATUS], b[schema.ERROR_KIND])) == [("filtered", "clip_score"), ("pending", None)]
    assert b[schema.ERROR_MESSAGE][0] == "1 of its 2 images left, fewer than min_images=2"
    assert slots(b, 0)[1]["clip_score"] == pytest.approx(wrong[1], abs=1e-5)  # why it went: kept with it


def test_top_fraction_is_prepared_on_views_of_document_sample_batches(pair_scores):
    right, wrong = pair_scores
    docs = [mixed(k) for k in range(0, 8, 2)]
    [stage] = wrapped([{"clip_score": {**CLIP, "top_fraction": 0.5, "sample_size": 3}}])
    state = stage.prepare(context([document_batch(docs)]))
    scores = [s for k in range(0, 6, 2) for s in (right[k], wrong[k + 1])]  # the 3 sampled documents' images
    assert state["sample_size"] == 6
    assert state["threshold"] == pytest.approx(float(np.quantile(scores, 0.5)), abs=1e-5)
    stage.restore(state)
    b = stage.process(document_batch(docs))
    assert field(b, schema.STATUS) == [["success", "filtered"]] * 4


# -- per document and per image rules ----------------------------------------------------------------
def test_size_rules_judge_each_image_and_text_rules_the_whole_text():
    tall = IMAGES[0].resize((30, 120))
    docs = [["there is a red circle in the middle of the picture", IMAGES[0],
             "and it stands on a grey background with nothing else around it", tall], ["two words", IMAGES[1]]]
    b = run(wrapped([{"image_size": {"min_side": 40}}, {"aspect_ratio": {"max": 3}},
                     {"caption": {"min_words": 5}}, {"language": {"languages": ["en"]}}]), document_batch(docs))
    assert field(b, schema.ERROR_KIND) == [[None, "image_size"], [None]]
    assert list(zip(b[schema.STATUS], b[schema.ERROR_KIND])) == [("pending", None), ("filtered", "caption")]
    assert b["language"][0] == "en" and b["language_score"][0] > 0.5


def test_image_count_counts_the_images_left_by_the_filters_before_it():
    docs = [["a", IMAGES[0], IMAGES[1].resize((20, 20)), None], ["b", IMAGES[2], IMAGES[3]], ["c"]]
    b = run(wrapped([{"image_size": {"min_side": 40}}, {"image_count": {"min": 2, "max": 2}}],
                    DocumentRule(min_images=0)), document_batch(docs))
    assert b["image_count"] == [1, 2, 0]
    assert list(zip(b[schema.STATUS], b[schema.ERROR_KIND])) == [
        ("filtered", "image_count"), ("pending", None), ("filtered", "image_count")]
    assert b[schema.ERROR_MESSAGE][0] == "1 images kept, fewer than min 2"
    with pytest.raises(ConfigError, match=r"filters\[1\]\.image_count: applies to interleaved documents only"):
        build_filters([{"caption": {}}, {"image_count": {}}], documents=False)
    with pytest.raises(ConfigError, match=r"filters\[0\]\.image_count\.max: 1 is below min 2"):
        build_filters([{"image_count": {"min": 2, "max": 1}}])
    [count] = build_filters([{"image_count": {"min": 1}}])  # a pair reaching it anyway: its one image
    pairs = synthetic.make_batch(PAIRS[:2])
    pairs[schema.FILES][1] = {}
    assert count.process(pairs)["image_count"] == [1, 0] and pairs[schema.ERROR_KIND] == [None, "image_count"]


# -- dedup across documents, shards and resumes --------------------------------------------------------
SHARD_0 = [["a", IMAGES[0], IMAGES[1]], ["b", IMAGES[2], IMAGES[0]]]
SHARD_1 = [["c", IMAGES[1], IMAGES[3]], ["d", IMAGES[2], IMAGES[4]]]


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("entry, group", [({"dedup_exact": {}}, "exact_group"),
                                          ({"dedup_near": {"method": "phash"}}, "near_group")])
def test_dedup_runs_over_every_image_of_the_job_and_resumes_from_a_written_document_shard(
        tmp_path, entry, group, as_json):
    rule = DocumentRule(min_images=1)
    [stage] = wrapped([entry], rule)
    first = stage.process(document_batch(SHARD_0))
    assert field(first, schema.ERROR_KIND) == [[None, None], [None, stage.name]]
    assert slots(first, 1)[1][group] == "000000000_i000"  # the kept one: document 0's first image
    table, _ = written(tmp_path, first, [stage], as_json)
    assert isinstance(table[schema.DOCUMENT][0], str if as_json else dict)
    expected = stage.process(document_batch(SHARD_1, shard_id=1))
    assert field(expected, schema.ERROR_KIND) == [[stage.name, None], [stage.name, None]]
    [resumed] = wrapped([entry], rule)
    resumed.resume(table)  # a new run: shard 0 already complete
    again = resumed.process(document_batch(SHARD_1, shard_id=1))
    assert field(again, schema.ERROR_KIND) == field(expected, schema.ERROR_KIND)
    assert field(again, group) == field(expected, group) == [["000000000_i001", "000010000_i001"],
                                                             ["000000001_i000", "000010001_i001"]]


# -- the shared CLIP embedding: heads and semantic dedup -----------------------------------------------
def near_copy(image):
    return Image.open(io.BytesIO(jpeg(image, 40))).convert("RGB")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    save_head(root / "nsfw.pth", nsfw_state(64, seed=2))
    return save_head(root / "aesthetic.pth", aesthetic_state(64, seed=1))


def shared_entries(head):
    return [{"aesthetic": {"checkpoint": str(head), **CLIP}},
            {"nsfw": {"checkpoint": str(head.parent / "nsfw.pth"), **CLIP}},
            {"semantic_dedup": {**CLIP, "threshold": 0.88, "n_clusters": 1, "sample_size": 4}}]


def test_the_clip_heads_and_semantic_dedup_read_each_slot_s_shared_embedding(tmp_path, head):
    ims = [im for im, _ in synthetic.make_pairs(6, seed=7, size=96)]
    shard_0 = [["a", ims[0], None, ims[1]], ["b", ims[2], near_copy(ims[0])]]
    shard_1 = [["c", near_copy(ims[1]), ims[3]], ["d", ims[4], near_copy(ims[2])]]
    stages = wrapped(shared_entries(head))
    assert [s.name for s in stages] == ["clip_score", "aesthetic", "nsfw", "semantic_dedup"]
    state = stages[3].prepare(context([document_batch(shard_0)], stages[:3]))
    assert state["sample_size"] == 4  # the sampled documents' live images
    stages[3].restore(state)
    first = run(stages, document_batch(shard_0))
    assert sorted(first[IMAGE_EMBEDDING][0]) == [0, 2] and sorted(first[IMAGE_EMBEDDING][1]) == [0]  # per slot

    plain = build_filters(shared_entries(head)[:2], check=True)
    pairs = run(plain, synthetic.make_batch([(im, "") for im in (ims[0], ims[1], ims[2])], quality=95))
    for score in ("aesthetic_score", "nsfw_score"):
        assert [field(first, score)[0][k] for k in (0, 2)] == pytest.approx(pairs[score][:2], abs=1e-4)
    assert field(first, schema.ERROR_KIND) == [[None, "http_status", None], [None, "semantic_dedup"]]
    assert slots(first, 1)[1]["semantic_group"] == "000000000_i000"

    table, out = written(tmp_path, first, stages)
    assert set(doc.unpack_slots(table["semantic_embedding"][0])) == {0, 2}  # binary: job state, per slot
    with tarfile.open(out / "00000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert "semantic_embedding" not in meta and "semantic_embedding" not in meta["document"]["segments"][1]
    assert meta["document"]["segments"][1]["aesthetic_score"] == pytest.approx(field(first, "aesthetic_score")[0][0])

    expected = run(stages, document_batch(shard_1, shard_id=1))
    assert field(expected, schema.ERROR_KIND) == [["semantic_dedup", None], [None, "semantic_dedup"]]
    resumed = wrapped(shared_entries(head))
    resumed[3].restore(json.loads(json.dumps(state)))
    resumed[3].resume(table)
    again = run(resumed, document_batch(shard_1, shard_id=1))
    assert field(again, "semantic_group") == field(expected, "semantic_group")
    assert field(again, schema.ERROR_KIND) == field(expected, schema.ERROR_KIND)


def test_a_clip_pass_replaces_the_embeddings_of_the_slots_it_saw(head):
    stages = wrapped(shared_entries(head)[:1] + [{"image_size": {"min_side": 60}}])
    assert [s.name for s in stages] == ["clip_score", "aesthetic", "image_size"]
    b = run(stages, document_batch([["a", IMAGES[0].resize((96, 96)), IMAGES[1]]]))
    assert sorted(b[IMAGE_EMBEDDING][0]) == [0]  # the filtered slot 1 no longer carries one
    again = run(stages[:2], b)  # a second pass sees slot 0 only
    assert sorted(again[IMAGE_EMBEDDING][0]) == [0]
    assert np.allclose(again[IMAGE_EMBEDDING][0][0], b[IMAGE_EMBEDDING][0][0])


def test_near_dedup_on_stored_clip_embeddings_reads_each_slot_s_member():
    stages = wrapped([{"clip_score": {**CLIP, "store_embeddings": True}},
                      {"dedup_near": {"method": "clip", "scope": "shard", "min_cosine": 0.99}}])
    b = run(stages, document_batch([["a", IMAGES[0], IMAGES[1]], ["b", IMAGES[2], IMAGES[1]]]))
    assert field(b, schema.ERROR_KIND) == [[None, None], [None, "dedup_near"]]
    assert slots(b, 1)[1][schema.ERROR_MESSAGE].endswith("with 000000000_i001")
    assert sorted(b[schema.FILES][1]) == ["image_000.clip.npy", "image_000.jpg"]


# -- watermark ------------------------------------------------------------------------------------------
def test_watermark_scores_each_image_and_an_undecodable_one_fails_alone(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    save_file(timm.create_model("test_efficientnet", pretrained=False, num_classes=2).state_dict(),
              tmp_path / "wm.safetensors")
    entry = {"watermark": {"model": "test_efficientnet", "checkpoint": str(tmp_path / "wm.safetensors"),
                           "image_size": 64, "device": "cpu"}}
    b = document_batch([["a", IMAGES[0], IMAGES[1]], ["b", IMAGES[2], IMAGES[3]]])
    b[schema.FILES][1]["image_000.jpg"] = b"\xff\xd8\xff\xe0 not a jpeg"
    out = run(wrapped([entry]), b)
    pairs = run(build_filters([entry], check=True), synthetic.make_batch(PAIRS[:4]))
    scores = field(out, "watermark_score")
    assert [scores[0][0], scores[0][1], scores[1][1]] == pytest.approx(
        [pairs["watermark_score"][k] for k in (0, 1, 3)], abs=1e-5)
    assert slots(out, 1)[0][schema.STATUS] == schema.FAILED_TO_DECODE and scores[1][0] is None
    assert out[schema.STATUS] == [schema.PENDING, schema.PENDING]  # one image left is enough (min_images 1)
    assert sorted(out[schema.FILES][1]) == ["image_001.jpg"]


# -- KEY.json --------------------------------------------------------------------------------------------
def test_per_image_scores_reach_key_json(tmp_path, pair_scores):
    stages = wrapped([{"clip_score": CLIP}, {"dedup_exact": {}}])
    b = run(stages, document_batch([[CAPTIONS[0], IMAGES[0], None, CAPTIONS[1], IMAGES[1]]]))
    write_shards(tmp_path, [b], column_types={c: t for s in stages for c, t in s.columns.items()})
    with tarfile.open(tmp_path / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert sorted(names) == ["000000000.image_000.jpg", "000000000.image_002.jpg", "000000000.json",
                             "000000000.txt"]
    images = doc.image_slots(meta["document"])
    assert [s.get("clip_score") for s in images] == pytest.approx([pair_scores[0][0], None, pair_scores[0][1]],
                                                                  abs=1e-5)
    assert [s.get("exact_group") for s in images] == ["000000000_i000", None, "000000000_i002"]

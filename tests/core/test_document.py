"""The document contract (pipeline/core/document.py): nearest texts, views of a document batch,
merging a real filter's work back (failed slots kept, members dropped, fields in the segments,
per-slot members), the document rule naming the filter that dropped a document, the text and
document views, wrapping by document_view, pickling and the per-slot binary framing."""
import copy
import json
import pickle

import pytest
from filters import build_filters
from pipeline.core import document as doc
from pipeline.core import schema
from pipeline.core.document import DocumentRule, SegmentStage, for_documents
from helpers.documents import document_batch
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS

IMAGES = [im for im, _ in synthetic.make_pairs(6, seed=3, size=64)]


def run(entry, batch, rule=DocumentRule()):
    [stage] = build_filters([entry])
    return for_documents(stage, rule).process(batch)


def slots(batch, i):
    return doc.image_slots(batch[schema.DOCUMENT][i])


def small(size=40):
    return IMAGES[5].resize((size, size))


# -- reading ---------------------------------------------------------------------------------------
def test_nearest_text_is_text_index_else_the_closest_text_the_following_on_a_tie():
    d = {"segments": [{"type": "text", "text": "first"}, {"type": "image"}, {"type": "text", "text": "second"},
                      {"type": "text", "text": ""}, {"type": "image"}, {"type": "image", "text_index": 0},
                      {"type": "image", "text_index": 1}]}
    images = doc.image_slots(d)
    assert doc.nearest_text(d, images[0]) == "second"    # one away on both sides: the following one
    assert doc.nearest_text(d, images[1]) == "second"    # empty texts do not count
    assert doc.nearest_text(d, images[2]) == "first"     # MMC4's matched text
    assert doc.nearest_text(d, images[3]) == "second"    # a text_index on an image: the closest text
    with pytest.raises(ValueError, match="not a segment of this document"):
        doc.nearest_text(d, {"type": "image"})
    lone = {"segments": [{"type": "image"}]}
    assert doc.nearest_text(lone, doc.image_slots(lone)[0]) is None


def test_a_document_read_back_as_json_text_is_the_same_document():
    d = {"segments": [{"type": "text", "text": "a"}], "source": "x"}
    assert doc.as_document(json.dumps(d)) == d and doc.as_document(d) is d and doc.as_document(None) == {}


def test_the_image_view_holds_live_images_with_their_nearest_text_sizes_and_members():
    b = document_batch([["a red circle", IMAGES[0], None, "a blue square", IMAGES[1]], ["no images here"]])
    v = doc.view(b, "image")
    assert v.batch[schema.KEY] == ["000000000_i000", "000000000_i002"]  # the dead slot 1 is not a row
    assert v.origin == [(0, 0), (0, 2)]
    assert v.batch[schema.CAPTION] == ["a red circle", "a blue square"]  # the closest text
    assert v.batch[schema.FILES][1] == {"jpg": b[schema.FILES][0]["image_002.jpg"]}
    assert v.batch[schema.ORIGINAL_WIDTH] == [64, 64] and v.batch[schema.STATUS] == ["pending"] * 2


def test_a_document_given_as_json_text_is_changed_as_a_dict_and_a_pair_batch_is_refused():
    b = document_batch([["text", IMAGES[0], small()]])
    b[schema.DOCUMENT][0] = json.dumps(b[schema.DOCUMENT][0])
    out = run({"image_size": {"min_side": 50}}, b)
    assert [s[schema.STATUS] for s in slots(out, 0)] == ["success", "filtered"]
    pairs = synthetic.make_batch(synthetic.make_pairs(2))
    with pytest.raises(ValueError, match="the image view of documents needs document rows: the batch has no"):
        run({"image_size": {}}, pairs)


# -- the document rule -----------------------------------------------------------------------------
def test_a_rejected_image_stays_a_slot_without_members_and_the_document_goes_on():
    b = run({"image_size": {"min_side": 50}}, document_batch([["text", IMAGES[0], small(), "more", IMAGES[1]]]))
    assert [s[schema.STATUS] for s in slots(b, 0)] == ["success", "filtered", "success"]
    assert slots(b, 0)[1][schema.ERROR_KIND] == "image_size" and "member" not in slots(b, 0)[1]
    assert "shorter side below 50" in slots(b, 0)[1][schema.ERROR_MESSAGE]
    assert sorted(b[schema.FILES][0]) == ["image_000.jpg", "image_002.jpg"]
    assert b[schema.STATUS] == ["pending"]


def test_a_document_under_min_images_is_filtered_by_the_filter_that_dropped_its_images():
    docs = [["text", IMAGES[0], small()], ["text", IMAGES[1], IMAGES[2]], ["text", small(), small()]]
    b = run({"image_size": {"min_side": 50}}, document_batch(docs), DocumentRule(min_images=2))
    assert list(zip(b[schema.STATUS], b[schema.ERROR_KIND])) == [
        ("filtered", "image_size"), ("pending", None), ("filtered", "image_size")]
    assert b[schema.ERROR_MESSAGE][0] == "1 of its 2 images left, fewer than min_images=2"
    assert b[schema.FILES][0] == {} and len(b[schema.FILES][1]) == 2
    strict = run({"image_size": {"min_side": 50}}, document_batch(docs[:1]), DocumentRule(all_images=True))
    assert (strict[schema.ERROR_KIND][0], strict[schema.ERROR_MESSAGE][0]) == ("image_size", "1 of its 2 images failed")


def test_a_download_failure_under_the_rule_is_too_few_images():
    b = document_batch([["text", None, IMAGES[0]], ["text", IMAGES[1]]])
    assert not doc.enforce(b, 0, DocumentRule(min_images=2)) and doc.enforce(b, 1, DocumentRule())
    assert (b[schema.STATUS][0], b[schema.ERROR_KIND][0]) == (schema.FAILED_TO_DOWNLOAD, "too_few_images")
    assert b[schema.ERROR_MESSAGE][0] == "1 of its 2 images left, fewer than min_images=2"


def test_a_failed_document_is_left_alone_by_later_stages():
    b = document_batch([["text", IMAGES[0], small()]])
    schema.reject(b, 0, "language", "not en")
    out = run({"image_size": {"min_side": 50}}, b)
    assert [s[schema.STATUS] for s in slots(out, 0)] == ["success", "success"]  # never viewed
    assert out[schema.ERROR_KIND] == ["language"]


# -- merging ---------------------------------------------------------------------------------------
def test_columns_become_segment_fields_and_name_the_slot_that_was_kept():
    b = run({"dedup_exact": {"scope": "shard"}}, document_batch([["a", IMAGES[0], IMAGES[1], IMAGES[0]]]))
    seg = slots(b, 0)
    assert [s.get("exact_group") for s in seg] == ["000000000_i000", "000000000_i001", "000000000_i000"]
    assert (seg[2][schema.STATUS], seg[2][schema.ERROR_MESSAGE]) == ("filtered", "same bytes as 000000000_i000")
    assert "exact_group" not in b  # not a column of the document row
    json.dumps(b[schema.DOCUMENT][0])  # what KEY.json holds stays JSON-able


def test_a_stage_s_new_files_become_the_slot_s_members():
    tiny = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS)}
    b = run({"clip_score": {**tiny, "store_embeddings": True}}, document_batch([["a", IMAGES[0], None, IMAGES[1]]]))
    assert sorted(b[schema.FILES][0]) == ["image_000.clip.npy", "image_000.jpg", "image_002.clip.npy",
                                          "image_002.jpg"]
    assert isinstance(slots(b, 0)[0]["clip_score"], float) and "clip_score" not in slots(b, 0)[1]


def test_the_document_view_judges_the_whole_text_and_sets_document_columns():
    docs = [["a red", IMAGES[0], "circle on grey"], ["hi", IMAGES[1]], ["Der Hund spielt im Garten mit dem Ball."]]
    b = run({"caption": {"min_words": 4}}, document_batch(docs))
    assert [k for k in b[schema.ERROR_KIND]] == [None, "caption", None]
    assert b[schema.ERROR_MESSAGE][1] == "1 words, fewer than 4"
    lang = run({"language": {"languages": ["de"]}}, document_batch(docs))
    assert lang["language"][2] == "de" and lang[schema.ERROR_KIND][2] is None
    assert lang[schema.ERROR_KIND][0] == "language" and lang["language"][0] is not None  # recorded when rejected


def test_a_text_segment_rejected_alone_drops_the_document():
    [caption] = build_filters([{"caption": {"min_words": 2}}])
    b = SegmentStage(caption, "text").process(document_batch([["two words", IMAGES[0], "one"], ["three more words"]]))
    assert list(zip(b[schema.STATUS], b[schema.ERROR_KIND])) == [("filtered", "caption"), ("pending", None)]


def test_stages_are_wrapped_by_their_document_view():
    stages = build_filters([{"image_size": {}}, {"caption": {}}, {"language": {}}, {"image_count": {}}])
    wrapped = [for_documents(s) for s in stages]
    assert [getattr(w, "over", None) for w in wrapped] == ["image", "document", "document", None]
    assert wrapped[3] is stages[3]
    assert wrapped[2].columns == stages[2].columns and wrapped[0].columns == {}
    with pytest.raises(ValueError, match="over must be 'image', 'text' or 'document', got 'images'"):
        SegmentStage(stages[0], "images")


def test_a_wrapped_stage_pickles_and_copies_with_its_state():
    [dedup] = build_filters([{"dedup_exact": {}}])
    stage = SegmentStage(dedup, "image", DocumentRule(min_images=2))
    stage.process(document_batch([["a", IMAGES[0], IMAGES[1]]]))
    for other in (pickle.loads(pickle.dumps(stage)), copy.deepcopy(stage), stage.driver_copy()):
        assert other.rule == DocumentRule(min_images=2) and other.ordered and other.name == "dedup_exact"
        assert other.first == stage.first  # delegated to the wrapped stage
        b = other.process(document_batch([["b", IMAGES[0], IMAGES[2]]], shard_id=1))
        assert b[schema.ERROR_KIND] == ["dedup_exact"]  # its one new image is below min_images


def test_slot_values_are_framed_and_read_back():
    values = {0: b"", 3: b"\x00\x01", 12: bytes(range(256))}
    assert doc.unpack_slots(doc.pack_slots(values)) == values and doc.unpack_slots(None) == {}


def test_settling_makes_pending_images_of_successful_documents_successes():
    b = document_batch([["a", IMAGES[0], None], ["b", IMAGES[1]]])
    for i in (0, 1):
        slots(b, i)[0][schema.STATUS] = schema.PENDING
    b[schema.STATUS] = [schema.SUCCESS, schema.FILTERED]
    doc.settle_segments(b)
    assert [s[schema.STATUS] for s in slots(b, 0)] == ["success", "failed_to_download"]
    assert slots(b, 1)[0][schema.STATUS] == "pending"


def test_image_member_keys_keep_webdataset_s_no_dot_rule():
    assert doc.image_member(7, "jpg") == "image_007.jpg" and doc.text_member(0, "txt") == "text_000.txt"
    assert doc.view_key("000010001", "image", 3) == "000010001_i003"
    assert doc.view_key("000010001", "text", 12) == "000010001_t012"


def test_unfetched_gives_the_document_as_its_reader_gave_it():
    written = json.dumps({"segments": [
        {"type": "text", "text": "t"},
        {"type": "image", "url": "http://a/1.jpg", "alt": "x", "status": "success", "member": "image_000.jpg",
         "width": 8, "sha256": "ab", "clip_score": 0.3},
        {"type": "image", "url": "ftp://a/2.jpg", "status": "invalid_input", "error_kind": "bad_scheme"}]})
    fresh = doc.unfetched(written, {"status", "error_kind", "member", "width", "sha256", "clip_score"})
    assert doc.image_slots(fresh) == [{"type": "image", "url": "http://a/1.jpg", "alt": "x"},
                                      {"type": "image", "url": "ftp://a/2.jpg", "status": "invalid_input",
                                       "error_kind": "bad_scheme"}]

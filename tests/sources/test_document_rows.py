"""Document rows through the shard planner: the page URL is no media URL, a row that is no
document fails alone (malformed_row), an image with a bad URL fails alone and stays in its
document (invalid_input with the URL's kind), text segments are made text."""
from __future__ import annotations

from pipeline.core import document as doc
from pipeline.sources.shards import plan_shards


def plan(documents: list, urls=None) -> dict[str, list]:
    chunk = {"url": urls or [None] * len(documents), "document": documents}
    (shard,) = plan_shards([chunk], samples_per_shard=100)
    return shard.batch


def image(url) -> dict:
    return {"type": "image", "url": url}


def test_a_document_row_needs_no_media_url():
    batch = plan([{"segments": [image("https://a.example/1.jpg"), {"type": "text", "text": "hi"}]}],
                 urls=[None])
    assert batch["status"] == ["pending"] and batch["url"] == [None]
    assert doc.image_slots(batch["document"][0])[0]["status"] == "pending"
    assert doc.live_images(batch["document"][0]) == [0]


def test_rows_that_are_not_documents_are_malformed():
    batch = plan([None, "text", {"segments": "no list"}, {"pages": []}, {"segments": []},
                  {"segments": [{"type": "text", "text": ""}]}, {"segments": [{"type": "video", "url": "x"}]},
                  {"segments": [{"type": "text", "text": "ok"}]}])
    assert batch["status"] == ["invalid_input"] * 7 + ["pending"]
    assert batch["error_kind"][:7] == ["malformed_row"] * 7
    assert "not a document with a segments list" in batch["error_message"][0]
    assert batch["error_message"][4] == batch["error_message"][5] == "the document has no image and no text"
    assert "segment 0 is not a text or an image" in batch["error_message"][6]


def test_an_image_with_a_bad_url_fails_alone_and_stays_in_its_document():
    urls = [None, "  ", "ftp://a.example/1.jpg", "http://[::1/x.jpg", "http://a.example:port/x.jpg", "http:///x.jpg",
            12345, "https://ok.example/2.jpg"]
    (document,) = plan([{"segments": [*map(image, urls), {"type": "text", "text": "caption"}]}])["document"]
    slots = doc.image_slots(document)
    assert [s["error_kind"] for s in slots] == ["missing_url", "missing_url", "bad_scheme", "bad_url", "bad_url",
                                                "bad_url", "bad_url", None]
    assert [s["status"] for s in slots] == ["invalid_input"] * 7 + ["pending"]
    assert slots[6]["url"] == "12345" and "holds a int" in slots[6]["error_message"]
    assert doc.live_images(document) == [7] and len(doc.segments(document)) == 9


def test_text_segments_are_made_text():
    (document,) = plan([{"segments": [{"type": "text", "text": 42}, {"type": "text", "text": None},
                                      {"type": "text", "text": ["a", "b"]}, image("https://a.example/1.jpg")]}])["document"]
    assert [s["text"] for s in doc.text_slots(document)] == ["42", "", '["a", "b"]']


def test_a_reader_problem_is_the_rows_malformed_row():
    chunk = {"url": [None, None], "document": [None, {"segments": [image("https://a.example/1.jpg")]}],
             "_invalid": ["'texts' is not a list: 3", None]}
    (shard,) = plan_shards([chunk], samples_per_shard=10)
    assert shard.batch["error_kind"] == ["malformed_row", None]
    assert shard.batch["error_message"][0] == "'texts' is not a list: 3"

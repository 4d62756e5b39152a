"""Document readers (reader.layout: document) on files in the published OBELICS, MMC4 and
OmniCorpus-CC layouts: one row per document, segments in reading order, image slots, MMC4's
image-to-sentence placement; the pair layout of the same cards; bad rows as per-row statuses."""
from __future__ import annotations

import copy
import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from catalogs import CARD_DIR, load_card
from catalogs.card import Card
from catalogs.readers import read_rows
from pipeline.core import document as doc
from pipeline.core.config import ConfigError, from_dict
from pipeline.sources.shards import plan_shards
from pipeline.testing.documents import (DEFAULT_DOCUMENTS, Doc, Img, mmc4_document, reading_order,
                                        write_mmc4_jsonl, write_obelics_parquet, write_omnicorpus_parquet)

BASE = "http://127.0.0.1:9/img"
INPUT = types.SimpleNamespace(url_col="url", caption_col="caption", save_additional_columns=[], format=None)


def read(card: str, files, documents=None, **spec) -> dict[str, list]:
    out: dict[str, list] = {}
    inp = types.SimpleNamespace(**{**vars(INPUT), **spec})
    for chunk in read_rows(load_card(card), [str(f) for f in files], inp, batch_rows=2, documents=documents):
        n = len(next(iter(chunk.values())))
        before = len(next(iter(out.values()))) if out else 0
        for k in set(out) | set(chunk):
            out.setdefault(k, [None] * before).extend(chunk.get(k, [None] * n))
    return out


def order(document: dict) -> list[tuple[str, str]]:
    return [(s["type"], s["text"] if s["type"] == "text" else s["url"]) for s in doc.segments(document)]


def shard_of(rows: dict[str, list]) -> dict[str, list]:
    (shard,) = plan_shards([rows], samples_per_shard=100)
    return shard.batch


def test_obelics_parquet_gives_documents_in_reading_order(tmp_path):
    rows = read("obelics", [write_obelics_parquet(tmp_path / "train-00000-of-00001.parquet", BASE)])
    assert [order(d) for d in rows["document"]] == [reading_order(d, BASE) for d in DEFAULT_DOCUMENTS]
    assert rows["url"] == [f"{BASE}/{d.page}" for d in DEFAULT_DOCUMENTS] == rows["doc_id"]
    first = rows["document"][0]
    assert [s.get("alt") for s in doc.image_slots(first)] == ["a grey cat", None, "a removed photo"]
    assert first["general_metadata"]["warc_filename"].startswith("crawl-data/")
    assert "caption" not in rows and "_invalid" not in rows
    rows = read("obelics", [tmp_path / "train-00000-of-00001.parquet"],
                save_additional_columns=["general_metadata.warc_record_offset"])
    assert rows["general_metadata.warc_record_offset"] == [0, 1000, 2000, 3000]


def test_the_bundled_samples_read_as_documents():
    from catalogs import SAMPLE_DIR

    rows = read("obelics", sorted((SAMPLE_DIR / "obelics").iterdir()))
    assert [len(doc.image_slots(d)) for d in rows["document"]] == [2, 0]  # the second page has text only
    assert doc.full_text(rows["document"][1]) == "A page with text only."
    (mmc4,) = read("mmc4", sorted((SAMPLE_DIR / "mmc4").iterdir()))["document"]
    assert [s["type"] for s in doc.segments(mmc4)] == ["text", "image", "text", "image", "text"]
    assert [s["url"].rsplit("/", 1)[1] for s in doc.image_slots(mmc4)] == ["index.91.jpg", "index.90.jpg"]


def test_mmc4_images_go_before_their_matched_sentence(tmp_path):
    rows = read("mmc4", [write_mmc4_jsonl(tmp_path / "docs_shard_0.jsonl", BASE)])
    assert [order(d) for d in rows["document"]] == [reading_order(d, BASE) for d in DEFAULT_DOCUMENTS]
    kitchen = rows["document"][1]
    segs = doc.segments(kitchen)
    # flour and dough both matched "Mix flour and water": both before it, in their order
    flour, dough, loaf = doc.image_slots(kitchen)
    assert [flour["source_index"], dough["source_index"], loaf["source_index"]] == [0, 1, 2]
    assert segs[flour["text_index"]]["text"] == segs[dough["text_index"]]["text"] == "Mix flour and water, then knead."
    assert doc.nearest_text(kitchen, loaf) == "Bake for forty minutes."
    assert flour["similarity"] == pytest.approx(0.2) and flour["source_name"].endswith(".jpg")
    assert kitchen["similarity_matrix"][2] == [0.15, 0.15, 0.3]  # row source_index of the matrix
    assert rows["url"][1] == f"{BASE}/kitchen.html"


def test_mmc4_placement_follows_the_match_not_the_list_order(tmp_path):
    line = mmc4_document(Doc("p.html", ["s0", Img("a.jpg"), "s1", Img("b.jpg"), "s2"]), BASE)
    line["image_info"].reverse()  # b (matched to s2) listed before a (matched to s1)
    path = tmp_path / "shard.jsonl"
    path.write_text(json.dumps(line) + "\n")
    (document,) = read("mmc4", [path])["document"]
    assert order(document) == [("text", "s0"), ("image", f"{BASE}/a.jpg"), ("text", "s1"),
                               ("image", f"{BASE}/b.jpg"), ("text", "s2")]
    assert [s["text_index"] for s in doc.image_slots(document)] == [2, 4]
    assert [s["source_index"] for s in doc.image_slots(document)] == [1, 0]


def test_mmc4_zipped_shards_are_read_in_place(tmp_path):
    rows = read("mmc4", [write_mmc4_jsonl(tmp_path / "docs_no_face_shard_3_v3.jsonl.zip", BASE, zipped=True)])
    assert len(rows["document"]) == len(DEFAULT_DOCUMENTS)
    assert order(rows["document"][2]) == reading_order(DEFAULT_DOCUMENTS[2], BASE)


def test_omnicorpus_struct_columns_give_documents(tmp_path):
    rows = read("omnicorpus", [write_omnicorpus_parquet(tmp_path / "train-00000.parquet", BASE)])
    assert [order(d) for d in rows["document"]] == [reading_order(d, BASE) for d in DEFAULT_DOCUMENTS]
    assert rows["doc_id"] == [f"doc-{n:04d}" for n in range(len(DEFAULT_DOCUMENTS))]
    cat = doc.image_slots(rows["document"][0])[0]
    assert (cat["source_width"], cat["source_height"], cat["unsafe"]) == (48, 48, 0.01)
    assert rows["document"][0]["general_metadata"]["fluency_prob"] == 0.9


def test_the_pair_layout_still_gives_one_row_per_image(tmp_path):
    rows = read("obelics", [write_obelics_parquet(tmp_path / "train-0.parquet", BASE)], documents=False)
    images = [i for d in DEFAULT_DOCUMENTS for i in d.images()]
    assert rows["url"] == [f"{BASE}/{i.name}" for i in images]
    assert rows["caption"][:3] == ["a grey cat", None, "a removed photo"]
    assert rows["position"][:3] == [0, 3, 5] and "document" not in rows
    rows = read("mmc4", [write_mmc4_jsonl(tmp_path / "d.jsonl", BASE)], documents=False)
    assert rows["caption"][1:3] == ["It barked at the gate.", "Then it rained."]


def test_a_job_asks_for_a_layout_the_card_does_not_have(tmp_path):
    with pytest.raises(ConfigError, match="download.media: 'document'.*cc3m card has no document reader"):
        read("cc3m", [tmp_path / "x.tsv"], documents=True)
    with pytest.raises(ConfigError, match="omnicorpus card reads documents only; set download.media: document"):
        read("omnicorpus", [tmp_path / "x.parquet"], documents=False)
    with pytest.raises(ConfigError, match="not confirmed"):
        read("mint-1t", [tmp_path / "x.parquet"], documents=True)


def test_a_file_without_the_document_lists_fails_naming_them(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"url": ["http://a/1.jpg"], "caption": ["x"]}), path)
    with pytest.raises(ConfigError, match="has no column 'texts', 'images' that the obelics card reads"):
        read("obelics", [path])


def test_rows_that_are_no_documents_fail_alone(tmp_path):
    images = [[f"{BASE}/a.jpg", None], [f"{BASE}/b.jpg"], [f"{BASE}/c.jpg", None], [None]]
    texts = [[None, "fine"], [None, "extra"], ["both", "x"], ["only text"]]
    path = tmp_path / "train-0.parquet"
    pq.write_table(pa.table({"images": images, "texts": texts, "metadata": ["[]", "[]", "[]", "not json {"],
                             "general_metadata": ['{"url": "http://p/1"}'] * 4}), path)
    batch = shard_of(read("obelics", [path]))
    assert batch["status"] == ["pending", "invalid_input", "invalid_input", "invalid_input"]
    assert batch["error_kind"][1:] == ["malformed_row"] * 3
    assert "differ in length (2 and 1)" in batch["error_message"][1]
    assert "position 0 holds both a text and an image" in batch["error_message"][2]
    assert "'metadata' is not a JSON or Python literal" in batch["error_message"][3]
    line = mmc4_document(Doc("p.html", [Img("a.jpg"), "s0"]), BASE)
    line["image_info"][0]["matched_text_index"] = 7
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps({**line, "text_list": "not a list"}) + "\n")
    batch = shard_of(read("mmc4", [path]))
    assert batch["error_kind"] == ["malformed_row"] * 2
    assert "of image 0 is 7, not the index of one of the document's 1 sentences" in batch["error_message"][0]
    assert "'text_list' is not a list" in batch["error_message"][1]


def test_documents_of_the_default_corpus_become_pending_rows_with_their_dead_urls(tmp_path):
    batch = shard_of(read("obelics", [write_obelics_parquet(tmp_path / "t.parquet", BASE)]))
    assert batch["status"] == ["pending"] * 4 and batch["caption"] == [None] * 4
    slots = [doc.image_slots(d) for d in batch["document"]]
    assert [len(s) for s in slots] == [3, 3, 0, 2]
    assert all(s["status"] == "pending" for d in slots for s in d)  # dead URLs are the download's to find


def _card(**reader) -> dict:
    data = yaml.safe_load((CARD_DIR / "obelics.yaml").read_text())
    data["reader"] = {**data["reader"], **reader}
    return data


@pytest.mark.parametrize("change, message", [
    ({"document": None}, "reader.document: layout 'document' needs a document section"),
    ({"layout": "explode"}, "reader.layout: a document section is read with layout 'document'"),
])
def test_card_reader_layout_rules(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Card, _card(**change))


@pytest.mark.parametrize("change, message", [
    ({"image": {"alt": "metadata[@index].alt_text"}}, "reader.document.image: a document reader must map"),
    ({"image": {"url": "images[@index]", "status": "x"}}, r"reader.document.image: \['status'\] are set by"),
    ({"order": "matched"}, "reader.document.match: order 'matched' needs"),
    ({"match": "images[@index]"}, "reader.document.match: only order 'matched'"),
    ({"columns": {"page": "url"}}, "reader.document.columns: unknown normalised name"),
    ({"texts": "texts[oops"}, "reader.document.texts: unbalanced brackets"),
])
def test_card_document_section_rules(change, message):
    data = _card()
    data["reader"]["document"] = {**copy.deepcopy(data["reader"]["document"]), **change}
    with pytest.raises(ConfigError, match=message):
        from_dict(Card, data)

"""Training sequences of interleaved documents: the real text and image stages run per segment
(SegmentStage over their document views), the sequence stage composes each document in reading
order with its kept images only; the sequences decode back to each text segment's ids and each
kept image's visual ids; the column file of document shards; packing them, resumably."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from helpers.documents import document_batch
from helpers.sequence_fixtures import save_emu3_tokenizer
from helpers.tokenize_fixtures import encode_image, make_batch
from pipeline.core import document as doc
from pipeline.core import schema
from pipeline.core.document import for_documents
from pipeline.loader import ShardDataset
from pipeline.loader.packing import PackedDataset, PackedLoader
from pipeline.media.npy import read_npy
from pipeline.testing.assets import TINY_VQ
from pipeline.testing.output import write_shards
from pipeline.testing.synthetic import make_pairs
from pipeline.tokenize import build_tokenizers
from pipeline.tokenize.sequence import IMAGE, SPECIAL, TEXT, decompose

IMAGES = [im for im, _ in make_pairs(12, seed=11, size=64)]
FIELDS = {"sequence": "sequence.npy", "spans": "spans.npy"}


def documents():
    """Documents in reading order: None is a dead image; image 3 of document 2 is filtered below."""
    im = IMAGES
    return [["a photo of a cat on a red sofa", im[0], "the quick brown fox", None, im[1], "sunset over the sea"],
            [im[2], "", "caption 12 of a dog"],
            ["the lazy dog", None, im[3], "with boats", im[4]],
            [im[5], im[6], "a red sofa"]]


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    return save_emu3_tokenizer(tmp_path_factory.mktemp("emu3") / "tokenizer")


def section(tokenizer, **sequence):
    return {"text": {"tokenizer": str(tokenizer), "add_special_tokens": False, "max_length": None,
                     "truncation": False},
            "image": {"model": str(TINY_VQ), "resolution": 64, "device": "cpu", "batch_size": 4},
            "sequence": sequence}


def on_documents(stages):
    """Each stage as the build runs it on documents: a pair stage over its view, else as it is."""
    return [for_documents(s) for s in stages]


def tokenized(stages, docs, filtered=((2, 1),), shard_id=0):
    batch = document_batch(docs, shard_id)
    for i, slot in filtered:  # a filter rejected this image: it stays a slot, without members
        doc.fail_image(batch, i, slot, schema.FILTERED, "clip_score", "0.1 < min_score")
    for stage in on_documents(stages):
        batch = stage.process(batch)
    return batch


@pytest.fixture(scope="module")
def emu3(emu3_dir):
    stages = build_tokenizers(section(emu3_dir, mapping="emu3"), check=True)
    return stages, tokenized(stages, documents())


def reference_grids(image_stage, images):
    """Each image's visual ids from the image stage run on plain pairs: what its slot must hold."""
    batch = image_stage.process(make_batch([{"jpg": encode_image(im, quality=95)} for im in images]))
    return [read_npy(f["image_ids.npy"]) for f in batch[schema.FILES]]


def expected_segments(row_doc, files):
    """(modality, ids) of the document's texts with ids and its kept images, in reading order."""
    out, text, image = [], 0, 0
    for seg in doc.segments(row_doc):
        if seg["type"] == doc.TEXT:
            ids = read_npy(files[doc.text_member(text, "text_ids.npy")])
            if len(ids):
                out.append((TEXT, ids))
            text += 1
        else:
            if seg[schema.STATUS] in (schema.SUCCESS, schema.PENDING):
                out.append((IMAGE, read_npy(files[doc.image_member(image, "image_ids.npy")])))
            image += 1
    return out


def test_the_stages_declare_their_document_views(emu3):
    stages, _ = emu3
    assert [(s.name, s.document_view) for s in stages] == [
        ("tokenize_text", "text"), ("tokenize_image", "image"), ("tokenize_sequence", None)]


def test_a_document_sequence_holds_its_texts_and_kept_images_in_reading_order(emu3, emu3_dir):
    stages, batch = emu3
    tok = AutoTokenizer.from_pretrained(emu3_dir)
    mapping = stages[2].mapping
    grids = reference_grids(stages[1], IMAGES[:7])
    kept_images = [[0, 1], [2], [4], [5, 6]]  # per document, in reading order: dead and filtered left out
    assert batch[schema.STATUS] == [schema.PENDING] * 4
    for i, parts in enumerate(documents()):
        files, row_doc = batch[schema.FILES][i], batch[schema.DOCUMENT][i]
        seq, spans = read_npy(files["sequence.npy"]), read_npy(files["spans.npy"])
        assert seq.dtype == np.uint16 and batch["sequence_length"][i] == len(seq)
        assert spans[:, 2].tolist().count(SPECIAL) == 2 and spans[0, 2] == spans[-1, 2] == SPECIAL  # bos, eos once
        back = decompose(seq, spans, mapping)
        # the texts decode to the document's texts, in order (an empty one has no span)
        assert [tok.decode(ids.tolist()) for m, ids in back if m == TEXT] == [p for p in parts if p and
                                                                                isinstance(p, str)]
        # the image spans are the kept slots in order, each the visual ids of its own image
        assert [np.array_equal(g, grids[n]) for (m, g), n in
                zip([b for b in back if b[0] == IMAGE], kept_images[i], strict=True)] == [True] * len(kept_images[i])
        want = expected_segments(row_doc, files)
        assert [m for m, _ in back] == [m for m, _ in want]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(back, want))
        live = doc.live_images(row_doc)
        assert sum(1 for m, _ in back if m == IMAGE) == len(live)
        for j, seg in enumerate(doc.image_slots(row_doc)):  # a dead or filtered slot has no member at all
            if j not in live:
                assert not [e for e in files if e.startswith(f"image_{j:03d}.")]
                assert seg[schema.STATUS] in (schema.FAILED_TO_DOWNLOAD, schema.FILTERED)
            else:
                assert seg["image_grid"] == "8x8"
    assert [seg[schema.STATUS] for seg in doc.image_slots(batch[schema.DOCUMENT][0])] == [
        schema.SUCCESS, schema.FAILED_TO_DOWNLOAD, schema.SUCCESS]


def test_a_vocabulary_over_65536_ids_stores_document_sequences_as_uint32(emu3_dir):
    cfg = section(emu3_dir, mapping="offset", vocab_size=70000, visual_offset=69000, boi=68000, eoi=68001,
                  eol=68002)
    stages = build_tokenizers(cfg, check=True)
    batch = tokenized(stages, documents()[:2], filtered=())
    for i in range(2):
        files = batch[schema.FILES][i]
        seq, spans = read_npy(files["sequence.npy"]), read_npy(files["spans.npy"])
        assert seq.dtype == np.uint32 and seq.max() >= 69000
        back, want = decompose(seq, spans, stages[2].mapping), expected_segments(batch[schema.DOCUMENT][i], files)
        assert [m for m, _ in back] == [m for m, _ in want]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(back, want))


def test_a_kept_image_without_ids_or_outside_the_mapping_fails_its_document_naming_the_slot(emu3):
    stages, _ = emu3
    batch = document_batch(documents())
    for stage in on_documents(stages[:2]):
        batch = stage.process(batch)
    del batch[schema.FILES][0]["image_002.image_ids.npy"]  # slot 2 is kept but was never tokenized
    ids = batch[schema.FILES][1]["image_000.image_ids.npy"]
    batch[schema.FILES][1]["image_000.image_ids.npy"] = ids[:-2] + b"\xff\xff"  # visual id 65535
    del batch[schema.FILES][2]["text_001.text_ids.npy"]
    batch = stages[2].process(batch)
    assert batch[schema.STATUS] == [schema.FAILED_TO_PROCESS] * 3 + [schema.PENDING]
    assert batch[schema.ERROR_KIND][:3] == ["stage_error"] * 3
    messages = batch[schema.ERROR_MESSAGE]
    assert "image slot 2" in messages[0] and "image_002.image_ids.npy" in messages[0]
    assert "image slot 0: visual id 65535 is outside the emu3 mapping's 512 visual tokens" in messages[1]
    assert "text slot 1" in messages[2] and "text_001.text_ids.npy" in messages[2]
    assert "sequence.npy" in batch[schema.FILES][3] and batch["sequence_length"][0] is None


def test_pair_rows_are_composed_as_before(emu3):
    stages, _ = emu3
    batch = make_batch([{"jpg": encode_image(IMAGES[0], quality=95)}], ["a photo of a cat on a red sofa"])
    for stage in stages:
        batch = stage.process(batch)
    files = batch[schema.FILES][0]
    (m1, text), (m2, grid) = decompose(read_npy(files["sequence.npy"]), read_npy(files["spans.npy"]),
                                       stages[2].mapping)
    assert (m1, m2) == (TEXT, IMAGE) and np.array_equal(text, read_npy(files["text_ids.npy"]))
    assert np.array_equal(grid, read_npy(files["image_ids.npy"]))


# -- document shards: the column file and packing -------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory, emu3):
    """Two shards of tokenized documents written by the WebDataset sink."""
    stages, _ = emu3
    docs = documents()
    more = [[IMAGES[7], "the quick brown fox jumps over the lazy dog", IMAGES[8]],
            ["sunset", None, IMAGES[9], "boats", IMAGES[10], "a cat", IMAGES[11]]]
    batches = [tokenized(stages, docs), tokenized(stages, more + docs[:1], (), shard_id=1)]
    expected = {}
    for batch in batches:
        for key, files in zip(batch[schema.KEY], batch[schema.FILES]):
            expected[key] = (read_npy(files["sequence.npy"]), read_npy(files["spans.npy"]))
    out = tmp_path_factory.mktemp("docshards") / "out"
    write_shards(out, batches, "documents", stages[2].columns)
    return out, expected


def test_the_column_file_of_document_shards_holds_the_document_fields_only(shards):
    out, expected = shards
    table = pa.ipc.open_file(pa.memory_map(str(out / "00000.columns.arrow"))).read_all()
    assert table.column_names == ["__key__", "sequence.npy", "sequence.npy#shape", "spans.npy", "spans.npy#shape"]
    meta = table.schema.metadata
    assert json.loads(meta[b"not_columnar"]) == []
    assert json.loads(meta[b"slot_members"]) == ["image_NNN.image_ids.npy", "text_NNN.text_ids.npy"]
    with tarfile.open(out / "00000.tar") as tar:  # the per-slot members stay in the tar
        names = tar.getnames()
    assert "000000000.image_002.image_ids.npy" in names and "000000000.text_001.text_ids.npy" in names
    ds = ShardDataset(out, fields=FIELDS, batch_size=2, shuffle=False, columnar=True)
    assert ds.columnar is not None
    got = {}
    for b in ds:
        seq, spans = b["sequence"], b["spans"]
        for n, key in enumerate(b["__key__"]):
            got[key] = (seq["values"][seq["offsets"][n]:seq["offsets"][n + 1]].numpy(),
                        spans["values"][spans["offsets"][n]:spans["offsets"][n + 1]].numpy().reshape(-1, 3))
    assert set(got) == set(expected)
    for key, (seq, spans) in expected.items():
        assert got[key][0].tolist() == seq.tolist() and got[key][1].tolist() == spans.tolist()
    with pytest.raises(ValueError, match=r"image_000\.image_ids\.npy.* per-slot member of documents"):
        ShardDataset(out, fields={"ids": "image_000.image_ids.npy"}, batch_size=2, columnar=True)
    by_tar = ShardDataset(out, fields={"ids": "image_000.image_ids.npy"}, batch_size=2)  # read from the tars
    assert by_tar.columnar is None and "per-slot member" in by_tar.columnar_refused


def packer(out, overflow):
    ds = ShardDataset(out, fields=FIELDS, shuffle=True, seed=1, shuffle_buffer=3)
    return PackedDataset(ds, 48, spans_field="spans", overflow=overflow)


def rows_signature(rows):
    return [(r["__worker__"], r["tokens"].tolist(), r["__keys__"], r["__offsets__"]) for r in rows]


@pytest.mark.parametrize("overflow", ["split", "pad"])
def test_packed_documents_hold_every_token_once_with_their_boundaries(shards, overflow):
    out, expected = shards
    rows = list(PackedLoader(packer(out, overflow)))
    pieces: dict[str, list] = {}
    for row in rows:
        cu, seg, pos = row["cu_seqlens"].tolist(), row["segment_ids"].numpy(), row["position_ids"].numpy()
        for j, (key, offset, a, b) in enumerate(zip(row["__keys__"], row["__offsets__"], cu, cu[1:])):
            assert (seg[a:b] == j + 1).all() and pos[a:b].tolist() == list(range(b - a))  # one document per piece
            pieces.setdefault(key, []).append((offset, row["tokens"][a:b].numpy(), row["modality"][a:b].numpy()))
    assert set(pieces) == set(expected)
    for key, (seq, spans) in expected.items():
        parts = sorted(pieces[key], key=lambda p: p[0])
        assert [p[0] for p in parts] == list(np.cumsum([0] + [len(p[1]) for p in parts[:-1]]))
        assert np.concatenate([p[1] for p in parts]).tolist() == seq.tolist()
        assert np.concatenate([p[2] for p in parts]).tolist() == np.repeat(spans[:, 2], spans[:, 1] - spans[:, 0]
                                                                           ).tolist()


@pytest.mark.parametrize("overflow", ["split", "pad"])
def test_packed_documents_resume_mid_epoch_with_the_same_rows(shards, overflow):
    out, _ = shards
    full = rows_signature(PackedLoader(packer(out, overflow)))
    assert len(full) > 4
    for stop in (1, len(full) // 2, len(full) - 1):
        first, head = PackedLoader(packer(out, overflow)), []
        for row in first:
            head.append(row)
            if len(head) == stop:
                break
        again = PackedLoader(packer(out, overflow))
        again.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert rows_signature(head) + rows_signature(again) == full, stop

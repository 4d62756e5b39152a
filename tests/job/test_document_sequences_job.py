"""Interleaved documents end to end: an OBELICS-format parquet and an MMC4-format jsonl in their
published layouts, images on a local server (some dead), through the card readers, the document
download, a per-image filter and the text, image and sequence stages. Each kept document's
KEY.sequence.npy decodes back to its texts and to its kept images' visual ids in reading order,
and the loader packs the sequences so that every token is in exactly one row per epoch, also
when an epoch is resumed from the middle."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from helpers.documents import document_job
from helpers.jobs import samples
from helpers.sequence_fixtures import save_emu3_tokenizer
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.loader import ShardDataset
from pipeline.loader.packing import PackedDataset, PackedLoader
from pipeline.testing.assets import TINY_VQ
from pipeline.testing.documents import DEFAULT_DOCUMENTS, document_images, reading_order
from pipeline.testing.serve import LocalServer
from pipeline.tokenize import build_tokenizers
from pipeline.tokenize.sequence import IMAGE, TEXT, decompose

@pytest.fixture(scope="module", params=["mmc4", "obelics"])
def job(request, tmp_path_factory):
    card = request.param
    tmp = tmp_path_factory.mktemp(card)
    tokenizer = save_emu3_tokenizer(tmp / "emu3-tokenizer")
    tokenize = {"text": {"tokenizer": str(tokenizer), "add_special_tokens": False, "max_length": 64},
                "image": {"model": str(TINY_VQ), "resolution": 32, "batch_size": 4, "device": "cpu"},
                "sequence": {"mapping": "emu3"}}
    with LocalServer(document_images(), content_type="image/jpeg") as server:
        base = server.url("").rstrip("/")
        spec = document_job(tmp, base, card, documents={"min_images": 1}, tokenize=tokenize,
                            filters=[{"image_size": {"min_side": 16}}],
                            output={"dir": str(tmp / "out"), "samples_per_shard": 2})
        assert run_job(load_job(data=spec)).ok
    return tmp / "out", base, tokenizer, tokenize


def test_documents_come_out_in_reading_order_with_their_image_slots(job):
    out, base, *_ = job
    got = samples(out)
    # the text-only page and the page whose images are all dead have no image left: dropped
    kept = [d for d in DEFAULT_DOCUMENTS if any(not i.dead for i in d.images())]
    assert len(got) == len(kept)
    for (key, files), doc in zip(sorted(got.items()), kept):
        segments = json.loads(files["json"])["document"]["segments"]
        assert [(s["type"], s.get("text") or s.get("url")) for s in segments] == reading_order(doc, base)
        images = [s for s in segments if s["type"] == "image"]
        order = [i for p in reading_order(doc, base) if p[0] == "image" for i in doc.images() if p[1].endswith(i.name)]
        assert [s["status"] == "success" for s in images] == [not i.dead for i in order]
        assert [e for e in files if e.startswith("image_") and e.endswith(".jpg")] == \
            [f"image_{j:03d}.jpg" for j, s in enumerate(images) if s["status"] == "success"]


def test_sequences_decode_back_to_the_texts_and_the_visual_ids(job):
    out, _, tokenizer, tokenize = job
    tok = AutoTokenizer.from_pretrained(tokenizer)
    mapping = build_tokenizers(tokenize, check=True)[2].mapping
    for key, files in samples(out).items():
        segments = json.loads(files["json"])["document"]["segments"]
        seq, spans = np.load(io.BytesIO(files["sequence.npy"])), np.load(io.BytesIO(files["spans.npy"]))
        assert seq.dtype == np.uint16
        decoded = decompose(seq, spans, mapping)
        texts = [tok.decode(ids.tolist()) for modality, ids in decoded if modality == TEXT]
        grids = [grid for modality, grid in decoded if modality == IMAGE]
        assert texts == [s["text"] for s in segments if s["type"] == "text"]
        kept = [j for j, s in enumerate([s for s in segments if s["type"] == "image"]) if s["status"] == "success"]
        assert len(grids) == len(kept) > 0
        for grid, j in zip(grids, kept):
            assert np.array_equal(grid, np.load(io.BytesIO(files[f"image_{j:03d}.image_ids.npy"])))


def _loader(out):
    ds = ShardDataset(out, fields={"sequence": "sequence.npy", "spans": "spans.npy"})
    return PackedLoader(PackedDataset(ds, 96, spans_field="spans"))


def _tokens(row):
    return row["__keys__"], row["cu_seqlens"].tolist(), row["tokens"].tolist()


def test_packing_covers_every_token_once_and_resumes_mid_epoch(job):
    out, *_ = job
    sequences = {k: np.load(io.BytesIO(f["sequence.npy"])).tolist() for k, f in samples(out).items()}
    rows = [_tokens(r) for r in _loader(out)]
    covered: dict[str, list] = {}
    for keys, cu, ids in rows:
        for key, a, b in zip(keys, cu, cu[1:]):
            covered.setdefault(key, []).extend(ids[a:b])
    assert covered == sequences and len(rows) > 2  # each token once, in order

    first = _loader(out)
    head = []
    for row in first:
        head.append(_tokens(row))
        if len(head) == 2:
            break
    again = _loader(out)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + [_tokens(r) for r in again] == rows

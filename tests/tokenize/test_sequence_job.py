"""A real job with text, image and sequence stages (images on a local HTTP server, one dead):
its shards hold KEY.sequence.npy and KEY.spans.npy that decode back to the caption and the visual
ids, and that the loader packs into rows holding every token once."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from helpers.jobs import samples
from helpers.sequence_fixtures import save_emu3_tokenizer
from helpers.tokenize_fixtures import pairs_server, tokenize_job
from pipeline.job.runner import run_job
from pipeline.loader import ShardDataset
from pipeline.loader.packing import PackedDataset, PackedLoader
from pipeline.testing.assets import TINY_VQ
from pipeline.tokenize import build_tokenizers
from pipeline.tokenize.sequence import IMAGE, TEXT, decompose

N = 12


@pytest.fixture(scope="module")
def job_output(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seqjob")
    tokenizer = save_emu3_tokenizer(tmp / "emu3-tokenizer")
    tokenize = {"text": {"tokenizer": str(tokenizer), "add_special_tokens": False, "max_length": 64},
                "image": {"model": str(TINY_VQ), "resolution": 64, "batch_size": 4, "device": "cpu"},
                "sequence": {"mapping": "emu3", "order": "text_first"}}
    with pairs_server(N, seed=5, dead=3) as server:
        assert run_job(tokenize_job(tmp, server, "out", tokenize, samples_per_shard=5)).ok
        captions = dict(enumerate(server.captions))
    return tmp / "out", tokenizer, tokenize, captions


def test_job_writes_sequences_that_decode_back(job_output):
    out, tokenizer, tokenize, captions = job_output
    tok = AutoTokenizer.from_pretrained(tokenizer)
    mapping = build_tokenizers(tokenize, check=True)[2].mapping
    fp = json.loads((out / "manifest.json").read_text())["fingerprints"]["tokenize_sequence"]
    assert (fp["mapping"], fp["ids_dtype"], fp["order"]) == ("emu3", "uint16", "text_first")
    written = samples(out)
    assert len(written) == N - 1
    for key, files in written.items():
        seq, spans = np.load(io.BytesIO(files["sequence.npy"])), np.load(io.BytesIO(files["spans.npy"]))
        meta = json.loads(files["json"])
        assert seq.dtype == np.uint16 and meta["sequence_length"] == len(seq) and meta["sequence_tokenizer"] == fp["id"]
        (m1, text), (m2, grid) = decompose(seq, spans, mapping)
        assert (m1, m2) == (TEXT, IMAGE)
        assert tok.decode(text.tolist()) == meta["caption"]
        assert np.array_equal(grid, np.load(io.BytesIO(files["image_ids.npy"])))
    table = pq.read_table(sorted(out.glob("*.parquet"))[0]).to_pydict()
    assert "sequence_length" in table and "sequence_tokenizer" in table


def test_the_loader_packs_the_job_sequences(job_output):
    out, *_ = job_output
    lengths = {k: len(np.load(io.BytesIO(f["sequence.npy"]))) for k, f in samples(out).items()}
    covered: dict[str, int] = {}
    for rank in (0, 1):
        ds = ShardDataset(out, fields={"sequence": "sequence.npy", "spans": "spans.npy"}, rank=rank, world_size=2)
        for row in PackedLoader(PackedDataset(ds, 128, spans_field="spans")):
            cu = row["cu_seqlens"].tolist()
            for key, a, b in zip(row["__keys__"], cu, cu[1:]):
                covered[key] = covered.get(key, 0) + b - a
    assert covered == lengths

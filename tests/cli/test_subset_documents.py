"""``mmcurate subset`` of an interleaved-document output: no network, the documents read back
from the tars (their images as ``image_NNN.jpg`` members, the document from the status table),
filters run per image and per document again, the kept documents written with their members
byte for byte."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from helpers.documents import document_job
from helpers.jobs import samples
from pipeline.cli.main import main
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing.documents import document_images
from pipeline.testing.serve import LocalServer


def test_subset_refilters_documents_from_their_shards(tmp_path):
    with LocalServer(document_images(), content_type="image/jpeg") as server:
        base = server.url("").rstrip("/")
        assert run_job(load_job(data=document_job(tmp_path, base))).ok
    # the server is gone: a subset reads the tars only
    assert main(["subset", str(tmp_path / "out"), str(tmp_path / "sub"), "--no-progress",
                 "--filter", "image_count: {min: 3}", "--filter", "caption: {min_words: 3}"]) == 0
    before, after = samples(tmp_path / "out"), samples(tmp_path / "sub")
    rows = pq.read_table(tmp_path / "sub" / "00000.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["filtered", "success"]  # garden keeps 2 images, kitchen 3
    assert rows[0]["error_kind"] == "image_count" and rows[1]["image_count"] == 3
    (key, files), = after.items()
    source = before[rows[1]["source_key"]]
    assert {e for e in files if e.startswith("image_")} == {"image_000.jpg", "image_001.jpg", "image_002.jpg"}
    assert all(files[e] == source[e] for e in files if e.startswith("image_"))
    assert json.loads(files["json"])["document"] == json.loads(source["json"])["document"]
    assert files["txt"] == source["txt"]

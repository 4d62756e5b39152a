"""The shipped jobs of the interleaved cards (jobs/obelics.yaml, jobs/mmc4.yaml) produce one
sample per document from files in the published layouts, images on a local server, some dead."""
from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq
import pytest
import yaml

from helpers.paths import REPO
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing.documents import (DEFAULT_DOCUMENTS, document_images, reading_order, write_mmc4_jsonl,
                                        write_obelics_parquet)
from pipeline.testing.serve import LocalServer

WRITERS = {"obelics": (write_obelics_parquet, "train-00000-of-00001.parquet"),
           "mmc4": (write_mmc4_jsonl, "docs_no_face_shard_0_v3.jsonl")}


@pytest.mark.parametrize("card", sorted(WRITERS))
def test_shipped_job_writes_documents_in_reading_order(card, tmp_path):
    spec = yaml.safe_load((REPO / "jobs" / f"{card}.yaml").read_text())
    writer, name = WRITERS[card]
    with LocalServer(document_images(), content_type="image/jpeg") as server:
        base = server.url("").rstrip("/")
        spec["input"]["files"] = [str(writer(tmp_path / name, base))]
        spec["output"]["dir"] = str(tmp_path / "out")
        spec["download"]["allow_private_addresses"] = True  # the server is on 127.0.0.1
        spec["execution"] = {"engine": "local"}
        assert run_job(load_job(data=spec)).ok
    (table,) = (tmp_path / "out").glob("*.parquet")
    rows = pq.read_table(table).to_pylist()
    assert [r["url"] for r in rows] == [f"{base}/{d.page}" for d in DEFAULT_DOCUMENTS]
    # min_images 1: the text-only page and the page whose images are all dead are dropped
    assert [r["status"] for r in rows] == ["success", "success", "failed_to_download", "failed_to_download"]
    assert rows[2]["error_kind"] == rows[3]["error_kind"] == "too_few_images"
    (tar,) = (tmp_path / "out").glob("*.tar")
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        garden = json.loads(tf.extractfile(f"{rows[0]['key']}.json").read())["document"]
    segments = garden["segments"]
    assert [(s["type"], s.get("text") or s.get("url")) for s in segments] == reading_order(DEFAULT_DOCUMENTS[0], base)
    images = [s for s in segments if s["type"] == "image"]
    assert [s["status"] for s in images] == ["success", "success", "failed_to_download"]
    assert [s.get("member") for s in images] == ["image_000.jpg", "image_001.jpg", None]
    assert f"{rows[0]['key']}.image_001.jpg" in names and f"{rows[0]['key']}.image_002.jpg" not in names
    assert f"{rows[1]['key']}.image_002.jpg" in names  # kitchen: three live images

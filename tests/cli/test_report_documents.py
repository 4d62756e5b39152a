"""``mmcurate report`` on an interleaved-document output (OBELICS layout, images on a local
server, the tiny CLIP's clip_score per image against its nearest text): the per-image scores,
which live in the images' segments, are drawn with their threshold; so are the images' sizes and
the documents' image slots."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from helpers.documents import document_job

from pipeline.cli.report import summarize, write_report
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.documents import DEFAULT_DOCUMENTS, document_images
from pipeline.testing.serve import LocalServer


def test_the_report_draws_the_per_image_scores_of_documents(tmp_path):
    with LocalServer(document_images(), content_type="image/jpeg") as server:
        base = server.url("").rstrip("/")
        spec = document_job(tmp_path, base, filters=[{"clip_score": {
            "model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS), "min": 0.1}}])
        assert run_job(load_job(data=spec)).ok
    segments = [s for row in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
                for s in json.loads(row["document"])["segments"] if s["type"] == "image"]
    scored = [s for s in segments if "clip_score" in s]
    fetched = sum(not i.dead for d in DEFAULT_DOCUMENTS for i in d.images())
    assert len(scored) == fetched > 0
    summary = summarize(tmp_path / "out")
    clip = summary.histograms["clip_score"]
    assert clip.total == fetched and (0.1, "min 0.1") in clip.marks
    assert int(clip.kept.sum()) == sum(s["status"] == "success" for s in scored)
    assert summary.histograms["images_total"].total == len(DEFAULT_DOCUMENTS)
    page = write_report(tmp_path / "out").read_text()
    assert "clip_score" in page and "Images per document" in page

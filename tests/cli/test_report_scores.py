"""``mmcurate report`` draws every score: the ones a real job's filters computed (the tiny CLIP's
clip_score with its min and its top_fraction cut from the manifest; a filter registered by the
test, found through its ``double`` column alone) and the published ones kept from the input
(``save_additional_columns``, a catalog card's columns), with hostile values and shapes."""
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from test_report import write_output  # tests/cli is on the path (rootdir-less test dirs)
from filters import FILTERS
from filters.base import Filter
from pipeline.cli.report import summarize, write_report
from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.serve import LocalServer

torch.set_num_threads(1)


@dataclass
class LengthScoreConfig:
    min: Optional[float] = None
    max: Optional[float] = None
    threshold: Optional[float] = None  # drawn like min / max (semantic_dedup names its bound so)


class LengthScoreFilter(Filter):
    """A filter the report has never heard of: a ``double`` score with min / max."""

    name = "length_score"
    Config = LengthScoreConfig

    @property
    def columns(self) -> dict[str, str]:
        return {"length_score": "double", "length_note": "string"}

    def process(self, batch: Batch) -> Batch:
        rows = list(schema.alive(batch))
        scores = [len(batch[schema.CAPTION][i] or "") / 100 for i in rows]
        schema.set_column(batch, "length_score", rows, scores)
        for i, score in zip(rows, scores):
            if self.config.max is not None and score > self.config.max:
                self.reject(batch, i, f"length score {score} above max {self.config.max}")
        return batch


def jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def published_columns(n, start):
    """LAION/COYO-style published scores with hostile values: NaN, inf, all-equal, ids, tags."""
    rng = np.random.default_rng(start)
    similarity = rng.uniform(0.2, 0.4, n)
    similarity[0], similarity[1] = math.nan, math.inf
    return {"similarity": similarity.tolist(), "aesthetic_score_laion_v2": [5.25] * n,
            "uid": list(range(start, start + n)), "NSFW": ["UNLIKELY"] * n,
            "my_quality": rng.integers(0, 10, n).tolist()}


@pytest.fixture(scope="module")
def scored_job(tmp_path_factory):
    """A real job: 24 synthetic pairs over two input files (the second lacks ``punsafe``), the tiny
    CLIP with min and top_fraction, then the test's own filter with max."""
    tmp = tmp_path_factory.mktemp("report-scores")
    pairs = synthetic.make_pairs(24, seed=7)
    files = {f"{i}.jpg": jpeg(im) for i, (im, _) in enumerate(pairs) if i % 9 != 4}  # some dead links
    with pytest.MonkeyPatch.context() as mp, LocalServer(files, content_type="image/jpeg") as server:
        mp.setitem(FILTERS, LengthScoreFilter.name, LengthScoreFilter)
        inputs = []
        for part, (lo, hi) in enumerate(((0, 16), (16, 24))):
            columns = {"url": [server.url(f"{i}.jpg") for i in range(lo, hi)],
                       "caption": [c for _, c in pairs[lo:hi]], **published_columns(hi - lo, lo)}
            if part == 0:
                columns["punsafe"] = np.linspace(0, 0.2, hi - lo).tolist()
            pq.write_table(pa.table(columns), tmp / f"part{part}.parquet")
            inputs.append(str(tmp / f"part{part}.parquet"))
        from pipeline.job.runner import run_job
        from pipeline.job.spec import load_job

        clip = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS), "batch_size": 16,
                "min": -0.9, "top_fraction": 0.5, "sample_size": 16}
        spec = load_job(data={
            "input": {"files": inputs, "save_additional_columns": [
                "similarity", "punsafe", "aesthetic_score_laion_v2", "uid", "NSFW", "my_quality"]},
            "download": {"image_size": 32, "allow_private_addresses": True, "timeout": 5},
            "filters": [{"clip_score": clip}, {"length_score": {"max": 0.5}}],
            "output": {"dir": str(tmp / "out"), "samples_per_shard": 8},
            "execution": {"engine": "local", "progress": False}})
        assert run_job(spec).ok
    out = tmp / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["job"]["filters"].append({"sharpness": {"min": 3}})  # a filter this registry does not know
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, manifest


def values(out, column):
    """A column over every status table (None where a table lacks it)."""
    tables = [pq.read_table(p) for p in sorted(out.glob("*.parquet"))]
    return [v for t in tables for v in (t[column].to_pylist() if column in t.column_names else [None] * len(t))]


def test_every_score_of_a_real_job_gets_a_histogram_with_its_thresholds(scored_job):
    out, manifest = scored_job
    summary = summarize(out)  # length_score is no longer registered here: clip_score still is
    threshold = manifest["stage_state"]["clip_score"]["threshold"]
    clip = summary.histograms["clip_score"]
    assert clip.marks == [(-0.9, "min -0.9"), (threshold, f"top 50% → {threshold:.3f}")]
    assert clip.edges[0] <= -0.9 and clip.note == "computed by the clip_score filter"
    rows = {c: values(out, c) for c in ("clip_score", "status", "similarity")}
    scored = [s for s in rows["clip_score"] if s is not None]
    assert clip.total == len(scored) > 0
    assert clip.kept.sum() == sum(s is not None and st == "success" for s, st in zip(rows["clip_score"], rows["status"]))
    assert "length_score" not in summary.histograms  # unregistered again: the report cannot know it
    assert any("sharpness" in n and "not a filter" in n for n in summary.notes)
    assert any("length_score" in n for n in summary.notes)

    similarity = summary.histograms["similarity"]
    finite = [v for v in rows["similarity"] if v is not None and math.isfinite(v)]
    assert similarity.total == len(finite) == 20  # NaN and inf of each file are left out
    assert similarity.title == "similarity" and "published CLIP image-text cosine similarity" in similarity.note
    assert "LAION" in similarity.note
    assert summary.histograms["punsafe"].total == 16  # the second file has no such column
    assert summary.histograms["aesthetic_score_laion_v2"].total == 24  # all equal
    assert summary.histograms["my_quality"].note == "kept from the input"
    assert "uid" not in summary.histograms and "NSFW" not in summary.histograms


def test_a_filter_the_report_never_heard_of_is_drawn_with_its_max(scored_job, monkeypatch):
    out, _ = scored_job
    monkeypatch.setitem(FILTERS, LengthScoreFilter.name, LengthScoreFilter)
    page = write_report(out).read_text()
    summary = summarize(out)
    length = summary.histograms["length_score"]
    scored = values(out, "length_score")
    assert length.marks == [(0.5, "max 0.5")] and length.total == sum(v is not None for v in scored) > 0
    assert length.dropped.sum() == sum(v is not None and v > 0.5 for v in scored) > 0
    assert "length_note" not in summary.histograms  # a string column is not a score
    threshold = json.loads((out / "manifest.json").read_text())["stage_state"]["clip_score"]["threshold"]
    figures = dict(re.findall(r"<figure><img alt='([^']+)'.*?<figcaption[^>]*>(.*?)</figcaption>", page))
    assert set(figures) == {"clip_score", "length_score", "similarity", "punsafe", "aesthetic_score_laion_v2",
                            "my_quality", "Original size", "Aspect ratio", "Caption length"}
    assert f"thresholds: min -0.9, top 50% → {threshold:.3f}" in figures["clip_score"]
    assert "thresholds: max 0.5" in figures["length_score"]
    assert "computed by the length_score filter" in figures["length_score"]
    assert "published CLIP image-text cosine similarity" in figures["similarity"]
    assert "filters[2]: sharpness is not a filter this mmcurate knows" in page


def rewrite_shard(out, shard, **columns):
    """Replace (or, with None, drop) columns of one shard's status table."""
    path = out / f"{shard:05d}.parquet"
    table = pq.read_table(path)
    for name, values in columns.items():
        if name in table.column_names:
            table = table.drop([name])
        if values is not None:
            table = table.append_column(name, values if isinstance(values, pa.Array) else pa.array(values))
    pq.write_table(table, path)


def set_manifest(out, **changes):
    path = out / "manifest.json"
    manifest = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(manifest))


def test_hostile_score_columns_and_manifests_never_crash_the_report(tmp_path, monkeypatch):
    monkeypatch.setitem(FILTERS, LengthScoreFilter.name, LengthScoreFilter)
    out = write_output(tmp_path / "job", shards=3, rows=20)
    set_manifest(out, job={"input": {"catalog": "coyo-700m", "save_additional_columns": ["face_bboxes", 7, "aspect"]},
                           "filters": [{"clip_score": {"preset": "laion", "min": "high"}}, "dedup_exact",
                                       {"caption": {}, "image_size": {}}, {"length_score": {"threshold": 0.2}}]},
                 stage_state={"clip_score": {"threshold": "0.3"}})
    nan = [math.nan] * 20
    rewrite_shard(out, 0, clip_score=nan, aesthetic=[3.0] * 20, nsfw=["UNLIKELY"] * 20,
                  clip_similarity=pa.array(range(20), pa.int64()), watermark=[1e308, -1e308] * 10)
    rewrite_shard(out, 1, clip_score=None, aesthetic=pa.array([None] * 20, pa.null()),
                  clip_similarity=[0.25] * 20, face_bboxes=[0.5] * 20)
    rewrite_shard(out, 2, aspect=[0.5] * 20, length_score=[0.1, 0.3] * 10)
    summary = summarize(out)
    assert "clip_score" not in summary.histograms  # its options do not parse: skipped, with a note
    notes = " | ".join(summary.notes)
    assert "filters[0].clip_score.min" in notes and "filters[1]: 'dedup_exact'" in notes
    assert "filters[2]" in notes and "filters[3]" not in notes and "aspect: the name of one of the report's own histograms" in notes
    assert summary.histograms["aspect"].title == "Aspect ratio"
    h = summary.histograms
    assert h["aesthetic"].total == 20 and h["aesthetic"].edges[0] < 3.0 < h["aesthetic"].edges[-1]
    assert h["clip_similarity"].total == 40  # int64 in one shard, double in another
    assert h["watermark"].total == 20 and np.isfinite(h["watermark"].edges).all()
    assert "nsfw" not in h and "face_bboxes" not in h  # a tag, and geometry
    assert h["clip_similarity"].note.startswith("published CLIP image-text cosine similarity")
    assert h["length_score"].marks == [(0.2, "threshold 0.2")] and h["length_score"].total == 20
    page = write_report(out).read_text()
    assert len(re.findall(r"data:image/png;base64,", page)) == 4 + 3
    assert "thresholds: threshold 0.2" in page


def test_a_computed_score_with_no_value_says_so_and_a_manifest_without_filters_works(tmp_path):
    out = write_output(tmp_path / "job", shards=1, rows=10)
    rewrite_shard(out, 0, clip_score=[math.nan] * 10)
    page = write_report(out).read_text()
    assert "clip_score: no values in this output." in page
    set_manifest(out, job={"filters": "clip_score"})
    summary = summarize(out)
    assert [k for k in summary.histograms] == ["size", "aspect", "caption"]
    assert summary.notes == ["job.filters: expected a list, got str; no computed score is drawn"]
    (out / "manifest.json").unlink()
    assert summarize(out).notes == []

"""``mmcurate report``: an HTML page from an output directory's status tables and stats."""
import base64
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.report import summarize, write_report
from pipeline.core import schema


def write_output(out, shards=3, rows=40, seed=0):
    """An output directory in the writer's layout: NNNNN.parquet, NNNNN_stats.json, manifest.json."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        status, kinds, scores = [], [], []
        for i in range(rows):
            score = float(rng.uniform(0.1, 0.45))
            if i % 10 == 0:
                status.append(schema.FAILED_TO_DOWNLOAD), kinds.append("http_status"), scores.append(None)
            elif score < 0.28:
                status.append(schema.FILTERED), kinds.append("clip_score"), scores.append(score)
            elif i % 7 == 0:
                status.append(schema.FILTERED), kinds.append("caption"), scores.append(None)
            else:
                status.append(schema.SUCCESS), kinds.append(None), scores.append(score)
        widths = rng.integers(100, 2000, rows)
        table = pa.table({
            schema.KEY: [f"{s:05d}{i:04d}" for i in range(rows)],
            schema.URL: [f"http://example.com/{s}/{i}.jpg" for i in range(rows)],
            schema.CAPTION: [" ".join(["word"] * int(rng.integers(1, 30))) for _ in range(rows)],
            schema.STATUS: status, schema.ERROR_KIND: kinds,
            schema.ERROR_MESSAGE: [k and f"because {k}" for k in kinds],
            schema.WIDTH: [256] * rows, schema.HEIGHT: [256] * rows,
            schema.ORIGINAL_WIDTH: [int(w) if k != "http_status" else None for w, k in zip(widths, kinds)],
            schema.ORIGINAL_HEIGHT: [int(w // 2) if k != "http_status" else None for w, k in zip(widths, kinds)],
            schema.SHA256: [None] * rows, "clip_score": pa.array(scores, pa.float64()),
        })
        pq.write_table(table, out / f"{s:05d}.parquet")
        counts = {k: status.count(k) for k in set(status)}
        error_kinds = {k: kinds.count(k) for k in set(kinds) if k}
        stats = {"shard": f"{s:05d}", "count": rows, "successes": counts.get("success", 0),
                 "status_counts": counts, "error_kinds": error_kinds,
                 "filtered": {k: n for k, n in error_kinds.items() if k in ("clip_score", "caption")},
                 "timings": {"download": 1.5, "clip_score": 0.5, "write": 0.1}, "tar_bytes": 1 << 20}
        (out / f"{s:05d}_stats.json").write_text(json.dumps(stats))
        (out / f"{s:05d}.tar").write_bytes(b"")
    manifest = {"name": "report-test", "status": "complete",
                "job": {"filters": [{"caption": {}}, {"clip_score": {"preset": "laion", "min": 0.28}}]},
                "stage_state": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_summary_counts_match_the_tables(tmp_path):
    out = write_output(tmp_path / "job")
    summary = summarize(out)
    tables = [pq.read_table(p).to_pydict() for p in sorted(out.glob("*.parquet"))]
    statuses = [s for t in tables for s in t["status"]]
    assert summary.rows == len(statuses) == 120 and summary.shards == 3
    assert summary.statuses["success"] == statuses.count("success")
    assert summary.kinds["clip_score"] == sum(k == "clip_score" for t in tables for k in t["error_kind"])
    clip = summary.histograms["clip_score"]
    scored = [(s, st) for t in tables for s, st in zip(t["clip_score"], t["status"]) if s is not None]
    assert clip.total == len(scored) and clip.kept.sum() == sum(st == "success" for _, st in scored)
    assert clip.marks == [(0.28, "min 0.28")]
    assert summary.histograms["size"].total == 108  # the 12 failed downloads have no size
    assert summary.histograms["caption"].total == 120
    assert summary.timings["download"] == pytest.approx(4.5)


def test_report_html_has_totals_filters_and_embedded_histograms(tmp_path):
    out = write_output(tmp_path / "job")
    path = write_report(out)
    assert path == out / "report.html"
    page = path.read_text()
    summary = summarize(out)
    ok = summary.statuses["success"]
    assert "mmcurate report: report-test" in page
    assert f'<td class="n">{ok:,}</td>' in page and f"{100 * ok / 120:.1f}%" in page
    assert "<td>http_status</td><td>failed_to_download</td>" in page
    assert "the server answered with a non-2xx status" in page
    for name in ("clip_score", "caption"):
        assert f"<tr><td>{name}</td><td class=\"n\">{summary.kinds[name]:,}</td>" in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    for title in ("clip_score", "Original size", "Aspect ratio", "Caption length"):
        assert f"alt='{title}'" in page


def test_report_cli_and_outputs_without_scores(tmp_path):
    from pipeline.cli.main import main

    out = write_output(tmp_path / "job", shards=1)
    table = pq.read_table(out / "00000.parquet").drop(["clip_score"])
    pq.write_table(table, out / "00000.parquet")
    target = tmp_path / "elsewhere.html"
    assert main(["report", str(out), "--out", str(target)]) == 0
    page = target.read_text()
    assert "clip_score: no values in this output." in page
    assert len(re.findall(r"data:image/png;base64,", page)) == 3
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete shard"):
        write_report(tmp_path / "empty")

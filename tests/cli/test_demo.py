"""The demo is the whole pipeline offline: it must finish and its filters must do their job."""
import json

from pipeline.cli.demo import run_demo
from pipeline.sinks.webdataset import read_status_tables


def test_demo_runs_the_whole_pipeline(tmp_path, ray_cluster, capsys):
    assert run_demo(str(tmp_path / "demo")) == 0
    out = capsys.readouterr().out
    assert "mismatched captions" in out and "loader:" in out
    shards = tmp_path / "demo" / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert {"clip_score", "tokenize_text", "tokenize_image"} <= set(manifest["fingerprints"])
    table = read_status_tables(shards).to_pydict()
    kinds = {k for k in table["error_kind"] if k}
    assert {"clip_score", "dedup_exact", "http_status", "not_media"} <= kinds
    ok = [i for i, s in enumerate(table["status"]) if s == "success"]
    assert len(ok) > 200 and all(table["text_tokenizer"][i] and table["image_tokenizer"][i] for i in ok)
    assert (tmp_path / "demo" / "report.html").stat().st_size > 10_000

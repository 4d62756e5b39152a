"""End to end: a real server on 127.0.0.1, real shards, resume after a real SIGKILL, Ray on two nodes."""
import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from helpers.jobs import job_file, kill_then_rerun, status_tables, tars
from pipeline.cli.main import main
from pipeline.core.config import ConfigError
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job

def test_output_directory_contract(reference):
    out = reference
    names = sorted(p.name for p in out.iterdir())
    assert names[:3] == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert {"index.json", "manifest.json"} <= set(names)
    assert len(list(out.glob("*.tar"))) == 8  # 60 rows / 8 per shard
    table = pq.read_table(out / "00000.parquet").to_pydict()
    for col in ("key", "url", "caption", "status", "error_message", "width", "height",
                "original_width", "original_height", "sha256"):
        assert col in table
    assert table["status"][3] == "failed_to_download" and table["error_kind"][3] == "http_status"
    assert "404" in table["error_message"][3]
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == 8 and stats["successes"] == 7 and stats["error_kinds"] == {"http_status": 1}
    index = json.loads((out / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [s["nsamples"] for s in index["shardlist"]] == [7, 7, 7, 8, 7, 7, 7, 4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["totals"]["successes"] == 54
    assert manifest["job"]["download"]["image_size"] == 48


def test_shards_read_back_with_webdataset(reference):
    shards = [str(p) for p in sorted(reference.glob("*.tar"))]
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == 54
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and all(k.isdigit() for k in keys)
    first = samples[0]
    assert first["jpg"].size == (48, 48)
    assert first["txt"] == "picture number 0"
    assert first["json"]["status"] == "success" and first["json"]["original_width"] > 0
    assert first["json"]["key"] == first["__key__"]


def test_rerun_skips_complete_shards(tmp_path, server):
    path = job_file(tmp_path, server)
    run_job(load_job(path))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "job").glob("*.tar")}
    (tmp_path / "job" / "00002_stats.json").unlink()  # as if the job died before finishing shard 2
    result = run_job(load_job(path))
    assert (result.shards_total, result.shards_skipped, result.shards_written) == (8, 7, 1)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "job").glob("*.tar")}
    assert {k for k in before if before[k] != after[k]} == {"00002.tar"}


def test_resume_with_changed_outputs_is_refused(tmp_path, server):
    path = job_file(tmp_path, server)
    run_job(load_job(path))
    with pytest.raises(ConfigError, match="different download"):
        run_job(load_job(path, ["download.image_size=64"]))
    run_job(load_job(path, ["execution.progress=true"]))  # execution settings may change


def test_cli_run_and_inspect(tmp_path, server, capsys):
    path = job_file(tmp_path, server)
    assert main(["run", str(path), "--no-progress"]) == 0
    assert "54 / 60 samples in tars" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "job"), "-n", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["successes"] == 54 and len(summary["examples"]) == 2
    assert main(["run", str(path), "--set", "download.bogus=1"]) == 2
    assert "download.bogus: unknown key" in capsys.readouterr().err


def valid_tar(data: bytes) -> bool:
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            t.getmembers()
        return True
    except tarfile.TarError:
        return False


def test_sigkill_at_any_moment_then_rerun_gives_identical_shards(tmp_path, server, reference):
    path = job_file(tmp_path, server, "killed", download__concurrency=2)
    out = tmp_path / "killed"
    kill_then_rerun(path, out, reference, attempts=6, seed=1)
    assert not list(out.glob(".*.tmp"))
    assert status_tables(out) == status_tables(reference)


def test_ray_on_a_two_node_cluster_writes_the_same_shards(tmp_path, server, reference, ray_cluster):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    path = job_file(tmp_path, server, "onray", execution__engine="ray", execution__address=ray_cluster.address)
    result = run_job(load_job(path))
    assert result.ok and result.shards_written == 8
    assert tars(tmp_path / "onray") == tars(reference)


def test_a_prepare_sample_pass_runs_copies_of_the_stages_before_it(tmp_path, server):
    """A later filter's prepare() runs the stages before it over the first rows in the driver: on
    copies, so an ordered stage's memory (dedup) and the job's own stages are untouched by it."""
    from pipeline.core import schema
    from pipeline.core.stage import Stage
    from pipeline.job.runner import Job

    class Remembers(Stage):
        name = "remembers"
        ordered = True

        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def process(self, batch):
            self.seen.extend(batch[schema.KEY])
            return batch

    stage = Remembers()
    batches = list(Job(load_job(job_file(tmp_path, server, rows=12)))._sample_batches([stage])(10))
    assert sum(len(b[schema.KEY]) for b in batches) == 10
    assert stage.seen == []


def test_a_job_without_models_never_imports_pytorch(tmp_path, server):
    """PyTorch costs about 800 MB and 2 s per process: a download-and-filter job does without it."""
    import subprocess
    import sys

    import yaml

    job = job_file(tmp_path, server, "no-torch")
    job.write_text(yaml.safe_dump({**yaml.safe_load(job.read_text()), "filters": [{"caption": {"min_words": 1}}]}))
    code = ("import sys\nfrom pipeline.job.runner import run_job\nfrom pipeline.job.spec import load_job\n"
            f"assert run_job(load_job({str(job)!r})).ok\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

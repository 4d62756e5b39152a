"""Jobs whose output is behind an fsspec URL: S3 (moto_server on 127.0.0.1, reached through the
standard AWS environment), memory:// and file://, written, resumed and read back as local output
is; credentials never land in the manifest."""
import io
import json

import pyarrow.parquet as pq
import pytest

from helpers.jobs import job_file, kill_then_rerun, tars
from pipeline.core.config import ConfigError
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.loader import ShardDataset
from pipeline.sinks import Directory


def test_a_job_writes_to_s3_as_it_writes_to_disk(tmp_path, server, reference, s3):
    result = run_job(load_job(job_file(tmp_path, server, output__dir=s3.url("jobs/a"))))
    assert result.ok and result.shards_written == 8 and result.out_dir == s3.url("jobs/a")
    out = Directory(s3.url("jobs/a"))
    assert tars(out.url) == tars(reference)
    for name in out.names("*.parquet"):
        assert pq.read_table(io.BytesIO(out.read_bytes(name))).drop(["error_message"]) == pq.read_table(
            reference / name).drop(["error_message"])
    index = json.loads(out.read_bytes("index.json"))
    assert index["shardlist"] == json.loads((reference / "index.json").read_bytes())["shardlist"]
    assert json.loads(out.read_bytes("manifest.json"))["status"] == "complete"
    keys = s3.keys("jobs/a/")
    assert len(keys) == 8 * 3 + 2 and not [k for k in keys if "/." in k]  # no temporaries on a store
    samples = list(ShardDataset(s3.url("jobs/a"), batch_size=None))
    assert len(samples) == 54


def test_a_resumed_job_on_s3_redoes_only_what_is_missing(tmp_path, server, reference, s3):
    path = job_file(tmp_path, server, output__dir=s3.url("jobs/r"))
    run_job(load_job(path))
    client = s3.client()
    client.delete_object(Bucket="mmcurate-test", Key="jobs/r/00002_stats.json")  # died before the commit marker
    client.put_object(Bucket="mmcurate-test", Key="jobs/r/00005.tar", Body=b"")  # and a shard mid-rewrite
    client.delete_object(Bucket="mmcurate-test", Key="jobs/r/00005_stats.json")
    result = run_job(load_job(path))
    assert (result.shards_skipped, result.shards_written) == (6, 2)
    assert tars(s3.url("jobs/r")) == tars(reference)


def test_storage_options_work_without_the_environment_and_stay_out_of_the_manifest(
        tmp_path, server, reference, s3, monkeypatch):
    for var in s3.env:
        monkeypatch.delenv(var)
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    result = run_job(load_job(job_file(tmp_path, server, output__dir=s3.url("jobs/o"),
                                       output__storage_options=options)))
    assert result.ok
    out = Directory(s3.url("jobs/o"), options)
    assert {n: out.read_bytes(n) for n in out.names("*.tar")} == tars(reference)
    manifest = out.read_bytes("manifest.json").decode()
    assert "endpoint_url" not in manifest and "secret" not in manifest


def test_memory_and_file_urls(tmp_path, server, reference):
    assert run_job(load_job(job_file(tmp_path, server, "m", output__dir="memory://jobs/m"))).ok
    assert tars("memory://jobs/m") == tars(reference)
    assert run_job(load_job(job_file(tmp_path, server, "f", output__dir=f"file://{tmp_path}/f"))).ok
    assert tars(tmp_path / "f") == tars(reference)


def test_memory_output_is_refused_where_workers_cannot_share_it(tmp_path, server):
    with pytest.raises(ConfigError, match="output.dir: 'memory://x'.*engine: local"):
        load_job(job_file(tmp_path, server, output__dir="memory://x", execution__engine="ray"))


def test_a_driver_killed_at_any_moment_resumes_from_s3(tmp_path, server, reference, s3):
    path = job_file(tmp_path, server, "killed", output__dir=s3.url("jobs/k"), download__concurrency=2)
    kill_then_rerun(path, s3.url("jobs/k"), reference, attempts=4, seed=2)
    assert not s3.client().list_multipart_uploads(Bucket="mmcurate-test").get("Uploads")

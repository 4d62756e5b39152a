"""``inspect``, ``report`` and ``stream`` on output directories behind fsspec URLs: S3 (moto on
127.0.0.1, reached through the AWS environment) and ``memory://``; and a job that reads its URL
lists from S3 and writes its shards there gives the same shards as one on the local disk."""
from __future__ import annotations

import io
import random
import re
import tarfile
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers.loader_output import write_output
from pipeline.cli.inspect import summarize
from pipeline.cli.main import main
from pipeline.cli.report import write_report
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing.serve import LocalServer

N = 12


def upload(local, url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(p for p in local.iterdir() if p.is_file()):
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())


@pytest.fixture(scope="module")
def local_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("output") / "job"  # the same name as the URLs': the report's title
    root.mkdir()
    write_output(root, [7, 0, 6])
    return root


@pytest.fixture
def memory_url():
    url = f"memory://mmcurate-out-{uuid.uuid4().hex}/job"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url.rsplit("/", 1)[0]):
        fs.rm(url.rsplit("/", 1)[0], recursive=True)


def same_summary(remote: dict, local: dict) -> bool:
    return {**remote, "output_dir": None} == {**local, "output_dir": None}


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_inspect_and_report_read_a_url_like_a_folder(where, local_output, request, capsys):
    url = request.getfixturevalue("s3").url("out/job") if where == "s3" else request.getfixturevalue("memory_url")
    upload(local_output, url)
    assert same_summary(summarize(url), summarize(local_output))
    assert summarize(url + "/")["output_dir"] == url
    assert main(["inspect", url, "-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"{url}: job None (None), 3 shards, 17 rows, 13 in tars (76.5%)")
    assert "000000001" in shown and "caption 000000001" in shown
    assert main(["report", url]) == 0
    assert capsys.readouterr().out.strip() == f"{url}/report.html"
    fs, root = fsspec.core.url_to_fs(url)
    page = fs.cat_file(f"{root}/report.html").decode()
    local_page = write_report(local_output, local_output / "local.html").read_text()
    assert page.replace(url, "DIR") == local_page.replace(str(local_output), "DIR")


def test_report_out_may_be_a_url(local_output, memory_url):
    target = f"{memory_url}-report/page.html"
    assert write_report(local_output, target) == target
    assert fsspec.filesystem("memory").cat_file(target).startswith(b"<!doctype html>")


def test_a_missing_output_directory_is_a_clear_error(tmp_path, s3, memory_url, capsys):
    for url in (str(tmp_path / "missing"), s3.url("missing"), memory_url, "s3://no-such-bucket-here/out"):
        for command in ("inspect", "report"):
            assert main([command, url]) == 2
            err = capsys.readouterr().err
            assert err == f"mmcurate: error: {url}: no such output directory\n", (command, err)


def test_stream_reads_shards_from_s3(local_output, s3, capsys):
    url = s3.url("out/stream")
    upload(local_output, url)
    assert main(["stream", url, "--batch-size", "4", "--workers", "2", "--fields", "jpg,txt", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{url}: 13 samples in 3 shards")
    assert re.match(r"epoch 0: 13 samples in 4 batches, [\d.]+ s, [\d,]+ samples/s$", lines[1]), lines[1]
    assert main(["stream", s3.url("nowhere"), "--workers", "0", "--no-progress"]) == 2
    assert "no index.json and no .tar shards" in capsys.readouterr().err


# -- a whole job: URL lists on S3, shards on S3 ----------------------------------------------------

def jpeg(i: int) -> bytes:
    rng = random.Random(i)
    buf = io.BytesIO()
    Image.new("RGB", (rng.randint(60, 200), rng.randint(60, 200)), (rng.randrange(256), 90, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    with LocalServer({f"{i}.jpg": jpeg(i) for i in range(N) if i % 5 != 4}) as srv:
        yield srv


def run(files, out_dir, **input_opts):
    spec = load_job(data={
        "name": "storage", "input": {"files": files, **input_opts},
        "download": {"image_size": 32, "allow_private_addresses": True, "timeout": 5, "concurrency": 4},
        "output": {"dir": out_dir, "samples_per_shard": 5}, "execution": {"engine": "local", "progress": False}})
    result = run_job(spec)
    assert result.ok, result
    return result


def test_a_job_reads_and_writes_s3_like_the_local_disk(tmp_path, server, s3, capsys):
    urls = tmp_path / "urls"
    urls.mkdir()
    table = pa.table({"url": [server.url(f"{i}.jpg") for i in range(N)], "caption": [f"pic {i}" for i in range(N)]})
    pq.write_table(table.slice(0, 7), urls / "part-0.parquet")
    pq.write_table(table.slice(7), urls / "part-1.parquet")
    (urls / "_SUCCESS").write_bytes(b"")
    upload(urls, s3.url("lists"))
    local = run([str(urls)], str(tmp_path / "out"))
    remote = run([s3.url("lists") + "/"], s3.url("out/job"))
    assert remote.shards_total == local.shards_total == 3 and remote.status_counts == local.status_counts
    keys = s3.keys("out/job/")
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert f"out/job/{name}" in keys
        assert s3.client().get_object(Bucket="mmcurate-test", Key=f"out/job/{name}")["Body"].read() == \
            (tmp_path / "out" / name).read_bytes()
    assert same_summary(summarize(s3.url("out/job")), summarize(tmp_path / "out"))
    assert main(["stream", s3.url("out/job"), "--workers", "0", "--no-progress"]) == 0
    assert f"{local.status_counts['success']} samples in 3 shards" in capsys.readouterr().out


def test_shards_on_s3_are_input_for_a_subset_and_a_sidecar(tmp_path, server, s3):
    """``input.shards`` as an s3:// URL (how the environment's credentials reach moto): a reshard to
    local disk keeps every sample's bytes, and a sidecar written to S3 zips back with its base."""
    from pipeline.loader import ShardDataset

    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [server.url(f"{i}.jpg") for i in range(N)],
                             "caption": [f"pic {i}" for i in range(N)]}), urls)
    run([str(urls)], s3.url("base"))
    assert main(["subset", s3.url("base"), str(tmp_path / "resharded"), "--samples-per-shard", "4",
                 "--engine", "local", "--no-progress"]) == 0
    base = sorted(bytes(s["jpg"]) for s in ShardDataset(s3.url("base"), fields=["jpg"], decode=False))
    again = sorted(bytes(s["jpg"]) for s in ShardDataset(tmp_path / "resharded", fields=["jpg"], decode=False))
    assert again == base and len(base) > 0
    assert all(len(list(tarfile.open(p).getnames())) <= 4 * 3 for p in (tmp_path / "resharded").glob("*.tar"))

    spec = load_job(data={
        "name": "tokens", "input": {"shards": [s3.url("base")]},
        "tokenize": {"text": {"tokenizer": "open_clip", "max_length": 8}},
        "output": {"dir": s3.url("tokens"), "layout": "sidecar"}, "execution": {"engine": "local", "progress": False}})
    assert run_job(spec).ok
    zipped = list(ShardDataset(s3.url("base"), sidecars=[s3.url("tokens")], fields=["jpg", "text_ids.npy"]))
    assert len(zipped) == len(base) and all(len(s["text_ids.npy"]) <= 8 for s in zipped)

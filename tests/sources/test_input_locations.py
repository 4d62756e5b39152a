"""``input.files`` behind any location: local files, folders and globs, and the same through
fsspec URLs (``file://``, ``memory://``, ``s3://`` on a real S3 server, moto on 127.0.0.1), with the
credentials from the AWS environment or from ``input.storage_options`` alone."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import ConfigError
from pipeline.job.build import input_rows, input_shards
from pipeline.job.spec import load_job
from pipeline.sources.formats import count_rows
from pipeline.sources.locations import expand_files

URLS = [f"http://example.test/{i}.jpg" for i in range(25)]
CAPTIONS = [f"caption {i}" for i in range(25)]
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


def write_folder(root: Path) -> Path:
    """A folder as Spark or Ray Data leave it: parts (a parquet, a jsonl in a subfolder), a
    ``_SUCCESS`` marker, a hidden checksum, an unfinished ``_temporary/`` part and a README."""
    (root / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"url": URLS[:13], "caption": CAPTIONS[:13]}), root / "part-0.parquet")
    with open(root / "sub" / "part-1.jsonl", "w") as f:
        f.writelines(json.dumps({"url": u, "caption": c}) + "\n" for u, c in zip(URLS[13:], CAPTIONS[13:]))
    (root / "_SUCCESS").write_bytes(b"")
    (root / ".part-0.parquet.crc").write_bytes(b"not a table")
    (root / "_temporary").mkdir()
    (root / "_temporary" / "part-9.parquet").write_bytes(b"half written")
    (root / "README.md").write_text("not an input")
    return root


def upload(local: Path, url: str, storage_options: dict | None = None) -> None:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{root}/{path.relative_to(local).as_posix()}", path.read_bytes())


def shards(files, **input_opts):
    spec = load_job(data={"input": {"files": [str(f) for f in files], **input_opts},
                          "output": {"samples_per_shard": 10}})
    return [s.batch for s in input_shards(spec)], input_rows(spec)


@pytest.fixture
def local(tmp_path):
    return write_folder(tmp_path / "urls")


@pytest.fixture
def memory_root():
    root = f"memory://mmcurate-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_a_local_folder_is_its_known_files_recursively_without_markers(local):
    parts = [str(local / "part-0.parquet"), str(local / "sub" / "part-1.jsonl")]
    assert expand_files([str(local)]) == parts
    assert expand_files([str(local) + "/"]) == parts
    batches, rows = shards([local])
    assert [len(b["url"]) for b in batches] == [10, 10, 5]
    assert [u for b in batches for u in b["url"]] == URLS
    assert [c for b in batches for c in b["caption"]] == CAPTIONS
    assert rows is None  # not all parquet: not counted up front


def test_a_glob_takes_files_only_and_skips_markers(local, monkeypatch):
    assert expand_files([str(local / "*")]) == [str(local / "README.md"), str(local / "part-0.parquet")]
    assert expand_files([str(local / "**" / "part-*")]) == [str(local / "part-0.parquet"),
                                                            str(local / "sub" / "part-1.jsonl")]
    assert expand_files([str(local / "_*")]) == [str(local / "_SUCCESS")]  # spelled out: wanted
    monkeypatch.chdir(local.parent)  # relative entries come back absolute, in the same order
    assert expand_files(["urls/part-*.parquet"]) == [str(local / "part-0.parquet")]


def test_plain_files_pass_through_in_order(local, memory_root):
    files = [str(local / "sub" / "part-1.jsonl"), str(local / "part-0.parquet"), f"{memory_root}/x.parquet",
             "https://example.test/urls.parquet?X-Amz-Signature=abc"]  # http(s): no folders, no globs
    assert expand_files(files) == files


def test_entries_that_name_nothing_are_config_errors(tmp_path, memory_root):
    (tmp_path / "markers").mkdir()
    (tmp_path / "markers" / "_SUCCESS").write_bytes(b"")
    (tmp_path / "markers" / "notes.md").write_text("")
    for entry, message in ((str(tmp_path / "nothing-*.parquet"), "matches no file"),
                           (str(tmp_path / "markers"), "is a folder with no file of a known format"),
                           (str(tmp_path / "missing") + "/", "no such folder"),
                           (f"{memory_root}/none/*.jsonl", "matches no file")):
        with pytest.raises(ConfigError, match="input.files: .*" + message) as caught:
            expand_files([entry])
        assert repr(entry) in str(caught.value)
    with pytest.raises(ConfigError, match="matches no file"):
        shards([tmp_path / "nothing-*.parquet"])


def test_file_urls_stay_urls_and_read_the_same_rows(local):
    reference, _ = shards([local])
    url = f"file://{local}"
    assert expand_files([url]) == [f"{url}/part-0.parquet", f"{url}/sub/part-1.jsonl"]
    assert shards([url])[0] == reference
    assert shards([f"{url}/**/part-*"])[0] == reference


def test_memory_urls_as_folder_and_glob(local, memory_root):
    reference, _ = shards([local])
    upload(local, f"{memory_root}/urls")
    found = expand_files([f"{memory_root}/urls/"])
    assert found == [f"{memory_root.replace('://', ':///')}/urls/part-0.parquet",
                     f"{memory_root.replace('://', ':///')}/urls/sub/part-1.jsonl"]
    assert shards([f"{memory_root}/urls/"])[0] == reference
    assert shards([f"{memory_root}/urls/*.parquet", f"{memory_root}/urls/sub/*.jsonl"])[0] == reference
    assert shards(found)[0] == reference  # expanded URLs reopen the same way


def test_s3_folder_and_glob_read_the_same_rows_as_local_files(local, s3):
    reference, _ = shards([local])
    upload(local, s3.url("data/urls"))
    assert "data/urls/_SUCCESS" in s3.keys("data/")
    folder = s3.url("data/urls") + "/"
    assert expand_files([folder]) == [s3.url("data/urls/part-0.parquet"), s3.url("data/urls/sub/part-1.jsonl")]
    assert shards([folder])[0] == reference
    assert shards([s3.url("data/urls/**/part-*")])[0] == reference
    assert shards([s3.url("data/urls/part-0.parquet"), s3.url("data/urls/sub/part-1.jsonl")])[0] == reference
    # parquet only: the row count comes from the footers, before any shard
    batches, rows = shards([s3.url("data/urls/*.parquet")])
    assert rows == 13 and [u for b in batches for u in b["url"]] == URLS[:13]


def test_s3_listing_is_fresh(local, s3):
    upload(local, s3.url("grow"))
    assert len(expand_files([s3.url("grow")])) == 2
    s3.client().put_object(Bucket="mmcurate-test", Key="grow/part-2.parquet",
                           Body=(local / "part-0.parquet").read_bytes())
    assert expand_files([s3.url("grow")]) == [s3.url("grow/part-0.parquet"), s3.url("grow/part-2.parquet"),
                                              s3.url("grow/sub/part-1.jsonl")]


def test_storage_options_alone_reach_s3(local, s3, monkeypatch, tmp_path):
    upload(local, s3.url("private/urls"))
    reference, _ = shards([local])
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    assert shards([s3.url("private/urls/")], storage_options=options)[0] == reference
    batches, rows = shards([s3.url("private/urls/*.parquet")], storage_options=options)
    assert rows == 13 and len(batches) == 2
    assert count_rows([s3.url("private/urls/part-0.parquet")], storage_options=options) == 13


def test_local_files_ignore_storage_options(local):
    reference, _ = shards([local])
    assert shards([local], storage_options={"endpoint_url": "http://127.0.0.1:9", "anon": True})[0] == reference

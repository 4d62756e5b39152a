"""Directory: one interface over a local folder and fsspec URLs (moto's S3 on 127.0.0.1,
memory://, file://): files committed whole, listings fresh from storage, what a killed write left
swept, and nothing unpicklable shipped to the workers."""
import os
import pickle

import pytest

from pipeline.sinks import Directory


def roundtrip(d: Directory) -> None:
    d.create()
    d.write("00000.tar", b"x" * 10)
    d.write("a.json", b"{}")
    assert d.names("*.tar") == ["00000.tar"] and d.names() == ["00000.tar", "a.json"]
    assert d.read_bytes("00000.tar") == b"x" * 10 and d.size("00000.tar") == 10
    with d.open("a.json") as f:
        assert f.read() == b"{}"
    assert d.exists("a.json") and not d.exists("b.json") and d.is_dir()
    d.write("a.json", b"[1]")  # replaced whole
    assert d.read_bytes("a.json") == b"[1]"
    d.remove("a.json")
    assert d.names() == ["00000.tar"]


@pytest.mark.parametrize("scheme", ["local", "file", "memory"])
def test_the_same_interface_everywhere(tmp_path, scheme):
    root = {"local": str(tmp_path / "out"), "file": f"file://{tmp_path}/out", "memory": f"memory://{tmp_path.name}/out"}
    d = Directory(root[scheme])
    roundtrip(d)
    if scheme != "memory":
        assert d.local == str(tmp_path / "out") and (tmp_path / "out" / "00000.tar").read_bytes() == b"x" * 10


def test_on_s3_through_the_standard_environment(s3):
    d = Directory(s3.url("job/out"))
    roundtrip(d)
    assert s3.keys() == ["job/out/00000.tar"]  # one object per file, no temporary names


def test_storage_options_reach_the_filesystem(s3, monkeypatch):
    for var in s3.env:
        monkeypatch.delenv(var)
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    d = Directory(s3.url("opts"), options)
    d.create()
    d.write("f", b"1")
    assert s3.keys() == ["opts/f"]


def test_a_killed_upload_is_invisible_and_aborted_on_the_next_open(s3):
    d = Directory(s3.url("out"))
    d.create()
    client = s3.client()
    upload = client.create_multipart_upload(Bucket="mmcurate-test", Key="out/00001.tar")
    client.upload_part(Bucket="mmcurate-test", Key="out/00001.tar", PartNumber=1, UploadId=upload["UploadId"],
                       Body=b"z" * 100)
    assert d.names() == [] and not d.exists("00001.tar")
    assert d.remove_temporaries() == 1
    assert client.list_multipart_uploads(Bucket="mmcurate-test").get("Uploads", []) == []


def test_a_killed_local_write_leaves_only_a_temporary(tmp_path):
    d = Directory(tmp_path)
    (tmp_path / ".00003.tar.tmp").write_bytes(b"partial")
    assert d.names() == [] and d.remove_temporaries() == 1 and not list(tmp_path.iterdir())


def test_relative_paths_are_fixed_where_the_directory_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = Directory("out/job")
    monkeypatch.chdir("/")  # a worker runs elsewhere
    d.create()
    d.write("f", b"1")
    assert (tmp_path / "out" / "job" / "f").read_bytes() == b"1" and str(d) == str(tmp_path / "out" / "job")


def test_pickles_without_its_filesystem(s3):
    d = Directory(s3.url("p"))
    d.create()
    d.write("f", b"1")
    assert d._fs is not None
    copy = pickle.loads(pickle.dumps(d))
    assert copy._fs is None and copy.read_bytes("f") == b"1"


def test_listing_sees_what_other_processes_wrote(s3):
    d = Directory(s3.url("seen"))
    d.create()
    assert d.names() == []
    s3.client().put_object(Bucket="mmcurate-test", Key="seen/00000_stats.json", Body=b"{}")
    assert d.names("*_stats.json") == ["00000_stats.json"]
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint

"""The loader's tar layer (pipeline.loader.tar), on output directories built by
``helpers.loader_output.write_output``."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Optional

import pytest

from helpers.loader_output import write_output
from pipeline.loader.tar import TarFormatError, _samples, _TarReader, split_name
from pipeline.sinks.webdataset import tar_bytes

ALL = {e: e for e in ("jpg", "txt", "json", "text_ids.npy", "clip.npy", "cls", "mp4", "tar")}


def read_all(path: Path, lo: int = 0, hi: Optional[int] = None, want=None, fast: bool = False,
             block: int = 4096) -> list:
    """Read with the header walk, or with the numpy scan (``fast``); a small block makes samples
    straddle buffer refills, so both scan and fallback run."""
    with open(path, "rb", buffering=0) as f:
        return list(_samples(_TarReader(f, block=block), lo, hi, ALL if fast and want is None else want, fast))


both = pytest.mark.parametrize("fast,block", [(False, 4096), (True, 16384), (True, 65536), (True, 1 << 18)])


@both
def test_samples_match_tarfile(tmp_path, fast, block):
    expected = write_output(tmp_path, [50, 0, 3])  # 50 samples of ~5 kB: scans end mid-sample
    got = {}
    for shard in ("00000", "00001", "00002"):
        for key, files in read_all(tmp_path / f"{shard}.tar", fast=fast, block=block):
            got[key] = {ext: data for ext, (_, data) in files.items()}
    assert got == expected
    assert len(got) == 53


@both
def test_range_and_field_selection(tmp_path, fast, block):
    expected = write_output(tmp_path, [6])
    samples = read_all(tmp_path / "00000.tar", 2, 4, {"txt": "caption", "clip.npy": "clip"}, fast, block)
    keys = sorted(expected)[2:4]
    assert [k for k, _ in samples] == keys
    for key, files in samples:
        assert files == {"caption": ("txt", expected[key]["txt"]), "clip": ("clip.npy", expected[key]["clip.npy"])}


class _CountingFile(io.FileIO):
    """Counts the bytes actually read, to check that unwanted members are seeked over."""

    read_bytes = 0

    def readinto(self, b):
        n = super().readinto(b)
        _CountingFile.read_bytes += n or 0
        return n

    def read(self, size=-1):
        data = super().read(size)
        _CountingFile.read_bytes += len(data)
        return data


def test_large_unwanted_members_are_not_read(tmp_path):
    big = b"\x01" * 300_000
    path = tmp_path / "big.tar"
    path.write_bytes(tar_bytes([(f"{k:09d}.{ext}", data) for k in range(4)
                                      for ext, data in (("mp4", big), ("txt", b"hello"))]))
    _CountingFile.read_bytes = 0
    with _CountingFile(path, "rb") as f:
        samples = list(_samples(_TarReader(f, block=65536), 0, None, {"txt": "txt"}))
    assert [files["txt"][1] for _, files in samples] == [b"hello"] * 4
    assert _CountingFile.read_bytes < 4 * 65536 + 4096  # four header blocks, not 1.2 MB of video


@both
def test_pax_and_gnu_long_names(tmp_path, fast, block):
    long_key = "d/" + "k" * 120
    keys = ["000", "001", long_key, "002", "003"]  # plain members around the long one: scan, fall back, scan
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for key in keys if fmt != tarfile.USTAR_FORMAT else ["000", "d/" + "k" * 60 + "/x", "001"]:
                for ext, data in (("txt", key.encode()), ("cls", b"7")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), (1.5 if key == long_key else 0)  # float: a pax header
                    tar.addfile(info, io.BytesIO(data))
        got = read_all(path, fast=fast, block=block)
        want = keys if fmt != tarfile.USTAR_FORMAT else ["000", "d/" + "k" * 60 + "/x", "001"]
        assert [k for k, _ in got] == want, fmt
        assert all(files["txt"] == ("txt", k.encode()) and files["cls"] == ("cls", b"7") for k, files in got)


@both
def test_member_that_is_itself_a_tar(tmp_path, fast, block):
    """Header look-alikes inside member data (a tar in a tar) must not be taken for members."""
    inner = tar_bytes([(f"{i:09d}.txt", b"inner" * 50) for i in range(6)])
    outer = tar_bytes([(f"{k:09d}.{ext}", data) for k in range(5)
                              for ext, data in (("tar", inner), ("txt", str(k).encode()))])
    (tmp_path / "nested.tar").write_bytes(outer)
    got = read_all(tmp_path / "nested.tar", fast=fast, block=block)
    assert [files["txt"][1] for _, files in got] == [b"0", b"1", b"2", b"3", b"4"]
    assert all(files["tar"][1] == inner for _, files in got)


@both
@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage_header"])
def test_corrupt_tars_raise_format_errors(tmp_path, damage, fast, block):
    write_output(tmp_path, [4], failed_every=None)
    data = (tmp_path / "00000.tar").read_bytes()
    second = data.index(b"000000001.jpg") // 512 * 512  # the second sample's first header
    bad = {"truncate_data": data[:second + 512 + 100],  # inside the second jpg
           "truncate_header": data[:second + 200],
           "garbage_header": data[:second] + b"\x07" * 512 + data[second + 512:]}[damage]
    (tmp_path / "bad.tar").write_bytes(bad)
    with pytest.raises(TarFormatError):
        read_all(tmp_path / "bad.tar", fast=fast, block=block)


def test_split_name_follows_webdataset():
    assert split_name("000010002.clip.npy") == ("000010002", "clip.npy")
    assert split_name("dir.v1/abc.tar.gz") == ("dir.v1/abc", "tar.gz")
    assert split_name("noext") == ("noext", "")

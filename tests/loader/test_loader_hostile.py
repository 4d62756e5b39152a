"""Hostile shards and indexes: the loader must give a clear error or skip a sample, never hang,
crash the trainer's process or read outside the dataset. Every test runs under an alarm, so a
regression that loops fails here instead of hanging the suite."""
from __future__ import annotations

import http.server
import io
import json
import os
import random
import shutil
import signal
import struct
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.loader_output import jpeg_bytes, write_output
from pipeline.loader import BadIndexError, ShardDataset, SkippedDataWarning
from pipeline.loader.tar import TarFormatError, _samples, _TarReader
from pipeline.media.npy import npy_bytes
from pipeline.sinks.webdataset import tar_bytes


class Hang(Exception):
    pass


@pytest.fixture(autouse=True)
def alarm():
    """Fail (instead of hanging) any test that takes more than a few seconds."""
    def ring(signum, frame):
        raise Hang("the loader did not finish within the alarm: it loops")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# -- raw tar building ------------------------------------------------------------------------------

def header(name: bytes, size: int = 0, typeflag: bytes = b"0", *, size_field: bytes = None,
           bad_checksum: bool = False) -> bytes:
    """One ustar header block with a correct checksum (unless ``bad_checksum``)."""
    info = tarfile.TarInfo(name.decode("latin1"))
    info.size, info.mtime = size, 0
    info.type = typeflag
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if size_field is not None:
        block[124:136] = size_field.ljust(12, b"\0")[:12]
    block[148:156] = b" " * 8
    checksum = sum(block) + (1 if bad_checksum else 0)
    block[148:156] = b"%06o\0 " % checksum
    return bytes(block)


def member(name: bytes, data: bytes, typeflag: bytes = b"0", **kw) -> bytes:
    return header(name, len(data), typeflag, **kw) + data + bytes(-len(data) % 512)


def pax(records: bytes) -> bytes:
    return member(b"././@PaxHeader", records, b"x")


def record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def finish(*parts: bytes) -> bytes:
    return b"".join(parts) + bytes(1024)


GOOD = member(b"000.txt", b"zero") + member(b"000.cls", b"0")
WANT = {"txt": "txt", "cls": "cls", "mp4": "mp4"}


def read_all(data: bytes, fast: bool, want=WANT, block: int = 4096) -> list:
    return list(_samples(_TarReader(io.BytesIO(data), block), 0, None, want, fast))


paths = pytest.mark.parametrize("fast", [False, True], ids=["walk", "scan"])


# -- item 1: the tar parser ------------------------------------------------------------------------

BAD_PAX = {
    "length_zero": b"0 path=x\n",
    "length_negative": b"-9 path=x\n",
    "length_not_a_number": b"ab path=x\n",
    "length_with_sign": b"+15 path=abcdef\n",
    "length_past_the_header": b"99 path=x\n",
    "no_space": b"12345678\n",
    "no_newline": b"10 path=xy",
    "no_equals": b"9 pathxy\n",
    "size_negative": record("size", "-1024"),
    "size_not_a_number": record("size", "12ab"),
    "key_not_utf8": b"10 \xff\xfe=xyz\n",
}


@paths
@pytest.mark.parametrize("case", sorted(BAD_PAX))
def test_bad_pax_records_are_format_errors(case, fast):
    data = finish(GOOD, pax(BAD_PAX[case]), member(b"001.txt", b"one"))
    with pytest.raises(TarFormatError):
        read_all(data, fast)


@paths
@pytest.mark.parametrize("case", ["size_garbage", "size_base256_huge", "size_past_eof_wanted",
                                  "size_past_eof_unwanted", "checksum_mismatch", "long_name_huge",
                                  "long_name_past_eof", "pax_too_big", "truncated_header"])
def test_hostile_headers_are_format_errors(case, fast):
    huge = b"\x80" + (1 << 80).to_bytes(11, "big")
    parts = {
        "size_garbage": [header(b"001.txt", size_field=b"zz9zz")],
        "size_base256_huge": [header(b"001.txt", size_field=huge)],
        "size_past_eof_wanted": [header(b"001.txt", 10_000_000), b"short"],
        "size_past_eof_unwanted": [header(b"001.bin", 10_000_000), b"short"],
        "checksum_mismatch": [member(b"001.txt", b"one", bad_checksum=True)],
        "long_name_huge": [header(b"././@LongLink", typeflag=b"L", size_field=huge)],
        "long_name_past_eof": [header(b"././@LongLink", 1 << 30, typeflag=b"L"), b"x" * 600],
        "pax_too_big": [pax(record("comment", "x" * (2 << 20))), member(b"001.txt", b"one")],
        "truncated_header": [header(b"001.txt", 3)[:300]],
    }[case]
    data = GOOD + b"".join(parts)  # no end marker: members past EOF must be noticed
    with pytest.raises(TarFormatError):
        read_all(data, fast)


@paths
def test_extended_headers_apply_to_the_next_member_only(fast):
    long = b"d/" + b"k" * 150
    data = finish(GOOD,
                  member(b"././@LongLink", long + b".txt\0", b"L"), header(b"somedir/", typeflag=b"5"),
                  pax(record("path", "pax.txt")), header(b"linkname", typeflag=b"2"),
                  member(b"001.txt", b"one"),
                  pax(record("path", "first.txt")), pax(record("mtime", "1.5")), member(b"x", b"two"))
    got = read_all(data, fast)
    assert [k for k, _ in got] == ["000", "001", "first"]  # nested pax: both apply, merged
    assert got[1][1] == {"txt": ("txt", b"one")}


@paths
def test_checksum_layouts_writers_use_still_read(fast):
    """Seven digits then NUL, and the signed byte sum some old writers computed."""
    def rewrite(block: bytes, signed: bool) -> bytes:
        block = bytearray(block)
        block[148:156] = b" " * 8
        total = sum(b - 256 if signed and b > 127 else b for b in block)
        block[148:156] = b"%07o\0" % total
        return bytes(block)

    name = "000é.txt".encode("latin1")  # a byte over 127: the two sums differ
    data = finish(rewrite(header(name, 3), signed=True) + b"abc" + bytes(509),
                  rewrite(header(b"001.txt", 3), signed=False) + b"def" + bytes(509))
    got = read_all(data, fast)
    assert [f["txt"][1] for _, f in got] == [b"abc", b"def"]


@paths
def test_pax_size_is_used(fast):
    payload = b"p" * 700
    data = finish(pax(record("size", "700")), header(b"000.txt", size_field=b"00000000000"), payload,
                  bytes(-700 % 512), member(b"001.txt", b"one"))
    assert [f["txt"][1] for _, f in read_all(data, fast)] == [payload, b"one"]


@paths
def test_random_header_damage_never_hangs_or_crashes(tmp_path, fast):
    """Seeded mutations of the header bytes of a real shard: each read ends with samples or a
    TarFormatError, never another exception and never a loop."""
    write_output(tmp_path, [6], failed_every=None)
    good = (tmp_path / "00000.tar").read_bytes()
    heads = [i for i in range(0, len(good), 512) if good[i + 257:i + 262] == b"ustar"]
    rng = random.Random(12)
    outcomes = {"ok": 0, "error": 0}
    for trial in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            at = rng.choice(heads) + rng.choice([rng.randrange(512), *range(124, 136), 156, *range(148, 156)])
            data[at] = rng.choice([0, 0x20, 0x2D, 0x30, 0x37, 0x39, 0x78, 0x4C, 0x80, 0xFF, rng.randrange(256)])
        try:
            read_all(bytes(data), fast, want={"jpg": "jpg", "txt": "txt"})
            outcomes["ok"] += 1
        except TarFormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 50, outcomes


# -- dataset helpers -------------------------------------------------------------------------------

def shard_dir(root: Path, members: list[tuple[str, bytes]], nsamples: int = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = tar_bytes(members)
    (root / "00000.tar").write_bytes(data)
    keys = {name.split(".", 1)[0] for name, _ in members}
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "t",
             "shardlist": [{"url": "00000.tar", "nsamples": len(keys) if nsamples is None else nsamples,
                            "filesize": len(data)}]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def delivered(ds: ShardDataset) -> tuple[list[dict], str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(ds)
    return items, " | ".join(str(w.message) for w in caught if issubclass(w.category, SkippedDataWarning))


def png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


# -- item 2: image formats -------------------------------------------------------------------------

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A ``gs`` first on PATH that records being run; PIL looks it up afresh."""
    from PIL import EpsImagePlugin

    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-was-run"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None, raising=False)
    return marker


def tga_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TGA")
    return buf.getvalue()


@pytest.mark.parametrize("image_size", [None, 8])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_non_whitelisted_formats_are_refused_without_ghostscript(tmp_path, fake_ghostscript, image_size,
                                                                 batch_size):
    root = shard_dir(tmp_path / "d", [("000.jpg", EPS), ("001.jpg", jpeg_bytes(1)), ("002.png", tga_bytes())])
    ds = ShardDataset(str(root), fields={"image": "jpg;png"}, image_size=image_size, batch_size=batch_size)
    items, messages = delivered(ds)
    keys = [k for item in items for k in (item["__key__"] if batch_size else [item["__key__"]])]
    assert keys == ["001"]
    assert not fake_ghostscript.exists()
    assert messages.count("decode_error") == 2 and "sample 000" in messages and "sample 002" in messages


@pytest.mark.parametrize("image_size", [None, 8])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_pixel_cap_applies_to_every_decode_path(tmp_path, image_size, batch_size):
    root = shard_dir(tmp_path / "d", [("000.jpg", jpeg_bytes(0, (40, 40))), ("001.png", png_bytes((40, 40))),
                                      ("002.jpg", jpeg_bytes(2, (20, 20)))])
    ds = ShardDataset(str(root), fields={"image": "jpg;png"}, image_size=image_size, batch_size=batch_size,
                      max_pixels=1000)
    items, messages = delivered(ds)
    keys = [k for item in items for k in (item["__key__"] if batch_size else [item["__key__"]])]
    assert keys == ["002"]
    assert messages.count("decompression_bomb") == 2 and "1600 pixels" in messages
    assert ShardDataset(str(root)).image.max_pixels == 89_478_485  # the download default


def test_max_pixels_must_be_positive(tmp_path):
    root = shard_dir(tmp_path / "d", [("000.txt", b"x")])
    with pytest.raises(ValueError, match="max_pixels"):
        ShardDataset(str(root), max_pixels=0)


# -- item 3: index.json ----------------------------------------------------------------------------

def write_index(root: Path, shardlist) -> None:
    (root / "index.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": shardlist}))


@pytest.fixture
def small(tmp_path):
    root = tmp_path / "ds"
    write_output(root, [3, 2], failed_every=None)
    return root


@pytest.mark.parametrize("value", [-1, "3", 2.5, True, None, 10 ** 12])
def test_bad_counts_are_refused_naming_shard_and_field(small, value):
    write_index(small, [{"url": "00000.tar", "nsamples": 3}, {"url": "00001.tar", "nsamples": value}])
    with pytest.raises(BadIndexError) as info:
        ShardDataset(str(small))
    assert "00001.tar" in str(info.value) and "nsamples" in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("index", [{}, {"shardlist": "00000.tar"}, {"shardlist": ["00000.tar"]},
                                   {"shardlist": [{"nsamples": 3}]}, {"shardlist": [{"url": 7, "nsamples": 3}]},
                                   {"shardlist": [{"url": "00000.tar", "nsamples": 3, "filesize": "big"}]},
                                   {"shardlist": [{"url": "00000.tar", "nsamples": 3, "filesize": -5}]}])
def test_malformed_indexes_are_refused(small, index):
    (small / "index.json").write_text(json.dumps(index))
    with pytest.raises(BadIndexError, match="index.json"):
        ShardDataset(str(small))


@pytest.mark.parametrize("raw", [b"\xff{not json", b"[" * 100_000, b'{"shardlist": [' + b"[" * 100_000])
def test_index_that_is_not_json_is_refused(small, raw):
    (small / "index.json").write_bytes(raw)
    with pytest.raises(BadIndexError, match="index.json"):
        ShardDataset(str(small))


def test_a_missing_shards_count_is_bounded_by_the_sources_bytes(small):
    """A missing shard is skipped and counted; a count no data could back would only spin."""
    write_index(small, [{"url": "00000.tar", "nsamples": 3}, {"url": "gone.tar", "nsamples": 2}])
    items, messages = delivered(ShardDataset(str(small), decode=False))
    assert [i["__key__"] for i in items] == ["000000000", "000000001", "000000002"] and "gone.tar" in messages
    write_index(small, [{"url": "00000.tar", "nsamples": 3}, {"url": "gone.tar", "nsamples": 10 ** 9}])
    with pytest.raises(BadIndexError, match="gone.tar"):
        ShardDataset(str(small))


def test_counts_that_do_not_match_the_tar_are_reported(small):
    """The index defines the epoch; a tar holding fewer or more samples is reported, the rest used."""
    write_index(small, [{"url": "00000.tar", "nsamples": 5}, {"url": "00001.tar", "nsamples": 1}])
    items, messages = delivered(ShardDataset(str(small), decode=False))
    assert [i["__key__"] for i in items] == ["000000000", "000000001", "000000002", "000010000"]
    assert "00000.tar" in messages and "fewer samples" in messages
    assert "00001.tar" in messages and "more samples" in messages


@pytest.fixture
def outside(tmp_path, small):
    """A tar next to (not under) the dataset root, and a symlink under it pointing there."""
    shutil.copy(small / "00001.tar", tmp_path / "elsewhere.tar")
    (small / "link.tar").symlink_to(tmp_path / "elsewhere.tar")
    return tmp_path / "elsewhere.tar"


@pytest.mark.parametrize("url", ["../elsewhere.tar", "{outside}", "file://{outside}", "sub/../../elsewhere.tar",
                                 "link.tar", "/etc/passwd", "memory://elsewhere.tar"])
def test_shards_outside_the_root_are_refused(small, outside, url):
    url = url.format(outside=outside)
    write_index(small, [{"url": "00000.tar", "nsamples": 3}, {"url": url, "nsamples": 2}])
    with pytest.raises(BadIndexError, match="outside the dataset root") as info:
        ShardDataset(str(small))
    assert url in str(info.value) and "allow_outside_root" in str(info.value)


def test_allow_outside_root_reads_them(small, outside):
    write_index(small, [{"url": "00000.tar", "nsamples": 3}, {"url": "../elsewhere.tar", "nsamples": 2},
                        {"url": "link.tar", "nsamples": 2}])
    items, messages = delivered(ShardDataset(str(small), decode=False, allow_outside_root=True))
    assert len(items) == 7 and not messages


def test_shards_inside_the_root_still_read(small):
    (small / "sub").mkdir()
    shutil.move(small / "00001.tar", small / "sub" / "00001.tar")
    write_index(small, [{"url": "./00000.tar", "nsamples": 3}, {"url": "sub/../sub/00001.tar", "nsamples": 2},
                        {"url": f"{small}/00000.tar", "nsamples": 3}])
    items, messages = delivered(ShardDataset(str(small), decode=False))
    assert len(items) == 8 and not messages


class _Counting(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):
        _Counting.requests += 1
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_loopback_http_shard_is_refused_without_a_request(small):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/admin/00000.tar"
        write_index(small, [{"url": url, "nsamples": 3}])
        with pytest.raises(BadIndexError, match="outside the dataset root"):
            list(ShardDataset(str(small)))
    finally:
        server.shutdown()
        server.server_close()
    assert _Counting.requests == 0


def test_remote_roots_are_confined_too(small):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in small.iterdir():
        if path.is_file() and not path.is_symlink():
            fs.pipe(f"/hostile-root/{path.name}", path.read_bytes())
    fs.pipe("/hostile-other/00001.tar", (small / "00001.tar").read_bytes())
    shardlist = [{"url": "00000.tar", "nsamples": 3}, {"url": "memory://hostile-root/00001.tar", "nsamples": 2}]
    fs.pipe("/hostile-root/index.json", json.dumps({"shardlist": shardlist}).encode())
    assert len(list(ShardDataset("memory://hostile-root", decode=False))) == 5
    for bad in ("../hostile-other/00001.tar", "memory://hostile-other/00001.tar", "file:///etc/passwd"):
        fs.pipe("/hostile-root/index.json", json.dumps({"shardlist": [{"url": bad, "nsamples": 2}]}).encode())
        with pytest.raises(BadIndexError, match="outside the dataset root"):
            ShardDataset("memory://hostile-root")
    fs.pipe("/hostile-root/index.json", json.dumps({"shardlist": [{"url": "00000.tar", "nsamples": 10 ** 6}]}).encode())
    with pytest.raises(BadIndexError, match="nsamples"):
        ShardDataset("memory://hostile-root")


@pytest.mark.parametrize("indexed", [True, False])
def test_a_fifo_shard_does_not_block(small, indexed):
    """Opening a FIFO blocks until a writer comes: the loader must not open one."""
    (small / "00001.tar").unlink()
    os.mkfifo(small / "00001.tar")
    if not indexed:
        (small / "index.json").unlink()
        with pytest.raises(OSError, match="not a regular file"):
            ShardDataset(str(small))
        return
    write_index(small, [{"url": "00000.tar", "nsamples": 3}, {"url": "00001.tar", "nsamples": 0}])
    items, messages = delivered(ShardDataset(str(small), decode=False))
    assert len(items) == 3
    write_index(small, [{"url": "00000.tar", "nsamples": 3}, {"url": "00001.tar", "nsamples": 1}])
    with pytest.raises(BadIndexError, match="00001.tar"):
        ShardDataset(str(small))
    write_index(small, [{"url": "00000.tar", "nsamples": 3}])
    ds = ShardDataset(str(small), decode=False, fields=["txt"])
    (small / "00000.tar").unlink()
    os.mkfifo(small / "00000.tar")  # replaced after the index was checked
    items, messages = delivered(ds)
    assert items == [] and "not a regular file" in messages


def test_scanned_directory_names_a_corrupt_tar(small):
    (small / "index.json").unlink()
    (small / "00001.tar").write_bytes(b"\x07" * 2048)
    with pytest.raises(BadIndexError, match="00001.tar"):
        ShardDataset(str(small))


# -- item 4: other members -------------------------------------------------------------------------

def npy_with_header(header: str, payload: bytes = b"\0" * 16) -> bytes:
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + payload


HOSTILE_NPY = {
    "huge_shape": npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 100000), }"),
    "huge_zero_shape": npy_with_header("{'descr': '<i4', 'fortran_order': False, "
                                       "'shape': (0, 4611686018427387904, 4611686018427387904), }"),
    "negative_shape": npy_with_header("{'descr': '<i4', 'fortran_order': False, 'shape': (-1, -4), }"),
    "object": npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }"),
    "nested": npy_with_header("(" * 150 + ")" * 150),
    "huge_itemsize": npy_with_header("{'descr': '|V2000000000', 'fortran_order': False, 'shape': (8,), }"),
    "v2_huge_header": b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{'descr'",
    "short": b"\x93NUM",
}


@pytest.mark.parametrize("batch_size", [None, 2])
def test_hostile_npy_members_are_skipped(tmp_path, batch_size):
    good = npy_bytes(np.arange(4, dtype=np.int32))
    names = sorted(HOSTILE_NPY)
    members = [(f"{i:03d}.ids.npy", HOSTILE_NPY[n]) for i, n in enumerate(names)] + [("999.ids.npy", good)]
    root = shard_dir(tmp_path / "d", members)
    items, messages = delivered(ShardDataset(str(root), fields=["ids.npy"], batch_size=batch_size))
    keys = [k for item in items for k in (item["__key__"] if batch_size else [item["__key__"]])]
    assert keys == ["999"]
    assert messages.count("cannot decode") == len(names)


def test_bad_text_and_json_members_are_skipped(tmp_path):
    root = shard_dir(tmp_path / "d", [("000.txt", b"\xff\xfe"), ("001.json", b"[" * 100_000),
                                      ("002.json", b"1" * 10_000), ("003.txt", b"fine")])
    items, messages = delivered(ShardDataset(str(root)))
    assert [i["__key__"] for i in items] == ["003"] and messages.count("cannot decode") == 3


# -- the stream command ----------------------------------------------------------------------------

def test_stream_reports_a_bad_index_without_a_traceback(small, capsys):
    from pipeline.cli.main import main

    write_index(small, [{"url": "00000.tar", "nsamples": -3}])
    assert main(["stream", str(small), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "00000.tar" in err and "nsamples" in err and "-3" in err and "Traceback" not in err


def test_stream_allow_outside_root(small, outside, capsys):
    from pipeline.cli.main import main

    write_index(small, [{"url": "../elsewhere.tar", "nsamples": 2}])
    assert main(["stream", str(small), "--workers", "0", "--no-progress"]) == 2
    assert "outside the dataset root" in capsys.readouterr().err
    assert main(["stream", str(small), "--workers", "0", "--no-progress", "--allow-outside-root",
                 "--max-pixels", "100000"]) == 0
    assert "2 samples in 1 shards" in capsys.readouterr().out

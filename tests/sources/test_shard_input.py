"""Existing WebDataset shards as input: a generic webdataset, img2dataset's layout (its
per-shard parquet decides which samples are input), a truncated tar, a sample without media, and
the brace patterns and folders ``input.shards`` takes."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.sinks.webdataset import tar_bytes
from pipeline.sources.shard_input import (SOURCE_KEY, SOURCE_SHARD, expand_shards, plan_shard_input,
                                          read_samples, shard_number)


def jpeg(w: int, h: int, colour=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "JPEG")
    return buf.getvalue()


def write_generic(path, n: int, start: int = 0) -> dict[str, bytes]:
    images = {f"s{start + i:03d}": jpeg(20 + i, 30 + i) for i in range(n)}
    members = []
    for key, img in images.items():
        members += [(f"{key}.jpg", img), (f"{key}.txt", f"caption of {key}".encode()),
                    (f"{key}.cls", b"7")]
    path.write_bytes(tar_bytes(members))
    return images


def test_generic_webdataset_rows_come_from_the_tar(tmp_path):
    images = write_generic(tmp_path / "a.tar", 5)
    [shard] = plan_shard_input(expand_shards([str(tmp_path)]), samples_per_shard=10)
    b = shard.batch
    assert b[schema.STATUS] == [schema.PENDING] * 5  # no URL is no fault: the media are here
    assert b[schema.URL] == [None] * 5
    assert b[schema.CAPTION] == [f"caption of {k}" for k in images]
    assert b[schema.WIDTH] == [20 + i for i in range(5)] and b[schema.HEIGHT] == [30 + i for i in range(5)]
    assert [f["jpg"] for f in b[schema.FILES]] == list(images.values())
    assert all(set(f) == {"jpg", "cls"} for f in b[schema.FILES])  # txt/json are written again
    assert b[schema.INPUT_MEMBERS][0] == ("cls", "jpg")  # what files holds
    assert b[SOURCE_KEY] == list(images) and b[schema.KEY] == [schema.make_key(0, i, 10) for i in range(5)]


def test_full_layout_reshards_across_tars_and_sidecar_keeps_tars(tmp_path):
    write_generic(tmp_path / "00003.tar", 4)
    write_generic(tmp_path / "00007.tar", 3, start=4)
    tars = expand_shards([str(tmp_path / "{00003,00007}.tar")])
    full = list(plan_shard_input(tars, samples_per_shard=3))
    assert [len(s.batch[schema.KEY]) for s in full] == [3, 3, 1]
    assert [k for s in full for k in s.batch[SOURCE_KEY]] == [f"s{i:03d}" for i in range(7)]
    assert full[1].batch[SOURCE_SHARD] == [tars[0], tars[1], tars[1]]
    side = list(plan_shard_input(tars, samples_per_shard=3, layout="sidecar"))
    assert [s.shard_id for s in side] == [3, 7]
    assert side[1].batch[schema.KEY] == ["s004", "s005", "s006"] and SOURCE_KEY not in side[1].batch
    assert shard_number("x/abc.tar", 5) == 5


def test_img2dataset_layout_uses_its_parquet(tmp_path):
    """img2dataset's writer: NNNNN.tar (KEY.jpg/.txt/.json), NNNNN.parquet of every row (failed
    ones too, absent from the tar), NNNNN_stats.json."""
    keys = ["000000000", "000000001", "000000002"]
    rows = {"url": [f"http://e.com/{i}.jpg" for i in range(3)], "caption": ["a red cat", "failed", "a dog"],
            "key": keys, "status": ["success", "failed_to_download", "success"],
            "error_message": [None, "timeout", None], "width": [32, None, 40], "height": [24, None, 30],
            "original_width": [320, None, 400], "original_height": [240, None, 300],
            "exif": ["{}", None, "{}"], "sha256": ["aa", None, "bb"]}
    pq.write_table(pa.table(rows), tmp_path / "00000.parquet")
    members = []
    for i in (0, 2):
        meta = {c: rows[c][i] for c in rows}
        members += [(f"{keys[i]}.jpg", jpeg(rows["width"][i], rows["height"][i])),
                    (f"{keys[i]}.txt", rows["caption"][i].encode()), (f"{keys[i]}.json", json.dumps(meta).encode())]
    (tmp_path / "00000.tar").write_bytes(tar_bytes(members))
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2}))
    [shard] = plan_shard_input(expand_shards([str(tmp_path)]), samples_per_shard=8)
    b = shard.batch
    assert b[SOURCE_KEY] == [keys[0], keys[2]]
    assert b[schema.URL] == ["http://e.com/0.jpg", "http://e.com/2.jpg"]
    assert b[schema.ORIGINAL_WIDTH] == [320, 400] and b[schema.SHA256] == ["aa", "bb"]
    assert b["exif"] == ["{}", "{}"] and b[schema.ERROR_MESSAGE] == [None, None]  # the source's outcome is not input


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    write_generic(tmp_path / "00000.tar", 6)
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2])
    samples, problem = read_samples(str(tmp_path / "00000.tar"))
    assert problem and 0 < len(samples) < 6
    assert [k for k, _ in samples] == [f"s{i:03d}" for i in range(len(samples))]
    assert all("jpg" in f and "txt" in f for _, f in samples)
    [shard] = plan_shard_input([str(tmp_path / "00000.tar")], samples_per_shard=8)
    assert shard.batch[schema.STATUS] == [schema.PENDING] * len(samples)


def test_sample_without_media_is_an_invalid_row(tmp_path):
    (tmp_path / "00000.tar").write_bytes(tar_bytes([("a.jpg", jpeg(8, 8)), ("b.txt", b"no image here")]))
    [shard] = plan_shard_input([str(tmp_path / "00000.tar")], samples_per_shard=8)
    assert shard.batch[schema.STATUS] == [schema.PENDING, schema.INVALID_INPUT]
    assert shard.batch[schema.ERROR_KIND][1] == "malformed_row"
    assert "b" in shard.batch[schema.ERROR_MESSAGE][1] and "no image or video" in shard.batch[schema.ERROR_MESSAGE][1]


def test_an_entry_without_tars_names_itself(tmp_path):
    with pytest.raises(ConfigError, match="input.shards: .*holds no .tar"):
        expand_shards([str(tmp_path)])

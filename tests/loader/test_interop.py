"""The shards a job writes load, every field intact, with webdataset, Hugging Face datasets and
Ray Data, and those readers see exactly what mmcurate's own loader sees."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from helpers.loader_output import write_output
from pipeline.loader import ShardDataset

SIZES = [5, 0, 4, 3]  # includes a shard whose rows all failed: an empty tar


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    expected = write_output(root, SIZES)
    urls = [str(root / f"{i:05d}.tar") for i in range(len(SIZES))]
    return root, urls, expected


def fields(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def test_expected_fields_are_all_there(out):
    _, _, expected = out
    assert len(expected) == sum(SIZES)
    assert all(set(files) == {"jpg", "txt", "json", "text_ids.npy", "clip.npy"} for files in expected.values())


def test_mmcurate_loader_reads_every_byte(out):
    root, _, expected = out
    got = {s["__key__"]: fields(s) for s in ShardDataset(str(root), decode=False)}
    assert got == expected


def test_webdataset_reads_every_byte(out):
    import webdataset as wds

    _, urls, expected = out
    got = {s["__key__"]: fields(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    assert got == expected


def test_huggingface_datasets_reads_every_field(out, tmp_path):
    import datasets

    _, urls, expected = out
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", cache_dir=str(tmp_path))
    assert isinstance(ds.features["jpg"], datasets.Image)
    ds = ds.cast_column("jpg", datasets.Image(decode=False))  # the stored bytes, not a re-decoded image
    assert len(ds) == len(expected)
    for row in ds:
        want = expected[row["__key__"]]
        assert row["jpg"]["bytes"] == want["jpg"]
        assert row["txt"] == want["txt"].decode("utf-8")
        assert row["json"] == json.loads(want["json"])
        for name in ("text_ids.npy", "clip.npy"):
            ref = np.load(io.BytesIO(want[name]))
            got = np.asarray(row[name], dtype=ref.dtype)
            assert got.shape == ref.shape and np.array_equal(got, ref), name


def test_ray_data_reads_every_byte(out, ray_cluster):
    import ray

    _, urls, expected = out
    rows = ray.data.read_webdataset(urls, decoder=None).take_all()
    got = {row["__key__"]: {k: bytes(v) for k, v in fields(row).items()} for row in rows}
    assert got == expected


def test_ray_default_decoding_matches(out, ray_cluster):
    import ray

    _, urls, expected = out
    for row in ray.data.read_webdataset(urls).take_all():
        want = expected[row["__key__"]]
        assert row["txt"] == want["txt"].decode("utf-8") and row["json"] == json.loads(want["json"])
        assert np.array_equal(row["text_ids.npy"], np.load(io.BytesIO(want["text_ids.npy"])))
        assert row["jpg"].shape == (16, 24, 3)

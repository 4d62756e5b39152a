"""pipeline.loader on real output directories: exact epochs, shuffling, resume, decoding, damage."""
from __future__ import annotations

import io
import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.loader_output import jpeg_bytes, write_output
from pipeline.loader import Loader, ShardDataset, ShardError, SkippedDataWarning
from pipeline.loader.plan import epoch_draws, mix_order, mix_prefix, split_evenly, worker_ranges

SIZES = [6, 0, 9, 4, 5]  # an empty shard included, as jobs where every row failed produce
TOTAL = sum(SIZES)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    expected = write_output(root / "a", SIZES)
    return root / "a", expected


def keys_of(items) -> list[str]:
    return [k for item in items for k in (item["__key__"] if isinstance(item["__key__"], list) else [item["__key__"]])]


def all_worker_keys(make, world_size: int, workers: int) -> dict[tuple[int, int], list[str]]:
    return {(r, w): keys_of(make(r).iter_worker(w, workers)) for r in range(world_size) for w in range(workers)}


# -- planning --------------------------------------------------------------------------------------

def test_split_evenly_and_worker_ranges():
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(10, 3, offset=2) == [3, 3, 4]
    # 10 samples, batches of 4, 2 workers: whole batches per worker, only the last one short.
    assert worker_ranges(10, 2, 4, drop_last=False) == [(0, 8), (8, 10)]
    assert worker_ranges(10, 2, 4, drop_last=True) == [(0, 4), (4, 8)]
    assert worker_ranges(3, 4, 2, drop_last=False) == [(0, 2), (2, 3), (3, 3), (3, 3)]


def test_mix_prefix_agrees_with_the_merged_order():
    counts = [7, 3, 12, 1]
    order = list(mix_order(counts, 0, sum(counts)))
    assert Counter(order) == dict(enumerate(counts))
    for t in range(sum(counts) + 1):
        assert mix_prefix(counts, t) == [order[:t].count(i) for i in range(len(counts))]
        assert list(mix_order(counts, t, sum(counts))) == order[t:]
    # smooth: the small source is not bunched at one end
    assert order.index(3) not in (0, len(order) - 1)


def test_epoch_draws_follow_weights():
    assert epoch_draws([10, 30], None, None) == [10, 30]
    assert epoch_draws([10, 30], [1, 1], None) == [20, 20]
    assert epoch_draws([10, 30], [2, 1], 10) == [7, 3]
    with pytest.raises(ValueError):
        epoch_draws([10], [0], None)


# -- exact epochs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,workers,batch_size,shuffle", [
    (1, 1, None, False), (2, 3, None, True), (3, 2, 4, True), (4, 1, 5, False), (5, 4, None, True)])
def test_ranks_and_workers_partition_the_dataset(out, world_size, workers, batch_size, shuffle):
    root, expected = out

    def make(rank):
        return ShardDataset(str(root), rank=rank, world_size=world_size, batch_size=batch_size, shuffle=shuffle,
                            shuffle_buffer=3, seed=5, decode=False)

    parts = all_worker_keys(make, world_size, workers)
    flat = [k for keys in parts.values() for k in keys]
    assert sorted(flat) == sorted(expected)  # every sample exactly once
    for r in range(world_size):
        assert sum(len(parts[r, w]) for w in range(workers)) == make(r).num_samples
    assert max(make(r).num_samples for r in range(world_size)) - min(
        make(r).num_samples for r in range(world_size)) <= 1


def test_drop_remainder_gives_equal_ranks(out):
    root, expected = out
    datasets = [ShardDataset(str(root), rank=r, world_size=4, drop_remainder=True, decode=False) for r in range(4)]
    keys = [keys_of(ds) for ds in datasets]
    assert [len(k) for k in keys] == [TOTAL // 4] * 4 == [ds.num_samples for ds in datasets]
    flat = [k for ks in keys for k in ks]
    assert len(set(flat)) == len(flat) and set(flat) <= set(expected)


def test_batches_are_exactly_as_announced(out):
    root, _ = out
    ds = ShardDataset(str(root), batch_size=4, decode=False)
    for workers in (1, 2, 3):
        sizes = [len(b["__key__"]) for w in range(workers) for b in ds.iter_worker(w, workers)]
        assert len(sizes) == len(ds) == -(-TOTAL // 4)
        assert sorted(sizes)[1:] == [4] * (len(sizes) - 1)  # one short batch at most
    ds = ShardDataset(str(root), batch_size=4, drop_last=True, decode=False)
    assert [len(b["__key__"]) for b in ds] == [4] * (TOTAL // 4) and len(ds) == TOTAL // 4


def test_dataloader_workers_deliver_every_sample_once(out):
    root, expected = out
    loader = Loader(ShardDataset(str(root), batch_size=3, shuffle=True, decode=False), num_workers=2)
    assert len(loader) == -(-TOTAL // 3)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert sorted(keys_of(batches)) == sorted(expected)
    assert loader.stats() == {"epoch": 0, "expected": TOTAL, "delivered": TOTAL, "missing": 0}


# -- shuffling and epochs --------------------------------------------------------------------------

def test_shuffle_is_seeded_by_seed_and_epoch(out):
    root, expected = out

    def order(seed, epoch):
        ds = ShardDataset(str(root), shuffle=True, seed=seed, shuffle_buffer=4, decode=False)
        ds.set_epoch(epoch)
        return keys_of(ds)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert sorted(order(1, 1)) == sorted(expected)
    assert keys_of(ShardDataset(str(root), decode=False)) == sorted(expected)  # no shuffle: index order


def test_passes_move_to_the_next_epoch(out):
    root, _ = out
    ds = ShardDataset(str(root), shuffle=True, seed=3, decode=False)
    first, second = keys_of(ds), keys_of(ds)
    assert ds.epoch == 1 and sorted(first) == sorted(second) and first != second
    ds.set_epoch(1)  # a loop that calls set_epoch every epoch: no reset when already there
    assert ds.stats()["delivered"] == TOTAL


# -- resume ----------------------------------------------------------------------------------------

def test_resume_in_process_continues_the_same_order(out):
    root, _ = out
    kwargs = dict(shuffle=True, seed=9, shuffle_buffer=5, decode=False, batch_size=2)
    full = keys_of(ShardDataset(str(root), **kwargs))
    ds = ShardDataset(str(root), **kwargs)
    it = iter(ds)
    head = keys_of([next(it) for _ in range(4)])
    state = json.loads(json.dumps(ds.state_dict()))  # survives a JSON round trip
    resumed = ShardDataset(str(root), **kwargs)
    resumed.load_state_dict(state)
    assert head + keys_of(resumed) == full


def test_resume_with_dataloader_workers(out):
    root, expected = out
    kwargs = dict(shuffle=True, seed=4, shuffle_buffer=3, batch_size=2, decode=False)
    loader = Loader(ShardDataset(str(root), **kwargs), num_workers=2)
    it = iter(loader)
    head = keys_of([next(it) for _ in range(5)])
    state = loader.state_dict()
    del it
    resumed = Loader(ShardDataset(str(root), **kwargs), num_workers=2)
    resumed.load_state_dict(state)
    tail = keys_of(resumed)
    assert sorted(head + tail) == sorted(expected)
    assert resumed.stats()["delivered"] == TOTAL
    with pytest.raises(ValueError, match="same number"):
        other = Loader(ShardDataset(str(root), **kwargs), num_workers=3)
        other.load_state_dict(state)
        next(iter(other))


def test_resume_refuses_a_different_setup(out):
    root, _ = out
    ds = ShardDataset(str(root), shuffle=True, decode=False)
    next(iter(ds))
    with pytest.raises(ValueError, match="different"):
        ShardDataset(str(root), shuffle=True, seed=1, decode=False).load_state_dict(ds.state_dict())


# -- mixing ----------------------------------------------------------------------------------------

def ids_of(items) -> list[str]:
    """``url/key`` per sample: keys alone repeat across sources (every job starts at shard 0)."""
    return [f"{u}/{k}" for item in items for u, k in zip(item["__url__"], item["__key__"])]


def test_weighted_mix_and_subsampled_source_coverage(tmp_path, out):
    root, expected_a = out
    write_output(tmp_path / "b", [3, 2], image=False, npy=False)
    ds = ShardDataset({str(root): 1.0, str(tmp_path / "b"): 1.0}, epoch_size=10, batch_size=10, decode=False)
    assert ds.draws == [5, 5] and len(ds) == 1 and ds.num_samples == 10
    seen_a: Counter = Counter()
    for epoch in range(6):  # 30 draws of a 24-sample source: everything once, some twice
        ds.set_epoch(epoch)
        ids = ids_of(ds)
        from_b = [i for i in ids if str(tmp_path / "b") in i]
        assert len(from_b) == 5 and len(ids) == 10
        seen_a.update(i for i in ids if str(root) in i)
    assert len(seen_a) == len(expected_a) and set(seen_a.values()) == {1, 2}


def test_weighted_mix_is_exact_across_ranks_and_workers(tmp_path, out):
    root, expected_a = out
    write_output(tmp_path / "b", [3, 2], image=False, npy=False)
    sources = {str(root): 3.0, str(tmp_path / "b"): 1.0}

    def make(rank):
        return ShardDataset(sources, rank=rank, world_size=2, epoch_size=40, shuffle=True, batch_size=2,
                            decode=False)

    parts = {(r, w): ids_of(make(r).iter_worker(w, 3)) for r in range(2) for w in range(3)}
    flat = Counter(i for ids in parts.values() for i in ids)
    from_b = {i: n for i, n in flat.items() if str(tmp_path / "b") in i}
    assert sum(flat.values()) == 40 and sum(from_b.values()) == 10
    assert set(from_b.values()) == {2}  # 10 draws of 5 samples: each exactly twice
    assert set(flat.values()) - {1, 2} == set() and len(flat) - len(from_b) == 24  # 30 of 24: all seen
    assert [sum(len(parts[r, w]) for w in range(3)) for r in range(2)] == [20, 20]


# -- decoding and fields ---------------------------------------------------------------------------

def test_decoding_every_kind(out):
    root, expected = out
    sample = next(iter(ShardDataset(str(root))))
    raw = expected[sample["__key__"]]
    ref = np.array(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"))
    assert sample["jpg"].dtype == torch.uint8 and sample["jpg"].shape == (3, *ref.shape[:2])
    assert np.abs(sample["jpg"].permute(1, 2, 0).numpy().astype(int) - ref).max() <= 2  # libjpeg-turbo vs PIL IDCT
    assert sample["txt"] == raw["txt"].decode() and sample["json"] == json.loads(raw["json"])
    np.testing.assert_array_equal(sample["text_ids.npy"].numpy(), np.load(io.BytesIO(raw["text_ids.npy"])))
    assert sample["clip.npy"].dtype == torch.float16 and sample["clip.npy"].shape == (2, 3)
    assert sample["__url__"].endswith("00000.tar")


def test_field_selection_aliases_and_batch_decoding(out):
    root, expected = out
    ds = ShardDataset(str(root), fields={"image": "png;jpg", "tokens": "text_ids.npy"}, batch_size=5,
                      image_dtype="float32", image_size=8)
    batch = next(iter(ds))
    assert set(batch) == {"image", "tokens", "__key__", "__url__", "__worker__", "__step__"}
    assert batch["image"].shape == (5, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["tokens"].shape == (5, 7) and batch["tokens"].dtype == torch.int32


def test_raw_bytes_and_custom_decoders(out):
    root, expected = out
    sample = next(iter(ShardDataset(str(root), decode=False)))
    assert {k: v for k, v in sample.items() if not k.startswith("__")} == expected[sample["__key__"]]
    ds = ShardDataset(str(root), fields="txt,jpg", decoders={"txt": lambda b: b.upper()})
    sample = next(iter(ds))
    assert sample["txt"] == expected[sample["__key__"]]["txt"].upper() and sample["jpg"].ndim == 3


def test_resize_modes_follow_the_job_semantics(tmp_path):
    from pipeline.sinks.webdataset import tar_bytes

    img = jpeg_bytes(1, size=(80, 40))
    (tmp_path / "00000.tar").write_bytes(tar_bytes([("000000000.jpg", img)]))
    for mode, shape in [("center_crop", (3, 16, 16)), ("keep_ratio", (3, 16, 32)), ("border", (3, 16, 16)),
                        ("keep_ratio_largest", (3, 8, 16)), ("no", (3, 40, 80))]:
        with pytest.warns(UserWarning, match="no index.json"):
            ds = ShardDataset(str(tmp_path), image_size=16, resize_mode=mode)
        assert next(iter(ds))["jpg"].shape == shape, mode


# -- damage ----------------------------------------------------------------------------------------

def damaged_copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "damaged"
    shutil.copytree(root, dst)
    (dst / "00003.tar").unlink()                                   # missing: 4 samples
    data = (dst / "00002.tar").read_bytes()
    (dst / "00002.tar").write_bytes(data[:len(data) // 2])          # truncated mid-shard
    data = bytearray((dst / "00000.tar").read_bytes())
    at = data.index(b"\xff\xd8\xff", data.index(b"000000001.jpg"))
    data[at:at + 64] = b"\0" * 64                                    # one unreadable JPEG
    (dst / "00000.tar").write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("workers,fields", [(0, None), (0, ["jpg", "txt"]), (2, ["jpg", "txt"])])
def test_damaged_shards_are_skipped_and_counted(out, tmp_path, workers, fields):
    root, expected = out
    dst = damaged_copy(root, tmp_path)  # fields None: header walk; fields given: numpy scan (small samples)
    loader = Loader(ShardDataset(str(dst), batch_size=4, fields=fields), num_workers=workers)
    with pytest.warns(SkippedDataWarning) as record:
        keys = keys_of(loader)
    messages = " ".join(str(w.message) for w in record)
    if workers == 0:  # worker processes print their warnings on their own stderr
        assert "00003.tar" in messages and "00002.tar" in messages and "000000001" in messages
    stats = loader.stats()
    assert f"{stats['missing']} of {TOTAL} samples" in messages
    assert stats["delivered"] == len(keys) and stats["missing"] == TOTAL - len(keys)
    assert len(set(keys)) == len(keys) and set(keys) < set(expected)
    assert not any(k.startswith("00003") for k in keys) and "000000001" not in keys
    assert sum(k.startswith("00002") for k in keys) >= 1  # what precedes the truncation survives


def test_strict_mode_raises(out, tmp_path):
    dst = damaged_copy(out[0], tmp_path)
    with pytest.raises(ShardError):
        list(ShardDataset(str(dst), strict=True))


def test_sample_missing_a_field_is_skipped(out):
    root, _ = out
    ds = ShardDataset(str(root), fields=["txt", "mp4"], decode=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert list(ds) == []
    assert any("lacks ['mp4']" in str(w.message) for w in record)


# -- storage ---------------------------------------------------------------------------------------

def test_fsspec_urls(out):
    import fsspec

    root, expected = out
    fs = fsspec.filesystem("memory")
    for path in root.iterdir():
        fs.pipe(f"/loader-test/{path.name}", path.read_bytes())
    keys = keys_of(ShardDataset("memory://loader-test", decode=False, batch_size=4))
    assert sorted(keys) == sorted(expected)
    assert sorted(keys_of(ShardDataset(f"file://{root}", decode=False))) == sorted(expected)

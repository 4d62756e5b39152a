"""The columnar read of .npy fields (pipeline.loader.columnar): shards written by a real job with
tokenize stages read back from their column files exactly as from their tars (samples, order,
keys, values), over ranks, workers, shuffles, weighted mixes and resumes; the tar path where the
column files cannot serve."""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers.loader_output import write_output
from helpers.sidecar_output import write_sidecar
from helpers.tokenize_fixtures import pairs_server, tokenize_job
from pipeline.job.runner import run_job
from pipeline.loader import Loader, ShardDataset, ShardError

N = 30
FIELDS = {"text": "text_ids.npy", "image": "image_ids.npy"}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A real job's output: 64 px images tokenized by the tiny VQ, captions by open_clip (ragged)."""
    tmp = tmp_path_factory.mktemp("coltok")
    with pairs_server(N, seed=4, dead=7) as srv:
        assert run_job(tokenize_job(tmp, srv, "tok", samples_per_shard=7)).ok
    return tmp / "tok"


def rows(value, n):
    """A field of a batch as one tensor per sample (ragged dicts and lists alike)."""
    if isinstance(value, dict):
        v, o, s = value["values"], value["offsets"], value["shapes"]
        assert o.dtype == torch.int64 and len(o) == n + 1 and s.shape[0] == n
        return [v[o[i]:o[i + 1]].reshape(s[i].tolist()) for i in range(n)]
    return list(value)


def assert_same(columnar: list[dict], tars: list[dict]) -> None:
    assert len(columnar) == len(tars)
    for a, b in zip(columnar, tars):
        assert set(a) == set(b)
        for meta in ("__key__", "__url__", "__worker__", "__step__"):
            assert list(a[meta]) == list(b[meta]), meta
        n = len(a["__key__"])
        for field in set(a) - {"__key__", "__url__", "__worker__", "__step__"}:
            if isinstance(b[field], torch.Tensor) and not isinstance(a[field], dict):
                assert a[field].dtype == b[field].dtype and torch.equal(a[field], b[field]), field
            got, want = rows(a[field], n), rows(b[field], n)
            assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(got, want)), field


def both(root, **kw):
    col, tar = ShardDataset(str(root), columnar=True, **kw), ShardDataset(str(root), columnar=False, **kw)
    assert col.columnar is not None and tar.columnar is None
    return col, tar


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [4, 5])
def test_columnar_batches_are_the_tar_paths(tokens, shuffle, batch_size):
    col, tar = both(tokens, fields=FIELDS, batch_size=batch_size, shuffle=shuffle, seed=1, shuffle_buffer=6)
    assert col.columnar["image"].shape is not None  # one grid everywhere: a tensor
    assert col.columnar["text"].shape is None       # captions of several lengths: ragged
    for workers in (1, 2, 3):
        for w in range(workers):
            assert_same(list(col.iter_worker(w, workers)), list(tar.iter_worker(w, workers)))
    keys = [k for b in col.iter_worker(0, 1) for k in b["__key__"]]
    assert len(keys) == len(set(keys)) == col.num_samples == 29


def test_loader_workers_deliver_the_same_batches(tokens):
    col, tar = both(tokens, fields=FIELDS, batch_size=4, shuffle=True, seed=3)
    got, want = list(Loader(col, num_workers=2)), list(Loader(tar, num_workers=2))
    assert_same(got, want)
    assert col.stats()["delivered"] == 29


def test_ranks_are_disjoint_and_cover_every_sample_once(tokens):
    seen = []
    for rank in range(3):
        col, tar = both(tokens, fields=FIELDS, batch_size=3, shuffle=True, seed=5, rank=rank, world_size=3)
        batches = [b for w in range(2) for b in col.iter_worker(w, 2)]
        assert_same(batches, [b for w in range(2) for b in tar.iter_worker(w, 2)])
        seen += [k for b in batches for k in b["__key__"]]
    assert len(seen) == len(set(seen)) == 29


def test_a_resumed_epoch_delivers_the_rest_once(tokens):
    def loader(state=None, columnar=True):
        ds = ShardDataset(str(tokens), fields=FIELDS, batch_size=4, shuffle=True, seed=2, columnar=columnar)
        if state is not None:
            ds.load_state_dict(state)
        return Loader(ds, num_workers=2)

    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    rest = list(loader(state))
    assert_same(rest, list(loader(state, columnar=False)))
    keys = [k for b in head + rest for k in b["__key__"]]
    assert len(keys) == len(set(keys)) == 29


def test_a_weighted_mix_reads_the_same_draws(tmp_path):
    write_output(tmp_path / "a", [6, 5], image=False)
    write_output(tmp_path / "b", [4, 7, 3], image=False)
    kw = dict(fields=["text_ids.npy", "clip.npy"], batch_size=4, shuffle=True, seed=9, shuffle_buffer=5,
              epoch_size=40)
    sources = {str(tmp_path / "a"): 1.0, str(tmp_path / "b"): 2.0}
    col, tar = ShardDataset(sources, columnar=True, **kw), ShardDataset(sources, columnar=False, **kw)
    for epoch in (0, 1):
        col.set_epoch(epoch), tar.set_epoch(epoch)
        for w in range(2):
            assert_same(list(col.iter_worker(w, 2)), list(tar.iter_worker(w, 2)))


def test_the_tar_path_serves_what_column_files_cannot(tmp_path, tokens):
    txt = ShardDataset(str(tokens), fields={"text": "text_ids.npy", "caption": "txt"}, batch_size=4)
    assert txt.columnar is None and "not .npy" in txt.columnar_refused
    assert ShardDataset(str(tokens), fields=FIELDS).columnar is None  # no batches
    auto = ShardDataset(str(tokens), fields=FIELDS, batch_size=4)  # text ids are ragged: their types would change
    assert auto.columnar is None and "'text' (text_ids.npy) is ragged" in auto.columnar_refused
    fixed = ShardDataset(str(tokens), fields={"image": "image_ids.npy"}, batch_size=4)
    assert list(fixed.columnar) == ["image"]  # one shape: the same batches, from the column files
    assert_same(list(fixed), list(ShardDataset(str(tokens), fields={"image": "image_ids.npy"}, batch_size=4,
                                               columnar=False)))
    with pytest.raises(ValueError, match="columnar=True.*txt"):
        ShardDataset(str(tokens), fields=["text_ids.npy", "txt"], batch_size=4, columnar=True)
    write_output(tmp_path / "out", [5, 4], image=False)
    (tmp_path / "out" / "00001.columns.arrow").unlink()
    missing = ShardDataset(str(tmp_path / "out"), fields=["text_ids.npy"], batch_size=4)
    assert missing.columnar is None and "00001.columns.arrow" in missing.columnar_refused
    assert sum(len(b["__key__"]) for b in missing) == 9  # read from the tars


def test_a_column_file_beside_another_tar_is_not_read(tmp_path):
    write_output(tmp_path / "old", [5], image=False)
    write_output(tmp_path / "new", [6], image=False)
    (tmp_path / "new" / "00000.columns.arrow").write_bytes((tmp_path / "old" / "00000.columns.arrow").read_bytes())
    with pytest.raises(ValueError, match="rows, index.json counts 6|made with a tar of"):
        ShardDataset(str(tmp_path / "new"), fields=["text_ids.npy"], batch_size=2, columnar=True)


def test_a_column_file_damaged_after_the_start_skips_its_samples(tmp_path):
    write_output(tmp_path, [5, 4], image=False)
    ds = ShardDataset(str(tmp_path), fields=["text_ids.npy"], batch_size=3, columnar=True)
    (tmp_path / "00000.columns.arrow").write_bytes(b"not arrow")
    with pytest.warns(UserWarning, match="00000.tar.*skipping its samples"):
        keys = [k for b in ds for k in b["__key__"]]
    assert len(keys) == 4 and all(k.startswith("00001") for k in keys)
    strict = ShardDataset(str(tmp_path), fields=["text_ids.npy"], batch_size=3, strict=True)
    assert strict.columnar is None  # the damage is seen when the dataset is built


def test_sidecars_are_read_from_the_tars_and_refused_as_columns(tmp_path):
    write_output(tmp_path / "base", [5, 4])
    write_sidecar(tmp_path / "side", tmp_path / "base", reject=lambda key: int(key) % 4 == 0)
    kw = dict(sidecars=[str(tmp_path / "side")], fields=["side.npy", "text_ids.npy"], batch_size=3)
    with pytest.raises(ValueError, match="columnar=True.*zipped with sidecars"):
        ShardDataset(str(tmp_path / "base"), columnar=True, **kw)
    auto = ShardDataset(str(tmp_path / "base"), **kw)
    assert auto.columnar is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(len(b["__key__"]) for b in auto) == auto.num_samples


def test_strict_mode_raises_on_a_column_file_damaged_after_the_start(tmp_path):
    write_output(tmp_path, [5, 4], image=False)
    ds = ShardDataset(str(tmp_path), fields=["text_ids.npy"], batch_size=3, columnar=True, strict=True)
    (tmp_path / "00001.columns.arrow").write_bytes(b"not arrow")
    with pytest.raises(ShardError, match="00001.tar"):
        list(ds)


def test_column_files_on_an_object_store_read_as_local_ones(tmp_path, s3):
    import fsspec

    write_output(tmp_path, [5, 4], image=False)
    fs = fsspec.filesystem("s3")
    for path in sorted(tmp_path.iterdir()):
        fs.put_file(str(path), s3.url(f"out/{path.name}"))
    kw = dict(fields=["text_ids.npy", "clip.npy"], batch_size=4, shuffle=True, seed=1)
    remote, local = ShardDataset(s3.url("out"), columnar=True, **kw), ShardDataset(str(tmp_path), columnar=False, **kw)
    got, want = list(remote), list(local)
    for batch in want:
        batch["__url__"] = [u.replace(str(tmp_path), s3.url("out")) for u in batch["__url__"]]
    assert_same(got, want)

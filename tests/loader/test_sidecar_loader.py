"""A base read with its sidecars: zipped by key, only the samples every sidecar kept, members and
JSON merged, exact epochs over ranks and resume, and sidecars of another base refused."""
from __future__ import annotations

import json
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest

from helpers.loader_output import write_output
from helpers.sidecar_output import SCORE, write_sidecar
from pipeline.loader import Loader, ShardDataset, SidecarMismatchError, with_sidecars
from pipeline.sinks.webdataset import tar_bytes

SIZES = [6, 0, 9, 4]  # an empty shard included


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sidecars")
    expected = write_output(root / "base", SIZES)
    write_sidecar(root / "odd", root / "base", reject=lambda key: int(key) % 2 == 1, member="clip.npy")
    write_sidecar(root / "thirds", root / "base", reject=lambda key: int(key) % 3 == 0, member="extra.npy")
    return root, expected


def keys_of(items):
    return [k for item in items for k in (item["__key__"] if isinstance(item["__key__"], list) else [item["__key__"]])]


def test_samples_are_the_base_zipped_with_the_sidecar(dirs):
    root, expected = dirs
    ds = ShardDataset(root / "base", sidecars=[root / "odd"], fields=["jpg", "clip.npy", "json", "text_ids.npy"])
    kept = [k for k in expected if int(k) % 2 == 0]
    assert len(ds) == len(kept)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == kept
    for s in samples:
        key = s["__key__"]
        assert s["jpg"].shape[0] == 3  # the base's image, decoded
        assert s["clip.npy"].tolist() == [int(key), -1]  # the sidecar's member replaces the base's clip.npy
        assert s["text_ids.npy"].shape == (7,)  # a base member the sidecar lacks stays
        base_meta = json.loads(expected[key]["json"])
        assert s["json"] == {**base_meta, SCORE: int(key) / 1000}  # merged: the base's fields and the score


def test_two_sidecars_keep_what_both_kept_and_merge_both(dirs):
    root, expected = dirs
    ds = ShardDataset(root / "base", sidecars=[root / "odd", root / "thirds"], fields=["clip.npy", "extra.npy", "txt"])
    kept = [k for k in expected if int(k) % 2 == 0 and int(k) % 3 != 0]
    samples = list(ds)
    assert [s["__key__"] for s in samples] == kept and ds.num_samples == len(kept)
    assert all(s["extra.npy"].tolist() == s["clip.npy"].tolist() for s in samples)
    assert samples[0]["txt"] == expected[kept[0]]["txt"].decode()


def test_ranks_and_workers_split_the_zipped_epoch_exactly_and_resume(dirs):
    root, expected = dirs
    kept = sorted(k for k in expected if int(k) % 2 == 0 and int(k) % 3 != 0)

    def make(rank):
        return ShardDataset(root / "base", sidecars=[root / "odd", root / "thirds"], fields=["clip.npy"],
                            rank=rank, world_size=2, shuffle=True, seed=3, shuffle_buffer=4, batch_size=2)

    seen = [k for r in range(2) for w in range(2) for k in keys_of(make(r).iter_worker(w, 2))]
    assert sorted(seen) == kept  # every kept sample once, on exactly one (rank, worker)

    ds = make(0)
    loader = Loader(ds)
    it = iter(loader)
    first = keys_of([next(it)])
    state = loader.state_dict()
    resumed = make(0)
    resumed.load_state_dict(state)
    assert first + keys_of(Loader(resumed)) == keys_of(make(0))


def test_a_zipped_base_mixes_with_other_sources(dirs, tmp_path):
    root, expected = dirs
    write_output(tmp_path / "other", [3])
    zipped = with_sidecars(str(root / "base"), [str(root / "odd")])
    ds = ShardDataset([zipped, tmp_path / "other"], fields=["jpg"])
    assert ds.num_samples == sum(int(k) % 2 == 0 for k in expected) + 3
    with pytest.raises(ValueError, match="zip with one base directory"):
        ShardDataset([root / "base", tmp_path / "other"], sidecars=[root / "odd"])


def test_a_sidecar_of_another_base_is_refused_naming_shard_key_and_sidecar(dirs, tmp_path):
    root, _ = dirs
    write_output(tmp_path / "other", [6, 0, 9, 4], failed_every=2)  # same shards, other keys
    with pytest.raises(SidecarMismatchError) as e:
        ShardDataset(tmp_path / "other", sidecars=[root / "odd"])
    message = str(e.value)
    assert str(root / "odd") in message and "00000.tar" in message and "row 2 is key '000000002'" in message

    write_output(tmp_path / "fewer", [6, 0])
    with pytest.raises(SidecarMismatchError, match=r"has 4 shards, its base .*fewer has 2.*"
                                                   r"sidecar shards of other base shards: \['00002.tar', '00003.tar'\]"):
        ShardDataset(tmp_path / "fewer", sidecars=[root / "odd"])

    with pytest.raises(SidecarMismatchError, match="layout None, not 'sidecar'"):
        ShardDataset(root / "base", sidecars=[tmp_path / "other"])  # a plain dataset is not a sidecar


def test_a_base_shard_renamed_or_a_status_row_lost_is_refused(dirs, tmp_path):
    root, _ = dirs
    side = tmp_path / "side"
    shutil.copytree(root / "odd", side)
    index = json.loads((side / "index.json").read_text())
    index["shardlist"][2]["base"] = "/elsewhere/00007.tar"
    (side / "index.json").write_text(json.dumps(index))
    with pytest.raises(SidecarMismatchError, match=r"shard 00002.tar was made from base shard '/elsewhere/00007.tar'"):
        ShardDataset(root / "base", sidecars=[side])

    shutil.rmtree(side)
    shutil.copytree(root / "odd", side)
    table = pq.read_table(side / "00003.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1), side / "00003.parquet")
    with pytest.raises(SidecarMismatchError, match="shard 00003.tar has 3 status rows, its base shard .* 4 samples"):
        ShardDataset(root / "base", sidecars=[side])


def test_keys_that_disagree_in_the_tars_are_refused_when_read_even_without_strict(dirs, tmp_path):
    root, expected = dirs
    base = tmp_path / "base"
    shutil.copytree(root / "base", base)
    for p in base.glob("*.parquet"):  # a base without status tables: only the tars can be compared
        p.unlink()
    side = tmp_path / "side"
    shutil.copytree(root / "odd", side)
    with tarfile.open(side / "00000.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0].split(".")[0]
    renamed = [(n.replace(first, "999999999"), d) for n, d in members]
    (side / "00000.tar").write_bytes(tar_bytes(renamed))
    sizes = json.loads((side / "index.json").read_text())
    sizes["shardlist"][0]["filesize"] = (side / "00000.tar").stat().st_size
    (side / "index.json").write_text(json.dumps(sizes))
    ds = ShardDataset(base, sidecars=[side], fields=["clip.npy"])
    with pytest.raises(SidecarMismatchError, match=f"shard .*00000.tar has key '999999999' where its base shard "
                                                   f".*00000.tar has '{first}'"):
        list(ds)


def test_a_missing_sidecar_tar_is_skipped_and_counted_like_a_missing_shard(dirs, tmp_path):
    root, expected = dirs
    side = tmp_path / "side"
    shutil.copytree(root / "odd", side)
    (side / "00002.tar").unlink()
    ds = ShardDataset(root / "base", sidecars=[side], fields=["clip.npy"])
    with pytest.warns(Warning, match="00002.tar"):
        keys = keys_of(ds)
    assert keys == [k for k in expected if int(k) % 2 == 0 and not k.startswith("00002")]


def test_the_sidecar_alone_is_a_dataset_of_its_fields(dirs):
    root, expected = dirs
    samples = list(ShardDataset(root / "odd"))
    assert [s["__key__"] for s in samples] == [k for k in expected if int(k) % 2 == 0]
    assert set(samples[0]) - {"__key__", "__url__", "__worker__", "__step__"} == {"json", "clip.npy"}
    assert samples[0]["clip.npy"].tolist() == [0, -1] and samples[0]["json"] == {"key": "000000000", SCORE: 0.0}


# -- end to end: download once, then a sidecar job over the shards -----------------------------------
def test_a_sidecar_job_over_downloaded_shards_reads_back_zipped_and_refuses_another_base(tmp_path):
    from helpers.jobs import image_server, job_file
    from pipeline.core.config import ConfigError
    from pipeline.job.build import build_sink, build_stages
    from pipeline.job.runner import run_job
    from pipeline.job.spec import load_job

    with image_server() as server:
        assert run_job(load_job(job_file(tmp_path, server, "base", rows=24))).ok
        assert run_job(load_job(job_file(tmp_path, server, "other", rows=20))).ok
        tokens = load_job(job_file(tmp_path, server, "tokens", input__files=[], input__shards=[str(tmp_path / "base")],
                                   output__layout="sidecar", tokenize__text={"tokenizer": "open_clip", "max_length": 16}))
    result = run_job(tokens)
    assert result.ok, result
    base, side = tmp_path / "base", tmp_path / "tokens"
    assert sorted(p.name for p in side.glob("*.tar")) == sorted(p.name for p in base.glob("*.tar"))
    assert not list(side.glob("*.jpg")) and all(
        not n.endswith((".jpg", ".txt")) for p in side.glob("*.tar") for n in tarfile.open(p).getnames())

    ds = ShardDataset(base, sidecars=[side], fields=["jpg", "text_ids.npy", "json"])
    base_samples = list(ShardDataset(base, fields=["jpg", "json"]))
    samples = list(ds)
    assert len(samples) == len(ds) == len(base_samples) > 0  # the tokenizer kept every sample
    for s, b in zip(samples, base_samples):
        assert s["__key__"] == b["__key__"] and torch_equal(s["jpg"], b["jpg"])
        assert s["text_ids.npy"].ndim == 1 and s["text_ids.npy"].shape[0] > 0
        assert s["json"]["url"] == b["json"]["url"] and set(s["json"]) > set(b["json"])  # the tokenizer's columns added

    with pytest.raises(SidecarMismatchError, match=str(side)):
        ShardDataset(tmp_path / "other", sidecars=[side])  # another job's shards: other counts, other keys

    into_base = load_job(job_file(tmp_path, server, "tokens2", input__files=[], input__shards=[str(base)],
                                  output__layout="sidecar", output__dir=str(base)))
    with pytest.raises(ConfigError, match="holds the input shards"):
        build_sink(into_base, build_stages(into_base, check=False))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_a_member_the_base_already_has_is_written_again_by_the_sidecar(tmp_path):
    """A base tokenized with one setting, re-tokenized into a sidecar with another: the sidecar's
    text_ids.npy is the new one (only media stay behind in the base), and the loader serves it."""
    from helpers.jobs import image_server, job_file
    from pipeline.job.runner import run_job
    from pipeline.job.spec import load_job

    with image_server() as server:
        assert run_job(load_job(job_file(tmp_path, server, "base", rows=12,
                                         tokenize__text={"tokenizer": "open_clip", "max_length": 16}))).ok
        again = load_job(job_file(tmp_path, server, "retok", input__files=[], input__shards=[str(tmp_path / "base")],
                                  output__layout="sidecar", tokenize__text={"tokenizer": "open_clip", "max_length": 3}))
    assert run_job(again).ok
    base = {s["__key__"]: s for s in ShardDataset(tmp_path / "base", fields=["text_ids.npy"])}
    zipped = list(ShardDataset(tmp_path / "base", sidecars=[tmp_path / "retok"], fields=["text_ids.npy", "jpg"]))
    assert zipped and len(zipped) == len(base)
    for s in zipped:
        old, new = base[s["__key__"]]["text_ids.npy"], s["text_ids.npy"]
        assert len(new) == 3 < len(old)  # truncated to the sidecar's max_length, not the base's ids

"""Property tests of the loader's guarantees over random topologies, shard sizes and stop points:
every (rank, worker) gets a disjoint share, the shares make up the epoch, and a resume from any
point delivers exactly the rest, in the same order."""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.loader import Shard, ShardDataset, Source
from pipeline.loader.plan import source_segments
from pipeline.sinks.webdataset import tar_bytes

FAST = settings(max_examples=150, deadline=None)
IO = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shard_sizes = st.lists(st.integers(0, 12), min_size=1, max_size=7).filter(lambda s: sum(s) > 0)
topology = st.fixed_dictionaries({
    "world_size": st.integers(1, 5),
    "workers": st.integers(1, 4),
    "batch_size": st.one_of(st.none(), st.integers(1, 6)),
    "drop_last": st.booleans(),
    "drop_remainder": st.booleans(),
    "shuffle": st.booleans(),
    "epoch": st.integers(0, 3),
})


def fake_source(sizes, name="src") -> Source:
    """An index without files: planning never opens a shard."""
    return Source(f"/nonexistent/{name}", tuple(Shard(f"/nonexistent/{name}/{i:05d}.tar", n) for i, n in enumerate(sizes)))


def planned_draws(ds: ShardDataset, worker: int, workers: int) -> list[tuple[int, int, int]]:
    """(source, shard, sample) of every draw a worker will read this epoch."""
    segments = ds.plan(worker, workers).segments(ds.sources, ds.seed, ds.shuffle)
    return [(s.source, s.shard, i) for per_source in segments for s in per_source for i in range(s.start, s.stop)]


def make(sources, topo, rank, **kw) -> ShardDataset:
    kw.setdefault("fields", ["txt"])
    ds = ShardDataset(sources, rank=rank, world_size=topo["world_size"], batch_size=topo["batch_size"],
                      drop_last=topo["drop_last"], drop_remainder=topo["drop_remainder"], shuffle=topo["shuffle"],
                      seed=7, shuffle_buffer=3, decode=False, **kw)
    ds.set_epoch(topo["epoch"])
    return ds


@FAST
@given(sizes=shard_sizes, topo=topology)
def test_plans_are_disjoint_and_complete(sizes, topo):
    src = fake_source(sizes)
    per_rank = []
    seen = Counter()
    for rank in range(topo["world_size"]):
        ds = make(src, topo, rank)
        draws = [d for w in range(topo["workers"]) for d in planned_draws(ds, w, topo["workers"])]
        assert len(draws) == ds.num_samples
        per_rank.append(len(draws))
        seen.update(draws)
    everything = {(0, shard, i) for shard, n in enumerate(sizes) for i in range(n)}
    assert set(seen.values()) <= {1} and set(seen) <= everything  # disjoint, nothing invented
    if not topo["drop_remainder"] and not (topo["drop_last"] and topo["batch_size"]):
        assert set(seen) == everything
        assert max(per_rank) - min(per_rank) <= 1
    if topo["drop_remainder"] and not topo["drop_last"]:
        assert per_rank == [sum(sizes) // topo["world_size"]] * topo["world_size"]


@FAST
@given(sizes=st.lists(shard_sizes, min_size=2, max_size=3), weights=st.lists(st.integers(1, 5), min_size=3, max_size=3),
       epoch_size=st.integers(1, 60), topo=topology)
def test_mixed_epochs_take_each_sources_next_draws(sizes, weights, epoch_size, topo):
    sources = {fake_source(s, f"s{i}"): float(w) for i, (s, w) in enumerate(zip(sizes, weights))}
    topo = dict(topo, drop_remainder=False, drop_last=False)
    got, per_rank = Counter(), []
    for rank in range(topo["world_size"]):
        ds = make(sources, topo, rank, epoch_size=epoch_size)
        draws = [d for w in range(topo["workers"]) for d in planned_draws(ds, w, topo["workers"])]
        got.update(draws)
        per_rank.append(len(draws))
    assert max(per_rank) - min(per_rank) <= 1  # the sources' odd draws rotate over the ranks
    # The epoch is, per source, the next `draws` samples of its endless stream: nothing else.
    want = Counter()
    for i, (src, n) in enumerate(zip(ds.sources, ds.draws)):
        for seg in source_segments(src, i, topo["epoch"] * n, n, ds.seed, ds.shuffle):
            want.update((i, seg.shard, j) for j in range(seg.start, seg.stop))
    assert got == want and sum(ds.draws) == epoch_size


def write_tars(root: Path, sizes) -> set[str]:
    """Tiny real shards (one txt member per sample) and their index, quickly."""
    shardlist, keys = [], set()
    for shard, n in enumerate(sizes):
        members = [(f"{shard:05d}{i:04d}.txt", f"{shard}-{i}".encode()) for i in range(n)]
        data = tar_bytes(members)
        (root / f"{shard:05d}.tar").write_bytes(data)
        shardlist.append({"url": f"{shard:05d}.tar", "nsamples": n, "filesize": len(data)})  # small: numpy scan
        keys.update(name.split(".")[0] for name, _ in members)
    (root / "index.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": shardlist}))
    return keys


def keys(items) -> list[str]:
    return [k for item in items for k in (item["__key__"] if isinstance(item["__key__"], list) else [item["__key__"]])]


def pairs(items):
    for item in items:
        if isinstance(item["__key__"], list):
            yield from zip(item["__key__"], item["txt"])
        else:
            yield item["__key__"], item["txt"]


@IO
@given(sizes=shard_sizes, topo=topology)
def test_reading_delivers_exactly_the_plan(sizes, topo):
    with tempfile.TemporaryDirectory() as tmp:
        everything = write_tars(Path(tmp), sizes)
        got = Counter()
        for rank in range(topo["world_size"]):
            ds = make(tmp, topo, rank)
            for w in range(topo["workers"]):
                items = list(ds.iter_worker(w, topo["workers"]))
                for key, txt in pairs(items):  # the bytes belong to the key
                    assert txt == f"{int(key[:5])}-{int(key[5:])}".encode()
                got.update(keys(items))
        assert set(got.values()) <= {1} and set(got) <= everything
        if not topo["drop_remainder"] and not (topo["drop_last"] and topo["batch_size"]):
            assert set(got) == everything


@IO
@given(sizes=shard_sizes, topo=topology, stops=st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_resume_from_any_point_delivers_exactly_the_rest(sizes, topo, stops):
    workers = topo["workers"]
    with tempfile.TemporaryDirectory() as tmp:
        write_tars(Path(tmp), sizes)
        rank = topo["world_size"] - 1
        full = {w: list(make(tmp, topo, rank).iter_worker(w, workers)) for w in range(workers)}
        first = make(tmp, topo, rank)
        for w in range(workers):  # each worker stops at its own point, as DataLoader workers do
            for item in full[w][:round(stops[w] * len(full[w]))]:
                first.record(item)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make(tmp, topo, rank)
        resumed.load_state_dict(state)
        for w in range(workers):
            head = keys(full[w][:round(stops[w] * len(full[w]))])
            assert head + keys(resumed.iter_worker(w, workers)) == keys(full[w])

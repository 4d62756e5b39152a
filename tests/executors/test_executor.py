"""Executors: the same stages give the same shards locally and on Ray; stateful stages run in
actors set up once; ordered stages see shards in order, also across a resume."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.core.stage import Resources, Stage
from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.job.build import build_sink, input_shards
from pipeline.job.spec import load_job


class FakeDownload(Stage):
    """Stands in for the network: the 'image' is the URL's bytes."""
    name = "download"

    def process(self, batch):
        for i in schema.alive(batch):
            batch[schema.STATUS][i] = schema.SUCCESS
            batch[schema.FILES][i]["jpg"] = batch[schema.URL][i].encode()
        return batch


class SetupCounter(Stage):
    """A 'model' stage: records which process ran it and how often that process set it up."""
    name = "model"
    stateful = True

    def __init__(self):
        super().__init__()
        self.setups = 0

    @property
    def resources(self):
        return Resources(cpus=0.5)

    def setup(self):
        self.setups += 1

    def process(self, batch):
        idx = schema.alive(batch)
        schema.set_column(batch, "model_setups", idx, [self.setups] * len(idx))
        schema.set_column(batch, "model_pid", idx, [os.getpid()] * len(idx))
        return batch


class SeenBefore(Stage):
    """Ordered: filters a URL already seen in an earlier row of the job (exact dedup by URL)."""
    name = "seen_before"

    def __init__(self):
        super().__init__()
        self.seen = set()

    @property
    def ordered(self):
        return True

    def resume(self, written):
        self.seen.update(u for u, s in zip(written[schema.URL], written[schema.STATUS]) if s == schema.SUCCESS)

    def process(self, batch):
        for i in schema.alive(batch):
            url = batch[schema.URL][i]
            if url in self.seen:
                schema.reject(batch, i, self.name, "duplicate URL")
            else:
                self.seen.add(url)
        return batch


@pytest.fixture(autouse=True)
def stages_travel_by_value():
    """Ray workers cannot import this test module: ship its stage classes by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def make_spec(tmp_path, name, engine="local", **execution):
    urls = [f"http://example.test/{i % 17}.jpg" for i in range(60)]  # repeats across shards
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), path)
    return load_job(data={"input": {"files": [str(path)], "caption_col": None},
                          "output": {"dir": str(tmp_path / name), "samples_per_shard": 8},
                          "execution": {"engine": engine, "progress": False, **execution}})


def run(executor, spec, stages):
    """Run ``stages`` over the spec's shards; the ids written now (complete ones are skipped)."""
    done, errors = [], {}

    def on_done(outcome):
        if not outcome.skipped:
            (done.append(outcome.shard_id) if outcome.ok else errors.__setitem__(outcome.shard_id, outcome.error))

    sink = build_sink(spec, stages)
    sink.open()
    executor.run(input_shards(spec), stages, sink, on_done)
    assert not errors, errors
    return sorted(done)


def tables(out_dir, drop=("model_pid", "model_setups")):
    out = {}
    for p in sorted(out_dir.glob("*.parquet")):
        t = pq.read_table(p)
        out[p.name] = t.drop([c for c in drop if c in t.column_names]).to_pydict()
    return out


def test_ordered_stage_matches_a_sequential_pass(tmp_path):
    spec = make_spec(tmp_path, "local")
    assert run(LocalExecutor(spec.execution), spec, [FakeDownload(), SeenBefore()]) == list(range(8))
    got = tables(tmp_path / "local")
    kept = [u for t in got.values() for u, s in zip(t["url"], t["status"]) if s == "success"]
    assert kept == [f"http://example.test/{i}.jpg" for i in range(17)]  # first occurrence wins


def test_ray_gives_the_same_shards_and_sets_models_up_once(tmp_path, ray_cluster):
    local = make_spec(tmp_path, "local")
    run(LocalExecutor(local.execution), local, [FakeDownload(), SetupCounter(), SeenBefore()])
    spec = make_spec(tmp_path, "ray", engine="ray", address=ray_cluster.address, max_shards_in_flight=4)
    assert run(RayExecutor(spec.execution), spec, [FakeDownload(), SetupCounter(), SeenBefore()]) == list(range(8))
    assert tables(tmp_path / "ray") == tables(tmp_path / "local")
    model = tables(tmp_path / "ray", drop=())
    setups = {v for t in model.values() for v in t["model_setups"] if v is not None}
    pids = {v for t in model.values() for v in t["model_pid"] if v is not None}
    assert setups == {1} and len(pids) == 1 and os.getpid() not in pids  # one actor, loaded once


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_ordered_state_is_rebuilt_from_complete_shards_on_resume(tmp_path, engine, request):
    extra = {}
    if engine == "ray":
        extra["address"] = request.getfixturevalue("ray_cluster").address
    reference = make_spec(tmp_path, "ref")
    run(LocalExecutor(reference.execution), reference, [FakeDownload(), SeenBefore()])
    spec = make_spec(tmp_path, "resumed", engine=engine, **extra)
    # a first run that completed shards 0, 2 and 5 only
    partial = [s for s in input_shards(spec) if s.shard_id in (0, 2, 5)]
    stages = [FakeDownload(), SeenBefore()]
    sink = build_sink(spec, stages)
    sink.open()
    LocalExecutor(spec.execution).run(iter(partial), stages, sink, lambda outcome: None)
    # that run's shard 2 and 5 saw only shards before them that it had processed: rewrite them as an
    # uninterrupted run would have (the point is the resume below, not this setup)
    for sid in (2, 5):
        for suffix in (".tar", ".parquet", "_stats.json"):
            (tmp_path / "resumed" / f"{sid:05d}{suffix}").write_bytes((tmp_path / "ref" / f"{sid:05d}{suffix}").read_bytes())
    executor = LocalExecutor(spec.execution) if engine == "local" else RayExecutor(spec.execution)
    done = run(executor, spec, [FakeDownload(), SeenBefore()])
    assert done == [1, 3, 4, 6, 7]
    assert all(sink.is_complete(i) for i in range(8))
    assert tables(tmp_path / "resumed") == tables(tmp_path / "ref")

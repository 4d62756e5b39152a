"""Executors: the same stages give the same shards locally and on Ray; stateful stages run in
actors set up once; ordered stages see shards in order, also across a resume; a stage that raises
fails its shard, not the job, with the same error text under every engine, and is retried in the
run unless a stage is ordered."""
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


class Flaky(Stage):
    """Succeeds except on the shards listed, where it raises the first ``fails`` times it runs."""
    name = "flaky"

    def __init__(self, bad_shards, fails=99):
        super().__init__()
        self.bad, self.fails, self.calls = set(bad_shards), fails, {}

    def process(self, batch):
        shard = int(batch[schema.KEY][0][:5])
        self.calls[shard] = self.calls.get(shard, 0) + 1
        if shard in self.bad and self.calls[shard] <= self.fails:
            raise RuntimeError(f"boom in shard {shard}")
        for i in schema.alive(batch):
            batch[schema.FILES][i]["txt2"] = b"x"
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


def outcomes(executor, spec, stages):
    """Run ``stages`` over the spec's shards into its sink: the sink and every shard's outcome."""
    got = {}
    sink = build_sink(spec, stages)
    sink.open()
    executor.run(input_shards(spec), stages, sink, lambda outcome: got.__setitem__(outcome.shard_id, outcome))
    return sink, got


def run(executor, spec, stages):
    """The ids of the shards written now (complete ones are skipped); none may fail."""
    _, got = outcomes(executor, spec, stages)
    errors = {i: o.error for i, o in got.items() if not o.ok}
    assert not errors, errors
    return sorted(i for i, o in got.items() if not o.skipped)


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


def frames(error):
    """The traceback's last line and the frame of the stage that raised."""
    lines = error.strip().splitlines()
    return lines[-1], [line.strip() for line in lines if "in process" in line][-1]


def test_a_failed_shard_does_not_stop_the_job_and_reads_the_same_everywhere(tmp_path, ray_cluster):
    local = make_spec(tmp_path, "local", shard_retries=0)
    sink, got = outcomes(LocalExecutor(local.execution), local, [Flaky({1})])
    assert sorted(got) == list(range(8)) and [i for i, o in got.items() if not o.ok] == [1]
    assert sink.is_complete(0) and not sink.is_complete(1) and sink.is_complete(2)
    assert frames(got[1].error)[0] == "RuntimeError: boom in shard 1"
    on_ray = make_spec(tmp_path, "ray", engine="ray", address=ray_cluster.address, shard_retries=0)
    _, remote = outcomes(RayExecutor(on_ray.execution), on_ray, [Flaky({1})])
    assert sorted(remote) == list(range(8)) and [i for i, o in remote.items() if not o.ok] == [1]
    assert frames(remote[1].error) == frames(got[1].error)  # same text, not Ray's own wrapping


def test_retries_in_the_run_but_never_with_an_ordered_stage(tmp_path):
    spec = make_spec(tmp_path, "retry", shard_retries=2)
    flaky = Flaky({1}, fails=2)
    _, got = outcomes(LocalExecutor(spec.execution), spec, [flaky])
    assert got[1].ok and flaky.calls[1] == 3
    ordered = make_spec(tmp_path, "ordered", shard_retries=2)
    flaky = Flaky({1}, fails=1)
    _, got = outcomes(LocalExecutor(ordered.execution), ordered, [flaky, SeenBefore()])
    assert not got[1].ok and flaky.calls[1] == 1


def test_ray_reads_the_input_only_as_fast_as_shards_finish(tmp_path, ray_cluster):
    """The driver holds the rows of the shards in flight only, whatever the input's size."""
    spec = make_spec(tmp_path, "window", engine="ray", address=ray_cluster.address, max_shards_in_flight=3)
    finished, ahead = [], []

    def shards():
        for shard in input_shards(spec):
            ahead.append(shard.shard_id + 1 - len(finished))  # read, and not yet reported
            yield shard

    sink = build_sink(spec, [FakeDownload()])
    sink.open()
    RayExecutor(spec.execution).run(shards(), [FakeDownload(), SetupCounter()], sink, finished.append)
    assert sorted(o.shard_id for o in finished) == list(range(8)) and all(o.ok for o in finished)
    assert max(ahead) <= 3


class WhereAmI(Stage):
    """A 'GPU model': records the node and process it ran in and the GPUs Ray gave it."""
    name = "where"
    stateful = True

    @property
    def resources(self):
        return Resources(cpus=0.1, gpus=0.5)

    def process(self, batch):
        import ray

        idx = schema.alive(batch)
        context = ray.get_runtime_context()
        for column, value in (("node", context.get_node_id()), ("pid", os.getpid()),
                              ("gpu_ids", ",".join(str(g) for g in ray.get_gpu_ids()))):
            schema.set_column(batch, column, idx, [value] * len(idx))
        return batch


def test_gpu_stages_land_on_the_gpu_node_packed_by_their_fraction(tmp_path, ray_cluster):
    """A node that declares one GPU (Ray accounts GPUs as resources, CUDA or not) joins the
    cluster; the stage's actors, half a GPU each, all run there: two of them on the one GPU."""
    gpu_node = ray_cluster.add_node(num_cpus=1, num_gpus=1, resources={"gpu_node": 1})
    try:
        spec = make_spec(tmp_path, "gpu", engine="ray", address=ray_cluster.address)
        run(RayExecutor(spec.execution), spec, [FakeDownload(), WhereAmI()])
        rows = [r for t in tables(tmp_path / "gpu", drop=()).values()
                for r in zip(t["node"], t["pid"], t["gpu_ids"]) if r[0] is not None]
    finally:
        ray_cluster.stop_node(gpu_node)
    assert len(rows) == 60 and {node for node, _, _ in rows} == {gpu_node.node_id}
    assert len({pid for _, pid, _ in rows}) == 2 and {gpus for _, _, gpus in rows} == {"0"}

"""A stage that raises fails its shard, not the job, with the same error text under every
engine; a failure is retried in the run unless a stage is ordered."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.core.stage import Stage
from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.job.build import build_sink, input_shards
from pipeline.job.spec import load_job


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


class Ordered(Stage):
    name = "ordered"

    @property
    def ordered(self):
        return True

    def process(self, batch):
        return batch


@pytest.fixture(autouse=True)
def stages_travel_by_value():
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def spec_for(tmp_path, name, **execution):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://example.test/{i}.jpg" for i in range(12)]}), path)
    return load_job(data={"input": {"files": [str(path)], "caption_col": None},
                          "output": {"dir": str(tmp_path / name), "samples_per_shard": 4},
                          "execution": {"progress": False, **execution}})


def run(executor, spec, stages):
    outcomes = {}
    sink = build_sink(spec, stages)
    sink.open()
    executor.run(input_shards(spec), stages, sink, lambda o: outcomes.__setitem__(o.shard_id, o))
    return sink, outcomes


def frames(error):
    """The traceback's last line and the frame of the stage that raised."""
    lines = error.strip().splitlines()
    return lines[-1], [line.strip() for line in lines if "in process" in line][-1]


def test_a_failed_shard_does_not_stop_the_job_and_reads_the_same_everywhere(tmp_path, ray_cluster):
    local = spec_for(tmp_path, "local", engine="local", shard_retries=0)
    sink, got = run(LocalExecutor(local.execution), local, [Flaky({1})])
    assert sorted(got) == [0, 1, 2] and got[0].ok and got[2].ok and not got[1].ok
    assert sink.is_complete(0) and not sink.is_complete(1) and sink.is_complete(2)
    assert frames(got[1].error)[0] == "RuntimeError: boom in shard 1"
    on_ray = spec_for(tmp_path, "ray", engine="ray", address=ray_cluster.address, shard_retries=0)
    _, remote = run(RayExecutor(on_ray.execution), on_ray, [Flaky({1})])
    assert sorted(remote) == [0, 1, 2] and not remote[1].ok
    assert frames(remote[1].error) == frames(got[1].error)  # same text, not Ray's own wrapping


def test_retries_in_the_run_but_never_with_an_ordered_stage(tmp_path):
    spec = spec_for(tmp_path, "retry", engine="local", shard_retries=2)
    flaky = Flaky({1}, fails=2)
    _, got = run(LocalExecutor(spec.execution), spec, [flaky])
    assert got[1].ok and flaky.calls[1] == 3
    ordered = spec_for(tmp_path, "ordered", engine="local", shard_retries=2)
    flaky = Flaky({1}, fails=1)
    _, got = run(LocalExecutor(ordered.execution), ordered, [flaky, Ordered()])
    assert not got[1].ok and flaky.calls[1] == 1

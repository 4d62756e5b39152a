"""Model stages on a Ray that declares one GPU (Ray accounts GPUs as resources, CUDA or not): two
stages that each ask for a whole GPU share it instead of the second waiting forever, and a worker
whose CUDA context was poisoned is replaced, its shard redone in the same run.

The job runs in a child process with its own private Ray (``num_cpus=2, num_gpus=1``), so that
this test neither joins the shared test cluster nor leaves a Ray behind, and a hang is a timeout."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from dataclasses import dataclass

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.core import schema
    from pipeline.core.model_stage import ModelStage
    from pipeline.core.stage import Stage
    from pipeline.executors import RayExecutor
    from pipeline.job.build import build_sink, input_shards
    from pipeline.job.spec import load_job

    out, marker = sys.argv[1], sys.argv[2]
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)

    @dataclass
    class ModelConfig:
        device: str = "auto"
        num_gpus: float = 1.0   # a whole GPU each: two of them cannot both have one

    class Download(Stage):
        name = "download"
        def process(self, batch):
            for i in schema.alive(batch):
                batch[schema.STATUS][i] = schema.SUCCESS
                batch[schema.FILES][i]["jpg"] = batch[schema.URL][i].encode()
            return batch

    class Model(ModelStage):
        """A model stand-in: records the process and the GPU Ray gave it."""
        name = "clip"
        def load_model(self):
            return os.getpid()
        def process(self, batch):
            idx = schema.alive(batch)
            gpus = ",".join(str(g) for g in ray.get_gpu_ids())
            schema.set_column(batch, self.name, idx, [f"{self.model}/{gpus}"] * len(idx))
            return batch

    class PoisonedOnce(Model):
        """Its first call anywhere poisons its process's CUDA context (an illegal memory access):
        from then on every call in that process fails, as on a real GPU."""
        name = "tokenize"
        def process(self, batch):
            if self.device_lost or not os.path.exists(marker):
                with open(marker, "a") as f:
                    f.write(f"{os.getpid()}\\n")
                raise self.lost_device(RuntimeError("CUDA error: an illegal memory access was encountered"))
            return super().process(batch)

    path = os.path.join(out, "urls.parquet")
    pq.write_table(pa.table({"url": [f"http://example.test/{i}.jpg" for i in range(24)]}), path)
    spec = load_job(data={"input": {"files": [path], "caption_col": None},
                          "output": {"dir": os.path.join(out, "shards"), "samples_per_shard": 8},
                          "execution": {"engine": "ray", "progress": False}})
    stages = [Download(), Model(ModelConfig()), PoisonedOnce(ModelConfig())]
    executor = RayExecutor(spec.execution)
    for stage in stages[1:]:
        stage.place(executor.gpus())
    sink = build_sink(spec, stages)
    sink.open()
    got = {}
    executor.run(input_shards(spec), stages, sink, lambda o: got.__setitem__(o.shard_id, o))
    columns = {"clip": [], "tokenize": []}
    for p in sorted(os.listdir(os.path.join(out, "shards"))):
        if p.endswith(".parquet"):
            table = pq.read_table(os.path.join(out, "shards", p))
            for c in columns:
                columns[c] += table[c].to_pylist()
    print(json.dumps({"errors": {i: o.error for i, o in got.items() if not o.ok}, "columns": columns,
                      "requests": [s.resources.gpus for s in stages[1:]]}))
''')


@pytest.mark.slow  # a private Ray in a child process: about a minute on a loaded 2-core machine
def test_two_whole_gpu_stages_share_one_gpu_and_a_poisoned_worker_is_replaced(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}
    env["HOME"] = str(tmp_path)  # Ray keeps its token in ~/.ray
    marker = tmp_path / "poisoned"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(marker)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith('{"errors"')]  # Ray prints too
    result = json.loads(line)
    assert result["errors"] == {} and result["requests"] == [1.0, 1.0]
    clip, tokenize = result["columns"]["clip"], result["columns"]["tokenize"]
    assert len(clip) == len(tokenize) == 24 and None not in clip + tokenize
    assert {c.split("/")[1] for c in clip + tokenize} == {"0"}  # both pools on the one GPU
    poisoned = set(marker.read_text().split())
    assert len(poisoned) == 1  # one process was poisoned, once: it was replaced, not called again
    assert {t.split("/")[0] for t in tokenize}.isdisjoint(poisoned)  # its successor did every shard

"""The stage contract: defaults, what never travels to a worker, and the ModelStage rules."""
import pickle
from dataclasses import dataclass

from pipeline.core import model_stage
from pipeline.core.model_stage import ModelStage
from pipeline.core.stage import Resources, Stage, ThreadPoolStage


@dataclass
class ModelConfig:
    device: str = "auto"
    num_gpus: float = 0.5


class Doubler(ModelStage):
    name = "doubler"
    loads = 0

    def load_model(self):
        type(self).loads += 1
        return lambda x: 2 * x

    def process(self, batch):
        batch["doubled"] = [self.model(v) for v in batch["value"]]
        return batch


def test_a_plain_stage_declares_nothing_by_default():
    stage = Stage()
    assert stage.resources == Resources(1.0, 0.0) and stage.columns == {}
    assert not stage.ordered and not stage.stateful and stage.fingerprint() is None


def test_thread_pool_is_made_in_each_worker_and_never_pickled():
    stage = ThreadPoolStage(config=None, cpus=3)
    stage.setup()
    clone = pickle.loads(pickle.dumps(stage))
    assert stage._pool is not None and clone._pool is None and clone.resources.cpus == 3


def test_model_stage_decides_the_device_once_and_asks_for_gpus_only_on_cuda(monkeypatch):
    monkeypatch.setattr(model_stage, "cuda_available", lambda: True)
    on_gpu = Doubler(ModelConfig())
    assert on_gpu.device == "cuda" and on_gpu.resources == Resources(cpus=1, gpus=0.5)
    monkeypatch.setattr(model_stage, "cuda_available", lambda: False)
    assert on_gpu.device == "cuda"  # decided in the driver; a worker without a GPU does not change it
    assert pickle.loads(pickle.dumps(on_gpu)).device == "cuda"
    cpu = Doubler(ModelConfig())
    assert cpu.device == "cpu" and cpu.resources.gpus == 0
    assert Doubler(ModelConfig(device="cpu")).resources.gpus == 0


def test_auto_device_follows_the_executors_gpus_not_the_drivers(monkeypatch):
    monkeypatch.setattr(model_stage, "cuda_available", lambda: False)  # a CPU-only head node
    on_cluster = Doubler(ModelConfig())
    on_cluster.place(2.0)  # ...of a cluster with GPU workers
    assert on_cluster.device == "cuda" and on_cluster.resources.gpus == 0.5
    no_gpus = Doubler(ModelConfig())
    no_gpus.place(0.0)
    assert no_gpus.device == "cpu" and no_gpus.resources.gpus == 0
    forced = Doubler(ModelConfig(device="cpu"))
    forced.place(8.0)
    assert forced.device == "cpu"


def test_model_loads_once_per_worker_and_does_not_travel():
    Doubler.loads = 0
    stage = Doubler(ModelConfig(device="cpu"))
    assert stage.process({"value": [1, 2]})["doubled"] == [2, 4]  # loads on first use
    stage.setup()
    assert Doubler.loads == 1
    clone = pickle.loads(pickle.dumps(stage))
    assert clone._model is None and clone.stateful
    assert clone.process({"value": [3]})["doubled"] == [6] and Doubler.loads == 2

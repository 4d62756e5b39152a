"""The base of stages around a model (CLIP scoring, visual tokenizers): one place for the device
choice, the GPU request, loading the model once per worker and never shipping it.

Its config needs ``device`` ("auto", "cuda" or "cpu") and ``num_gpus`` (per worker, on CUDA).
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

from pipeline.core.stage import Resources, Stage


def cuda_devices() -> int:
    """The CUDA devices this process sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_available() -> bool:
    return cuda_devices() > 0


class ModelStage(Stage):
    """Subclasses implement ``load_model()`` (build the model on ``self.device``) and use
    ``self.model`` in ``process``; the model loads on first use if ``setup`` has not run."""

    stateful = True
    may_use_gpus = True
    worker_state: ClassVar[tuple[str, ...]] = ("_model",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._device: Optional[str] = None
        self._model: Any = None

    def place(self, gpus: float) -> None:
        """``device: auto`` means CUDA when the executor has GPUs: on a cluster, GPUs of worker
        nodes count, though the driver's machine may have none."""
        if self._device is None and self.config.device == "auto":
            self._device = "cuda" if gpus > 0 else "cpu"

    @property
    def device(self) -> str:
        """"cuda" or "cpu". Decided once in the driver (by ``place``, or on first use from this
        machine's GPUs) and pickled with the stage: the GPU request, the fingerprint and the
        workers' device then always agree."""
        if self._device is None:
            wanted = self.config.device
            self._device = ("cuda" if cuda_available() else "cpu") if wanted == "auto" else wanted
        return self._device

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=self.config.num_gpus if self.device == "cuda" else 0)

    def load_model(self) -> Any:
        raise NotImplementedError

    def setup(self) -> None:
        if self._model is None:
            self._model = self.load_model()

    @property
    def model(self) -> Any:
        self.setup()
        return self._model

"""The base of stages around a model (CLIP scoring, visual tokenizers): one place for the device
choice, the GPU request, loading the model once per worker and never shipping it, and what a
CUDA error means for the worker (out of memory: free it and go on; a poisoned context: stop).

Its config needs ``device`` ("auto", "cuda" or "cpu") and ``num_gpus`` (per worker, on CUDA).
"""
from __future__ import annotations

import gc
from typing import Any, ClassVar, Optional

from pipeline.core.config import ConfigError
from pipeline.core.stage import Resources, Stage


def cuda_devices() -> int:
    """The CUDA devices this process sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_available() -> bool:
    return cuda_devices() > 0


def free_cuda_memory() -> None:
    """Hand the blocks of dead tensors back to the CUDA driver (after an out-of-memory error, or
    when a model is dropped), so that the next allocation does not fail for the cached ones."""
    import torch

    gc.collect()  # tensors held only by reference cycles (a traceback's frames) die now
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def poisons_device(error: BaseException) -> bool:
    """A CUDA error after which every later kernel of the process fails too (an illegal memory
    access, a device-side assert): the worker must stop rather than mark each later sample
    failed. An out-of-memory error leaves the context usable."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return False
    accelerator = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    return bool(accelerator and isinstance(error, accelerator)) or (
        isinstance(error, RuntimeError) and "CUDA error" in str(error))


class DeviceLost(RuntimeError):
    """Raised by a model stage whose CUDA context is poisoned: its shard fails (the rerun redoes
    it) and the worker should be replaced (the Ray executor restarts its actor)."""


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
        self.device_lost = False  # set in a worker whose CUDA context a failure poisoned

    def place(self, gpus: float) -> None:
        """``device: auto`` means CUDA when the executor has GPUs: on a cluster, GPUs of worker
        nodes count, though the driver's machine may have none. ``device: cuda`` without any GPU
        fails here, in the driver, instead of waiting forever for a GPU that cannot come."""
        if self.config.device == "cuda" and gpus <= 0:
            raise ConfigError(f"{self.name}.device: 'cuda', but the executor has no GPU (it reports {gpus:g}); "
                              "use device: auto or cpu, or run on machines with GPUs")
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

    def driver_copy(self) -> "ModelStage":
        """The copy keeps the workers' settings; on a driver without the GPU the workers have (a
        CPU-only head of a GPU cluster) it runs on the CPU."""
        twin = super().driver_copy()
        if twin.device == "cuda" and not cuda_available():
            twin._device = "cpu"
        return twin

    def load_model(self) -> Any:
        raise NotImplementedError

    def setup(self) -> None:
        if self._model is None:
            self._model = self.load_model()

    @property
    def model(self) -> Any:
        self.setup()
        return self._model

    def lost_device(self, error: BaseException) -> DeviceLost:
        """Record that ``error`` poisoned this worker's CUDA context; the error to raise."""
        self.device_lost = True
        return DeviceLost(f"{self.name}: the CUDA context is unusable after {type(error).__name__}: {error}")

"""The stage interface. Stages know nothing of Ray: executors (pipeline.executor) run them.

A stage is a small class with a config, ``setup()`` (load models once per worker) and a pure
``__call__(batch) -> batch`` over a batch (see pipeline.schema). It declares its resources.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

Batch = dict[str, list]


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


class Stage:
    """Base class of every pipeline stage.

    * ``name``: how the stage is named in the job spec, stats and manifest.
    * ``resources``: what one worker of the stage needs.
    * ``stateful``: True when ``setup()`` loads something heavy (a model): on Ray the stage then
      runs in a pool of long-lived actors, loaded once each, instead of in per-shard tasks.
    * ``ordered``: True when the stage must see shards in shard-id order (e.g. exact dedup across
      the job); executors then run it on one worker and feed it shards in order.
    """

    name: ClassVar[str] = "stage"
    stateful: ClassVar[bool] = False
    ordered: ClassVar[bool] = False

    @property
    def resources(self) -> Resources:
        return Resources()

    def setup(self) -> None:
        """Load models and open pools; called once per worker before the first batch."""

    def __call__(self, batch: Batch) -> Batch:
        raise NotImplementedError

    # -- job-level state -------------------------------------------------------------------------
    def prepare(self, context: "JobContext") -> dict[str, Any] | None:
        """Called once in the driver before any shard runs, when the manifest holds no state for
        this stage. May return JSON-able state (e.g. a percentile threshold) that is stored in
        manifest.json and handed to ``restore`` on this and every resumed run."""
        return None

    def restore(self, state: dict[str, Any]) -> None:
        """Take back the state ``prepare`` returned (possibly from a previous, interrupted run)."""

    def resume(self, written: "Batch") -> None:
        """For ordered stages: see the status table of a shard already complete on disk (in shard
        order), so that job-wide state (seen hashes) is rebuilt on resume."""

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies this stage's outputs (model class, weights hash, preprocessing); stored
        in the manifest and in each sample's json so trainers can refuse mismatched shards."""
        return None


class ThreadPoolStage(Stage):
    """A stage whose CPU work (decode, resize, cut: C code that releases the GIL) runs on one
    thread per CPU it was given. The pool is made per worker and never pickled."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.cpus)

    def setup(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cpus, thread_name_prefix=self.name)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}


@dataclass
class JobContext:
    """What ``Stage.prepare`` may use: the job spec and a way to get processed sample batches.

    ``sample_batches(n_rows)`` yields batches of the first ``n_rows`` input rows run through the
    stages *before* this one (download, earlier filters), without writing anything.
    """

    spec: Any
    sample_batches: Any  # Callable[[int], Iterator[Batch]]

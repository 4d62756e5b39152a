"""The stage contract: one step between an input shard and the sink. Stages know nothing of Ray
or of storage; executors (:mod:`pipeline.executors`) run them, sinks (:mod:`pipeline.sinks`) write
what they produce.

A stage is built from its own config object (never the JobSpec: only the job builder reads that)
and is run through these hooks, each in one place:

    check()          in the driver, before any shard: fail fast on what is missing (model files)
    place(gpus)      in the driver, before resources or fingerprints are read, for stages that
                     ``may_use_gpus``: how many GPUs the executor can give (a cluster's, which the
                     driver's machine may lack)
    prepare(context) in the driver, once per job, when the manifest holds no state for the stage:
                     job-wide state (a percentile threshold), stored in manifest.json
    restore(state)   in the driver, on every run (resumed ones too): take that state back
    setup()          once per worker, before its first batch: load models, open pools
    process(batch)   per shard: the stage owns the batch it is given, may change it in place
                     (mark rows, add columns and files) and returns it
    resume(written)  ordered stages only: the status table of a shard already complete, in shard
                     order, so job-wide state (seen hashes) is rebuilt on resume
    fingerprint()    what identifies its outputs (model, weights hash), for the manifest

and declares:

    resources        the CPUs and GPUs one worker needs (fractions allowed)
    columns          the status-table columns it adds, with their Arrow types
    ordered          True when it must see every shard once, in shard order (job-wide dedup)
    stateful         True when setup() is heavy (a model): run in long-lived workers
    may_use_gpus     True when it may run on a GPU (then it is placed; other jobs never ask)
    worker_state     attributes that setup() makes in each worker; never pickled
"""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional

from pipeline.core.schema import Batch


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class JobContext:
    """What ``Stage.prepare`` may use: ``sample_batches(n_rows)`` yields batches of the first
    ``n_rows`` input rows run through the stages *before* this one, without writing anything;
    ``input_columns(names)`` yields chunks (``{name: values}``) of those input columns over the
    whole input, read alone (an exact percentile over a published score)."""

    sample_batches: Callable[[int], Iterator[Batch]]
    input_columns: Optional[Callable[[list[str]], Iterator[dict[str, list]]]] = None


class Stage:
    """Base class of every stage; see the module docstring for the contract."""

    name: ClassVar[str] = "stage"       # how the stage is named in stats, timings and the manifest
    stateful: ClassVar[bool] = False
    may_use_gpus: ClassVar[bool] = False
    worker_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @property
    def resources(self) -> Resources:
        return Resources()

    @property
    def columns(self) -> dict[str, str]:
        """Status-table columns this stage adds: name -> Arrow type name ("double", "string", ...)."""
        return {}

    @property
    def ordered(self) -> bool:
        return False

    def check(self) -> None:
        """Fail early, in the driver, when something the stage needs is missing (raise ConfigError)."""

    def place(self, gpus: float) -> None:
        """Learn the GPUs the executor has (stages that may use one decide their device here)."""

    def setup(self) -> None:
        """Load models and open pools; called once per worker before the first batch."""

    def driver_copy(self) -> "Stage":
        """A copy for a sample pass in the driver (a later stage's ``prepare``): its worker state
        and its running state (an ordered stage's memory) are its own, so the pass leaves no trace."""
        return copy.deepcopy(self)  # __getstate__ leaves out what setup() made

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def prepare(self, context: JobContext) -> Optional[dict[str, Any]]:
        """JSON-able job-wide state, computed once; None when the stage has none."""
        return None

    def restore(self, state: dict[str, Any]) -> None:
        """Take back the state ``prepare`` returned (possibly in an earlier, interrupted run)."""

    def resume(self, written: Batch) -> None:
        """Ordered stages: see the status table of a shard already complete, in shard order."""

    def fingerprint(self) -> Optional[dict[str, Any]]:
        """What identifies this stage's outputs; stored in the manifest (and by tokenizers in
        each sample's json) so that trainers can refuse mismatched shards."""
        return None

    def __getstate__(self) -> dict:
        # What setup() made (models, pools) stays in its worker: each worker makes its own.
        return {**self.__dict__, **dict.fromkeys(self.worker_state)}


class ThreadPoolStage(Stage):
    """A stage whose CPU work (decode, resize, cut: C code that releases the GIL) runs on one
    thread per CPU it was given."""

    worker_state = ("_pool",)

    def __init__(self, config: Any, cpus: int) -> None:
        super().__init__(config)
        self.cpus = cpus
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.cpus)

    def setup(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cpus, thread_name_prefix=self.name)

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
    allow_processes() by an engine that runs the stage in one long-lived process (the local engine),
                     before setup(): its CPU work may then start worker processes of its own
    setup()          once per worker, before its first batch: load models, open pools
    process(batch)   per shard: the stage owns the batch it is given, may change it in place
                     (mark rows, add columns and files) and returns it
    resume(written)  ordered stages only: the status table of a shard already complete, in shard
                     order, so job-wide state (seen hashes) is rebuilt on resume
    teardown()       at the end of the job, where the engine set it up: close what setup() opened
    fingerprint()    what identifies its outputs (model, weights hash), for the manifest

and declares:

    resources        the CPUs and GPUs one worker needs (fractions allowed)
    columns          the status-table columns it adds, with their Arrow types
    ordered          True when it must see every shard once, in shard order (job-wide dedup)
    stateful         True when setup() is heavy (a model): run in long-lived workers
    may_use_gpus     True when it may run on a GPU (then it is placed; other jobs never ask)
    document_view    on interleaved documents, what one of its rows is: "image" (each image, with
                     its nearest text as caption), "text" (each text segment), "document" (the
                     whole text as caption), or None (it reads document rows as they are);
                     :class:`pipeline.core.document.SegmentStage` runs it so
    worker_state     attributes that setup() makes in each worker; never pickled
"""
from __future__ import annotations

import asyncio
import copy
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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
    document_view: ClassVar[Optional[str]] = None

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

    def allow_processes(self) -> None:
        """The engine runs this stage in one long-lived process, which may start worker processes of
        its own (the local engine). Ray never calls it: each of its tasks already is one process."""

    def setup(self) -> None:
        """Load models and open pools; called once per worker before the first batch."""

    def teardown(self) -> None:
        """Close what setup() opened (pools, worker processes); the engine calls it at the job's end."""

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


class WorkerCrashed(Exception):
    """A worker process died running one call, and died again running it alone: the input itself
    kills it (a segfault in a decoder's C code)."""


class ProcessPool:
    """Long-lived worker processes for CPU work that threads cannot spread over the cores (the GIL,
    and the parent's own Python work). Spawned, not forked: the parent has threads. Calls are
    awaited on the caller's event loop (each ``process()`` may run a new one).

    A worker that dies breaks the whole pool: every call in it fails. The pool is then replaced and
    each of those calls runs again alone, one at a time, in a one-worker pool: the calls that only
    shared the broken pool succeed there, and the one that kills its worker again raises
    :class:`WorkerCrashed`. Results therefore never depend on which calls happened to be in flight."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(workers, mp_context=self._context)
        self._alone: Optional[ProcessPoolExecutor] = None
        self._alone_lock = threading.Lock()  # one call at a time in the one-worker pool

    async def run(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` in a worker process (``fn`` and ``args`` picklable)."""
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            if self._pool is pool:  # the first call to see the break replaces the pool
                self._pool = ProcessPoolExecutor(self.workers, mp_context=self._context)
                pool.shutdown(wait=False)
        return await loop.run_in_executor(None, self._run_alone, fn, args)

    def _run_alone(self, fn: Callable, args: tuple) -> Any:
        with self._alone_lock:
            if self._alone is None:
                self._alone = ProcessPoolExecutor(1, mp_context=self._context)
            try:
                return self._alone.submit(fn, *args).result()
            except BrokenProcessPool:
                self._alone.shutdown(wait=True)
                self._alone = None
                raise WorkerCrashed(f"the worker process died running {getattr(fn, '__name__', fn)} "
                                    "on this input alone (a crash in native code)") from None

    def close(self) -> None:
        """Stop the workers and wait for them to exit (no process outlives the job)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._alone_lock:
            if self._alone is not None:
                self._alone.shutdown(wait=True, cancel_futures=True)
                self._alone = None

    def pids(self) -> list[int]:
        """The worker processes alive now (diagnostics and tests)."""
        pools = [self._pool] + ([self._alone] if self._alone is not None else [])
        return [p.pid for pool in pools for p in list((pool._processes or {}).values()) if p.is_alive()]


class ThreadPoolStage(Stage):
    """A stage whose CPU work (decode, resize, cut) runs on one thread per CPU it was given, or, in a
    stage that ``processes_safe`` and on an engine that ``allow_processes``, on one worker process
    per CPU when it was given more than one (:meth:`worker_processes` decides, in one place). The
    stage runs that work through :meth:`run_cpu`."""

    worker_state = ("_pool", "_processes")
    # The stage's CPU work is a picklable module-level function of picklable arguments, and gains
    # from processes (Python-level work that holds the GIL between the C calls).
    processes_safe: ClassVar[bool] = False

    def __init__(self, config: Any, cpus: int) -> None:
        super().__init__(config)
        self.cpus = cpus
        self.processes_allowed = False
        self._pool: Optional[ThreadPoolExecutor] = None
        self._processes: Optional[ProcessPool] = None

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.cpus)

    def allow_processes(self) -> None:
        self.processes_allowed = True

    def worker_processes(self) -> int:
        """How many worker processes run the CPU work: 0 (threads) on one CPU, on an engine that
        did not allow them (Ray: a task is already a process per CPU), or in a stage not
        ``processes_safe``."""
        return self.cpus if self.processes_safe and self.processes_allowed and self.cpus > 1 else 0

    def setup(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cpus, thread_name_prefix=self.name)
        if self._processes is None and self.worker_processes():
            self._processes = ProcessPool(self.worker_processes())

    async def run_cpu(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` off the event loop: in a worker process when the stage has them (a call
        that kills its worker raises :class:`WorkerCrashed`), else on the thread pool."""
        if self._processes is not None:
            return await self._processes.run(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def teardown(self) -> None:
        if self._processes is not None:
            self._processes.close()
            self._processes = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

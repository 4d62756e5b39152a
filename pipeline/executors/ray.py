"""The Ray executor: shards stream through a chain of steps on a Ray cluster.

Stages are grouped into steps: consecutive light stages run together in one CPU task (the
download and the cheap filters, so a shard's media never leave the worker between them), spread
over the nodes; a ``stateful`` stage (a model) runs in a pool of long-lived actors, each loading
the model once (GPU stages request their GPUs, fractions allowed, and land on GPU nodes); an
``ordered`` stage runs on one actor fed in shard order, on the driver's node; the write through
the sink is the last step, a task of its own that writes straight to the storage. A step is
submitted as soon as the step before it is, with that step's result reference as its input, so
Ray moves the data and starts each step when its input is ready; the driver only waits for the
last step of each shard. A window of shards in flight gives backpressure and bounds the
driver's memory: it holds the rows of those shards only.

The cluster may change under a job: every few seconds the window and the actor pools follow its
resources (nodes that joined). When a node dies, Ray reruns its tasks elsewhere and restarts its
model actors on other nodes; a shard whose steps still fail is rerun from its input rows. A model
actor whose CUDA context a failure poisoned (``ModelStage.device_lost``) ends its process: Ray
restarts it with a fresh context and retries the call, so the shard is redone in the run.

Why Ray core tasks and actors rather than Ray Data: a shard is the unit of atomic writes,
resume and retry, and its rows must stay together and in order (byte-identical output, ordered
dedup); Ray Data repartitions rows into blocks of its choosing, so shards would have to be
re-assembled after it. Tasks and actors keep a shard one object from reading to writing, and
Ray still does the placement, the data movement, the actor pools' GPUs and task retries on
worker failure.
"""
from __future__ import annotations

import collections
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch
from pipeline.core.stage import Resources, Stage
from pipeline.executors.base import (Executor, Failure, OnDone, OrderGate, Payload, Replay, ShardOutcome, Step,
                                     Work, run_stages, write_shard)
from pipeline.executors.ray_connect import connect_ray
from pipeline.sinks.base import Sink
from pipeline.sinks.storage import Directory
from pipeline.sources.shards import InputShard

log = logging.getLogger("mmcurate")

RESCALE_SECONDS = 5.0  # how often the window and the pools follow the cluster's resources
QUEUED = 2             # calls waiting on every actor of a CPU pool before it gets one more actor
RETRIES = 3            # Ray's own reruns of a task or actor call lost with its worker or node

_WORKER_STAGES: dict[str, list[Stage]] = {}


def _task_step(token: str, stages: list[Stage], step: Step) -> Step:
    # Set the stages up once per worker process, not once per shard.
    if token not in _WORKER_STAGES:
        for stage in stages:
            stage.setup()
        _WORKER_STAGES[token] = stages
    return run_stages(_WORKER_STAGES[token], step)


class _StageActor:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        stage.setup()

    def run(self, step: Step) -> Step:
        result = run_stages([self.stage], step)
        if getattr(self.stage, "device_lost", False):
            # Every later kernel of this process would fail: end it, so that Ray restarts the actor
            # (max_restarts) and retries this call on it (max_task_retries).
            log.error("%s: the CUDA context is unusable; restarting the actor", self.stage.name)
            os._exit(1)
        return result

    def resume(self, written: Batch) -> None:
        self.stage.resume(written)


@dataclass
class StepPlan:
    kind: str                    # "task" (light stages), "actor" (a model) or "ordered"
    stages: list[Stage]
    actors: list = field(default_factory=list)


def plan_steps(stages: list[Stage]) -> list[StepPlan]:
    steps: list[StepPlan] = []
    for stage in stages:
        kind = "ordered" if stage.ordered else "actor" if stage.stateful else "task"
        if kind == "task" and steps and steps[-1].kind == "task":
            steps[-1].stages.append(stage)
        else:
            steps.append(StepPlan(kind, [stage]))
    return steps


class RayExecutor(Executor):
    name = "ray"

    def gpus(self) -> float:
        import ray

        connect_ray(self.options.address)
        return ray.cluster_resources().get("GPU", 0.0)

    def schedule(self, work: Iterator[Work], stages: list[Stage], sink: Sink, on_done: OnDone) -> None:
        connect_ray(self.options.address)
        check_shared(sink.directory)
        flight = _Flight(plan_steps(stages), sink, on_done, self.attempts(stages),
                         self.options.max_shards_in_flight)
        try:
            flight.run(work)
        finally:
            flight.close()


def check_shared(directory: Directory) -> None:
    """A local output directory on a cluster of several nodes must be one that every node sees
    (a shared mount): write tasks run anywhere, and would scatter shards over the nodes' disks."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not directory.local or len(nodes) < 2:
        return
    probe = f".mmcurate-probe-{uuid.uuid4().hex}"
    directory.write(probe, b"")
    try:
        sees = ray.remote(_exists)
        on = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes]
        refs = [sees.options(num_cpus=0, scheduling_strategy=s).remote(os.path.join(directory.local, probe))
                for s in on]
        ray.wait(refs, num_returns=len(refs), timeout=60)  # a node dying now must not hold the job
        seen = [_answer(ref) for ref in refs]
    finally:
        directory.remove(probe)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if ok is False]
    if blind:
        raise ConfigError(f"output.dir: {directory.local!r} is a local path that node(s) {', '.join(blind)} do "
                          "not see; on a cluster use a shared mount or an object store URL (s3://bucket/prefix)")


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _answer(ref: Any) -> Union[bool, None]:
    """A probe's answer; None when its node went away or did not answer in time."""
    import ray

    try:
        return ray.get(ref, timeout=0)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return None


class _Flight:
    """One run's shards on Ray: which step of which shard is where, and the actors doing them."""

    def __init__(self, steps: list[StepPlan], sink: Sink, on_done: OnDone, attempts: int,
                 window: Union[int, None]) -> None:
        import ray

        self.steps, self.sink, self.on_done, self.attempts = steps, sink, on_done, attempts
        self.task_cpus = max(max((s.resources.cpus for p in steps if p.kind == "task" for s in p.stages), default=1),
                             0.5)
        self.task = ray.remote(_task_step).options(num_cpus=self.task_cpus, max_retries=RETRIES,
                                                   scheduling_strategy="SPREAD")
        self.writer = ray.remote(write_shard).options(num_cpus=0, max_retries=RETRIES)
        self.token = uuid.uuid4().hex  # tells one run's task stages from another's in a reused worker
        self.fixed_window = window
        self.window = 0
        self.gates = {n: OrderGate() for n, p in enumerate(steps) if p.kind == "ordered"}
        self.pending: dict[Any, tuple[InputShard, int, int]] = {}  # ref -> (shard, step index, attempt)
        self.busy: collections.Counter = collections.Counter()     # actor -> calls in flight
        self.owner: dict[Any, Any] = {}                             # ref -> the actor computing it
        self.in_flight = 0
        self.sizing = _Sizing([p.stages[0].resources for p in steps if p.kind != "task"], self.task_cpus,
                              ray.cluster_resources().get("CPU", 1.0))
        self.rescaled = 0.0
        self._rescale()

    # -- actors ----------------------------------------------------------------------------------
    def _new_actor(self, plan: StepPlan) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        res = self.sizing.request(plan.stages[0].resources)
        options: dict[str, Any] = dict(num_cpus=res.cpus, num_gpus=res.gpus)
        if plan.kind == "ordered":
            # job-wide state (seen hashes) must outlive any worker node; a restart would lose it
            node = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        else:
            options.update(max_restarts=RETRIES, max_task_retries=RETRIES)
        return ray.remote(_StageActor).options(**options).remote(plan.stages[0])

    def _rescale(self) -> None:
        """Follow the cluster's resources: the window with its CPUs, each model pool with its GPUs
        (GPU stages) or with its queue (CPU stages, while CPUs are left for a download task)."""
        import ray

        self.rescaled = time.monotonic()
        total = ray.cluster_resources()
        self.window = max(self.window, self.fixed_window or max(2, int(2 * total.get("CPU", 1.0) // self.task_cpus)))
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        for plan in self.steps:
            if plan.kind == "task":
                continue
            want = 1 if plan.kind == "ordered" else self.sizing.pool(
                plan.stages[0].resources, len(plan.actors), [self.busy[a] for a in plan.actors], total, nodes,
                ray.available_resources())
            while len(plan.actors) < want:
                plan.actors.append(self._new_actor(plan))

    def close(self) -> None:
        import ray

        for plan in self.steps:
            for actor in plan.actors:
                ray.kill(actor)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, work: Iterator[Work]) -> None:
        import ray

        exhausted = False
        while True:
            while not exhausted and self.in_flight < self.window:
                item = next(work, None)
                if item is None:
                    exhausted = True
                else:
                    self._admit(item)
            if not self.pending:
                if exhausted:
                    return
                continue
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=RESCALE_SECONDS)
            if time.monotonic() - self.rescaled >= RESCALE_SECONDS:
                self._rescale()
            if not done:
                continue
            ref = done[0]
            shard, n, attempt = self.pending.pop(ref)
            actor = self.owner.pop(ref, None)
            if actor is not None:
                self.busy[actor] -= 1
            if n < len(self.steps):
                self._enter(shard, n + 1, attempt, ref)
            else:
                self._finish(shard, attempt, ref)

    def _admit(self, item: Work) -> None:
        """A shard read from the input (or replayed from the sink) takes its place in every gate."""
        for gate in self.gates.values():
            gate.expect(item.shard_id)
        if isinstance(item, Replay):
            for n in self.gates:
                self._release(n, self.gates[n].arrive(item.shard_id, (item, 0, None)))
            return
        self.in_flight += 1
        self._enter(item, 0, 0, Payload(item.batch))

    def _enter(self, shard: InputShard, n: int, attempt: int, step: Any) -> None:
        """Step ``n`` of ``shard`` gets its input (a Payload, or the previous step's reference)."""
        if n in self.gates:
            self._release(n, self.gates[n].arrive(shard.shard_id, (shard, attempt, step)))
        else:
            self._submit(shard, n, attempt, step)

    def _release(self, n: int, ready: list) -> None:
        for shard, attempt, step in ready:
            if isinstance(shard, Replay):  # actor calls keep submission order
                self.steps[n].actors[0].resume.remote(shard.load())
            else:
                self._submit(shard, n, attempt, step)

    def _submit(self, shard: InputShard, n: int, attempt: int, step: Any) -> None:
        if n == len(self.steps):
            ref = self.writer.remote(self.sink, shard.shard_id, step)
        else:
            plan = self.steps[n]
            if plan.kind == "task":
                ref = self.task.remote(f"{self.token}:{n}", plan.stages, step)
            else:
                actor = min(plan.actors, key=lambda a: self.busy[a])
                self.busy[actor] += 1
                ref = actor.run.remote(step)
                self.owner[ref] = actor
        self.pending[ref] = (shard, n, attempt)

    def _finish(self, shard: InputShard, attempt: int, ref: Any) -> None:
        import ray

        try:
            result = ray.get(ref)
        except Exception as e:  # a worker or actor died: Ray's own error, with the remote traceback
            result = Failure(str(e))
        if isinstance(result, Failure) and attempt + 1 < self.attempts:
            self._enter(shard, 0, attempt + 1, Payload(shard.batch))
            return
        self.in_flight -= 1
        if isinstance(result, Failure):
            self.on_done(ShardOutcome(shard.shard_id, error=result.error))
        else:
            self.on_done(ShardOutcome(shard.shard_id, result))


class _Sizing:
    """How big the actor pools are and what each actor asks for, so that everything can be placed.

    * CPU: long-lived actors must leave room for at least one download task, or nothing would run
      (on a small machine, three model actors of 1 CPU each would hold every CPU forever); their
      CPU requests shrink to fit. Ray does not cap the CPU a process really uses.
    * GPU: the GPU stages' actors come in sets, one actor of each; a set must fit on one node (its
      requests shrink to fit the largest node otherwise), and each pool has one actor per set that
      the nodes hold, so no actor waits for a GPU that another pool took.
    """

    def __init__(self, pools: list[Resources], task_cpus: float, cpus: float) -> None:
        self.task_cpus = task_cpus
        wanted = sum(r.cpus for r in pools)
        room = max(cpus - task_cpus, 0.0)
        self.cpu_scale = 1.0 if wanted <= room else room / wanted
        if self.cpu_scale < 1:
            log.warning("model and ordered stages ask for %.1f CPUs; %.1f are left after one download task: "
                        "their CPU requests are scaled down to fit", wanted, room)
        self.gpu_set = sum(r.gpus for r in pools)
        self.gpu_scale = 1.0
        self.held_cpus = 0.0

    def request(self, res: Resources) -> Resources:
        """What one actor of a stage asks Ray for (and counts it as held)."""
        got = Resources(cpus=res.cpus * self.cpu_scale, gpus=res.gpus * self.gpu_scale)
        self.held_cpus += got.cpus
        return got

    def pool(self, res: Resources, size: int, busy: list[int], total: dict, nodes: list[dict],
             free: dict) -> int:
        """How many actors a stage's pool should have now."""
        if res.gpus > 0:
            return max(size, 1, self._gpu_sets(nodes))
        if size == 0:
            return 1
        cpus = res.cpus * self.cpu_scale
        queued = all(b >= QUEUED for b in busy)
        room = total.get("CPU", 0.0) - self.held_cpus - cpus >= self.task_cpus and free.get("CPU", 0.0) >= cpus
        return size + 1 if queued and room else size

    def _gpu_sets(self, nodes: list[dict]) -> int:
        largest = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        if largest <= 0:
            log.warning("GPU stages wait for a node with GPUs: the cluster has none now")
            return 1
        if self.gpu_set * self.gpu_scale > largest:
            self.gpu_scale = largest / self.gpu_set
            log.warning("GPU stages ask for %.2f GPUs together; the largest node has %.2f: their GPU requests "
                        "are scaled down to fit", self.gpu_set, largest)
        per_set = self.gpu_set * self.gpu_scale
        return sum(int(n.get("GPU", 0.0) / per_set + 1e-9) for n in nodes)

"""The Ray executor: shards stream through a chain of steps on a Ray cluster.

Stages are grouped into steps: consecutive light stages run together in one CPU task (the
download and the cheap filters, so a shard's media never leave the worker between them); a
``stateful`` stage (a model) runs in a pool of long-lived actors, each loading the model once; an
``ordered`` stage runs on one actor fed in shard order; the write through the sink is the last
step, a task of its own. A step is submitted as soon as the step before it is, with that step's
result reference as its input, so Ray moves the data and starts each step when its input is
ready; the driver only waits for the last step of each shard. A window of shards in flight gives
backpressure and bounds memory.

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
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

from pipeline.core.schema import Batch
from pipeline.core.stage import Resources, Stage
from pipeline.executors.base import (Executor, Failure, OnDone, OrderGate, Payload, Replay, ShardOutcome, Step,
                                     Work, run_stages, write_shard)
from pipeline.executors.ray_connect import connect_ray
from pipeline.sinks.base import Sink
from pipeline.sources.shards import InputShard

log = logging.getLogger("mmcurate")

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
        return run_stages([self.stage], step)

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

    def schedule(self, work: Iterator[Work], stages: list[Stage], sink: Sink, on_done: OnDone) -> None:
        connect_ray(self.options.address)
        flight = _Flight(plan_steps(stages), sink, on_done, self.attempts(stages),
                         self.options.max_shards_in_flight)
        try:
            flight.run(work)
        finally:
            flight.close()


class _Flight:
    """One run's shards on Ray: which step of which shard is where, and the actors doing them."""

    def __init__(self, steps: list[StepPlan], sink: Sink, on_done: OnDone, attempts: int,
                 window: Union[int, None]) -> None:
        import ray

        self.steps, self.sink, self.on_done, self.attempts = steps, sink, on_done, attempts
        cpus = ray.cluster_resources().get("CPU", 2)
        task_cpus = max(max((s.resources.cpus for p in steps if p.kind == "task" for s in p.stages), default=1), 0.5)
        self._start_actors(task_cpus, cpus)
        self.task = ray.remote(_task_step).options(num_cpus=task_cpus, max_retries=1)
        self.writer = ray.remote(write_shard).options(num_cpus=0, max_retries=3)
        self.token = uuid.uuid4().hex  # tells one run's task stages from another's in a reused worker
        self.window = window or max(2, int(2 * cpus // task_cpus))
        self.gates = {n: OrderGate() for n, p in enumerate(steps) if p.kind == "ordered"}
        self.pending: dict[Any, tuple[InputShard, int, int]] = {}  # ref -> (shard, step index, attempt)
        self.busy: collections.Counter = collections.Counter()     # actor -> calls in flight
        self.owner: dict[Any, Any] = {}                             # ref -> the actor computing it
        self.in_flight = 0

    # -- actors ----------------------------------------------------------------------------------
    def _start_actors(self, task_cpus: float, cpus: float) -> None:
        import ray

        pools = [(p, 1 if p.kind == "ordered" else _pool_size(p.stages[0].resources))
                 for p in self.steps if p.kind != "task"]
        scale = _actor_cpu_scale([(p.stages[0].resources, count) for p, count in pools], task_cpus, cpus)
        for plan, count in pools:
            res = plan.stages[0].resources
            cls = ray.remote(num_cpus=res.cpus * scale, num_gpus=res.gpus)(_StageActor)
            plan.actors = [cls.remote(plan.stages[0]) for _ in range(count)]

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
            [ref], _ = ray.wait(list(self.pending), num_returns=1)
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


def _actor_cpu_scale(pools: list[tuple[Resources, int]], task_cpus: float, cpus: float) -> float:
    """Long-lived actors must leave room for at least one download task, or nothing would run
    (on a small machine, three model actors of 1 CPU each would hold every CPU forever). Their
    CPU requests shrink to fit; Ray does not cap the CPU a process really uses."""
    wanted = sum(res.cpus * count for res, count in pools)
    room = max(cpus - task_cpus, 0.0)
    if wanted <= room:
        return 1.0
    log.warning("model and ordered stages ask for %.1f CPUs; %.1f are left after one download task: "
                "their CPU requests are scaled down to fit", wanted, room)
    return room / wanted


def _pool_size(res: Resources) -> int:
    import ray

    if res.gpus > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // res.gpus))
    return 1  # a CPU model worker; the CPUs are better spent on download tasks

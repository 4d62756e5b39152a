"""Executors run the same stages over input shards: ``local`` (in-process) and ``ray``.

Both hand each finished shard to ``on_done(shard_id, stats, error)``. Stages are grouped into
steps: consecutive light stages run together in one task; a ``stateful`` stage (a model) runs in
a pool of long-lived actors; an ``ordered`` stage runs on one actor fed in shard order; the
write is the last step. A window of shards in flight gives backpressure and bounds memory.
"""
from __future__ import annotations

import collections
import logging
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pipeline.sources.reader import InputShard
from pipeline.core.stage import Batch, Stage
from pipeline.sinks.webdataset import write_shard

log = logging.getLogger("mmcurate")
OnDone = Callable[[int, Optional[dict], Optional[str]], None]
Payload = tuple  # (batch, timings)


@dataclass
class CompletedShard:
    """A shard already complete on disk, passed in shard order so that ordered stages (exact
    dedup across the job) rebuild their state exactly where an uninterrupted run had it."""

    shard_id: int
    load: Callable[[], Batch]  # its status table, read from disk


def run_stages(stages: list[Stage], payload: Payload) -> Payload:
    """Apply stages in order, adding each stage's wall time to the timings."""
    batch, timings = payload
    for stage in stages:
        start = time.perf_counter()
        batch = stage(batch)
        timings = {**timings, stage.name: timings.get(stage.name, 0.0) + time.perf_counter() - start}
    return batch, timings


def write_payload(out_dir: str, shard_id: int, payload: Payload) -> dict:
    batch, timings = payload
    start = time.perf_counter()
    stats = write_shard(out_dir, shard_id, batch, {k: round(v, 3) for k, v in timings.items()})
    stats["timings"]["write"] = round(time.perf_counter() - start, 3)
    return stats


class LocalExecutor:
    """Everything in this process, shard after shard (for tests, debugging and small jobs)."""

    def __init__(self, spec) -> None:
        self.retries = spec.execution.shard_retries

    def run(self, shards: Iterator[InputShard], stages: list[Stage], out_dir: Path, on_done: OnDone) -> None:
        for stage in stages:
            stage.setup()
        has_ordered = any(s.ordered for s in stages)
        for shard in shards:
            if isinstance(shard, CompletedShard):
                written = shard.load()
                for stage in stages:
                    if stage.ordered:
                        stage.resume(written)
                continue
            attempts = 1 if has_ordered else 1 + self.retries  # ordered state must see a shard once
            for attempt in range(attempts):
                try:
                    batch = {k: list(v) if k != "files" else [dict(f) for f in v] for k, v in shard.batch.items()}
                    stats = write_payload(str(out_dir), shard.shard_id, run_stages(stages, (batch, {})))
                except Exception:  # a shard failure must not stop the job; the rerun retries it
                    error = traceback.format_exc()
                    if attempt + 1 == attempts:
                        on_done(shard.shard_id, None, error)
                else:
                    on_done(shard.shard_id, stats, None)
                    break


# -- Ray --------------------------------------------------------------------------------------------

_WORKER_STAGES: dict[str, list[Stage]] = {}


def _task_step(token: str, stages: list[Stage], payload: Payload) -> Payload:
    # Set the stages up once per worker process, not once per shard.
    if token not in _WORKER_STAGES:
        for stage in stages:
            stage.setup()
        _WORKER_STAGES[token] = stages
    return run_stages(_WORKER_STAGES[token], payload)


class _StageActor:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        stage.setup()

    def run(self, payload: Payload) -> Payload:
        return run_stages([self.stage], payload)

    def resume(self, written: Batch) -> None:
        self.stage.resume(written)


def is_loopback(address: Optional[str]) -> bool:
    if address in (None, "local", "auto"):
        return True
    host = urllib.parse.urlsplit(address if "://" in address else f"//{address}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def pin_ray_to_loopback() -> None:
    """Keep Ray on 127.0.0.1. Ray rewrites 127.0.0.1 (even an explicit node IP) to the host's
    network address unless it believes multi-host clusters are off; say so, here and in the
    environment that Ray's worker processes inherit."""
    import os

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(address: Optional[str]) -> None:
    """Start a local Ray on 127.0.0.1 (no dashboard), or join ``address`` ("auto", ray://...)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    if is_loopback(address):
        pin_ray_to_loopback()
        kwargs["_node_ip_address"] = "127.0.0.1"
    ray.init(address=address or "local", **kwargs)


class RayExecutor:
    """Streams shards through Ray: CPU tasks for light stages, actor pools for models."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.retries = spec.execution.shard_retries

    # -- building the chain ----------------------------------------------------------------------
    def _steps(self, stages: list[Stage]) -> list[tuple[str, list[Stage]]]:
        steps: list[tuple[str, list[Stage]]] = []
        for stage in stages:
            kind = "ordered" if stage.ordered else "actor" if stage.stateful else "task"
            if kind == "task" and steps and steps[-1][0] == "task":
                steps[-1][1].append(stage)
            else:
                steps.append((kind, [stage]))
        return steps

    def run(self, shards: Iterator[InputShard], stages: list[Stage], out_dir: Path, on_done: OnDone) -> None:
        import ray

        connect_ray(self.spec.execution.address)
        steps = self._steps(stages)
        token = uuid.uuid4().hex
        actors: dict[int, list] = {}
        busy: collections.Counter = collections.Counter()  # actor -> calls in flight
        owner: dict[Any, Any] = {}  # ref -> the actor computing it
        task_cpus = max(max((s.resources.cpus for _, g in steps for s in g if _ == "task"), default=1), 0.5)
        pools = {n: (group[0], 1 if kind == "ordered" else self._pool_size(group[0].resources))
                 for n, (kind, group) in enumerate(steps) if kind != "task"}
        cpu_scale = self._actor_cpu_scale(pools.values(), task_cpus)
        for n, (stage, count) in pools.items():
            res = stage.resources
            cls = ray.remote(num_cpus=res.cpus * cpu_scale, num_gpus=res.gpus)(_StageActor)
            actors[n] = [cls.remote(stage) for _ in range(count)]
        task = ray.remote(_task_step).options(num_cpus=task_cpus, max_retries=1)
        writer = ray.remote(write_payload).options(num_cpus=0, max_retries=3)
        window = self.spec.execution.max_shards_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 2) // task_cpus))
        has_ordered = any(kind == "ordered" for kind, _ in steps)

        pending: dict[Any, tuple[InputShard, int, int]] = {}  # ref -> (shard, step index, attempt)
        order: dict[int, collections.deque] = {n: collections.deque() for n, (k, _) in enumerate(steps) if k == "ordered"}
        parked: dict[int, dict[int, Any]] = {n: {} for n in order}  # shard id -> payload ref waiting its turn
        in_flight = 0
        source = iter(shards)
        exhausted = False

        def submit(shard: InputShard, n: int, attempt: int, payload: Any) -> None:
            if n == len(steps):
                ref = writer.remote(str(out_dir), shard.shard_id, payload)
            else:
                kind, group = steps[n]
                if kind == "task":
                    ref = task.remote(f"{token}:{n}", group, payload)
                else:
                    actor = min(actors[n], key=lambda a: busy[a])
                    busy[actor] += 1
                    ref = actor.run.remote(payload)
                    owner[ref] = actor
            pending[ref] = (shard, n, attempt)

        def release_ordered(n: int) -> None:
            queue, waiting = order[n], parked[n]
            while queue and queue[0] in waiting:
                shard_id = queue.popleft()
                shard, attempt, ref = waiting.pop(shard_id)
                if isinstance(shard, CompletedShard):  # actor calls keep submission order
                    actors[n][0].resume.remote(shard.load())
                else:
                    submit(shard, n, attempt, ref)

        def advance(shard: InputShard, n: int, attempt: int, ref: Any) -> None:
            nxt = n + 1
            if nxt in order:
                parked[nxt][shard.shard_id] = (shard, attempt, ref)
                release_ordered(nxt)
            else:
                submit(shard, nxt, attempt, ref)

        def drop_from_order(shard_id: int) -> None:
            for n, queue in order.items():
                if shard_id in queue:
                    queue.remove(shard_id)
                    release_ordered(n)

        while True:
            while not exhausted and in_flight < window:
                shard = next(source, None)
                if shard is None:
                    exhausted = True
                    break
                if isinstance(shard, CompletedShard):
                    for n, queue in order.items():
                        queue.append(shard.shard_id)
                        parked[n][shard.shard_id] = (shard, 0, None)
                        release_ordered(n)
                    continue
                in_flight += 1
                for queue in order.values():
                    queue.append(shard.shard_id)
                payload = (shard.batch, {})
                if 0 in order:
                    parked[0][shard.shard_id] = (shard, 0, payload)
                    release_ordered(0)
                else:
                    submit(shard, 0, 0, payload)
            if not pending:
                if exhausted:
                    break
                continue
            [ref], _ = ray.wait(list(pending), num_returns=1)
            shard, n, attempt = pending.pop(ref)
            actor = owner.pop(ref, None)
            if actor is not None:
                busy[actor] -= 1
            if n < len(steps):
                advance(shard, n, attempt, ref)
                continue
            try:
                stats = ray.get(ref)
            except Exception as e:  # any step's error surfaces at the write
                if attempt < self.retries and not has_ordered:
                    submit(shard, 0, attempt + 1, (shard.batch, {}))
                    continue
                drop_from_order(shard.shard_id)
                in_flight -= 1
                on_done(shard.shard_id, None, str(e))
                continue
            in_flight -= 1
            on_done(shard.shard_id, stats, None)
        for pool in actors.values():
            for a in pool:
                ray.kill(a)

    @staticmethod
    def _actor_cpu_scale(pools, task_cpus: float) -> float:
        """Long-lived actors must leave room for at least one download task, or nothing would run
        (on a small machine, three model actors of 1 CPU each would hold every CPU forever). Their
        CPU requests shrink to fit; Ray does not cap the CPU a process really uses."""
        import ray

        wanted = sum(stage.resources.cpus * count for stage, count in pools)
        room = max(ray.cluster_resources().get("CPU", 1) - task_cpus, 0.0)
        if wanted <= room:
            return 1.0
        log.warning("model and ordered stages ask for %.1f CPUs; %.1f are left after one download task: "
                    "their CPU requests are scaled down to fit", wanted, room)
        return room / wanted

    def _pool_size(self, res) -> int:
        import ray

        if res.gpus > 0:
            return max(1, int(ray.cluster_resources().get("GPU", 0) // res.gpus))
        return 1  # a CPU model worker; the CPUs are better spent on download tasks

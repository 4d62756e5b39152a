"""The executor contract and everything engines share. ``run(shards, stages, sink, on_done)``:

* skips the shards the sink already holds (reporting them as skipped) and, when a stage is
  ``ordered``, replays their status tables to it in shard order, so job-wide state (seen hashes)
  is exactly where an uninterrupted run had it; a complete shard whose files are not as written
  (``Sink.verified_stats``: sizes, with ``verify`` checksums, a replayed status table readable)
  is redone instead, with a warning;
* runs the stages over each other shard, timing each stage, and writes it through the sink;
* retries a failed shard up to ``shard_retries`` times in this run, except when a stage is
  ordered (its state must see every shard once; the next run redoes the shard);
* reports every shard once through ``on_done(ShardOutcome)``, a failure with the same error
  text (the traceback) under every engine.

Subclasses only ``schedule`` the work: where and when each step runs.
"""
from __future__ import annotations

import collections
import logging
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional, Union

from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.core.stage import Stage
from pipeline.sinks.base import DamagedShard, Sink
from pipeline.sources.shards import InputShard

log = logging.getLogger("mmcurate")


@dataclass
class ShardOutcome:
    shard_id: int
    stats: Optional[dict] = None   # what the sink recorded; None when the shard failed
    error: Optional[str] = None    # why it failed: the traceback
    skipped: bool = False          # complete from an earlier run

    @property
    def ok(self) -> bool:
        return self.stats is not None


OnDone = Callable[[ShardOutcome], None]


@dataclass(frozen=True)
class Replay:
    """A shard already complete, for the ordered stages to see in its turn."""

    shard_id: int
    load: Callable[[], Batch]  # its status table, read from the sink


Work = Union[InputShard, Replay]


@dataclass(frozen=True)
class Failure:
    """A shard's stages or write raised. It travels as a value through the remaining steps, so
    every engine reports the same text and no engine's error wrapping gets in the way."""

    error: str


@dataclass
class Payload:
    """A shard between steps: its batch and the seconds spent in each stage so far."""

    batch: Batch
    timings: dict[str, float] = field(default_factory=dict)


Step = Union[Payload, Failure]


def run_stages(stages: list[Stage], step: Step) -> Step:
    """Apply ``stages`` in order, adding each one's wall time to the payload's timings."""
    if isinstance(step, Failure):
        return step
    try:
        batch, timings = step.batch, dict(step.timings)
        for stage in stages:
            start = time.perf_counter()
            batch = stage.process(batch)
            timings[stage.name] = timings.get(stage.name, 0.0) + time.perf_counter() - start
        return Payload(batch, timings)
    except Exception:  # a shard failure must not stop the job; the rerun retries it
        return Failure(traceback.format_exc())


def write_shard(sink: Sink, shard_id: int, step: Step) -> Union[dict, Failure]:
    """Settle the shard's rows and commit it; the stats as written, plus the write's own time."""
    if isinstance(step, Failure):
        return step
    try:
        schema.settle(step.batch)
        stats = schema.shard_stats(step.batch, shard_id, {k: round(v, 3) for k, v in step.timings.items()})
        start = time.perf_counter()
        stats = sink.write(shard_id, step.batch, stats)
        stats["timings"] = {**stats["timings"], "write": round(time.perf_counter() - start, 3)}
        return stats
    except Exception:
        return Failure(traceback.format_exc())


class OrderGate:
    """Lets shards into an ordered step in the order they were read, whatever order they arrive
    in from the steps before it: ``expect`` a shard when it is read, ``arrive`` it (with what the
    step needs) when it is ready; that returns the items whose turn it now is, in order. Every
    shard reaches every step (a failed one as a Failure), so the gate never waits in vain."""

    def __init__(self) -> None:
        self._order: collections.deque[int] = collections.deque()
        self._ready: dict[int, Any] = {}

    def expect(self, shard_id: int) -> None:
        self._order.append(shard_id)

    def arrive(self, shard_id: int, item: Any) -> list[Any]:
        self._ready[shard_id] = item
        return self._release()

    def _release(self) -> list[Any]:
        out = []
        while self._order and self._order[0] in self._ready:
            out.append(self._ready.pop(self._order.popleft()))
        return out


class Executor(ABC):
    """Runs stages over input shards into a sink; see the module docstring."""

    name: ClassVar[str]

    def __init__(self, options: Any) -> None:
        self.options = options  # the job's execution section

    def run(self, shards: Iterable[InputShard], stages: list[Stage], sink: Sink, on_done: OnDone,
            verify: bool = False) -> None:
        """``verify``: read complete shards back and check their checksums before skipping them."""
        self.schedule(self._work(shards, stages, sink, on_done, verify), stages, sink, on_done)

    def _work(self, shards: Iterable[InputShard], stages: list[Stage], sink: Sink, on_done: OnDone,
              verify: bool = False) -> Iterator[Work]:
        replay = any(s.ordered for s in stages)
        done = sink.complete_shards()
        for shard in shards:
            if shard.shard_id in done:
                try:
                    stats = sink.verified_stats(shard.shard_id, checksums=verify, status=replay)
                except DamagedShard as e:
                    log.warning("shard %05d was complete but %s: redoing it", shard.shard_id, e)
                    yield shard
                    continue
                on_done(ShardOutcome(shard.shard_id, stats, skipped=True))
                if replay:
                    yield Replay(shard.shard_id, partial(sink.read_status, shard.shard_id))
                continue
            yield shard

    @abstractmethod
    def gpus(self) -> float:
        """The GPUs this engine can give stages: this machine's, or the whole cluster's on Ray."""

    def attempts(self, stages: list[Stage]) -> int:
        """Tries per shard in this run: once when a stage is ordered, else 1 + shard_retries."""
        return 1 if any(s.ordered for s in stages) else 1 + self.options.shard_retries

    @abstractmethod
    def schedule(self, work: Iterator[Work], stages: list[Stage], sink: Sink, on_done: OnDone) -> None:
        """Run every InputShard of ``work`` (and hand every Replay to the ordered stages, in order),
        reporting each shard through ``on_done``."""

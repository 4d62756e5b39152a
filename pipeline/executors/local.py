"""The local executor: every shard in this process, one after the other (tests, debugging, small
jobs). Stages are set up once; ordered stages see shards in order because everything does. The
stages may start worker processes for their CPU work (this process is long-lived and alone:
``Stage.allow_processes``); they are torn down, their workers stopped, when the job ends, even
by an exception."""
from __future__ import annotations

from typing import Iterator

from pipeline.core.stage import Stage
from pipeline.executors.base import (Executor, Failure, OnDone, Payload, Replay, ShardOutcome, Work, run_stages,
                                     write_shard)
from pipeline.sinks.base import Sink


class LocalExecutor(Executor):
    name = "local"

    def gpus(self) -> float:
        from pipeline.core.model_stage import cuda_devices

        return cuda_devices()

    def schedule(self, work: Iterator[Work], stages: list[Stage], sink: Sink, on_done: OnDone) -> None:
        try:
            for stage in stages:
                stage.allow_processes()
                stage.setup()
            self._run_all(work, stages, sink, on_done)
        finally:
            for stage in stages:
                stage.teardown()

    def _run_all(self, work: Iterator[Work], stages: list[Stage], sink: Sink, on_done: OnDone) -> None:
        ordered = [s for s in stages if s.ordered]
        for item in work:
            if isinstance(item, Replay):
                written = item.load()
                for stage in ordered:
                    stage.resume(written)
                continue
            for _ in range(self.attempts(stages)):
                result = write_shard(sink, item.shard_id, run_stages(stages, Payload(item.fresh_batch())))
                if not isinstance(result, Failure):
                    break
            if isinstance(result, Failure):
                on_done(ShardOutcome(item.shard_id, error=result.error))
            else:
                on_done(ShardOutcome(item.shard_id, result))

"""The local executor: every shard in this process, one after the other (tests, debugging, small
jobs). Stages are set up once; ordered stages see shards in order because everything does."""
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
        for stage in stages:
            stage.setup()
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

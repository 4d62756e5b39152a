"""Run a job: build its parts, restore or prepare job-wide stage state, run the executor over the
input shards into the sink, and record the outcome in the manifest.

A shard the sink already holds is never redone, so a killed job resumes where it stopped and,
given the same spec, produces the same shards as an uninterrupted run.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.core.stage import JobContext, Stage
from pipeline.executors.base import ShardOutcome
from pipeline.job import manifest as manifests
from pipeline.job.build import build_executor, build_sink, build_stages, input_rows, input_shards
from pipeline.job.progress import Progress
from pipeline.job.spec import JobSpec
from pipeline.sinks.storage import Directory
from pipeline.sources.shards import InputShard

log = logging.getLogger("mmcurate")


@dataclass
class JobResult:
    out_dir: str  # the output directory's path or URL
    shards_total: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    failed_shards: dict[int, str] = field(default_factory=dict)
    status_counts: Counter = field(default_factory=Counter)
    error_kinds: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def samples(self) -> int:
        return sum(self.status_counts.values())

    @property
    def ok(self) -> bool:
        return not self.failed_shards


class Job:
    def __init__(self, spec: JobSpec, progress: Optional[bool] = None) -> None:
        self.spec = spec
        self.show_progress = spec.execution.progress if progress is None else progress

    def run(self) -> JobResult:
        start = time.perf_counter()
        stages = build_stages(self.spec)
        executor = build_executor(self.spec)
        if any(s.may_use_gpus for s in stages):
            gpus = executor.gpus()  # on Ray: joins the cluster, whose GPUs decide devices set to auto
            for stage in stages:
                stage.place(gpus)
        sink = build_sink(self.spec, stages)
        removed = sink.open()
        if removed:
            log.info("removed %d partial files left by an interrupted run", removed)
        directory, job = sink.directory, manifests.recorded(self.spec.to_dict())
        manifest = manifests.load(directory, job)
        manifest.update(name=self.spec.name, job=job, versions=manifests.versions(),
                        status="running", started=manifest.get("started", manifests.now()))
        manifest["fingerprints"] = {k: fp for k, s in zip(manifests.stage_keys(stages), stages)
                                    if (fp := s.fingerprint()) is not None}
        manifests.write(directory, manifest)
        self._prepare(stages, manifest, directory)

        result = JobResult(directory.url)
        total_rows = input_rows(self.spec)
        total_shards = None if total_rows is None else -(-total_rows // self.spec.output.samples_per_shard)
        progress = Progress(total_shards, enabled=self.show_progress)

        def counted(shards: Iterable[InputShard]) -> Iterator[InputShard]:
            for shard in shards:
                result.shards_total += 1
                yield shard

        def on_done(outcome: ShardOutcome) -> None:
            if outcome.skipped:
                result.shards_skipped += 1
                progress.skip(outcome.stats)
            elif outcome.ok:
                result.shards_written += 1
                progress.done(outcome.stats)
            else:
                result.failed_shards[outcome.shard_id] = outcome.error or "unknown error"
                log.error("shard %05d failed (it will be retried on the next run): %s", outcome.shard_id,
                          outcome.error)
                progress.fail()

        try:
            executor.run(counted(input_shards(self.spec)), stages, sink, on_done)
        finally:
            progress.close()
        index = sink.finish()
        for entry in index["shardlist"]:
            stats = sink.read_stats(int(entry["url"][:5]))
            result.status_counts.update(stats["status_counts"])
            result.error_kinds.update(stats["error_kinds"])
        result.seconds = time.perf_counter() - start
        manifest.update(
            status="complete" if result.ok and result.shards_total == len(index["shardlist"]) else "incomplete",
            finished=manifests.now(),
            totals={"shards": len(index["shardlist"]), "samples": result.samples,
                    "successes": result.status_counts.get(schema.SUCCESS, 0),
                    "status_counts": dict(result.status_counts), "error_kinds": dict(result.error_kinds)},
            failed_shards=sorted(result.failed_shards),
        )
        manifests.write(directory, manifest)
        return result

    # -- job-wide stage state ----------------------------------------------------------------------
    def _prepare(self, stages: list[Stage], manifest: dict[str, Any], directory: Directory) -> None:
        """Each stage's state: from the manifest (a resumed run), else computed now and persisted
        before any shard depends on it."""
        state = manifest.setdefault("stage_state", {})
        for i, (key, stage) in enumerate(zip(manifests.stage_keys(stages), stages)):
            if key not in state:
                got = stage.prepare(JobContext(self._sample_batches(stages[:i])))
                if got is None:
                    continue
                state[key] = got
                manifests.write(directory, manifest)
            stage.restore(state[key])

    def _sample_batches(self, stages_before: list[Stage]):
        """Batches of the first input rows run through ``stages_before``, written nowhere."""
        def sample(n_rows: int) -> Iterator[Batch]:
            for stage in stages_before:
                stage.setup()
            left = n_rows
            for shard in input_shards(self.spec):
                batch = {k: v[:left] for k, v in shard.fresh_batch().items()}
                for stage in stages_before:
                    batch = stage.process(batch)
                yield batch
                left -= len(batch[schema.KEY])
                if left <= 0:
                    break
        return sample


def run_job(spec: JobSpec, progress: Optional[bool] = None) -> JobResult:
    return Job(spec, progress).run()

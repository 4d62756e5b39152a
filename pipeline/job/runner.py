"""Run a job: plan input shards, skip the complete ones, run the stages, write the shards.

A shard with a complete record on disk is never redone; a killed job resumes where it stopped.
``manifest.json`` keeps the spec as run, versions, stage fingerprints and stage state (e.g. a
percentile threshold) so a resumed run behaves exactly like the interrupted one.
"""
from __future__ import annotations

import datetime
import json
import logging
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.executors.ray import CompletedShard, LocalExecutor, RayExecutor
from pipeline.job.progress import Progress
from pipeline.sources.reader import count_rows, plan_shards
from pipeline.job.spec import JobSpec
from pipeline.core.stage import Batch, JobContext, Stage
from pipeline.sinks.webdataset import atomic_write, is_complete, read_stats, remove_temporaries, write_index

log = logging.getLogger("mmcurate")
# Parts of the spec that change what is written: a resumed run must agree on them.
OUTPUT_DEFINING = ("input", "download", "video", "filters", "tokenize")


@dataclass
class JobResult:
    out_dir: Path
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


def build_stages(spec: JobSpec) -> list[Stage]:
    """download (image or video) -> filters -> tokenizers, as the spec declares them."""
    if spec.download.media == "video":
        from pipeline.download.video import VideoDownloadStage

        stages: list[Stage] = [VideoDownloadStage(spec)]
    else:
        from pipeline.download.image import ImageDownloadStage

        stages = [ImageDownloadStage(spec)]
    if spec.filters:
        from filters import build_filters

        stages += build_filters(spec.filters, spec)
    if spec.tokenize:
        from pipeline.tokenize import build_tokenizers

        stages += build_tokenizers(spec.tokenize, spec)
    return stages


def stage_keys(stages: list[Stage]) -> list[str]:
    """Unique names for stages (a repeated name gets #2, #3, ...)."""
    seen: Counter = Counter()
    keys = []
    for s in stages:
        seen[s.name] += 1
        keys.append(s.name if seen[s.name] == 1 else f"{s.name}#{seen[s.name]}")
    return keys


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("mmcurate", "pillow", "pyarrow", "aiohttp", "ray", "torch", "open_clip_torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Job:
    def __init__(self, spec: JobSpec, progress: Optional[bool] = None) -> None:
        self.spec = spec
        self.out_dir = Path(spec.output.dir)
        self.show_progress = spec.execution.progress if progress is None else progress
        self.manifest_path = self.out_dir / "manifest.json"

    # -- manifest --------------------------------------------------------------------------------
    def _load_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        manifest = json.loads(self.manifest_path.read_text())
        before, now = manifest.get("job", {}), self.spec.to_dict()
        changed = [k for k in OUTPUT_DEFINING if before.get(k) != now.get(k)]
        if before.get("output", {}).get("samples_per_shard") != now["output"]["samples_per_shard"]:
            changed.append("output.samples_per_shard")
        if changed:
            raise ConfigError(f"{self.out_dir} holds a job run with different {', '.join(changed)}; resuming "
                              f"would mix outputs. Use another output.dir, or delete this one to start over.")
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.manifest_path, json.dumps(manifest, indent=1, default=str).encode())

    # -- stage state -----------------------------------------------------------------------------
    def _sample_batches(self, stages_before: list[Stage]):
        def sample(n_rows: int) -> Iterator[Batch]:
            for stage in stages_before:
                stage.setup()
            left = n_rows
            for shard in plan_shards(self.spec):
                batch = {k: v[:left] for k, v in shard.batch.items()}
                for stage in stages_before:
                    batch = stage(batch)
                yield batch
                left -= len(batch[schema.KEY])
                if left <= 0:
                    break
        return sample

    def _prepare(self, stages: list[Stage], manifest: dict[str, Any]) -> None:
        state = manifest.setdefault("stage_state", {})
        for i, (key, stage) in enumerate(zip(stage_keys(stages), stages)):
            if key not in state:
                got = stage.prepare(JobContext(self.spec, self._sample_batches(stages[:i])))
                if got is None:
                    continue
                state[key] = got
                self._write_manifest(manifest)  # persisted before any shard depends on it
            stage.restore(state[key])

    # -- run -------------------------------------------------------------------------------------
    def run(self) -> JobResult:
        start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_temporaries(self.out_dir)
        if removed:
            log.info("removed %d partial files left by an interrupted run", removed)
        manifest = self._load_manifest()
        stages = build_stages(self.spec)
        manifest.update(name=self.spec.name, job=self.spec.to_dict(), versions=versions(), status="running",
                        started=manifest.get("started", _now()))
        manifest["fingerprints"] = {k: fp for k, s in zip(stage_keys(stages), stages)
                                    if (fp := s.fingerprint()) is not None}
        self._write_manifest(manifest)
        self._prepare(stages, manifest)

        result = JobResult(self.out_dir)
        replay = any(s.ordered for s in stages)  # ordered stages must also see complete shards

        def todo() -> Iterator:
            for shard in plan_shards(self.spec):
                result.shards_total += 1
                if is_complete(self.out_dir, shard.shard_id):
                    result.shards_skipped += 1
                    progress.skip(read_stats(self.out_dir, shard.shard_id))
                    if replay:
                        yield CompletedShard(shard.shard_id, self._status_table_loader(shard.shard_id))
                    continue
                yield shard

        total_rows = count_rows(self.spec)
        total_shards = None if total_rows is None else -(-total_rows // self.spec.output.samples_per_shard)
        progress = Progress(total_shards, enabled=self.show_progress)

        def on_done(shard_id: int, stats: Optional[dict], error: Optional[str]) -> None:
            if stats is None:
                result.failed_shards[shard_id] = error or "unknown error"
                log.error("shard %05d failed (it will be retried on the next run): %s", shard_id, error)
                progress.fail()
                return
            result.shards_written += 1
            progress.done(stats)

        executor = LocalExecutor(self.spec) if self.spec.execution.engine == "local" else RayExecutor(self.spec)
        try:
            executor.run(todo(), stages, self.out_dir, on_done)
        finally:
            progress.close()
        self._finish(manifest, result, start)
        return result

    def _status_table_loader(self, shard_id: int):
        return lambda: pq.read_table(self.out_dir / f"{shard_id:05d}.parquet").to_pydict()

    def _finish(self, manifest: dict[str, Any], result: JobResult, start: float) -> None:
        index = write_index(self.out_dir, self.spec.name)
        for entry in index["shardlist"]:
            stats = read_stats(self.out_dir, int(entry["url"][:5]))
            result.status_counts.update(stats["status_counts"])
            result.error_kinds.update(stats["error_kinds"])
        result.seconds = time.perf_counter() - start
        manifest.update(
            status="complete" if result.ok and result.shards_total == len(index["shardlist"]) else "incomplete",
            finished=_now(),
            totals={"shards": len(index["shardlist"]), "samples": result.samples,
                    "successes": result.status_counts.get(schema.SUCCESS, 0),
                    "status_counts": dict(result.status_counts), "error_kinds": dict(result.error_kinds)},
            failed_shards=sorted(result.failed_shards),
        )
        self._write_manifest(manifest)


def run_job(spec: JobSpec, progress: Optional[bool] = None) -> JobResult:
    return Job(spec, progress).run()

"""Run a job: build its parts, restore or prepare job-wide stage state, run the executor over the
input shards into the sink, and record the outcome in the manifest.

A shard the sink already holds is never redone, so a killed job resumes where it stopped and,
given the same spec, produces the same shards as an uninterrupted run. A run holds the output
directory (``sinks.lock``) so that a second one is refused, not interleaved; it refuses to resume
over input files that changed (``manifest.check_inputs``); and a job stopped by its environment
(a bad input file, a full disk) raises :class:`JobFailed` with one line saying why, after
recording it in the manifest (``status: failed``), so a rerun resumes once the cause is fixed.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.location import local_path
from pipeline.core.model_stage import ModelStage, free_cuda_memory
from pipeline.core.schema import Batch
from pipeline.core.stage import JobContext, Stage
from pipeline.executors.base import Executor, ShardOutcome
from pipeline.job import manifest as manifests
from pipeline.job.build import (build_executor, build_sink, build_stages, check_input_columns, input_columns,
                                input_files, input_rows, input_shards)
from pipeline.job.progress import Progress
from pipeline.job.spec import JobSpec
from pipeline.sinks import WebDatasetSink
from pipeline.sinks.lock import hold
from pipeline.sinks.storage import Directory
from pipeline.sources.shards import InputShard

log = logging.getLogger("mmcurate")

# What stops a job rather than one sample: a bad input file (the readers raise ValueError, a cut
# gzip EOFError), storage (OSError: a full disk, a lost mount). One line, and the job resumable.
STOPPING_ERRORS = (OSError, ValueError, EOFError)
BUCKET_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}  # URLs whose first part is a bucket


class JobFailed(Exception):
    """The job stopped; the message (one line) says why. The manifest records it as failed."""


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
    def __init__(self, spec: JobSpec, progress: Optional[bool] = None, verify: bool = False) -> None:
        self.spec = spec
        self.show_progress = spec.execution.progress if progress is None else progress
        self.verify = verify  # read complete shards back and check their checksums before skipping

    def run(self) -> JobResult:
        start = time.perf_counter()
        stages = build_stages(self.spec)
        executor = build_executor(self.spec)
        if any(s.may_use_gpus for s in stages):
            gpus = executor.gpus()  # on Ray: joins the cluster, whose GPUs decide devices set to auto
            for stage in stages:
                stage.place(gpus)
        self.check()
        sink = build_sink(self.spec, stages)
        sink.directory.create()
        with hold(sink.directory):  # before open(): it sweeps temporaries, which are the holder's
            return self._run(stages, executor, sink, start)

    def check(self) -> None:
        """Before anything is written: a corrected rerun then finds nothing in its way."""
        check_start(self.spec)

    def _run(self, stages: list[Stage], executor: Executor, sink: WebDatasetSink, start: float) -> JobResult:
        directory, job = sink.directory, manifests.recorded(self.spec.to_dict())
        inputs = manifests.input_fingerprints(input_files(self.spec), self.spec.input.storage_options)
        manifest = manifests.load(directory, job)  # refusals first: open() sweeps the directory
        inputs = manifests.check_inputs(directory, manifest, inputs)
        removed = sink.open()
        if removed:
            log.info("removed %d partial files left by an interrupted run", removed)
        for stale in ("error", "error_input"):
            manifest.pop(stale, None)
        manifest.update(name=self.spec.name, job=job, versions=manifests.versions(), inputs=inputs,
                        status="running", started=manifest.get("started", manifests.now()))
        manifest["fingerprints"] = {k: fp for k, s in zip(manifests.stage_keys(stages), stages)
                                    if (fp := s.fingerprint()) is not None}
        manifests.write(directory, manifest)

        result = JobResult(directory.url)
        phase = "reading the input"
        try:
            self._prepare(stages, manifest, directory)
            total_rows = input_rows(self.spec)
            total_shards = None if total_rows is None else -(-total_rows // self.spec.output.samples_per_shard)
            phase = "running the shards"
            self._execute(executor, stages, sink, result, total_shards)
            phase = f"writing the shard index ({directory.path('index.json')})"
            index = sink.finish()
            phase = "recording the totals"
            self._record(sink, index, result, manifest, start)
            manifests.write(directory, manifest)
        except JobFailed as e:
            raise self._failed(manifest, directory, inputs, str(e), e.__cause__) from e
        except STOPPING_ERRORS as e:
            raise self._failed(manifest, directory, inputs, f"{phase}: {type(e).__name__}: {e}", e) from e
        return result

    def _execute(self, executor: Executor, stages: list[Stage], sink: WebDatasetSink, result: JobResult,
                 total_shards: Optional[int]) -> None:
        progress = Progress(total_shards, enabled=self.show_progress)

        def counted(shards: Iterable[InputShard]) -> Iterator[InputShard]:
            try:
                for shard in shards:
                    result.shards_total += 1
                    yield shard
            except STOPPING_ERRORS as e:  # the input is read as the shards run
                raise JobFailed(f"reading the input: {type(e).__name__}: {e}") from e

        on_done = outcome_counter(result, progress, "it will be retried on the next run")
        try:
            executor.run(counted(input_shards(self.spec)), stages, sink, on_done, verify=self.verify)
        finally:
            progress.close()

    @staticmethod
    def _record(sink: WebDatasetSink, index: dict[str, Any], result: JobResult, manifest: dict[str, Any],
                start: float) -> None:
        manifest["totals"] = totals(sink, index, result)
        result.seconds = time.perf_counter() - start
        manifest.update(
            status="complete" if result.ok and result.shards_total == len(index["shardlist"]) else "incomplete",
            finished=manifests.now(), failed_shards=sorted(result.failed_shards),
        )

    @staticmethod
    def _failed(manifest: dict[str, Any], directory: Directory, inputs: dict[str, dict], message: str,
                cause: Optional[BaseException]) -> JobFailed:
        """Record that the job stopped (best effort: the disk may be what is full) and say why."""
        message = " ".join(message.split())  # one line, whatever the library's message looked like
        log.debug("the job stopped", exc_info=True)
        manifest.update(status="failed", error=message, finished=manifests.now())
        # The input file at fault: the readers' InputFileError names it (.path), else the message may.
        culprit = getattr(cause, "path", None)
        if culprit not in inputs:
            culprit = max((name for name in inputs if name in message), key=len, default=None)
        if culprit:
            manifest["error_input"] = culprit  # replacing this file is allowed on resume: it is the fix
        try:
            manifests.write(directory, manifest)
        except OSError as e:
            log.error("could not record the failure in %s: %s", directory.path(manifests.NAME), e)
        return JobFailed(f"{message} (fix the cause and rerun the same command to resume)")

    # -- job-wide stage state ----------------------------------------------------------------------
    def _prepare(self, stages: list[Stage], manifest: dict[str, Any], directory: Directory) -> None:
        """Each stage's state: from the manifest (a resumed run), else computed now and persisted
        before any shard depends on it."""
        state = manifest.setdefault("stage_state", {})
        for i, (key, stage) in enumerate(zip(manifests.stage_keys(stages), stages)):
            if key not in state:
                got = stage.prepare(JobContext(self._sample_batches(stages[:i]),
                                               lambda names: input_columns(self.spec, names)))
                if got is None:
                    continue
                state[key] = got
                manifests.write(directory, manifest)
            stage.restore(state[key])

    def _sample_batches(self, stages_before: list[Stage]):
        """Batches of the first input rows run through ``stages_before``, written nowhere."""
        def sample(n_rows: int) -> Iterator[Batch]:
            # Copies: the pass's models and running state are its own, on this machine's device,
            # and gone after it (the job's stages are set up where they run).
            copies = [stage.driver_copy() for stage in stages_before]
            try:
                for stage in copies:
                    stage.setup()
                left = n_rows
                for shard in input_shards(self.spec):
                    batch = {k: v[:left] for k, v in shard.fresh_batch().items()}
                    for stage in copies:
                        batch = stage.process(batch)
                    yield batch
                    left -= len(batch[schema.KEY])
                    if left <= 0:
                        break
            finally:
                models = any(isinstance(getattr(stage, "inner", stage), ModelStage) for stage in copies)  # a document stage wraps its model
                del copies
                if models:
                    free_cuda_memory()
        return sample


def outcome_counter(result: JobResult, progress: Progress, after_failure: str) -> Callable[[ShardOutcome], None]:
    """The executor's ``on_done``: each shard counted into ``result`` and the progress bar; a
    failed one logged with ``after_failure`` (what becomes of it)."""
    def on_done(outcome: ShardOutcome) -> None:
        if outcome.skipped:
            result.shards_skipped += 1
            progress.skip(outcome.stats)
        elif outcome.ok:
            result.shards_written += 1
            progress.done(outcome.stats)
        else:
            result.failed_shards[outcome.shard_id] = outcome.error or "unknown error"
            log.error("shard %05d failed (%s): %s", outcome.shard_id, after_failure, outcome.error)
            progress.fail()
    return on_done


def totals(sink: WebDatasetSink, index: dict[str, Any], result: JobResult) -> dict[str, Any]:
    """The manifest's totals over the shards of ``index``; counts them into ``result`` too."""
    for entry in index["shardlist"]:
        stats = sink.read_stats(int(entry["url"][:5]))
        result.status_counts.update(stats["status_counts"])
        result.error_kinds.update(stats["error_kinds"])
    return {"shards": len(index["shardlist"]), "samples": result.samples,
            "successes": result.status_counts.get(schema.SUCCESS, 0),
            "status_counts": dict(result.status_counts), "error_kinds": dict(result.error_kinds)}


# -- what a run needs before it writes anything ------------------------------------------------------
def check_start(spec: JobSpec, writable: bool = False) -> None:
    """Raise ConfigError (naming the key) when the catalog is unknown, a local input file is
    missing, a metadata filter's column is not in the input, or ``output.dir`` cannot be a
    directory; with ``writable`` (``--dry-run``) also when it cannot be written (a probe file in
    it, else the nearest existing parent must be writable; a URL's bucket must exist)."""
    if spec.input.catalog:
        from catalogs import CatalogError, load_card

        try:
            load_card(spec.input.catalog)
        except CatalogError as e:
            raise ConfigError(f"input.catalog: {e}") from None
    for name in input_files(spec):
        path = local_path(name)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"input.files: {name} does not exist")
    check_input_columns(spec)
    out = spec.output.dir
    path = local_path(out)
    if path is None:
        if writable:
            _check_bucket(out, spec.output.storage_options)
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        what = "is a file" if parent == path else f"is under {parent}, which is a file"
        raise ConfigError(f"output.dir: {out} {what}, not a directory")
    if not writable:
        return
    if parent == path:
        probe = os.path.join(path, f".mmcurate-probe-{os.getpid()}")
        try:
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"output.dir: {out} is not writable ({e.strerror})") from None
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir: {out} cannot be created: {parent} is not writable")


def _check_bucket(url: str, storage_options: dict[str, Any]) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options))
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & BUCKET_STORES:
        return
    bucket = path.strip("/").split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except Exception as e:  # credentials, network: say which, do not guess
        raise ConfigError(f"output.dir: cannot reach {url}: {type(e).__name__}: {e}") from None
    if not found:
        raise ConfigError(f"output.dir: {url}: the bucket {bucket!r} does not exist")


def run_job(spec: JobSpec, progress: Optional[bool] = None, verify: bool = False) -> JobResult:
    return Job(spec, progress, verify).run()

"""``mmcurate retry OUT``: fetch again the samples of a finished output whose download failed for
a reason that may pass (a timeout, a reset connection, DNS, a cut body, HTTP 429 or 5xx), and
rewrite only the shards that held them.

The job is rebuilt from the output's manifest (its spec, its stage state: thresholds are not
recomputed), so a retried sample goes through the same download settings, filters and tokenizers
as the first time. The rows to retry are read from the status tables; each affected shard is run
again with those rows only, then merged with its untouched rows (their tar members kept byte for
byte) and replaced through a journal (:mod:`pipeline.sinks.journal`): a kill leaves the old shard
or the new one. Every other shard's files stay as they were. Ordered stages (job-wide dedup) first
see every complete shard's kept rows, so a retried sample that duplicates one already written is
the one dropped. A retried row's ``attempts`` grows by one and ``last_attempt`` says when.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence

from pipeline.core import document, schema
from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch, ErrorKind
from pipeline.core.stage import Stage
from pipeline.executors.base import Executor, Replay, Work
from pipeline.job import manifest as manifests
from pipeline.job.progress import Progress
from pipeline.job.runner import Job, JobResult, outcome_counter, totals
from pipeline.job.spec import JobSpec, load_job
from pipeline.sinks import WebDatasetSink
from pipeline.sinks.sidecar import webdataset_key
from pipeline.sinks.storage import Directory
from pipeline.sinks.webdataset import shard_name
from pipeline.sources.shards import InputShard


# What a retry fetches again unless told otherwise: failures of the moment, not of the URL.
DEFAULT_KINDS = ("timeout", "connection", "dns", "truncated", "http_429", "http_5xx", "rate_limited")
DOWNLOAD_KINDS = tuple(k.value for k in ErrorKind if k.status == schema.FAILED_TO_DOWNLOAD)
HTTP_SELECTOR = re.compile(r"^http_(\d\d\d|\dxx)$")
HTTP_CODE = re.compile(r"^HTTP (\d{3})\b")  # how the fetcher words an HTTP status failure


# -- which rows ----------------------------------------------------------------------------------
def row_selector(kinds: Sequence[str]) -> Callable[[str, Optional[str], Optional[str]], bool]:
    """A test of (status, error_kind, error_message) for the rows to retry. A kind is a download
    error kind (``timeout``, ``http_status`` for every HTTP status, ...) or an HTTP status as
    ``http_404`` / ``http_5xx``. Anything else is a ConfigError naming it."""
    plain, http = set(), []
    for kind in kinds:
        if kind in DOWNLOAD_KINDS:
            plain.add(kind)
        elif HTTP_SELECTOR.match(kind):
            http.append(kind[5:].replace("x", "."))
        else:
            raise ConfigError(f"--kinds: {kind!r} is not a download failure kind; use one of "
                              f"{', '.join(DOWNLOAD_KINDS)}, or an HTTP status as http_503 or http_5xx")
    statuses = re.compile(f"^({'|'.join(http)})$") if http else None

    def selected(status: str, kind: Optional[str], message: Optional[str]) -> bool:
        if status != schema.FAILED_TO_DOWNLOAD:
            return False
        if kind in plain:
            return True
        code = HTTP_CODE.match(message or "") if kind == ErrorKind.HTTP_STATUS and statuses else None
        return bool(code and statuses.match(code.group(1)))

    return selected


def document_fields(stages: list[Stage]) -> set[str]:
    """What a document job's stages set on its image segments: the download's outcome and member,
    and each per-image stage's columns (its scores)."""
    fields = {*document.STATUS_FIELDS, *document.IMAGE_FIELDS, document.MEMBER}
    for stage in stages:
        inner = getattr(stage, "inner", None)  # a SegmentStage
        fields |= set(inner.columns) if inner is not None else set()
    return fields


def retry_batch(written: Batch, rows: list[int], now: str, stage_fields: Optional[set[str]] = None) -> Batch:
    """The ``rows`` of a status table, as input again: pending, no error, no files; a document
    as its reader gave it (``stage_fields``, what the stages set on its images, removed): it is
    fetched again whole."""
    batch = {c: [values[i] for i in rows] for c, values in written.items()}
    n = len(rows)
    if schema.DOCUMENT in batch:
        batch[schema.DOCUMENT] = [document.unfetched(d, stage_fields or set()) for d in batch[schema.DOCUMENT]]
    batch.update({schema.STATUS: [schema.PENDING] * n, schema.ERROR_KIND: [None] * n,
                  schema.ERROR_MESSAGE: [None] * n, schema.LAST_ATTEMPT: [now] * n,
                  schema.FILES: [{} for _ in range(n)]})
    return batch


def kept_rows(sink: WebDatasetSink, shard_id: int, retried: set[int]) -> Batch:
    """A shard's status table without the rows being retried (what an ordered stage replays)."""
    written = sink.read_status(shard_id)
    keep = [i for i in range(len(written[schema.KEY])) if i not in retried]
    return {c: [values[i] for i in keep] for c, values in written.items()}


# -- the merged shard ------------------------------------------------------------------------------
class RetrySink(WebDatasetSink):
    """Writes a retried shard: the new rows merged into the complete shard, replacing it."""

    def write(self, shard_id: int, batch: Batch, stats: dict[str, Any]) -> dict[str, Any]:
        merged, members = self.merge(shard_id, batch)
        stats = schema.shard_stats(merged, shard_id, stats["timings"])
        files, stats = self.shard_files(shard_id, merged, stats, members)
        self.replace(shard_id, files)
        return stats

    def merge(self, shard_id: int, new: Batch) -> tuple[Batch, list[tuple[str, bytes]]]:
        """The shard's status table with ``new``'s rows in their places, and its tar members: the
        untouched successes' members as written, the new successes' made now, in row order."""
        merged = self.read_status(shard_id)
        n = len(merged[schema.KEY])
        old_members = self.members_by_key(shard_id)
        place = {key: i for i, key in enumerate(merged[schema.KEY])}
        for column in new:
            if column not in merged and column != schema.FILES and column not in schema.TRANSIENT_COLUMNS:
                merged[column] = [None] * n
        for j, key in enumerate(new[schema.KEY]):
            for column in merged:
                merged[column][place[key]] = new[column][j] if column in new else None
        new_members: dict[str, list] = defaultdict(list)
        for name, data in self.members(new):
            new_members[webdataset_key(name)].append((name, data))
        retried, members = set(new[schema.KEY]), []
        for key, status in zip(merged[schema.KEY], merged[schema.STATUS]):
            if key in retried:
                members.extend(new_members.get(key, []))
            elif status == schema.SUCCESS:
                members.extend(old_members[key])
        return merged, members

    def members_by_key(self, shard_id: int) -> dict[str, list[tuple[str, bytes]]]:
        out: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        data = self.directory.read_bytes(f"{shard_name(shard_id)}.tar")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    out[webdataset_key(member.name)].append((member.name, tar.extractfile(member).read()))
        return out


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class RetryResult(JobResult):
    rows_retried: int = 0
    recovered: int = 0  # retried rows that now succeed


def load_retry_spec(out_dir: str, engine: Optional[str] = None) -> tuple[JobSpec, dict[str, Any]]:
    """The job that wrote ``out_dir`` (from its manifest) and the manifest."""
    directory = Directory(out_dir)
    if not directory.exists(manifests.NAME):
        raise ConfigError(f"{out_dir}: no {manifests.NAME} here; retry works on the output of `mmcurate run`")
    manifest = json.loads(directory.read_bytes(manifests.NAME))
    data = json.loads(json.dumps(manifest["job"]))
    data["output"]["dir"] = out_dir  # the output may have moved since
    if engine:
        data["execution"]["engine"] = engine
    spec = load_job(data=data)
    if spec.input.shards:
        raise ConfigError(f"{out_dir}: this job read existing shards (input.shards) and downloaded nothing; "
                          "there is nothing to fetch again")
    return spec, manifest


class Retry(Job):
    def __init__(self, spec: JobSpec, manifest: dict[str, Any], kinds: Sequence[str] = DEFAULT_KINDS,
                 progress: Optional[bool] = None) -> None:
        super().__init__(spec, progress)
        self.manifest = manifest
        self.kinds = list(kinds)
        self.selected = row_selector(self.kinds)

    def check(self) -> None:
        """Nothing of the input is read (the rows come from the status tables)."""

    def _run(self, stages: list[Stage], executor: Executor, sink: WebDatasetSink, start: float) -> RetryResult:
        sink = RetrySink(sink.directory, sink.column_types, sink.name)
        directory, manifest = sink.directory, self.manifest
        self._check_fingerprints(stages)
        sink.open()  # finishes what a killed retry began
        self._prepare(stages, manifest, directory)
        now = manifests.now()
        complete = sorted(sink.complete_shards())
        todo = self._rows_to_retry(sink, complete)
        result = RetryResult(directory.url, shards_total=len(todo), rows_retried=sum(map(len, todo.values())))
        progress = Progress(len(todo), enabled=self.show_progress and bool(todo))

        on_done = outcome_counter(result, progress, "the retry changed nothing in it")

        def work() -> Iterator[Work]:
            if any(s.ordered for s in stages):  # every kept row first: a retried duplicate is the one dropped
                for shard_id in complete:
                    yield Replay(shard_id, partial(kept_rows, sink, shard_id, set(todo.get(shard_id, ()))))
            fields = document_fields(stages)
            for shard_id, rows in todo.items():
                yield InputShard(shard_id, retry_batch(sink.read_status(shard_id), rows, now, fields))

        successes_before = self._successes(sink, todo)
        try:
            if todo:
                executor.schedule(work(), stages, sink, on_done)
        finally:
            progress.close()
        result.recovered = self._successes(sink, todo) - successes_before
        index = sink.finish()
        manifest["totals"] = totals(sink, index, result)
        manifest.setdefault("retries", []).append({
            "at": now, "kinds": self.kinds, "rows": result.rows_retried, "recovered": result.recovered,
            "shards": sorted(set(todo) - set(result.failed_shards)), "failed_shards": sorted(result.failed_shards)})
        manifests.write(directory, manifest)
        result.seconds = time.perf_counter() - start
        return result

    def _check_fingerprints(self, stages: list[Stage]) -> None:
        """A retried sample must come out of the same models as its shard's other samples."""
        before = self.manifest.get("fingerprints", {})
        for key, stage in zip(manifests.stage_keys(stages), stages):
            now = stage.fingerprint()
            if key in before and now is not None and now != before[key]:
                raise ConfigError(f"{key}: its model or settings changed since the job ran ({before[key]} -> {now}); "
                                  "retried samples would not match the others. Restore them, or rerun the job "
                                  "into a new output.dir")

    def _rows_to_retry(self, sink: WebDatasetSink, complete: list[int]) -> dict[int, list[int]]:
        """shard id -> the rows to fetch again, for the complete shards that have any."""
        todo = {}
        for shard_id in complete:
            stats = sink.read_stats(shard_id)
            documents = self.spec.download.media == "document"  # a kept document may hold failed images
            if not documents and not stats.get("status_counts", {}).get(schema.FAILED_TO_DOWNLOAD):
                continue  # nothing failed to download here: its status table is not even read
            written = sink.read_status(shard_id)
            rows = [i for i, row in enumerate(zip(written[schema.STATUS], written[schema.ERROR_KIND],
                                                   written[schema.ERROR_MESSAGE]))
                    if self.selected(*row) or documents and self._image_selected(written[schema.DOCUMENT][i])]
            if rows:
                todo[shard_id] = rows
        return todo

    def _image_selected(self, value: Any) -> bool:
        """Whether one of a document's images failed with a kind being retried."""
        return any(self.selected(*(seg.get(f) for f in document.STATUS_FIELDS))
                   for seg in document.image_slots(document.as_document(value)))

    @staticmethod
    def _successes(sink: WebDatasetSink, todo: dict[int, list[int]]) -> int:
        return sum(sink.read_stats(shard_id)["successes"] for shard_id in todo)


def retry(out_dir: str, kinds: Sequence[str] = DEFAULT_KINDS, engine: Optional[str] = None,
          progress: Optional[bool] = None) -> RetryResult:
    spec, manifest = load_retry_spec(out_dir, engine)
    return Retry(spec, manifest, kinds, progress).run()

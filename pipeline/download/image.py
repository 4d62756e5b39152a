"""The image download stage: fetch every pending row (async, many in flight) and hash and resize
it off the event loop: on one thread per CPU the stage was given, or, on the local engine with
more than one CPU, in one worker process per CPU (:class:`pipeline.core.stage.ThreadPoolStage`
decides). Either way the same function makes the same bytes, recorded in row order."""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Optional

from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.core.stage import ThreadPoolStage, WorkerCrashed
from pipeline.fetch import FetchConfig, Fetcher
from pipeline.media.resize import ResizeConfig, hash_and_resize


@dataclass(frozen=True)
class ImageDownloadConfig:
    fetch: FetchConfig
    resize: ResizeConfig
    cpus: int = 1  # threads (or worker processes) decoding and resizing
    # img2dataset's verify_hash: the hash ("sha256" | "md5") of the bytes as fetched (before resize)
    # must equal, case-insensitively, the row's value in column ``hash_col``; a mismatch is
    # hash_mismatch. A row without a value there is fetched without the check.
    verify_hash: Optional[str] = None
    hash_col: Optional[str] = None


class ImageDownloadStage(ThreadPoolStage):
    name = "download"
    processes_safe = True  # hash_and_resize is a pure function of the body and the resize config

    def __init__(self, config: ImageDownloadConfig) -> None:
        super().__init__(config, config.cpus)

    @property
    def columns(self) -> dict[str, str]:
        return schema.DOWNLOAD_COLUMNS

    def process(self, batch: Batch) -> Batch:
        self.setup()
        rows = schema.alive(batch)
        schema.count_attempt(batch, rows)
        if rows:
            asyncio.run(self._download(batch, rows))
        return batch

    async def _download(self, batch: Batch, rows: list[int]) -> None:
        # One slot per sample from request to resized bytes, given up while the sample waits to
        # retry (a host answering 429 does not hold up the others); the body keeps its share of
        # the fetcher's byte budget until it is resized.
        slots = asyncio.Semaphore(self.config.fetch.concurrency)
        async with Fetcher(self.config.fetch) as fetcher:

            async def one(i: int) -> None:
                async with slots:
                    got = await fetcher.get(batch[schema.URL][i], slot=slots, hold_body=True)
                    try:
                        if not got.ok:
                            schema.mark(batch, i, got.error_kind, got.error_message or "")
                            return
                        problem = self._hash_problem(batch, i, got.body)
                        if problem:
                            schema.mark(batch, i, schema.ErrorKind.HASH_MISMATCH, problem)
                            return
                        digest, out = await self.run_cpu(hash_and_resize, got.body, self.config.resize)
                    except WorkerCrashed as e:
                        schema.mark(batch, i, schema.ErrorKind.DECODE_ERROR, str(e))
                        return
                    finally:
                        got.release()
                    self._record(batch, i, digest, out)

            await asyncio.gather(*(one(i) for i in rows))

    def _hash_problem(self, batch: Batch, i: int, body: bytes) -> Optional[str]:
        """Why the fetched bytes fail verify_hash, or None (no check asked, or no hash given)."""
        algo, col = self.config.verify_hash, self.config.hash_col
        expected = batch.get(col, [None] * schema.batch_len(batch))[i] if algo and col else None
        if not expected:
            return None
        got = hashlib.new(algo, body).hexdigest()
        if got == str(expected).strip().lower():
            return None
        return f"{algo} of the bytes is {got}, {col} says {expected}"

    def _record(self, batch: Batch, i: int, digest: str, out) -> None:
        batch[schema.SHA256][i] = digest
        batch[schema.ORIGINAL_WIDTH][i] = out.original_width
        batch[schema.ORIGINAL_HEIGHT][i] = out.original_height
        if not out.ok:
            schema.mark(batch, i, out.error_kind, out.error_message or "")
            return
        batch[schema.WIDTH][i] = out.width
        batch[schema.HEIGHT][i] = out.height
        batch[schema.STATUS][i] = schema.SUCCESS
        batch[schema.FILES][i][self.config.resize.encode_format] = out.data


"""The image download stage: fetch every pending row (async, many in flight) and hash and resize
it off the event loop: on one thread per CPU the stage was given, or, on the local engine with
more than one CPU, in one worker process per CPU (:class:`pipeline.core.stage.ThreadPoolStage`
decides). Either way the same function makes the same bytes, recorded in row order.

:meth:`ImageDownloadStage.fetch_image` is one image from request to resized bytes (slot, fetch,
verify_hash, resize); the document stage (:mod:`pipeline.download.document`) fetches each image of
a document through it, so both follow the same rules."""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any, Optional

from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.core.stage import ThreadPoolStage, WorkerCrashed
from pipeline.fetch import FetchConfig, Fetcher
from pipeline.media.resize import ResizeConfig, ResizeResult, hash_and_resize


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


@dataclass
class ImageOutcome:
    """One image's result: a failure (``error_kind``) or the resized image; ``sha256`` and the
    original size are known whenever the bytes arrived, even if the resize then failed."""

    error_kind: Optional[str] = None
    error_message: str = ""
    sha256: Optional[str] = None
    resized: Optional[ResizeResult] = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    def sizes(self) -> dict[str, Any]:
        """The size columns (width/height only for a success), by schema name."""
        r = self.resized
        out = {schema.SHA256: self.sha256,
               schema.ORIGINAL_WIDTH: r.original_width if r else None,
               schema.ORIGINAL_HEIGHT: r.original_height if r else None}
        if self.ok:
            out.update({schema.WIDTH: r.width, schema.HEIGHT: r.height})
        return out


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
        slots = asyncio.Semaphore(self.config.fetch.concurrency)
        col = self.config.hash_col
        hashes = batch.get(col, [None] * schema.batch_len(batch)) if col else None
        async with Fetcher(self.config.fetch) as fetcher:

            async def one(i: int) -> None:
                got = await self.fetch_image(fetcher, slots, batch[schema.URL][i], hashes[i] if hashes else None)
                self._record(batch, i, got)

            await asyncio.gather(*(one(i) for i in rows))

    async def fetch_image(self, fetcher: Fetcher, slots: asyncio.Semaphore, url: str,
                          expected_hash: Any = None) -> ImageOutcome:
        """One image from request to resized bytes. One slot of ``slots`` is held from request to
        resized bytes, given up while the image waits to retry (a host answering 429 does not hold
        up the others); the body keeps its share of the fetcher's byte budget until it is resized.
        ``expected_hash``: the published hash verify_hash checks (None: unchecked)."""
        async with slots:
            got = await fetcher.get(url, slot=slots, hold_body=True)
            try:
                if not got.ok:
                    return ImageOutcome(got.error_kind, got.error_message or "")
                problem = self._hash_problem(expected_hash, got.body)
                if problem:
                    return ImageOutcome(schema.ErrorKind.HASH_MISMATCH, problem)
                digest, out = await self.run_cpu(hash_and_resize, got.body, self.config.resize)
            except WorkerCrashed as e:
                return ImageOutcome(schema.ErrorKind.DECODE_ERROR, str(e))
            finally:
                got.release()
        if not out.ok:
            return ImageOutcome(out.error_kind, out.error_message or "", digest, out)
        return ImageOutcome(sha256=digest, resized=out)

    def _hash_problem(self, expected: Any, body: bytes) -> Optional[str]:
        """Why the fetched bytes fail verify_hash, or None (no check asked, or no hash given)."""
        algo, col = self.config.verify_hash, self.config.hash_col
        if not algo or not expected:
            return None
        got = hashlib.new(algo, body).hexdigest()
        if got == str(expected).strip().lower():
            return None
        return f"{algo} of the bytes is {got}, {col} says {expected}"

    def _record(self, batch: Batch, i: int, got: ImageOutcome) -> None:
        for column, value in got.sizes().items():
            batch[column][i] = value
        if not got.ok:
            schema.mark(batch, i, got.error_kind, got.error_message)
            return
        batch[schema.STATUS][i] = schema.SUCCESS
        batch[schema.FILES][i][self.config.resize.encode_format] = got.resized.data

"""The document download stage: every image of every document of the shard, fetched and resized
as the image stage does it (:meth:`pipeline.download.image.ImageDownloadStage.fetch_image`: the
same client, address and opt-out rules, per-host limits, retries, verify_hash, resize), with one
concurrency budget across all the shard's images, then the document rule.

Per image segment (slot ``j``, :mod:`pipeline.core.document`) the stage records ``status``
(success, failed_to_download, failed_to_resize), ``error_kind``, ``error_message``, ``width``,
``height``, ``original_width``, ``original_height``, ``sha256`` and, for a success, ``member``:
the row's file ``image_NNN.<encode_format>``. A segment the reader marked ``invalid_input`` is not
fetched and stays as it is. verify_hash reads each image's published hash from the segment's
field named ``input.hash_col``.

Then, per document, :func:`pipeline.core.document.enforce` with the job's ``DocumentRule``
(``documents.min_images``, ``documents.all_images``): a document left with too few images fails
``too_few_images``; its failed images stay in it as slots with their status. A document with more
image slots than ``documents.max_images`` is not fetched at all: it fails ``malformed_row`` (a
document is kept whole or not at all; cutting it would separate its text from its images).

Columns: ``images_total`` (image slots) and ``images_kept`` (the images the document keeps in
the output, 0 when it is dropped; the job's last stage, :class:`DocumentCountStage`, counts them
again after the filters), ``attempts``
and ``last_attempt`` as the image stage, and ``document``, which the status table stores as JSON text.
"""
from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.core import document as doc
from pipeline.core import schema
from pipeline.core.schema import Batch, ErrorKind
from pipeline.core.stage import Stage
from pipeline.download.image import ImageDownloadConfig, ImageDownloadStage, ImageOutcome
from pipeline.fetch import Fetcher

IMAGES_TOTAL = "images_total"
IMAGES_KEPT = "images_kept"
COUNT_COLUMNS = {IMAGES_TOTAL: "int32", IMAGES_KEPT: "int32"}
# What the stage sets on every image segment it fetched (width/height stay None for a failure).
SEGMENT_FIELDS = (*doc.STATUS_FIELDS, *doc.IMAGE_FIELDS)


@dataclass(frozen=True)
class DocumentDownloadConfig:
    image: ImageDownloadConfig
    rule: doc.DocumentRule = field(default_factory=doc.DocumentRule)
    max_images: Optional[int] = None  # image slots a document may have; null: any number


class DocumentDownloadStage(ImageDownloadStage):
    name = "download"
    processes_safe = True

    def __init__(self, config: DocumentDownloadConfig) -> None:
        super().__init__(config.image)
        self.documents = config

    @property
    def columns(self) -> dict[str, str]:
        return {**schema.DOWNLOAD_COLUMNS, **COUNT_COLUMNS, schema.DOCUMENT: "string"}

    def process(self, batch: Batch) -> Batch:
        self.setup()
        rows = schema.alive(batch)
        schema.count_attempt(batch, rows)
        batch.setdefault(schema.DOCUMENT, [None] * schema.batch_len(batch))
        work: list[tuple[int, int, dict]] = []
        for i in rows:
            work.extend(self._images_to_fetch(batch, i))
        if work:
            asyncio.run(self._download_images(batch, work))
        for i in rows:
            if batch[schema.STATUS][i] in (schema.SUCCESS, schema.PENDING):
                doc.enforce(batch, i, self.documents.rule)
        count_images(batch)
        return batch

    def _images_to_fetch(self, batch: Batch, i: int) -> list[tuple[int, int, dict]]:
        """Row ``i``'s image segments to fetch as ``(row, slot, segment)``; a row that is not a
        document, or has too many images, fails here."""
        document, problem = own_document(batch[schema.DOCUMENT][i])
        if problem is None:
            slots = doc.image_slots(document)
            limit = self.documents.max_images
            if limit is not None and len(slots) > limit:
                problem = f"{len(slots)} image slots, more than documents.max_images={limit}"
        if problem is not None:
            schema.mark(batch, i, ErrorKind.MALFORMED_ROW, problem)
            return []
        batch[schema.DOCUMENT][i] = document  # our own copy: a retried shard starts from the rows as read
        work = []
        for j, seg in enumerate(slots):
            if seg.get(schema.STATUS) == schema.INVALID_INPUT:
                continue  # the reader's verdict on its URL
            seg.update({f: None for f in SEGMENT_FIELDS})
            seg.pop(doc.MEMBER, None)
            url = seg.get("url")
            if not isinstance(url, str) or not url.strip():
                kind = ErrorKind.MISSING_URL
                doc.fail_image(batch, i, j, kind.status, kind.value, f"image {j} has no URL")
                continue
            seg[schema.STATUS] = schema.PENDING
            work.append((i, j, seg))
        return work

    async def _download_images(self, batch: Batch, work: list[tuple[int, int, dict]]) -> None:
        slots = asyncio.Semaphore(self.config.fetch.concurrency)  # one budget over the shard's images
        col = self.config.hash_col
        async with Fetcher(self.config.fetch) as fetcher:

            async def one(i: int, j: int, seg: dict) -> None:
                got = await self.fetch_image(fetcher, slots, seg["url"], seg.get(col) if col else None)
                self._record_image(batch, i, j, seg, got)

            await asyncio.gather(*(one(*w) for w in work))

    def _record_image(self, batch: Batch, i: int, j: int, seg: dict, got: ImageOutcome) -> None:
        seg.update(got.sizes())
        if not got.ok:
            kind = schema.error_kind(got.error_kind)
            doc.fail_image(batch, i, j, kind.status, kind.value, got.error_message or kind.meaning)
            return
        member = doc.image_member(j, self.config.resize.encode_format)
        seg.update({schema.STATUS: schema.SUCCESS, doc.MEMBER: member})
        batch[schema.FILES][i][member] = got.resized.data


class DocumentCountStage(Stage):
    """The job's last stage on documents: ``images_kept`` counted again after the filters (a
    filter may have dropped images of a document it kept)."""

    name = "document_counts"

    @property
    def columns(self) -> dict[str, str]:
        return {**COUNT_COLUMNS, schema.DOCUMENT: "string"}  # also where no download ran (input.shards)

    def process(self, batch: Batch) -> Batch:
        count_images(batch)
        return batch


def count_images(batch: Batch) -> None:
    """``images_total`` and ``images_kept`` of every row that holds a document (else null): its
    image slots, and the images it keeps in the output (none when the document was dropped)."""
    docs = batch.get(schema.DOCUMENT, [None] * schema.batch_len(batch))
    totals, kept = [], []
    for value, status in zip(docs, batch[schema.STATUS]):
        ok = isinstance(value, dict)
        totals.append(len(doc.image_slots(value)) if ok else None)
        alive = status in (schema.SUCCESS, schema.PENDING)
        kept.append((len(doc.live_images(value)) if alive else 0) if ok else None)
    batch[IMAGES_TOTAL], batch[IMAGES_KEPT] = totals, kept


def own_document(value: Any) -> tuple[Optional[dict], Optional[str]]:
    """A deep copy of a row's document (a dict, or its JSON text as a status table holds it), or
    why it is not one."""
    if value is None:
        return None, ("the row has no document (column 'document'): download.media 'document' reads document "
                      "rows (a catalog card with a document reader, or files with a document column)")
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as e:
            return None, f"column 'document' is not JSON: {e}"[:200]
    if not isinstance(value, dict) or not isinstance(value.get("segments"), list):
        return None, f"column 'document' is not a document with a segments list: {str(value)[:100]}"
    if not all(isinstance(s, dict) for s in value["segments"]):
        return None, "column 'document': every segment must be an object with a type"
    return copy.deepcopy(value), None

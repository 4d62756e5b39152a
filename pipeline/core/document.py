"""Interleaved documents (OBELICS, MMC4, MINT-1T, OmniCorpus) as samples: one row per document.

A document row carries its content in the column ``document`` (:data:`schema.DOCUMENT`), a dict
whose ``segments`` are in reading order::

    {"segments": [{"type": "text", "text": "..."},
                  {"type": "image", "url": "https://...", "alt": "...", "text_index": 2, ...}, ...]}

Readers (``catalogs``) build it; any other top-level key is the source's metadata, kept as it is.
Read back from a status table it may be JSON text (:func:`as_document` takes either).
An image segment may carry ``text_index``: the index, in ``segments``, of the text it belongs to
(MMC4's matched sentence); without it its nearest text is the closest text segment, the next one
on a tie (:func:`nearest_text`). Image segments are numbered in order (their *slot*); the download
stage adds to each ``status``, ``error_kind``, ``error_message``, ``width``, ``height``,
``original_width``, ``original_height``, ``sha256`` and, for a success, ``member``: the tar member
of its image, ``image_NNN.<ext>`` (:func:`image_member`), so keys keep webdataset's no-dot rule.
Text segments are numbered too; a stage's outputs per text go in members ``text_NNN.<ext>``.

**Views.** Stages written for one image (or one caption) per row run unchanged on documents
through :class:`SegmentStage` (:func:`for_documents` wraps a stage by its ``document_view``): it
builds a *view* batch (one row per live image, key ``KEY_iNNN``, its caption the image's nearest
text; one row per text segment, key ``KEY_tNNN``; or one row per live document with its whole text
as caption), runs the stage on it and merges the result back:

* a view row the stage failed or rejected fails its image (kept in the document with that status,
  its members dropped); a failed text or document row fails the document;
* the view row's files become the slot's members (``clip.npy`` of image 2: ``image_002.clip.npy``);
* new columns become fields of the segment (``segment["clip_score"]``, so they reach KEY.json),
  rejected images' too (why it was dropped); the download fields a stage fills (``sha256``) too;
  ``binary`` columns (job state, e.g. semantic_dedup's embeddings) stay out of KEY.json: they are
  one document-row column of that name, the slots' values framed (:func:`pack_slots`);
* transient columns (the shared CLIP embedding) are kept per slot for the next stage; a stage
  that sets one replaces the document's values for the slots it saw;
* per document, the stage's columns are the document row's columns.

``prepare(context)`` sees views of the sample batches (its ``sample_size`` counts documents);
``resume(written)`` sees the written shard's images (or texts) as rows, every image of every
document whatever its status, with its segment's fields and binary columns as columns, so an
ordered stage (dedup) rebuilds exactly the state it had.

**The document rule** (:class:`DocumentRule`): a document keeps its failed images as slots with a
status, and is itself dropped when fewer than ``min_images`` images are left, or, with
``all_images``, when any image failed. The stage whose work dropped it is named: a filter's
rejection makes the document ``filtered`` by that filter (when a stage both rejects and fails
images of one document, the rejection names it), a download failure ``too_few_images``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.core.stage import JobContext, Stage

TEXT, IMAGE = "text", "image"
Over = Literal["image", "text", "document"]
# Fields the download stage sets on an image segment, taken into and out of an image view.
IMAGE_FIELDS = (schema.WIDTH, schema.HEIGHT, schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT, schema.SHA256)
STATUS_FIELDS = (schema.STATUS, schema.ERROR_KIND, schema.ERROR_MESSAGE)
MEMBER = "member"  # a kept image's tar member extension, image_NNN.<ext>
# Transient columns kept per image slot (``{slot: value}`` in the document row); the others (the
# input shard's member list) belong to the document row itself.
PER_SLOT = frozenset({schema.CLIP_IMAGE_EMBEDDING})


@dataclass(frozen=True)
class DocumentRule:
    """When a document is dropped for its images (see the module docstring)."""

    min_images: int = 1
    all_images: bool = False


# -- reading a document --------------------------------------------------------------------------

def as_document(value: Any) -> dict:
    """A ``document`` column value: the dict, or its JSON text (a status table read back)."""
    if isinstance(value, (str, bytes)):
        value = json.loads(value)
    return value if isinstance(value, dict) else {}


def segments(document: dict) -> list[dict]:
    return document.get("segments") or []


def image_slots(document: dict) -> list[dict]:
    """The image segments in order; slot ``j`` is ``image_slots(doc)[j]``."""
    return [s for s in segments(document) if s.get("type") == IMAGE]


def text_slots(document: dict) -> list[dict]:
    return [s for s in segments(document) if s.get("type") == TEXT]


def image_member(slot: int, ext: str) -> str:
    """``image_007.jpg``: the member extension of slot 7's ``ext`` output."""
    return f"image_{slot:03d}.{ext}"


def text_member(slot: int, ext: str) -> str:
    return f"text_{slot:03d}.{ext}"


def view_key(key: str, over: Over, slot: int) -> str:
    """The key of a slot's view row: ``KEY_i002`` (image 2), ``KEY_t000`` (text 0); no dots."""
    return f"{key}_{'i' if over == IMAGE else 't'}{slot:03d}"


def full_text(document: dict, separator: str = "\n\n") -> str:
    """The document's text segments joined, in order (what per-document text filters read)."""
    return separator.join(s.get("text") or "" for s in text_slots(document) if s.get("text"))


def nearest_text(document: dict, image: dict) -> Optional[str]:
    """The text an image goes with: its ``text_index`` segment, else the closest text segment in
    reading order (the following one on a tie); None when the document has no text."""
    segs = segments(document)
    if isinstance(image.get("text_index"), int) and 0 <= image["text_index"] < len(segs):
        target = segs[image["text_index"]]
        if target.get("type") == TEXT:
            return target.get("text")
    at = next((n for n, s in enumerate(segs) if s is image), None)
    if at is None:
        raise ValueError("nearest_text: the image is not a segment of this document")
    best = None
    for n, s in enumerate(segs):
        if s.get("type") == TEXT and s.get("text"):
            d = (abs(n - at), 0 if n > at else 1)
            if best is None or d < best[0]:
                best = (d, s.get("text"))
    return best[1] if best else None


def live_images(document: dict) -> list[int]:
    """Slots of the images that are still in the running (downloaded, not failed nor filtered)."""
    return [j for j, s in enumerate(image_slots(document)) if s.get(schema.STATUS) in (schema.SUCCESS, schema.PENDING)]


def pack_slots(values: dict[int, bytes]) -> bytes:
    """Per-slot bytes as one value: for each slot, in order, ``<slot u32><length u32><bytes>``."""
    return b"".join(struct.pack("<II", slot, len(values[slot])) + values[slot] for slot in sorted(values))


def unpack_slots(data: Optional[bytes]) -> dict[int, bytes]:
    out, at = {}, 0
    while data and at < len(data):
        slot, size = struct.unpack_from("<II", data, at)
        out[slot] = bytes(data[at + 8:at + 8 + size])
        at += 8 + size
    return out


# -- changing a document -------------------------------------------------------------------------

def fail_image(batch: Batch, i: int, slot: int, status: str, kind: str, message: str) -> None:
    """Image ``slot`` of row ``i`` failed (or was filtered): recorded in its segment, members dropped."""
    seg = image_slots(batch[schema.DOCUMENT][i])[slot]
    seg.update({schema.STATUS: status, schema.ERROR_KIND: kind, schema.ERROR_MESSAGE: (message or kind)[:500]})
    seg.pop(MEMBER, None)
    _drop_members(batch[schema.FILES][i], image_member(slot, ""))


def _drop_members(files: dict[str, bytes], prefix: str) -> None:
    for ext in [e for e in files if e.startswith(prefix)]:
        del files[ext]


def enforce(batch: Batch, i: int, rule: DocumentRule, cause: Optional[tuple[str, str]] = None) -> bool:
    """Apply ``rule`` to row ``i``; True when the document is still in the running. ``cause`` is
    ``(status, kind)`` of the stage that just worked on it: a filter's ``(FILTERED, name)``; else
    the document fails with ``too_few_images``."""
    if batch[schema.STATUS][i] not in (schema.SUCCESS, schema.PENDING):
        return False
    slots = image_slots(batch[schema.DOCUMENT][i])
    live = len(live_images(batch[schema.DOCUMENT][i]))
    failed = len(slots) - live
    if live >= rule.min_images and not (rule.all_images and failed):
        return True
    why = (f"{failed} of its {len(slots)} images failed" if rule.all_images and failed
           else f"{live} of its {len(slots)} images left, fewer than min_images={rule.min_images}")
    if cause and cause[0] == schema.FILTERED:
        schema.reject(batch, i, cause[1], why)
    else:
        schema.mark(batch, i, schema.ErrorKind.TOO_FEW_IMAGES, why)
    return False


def unfetched(document: Any, fields: set[str]) -> dict:
    """A copy of ``document`` as its reader gave it: ``fields`` (what the download and the later
    stages set) removed from every image segment the reader did not itself mark invalid."""
    fresh = copy.deepcopy(as_document(document))
    for seg in image_slots(fresh):
        if seg.get(schema.STATUS) != schema.INVALID_INPUT:
            for name in fields:
                seg.pop(name, None)
    return fresh


def settle_segments(batch: Batch) -> None:
    """After the last stage: the images still pending in the documents that succeeded are successes."""
    for i, status in enumerate(batch[schema.STATUS]):
        if status == schema.SUCCESS and isinstance(batch[schema.DOCUMENT][i], dict):
            for seg in image_slots(batch[schema.DOCUMENT][i]):
                if seg.get(schema.STATUS) == schema.PENDING:
                    seg[schema.STATUS] = schema.SUCCESS


def _plain(value: Any) -> Any:
    """A JSON-able field value: numpy scalars and arrays become Python numbers and lists, NaN None."""
    value = value.tolist() if type(value).__module__ == "numpy" else value
    return None if isinstance(value, float) and value != value else value


# -- views -----------------------------------------------------------------------------------------

@dataclass
class View:
    """A batch of segments (or documents) and, per view row, where it came from: ``(row, slot)``."""

    over: Over
    batch: Batch
    origin: list[tuple[int, int]]
    columns: frozenset  # the view's columns before the stage ran


def view(batch: Batch, over: Over) -> View:
    """The live images, the text segments or the whole texts of the live documents, as a batch of
    plain rows (see the module docstring)."""
    if schema.DOCUMENT not in batch:
        raise ValueError(f"the {over} view of documents needs document rows: the batch has no "
                         f"{schema.DOCUMENT!r} column")
    rows, origin = [], []
    for i in schema.alive(batch):
        if not isinstance(batch[schema.DOCUMENT][i], dict):  # JSON text: made the dict merge changes
            batch[schema.DOCUMENT][i] = as_document(batch[schema.DOCUMENT][i])
        doc = batch[schema.DOCUMENT][i]
        for slot, row in _view_rows(batch, i, doc, over):
            rows.append(row)
            origin.append((i, slot))
    # an image view carries the transient columns the documents have, even where no slot has a value
    carried = PER_SLOT & set(batch) if over == IMAGE else ()
    out = _columns(rows, carried)
    return View(over, out, origin, frozenset(out))


def _columns(rows: list[dict[str, Any]], also: Any = ()) -> Batch:
    names = list(dict.fromkeys(k for r in rows for k in r))
    out = {n: [r.get(n) for r in rows] for n in names}
    for col in (*schema.STATUS_COLUMNS, *also):
        out.setdefault(col, [None] * len(rows))
    out.setdefault(schema.FILES, [{} for _ in rows])
    return out


def _view_rows(batch: Batch, i: int, doc: dict, over: Over) -> Iterator[tuple[int, dict[str, Any]]]:
    base = {schema.STATUS: schema.PENDING, schema.ERROR_KIND: None, schema.ERROR_MESSAGE: None}
    key, files = batch[schema.KEY][i], batch[schema.FILES][i]
    url = batch[schema.URL][i] if schema.URL in batch else None
    if over == "document":
        yield -1, {**base, schema.KEY: key, schema.URL: url, schema.CAPTION: full_text(doc), schema.FILES: {}}
        return
    if over == "text":
        for k, seg in enumerate(text_slots(doc)):
            prefix = text_member(k, "")
            yield k, {**base, schema.KEY: view_key(key, over, k), schema.URL: url,
                      schema.CAPTION: seg.get("text") or "",
                      schema.FILES: {e[len(prefix):]: v for e, v in files.items() if e.startswith(prefix)}}
        return
    slots = image_slots(doc)
    for j in live_images(doc):
        seg, prefix = slots[j], image_member(j, "")
        row = {**base, schema.KEY: view_key(key, over, j), schema.URL: seg.get("url"),
               schema.CAPTION: nearest_text(doc, seg),
               schema.FILES: {e[len(prefix):]: v for e, v in files.items() if e.startswith(prefix)}}
        row.update({f: seg.get(f) for f in IMAGE_FIELDS})
        for col in PER_SLOT & set(batch):
            held = batch[col][i]
            if isinstance(held, dict) and j in held:
                row[col] = held[j]
        yield j, row


def merge(batch: Batch, v: View, rule: DocumentRule, binary: frozenset = frozenset()) -> None:
    """Take the stage's work on view ``v`` back into the documents of ``batch`` (``binary``: the
    stage's binary columns, kept per document), then apply ``rule`` to each image document it touched."""
    vb = v.batch
    new_columns = [c for c in vb if c not in v.columns and c not in schema.TRANSIENT_COLUMNS]
    if v.over == "document":
        for n, (i, _) in enumerate(v.origin):
            for c in new_columns:
                schema.set_column(batch, c, [i], [vb[c][n]])
            if vb[schema.STATUS][n] not in (schema.SUCCESS, schema.PENDING):
                schema.end_row(batch, i, vb[schema.STATUS][n], vb[schema.ERROR_KIND][n],
                               vb[schema.ERROR_MESSAGE][n] or "")
        return
    fields = [c for c in new_columns if c not in binary] + (list(IMAGE_FIELDS) if v.over == IMAGE else [])
    carried = PER_SLOT & set(vb) if v.over == IMAGE else set()
    for col in carried:  # the stage's values replace the documents' for the slots it saw
        held = batch.setdefault(col, [None] * schema.batch_len(batch))
        for i in {i for i, _ in v.origin}:
            held[i] = {}
    packed: dict[str, dict[int, dict[int, bytes]]] = {c: {} for c in new_columns if c in binary}
    touched: dict[int, Optional[tuple[str, str]]] = {}
    for n, (i, slot) in enumerate(v.origin):
        status, kind = vb[schema.STATUS][n], vb[schema.ERROR_KIND][n]
        seg = (image_slots if v.over == IMAGE else text_slots)(batch[schema.DOCUMENT][i])[slot]
        for c in fields:
            if vb[c][n] is not None:
                seg[c] = _plain(vb[c][n])
        for c in packed:
            if vb[c][n]:
                packed[c].setdefault(i, {})[slot] = bytes(vb[c][n])
        if status not in (schema.SUCCESS, schema.PENDING):
            if v.over == IMAGE:
                fail_image(batch, i, slot, status, kind, vb[schema.ERROR_MESSAGE][n] or "")
                if touched.get(i) is None or touched[i][0] != schema.FILTERED:
                    touched[i] = (status, kind)
            else:  # a text segment cannot be dropped alone: the reading order would break
                schema.end_row(batch, i, status, kind, vb[schema.ERROR_MESSAGE][n] or "")
            continue
        touched.setdefault(i, None)
        member = image_member if v.over == IMAGE else text_member
        files = batch[schema.FILES][i]
        _drop_members(files, member(slot, ""))  # the view row's files are the slot's, as the stage left them
        for ext, data in vb[schema.FILES][n].items():
            files[member(slot, ext)] = data
        for col in carried:
            if vb[col][n] is not None:
                batch[col][i][slot] = vb[col][n]
    for c, per_row in packed.items():
        schema.set_column(batch, c, list(per_row), [pack_slots(values) for values in per_row.values()])
    for i, cause in touched.items():
        if v.over == IMAGE:
            enforce(batch, i, rule, cause)


def written_view(written: Batch, over: Over, binary: frozenset = frozenset()) -> Batch:
    """A written document shard's status table as rows of ``over`` (every image, or every text, of
    every document, whatever its status; the segment's fields and ``binary`` columns as columns),
    for an ordered stage's ``resume``. Per document it is the table as it is."""
    if over == "document" or schema.DOCUMENT not in written:
        return written
    rows = []
    for i, key in enumerate(written[schema.KEY]):
        doc = as_document(written[schema.DOCUMENT][i])
        unpacked = {c: unpack_slots(written[c][i]) for c in binary if c in written}
        for slot, seg in enumerate(image_slots(doc) if over == IMAGE else text_slots(doc)):
            row = {k: v for k, v in seg.items() if k != "type"}
            row[schema.KEY] = view_key(key, over, slot)
            row.update({c: values.get(slot) for c, values in unpacked.items()})
            rows.append(row)
    return _columns(rows, [c for c in binary if c in written])


def views_of(context: JobContext, over: Over) -> JobContext:
    """A job context whose sample batches are views of the document batches (``n_rows`` documents)."""
    def sample_batches(n_rows: int) -> Iterator[Batch]:
        for batch in context.sample_batches(n_rows):
            yield view(batch, over).batch
    return dataclasses.replace(context, sample_batches=sample_batches)


class SegmentStage(Stage):
    """A stage written for pairs run over documents (see the module docstring); every hook but
    ``process``, ``columns``, ``prepare`` and ``resume`` is the wrapped stage's own."""

    def __init__(self, inner: Stage, over: Over, rule: DocumentRule = DocumentRule()) -> None:
        if over not in (IMAGE, TEXT, "document"):
            raise ValueError(f"SegmentStage: over must be 'image', 'text' or 'document', got {over!r}")
        super().__init__(inner.config)
        self.inner, self.over, self.rule = inner, over, rule
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:  # device, model, threshold, share_embeddings, ...
        if name in ("inner", "__setstate__") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    resources = property(lambda self: self.inner.resources)
    ordered = property(lambda self: self.inner.ordered)
    stateful = property(lambda self: self.inner.stateful)
    may_use_gpus = property(lambda self: self.inner.may_use_gpus)

    @property
    def binary(self) -> frozenset:
        """The wrapped stage's binary columns (kept per document, out of the segments)."""
        return frozenset(c for c, t in self.inner.columns.items() if t == "binary")

    @property
    def columns(self) -> dict[str, str]:
        """Per image and per text the stage's columns are fields of the segments (its binary ones
        document-row columns); per document they are the document row's columns."""
        if self.over == "document":
            return self.inner.columns
        return {c: "binary" for c in self.binary}

    def check(self) -> None:
        self.inner.check()

    def place(self, gpus: float) -> None:
        self.inner.place(gpus)

    def allow_processes(self) -> None:
        self.inner.allow_processes()

    def setup(self) -> None:
        self.inner.setup()

    def teardown(self) -> None:
        self.inner.teardown()

    def prepare(self, context: JobContext) -> Optional[dict[str, Any]]:
        return self.inner.prepare(views_of(context, self.over))

    def restore(self, state: dict[str, Any]) -> None:
        self.inner.restore(state)

    def fingerprint(self) -> Optional[dict[str, Any]]:
        return self.inner.fingerprint()

    def resume(self, written: Batch) -> None:
        self.inner.resume(written_view(written, self.over, self.binary))

    def process(self, batch: Batch) -> Batch:
        v = view(batch, self.over)
        if v.origin:
            v.batch = self.inner.process(v.batch)
            merge(batch, v, self.rule, self.binary)
        return batch


def for_documents(stage: Stage, rule: DocumentRule = DocumentRule()) -> Stage:
    """``stage`` as a document job runs it: over its ``document_view``, or as it is (None)."""
    return stage if stage.document_view is None else SegmentStage(stage, stage.document_view, rule)

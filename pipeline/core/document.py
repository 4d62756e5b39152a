"""Interleaved documents (OBELICS, MMC4, MINT-1T, OmniCorpus) as samples: one row per document.

A document row carries its content in the column ``document`` (:data:`schema.DOCUMENT`), a dict
whose ``segments`` are in reading order::

    {"segments": [{"type": "text", "text": "..."},
                  {"type": "image", "url": "https://...", "alt": "...", "text_index": 2, ...}, ...]}

Readers (``catalogs``) build it; any other top-level key is the source's metadata, kept as it is.
An image segment may carry ``text_index``: the index, in ``segments``, of the text it belongs to
(MMC4's matched sentence); without it its nearest text is the closest text segment, the next one
on a tie (:func:`nearest_text`). Image segments are numbered in order (their *slot*); the download
stage adds to each ``status``, ``error_kind``, ``error_message``, ``width``, ``height``,
``original_width``, ``original_height``, ``sha256`` and, for a success, ``member``: the tar member
of its image, ``image_NNN.<ext>`` (:func:`image_member`), so keys keep webdataset's no-dot rule.
Text segments are numbered too; a stage's outputs per text go in members ``text_NNN.<ext>``.

**Views.** Stages written for one image (or one caption) per row run unchanged on documents
through :class:`SegmentStage`: it builds a *view* batch (one row per live image, its caption the
image's nearest text; one row per text segment; or one row per document with its whole text as
caption), runs the stage on it and merges the result back: a view row the stage failed or
rejected fails its image (kept in the document with that status, its members dropped); new files
become the segment's members; new columns become fields of the segment (``clip_score`` of
image 2); transient columns (the shared CLIP embedding) are kept per slot for the next stage.

**The document rule** (:class:`DocumentRule`): a document keeps its failed images as slots with a
status, and is itself dropped when fewer than ``min_images`` images are left, or, with
``all_images``, when any image failed. The stage whose work dropped it is named: a filter's
rejection makes the document ``filtered`` by that filter, a download failure ``too_few_images``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.core.stage import Stage

TEXT, IMAGE = "text", "image"
Over = Literal["image", "text", "document"]
# Fields the download stage sets on an image segment, taken into and out of an image view.
IMAGE_FIELDS = (schema.WIDTH, schema.HEIGHT, schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT, schema.SHA256)
STATUS_FIELDS = (schema.STATUS, schema.ERROR_KIND, schema.ERROR_MESSAGE)


@dataclass(frozen=True)
class DocumentRule:
    """When a document is dropped for its images (see the module docstring)."""

    min_images: int = 1
    all_images: bool = False


# -- reading a document --------------------------------------------------------------------------

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
    at = next(n for n, s in enumerate(segs) if s is image)
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


# -- changing a document -------------------------------------------------------------------------

def fail_image(batch: Batch, i: int, slot: int, status: str, kind: str, message: str) -> None:
    """Image ``slot`` of row ``i`` failed (or was filtered): recorded in its segment, members dropped."""
    seg = image_slots(batch[schema.DOCUMENT][i])[slot]
    seg.update({schema.STATUS: status, schema.ERROR_KIND: kind, schema.ERROR_MESSAGE: (message or kind)[:500]})
    seg.pop("member", None)
    prefix = f"image_{slot:03d}."
    files = batch[schema.FILES][i]
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
    rows, origin = [], []
    for i in schema.alive(batch):
        doc = batch[schema.DOCUMENT][i]
        for slot, row in _view_rows(batch, i, doc, over):
            rows.append(row)
            origin.append((i, slot))
    names = list(dict.fromkeys(k for r in rows for k in r)) or [schema.KEY, schema.FILES]
    out = {n: [r.get(n) for r in rows] for n in names}
    for col in (*schema.STATUS_COLUMNS, schema.FILES):
        out.setdefault(col, [None] * len(rows) if col != schema.FILES else [{} for _ in rows])
    return View(over, out, origin, frozenset(out))


def _view_rows(batch: Batch, i: int, doc: dict, over: Over) -> Iterator[tuple[int, dict[str, Any]]]:
    base = {schema.STATUS: schema.PENDING, schema.ERROR_KIND: None, schema.ERROR_MESSAGE: None}
    key, files = batch[schema.KEY][i], batch[schema.FILES][i]
    if over == "document":
        yield -1, {**base, schema.KEY: key, schema.URL: batch[schema.URL][i], schema.CAPTION: full_text(doc),
                   schema.FILES: {}}
        return
    if over == "text":
        for k, seg in enumerate(text_slots(doc)):
            prefix = f"text_{k:03d}."
            yield k, {**base, schema.KEY: f"{key}_t{k:03d}", schema.URL: batch[schema.URL][i],
                      schema.CAPTION: seg.get("text") or "",
                      schema.FILES: {e[len(prefix):]: v for e, v in files.items() if e.startswith(prefix)}}
        return
    slots = image_slots(doc)
    for j in live_images(doc):
        seg, prefix = slots[j], f"image_{j:03d}."
        row = {**base, schema.KEY: f"{key}_i{j:03d}", schema.URL: seg.get("url"),
               schema.CAPTION: nearest_text(doc, seg),
               schema.FILES: {e[len(prefix):]: v for e, v in files.items() if e.startswith(prefix)}}
        row.update({f: seg.get(f) for f in IMAGE_FIELDS})
        for col in schema.TRANSIENT_COLUMNS:
            held = batch.get(col, [None] * len(batch[schema.KEY]))[i]
            if isinstance(held, dict) and j in held:
                row[col] = held[j]
        yield j, row


def merge(batch: Batch, v: View, stage_name: str, rule: DocumentRule) -> None:
    """Take the stage's work on view ``v`` back into the documents of ``batch``, then apply ``rule``
    to each document it touched."""
    vb = v.batch
    new_columns = [c for c in vb if c not in v.columns and c not in schema.TRANSIENT_COLUMNS]
    touched: dict[int, Optional[tuple[str, str]]] = {}
    for n, (i, slot) in enumerate(v.origin):
        status = vb[schema.STATUS][n]
        if v.over == "document":
            if status not in (schema.SUCCESS, schema.PENDING):
                schema.end_row(batch, i, status, vb[schema.ERROR_KIND][n], vb[schema.ERROR_MESSAGE][n] or "")
                continue
            for c in new_columns:
                schema.set_column(batch, c, [i], [vb[c][n]])
            continue
        doc = batch[schema.DOCUMENT][i]
        seg = (image_slots(doc) if v.over == "image" else text_slots(doc))[slot]
        if status not in (schema.SUCCESS, schema.PENDING):
            if v.over == "image":
                fail_image(batch, i, slot, status, vb[schema.ERROR_KIND][n], vb[schema.ERROR_MESSAGE][n] or "")
                touched[i] = (status, vb[schema.ERROR_KIND][n])
            else:  # a text segment cannot be dropped alone: the reading order would break
                schema.end_row(batch, i, status, vb[schema.ERROR_KIND][n], vb[schema.ERROR_MESSAGE][n] or "")
            continue
        touched.setdefault(i, None)
        member = image_member if v.over == "image" else text_member
        files = batch[schema.FILES][i]
        for ext, data in vb[schema.FILES][n].items():
            files.setdefault(member(slot, ext), data)
        for c in new_columns:
            if vb[c][n] is not None:
                seg[c] = vb[c][n]
        for col in schema.TRANSIENT_COLUMNS & set(vb):
            if vb[col][n] is not None:
                held = batch.setdefault(col, [None] * len(batch[schema.KEY]))
                held[i] = {**(held[i] if isinstance(held[i], dict) else {}), slot: vb[col][n]}
    for i, cause in touched.items():
        enforce(batch, i, rule, cause)


class SegmentStage(Stage):
    """A stage written for pairs run over documents (see the module docstring); every hook but
    ``process`` and ``columns`` is the wrapped stage's own."""

    def __init__(self, inner: Stage, over: Over, rule: DocumentRule = DocumentRule()) -> None:
        super().__init__(inner.config)
        self.inner, self.over, self.rule = inner, over, rule
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:  # check, setup, prepare, fingerprint, resources, ...
        if name in ("inner", "__setstate__") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    resources = property(lambda self: self.inner.resources)
    ordered = property(lambda self: self.inner.ordered)
    stateful = property(lambda self: self.inner.stateful)
    may_use_gpus = property(lambda self: self.inner.may_use_gpus)

    @property
    def columns(self) -> dict[str, str]:
        """Per image and per text the stage's columns are fields of the segments; per document
        they are the document row's columns."""
        return self.inner.columns if self.over == "document" else {}

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

    def prepare(self, context):
        return self.inner.prepare(context)

    def restore(self, state: dict[str, Any]) -> None:
        self.inner.restore(state)

    def fingerprint(self) -> Optional[dict[str, Any]]:
        return self.inner.fingerprint()

    def resume(self, written: Batch) -> None:
        self.inner.resume(written)

    def process(self, batch: Batch) -> Batch:
        v = view(batch, self.over)
        if v.origin:
            v.batch = self.inner.process(v.batch)
            merge(batch, v, self.name, self.rule)
        return batch

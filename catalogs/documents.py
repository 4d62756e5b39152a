"""One source row of an interleaved corpus made one document (``reader.layout: document``).

The document is the dict of :mod:`pipeline.core.document`: ``segments`` in reading order, text
segments ``{"type": "text", "text": ...}`` and image segments ``{"type": "image", "url": ..., ...}``
with the fields the card's ``document.image`` maps, plus the source columns in ``document.keep``
as its metadata. Two orders (see :class:`catalogs.card.DocumentReader`):

* ``positions`` (OBELICS, OmniCorpus): position ``i`` holds a text or an image; both null skips the
  position, both set is a malformed row (the published layouts have exactly one).
* ``matched`` (MMC4): the images that match sentence ``k`` come right before it, in their order in
  the image list, each with ``text_index`` = the sentence's index in ``segments`` and
  ``source_index`` = its index in the image list (the row of MMC4's ``similarity_matrix``). This is
  where OpenFlamingo's MMC4 loader puts the ``<image>`` token: before the matched sentence.

Values are passed on as read; :mod:`pipeline.sources.shards` validates the document (URLs of
images, text made str). A row that cannot be a document returns the reason instead.
"""
from __future__ import annotations

from typing import Any, Optional

from pipeline.core.document import IMAGE, TEXT
from pipeline.sources.formats import undecodable_to_bytes

from .card import DocumentReader
from .rowpath import compile_path


class DocumentPlan:
    """A card's document section compiled once."""

    def __init__(self, spec: DocumentReader):
        self.spec = spec
        self.texts = compile_path(spec.texts)
        self.images = compile_path(spec.images)
        self.image = {name: compile_path(p) for name, p in spec.image.items()}
        self.match = compile_path(spec.match) if spec.match else None
        self.columns = {name: compile_path(p) for name, p in spec.columns.items()}
        self.keep = [compile_path(p) for p in spec.keep]

    def paths(self) -> list:
        return [self.texts, self.images, *self.image.values(), *([self.match] if self.match else []),
                *self.columns.values(), *self.keep]

    def required(self) -> list:
        """The paths a file of this layout must have columns for."""
        return [self.texts, self.images]

    def build(self, row: dict[str, Any]) -> tuple[Optional[dict], Optional[str]]:
        """``(document, None)`` or ``(None, why the row is not a document)``."""
        texts, images = self.texts.resolve(row), self.images.resolve(row)
        for path, value in ((self.texts, texts), (self.images, images)):
            if value is not None and not isinstance(value, (list, tuple)):
                return None, f"{path.text!r} is not a list: {short(value)}"
        texts, images = list(texts or []), list(images or [])
        if self.spec.order == "matched":
            segments, why = self._matched(row, texts, images)
        else:
            segments, why = self._positions(row, texts, images)
        if why:
            return None, why
        document: dict[str, Any] = {"segments": segments}
        for path in self.keep:
            document.setdefault(path.segments[-1].name, undecodable_to_bytes(path.resolve(row)))
        return document, None

    def row_columns(self, row: dict[str, Any]) -> dict[str, Any]:
        return {name: undecodable_to_bytes(path.resolve(row)) for name, path in self.columns.items()}

    # -- the two orders ------------------------------------------------------------------------------
    def _positions(self, row: dict, texts: list, images: list) -> tuple[list[dict], Optional[str]]:
        if len(texts) != len(images):
            return [], (f"{self.texts.text!r} and {self.images.text!r} differ in length "
                        f"({len(texts)} and {len(images)})")
        segments = []
        for i, (text, image) in enumerate(zip(texts, images)):
            if text is not None and image is not None:
                return [], f"position {i} holds both a text and an image"
            if image is not None:
                segments.append(self._image(row, i))
            elif text is not None:
                segments.append({"type": TEXT, "text": undecodable_to_bytes(text)})
        return segments, None

    def _matched(self, row: dict, texts: list, images: list) -> tuple[list[dict], Optional[str]]:
        by_sentence: dict[int, list[int]] = {}
        for j in range(len(images)):
            k = self.match.resolve({**row, "@index": j})
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(texts):
                return [], (f"{self.match.text!r} of image {j} is {short(k)}, not the index of one of "
                            f"the document's {len(texts)} sentences")
            by_sentence.setdefault(k, []).append(j)
        segments: list[dict] = []
        for k, text in enumerate(texts):
            matched = by_sentence.get(k, [])
            at = len(segments) + len(matched)  # where sentence k lands, after its images
            for j in matched:
                segments.append({**self._image(row, j), "text_index": at, "source_index": j})
            segments.append({"type": TEXT, "text": undecodable_to_bytes(text)})
        return segments, None

    def _image(self, row: dict, index: int) -> dict[str, Any]:
        element = {**row, "@index": index}
        segment: dict[str, Any] = {"type": IMAGE}
        for name, path in self.image.items():
            value = undecodable_to_bytes(path.resolve(element))
            if value is not None or name == "url":  # a missing URL stays visible to the planner
                segment[name] = value
        return segment


def short(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

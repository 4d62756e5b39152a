"""What every filter shares: an options dataclass read with ``pipeline.config.from_dict``, a
``reject`` that records the filter's name as the error kind, and how a row's image is found."""
from __future__ import annotations

import typing
from typing import Any, ClassVar, Optional

from pipeline.core import schema
from pipeline.core.config import from_dict, to_dict
from pipeline.job.spec import DownloadSpec
from pipeline.core.stage import Batch, Stage

# The image of a row is stored under the download stage's encode_format extension.
IMAGE_EXTS: tuple[str, ...] = typing.get_args(typing.get_type_hints(DownloadSpec)["encode_format"])


def image_of(files: dict[str, bytes]) -> Optional[bytes]:
    for ext in IMAGE_EXTS:
        data = files.get(ext)
        if data:
            return data
    return None


class Filter(Stage):
    """A stage that rejects rows. Subclasses set ``name`` and ``Options`` (a dataclass)."""

    Options: ClassVar[type]

    def __init__(self, options: Any) -> None:
        self.options = options

    @classmethod
    def parse(cls, raw: Any, path: str) -> Any:
        """The options from the job spec mapping (``path`` names it in error messages)."""
        return from_dict(cls.Options, raw, path)

    def check(self) -> None:
        """Fail early, in the driver, when something the filter needs is missing (models, files)."""

    def reject(self, batch: Batch, i: int, message: str) -> None:
        schema.mark(batch, i, kind=self.name, message=message)

    def fingerprint(self) -> dict[str, Any] | None:
        return {"filter": self.name, "options": to_dict(self.options)}


def alive_with_image(batch: Batch) -> tuple[list[int], list[bytes]]:
    """Alive rows that carry an image, and those images (rows without one are left alone)."""
    idx, images = [], []
    for i in schema.alive(batch):
        data = image_of(batch[schema.FILES][i])
        if data is not None:
            idx.append(i)
            images.append(data)
    return idx, images

"""The per-URL failure that the fetch modules raise and :mod:`pipeline.fetch.client` turns into a
FetchResult (never an exception out of a fetch)."""
from __future__ import annotations

from typing import Optional

from pipeline.core.schema import ErrorKind, error_kind


class Failure(Exception):
    """A per-URL failure with its error kind; turned into a FetchResult at the top."""

    def __init__(self, kind: ErrorKind, message: str, http_status: Optional[int] = None,
                 retry_after: Optional[float] = None):
        error_kind(kind)  # a kind outside the schema is a bug here
        super().__init__(message)
        self.kind, self.message, self.http_status, self.retry_after = kind, message, http_status, retry_after

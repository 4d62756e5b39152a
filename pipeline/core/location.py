"""Whether a location (``input.files`` entry, ``output.dir``) is on this machine's disk or behind
an fsspec URL: ``file://`` URLs and plain paths are local; every other ``scheme://`` is not."""
from __future__ import annotations

import os
from typing import Optional


def local_path(location: str) -> Optional[str]:
    """The absolute local path ``location`` names (a path or a ``file://`` URL); None for others."""
    if location.startswith("file://"):
        return os.path.abspath(location[len("file://"):])
    return None if "://" in location else os.path.abspath(os.path.expanduser(location))


def is_remote(location: str) -> bool:
    return local_path(location) is None

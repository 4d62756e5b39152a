"""Which files ``input.files`` names: entries are files, globs or folders, local paths or fsspec
URLs, expanded into the files to read in a stable order (shard ids follow row order)."""
from __future__ import annotations

import os
from typing import Any, Optional

import fsspec

from pipeline.core.config import ConfigError
from pipeline.core.location import is_remote
from pipeline.sources.formats import SUFFIXES, detect_format

HIDDEN = (".", "_")  # hidden files and markers (_SUCCESS, _metadata, _temporary/), as pyarrow.dataset skips
NO_LISTING = ("http", "https")  # no folders and no globs ("?" starts a query): an entry is one file


def expand_files(files: list[str], storage_options: Optional[dict[str, Any]] = None, *,
                 folders: bool = True) -> list[str]:
    """The files that ``input.files`` entries name, in a stable order (shard ids follow row order).

    Local paths and fsspec URLs alike (``s3://``, ``gs://``, ``hf://``, ``file://``, ``memory://``):

    * a glob (``*``, ``?``, ``[``; ``**`` crosses folders) is expanded by the entry's filesystem,
      sorted; folders it matches are ignored;
    * a folder (with ``folders``) becomes the files under it, recursively (partitioned layouts and
      Hub repositories nest them), whose format is known from the suffix (``.gz`` too), sorted by
      path;
    * anything else is one file and passes through unchanged (opening it reports a missing one),
      unless it ends with ``/``: then it must be a folder. ``http(s)://`` entries always pass
      (a ``?`` there starts a query, and there is no listing).

    Both skip names starting with ``.`` or ``_`` (hidden files, ``_SUCCESS``, ``_temporary/``)
    unless the glob itself spells that character. A glob or folder that yields no file is a
    ConfigError naming the entry. Expanded URLs keep their protocol, so they reopen the same way;
    expanded local paths are absolute.
    """
    out: list[str] = []
    for entry in files:
        out.extend(_expand_entry(entry, storage_options, folders))
    return out


def _expand_entry(entry: str, storage_options: Optional[dict[str, Any]], folders: bool) -> list[str]:
    is_glob = any(c in entry for c in "*?[")
    protocol = entry.split("://", 1)[0] if "://" in entry else "file"
    if protocol.rsplit("::", 1)[-1] in NO_LISTING or not (is_glob or folders):
        return [entry]
    fs, path = _filesystem(entry, storage_options)
    if is_glob:
        found, problem = _glob(fs, path), "matches no file"
    elif _is_dir(fs, path):
        found = _folder(fs, path)
        problem = (f"is a folder with no file of a known format ({', '.join(SUFFIXES)}, or those .gz) "
                   "outside hidden (.name) and marker (_name) names")
    elif entry.endswith("/"):
        raise ConfigError(f"input.files: {entry!r}: no such folder")
    else:
        return [entry]
    if not found:
        raise ConfigError(f"input.files: {entry!r} {problem}")
    prefix = f"{protocol}://" if "://" in entry else ""
    return [p if "://" in p else prefix + p for p in found]


def _filesystem(entry: str, storage_options: Optional[dict[str, Any]]) -> tuple[Any, str]:
    if "://" not in entry:
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), os.path.abspath(os.path.expanduser(entry))
    options = dict(storage_options or {}) if is_remote(entry) else {}
    fs, path = fsspec.core.url_to_fs(entry, **options)
    fs.invalidate_cache()  # a fresh listing: the files may have changed since this process last looked
    return fs, path


def _is_dir(fs: Any, path: str) -> bool:
    try:
        return fs.isdir(path)
    except (FileNotFoundError, PermissionError):
        return False  # then it is opened as a file, which reports the real problem


def _glob(fs: Any, pattern: str) -> list[str]:
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    base, spelled = "/".join(parts[:first]), {part[0] for part in parts[first:] if part}  # ".*" asks for them
    matches = fs.glob(pattern, detail=True)
    return sorted(name for name, info in matches.items()
                  if info.get("type") == "file" and _visible(name[len(base):], spelled))


def _folder(fs: Any, path: str) -> list[str]:
    root = path.rstrip("/") + "/"
    return sorted(name for name in fs.find(path, withdirs=False)
                  if name.startswith(root) and _visible(name[len(root):]) and _known_format(name))


def _visible(relative: str, spelled: set[str] = frozenset()) -> bool:
    return not any(part.startswith(HIDDEN) and part[0] not in spelled for part in relative.split("/") if part)


def _known_format(path: str) -> bool:
    try:
        detect_format(path)
        return True
    except ConfigError:
        return False

"""The shard index: an output directory's shards and sample counts, from ``index.json`` or (without
one) by listing the directory and counting each tar's samples; plus the small file helpers.

``index.json`` is untrusted input, checked before an epoch is planned from it; a problem raises
:class:`BadIndexError` naming the index, the shard and the field:

* it must be a JSON object whose ``shardlist`` is a list of objects with a non-empty string
  ``url``, a non-negative integer ``nsamples`` and, optionally, a non-negative integer ``filesize``;
* a shard's location must resolve (``..`` and symlinks included) under the dataset root, on the
  same filesystem, unless the caller passes ``allow_outside_root=True``; so an index cannot make
  the trainer open ``/etc/...``, another bucket or a loopback HTTP service;
* counts must be ones the data can hold: a shard's ``nsamples`` at most its real size over
  ``MIN_MEMBER_BYTES`` (every sample is at least one member, every member at least a header), and
  the source's total at most the present shards' bytes over the same, so a missing shard is
  skipped and counted as before but an absurd count cannot make an epoch spin on skipped draws.

Within those bounds the index defines the epoch: a tar that holds fewer samples than its count has
the rest skipped and counted, one that holds more has the extra samples left unread; both are
reported when the shard is read (pipeline.loader.dataset).
"""
from __future__ import annotations

import json
import os
import posixpath
import stat
import warnings
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

from pipeline.core.location import local_path
from pipeline.loader.tar import MIN_MEMBER_BYTES, TarFormatError, _TarReader, _walk_samples


class BadIndexError(ValueError):
    """``index.json`` or a shard location in it cannot be trusted (the message names which and why)."""


@dataclass(frozen=True)
class Shard:
    url: str                       # absolute path or fsspec URL
    nsamples: int
    filesize: Optional[int] = None  # the file's real size when it was found at open, else the index's
    zipped: Optional[Any] = None   # a base shard read with sidecars: its pipeline.loader.sidecar.Zip


@dataclass(frozen=True)
class Source:
    """One output directory: its shards in index order."""

    root: str
    shards: tuple[Shard, ...]

    @property
    def nsamples(self) -> int:
        return sum(s.nsamples for s in self.shards)


def _join(root: str, url: str) -> str:
    if "://" in url or url.startswith("/"):
        return url
    return root.rstrip("/") + "/" + url


def _open(url: str, storage_options: Optional[dict]) -> Any:
    """A binary file object with seek/readinto: unbuffered for local files (we buffer), fsspec else.
    A local name that is not a regular file (a FIFO would block the open forever, a device never
    ends) raises OSError."""
    path = local_path(url)
    if path is not None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # no effect on regular files
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{path}: not a regular file")
        return open(fd, "rb", buffering=0)
    import fsspec

    return fsspec.open(url, "rb", **(storage_options or {})).open()


# -- where a shard may be --------------------------------------------------------------------------

def _inside(root: str, location: str) -> Optional[str]:
    """``location`` normalised, when it is strictly under ``root`` on the same filesystem; else None."""
    root_path, path = local_path(root), local_path(location)
    if root_path is not None or path is not None:
        if root_path is None or path is None:
            return None
        real_root, real = os.path.realpath(root_path), os.path.realpath(path)
        inside = real != real_root and os.path.commonpath([real_root, real]) == real_root
        return os.path.normpath(path) if inside else None
    scheme, _, root_rest = root.partition("://")
    other, _, rest = location.partition("://")
    base, rest = posixpath.normpath(root_rest), posixpath.normpath(rest)
    if other != scheme or not rest.startswith(base.rstrip("/") + "/"):
        return None
    return f"{scheme}://{rest}"


def shard_location(root: str, url: str, allow_outside_root: bool = False) -> str:
    """Where the shard ``url`` of ``root``'s index is; refused outside the root unless allowed."""
    location = _join(root, url)
    if allow_outside_root:
        return location
    inside = _inside(root, location)
    if inside is None:
        raise BadIndexError(f"shard {url!r} is at {location}, outside the dataset root {root}; pass "
                            f"allow_outside_root=True (mmcurate stream --allow-outside-root) to read it")
    return inside


# -- index.json ------------------------------------------------------------------------------------

def _count(entry: dict, field: str, where: str, required: bool) -> Optional[int]:
    value = entry.get(field)
    if value is None and not required:
        return None
    if type(value) is not int or value < 0:  # bool is an int subclass: refused with the rest
        raise BadIndexError(f"{where}: {field} must be a non-negative integer, got {value!r}")
    return value


def _shard(root: str, index_url: str, i: int, entry: Any, allow_outside_root: bool) -> Shard:
    if not isinstance(entry, dict):
        raise BadIndexError(f"{index_url}: shardlist[{i}] must be an object, got {str(entry)[:80]!r}")
    url = entry.get("url")
    if not isinstance(url, str) or not url:
        raise BadIndexError(f"{index_url}: shardlist[{i}].url must be a non-empty string, got {url!r}")
    where = f"{index_url}: shard {url!r} (shardlist[{i}])"
    nsamples = _count(entry, "nsamples", where, required=True)
    filesize = _count(entry, "filesize", where, required=False)
    try:
        location = shard_location(root, url, allow_outside_root)
    except BadIndexError as e:
        raise BadIndexError(f"{index_url}: {e}") from None
    except ValueError as e:  # e.g. a NUL byte, which no path or URL may hold
        raise BadIndexError(f"{where}: not a usable location ({e})") from None
    return Shard(location, nsamples, filesize)


def read_index(root: str, storage_options: Optional[dict] = None, allow_outside_root: bool = False) -> Source:
    """Read and check ``root/index.json`` (wids shard index; see the module docstring); without one,
    list ``*.tar`` and count samples by walking their headers (slow for big datasets, hence the warning)."""
    root = root.rstrip("/") or "/"
    index_url = _join(root, "index.json")
    try:
        with _open(index_url, storage_options) as f:
            raw = f.read()
    except FileNotFoundError:
        return _scan_directory(root, storage_options, allow_outside_root)
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deeply nested
        raise BadIndexError(f"{index_url}: not JSON ({type(e).__name__}: {e})") from None
    shardlist = index.get("shardlist") if isinstance(index, dict) else None
    if not isinstance(shardlist, list):
        raise BadIndexError(f"{index_url}: 'shardlist' must be a list of shards, got {str(shardlist)[:80]!r}")
    shards = [_shard(root, index_url, i, e, allow_outside_root) for i, e in enumerate(shardlist)]
    return Source(root, tuple(_checked_counts(index_url, shards, _sizes(root, shards, storage_options))))


def _checked_counts(index_url: str, shards: list[Shard], sizes: dict[str, int]) -> list[Shard]:
    """The shards with their real sizes, once every count is one the data can hold."""
    for shard in shards:
        size = sizes.get(shard.url)
        if size is not None and shard.nsamples > size // MIN_MEMBER_BYTES:
            raise BadIndexError(f"{index_url}: shard {shard.url}: nsamples {shard.nsamples!r} is more than its "
                                f"{size} bytes can hold (at most {size // MIN_MEMBER_BYTES})")
    total, present = sum(s.nsamples for s in shards), sum(sizes.values())
    if total > present // MIN_MEMBER_BYTES:
        missing = ", ".join(f"{s.url} (nsamples {s.nsamples!r})" for s in shards if s.url not in sizes)
        raise BadIndexError(f"{index_url}: the shards' nsamples add up to {total}, more than the {present} bytes "
                            f"of the shards present can hold (at most {present // MIN_MEMBER_BYTES}); "
                            f"missing shards: {missing or 'none'}")
    return [replace(s, filesize=sizes[s.url]) if s.url in sizes else s for s in shards]


def _sizes(root: str, shards: list[Shard], storage_options: Optional[dict]) -> dict[str, int]:
    """Real sizes of the shards that exist: a stat each on disk, one listing of the root on a store
    (plus one look-up per shard it does not show)."""
    sizes: dict[str, int] = {}
    if local_path(root) is None:
        sizes = _listed_sizes(root, shards, storage_options)
    for shard in shards:
        if shard.url not in sizes:
            size = _size(shard.url, storage_options)
            if size is not None:
                sizes[shard.url] = size
    return sizes


def _listed_sizes(root: str, shards: list[Shard], storage_options: Optional[dict]) -> dict[str, int]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        listing = fs.find(path, detail=True)
        found = {fs._strip_protocol(p): info.get("size") for p, info in listing.items()}
        return {s.url: found[fs._strip_protocol(s.url)] for s in shards
                if isinstance(found.get(fs._strip_protocol(s.url)), int)}
    except (OSError, ValueError, NotImplementedError):  # no listing here: look each shard up instead
        return {}


def _size(url: str, storage_options: Optional[dict]) -> Optional[int]:
    path = local_path(url)
    try:
        if path is not None:
            return os.stat(path).st_size
        import fsspec

        fs, remote = fsspec.core.url_to_fs(url, **(storage_options or {}))
        size = fs.size(remote)
        return size if isinstance(size, int) else None
    except (OSError, ValueError):  # missing or unreadable: reported when the shard is read
        return None


def _scan_directory(root: str, storage_options: Optional[dict], allow_outside_root: bool) -> Source:
    path = local_path(root)
    if path is not None:
        names = sorted(n for n in os.listdir(path) if n.endswith(".tar"))
        urls = [shard_location(root, n, allow_outside_root) for n in names]  # a symlink may lead out
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        urls = sorted(fs.unstrip_protocol(p) for p in fs.glob(path.rstrip("/") + "/*.tar"))
    if not urls:
        raise FileNotFoundError(f"{root}: no index.json and no .tar shards")
    warnings.warn(f"{root}: no index.json; counting samples by scanning {len(urls)} tars", stacklevel=3)
    shards = []
    for url in urls:
        try:
            with _open(url, storage_options) as f:
                shards.append(Shard(url, sum(1 for _ in _walk_samples(_TarReader(f), 0, None, {}))))
        except TarFormatError as e:
            raise BadIndexError(f"{root} has no index.json and its shard {url} cannot be counted: {e}") from None
    return Source(root, tuple(shards))


def open_source(root: Union[str, Source], storage_options: Optional[dict] = None,
                allow_outside_root: bool = False) -> Source:
    return root if isinstance(root, Source) else read_index(str(root), storage_options, allow_outside_root)

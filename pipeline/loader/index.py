"""The shard index: an output directory's shards and sample counts, from ``index.json`` or (without
one) by listing the directory and counting each tar's samples; plus the small file helpers."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

from pipeline.core.location import local_path
from pipeline.loader.tar import _TarReader, _walk_samples


@dataclass(frozen=True)
class Shard:
    url: str                       # absolute path or fsspec URL
    nsamples: int
    filesize: Optional[int] = None


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
    """A binary file object with seek/readinto: unbuffered for local files (we buffer), fsspec else."""
    path = local_path(url)
    if path is not None:
        return open(path, "rb", buffering=0)
    import fsspec

    return fsspec.open(url, "rb", **(storage_options or {})).open()


def read_index(root: str, storage_options: Optional[dict] = None) -> Source:
    """Read ``root/index.json`` (wids shard index); without one, list ``*.tar`` and count samples
    by walking their headers (slow for big datasets, hence the warning)."""
    root = root.rstrip("/") or "/"
    try:
        with _open(_join(root, "index.json"), storage_options) as f:
            index = json.loads(f.read())
    except FileNotFoundError:
        return _scan_directory(root, storage_options)
    shards = tuple(Shard(_join(root, s["url"]), int(s["nsamples"]), s.get("filesize"))
                   for s in index["shardlist"])
    return Source(root, shards)


def _scan_directory(root: str, storage_options: Optional[dict]) -> Source:
    path = local_path(root)
    if path is not None:
        names = sorted(n for n in os.listdir(path) if n.endswith(".tar"))
        urls = [_join(root, n) for n in names]
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        urls = sorted(fs.unstrip_protocol(p) for p in fs.glob(path.rstrip("/") + "/*.tar"))
    if not urls:
        raise FileNotFoundError(f"{root}: no index.json and no .tar shards")
    warnings.warn(f"{root}: no index.json; counting samples by scanning {len(urls)} tars", stacklevel=3)
    shards = []
    for url in urls:
        with _open(url, storage_options) as f:
            shards.append(Shard(url, sum(1 for _ in _walk_samples(_TarReader(f), 0, None, {}))))
    return Source(root, tuple(shards))


def open_source(root: Union[str, Source], storage_options: Optional[dict] = None) -> Source:
    return root if isinstance(root, Source) else read_index(str(root), storage_options)

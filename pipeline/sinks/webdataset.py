"""The WebDataset output format: per shard ``NNNNN.tar`` (the successful samples), ``NNNNN.parquet``
(one status row per input row) and ``NNNNN_stats.json`` (counts and timings), and across shards
``index.json`` (a wids shard index, for exact epochs).

Every file is written atomically (:class:`pipeline.sinks.storage.Directory`); the stats file is
written last and marks the shard complete. Tars are deterministic (fixed mtime, owner and member
order), so a rerun gives the same bytes.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.sinks.base import Sink
from pipeline.sinks.storage import Directory

INDEX = "index.json"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def stats_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}_stats.json"


class WebDatasetSink(Sink):
    """``column_types`` gives the Arrow type of each status-table column (the schema's columns and
    those the job's stages declare); a column it does not name gets the type Arrow infers."""

    def __init__(self, directory: Directory, column_types: dict[str, str], name: str = "job") -> None:
        super().__init__(directory)
        self.column_types = dict(column_types)
        self.name = name

    def is_complete(self, shard_id: int) -> bool:
        name = shard_name(shard_id)
        return all(self.directory.exists(f) for f in (f"{name}.tar", f"{name}.parquet", stats_name(shard_id)))

    def write(self, shard_id: int, batch: Batch, stats: dict[str, Any]) -> dict[str, Any]:
        cols = scalar_columns(batch)
        members = [m for i, s in enumerate(batch[schema.STATUS]) if s == schema.SUCCESS
                   for m in sample_members(batch, i, cols)]
        name = shard_name(shard_id)
        data = tar_bytes(members)
        self.directory.write(f"{name}.tar", data)
        buf = io.BytesIO()
        pq.write_table(status_table(batch, self.column_types), buf)
        self.directory.write(f"{name}.parquet", buf.getvalue())
        stats = {**stats, "tar_bytes": len(data)}
        self.directory.write(stats_name(shard_id), json.dumps(stats, indent=1).encode())
        return stats

    def read_stats(self, shard_id: int) -> dict[str, Any]:
        return json.loads(self.directory.read_bytes(stats_name(shard_id)))

    def read_status(self, shard_id: int) -> Batch:
        return pq.read_table(self.directory.path(f"{shard_name(shard_id)}.parquet")).to_pydict()

    def finish(self) -> dict[str, Any]:
        """Write ``index.json``: the complete shards in shard order, with their sample counts."""
        shardlist = []
        for stats_file in self.directory.names("[0-9]*_stats.json"):
            tar = f"{stats_file.split('_')[0]}.tar"
            if not self.directory.exists(tar):
                continue
            stats = json.loads(self.directory.read_bytes(stats_file))
            shardlist.append({"url": tar, "nsamples": stats["successes"], "filesize": self.directory.size(tar)})
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": self.name, "shardlist": shardlist}
        self.directory.write(INDEX, json.dumps(index, indent=1).encode())
        return index


# -- the tar -------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-able form of a column value (numpy scalars and arrays, bytes)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def _member_order(ext: str) -> tuple[int, str]:
    """Media first, then txt and json, then stage outputs by name."""
    if ext in schema.MEDIA_EXTENSIONS:
        return (0, ext)
    return ({"txt": 1, "json": 2}.get(ext, 3), ext)


def sample_members(batch: Batch, i: int, scalar_columns: list[str]) -> list[tuple[str, bytes]]:
    """The tar members of row ``i``: its files, KEY.txt (caption) and KEY.json (its scalar columns)."""
    members = dict(batch[schema.FILES][i])
    caption = batch[schema.CAPTION][i]
    members["txt"] = (caption or "").encode("utf-8")
    meta = {c: _plain(batch[c][i]) for c in scalar_columns}
    members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    key = batch[schema.KEY][i]
    return [(f"{key}.{ext}", members[ext]) for ext in sorted(members, key=_member_order)]


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- the status table ----------------------------------------------------------------------------
def scalar_columns(batch: Batch) -> list[str]:
    """Columns that go to parquet and json: everything but files, status columns first."""
    rest = [c for c in batch if c not in schema.STATUS_COLUMNS and c != schema.FILES]
    return [c for c in schema.STATUS_COLUMNS if c in batch] + rest


def status_table(batch: Batch, column_types: dict[str, str]) -> pa.Table:
    arrays = {}
    for c in scalar_columns(batch):
        values = [_plain(v) for v in batch[c]]
        try:
            arrays[c] = pa.array(values, type=column_types.get(c))
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them readable as text
            arrays[c] = pa.array([None if v is None else json.dumps(v) if not isinstance(v, str) else v
                                  for v in values], type=pa.string())
    return pa.table(arrays)


# -- reading an output directory -----------------------------------------------------------------
def read_status_tables(out_dir: Union[str, Path], columns: Optional[list[str]] = None) -> pa.Table:
    """Every shard's status table as one table. A shard where no row reached a stage lacks that
    stage's columns; they are filled with nulls."""
    tables = []
    for path in sorted(Path(out_dir).glob("[0-9]*.parquet")):
        present = pq.read_schema(path).names
        tables.append(pq.read_table(path, columns=[c for c in columns if c in present] if columns else None))
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

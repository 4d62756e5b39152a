"""Write one output shard atomically: ``NNNNN.tar``, ``NNNNN.parquet`` and ``NNNNN_stats.json``.

Each file is written under a hidden temporary name, fsync'd and renamed, so a final name always
holds a complete file; the stats file is renamed last and marks the shard complete. Tars are
deterministic (fixed mtime, owner and member order), so a rerun gives the same bytes.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema

MEDIA_EXTENSIONS = ("jpg", "png", "webp", "mp4")  # first in a sample, then txt/json, then the rest


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def stats_path(out_dir: Path, shard_id: int) -> Path:
    return out_dir / f"{shard_name(shard_id)}_stats.json"


def is_complete(out_dir: Path, shard_id: int) -> bool:
    name = shard_name(shard_id)
    return all((out_dir / f).exists() for f in (f"{name}.tar", f"{name}.parquet", f"{name}_stats.json"))


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_temporaries(out_dir: Path) -> int:
    """Delete leftovers of a killed run (hidden ``.*.tmp`` files); returns how many."""
    leftovers = list(out_dir.glob(".*.tmp"))
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


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
    if ext in MEDIA_EXTENSIONS:
        return (0, ext)
    return ({"txt": 1, "json": 2}.get(ext, 3), ext)


def sample_members(batch: dict[str, list], i: int, scalar_columns: list[str]) -> list[tuple[str, bytes]]:
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


def scalar_columns(batch: dict[str, list]) -> list[str]:
    """Columns that go to parquet and json: everything but files, status columns first."""
    rest = [c for c in batch if c not in schema.STATUS_COLUMNS and c != schema.FILES]
    return [c for c in schema.STATUS_COLUMNS if c in batch] + rest


def status_table(batch: dict[str, list]) -> pa.Table:
    cols = scalar_columns(batch)
    arrays = {}
    for c in cols:
        values = [_plain(v) for v in batch[c]]
        try:
            arrays[c] = pa.array(values, type=schema.COLUMN_TYPES.get(c))
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them readable as text
            arrays[c] = pa.array([None if v is None else json.dumps(v) if not isinstance(v, str) else v
                                  for v in values], type=pa.string())
    return pa.table(arrays)


def shard_stats(batch: dict[str, list], shard_id: int, timings: Optional[dict] = None) -> dict[str, Any]:
    statuses = Counter(batch[schema.STATUS])
    kinds = Counter(k for k in batch[schema.ERROR_KIND] if k)
    return {
        "shard": shard_name(shard_id),
        "count": len(batch[schema.KEY]),
        "successes": statuses.get(schema.SUCCESS, 0),
        "status_counts": dict(sorted(statuses.items())),
        "error_kinds": dict(sorted(kinds.items())),
        "filtered": dict(sorted(Counter(k for k, st in zip(batch[schema.ERROR_KIND], batch[schema.STATUS])
                                        if st == schema.FILTERED).items())),
        "timings": timings or {},
    }


def write_shard(out_dir: str | Path, shard_id: int, batch: dict[str, list],
                timings: Optional[dict] = None) -> dict[str, Any]:
    """Write the shard's tar (successful samples), status table and stats; returns the stats.

    Rows still ``pending`` (no stage failed them) are the successes of this job.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch[schema.STATUS] = [schema.SUCCESS if s == schema.PENDING else s for s in batch[schema.STATUS]]
    cols = scalar_columns(batch)
    members = [m for i, s in enumerate(batch[schema.STATUS]) if s == schema.SUCCESS
               for m in sample_members(batch, i, cols)]
    name = shard_name(shard_id)
    data = tar_bytes(members)
    atomic_write(out_dir / f"{name}.tar", data)
    buf = io.BytesIO()
    pq.write_table(status_table(batch), buf)
    atomic_write(out_dir / f"{name}.parquet", buf.getvalue())
    stats = shard_stats(batch, shard_id, timings)
    stats["tar_bytes"] = len(data)
    atomic_write(stats_path(out_dir, shard_id), json.dumps(stats, indent=1).encode())
    return stats


def read_stats(out_dir: Path, shard_id: int) -> dict[str, Any]:
    return json.loads(stats_path(out_dir, shard_id).read_text())


def write_index(out_dir: str | Path, name: str) -> dict[str, Any]:
    """wids-compatible index of the complete shards, in shard order, for exact epochs."""
    out_dir = Path(out_dir)
    shardlist = []
    for stats_file in sorted(out_dir.glob("[0-9]*_stats.json")):
        shard = stats_file.name.split("_")[0]
        tar = out_dir / f"{shard}.tar"
        if not tar.exists():
            continue
        stats = json.loads(stats_file.read_text())
        shardlist.append({"url": tar.name, "nsamples": stats["successes"], "filesize": tar.stat().st_size})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": shardlist}
    atomic_write(out_dir / "index.json", json.dumps(index, indent=1).encode())
    return index


def read_status_tables(out_dir: str | Path, columns: Optional[list[str]] = None) -> pa.Table:
    """Every shard's status table as one table. A shard where no row reached a stage lacks that
    stage's columns; they are filled with nulls."""
    tables = []
    for path in sorted(Path(out_dir).glob("[0-9]*.parquet")):
        present = pq.read_schema(path).names
        tables.append(pq.read_table(path, columns=[c for c in columns if c in present] if columns else None))
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

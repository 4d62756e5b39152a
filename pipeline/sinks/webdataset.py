"""The WebDataset output format: per shard ``NNNNN.tar`` (the successful samples), ``NNNNN.parquet``
(one status row per input row), ``NNNNN.columns.arrow`` when the successes have ``.npy`` members
(the same arrays as columns, for memory-mapped reads: :mod:`pipeline.sinks.columnar`) and
``NNNNN_stats.json`` (counts and timings), and across shards ``index.json`` (a wids shard index,
for exact epochs). A complete shard is replaced (``mmcurate retry``) through a journal
(:mod:`pipeline.sinks.journal`).

Every file is committed whole (:class:`pipeline.sinks.storage.Directory`: a rename on disk, one
upload on an object store); the stats file is committed last and marks the shard complete, so a
shard's files without its stats are the leftovers of an interrupted write: ignored by the index,
swept by the next run. Tars are deterministic (fixed mtime, owner and member order), so a rerun
gives the same bytes.

The stats record each committed file's size and sha256 (``files``), hashed from the bytes as they
are written. Before a complete shard is skipped its sizes are checked against the listing (free);
``checksums`` (``mmcurate run --verify``) also reads the files back and compares the sha256s. That
is not free (measured: 0.6 s per 256 MiB tar read back from the page cache on a busy 2-core
machine, about ten minutes per thousand such shards, more from a cold disk or a store), so it is
asked for, not the default. A mismatch un-commits the shard (its stats are removed): it is redone. Stats written before these
fields carry ``tar_bytes`` only: the tar's size is checked.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from typing import Any, Iterable, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.document import full_text
from pipeline.core.schema import Batch
from pipeline.sinks import journal
from pipeline.sinks.base import DamagedShard, Sink
from pipeline.sinks.columnar import column_file, column_name
from pipeline.sinks.storage import Directory

log = logging.getLogger("mmcurate")
INDEX = "index.json"
SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|\.columns\.arrow|_stats\.json)$")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def stats_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}_stats.json"


class WebDatasetSink(Sink):
    """``column_types`` gives the Arrow type of each status-table column (the schema's columns and
    those the job's stages declare); a column it does not name gets the type Arrow infers. A
    ``binary`` column is data for the job itself (what a resumed stage rebuilds its state from), kept
    in the status table only: not in KEY.json, which is for trainers."""

    def __init__(self, directory: Directory, column_types: dict[str, str], name: str = "job") -> None:
        super().__init__(directory)
        self.column_types = dict(column_types)
        self.name = name
        self._listed: dict[str, int] = {}  # sizes as of the last complete_shards(), for the resume check

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_listed": {}}  # the driver's listing is no use to a writer

    def open(self) -> int:
        """Also sweeps the files of shards whose write was interrupted before their stats."""
        removed = super().open()
        finished = journal.finish(self.directory, self._tidy)  # before the sweep: a journal's shard is complete
        if finished:
            log.info("finished replacing %d shard(s) that an interrupted retry had begun", finished)
        names = set(self.directory.names("[0-9]*"))
        done = self._complete(names)
        for name in sorted(names):
            shard = SHARD_FILE.match(name)
            if shard and int(shard.group(1)) not in done:
                self.directory.remove(name)
                removed += 1
        return removed

    def complete_shards(self) -> set[int]:
        self._listed = self.directory.sizes("[0-9]*")
        return self._complete(set(self._listed))

    @staticmethod
    def _complete(names: set[str]) -> set[int]:
        """Shards whose stats are committed (with their tar and status table, committed before)."""
        return {int(m.group(1)) for n in names if (m := SHARD_FILE.match(n)) and m.group(2) == "_stats.json"
                and f"{m.group(1)}.tar" in names and f"{m.group(1)}.parquet" in names}

    def write(self, shard_id: int, batch: Batch, stats: dict[str, Any]) -> dict[str, Any]:
        files, stats = self.shard_files(shard_id, batch, stats)
        for file, data in files.items():
            self.directory.write(file, data)  # the stats file last: the commit
        return stats

    def replace(self, shard_id: int, files: dict[str, bytes]) -> None:
        """Replace a complete shard by ``files`` (from ``shard_files``) through a journal
        (:mod:`pipeline.sinks.journal`): a kill leaves the old shard or the new one."""
        journal.replace(self.directory, shard_name(shard_id), files, self._tidy)

    def _tidy(self, shard: str) -> None:
        """Remove the files of ``shard`` that its stats do not list (what a replaced shard no longer has)."""
        listed = set(self.read_stats(int(shard)).get("files", {})) | {f"{shard}_stats.json", f"{shard}.tar",
                                                                     f"{shard}.parquet"}
        for name in self.directory.names(f"{shard}*"):
            found = SHARD_FILE.match(name)
            if found and found.group(1) == shard and name not in listed:
                self.directory.remove(name)

    def shard_files(self, shard_id: int, batch: Batch, stats: dict[str, Any],
                    members: Optional[list[tuple[str, bytes]]] = None) -> tuple[dict[str, bytes], dict]:
        """Every file of one shard, name -> bytes, in commit order (the stats file last), and the
        stats as written. ``members``: the tar's members when not ``self.members(batch)`` (a retry
        keeps the untouched samples' members as they were)."""
        name = shard_name(shard_id)
        buf = io.BytesIO()
        pq.write_table(self.table(batch), buf)
        members = self.members(batch) if members is None else members
        tar = tar_bytes(members)
        files = {f"{name}.tar": tar, f"{name}.parquet": buf.getvalue()}
        columns = column_file(members, len(tar))  # the npy members again, for memory-mapped reads
        if columns is not None:
            files[column_name(name)] = columns
        stats = {**stats, "tar_bytes": len(files[f"{name}.tar"]),
                 "files": {file: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                           for file, data in files.items()}}
        files[stats_name(shard_id)] = json.dumps(stats, indent=1).encode()
        return files, stats

    def members(self, batch: Batch) -> list[tuple[str, bytes]]:
        """The tar's members: each success's files, KEY.txt and KEY.json."""
        cols = [c for c in scalar_columns(batch) if self.column_types.get(c) != "binary"]
        return [m for i, s in enumerate(batch[schema.STATUS]) if s == schema.SUCCESS
                for m in sample_members(batch, i, cols)]

    def table(self, batch: Batch) -> pa.Table:
        """The status table: one row per input row."""
        return status_table(batch, self.column_types)

    def verified_stats(self, shard_id: int, checksums: bool = False, status: bool = False) -> dict[str, Any]:
        """See the module docstring; ``status`` also reads the status table's footer (its row count)."""
        try:
            stats = self.read_stats(shard_id)
            problem = self._damage(shard_id, stats, checksums, status)
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable or malformed files
            problem = f"its files cannot be read ({type(e).__name__}: {e})"
        if problem:
            try:
                self.directory.remove(stats_name(shard_id))  # un-committed: incomplete until redone
            except FileNotFoundError:
                pass
            raise DamagedShard(problem)
        return stats

    def _damage(self, shard_id: int, stats: dict[str, Any], checksums: bool, status: bool) -> Optional[str]:
        """What differs from the shard as written, or None."""
        name = shard_name(shard_id)
        recorded = stats.get("files") or {f"{name}.tar": {"bytes": stats["tar_bytes"]}}
        for file, record in recorded.items():
            size = self._listed[file] if file in self._listed else self.directory.size(file)
            if size != record["bytes"]:
                return f"{file} is {size} bytes, {record['bytes']} when written"
        for file, record in recorded.items() if checksums else ():
            if "sha256" in record and (got := self._sha256(file)) != record["sha256"]:
                return f"{file} has sha256 {got}, {record['sha256']} when written"
        if status:
            with self.directory.open(f"{name}.parquet") as f:
                rows = pq.read_metadata(f).num_rows
            if rows != stats["count"]:
                return f"{name}.parquet has {rows} rows, {stats['count']} when written"
        return None

    def _sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        with self.directory.open(name) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def read_stats(self, shard_id: int) -> dict[str, Any]:
        return json.loads(self.directory.read_bytes(stats_name(shard_id)))

    def read_status(self, shard_id: int) -> Batch:
        with self.directory.open(f"{shard_name(shard_id)}.parquet") as f:
            return pq.read_table(f).to_pydict()

    def finish(self) -> dict[str, Any]:
        """Write ``index.json``: the complete shards in shard order, with their sample counts."""
        shardlist = [self.index_entry(shard_id) for shard_id in sorted(self.complete_shards())]
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": self.name, **self.index_fields(),
                 "shardlist": shardlist}
        self.directory.write(INDEX, json.dumps(index, indent=1).encode())
        return index

    def index_entry(self, shard_id: int) -> dict[str, Any]:
        """A complete shard's entry in ``index.json``."""
        tar = f"{shard_name(shard_id)}.tar"
        return {"url": tar, "nsamples": self.read_stats(shard_id)["successes"], "filesize": self.directory.size(tar)}

    def index_fields(self) -> dict[str, Any]:
        """What ``index.json`` says besides its name and shards (a layout's own fields)."""
        return {}


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
    """Media first (a document's ``image_NNN.jpg`` and a video's ``clip_NNN.mp4`` too), then txt
    and json, then stage outputs by name."""
    if schema.is_media(ext):
        return (0, ext)
    return ({"txt": 1, "json": 2}.get(ext, 3), ext)


def sample_members(batch: Batch, i: int, scalar_columns: list[str]) -> list[tuple[str, bytes]]:
    """The tar members of row ``i``: its files, KEY.txt (caption; a document's text) and KEY.json
    (its scalar columns; a document as an object, with its images' status and source URL)."""
    members = dict(batch[schema.FILES][i])
    caption = batch[schema.CAPTION][i]
    document = batch.get(schema.DOCUMENT, [None] * (i + 1))[i]
    if caption is None and isinstance(document, dict):
        caption = full_text(document)
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
    """Columns that go to parquet and json: everything but files and the transient columns,
    status columns first."""
    rest = [c for c in batch if c not in schema.STATUS_COLUMNS and c != schema.FILES
            and c not in schema.TRANSIENT_COLUMNS]
    return [c for c in schema.STATUS_COLUMNS if c in batch] + rest


def status_table(batch: Batch, column_types: dict[str, str]) -> pa.Table:
    arrays = {}
    for c in scalar_columns(batch):
        values = batch[c] if column_types.get(c) == "binary" else [_plain(v) for v in batch[c]]
        if column_types.get(c) == "string":  # an object declared as text (a document): its JSON
            values = [json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v for v in values]
        try:
            arrays[c] = pa.array(values, type=column_types.get(c))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            # mixed types, or values Arrow cannot hold (an int over 64 bits): keep them readable as text
            arrays[c] = pa.array([None if v is None else json.dumps(v, default=str) if not isinstance(v, str) else v
                                  for v in values], type=pa.string())
    return pa.table(arrays)


# -- reading an output directory -----------------------------------------------------------------
def read_status_tables(out_dir: Union[str, Directory], columns: Optional[list[str]] = None) -> pa.Table:
    """Every shard's status table as one table (``out_dir``: a path or URL). A shard where no row
    reached a stage lacks that stage's columns; they are filled with nulls."""
    directory = out_dir if isinstance(out_dir, Directory) else Directory(out_dir)
    tables = []
    for name in directory.names("[0-9]*.parquet"):
        with directory.open(name) as f:
            present = pq.read_schema(f).names
            f.seek(0)
            tables.append(pq.read_table(f, columns=[c for c in columns if c in present] if columns else None))
    if not tables:
        return pa.table({})
    try:
        return pa.concat_tables(tables, promote_options="permissive")  # int + double, null + anything
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.concat_tables(_as_text_where_types_differ(tables), promote_options="permissive")


def _as_text_where_types_differ(tables: list[pa.Table]) -> list[pa.Table]:
    """An extra column can hold a struct in one shard and text in another (it is the input's, not
    ours): where shards disagree beyond promotion, the column is read as text in all of them."""
    fields: dict[str, list[pa.Field]] = {}
    for t in tables:
        for field in t.schema:
            fields.setdefault(field.name, []).append(field)
    mixed = {name for name, found in fields.items() if not _promotable(found)}
    out = []
    for t in tables:
        for name in mixed & set(t.column_names):
            values = [None if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
                      for v in t.column(name).to_pylist()]
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, pa.string()))
        out.append(t)
    return out


def _promotable(fields: list[pa.Field]) -> bool:
    try:
        pa.unify_schemas([pa.schema([f]) for f in fields], promote_options="permissive")
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False

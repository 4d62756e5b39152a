"""The sidecar output layout (``output.layout: sidecar``): only the new fields of a job over existing
shards (``input.shards``), aligned with them, so media are never copied.

Per base shard, under the same shard id:

* ``NNNNN.tar``: per success, only the members the job made (``KEY.clip.npy``, ``KEY.text_ids.npy``,
  latents: every member but those read from the input, ``schema.INPUT_MEMBERS``) and ``KEY.json``
  with the key and the columns the stages declare (scores). A sample a filter of this job rejects
  is absent, as in the full layout.
* ``NNNNN.parquet``: one row per base sample, in the base's order: key, status, error kind and
  message, and the stages' columns.
* ``NNNNN.columns.arrow`` when those members include ``.npy`` arrays (as in the full layout).
* ``NNNNN_stats.json`` (the commit marker, last) and ``index.json``, which says ``layout: sidecar``,
  names the base dataset (``base``) and, per shard, its base shard (``base``) and row count (``rows``).

Before a shard is committed its keys are checked to be exactly the base shard's keys, in order
(from the base's status table when it has one, else from the tar's member names): a mismatch fails
the shard, naming both, and nothing is written. The loader checks the same when it zips a base with
its sidecars (``pipeline.loader.sidecar``).
"""
from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.sinks.storage import Directory
from pipeline.sinks.webdataset import WebDatasetSink, _member_order, _plain, status_table

LAYOUT = "sidecar"  # index.json's "layout" for this layout
# The status-table columns a sidecar keeps of the schema's: the rest (url, caption, sizes) are the base's.
OWN_COLUMNS = (schema.KEY, schema.STATUS, schema.ERROR_KIND, schema.ERROR_MESSAGE)


class KeyMismatch(ValueError):
    """A sidecar shard's keys are not its base shard's keys, in order."""


class SidecarSink(WebDatasetSink):
    """``base_shards[shard_id]`` is the URL of the base tar that shard ``shard_id`` is aligned with;
    ``base`` names the base dataset; ``stage_columns`` are the columns the job's stages declare
    (what KEY.json and the status table carry besides the key and status)."""

    def __init__(self, directory: Directory, column_types: dict[str, str], name: str, *, base: str,
                 base_shards: Mapping[int, str], stage_columns: Sequence[str],
                 base_options: Optional[dict[str, Any]] = None) -> None:
        super().__init__(directory, column_types, name)
        self.base = base
        self.base_shards = dict(base_shards)
        self.stage_columns = [c for c in dict.fromkeys(stage_columns) if c not in OWN_COLUMNS]
        self.base_options = dict(base_options or {})

    def write(self, shard_id: int, batch: Batch, stats: dict[str, Any]) -> dict[str, Any]:
        self.check_keys(shard_id, batch[schema.KEY])
        return super().write(shard_id, batch, stats)

    def check_keys(self, shard_id: int, keys: Sequence[str]) -> None:
        """Raise :class:`KeyMismatch` unless ``keys`` are the base shard's keys, in order."""
        base_url = self.base_shard(shard_id)
        expected = base_keys(base_url, self.base_options)
        problem = key_difference(list(keys), expected)
        if problem:
            raise KeyMismatch(f"sidecar shard {shard_id:05d} ({self.directory.path(f'{shard_id:05d}.tar')}) does "
                              f"not match its base shard {base_url}: {problem}")

    def base_shard(self, shard_id: int) -> str:
        if shard_id not in self.base_shards:
            raise KeyMismatch(f"sidecar shard {shard_id:05d} has no base shard: the base has "
                              f"{len(self.base_shards)} shards ({self.base})")
        return self.base_shards[shard_id]

    def members(self, batch: Batch) -> list[tuple[str, bytes]]:
        """Per success: the members this job made, then KEY.json (key and stage columns)."""
        cols = [schema.KEY, *(c for c in self.stage_columns if c in batch and self.column_types.get(c) != "binary")]
        inputs = batch.get(schema.INPUT_MEMBERS)
        out = []
        for i, status in enumerate(batch[schema.STATUS]):
            if status != schema.SUCCESS:
                continue
            read = set(inputs[i] or ()) if inputs is not None else set()
            members = {ext: data for ext, data in batch[schema.FILES][i].items() if ext not in read}
            members["json"] = json.dumps({c: _plain(batch[c][i]) for c in cols}, sort_keys=True,
                                         ensure_ascii=False).encode("utf-8")
            key = batch[schema.KEY][i]
            out.extend((f"{key}.{ext}", members[ext]) for ext in sorted(members, key=_member_order))
        return out

    def table(self, batch: Batch) -> pa.Table:
        own = [c for c in (*OWN_COLUMNS, *self.stage_columns) if c in batch]
        return status_table({c: batch[c] for c in own}, self.column_types)

    def index_entry(self, shard_id: int) -> dict[str, Any]:
        return {**super().index_entry(shard_id), "base": self.base_shard(shard_id),
                "rows": self.read_stats(shard_id)["count"]}

    def index_fields(self) -> dict[str, Any]:
        return {"layout": LAYOUT, "base": self.base}


# -- the base's keys ---------------------------------------------------------------------------------
def key_difference(got: list[str], expected: list[str]) -> Optional[str]:
    """Where ``got`` first differs from ``expected`` (the base), or None when they are equal."""
    if got == expected:
        return None
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return f"row {i} is key {a!r} here, {b!r} in the base ({len(got)} rows here, {len(expected)} there)"
    shorter, extra = ("here", expected[len(got)]) if len(got) < len(expected) else ("in the base", got[len(expected)])
    return f"{len(got)} rows here, {len(expected)} in the base: key {extra!r} is missing {shorter}"


def webdataset_key(member: str) -> str:
    """webdataset's rule: a member's key is its path up to the first dot of its file name."""
    slash = member.rfind("/")
    dot = member.find(".", slash + 1)
    return member if dot < 0 else member[:dot]


def base_keys(tar_url: str, storage_options: Optional[dict[str, Any]] = None) -> list[str]:
    """The keys of a base shard's samples in order: its status table's successes (ours and
    img2dataset's list them in tar order) when it has one, else the tar's member names."""
    folder, name = posixpath.split(tar_url)
    directory = Directory(folder, storage_options)
    table = f"{name.rsplit('.', 1)[0]}.parquet"
    if directory.exists(table):
        with directory.open(table) as f:
            if {schema.KEY, schema.STATUS} <= set(pq.read_schema(f).names):
                f.seek(0)
                rows = pq.read_table(f, columns=[schema.KEY, schema.STATUS]).to_pydict()
                return [str(k) for k, s in zip(rows[schema.KEY], rows[schema.STATUS]) if s == schema.SUCCESS]
    keys: list[str] = []
    with directory.open(name) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isfile() and (key := webdataset_key(member.name)) != (keys[-1] if keys else None):
                keys.append(key)
    return keys

"""Existing WebDataset shards as a job's input (``input.shards``): no download, the media come
from the tars.

Entries are local folders (their ``*.tar``, sorted), globs, brace patterns
(``shards/{00000..00009}.tar``, as webdataset writes them) or fsspec URLs. Each sample of a tar is
one input row, in tar order. Its ``files`` are the tar's members but ``json`` and ``txt`` (the sink
writes those again from the columns) and :data:`schema.INPUT_MEMBERS` names the members that came
from the tar. Its columns come from, in this order:

* the shard's status table ``NNNNN.parquet`` beside the tar (mmcurate's own output and
  img2dataset's share that layout): the row with the sample's key, every column; a sample whose
  row is not ``success`` there is not input;
* else ``KEY.json`` (img2dataset's and most writers' per-sample metadata) and ``KEY.txt`` (the
  caption); width and height from the image header when neither gives them.

Such rows are valid by construction (a missing URL is no fault: the media are already here); a
sample without an image or video member is an ``invalid_input`` row saying so. A tar that cannot
be read to its end (truncated, a bad header) keeps the samples read before the damage, and the
job log names it; it never fails the job.

Layouts: ``full`` cuts the rows into shards of ``samples_per_shard`` (a reshard) with fresh keys
and keeps the lineage in ``source_key`` / ``source_shard``; ``sidecar`` keeps one input shard per
tar, with the tar's number as shard id and the source keys, so new fields align with the old tars.

The tar walk is Python's ``tarfile`` (sources is below the loader, whose reader is for trainers).
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from typing import Any, Iterator, Optional

import braceexpand
import fsspec
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.location import is_remote
from pipeline.core.schema import Batch, ErrorKind
from pipeline.sources.shards import InputShard, _json_value, _text

log = logging.getLogger(__name__)

SOURCE_KEY = "source_key"      # the sample's key in the input shards (full layout)
SOURCE_SHARD = "source_shard"  # the input tar it came from, as listed by expand_shards
LINEAGE_TYPES = {SOURCE_KEY: "string", SOURCE_SHARD: "string"}
REGENERATED = ("json", "txt")  # members the sink writes again from the columns
DROPPED = (schema.STATUS, schema.ERROR_KIND, schema.ERROR_MESSAGE, "key")  # the source's own outcome
_NUMBERED = re.compile(r"(\d+)\.tar$")


# -- which tars ----------------------------------------------------------------------------------
def expand_shards(entries: list[str], storage_options: Optional[dict[str, Any]] = None) -> list[str]:
    """The tars ``input.shards`` names, in order: each entry brace-expanded, then a folder becomes
    its ``*.tar`` (sorted), a glob its matches (sorted); anything else is one tar. An entry that
    yields none is a ConfigError naming it."""
    out: list[str] = []
    for entry in entries:
        for one in braceexpand.braceexpand(entry):
            found = _expand_one(one, storage_options)
            if not found:
                raise ConfigError(f"input.shards: {one!r} holds no .tar file")
            out.extend(found)
    return out


def _filesystem(path: str, storage_options: Optional[dict[str, Any]]):
    options = dict(storage_options or {}) if is_remote(path) else {}
    return fsspec.core.url_to_fs(path, **options)


def _expand_one(entry: str, storage_options: Optional[dict[str, Any]]) -> list[str]:
    if entry.startswith(("http://", "https://")):
        return [entry]
    local = "://" not in entry
    path_in = os.path.abspath(os.path.expanduser(entry)) if local else entry
    fs, path = _filesystem(path_in, storage_options)
    prefix = "" if local else entry.split("://", 1)[0] + "://"
    if any(c in entry for c in "*?["):
        found = sorted(p for p in fs.glob(path) if p.endswith(".tar"))
    elif fs.isdir(path):
        found = sorted(p for p in fs.glob(path.rstrip("/") + "/*.tar"))
    else:
        return [path_in]
    return [p if "://" in p or not prefix else prefix + p for p in found]


def shard_number(tar: str, position: int) -> int:
    """The shard id of a tar: the number in ``NNNNN.tar``, else its position in the list."""
    m = _NUMBERED.search(os.path.basename(tar))
    return int(m.group(1)) if m else position


# -- one tar -------------------------------------------------------------------------------------
def read_samples(tar: str, storage_options: Optional[dict[str, Any]] = None
                 ) -> tuple[list[tuple[str, dict[str, bytes]]], Optional[str]]:
    """The samples of ``tar`` in order (key, {extension: bytes}) and, when the tar could not be read
    to its end, why (the samples before the damage are kept; the one it cut is dropped)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    problem = None
    try:
        fs, path = _filesystem(tar, storage_options)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if base.startswith(".") or "." not in base:
                    continue
                key, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(member.name), key)
                data = archive.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                if samples and samples[-1][0] == key:
                    samples[-1][1][ext.lower()] = data
                else:
                    samples.append((key, {ext.lower(): data}))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if samples:
            samples.pop()  # the sample being read when the tar broke may be missing members
    return samples, problem


def _status_rows(tar: str, storage_options: Optional[dict[str, Any]]) -> Optional[dict[str, dict]]:
    """The rows of the status table beside ``tar`` by key, or None when it has none."""
    table_path = tar[:-len(".tar")] + ".parquet" if tar.endswith(".tar") else None
    if table_path is None:
        return None
    fs, path = _filesystem(table_path, storage_options)
    try:
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f).to_pylist()
    except (OSError, ValueError) as e:
        log.warning("input.shards: cannot read %s (%s); using the tar's own metadata", table_path, e)
        return None
    return {str(r["key"]): r for r in rows if "key" in r}


def _columns_of(key: str, files: dict[str, bytes], table: Optional[dict[str, dict]]) -> Optional[dict]:
    """The row's columns (see the module docstring); None when the table says it is no input."""
    if table is not None:
        row = table.get(os.path.basename(key))
        if row is None or row.get(schema.STATUS, schema.SUCCESS) != schema.SUCCESS:
            return None
        cols = {k: v for k, v in row.items() if k not in DROPPED}
    else:
        cols = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"])
                if isinstance(meta, dict):
                    cols = {k: v for k, v in meta.items() if k not in DROPPED}
            except ValueError:
                pass
    if cols.get(schema.CAPTION) is None and "txt" in files:
        cols[schema.CAPTION] = files["txt"].decode("utf-8", "replace")
    if cols.get(schema.WIDTH) is None or cols.get(schema.HEIGHT) is None:
        size = _image_size(files)
        if size:
            cols[schema.WIDTH], cols[schema.HEIGHT] = size
    return cols


def _image_size(files: dict[str, bytes]) -> Optional[tuple[int, int]]:
    from pipeline.media.image_open import open_image

    data = schema.image_of(files)
    if data is None:
        return None
    try:
        return open_image(data).size  # the header only: nothing is decoded
    except Exception:  # an undecodable image: the filters that decode it say so per row
        return None


def tar_rows(tar: str, storage_options: Optional[dict[str, Any]] = None, media_only: bool = False) -> Iterator[dict]:
    """One dict per input sample of ``tar``: columns, ``files``, the input members, the lineage.
    ``media_only`` (the sidecar layout) leaves the other members in the base: a stage that writes
    one of their names again (a new ``clip.npy``) then writes it to the sidecar."""
    samples, problem = read_samples(tar, storage_options)
    if problem:
        log.warning("input.shards: %s is damaged after %d samples (%s); the rest is not read",
                    tar, len(samples), problem)
    table = _status_rows(tar, storage_options)
    for key, members in samples:
        cols = _columns_of(key, members, table)
        if cols is None:
            continue
        files = {e: b for e, b in members.items()
                 if e not in REGENERATED and (not media_only or schema.is_media(e))}
        yield {**cols, schema.FILES: files, schema.INPUT_MEMBERS: tuple(sorted(files)),
               SOURCE_KEY: os.path.basename(key), SOURCE_SHARD: tar}


# -- input shards --------------------------------------------------------------------------------
def plan_shard_input(tars: list[str], samples_per_shard: int, layout: str = "full",
                     limit: Optional[int] = None,
                     storage_options: Optional[dict[str, Any]] = None) -> Iterator[InputShard]:
    """Input shards over the samples of ``tars`` (the first ``limit`` only, when set): ``full`` cut
    by ``samples_per_shard`` with fresh keys, ``sidecar`` one per tar with the source keys."""
    seen = 0
    if layout == "sidecar":
        for position, tar in enumerate(tars):
            rows = []
            for row in tar_rows(tar, storage_options, media_only=True):
                if limit is not None and seen >= limit:
                    break
                rows.append(row)
                seen += 1
            keys = [r[SOURCE_KEY] for r in rows]
            for r in rows:  # the keys are the source's: no lineage columns to keep
                r.pop(SOURCE_KEY), r.pop(SOURCE_SHARD)
            yield _shard(shard_number(tar, position), rows, keys)
            if limit is not None and seen >= limit:
                return
        return
    shard_id, rows = 0, []
    for tar in tars:
        for row in tar_rows(tar, storage_options):
            if limit is not None and seen >= limit:
                break
            rows.append(row)
            seen += 1
            if len(rows) == samples_per_shard:
                yield _shard(shard_id, rows, _fresh_keys(shard_id, len(rows), samples_per_shard))
                shard_id, rows = shard_id + 1, []
    if rows:
        yield _shard(shard_id, rows, _fresh_keys(shard_id, len(rows), samples_per_shard))


def _fresh_keys(shard_id: int, n: int, size: int) -> list[str]:
    return [schema.make_key(shard_id, i, size) for i in range(n)]


def _shard(shard_id: int, rows: list[dict], keys: list[str]) -> InputShard:
    n = len(rows)
    batch: Batch = {schema.KEY: keys, schema.STATUS: [schema.PENDING] * n,
                    schema.ERROR_KIND: [None] * n, schema.ERROR_MESSAGE: [None] * n}
    for c in schema.STATUS_COLUMNS:
        batch.setdefault(c, [None] * n)
    raw = (schema.FILES, schema.INPUT_MEMBERS)  # bytes and tuples as read, not JSON values
    for name in dict.fromkeys(k for r in rows for k in r):
        if name in (schema.KEY, schema.STATUS, schema.ERROR_KIND, schema.ERROR_MESSAGE):
            continue
        if name in (schema.URL, schema.CAPTION):
            batch[name] = [_text(r.get(name)) for r in rows]
        else:
            batch[name] = [r.get(name) if name in raw else _json_value(r.get(name)) for r in rows]
    for i, r in enumerate(rows):
        if not any(schema.is_media(e) for e in r[schema.FILES]):
            schema.mark(batch, i, ErrorKind.MALFORMED_ROW,
                        f"sample {r.get(SOURCE_KEY, batch[schema.KEY][i])} of the input shards has no image or video member "
                        f"(members read: {', '.join(r[schema.INPUT_MEMBERS]) or 'none'})")
    return InputShard(shard_id, batch)


"""A base dataset read together with sidecars (``output.layout: sidecar``), zipped by key.

    ds = ShardDataset("out/base", sidecars=["out/clip", "out/tokens"], fields=["jpg", "clip.npy", "json"])

:func:`with_sidecars` turns the base's :class:`Source` into one whose shards carry their sidecars
(a :class:`Zip`), so it plans, splits over ranks and resumes like any source (it can be one source
of a weighted mix). Rules:

* a base sample is kept when every sidecar's status table says ``success`` for it; a shard's count is
  the number kept, so epochs stay exact (from the sidecars' status tables, read once when the
  dataset is built);
* members merge: a sidecar member replaces a base member of the same field, two ``json`` objects
  merge (the sidecar's values win), sidecars in the order given;
* a sidecar must match its base, or it is refused with :class:`SidecarMismatchError` naming the
  sidecar, the shard and the key: it must say ``layout: sidecar``, list as many shards with the same
  base shard names in the same order, have one status row per base sample and, where the base has a
  status table, the base's keys in order; when the shards are read, every zipped key is checked
  again (that error is raised, never skipped: it is the wrong data, not damaged data).
"""
from __future__ import annotations

import contextlib
import json
import posixpath
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow.parquet as pq

from pipeline.loader.index import BadIndexError, Shard, Source, _join, _open, open_source, read_index
from pipeline.loader.tar import READ_BLOCK, SCAN_BLOCK, SampleFiles, _samples, _TarReader

LAYOUT = "sidecar"  # as pipeline.sinks.sidecar writes it


class SidecarMismatchError(BadIndexError):
    """A sidecar is not aligned with its base (shards, counts or keys); the message names which."""


@dataclass(frozen=True)
class Side:
    """One sidecar's part of one base shard."""

    root: str      # the sidecar dataset, for messages
    url: str       # its tar (the successes, in base order)
    success: bytes  # packed bits, one per base sample: in this sidecar's tar


@dataclass(frozen=True)
class Zip:
    """How one base shard is zipped with its sidecars."""

    rows: int                  # samples in the base shard
    kept: bytes                # packed bits, one per base sample: a success in every sidecar
    sides: tuple[Side, ...]


def _bits(packed: bytes, rows: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(packed, np.uint8), count=rows).astype(bool)


def _table_url(tar_url: str) -> str:
    return tar_url[:-4] + ".parquet" if tar_url.endswith(".tar") else tar_url + ".parquet"


def _read_rows(url: str, storage_options: Optional[dict]) -> Optional[dict[str, list]]:
    """The key and status columns of a status table, or None when there is none with them."""
    try:
        with _open(url, storage_options) as f:
            if not {"key", "status"} <= set(pq.read_schema(f).names):
                return None
            f.seek(0)
            return pq.read_table(f, columns=["key", "status"]).to_pydict()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # pyarrow's errors are ValueErrors and OSErrors
        raise BadIndexError(f"{url}: status table cannot be read ({type(e).__name__}: {e})") from None


# -- opening ---------------------------------------------------------------------------------------
def with_sidecars(base: Union[str, Source], sidecars: Sequence[str], storage_options: Optional[dict] = None,
                  allow_outside_root: bool = False) -> Source:
    """The base's source with every shard zipped with its part of each sidecar (see the module)."""
    src = open_source(base, storage_options, allow_outside_root)
    if not sidecars:
        return src
    if any(s.zipped is not None for s in src.shards):
        raise ValueError(f"{src.root}: already zipped with sidecars; pass them all at once")
    base_keys: dict[int, Optional[list[str]]] = {}
    sides = [_sidecar(src, str(root), storage_options, allow_outside_root, base_keys) for root in sidecars]
    shards = []
    for i, shard in enumerate(src.shards):
        parts = tuple(side[i] for side in sides)
        kept = np.logical_and.reduce([_bits(p.success, shard.nsamples) for p in parts])
        shards.append(replace(shard, nsamples=int(kept.sum()),
                              zipped=Zip(shard.nsamples, np.packbits(kept).tobytes(), parts)))
    return Source(src.root, tuple(shards))


def _sidecar(base: Source, root: str, storage_options: Optional[dict], allow_outside_root: bool,
             base_keys: dict[int, Optional[list[str]]]) -> list[Side]:
    """The sidecar at ``root``, per base shard, once it is checked to match the base."""
    root = root.rstrip("/") or "/"
    index_url = _join(root, "index.json")
    try:
        with _open(index_url, storage_options) as f:
            index = json.loads(f.read())
    except FileNotFoundError:
        raise SidecarMismatchError(f"sidecar {root}: no index.json (a sidecar's index names its base)") from None
    except (ValueError, RecursionError) as e:
        raise BadIndexError(f"{index_url}: not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or index.get("layout") != LAYOUT:
        got = index.get("layout") if isinstance(index, dict) else None
        raise SidecarMismatchError(f"sidecar {root}: {index_url} says layout {got!r}, not {LAYOUT!r}: "
                                   f"it is not a sidecar (output.layout: sidecar writes one)")
    shards = read_index(root, storage_options, allow_outside_root).shards
    entries = index["shardlist"]
    if len(shards) != len(base.shards):
        raise SidecarMismatchError(f"sidecar {root} has {len(shards)} shards, its base {base.root} has "
                                   f"{len(base.shards)}: {_shard_names_differ(entries, base)}")
    return [_side(root, i, entry, shard, base, storage_options, base_keys)
            for i, (entry, shard) in enumerate(zip(entries, shards))]


def _shard_names_differ(entries: list, base: Source) -> str:
    names = [posixpath.basename(str(e.get("base", ""))) for e in entries if isinstance(e, dict)]
    theirs = [posixpath.basename(s.url) for s in base.shards]
    missing, extra = sorted(set(theirs) - set(names)), sorted(set(names) - set(theirs))
    return f"base shards without a sidecar shard: {missing[:5] or 'none'}; sidecar shards of other base shards: " \
           f"{extra[:5] or 'none'}"


def _side(root: str, i: int, entry: dict, shard: Shard, base: Source, storage_options: Optional[dict],
          base_keys: dict[int, Optional[list[str]]]) -> Side:
    base_shard = base.shards[i]
    where = f"sidecar {root}: shard {posixpath.basename(shard.url)}"
    named = entry.get("base")
    if not isinstance(named, str) or posixpath.basename(named) != posixpath.basename(base_shard.url):
        raise SidecarMismatchError(f"{where} was made from base shard {named!r}, but shard {i} of the base "
                                   f"{base.root} is {base_shard.url}")
    rows = _read_rows(_table_url(shard.url), storage_options)
    if rows is None:
        raise SidecarMismatchError(f"{where}: no status table with key and status ({_table_url(shard.url)})")
    keys, statuses = rows["key"], rows["status"]
    if len(keys) != base_shard.nsamples:
        raise SidecarMismatchError(f"{where} has {len(keys)} status rows, its base shard {base_shard.url} "
                                   f"{base_shard.nsamples} samples")
    if i not in base_keys:
        base_rows = _read_rows(_table_url(base_shard.url), storage_options)
        base_keys[i] = None if base_rows is None else [
            k for k, s in zip(base_rows["key"], base_rows["status"]) if s == "success"]
    expected = base_keys[i]
    if expected is not None and keys != expected:
        at = next((j for j, (a, b) in enumerate(zip(keys, expected)) if a != b), min(len(keys), len(expected)))
        raise SidecarMismatchError(f"{where}: row {at} is key {_at(keys, at)!r}, the base shard {base_shard.url} "
                                   f"has {_at(expected, at)!r} there")
    success = np.array([s == "success" for s in statuses], dtype=bool)
    if int(success.sum()) != shard.nsamples:
        raise SidecarMismatchError(f"{where}: its status table has {int(success.sum())} successes, its "
                                   f"index.json {shard.nsamples} samples")
    return Side(root, shard.url, np.packbits(success).tobytes())


def _at(keys: list, j: int) -> Optional[str]:
    return keys[j] if j < len(keys) else None


# -- reading ---------------------------------------------------------------------------------------
def zipped_samples(shard: Shard, start: int, stop: Optional[int], want: Optional[Mapping[str, str]],
                   storage_options: Optional[dict], fast: bool = False) -> Iterator[tuple[str, SampleFiles]]:
    """``(key, files)`` of kept samples ``start:stop`` of a zipped shard (``stop`` None: to the end),
    the base's members merged with each sidecar's. Fewer come when a tar ends early."""
    zipped = shard.zipped
    kept = _bits(zipped.kept, zipped.rows)
    positions = np.flatnonzero(kept)[start:stop]
    if not len(positions):
        return
    lo, hi = int(positions[0]), int(positions[-1]) + 1  # base samples lo:hi hold the slice
    with contextlib.ExitStack() as stack:
        base = _samples(_TarReader(stack.enter_context(_open(shard.url, storage_options)),
                                   SCAN_BLOCK if fast else READ_BLOCK), lo, hi, want, fast)
        sides = []
        for side in zipped.sides:
            success = _bits(side.success, zipped.rows)
            first = int(success[:lo].sum())  # its tar holds only its successes
            reader = _TarReader(stack.enter_context(_open(side.url, storage_options)))
            sides.append((side, success, _samples(reader, first, first + int(success[lo:hi].sum()), want)))
        for j, (key, files) in enumerate(base, start=lo):
            merged = dict(files)
            for side, success, stream in sides:
                if not success[j]:
                    continue
                got = next(stream, None)
                if got is None:
                    return  # the sidecar's tar ended early: the caller counts what is missing
                if got[0] != key:
                    raise SidecarMismatchError(f"sidecar {side.root}: shard {side.url} has key {got[0]!r} where "
                                               f"its base shard {shard.url} has {key!r}")
                if kept[j]:
                    _merge(merged, got[1])
            if kept[j]:
                yield key, merged


def _merge(files: SampleFiles, side: SampleFiles) -> None:
    """Sidecar members replace the base's; two JSON objects merge, the sidecar's values winning."""
    for field, (ext, data) in side.items():
        if ext == "json" and field in files and files[field][0] == "json":
            try:
                ours, theirs = json.loads(files[field][1]), json.loads(data)
            except ValueError:
                ours = theirs = None
            if isinstance(ours, dict) and isinstance(theirs, dict):
                data = json.dumps({**ours, **theirs}, ensure_ascii=False).encode("utf-8")
        files[field] = (ext, data)

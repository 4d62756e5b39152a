"""The columnar read of ``.npy`` fields: each shard's column file (``NNNNN.columns.arrow``, written
beside its tar by the sink, see ``pipeline.sinks.columnar``) memory-mapped, and each batch gathered
from it with a few array copies, no per-sample Python objects and no tar walk.

It yields what the tar path yields (``ShardDataset._batches``): the same samples, in the same
order (the plan's draws, the same shuffle windows, the same resume point), the same values,
``__key__``, ``__url__``, ``__worker__`` and ``__step__``. Field types differ in one way: a field
whose arrays all have one shape in every shard is one tensor ``(B, *shape)`` (as in the tar
path), any other is **ragged**, always, as a dict of tensors: ``values`` (every sample's values,
flat, concatenated), ``offsets`` (int64, ``B + 1``: sample ``i`` is ``values[offsets[i]:offsets[i+1]]``)
and ``shapes`` (int64, ``(B, ndim)``), where the tar path gives a list of tensors or, when a batch
happens to be one shape, a tensor.

:func:`columnar_fields` decides, when the dataset is built, whether a dataset can be read this way:
batches, every field one ``.npy`` extension, decoded without a custom decoder, and every non-empty
shard with a column file that holds the fields, as many rows as ``index.json`` counts and that was
made with a tar of the size found (a column file beside another tar is never read). On document
shards that is the documents' own members (``sequence.npy``, ``spans.npy``); a document slot's
member (``image_003.image_ids.npy``) has no column and is read from the tars. By default
(``columnar=None``) ragged fields are read from the tars, so batches keep their types; with
``columnar=True`` they come as above. Sidecar zips are not read this way (refused when asked for):
their kept rows and merges are the tar path's.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import torch

from pipeline.core.location import local_path
from pipeline.loader.decode import batch_tensor
from pipeline.loader.index import Shard, Source, _open
from pipeline.loader.plan import draw_arrays, window_order
from pipeline.sinks.columnar import FORMAT_VERSION, KEY, SHAPE_SUFFIX, SUFFIX, slot_member

OPEN_FILES = 16  # column files kept open per worker (a worker reads its shards one after another)


class ColumnFileError(ValueError):
    """A column file is not what its shard needs (the message names the file and why)."""


@dataclass(frozen=True)
class FieldLayout:
    """How one output field is stored in every shard: ``shape`` for fixed, ``ndim`` for ragged."""

    ext: str
    dtype: str
    shape: Optional[tuple[int, ...]]
    ndim: int


def column_url(tar_url: str) -> str:
    return (tar_url[:-4] if tar_url.endswith(".tar") else tar_url) + SUFFIX


def _read_file(url: str, storage_options: Optional[dict]) -> pa.ipc.RecordBatchFileReader:
    path = local_path(url)
    if path is not None:
        return pa.ipc.open_file(pa.memory_map(path, "r"))
    with _open(url, storage_options) as f:  # an object store: one read of the whole file
        return pa.ipc.open_file(pa.py_buffer(f.read()))


def _read_schema(url: str, storage_options: Optional[dict]) -> pa.Schema:
    """The schema alone: on an object store, ranged reads of the footer, not the whole file."""
    if local_path(url) is not None:
        return _read_file(url, storage_options).schema
    with _open(url, storage_options) as f:
        return pa.ipc.open_file(pa.PythonFile(f, mode="r")).schema


def _field_meta(schema: pa.Schema, ext: str, url: str) -> tuple[str, Optional[tuple[int, ...]], int]:
    meta = schema.field(ext).metadata or {}
    layout, dtype = meta.get(b"layout"), meta.get(b"dtype", b"").decode()
    if layout == b"fixed":
        shape = tuple(json.loads(meta[b"shape"]))
        return dtype, shape, len(shape)
    if layout == b"ragged" and ext + SHAPE_SUFFIX in schema.names:
        return dtype, None, int(meta[b"ndim"])
    raise ColumnFileError(f"{url}: field {ext!r} has layout {layout!r}")


def _check_schema(schema: pa.Schema, shard: Shard, url: str, exts: Sequence[str]) -> None:
    meta = schema.metadata or {}
    if meta.get(b"mmcurate.columns") != FORMAT_VERSION.encode():
        raise ColumnFileError(f"{url}: format {meta.get(b'mmcurate.columns')!r}, not {FORMAT_VERSION!r}")
    if int(meta.get(b"rows", -1)) != shard.nsamples:
        raise ColumnFileError(f"{url}: {int(meta.get(b'rows', -1))} rows, index.json counts {shard.nsamples}")
    if shard.filesize is not None and int(meta.get(b"tar_bytes", -1)) != shard.filesize:
        raise ColumnFileError(f"{url}: made with a tar of {meta.get(b'tar_bytes')!r} bytes, {shard.url} has "
                              f"{shard.filesize}")
    missing = [e for e in exts if e not in schema.names]
    if missing:
        raise ColumnFileError(f"{url}: no column {missing} (not in the tar, or stored there only: "
                              f"{json.loads(meta.get(b'not_columnar', b'[]'))})")


def columnar_fields(sources: Sequence[Source], want: Optional[Mapping[str, str]], batch_size: Optional[int],
                    decode: bool, decoders: Mapping[str, Any], storage_options: Optional[dict],
                    ragged: bool = True) -> Union[dict[str, FieldLayout], str]:
    """Field -> layout when the dataset can be read from its column files, else why not. Without
    ``ragged``, a ragged field is a reason not to (its batches would not be the tar path's lists)."""
    if not batch_size:
        return "columnar reads need batch_size"
    if want is None:
        return "columnar reads need fields (every one a .npy member)"
    if len(set(want.values())) != len(want):
        return "a field with more than one extension is read from the tars"
    if not decode or set(decoders) & set(want.values()):
        return "columnar reads decode .npy fields themselves (decode=True, no decoders for them)"
    not_npy = sorted(e for e in want if e.rsplit(".", 1)[-1] != "npy")
    if not_npy:
        return f"fields {not_npy} are not .npy members"
    per_slot = sorted(e for e in want if slot_member(e))
    if per_slot:
        return (f"field {per_slot[0]!r} is a per-slot member of documents ({slot_member(per_slot[0])}): it is in "
                f"the tars only; the column file holds each document's own members (sequence.npy, spans.npy)")
    found: dict[str, set] = {ext: set() for ext in want}
    for src in sources:
        for shard in src.shards:
            if shard.zipped is not None:
                return f"{src.root} is zipped with sidecars: read from the tars"
            if not shard.nsamples:
                continue
            url = column_url(shard.url)
            try:
                schema = _read_schema(url, storage_options)
                _check_schema(schema, shard, url, list(want))
                for ext in want:
                    found[ext].add(_field_meta(schema, ext, url))
            except (OSError, ValueError, KeyError) as e:  # missing, unreadable or not for this tar
                return f"{type(e).__name__}: {e}"
    layouts = {}
    for ext, metas in found.items():
        if not metas:
            return "no samples"
        dtypes, ranks, shapes = {m[0] for m in metas}, {m[2] for m in metas}, {m[1] for m in metas}
        if len(dtypes) > 1 or len(ranks) > 1:
            return f"field {ext!r} has dtypes {sorted(dtypes)} and ranks {sorted(ranks)} across shards"
        shape = shapes.pop() if len(shapes) == 1 and None not in shapes else None  # else ragged
        if shape is None and not ragged:
            return (f"field {want[ext]!r} ({ext}) is ragged: its batches are values + offsets + shapes, not the "
                    f"tar path's lists; pass columnar=True for them")
        layouts[want[ext]] = FieldLayout(ext, dtypes.pop(), shape, ranks.pop())
    return layouts


# -- one shard's columns ---------------------------------------------------------------------------
def _view(array: pa.Array, dtype: np.dtype, count: int) -> np.ndarray:
    """A primitive array's values, zero-copy (``to_numpy`` would import pandas: seconds per worker)."""
    if array.null_count:
        raise ColumnFileError(f"{array.null_count} null values")
    return np.frombuffer(array.buffers()[1], dtype, count, array.offset * dtype.itemsize)


def _one_chunk(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)  # the sink writes one record batch; combining would copy the file
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


class _Field:
    """One field of one column file: its flat values, per-sample offsets and shapes (numpy views)."""

    def __init__(self, table: pa.Table, ext: str, dtype: np.dtype, rows: int, url: str) -> None:
        column = _one_chunk(table, ext)
        self.values = _view(column.values, dtype, len(column.values))
        meta = table.schema.field(ext).metadata
        if meta[b"layout"] == b"fixed":
            self.shape = tuple(json.loads(meta[b"shape"]))
            self.size = column.type.list_size
            if len(self.values) != rows * self.size or int(np.prod(self.shape)) != self.size:
                raise ColumnFileError(f"{url}: {ext!r} holds {len(self.values)} values, not {rows} x {self.shape}")
            self.offsets = np.arange(rows + 1, dtype=np.int64) * self.size
            self.shapes = np.broadcast_to(np.array(self.shape, np.int64), (rows, len(self.shape)))
        else:
            self.shape, self.size = None, None
            self.offsets = _view(column, np.dtype(np.int64), rows + 1)
            shapes = _one_chunk(table, ext + SHAPE_SUFFIX).values
            self.shapes = _view(shapes, np.dtype(np.int64), len(shapes)).reshape(rows, -1)
            if (len(self.offsets) != rows + 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.values)
                    or (np.diff(self.offsets) < 0).any() or (self.shapes.prod(axis=1) != np.diff(self.offsets)).any()):
                raise ColumnFileError(f"{url}: {ext!r} has offsets or shapes that do not fit its values")


class ColumnFile:
    """A shard's column file, mapped (local) or read once (object store), checked against its shard."""

    def __init__(self, shard: Shard, layouts: Mapping[str, FieldLayout], storage_options: Optional[dict]) -> None:
        self.url = column_url(shard.url)
        reader = _read_file(self.url, storage_options)
        _check_schema(reader.schema, shard, self.url, [f.ext for f in layouts.values()])
        table = reader.read_all()
        if table.num_rows != shard.nsamples:
            raise ColumnFileError(f"{self.url}: {table.num_rows} rows, index.json counts {shard.nsamples}")
        self.keys = np.array(table.column(KEY).to_pylist(), dtype=object)
        self.fields = {name: _Field(table, f.ext, np.dtype(f.dtype), shard.nsamples, self.url)
                       for name, f in layouts.items()}


# -- gathering a batch -----------------------------------------------------------------------------
def _groups(shards: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(shard, positions in the batch) per shard of the batch."""
    if shards[0] == shards[-1] and (shards == shards[0]).all():
        return [(int(shards[0]), np.arange(len(shards)))]
    return [(int(s), np.flatnonzero(shards == s)) for s in np.unique(shards)]


def _run(rows: np.ndarray) -> Optional[int]:
    """The first row when ``rows`` are consecutive and ascending (a slice copies fastest)."""
    return int(rows[0]) if rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all() else None


def _torch_dtype(dtype: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, np.dtype(dtype))).dtype


def _gather_fixed(parts: list[tuple[_Field, np.ndarray, np.ndarray]], n: int, layout: FieldLayout) -> torch.Tensor:
    out = batch_tensor((n, *layout.shape), _torch_dtype(layout.dtype))
    flat = out.numpy().reshape(n, -1)
    for field, at, rows in parts:
        values = field.values.reshape(-1, field.size)
        first = _run(rows)
        if first is not None and len(at) == n:
            flat[:] = values[first:first + n]
        else:
            flat[at] = values[rows]
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + l) for s, l in zip(starts, lengths)])``, without the loop."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total, dtype=np.int64)


def _gather_ragged(parts: list[tuple[_Field, np.ndarray, np.ndarray]], n: int, layout: FieldLayout) -> dict:
    lengths = np.empty(n, np.int64)
    shapes = batch_tensor((n, layout.ndim), torch.int64)
    for field, at, rows in parts:
        lengths[at] = field.offsets[rows + 1] - field.offsets[rows]
        shapes.numpy()[at] = field.shapes[rows]
    offsets = batch_tensor((n + 1,), torch.int64)
    offsets.numpy()[0] = 0
    np.cumsum(lengths, out=offsets.numpy()[1:])
    values = batch_tensor((int(offsets[-1]),), _torch_dtype(layout.dtype))
    out = values.numpy()
    for field, at, rows in parts:
        first = _run(rows)
        if first is not None and len(at) == n:
            out[:] = field.values[field.offsets[first]:field.offsets[first + n]]
        else:
            out[_ranges(offsets.numpy()[at], lengths[at])] = field.values[_ranges(field.offsets[rows], lengths[at])]
    return {"values": values, "offsets": offsets, "shapes": shapes}


class ColumnReader:
    """One worker's batches from the column files (``dataset`` is the :class:`ShardDataset`)."""

    def __init__(self, dataset: Any, layouts: Mapping[str, FieldLayout]) -> None:
        self.ds, self.layouts = dataset, dict(layouts)
        self.shards = [shard for src in dataset.sources for shard in src.shards]
        self.files: OrderedDict[int, Optional[ColumnFile]] = OrderedDict()

    def _file(self, k: int) -> Optional[ColumnFile]:
        if k in self.files:
            self.files.move_to_end(k)
            return self.files[k]
        try:
            opened: Optional[ColumnFile] = ColumnFile(self.shards[k], self.layouts, self.ds.storage_options)
        except (OSError, ValueError, KeyError) as e:  # changed since the dataset was built
            self.ds._problem(f"shard {self.shards[k].url}: {type(e).__name__}: {e}; skipping its samples", e)
            opened = None
        self.files[k] = opened
        if len(self.files) > OPEN_FILES:
            self.files.popitem(last=False)
        return opened

    def _steps(self, worker: int, num_workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(steps, shards, rows) chunks of this worker's undelivered steps, in step order."""
        ds = self.ds
        plan = ds.plan(worker, num_workers)
        first = ds._consumed.get(worker, 0)
        if first >= plan.steps:
            return
        if not ds.shuffle:
            step = first
            for shards, rows in draw_arrays(plan, ds.sources, ds.seed, False, first):
                yield np.arange(step, step + len(rows)), shards, rows
                step += len(rows)
            return
        window = ds.shuffle_buffer
        w0 = first // window
        chunks = draw_arrays(plan, ds.sources, ds.seed, True, w0 * window)
        pending = [np.empty(0, np.int64), np.empty(0, np.int64)]
        for w in range(w0, -(-plan.steps // window)):
            n = min(window, plan.steps - w * window)
            while len(pending[1]) < n:
                more = next(chunks)
                pending = [np.concatenate([pending[0], more[0]]), np.concatenate([pending[1], more[1]])]
            order = window_order(ds.seed, ds.epoch, ds.rank, worker, w, n)
            skip = first - w * window if w == w0 else 0
            yield (np.arange(w * window + skip, w * window + n), pending[0][:n][order][skip:],
                   pending[1][:n][order][skip:])
            pending = [pending[0][n:], pending[1][n:]]

    def batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Batches of the steps ``[j * batch_size, (j + 1) * batch_size)``, as the tar path cuts them."""
        size = self.ds.batch_size
        buf: list[list[np.ndarray]] = [[], [], []]
        held = 0
        for chunk in self._steps(worker, num_workers):
            for part, a in zip(buf, chunk):
                part.append(a)
            held += len(chunk[0])
            steps, shards, rows = (np.concatenate(p) for p in buf)
            cuts = np.flatnonzero((steps + 1) % size == 0) + 1
            start = 0
            for cut in cuts:
                batch = self.gather(steps[start:cut], shards[start:cut], rows[start:cut], worker)
                start = cut
                if batch is not None:
                    yield batch
            buf, held = [[steps[start:]], [shards[start:]], [rows[start:]]], held - start
        if held:
            steps, shards, rows = (np.concatenate(p) for p in buf)
            batch = self.gather(steps, shards, rows, worker)
            if batch is not None:
                yield batch

    def gather(self, steps: np.ndarray, shards: np.ndarray, rows: np.ndarray, worker: int) -> Optional[dict]:
        groups = [(self._file(k), at) for k, at in _groups(shards)]
        if any(f is None for f, _ in groups):  # a shard that cannot be read: its samples are skipped
            keep = np.ones(len(steps), bool)
            for f, at in groups:
                if f is None:
                    keep[at] = False
            if not keep.any():
                return None
            steps, shards, rows = steps[keep], shards[keep], rows[keep]
            groups = [(self._file(k), at) for k, at in _groups(shards)]
        n = len(steps)
        batch: dict[str, Any] = {}
        for name, layout in self.layouts.items():
            parts = [(f.fields[name], at, rows[at]) for f, at in groups]
            batch[name] = _gather_fixed(parts, n, layout) if layout.shape is not None else \
                _gather_ragged(parts, n, layout)
        keys = np.empty(n, dtype=object)
        urls = np.empty(n, dtype=object)
        for (f, at), (k, _) in zip(groups, _groups(shards)):
            keys[at] = f.keys[rows[at]]
            urls[at] = self.shards[k].url
        batch["__key__"], batch["__url__"] = keys.tolist(), urls.tolist()
        batch["__worker__"], batch["__step__"] = [worker] * n, steps.tolist()
        return batch

"""The column file of a shard: its successes' ``.npy`` members (token ids, latents, embeddings) as
one Arrow IPC file, ``NNNNN.columns.arrow``, written beside the tar, so a trainer memory-maps it
and gathers a batch with a few array copies instead of walking tar headers sample by sample.

One record batch, one row per sample of the tar, in tar order:

* ``__key__`` (string): the sample's key, as in the tar;
* per ``.npy`` member extension (``text_ids.npy``), one column named after it. When every sample's
  array has one shape it is a ``FixedSizeList`` of the flat values (field metadata ``layout:
  fixed``, ``shape``); else a ``LargeList`` of the flat values (``layout: ragged``) plus a column
  ``EXT#shape`` holding each sample's shape. Field metadata ``dtype`` is the numpy dtype of the
  values (native byte order, as ``pipeline.media.npy.read_npy`` returns them).

Schema metadata: ``mmcurate.columns`` (the format version), ``rows``, ``tar_bytes`` (the size of
the tar it was made with: a reader refuses a column file beside another tar) and ``not_columnar``
(a JSON list of the ``.npy`` extensions in the tar that have no column here: some sample lacks the
member, one is not a valid ``.npy``, or its dtype has no Arrow type, so a reader must read them
from the tar) and ``slot_members`` (a JSON list of the per-slot ``.npy`` members of interleaved
documents in the tar, slot as ``NNN``: ``["image_NNN.image_ids.npy", "text_NNN.text_ids.npy"]``).
The file holds exactly the bytes the tar's members decode to: a reader of either gets the same arrays.

**Documents.** A document's per-slot members (``KEY.image_003.image_ids.npy``,
``KEY.text_001.text_ids.npy``, ``pipeline.core.document``) get no column: a slot's column would
exist only in the shards where every document has that slot, so no reader could count on it,
and their ids are in the document's ``sequence.npy`` already. They stay in the tar; the document's
own members (``sequence.npy``, ``spans.npy``) are columns as a pair's are.
"""
from __future__ import annotations

import json
import re
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline.core import document
from pipeline.media.npy import read_npy

FORMAT_VERSION = "1"
SUFFIX = ".columns.arrow"
KEY = "__key__"
SHAPE_SUFFIX = "#shape"  # the ragged field's per-sample shapes: column "EXT#shape"
# A document slot's member extension, as core/document.py names them (image_member, text_member).
SLOT_MEMBER = re.compile(rf"^({document.IMAGE}|{document.TEXT})_\d{{3,}}\.")


def slot_member(ext: str) -> Optional[str]:
    """``image_NNN.image_ids.npy`` for a document slot's member extension ``image_003.image_ids.npy``,
    else None."""
    m = SLOT_MEMBER.match(ext)
    return f"{m.group(1)}_NNN.{ext[m.end():]}" if m else None


def column_name(shard_name: str) -> str:
    return f"{shard_name}{SUFFIX}"


def _split(member: str) -> tuple[str, str]:
    """webdataset's rule: the key is the name up to the first dot of its file name."""
    slash = member.rfind("/")
    dot = member.find(".", slash + 1)
    return (member, "") if dot < 0 else (member[:dot], member[dot + 1:])


def _samples(members: Sequence[tuple[str, bytes]]) -> tuple[list[str], list[dict[str, bytes]]]:
    """The tar's samples in order (consecutive members of one key), each its npy members."""
    keys: list[str] = []
    npys: list[dict[str, bytes]] = []
    for name, data in members:
        key, ext = _split(name)
        if not keys or keys[-1] != key:
            keys.append(key)
            npys.append({})
        if ext.rsplit(".", 1)[-1] == "npy":
            npys[-1][ext] = data
    return keys, npys


def _column(arrays: list[np.ndarray]) -> Optional[tuple[dict[str, pa.Array], dict[str, str]]]:
    """One field's columns and field metadata, or None when its values have no Arrow type."""
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    if dtype.kind not in "iuf":  # bool is bit-packed in Arrow, complex has no type: read from the tar
        return None
    value_type = pa.from_numpy_dtype(dtype)
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.empty(0, dtype)
    values = pa.array(flat, type=value_type)
    shapes = {a.shape for a in arrays}
    meta = {"dtype": dtype.str}
    if len(shapes) == 1 and (shape := shapes.pop()) and 0 not in shape:
        size = int(np.prod(shape))
        return {"": pa.FixedSizeListArray.from_arrays(values, size)}, {**meta, "layout": "fixed",
                                                                       "shape": json.dumps(list(shape))}
    ndims = {a.ndim for a in arrays}
    if len(ndims) != 1 or not ndims or (ndim := ndims.pop()) == 0:
        return None  # one field is one kind of array: mixed ranks come from the tar
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    shape_values = pa.array(np.array([a.shape for a in arrays], np.int64).reshape(-1), type=pa.int64())
    return ({"": pa.LargeListArray.from_arrays(pa.array(offsets), values),
             SHAPE_SUFFIX: pa.FixedSizeListArray.from_arrays(shape_values, ndim)},
            {**meta, "layout": "ragged", "ndim": str(ndim)})


def column_file(members: Sequence[tuple[str, bytes]], tar_bytes: int) -> Optional[bytes]:
    """The column file of a tar made of ``members`` (``tar_bytes`` long), or None when no sample
    has a ``.npy`` member other than documents' per-slot ones."""
    keys, npys = _samples(members)
    found = {ext for sample in npys for ext in sample}
    slots = sorted({slot_member(ext) for ext in found} - {None})
    exts = sorted(ext for ext in found if slot_member(ext) is None)
    if not exts:
        return None
    fields, columns, not_columnar = [pa.field(KEY, pa.string())], [pa.array(keys, pa.string())], []
    for ext in exts:
        if not all(ext in sample for sample in npys):
            not_columnar.append(ext)
            continue
        try:
            made = _column([read_npy(sample[ext]) for sample in npys])
        except ValueError:  # not a .npy a reader can decode: the tar keeps it as it is
            made = None
        if made is None:
            not_columnar.append(ext)
            continue
        arrays, meta = made
        for suffix, array in arrays.items():
            fields.append(pa.field(ext + suffix, array.type, nullable=False, metadata=meta if not suffix else None))
            columns.append(array)
    if len(fields) == 1:
        return None  # no field has a column: the tar alone holds them
    schema = pa.schema(fields, metadata={"mmcurate.columns": FORMAT_VERSION, "rows": str(len(keys)),
                                         "tar_bytes": str(tar_bytes), "not_columnar": json.dumps(not_columnar),
                                         "slot_members": json.dumps(slots)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch(columns, schema=schema))  # one batch: each column contiguous
    return sink.getvalue().to_pybytes()

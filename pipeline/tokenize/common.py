"""What the tokenizer stages share: fingerprint ids and the stored array format."""
from __future__ import annotations

import hashlib
import io
import json
import struct

import numpy as np

FORMAT_VERSION = 1  # bump when a stage stores something differently for the same inputs
# Where a tokenizer came from, not what it computes: left out of the fingerprint id, so the same
# weights loaded from a local copy or the hub give the same id.
LOCATION_KEYS = ("id", "source", "revision", "subfolder")


def with_id(fingerprint: dict) -> dict:
    """The fingerprint plus ``id``: a short hash of everything that determines the outputs."""
    content = {k: v for k, v in fingerprint.items() if k not in LOCATION_KEYS}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    return {**fingerprint, "id": digest[:16]}


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocabularies and codebooks up to 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes (NPY 1.0), built directly: 1 µs instead of 8 µs per array,
    which is a third of the text stage's cost for short captions."""
    array = np.ascontiguousarray(array)
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (array.dtype.str, array.shape)
    header += " " * (-(len(header) + 11) % 64) + "\n"  # 10-byte preamble + header: a multiple of 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + array.tobytes()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)

"""What the tokenizer stages share: fingerprint ids and the dtype of stored ids."""
from __future__ import annotations

import hashlib
import json

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

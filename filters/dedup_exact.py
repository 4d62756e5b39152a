"""``dedup_exact``: drop images whose bytes (sha256) were already seen, across the whole job.

The first sample by key order is kept, so reruns and resumed runs agree: the executor feeds this
stage shards in shard order (``ordered``), rows within a shard are in key order, and ``resume``
rebuilds the seen set from the status tables of shards already on disk. Each examined row gets
``exact_group``: the key of the first sample with the same bytes (its own key when it is the first).
Memory: about 100 bytes per kept sample (a 16-byte digest prefix and its key).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from pipeline.core import schema
from pipeline.core.schema import Batch

from .base import Filter

GROUP = "exact_group"


@dataclass
class ExactDedupConfig:
    scope: Literal["job", "shard"] = "job"  # "shard": duplicates only within a shard, no shard order needed


def _digest(hex_sha256: str) -> bytes:
    return bytes.fromhex(hex_sha256)[:16]  # 128 bits: collisions are not a practical concern


class ExactDedupFilter(Filter):
    name = "dedup_exact"
    Config = ExactDedupConfig

    def __init__(self, config: ExactDedupConfig) -> None:
        super().__init__(config)
        self.first: dict[bytes, str] = {}  # digest -> key of the first sample with it

    @property
    def ordered(self) -> bool:
        return self.config.scope == "job"

    @property
    def columns(self) -> dict[str, str]:
        return {GROUP: "string"}

    def process(self, batch: Batch) -> Batch:
        if self.config.scope == "shard":
            self.first = {}
        keys, files = batch[schema.KEY], batch[schema.FILES]
        hashes = batch.setdefault(schema.SHA256, [None] * len(keys))
        groups = batch.setdefault(GROUP, [None] * len(keys))
        for i in schema.alive(batch):
            if not hashes[i]:
                image = schema.image_of(files[i])
                if image is None:
                    continue
                hashes[i] = hashlib.sha256(image).hexdigest()
            digest = _digest(hashes[i])
            first = self.first.setdefault(digest, keys[i])
            groups[i] = first
            if first != keys[i]:
                self.reject(batch, i, f"same bytes as {first}")
        return batch

    def resume(self, written: Batch) -> None:
        if self.config.scope == "shard" or GROUP not in written:
            return
        for key, sha, group in zip(written[schema.KEY], written[schema.SHA256], written[GROUP]):
            if group == key and sha:
                self.first.setdefault(_digest(sha), key)

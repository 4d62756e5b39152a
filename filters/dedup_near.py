"""``dedup_near``: drop images that look like one already kept.

* ``method: phash`` / ``dhash``: a 64-bit perceptual hash within ``max_distance`` bits of a kept
  one, across the whole job (``scope: job``, fed in shard order like ``dedup_exact``) or within
  each shard. Each examined row gets its hash (hex) in a column named after the method.
* ``method: clip``: cosine similarity of the CLIP image embeddings (``KEY.clip.npy``, stored by an
  earlier ``clip_score`` with ``store_embeddings: true``) at least ``min_cosine``, within each
  shard: the embeddings of samples that a later stage drops are not on disk, so job-wide state
  could not be rebuilt exactly on resume.

The first sample by key order is kept; ``near_group`` names, for each examined row, the key of
the kept sample it matched (its own key when kept).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch, ErrorKind
from pipeline.media.image_open import ImageRejected
from pipeline.media.npy import read_npy

from .base import Filter, alive_with_image
from .frames import EMBEDDING_FILE
from .perceptual import BITS, HASHES, HammingIndex

GROUP = "near_group"


@dataclass
class NearDedupConfig:
    method: Literal["phash", "dhash", "clip"] = "phash"
    max_distance: int = 4        # bits out of 64, for phash / dhash
    min_cosine: float = 0.95     # for clip
    scope: Literal["job", "shard"] = "job"

    def validate(self) -> None:
        if not 0 <= self.max_distance < BITS:
            raise ConfigError(f"max_distance: must be in 0..{BITS - 1}, got {self.max_distance}")
        if not -1 <= self.min_cosine <= 1:
            raise ConfigError(f"min_cosine: must be in -1..1, got {self.min_cosine}")
        if self.method == "clip" and self.scope == "job":
            raise ConfigError("scope: method clip works within each shard only (scope: shard); embeddings of "
                              "samples dropped later are not on disk to rebuild job-wide state on resume")


class NearDedupFilter(Filter):
    name = "dedup_near"
    Config = NearDedupConfig

    def __init__(self, config: NearDedupConfig) -> None:
        super().__init__(config)
        self.index = HammingIndex(config.max_distance)

    @property
    def ordered(self) -> bool:
        return self.config.scope == "job"

    @property
    def columns(self) -> dict[str, str]:
        hashes = {} if self.config.method == "clip" else {self.config.method: "string"}
        return {**hashes, GROUP: "string"}

    def process(self, batch: Batch) -> Batch:
        if self.config.method == "clip":
            return self._by_embedding(batch)
        if self.config.scope == "shard":
            self.index = HammingIndex(self.config.max_distance)
        hash_fn = HASHES[self.config.method]
        keys = batch[schema.KEY]
        idx, images = alive_with_image(batch)
        hashes, groups = [], []
        for i, data in zip(idx, images):
            try:
                h = hash_fn(data)
            except Exception as e:  # noqa: BLE001 - an undecodable image is this sample's problem only
                schema.mark(batch, i, e.kind if isinstance(e, ImageRejected) else ErrorKind.DECODE_ERROR, f"{self.name}: {e}")
                hashes.append(None)
                groups.append(None)
                continue
            match = self.index.find(h)
            if match is None:
                self.index.add(h, keys[i])
                groups.append(keys[i])
            else:
                groups.append(match[0])
                self.reject(batch, i, f"{self.config.method} within {match[1]} bits of {match[0]}")
            hashes.append(f"{h:016x}")
        schema.set_column(batch, self.config.method, idx, hashes)
        schema.set_column(batch, GROUP, idx, groups)
        return batch

    def _by_embedding(self, batch: Batch) -> Batch:
        keys, files = batch[schema.KEY], batch[schema.FILES]
        idx = [i for i in schema.alive(batch) if EMBEDDING_FILE in files[i]]
        if not idx:
            return batch
        emb = np.stack([read_npy(files[i][EMBEDDING_FILE]).astype(np.float32).ravel() for i in idx])
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        kept: list[int] = []  # positions in idx, in key order
        groups = []
        for p, i in enumerate(idx):  # greedy in key order; one matrix-vector product per row
            if kept:
                sims = emb[kept] @ emb[p]
                best = int(np.argmax(sims >= self.config.min_cosine))
                if sims[best] >= self.config.min_cosine:
                    first = keys[idx[kept[best]]]
                    groups.append(first)
                    self.reject(batch, i, f"clip cosine {sims[best]:.3f} with {first}")
                    continue
            kept.append(p)
            groups.append(keys[i])
        schema.set_column(batch, GROUP, idx, groups)
        return batch

    def resume(self, written: Batch) -> None:
        column = self.config.method
        if self.config.scope == "shard" or column not in written or GROUP not in written:
            return
        for key, h, group in zip(written[schema.KEY], written[column], written[GROUP]):
            if group == key and h:
                self.index.add(int(h, 16), key)

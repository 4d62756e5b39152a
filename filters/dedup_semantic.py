"""``semantic_dedup``: drop images whose CLIP image embedding is too close to one already kept,
across the whole job (SemDeDup, Abbas et al. 2023; NeMo Curator's semantic dedup).

    filters:
      - semantic_dedup: {threshold: 0.95, n_clusters: 50}    # model/pretrained: the CLIP to use

How it works:

* ``prepare`` clusters the embeddings of the first ``sample_size`` rows that reach the filter
  (spherical k-means: k-means++ seeding and Lloyd steps on unit vectors, fixed ``seed``, numpy
  only), once per job; the centroids are kept in manifest.json as float16 (base64), so a resumed
  job assigns every sample to the same cluster.
* Each sample goes to its nearest centroid. Within its cluster it is a duplicate when its cosine
  similarity to a sample already kept there is >= ``threshold`` (SemDeDup's eps is
  ``1 - threshold``: 0.95 is eps 0.05); it is then ``filtered`` with a message naming the kept key.
  Clusters only bound the comparisons: two near-duplicates assigned to different clusters are
  both kept (the approximation SemDeDup makes too).
* The stage is ``ordered`` (shards in shard order, rows in key order), so the kept one of a
  duplicate group is always the first in input order, whatever the engine.
* The embeddings come from the batch column ``clip_score.IMAGE_EMBEDDING``, written by the
  job's ``clip_score`` stage of ``model``/``pretrained`` (``build_filters`` shares an earlier one
  or adds an image-only one before this filter: ``clip_embedding()``), so each image goes
  through that CLIP once, however many filters read it.

Columns: ``semantic_cluster`` (the cluster id), ``semantic_group`` (the key of the kept sample it
duplicates, its own key when kept), ``semantic_similarity`` (its best cosine to an earlier kept
sample of its cluster, null when it is the cluster's first) and, on kept rows only,
``semantic_embedding``: the float16 embedding's bytes, from which ``resume`` rebuilds the kept
set after a kill (status tables are the only thing a resumed stage sees). A binary column, so it
stays in the status table and out of KEY.json: ``2 * dim`` bytes per kept sample (1 KiB for a
512-d ViT-B-32). Memory: the kept embeddings as float16, ``2 * dim`` bytes each, plus their keys.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch, ErrorKind
from pipeline.core.stage import JobContext

from .base import Filter
from .clip_score import IMAGE_EMBEDDING, clip_id

CLUSTER = "semantic_cluster"
GROUP = "semantic_group"
SIMILARITY = "semantic_similarity"
EMBEDDING = "semantic_embedding"
KMEANS_STEPS = 50  # Lloyd steps at most; they stop earlier once no assignment changes


@dataclass
class SemanticDedupConfig:
    model: str = "ViT-B-32"             # the CLIP whose image embeddings are compared (as clip_score's)
    pretrained: Optional[str] = "openai"
    threshold: float = 0.95             # cosine >= this to a kept sample of the cluster: a duplicate
    n_clusters: int = 50                # k-means clusters (fewer when the sample has fewer distinct images)
    sample_size: int = 2000             # rows embedded up front (in the driver) to fit the centroids
    seed: int = 0                       # of the k-means++ seeding

    def validate(self) -> None:
        if not -1 < self.threshold <= 1:
            raise ConfigError(f"threshold: a cosine similarity, in (-1, 1]; got {self.threshold}")
        for name in ("n_clusters", "sample_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")


# -- float16 vectors as text (the manifest holds JSON) -------------------------------------------
def encode_f16(vectors: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vectors, dtype="<f2").tobytes()).decode("ascii")


def decode_f16(text: str, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f2").reshape(-1, dim)


def unit(vector: Any) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


# -- k-means on the unit sphere -------------------------------------------------------------------
def spherical_kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` unit centroids of unit ``points`` (n, d) under cosine similarity; deterministic for a
    given ``seed`` and point order. ``k`` is capped at the number of distinct points."""
    distinct = np.unique(points, axis=0)
    k = min(k, len(distinct))
    rng = np.random.default_rng(seed)
    centroids = _kmeans_pp(points, k, rng)
    assign = None
    for _ in range(KMEANS_STEPS):
        new = np.argmax(points @ centroids.T, axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = points[assign == c]
            if len(members):  # an emptied cluster keeps its centroid
                centroids[c] = unit(members.sum(axis=0))
    return centroids


def _kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding with the cosine distance ``1 - cos``: each next centroid drawn with
    probability proportional to its squared distance from the nearest one so far."""
    chosen = [int(rng.integers(len(points)))]
    nearest = 1.0 - points @ points[chosen[0]]
    for _ in range(1, k):
        weights = np.clip(nearest, 0.0, None) ** 2
        total = weights.sum()
        pick = int(rng.choice(len(points), p=weights / total)) if total > 0 else int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, 1.0 - points @ points[pick])
    return points[chosen].astype(np.float32)


class KeptCluster:
    """The kept embeddings of one cluster (float16, grown by doubling) and their keys."""

    def __init__(self, dim: int) -> None:
        self.vectors = np.empty((0, dim), dtype=np.float16)
        self.keys: list[str] = []

    def add(self, vector16: np.ndarray, key: str) -> None:
        n = len(self.keys)
        if n == len(self.vectors):
            grown = np.empty((max(8, 2 * n), self.vectors.shape[1]), dtype=np.float16)
            grown[:n] = self.vectors[:n]
            self.vectors = grown
        self.vectors[n] = vector16
        self.keys.append(key)

    def matrix(self) -> np.ndarray:
        return self.vectors[:len(self.keys)].astype(np.float32)


class SemanticDedupFilter(Filter):
    name = "semantic_dedup"
    Config = SemanticDedupConfig

    def __init__(self, config: SemanticDedupConfig) -> None:
        super().__init__(config)
        self.centroids: Optional[np.ndarray] = None  # (k, d) float32 from the float16 state
        self.clusters: dict[int, KeptCluster] = {}

    @property
    def ordered(self) -> bool:
        return True

    @property
    def columns(self) -> dict[str, str]:
        return {CLUSTER: "int32", GROUP: "string", SIMILARITY: "double", EMBEDDING: "binary"}

    def clip_embedding(self) -> tuple[str, Optional[str]]:
        return clip_id(self.config.model, self.config.pretrained)

    # -- the centroids, once per job ---------------------------------------------------------------
    def prepare(self, context: JobContext) -> dict[str, Any]:
        vectors = []
        for batch in context.sample_batches(self.config.sample_size):
            column = batch.get(IMAGE_EMBEDDING) or [None] * schema.batch_len(batch)
            vectors.extend(unit(column[i]) for i in schema.alive(batch) if column[i] is not None)
        if not vectors:
            raise RuntimeError(f"semantic_dedup: none of the first {self.config.sample_size} rows reached the "
                               "filter with an image embedding, so no centroids can be computed")
        centroids = spherical_kmeans(np.stack(vectors), self.config.n_clusters, self.config.seed)
        return {"centroids": encode_f16(centroids), "n_clusters": len(centroids), "dim": centroids.shape[1],
                "sample_size": len(vectors), "seed": self.config.seed}

    def restore(self, state: dict[str, Any]) -> None:
        # Always the float16 values of the manifest, first run or resumed: the same assignments.
        self.centroids = decode_f16(state["centroids"], state["dim"]).astype(np.float32)

    # -- per shard ---------------------------------------------------------------------------------
    def process(self, batch: Batch) -> Batch:
        if self.centroids is None:
            raise RuntimeError("semantic_dedup: needs its centroids: the job runs prepare() or restore() before "
                               "any shard")
        if IMAGE_EMBEDDING not in batch:
            raise RuntimeError(f"semantic_dedup: the batch has no {IMAGE_EMBEDDING!r} column: a clip_score pass "
                               f"for {self.config.model} ({self.config.pretrained}) must run before this filter")
        rows, vectors = self._embedded(batch)
        if not rows:
            return batch
        queries = np.stack(vectors)
        if queries.shape[1] != self.centroids.shape[1]:
            raise RuntimeError(f"semantic_dedup: embeddings have {queries.shape[1]} dimensions, the centroids in "
                               f"the manifest {self.centroids.shape[1]}: the CLIP changed since they were computed")
        for name in (CLUSTER, GROUP, SIMILARITY, EMBEDDING):
            batch.setdefault(name, [None] * schema.batch_len(batch))
        assign = np.argmax(queries @ self.centroids.T, axis=1)
        for c in np.unique(assign):
            members = np.flatnonzero(assign == c)
            self._dedup_cluster(batch, int(c), [rows[p] for p in members], queries[members])
        return batch

    def _embedded(self, batch: Batch) -> tuple[list[int], list[np.ndarray]]:
        """Alive rows with an embedding, and their unit vectors; a row whose embedding is not a
        finite non-zero vector fails alone (it could match nothing, or everything)."""
        rows, vectors = [], []
        column = batch[IMAGE_EMBEDDING]
        for i in schema.alive(batch):
            if column[i] is None:
                continue
            v = unit(column[i])
            if not np.all(np.isfinite(v)) or not v.any():
                schema.mark(batch, i, ErrorKind.STAGE_ERROR, f"{self.name}: the image embedding is not a finite "
                                                             "non-zero vector")
                continue
            rows.append(i)
            vectors.append(v)
        return rows, vectors

    def _dedup_cluster(self, batch: Batch, c: int, rows: list[int], queries: np.ndarray) -> None:
        """Rows of one cluster, in key order, against the kept ones (earlier shards, then earlier rows).
        Kept vectors are compared as float16, as ``resume`` will have them."""
        cluster = self.clusters.setdefault(c, KeptCluster(queries.shape[1]))
        earlier = queries @ cluster.matrix().T  # (rows, kept before this batch)
        fresh: list[np.ndarray] = []  # kept in this batch, float16 values as float32
        keys = batch[schema.KEY]
        for p, i in enumerate(rows):
            key = keys[i]
            batch[CLUSTER][i] = c
            sims = np.concatenate([earlier[p], np.stack(fresh) @ queries[p]]) if fresh else earlier[p]
            if len(sims):
                best = int(np.argmax(sims))
                batch[SIMILARITY][i] = float(sims[best])
                if sims[best] >= self.config.threshold:
                    batch[GROUP][i] = cluster.keys[best]
                    self.reject(batch, i, f"cosine {sims[best]:.4f} to the kept {cluster.keys[best]} "
                                          f"(cluster {c}) >= threshold {self.config.threshold:g}")
                    continue
            vector16 = queries[p].astype(np.float16)
            cluster.add(vector16, key)
            fresh.append(vector16.astype(np.float32))
            batch[GROUP][i] = key
            batch[EMBEDDING][i] = np.ascontiguousarray(vector16, dtype="<f2").tobytes()

    def resume(self, written: Batch) -> None:
        if EMBEDDING not in written or self.centroids is None:
            return
        dim = self.centroids.shape[1]
        for key, c, data in zip(written[schema.KEY], written[CLUSTER], written[EMBEDDING]):
            if data:
                self.clusters.setdefault(int(c), KeptCluster(dim)).add(np.frombuffer(data, dtype="<f2"), key)

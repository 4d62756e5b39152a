"""Sidecars for the sidecar sink and loader tests: a base's shards read back as the batches an
``input.shards`` job gets (every base sample, in order, its media as input members), given a new
member and a score, and written through :class:`pipeline.sinks.sidecar.SidecarSink`."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.core import schema
from pipeline.executors.base import Failure, Payload, write_shard
from pipeline.loader.tar import split_name
from pipeline.media.npy import npy_bytes
from pipeline.sinks import Directory
from pipeline.sinks.sidecar import SidecarSink

SCORE = "side_score"
TYPES = {**schema.COLUMN_TYPES, SCORE: "double"}


def base_samples(tar_path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of a tar's samples, in order."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = split_name(member.name)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def input_batch(tar_path: Path) -> dict[str, list]:
    """What a job over ``input.shards`` gets for one base tar: every sample, its members as input."""
    samples = base_samples(tar_path)
    n = len(samples)
    metas = [json.loads(files.get("json", b"{}")) for _, files in samples]
    return {schema.KEY: [k for k, _ in samples], schema.URL: [m.get("url") for m in metas],
            schema.CAPTION: [files.get("txt", b"").decode() for _, files in samples],
            schema.STATUS: [schema.PENDING] * n, schema.ERROR_KIND: [None] * n, schema.ERROR_MESSAGE: [None] * n,
            schema.FILES: [dict(files) for _, files in samples],
            schema.INPUT_MEMBERS: [sorted(files) for _, files in samples]}


def side_npy(key: str) -> bytes:
    return npy_bytes(np.array([int(key), -1], dtype=np.int64))


def sidecar_sink(out_dir: Path, base_dir: Path, base_tars: Optional[list[str]] = None) -> SidecarSink:
    tars = base_tars if base_tars is not None else sorted(str(p) for p in base_dir.glob("*.tar"))
    sink = SidecarSink(Directory(out_dir), TYPES, "side", base=str(base_dir), base_shards=dict(enumerate(tars)),
                       stage_columns=[SCORE])
    sink.open()
    return sink


def write_sidecar(out_dir: Path, base_dir: Path, *, reject: Callable[[str], bool] = lambda key: False,
                  member: str = "side.npy") -> SidecarSink:
    """A sidecar of every base shard: per sample ``KEY.<member>`` and ``side_score`` = int(key) / 1000,
    samples where ``reject(key)`` filtered out; its index written."""
    sink = sidecar_sink(out_dir, base_dir)
    for shard_id, tar in sink.base_shards.items():
        batch = input_batch(Path(tar))
        batch[SCORE] = [int(k) / 1000 for k in batch[schema.KEY]]
        for i, key in enumerate(batch[schema.KEY]):
            batch[schema.FILES][i][member] = side_npy(key)  # made by this job, even where the base had one
            batch[schema.INPUT_MEMBERS][i] = [m for m in batch[schema.INPUT_MEMBERS][i] if m != member]
            if reject(key):
                schema.reject(batch, i, "side_filter", "rejected by the test")
        result = write_shard(sink, shard_id, Payload(batch))
        if isinstance(result, Failure):
            raise RuntimeError(result.error)
    sink.finish()
    return sink

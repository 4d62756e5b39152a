"""The helper the loader tests use to build real output directories.

``write_output`` writes shards with the project's own sink (pipeline.sinks.webdataset, through
pipeline.testing.output), so the loader, webdataset, Hugging Face datasets and Ray all read
exactly what a job writes.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from pipeline.core import schema
from pipeline.loader.tar import split_name
from pipeline.media.npy import npy_bytes
from pipeline.testing.output import write_shards


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _row_files(shard: int, i: int, image: bool, npy: bool) -> dict[str, bytes]:
    files = {}
    if image:
        files["jpg"] = jpeg_bytes(shard * 10_000 + i)
    if npy:
        files["text_ids.npy"] = npy_bytes(np.arange(shard * 100 + i, shard * 100 + i + 7, dtype=np.int32))
        files["clip.npy"] = npy_bytes(np.full((2, 3), i / 10, dtype=np.float16))
    return files


def write_output(out_dir: Path, shard_sizes: Sequence[int], *, image: bool = True, npy: bool = True,
                 failed_every: Optional[int] = 3, samples_per_shard: int = 1000) -> dict[str, dict[str, bytes]]:
    """Write shards of ``shard_sizes`` successful samples (plus failed rows, which only reach the
    parquet) and index.json; returns ``{key: {ext: bytes}}`` of every member that is in a tar."""
    batches = []
    for shard, n in enumerate(shard_sizes):
        rows = []
        for i in range(n + (n // failed_every if failed_every else 0)):
            ok = not failed_every or (i + 1) % (failed_every + 1) != 0
            rows.append((i, ok))
        batch = {c: [None] * len(rows) for c in schema.STATUS_COLUMNS}
        batch[schema.FILES] = [{} for _ in rows]
        for r, (i, ok) in enumerate(rows):
            key = schema.make_key(shard, i, samples_per_shard)
            batch[schema.KEY][r] = key
            batch[schema.URL][r] = f"http://example.com/{key}.jpg"
            batch[schema.CAPTION][r] = f"caption {key} ünïcode"
            batch[schema.STATUS][r] = schema.PENDING if ok else schema.FAILED_TO_DOWNLOAD
            if ok:
                batch[schema.FILES][r] = _row_files(shard, i, image, npy)
            else:
                batch[schema.ERROR_KIND][r] = "http_status"
                batch[schema.ERROR_MESSAGE][r] = "404"
        batches.append(batch)
    write_shards(out_dir, batches, "loader-test")
    expected: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = split_name(member.name)
                expected.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return expected

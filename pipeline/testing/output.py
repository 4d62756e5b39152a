"""Output directories for tests and benchmarks that need shards but no download: batches written
through the WebDataset sink exactly as a job writes them (settled rows, stats, index)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

from pipeline.core import schema
from pipeline.core.schema import Batch
from pipeline.executors.base import Failure, Payload, write_shard
from pipeline.sinks import Directory, WebDatasetSink


def write_shards(out_dir: Union[str, Path], batches: Iterable[Batch], name: str = "test",
                 column_types: Optional[dict[str, str]] = None) -> WebDatasetSink:
    """Write ``batches`` as shards 0, 1, ... of ``out_dir`` and its index; returns the sink."""
    sink = WebDatasetSink(Directory(out_dir), {**schema.COLUMN_TYPES, **(column_types or {})}, name)
    sink.open()
    for shard_id, batch in enumerate(batches):
        result = write_shard(sink, shard_id, Payload(batch))
        if isinstance(result, Failure):
            raise RuntimeError(result.error)
    sink.finish()
    return sink

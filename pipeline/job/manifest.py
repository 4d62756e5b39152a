"""``manifest.json``: the job spec as run, versions, stage fingerprints, stage state (e.g. a
percentile threshold) and totals, so that a resumed run behaves exactly like the interrupted one
and refuses to mix outputs of a different job."""
from __future__ import annotations

import datetime
import json
import platform
from collections import Counter
from importlib import metadata
from typing import Any

from pipeline.core.config import ConfigError
from pipeline.core.stage import Stage
from pipeline.sinks.storage import Directory

NAME = "manifest.json"
# Parts of the spec that change what is written: a resumed run must agree on them.
OUTPUT_DEFINING = ("input", "download", "video", "filters", "tokenize")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("mmcurate", "pillow", "pyarrow", "aiohttp", "ray", "torch", "open_clip_torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def recorded(job: dict[str, Any]) -> dict[str, Any]:
    """The job spec as the manifest keeps it: without storage options, which hold credentials and
    may change between runs (a rotated key) without changing what is written."""
    return {k: {f: v for f, v in section.items() if f != "storage_options"} if isinstance(section, dict) else section
            for k, section in job.items()}


def stage_keys(stages: list[Stage]) -> list[str]:
    """Unique names for stages (a repeated name gets #2, #3, ...): their keys in the manifest."""
    seen: Counter = Counter()
    keys = []
    for s in stages:
        seen[s.name] += 1
        keys.append(s.name if seen[s.name] == 1 else f"{s.name}#{seen[s.name]}")
    return keys


def load(directory: Directory, job: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an earlier run into ``directory`` ({} if none); refuses one whose job wrote
    something else than ``job`` (the spec as a dict) would."""
    if not directory.exists(NAME):
        return {}
    manifest = json.loads(directory.read_bytes(NAME))
    before = manifest.get("job", {})
    changed = [k for k in OUTPUT_DEFINING if before.get(k) != job.get(k)]
    if before.get("output", {}).get("samples_per_shard") != job["output"]["samples_per_shard"]:
        changed.append("output.samples_per_shard")
    if changed:
        raise ConfigError(f"{directory} holds a job run with different {', '.join(changed)}; resuming "
                          f"would mix outputs. Use another output.dir, or delete this one to start over.")
    return manifest


def write(directory: Directory, manifest: dict[str, Any]) -> None:
    directory.write(NAME, json.dumps(manifest, indent=1, default=str).encode())

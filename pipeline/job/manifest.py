"""``manifest.json``: the job spec as run, versions, stage fingerprints, stage state (e.g. a
percentile threshold), a fingerprint of every input file, the status (``running``, ``complete``,
``incomplete``, or ``failed`` with the ``error``) and totals, so that a resumed run behaves
exactly like the interrupted one and refuses to mix outputs of a different job or input."""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
from collections import Counter
from importlib import metadata
from typing import Any, Optional

import fsspec

from pipeline.core.config import ConfigError
from pipeline.core.location import local_path
from pipeline.core.stage import Stage
from pipeline.sinks.storage import Directory

NAME = "manifest.json"
log = logging.getLogger("mmcurate")
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


# -- the input --------------------------------------------------------------------------------------
# Keys of fsspec's info() that say when an object last changed, by filesystem.
MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")


def input_fingerprints(files: list[str], storage_options: Optional[dict[str, Any]] = None) -> dict[str, dict]:
    """What tells cheaply whether each input file changed: size and mtime on disk; through fsspec
    the ETag when the store gives one, else size and mtime. Folders, missing files and ``hf://``
    entries (a catalog card resolves them; reading reports a missing one) are left out; a URL
    whose metadata cannot be had now gets ``{}``, which compares with anything."""
    out: dict[str, dict] = {}
    for name in files:
        path = local_path(name)
        if path is not None:
            if os.path.isfile(path):
                st = os.stat(path)
                out[name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            continue
        if name.startswith("hf://"):
            continue
        try:
            fs, fs_path = fsspec.core.url_to_fs(name, **dict(storage_options or {}))
            info = fs.info(fs_path)
        except FileNotFoundError:
            continue
        except OSError as e:  # a server down now: reading it will say so, if it still is
            log.warning("cannot fingerprint input %s (%s): a change to it will not be detected", name, e)
            out[name] = {}
            continue
        if info.get("type") == "directory":
            continue
        etag = info.get("ETag") or info.get("etag")
        mtime = next((info[k] for k in MTIME_KEYS if info.get(k) is not None), None)
        out[name] = ({"etag": str(etag).strip('"')} if etag else
                     {"bytes": info.get("size"), "mtime": None if mtime is None else str(mtime)})
    return out


def check_inputs(directory: Directory, manifest: dict[str, Any], inputs: dict[str, dict]) -> dict[str, dict]:
    """Refuse to resume over input that is not what the earlier runs read; returns the
    fingerprints to record (a known one is kept where it cannot be had now). The one exception is
    the file an earlier run failed reading (``error_input``): replacing a broken file is the fix.
    A manifest from before fingerprints were kept has none to compare."""
    before = manifest.get("inputs")
    if before is None:
        return inputs
    fixed = manifest.get("error_input") if manifest.get("status") == "failed" else None
    problems = []
    for name in sorted(set(before) | set(inputs)):
        old, new = before.get(name), inputs.get(name)
        if name == fixed or old == new or old == {} or new == {}:
            continue  # the same, the fix, or unknown on one side
        if name not in inputs:
            problems.append(f"{name} is no longer an input")
        elif name not in before:
            problems.append(f"{name} is a new input")
        else:
            problems.append(f"{name} changed ({_changes(before[name], inputs[name])})")
    if problems:
        raise ConfigError(f"{directory} was written from other input: {'; '.join(problems)}. Resuming would "
                          f"mix shards of the old and the new input: restore the input, or start fresh "
                          f"(delete {directory}, or use another output.dir).")
    return {name: fp or before.get(name, {}) for name, fp in inputs.items()}


def _changes(before: dict[str, Any], now: dict[str, Any]) -> str:
    labels = {"bytes": "size", "mtime_ns": "modified", "mtime": "modified", "etag": "ETag"}
    parts = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old != new:
            if key == "mtime_ns":
                old, new = _ns_time(old), _ns_time(new)
            parts.append(f"{labels.get(key, key)} {old} -> {new}")
    return ", ".join(parts)


def _ns_time(ns: Any) -> Any:
    if not isinstance(ns, int):
        return ns
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).isoformat(timespec="microseconds")


def write(directory: Directory, manifest: dict[str, Any]) -> None:
    directory.write(NAME, json.dumps(manifest, indent=1, default=str).encode())

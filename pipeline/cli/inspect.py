"""``mmcurate inspect OUTPUT_DIR``: totals, status and error-kind counts, a few samples.

OUTPUT_DIR is a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://`` ...), read
through :class:`pipeline.sinks.storage.Directory` with the ecosystem's credentials.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from pipeline.core import schema
from pipeline.sinks.storage import Directory


def open_output(out_dir: str | Path | Directory, storage_options: Optional[dict[str, Any]] = None) -> Directory:
    """The output directory ``out_dir`` names; FileNotFoundError naming it when there is none."""
    directory = out_dir if isinstance(out_dir, Directory) else Directory(out_dir, storage_options)
    if not directory.is_dir():
        raise FileNotFoundError(f"{_shown(out_dir)}: no such output directory")
    return directory


def _shown(out_dir: str | Path | Directory) -> str:
    """How a message names the directory: as the user wrote it (a URL without a trailing ``/``)."""
    if isinstance(out_dir, Directory):
        return out_dir.url
    text = os.fspath(out_dir)
    return text.rstrip("/") if "://" in text else str(Path(text))


def summarize(out_dir: str | Path | Directory, n: int = 5,
              storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    directory = open_output(out_dir, storage_options)
    statuses: Counter = Counter()
    kinds: Counter = Counter()
    shards = directory.names("[0-9]*_stats.json")
    for name in shards:
        stats = json.loads(directory.read_bytes(name))
        statuses.update(stats["status_counts"])
        kinds.update(stats["error_kinds"])
    samples: list[dict[str, Any]] = []
    for tar_name in directory.names("[0-9]*.tar"):
        with directory.open(tar_name) as f:
            _tar_samples(f, n, samples)
        if len(samples) >= n:
            break
    manifest = json.loads(directory.read_bytes("manifest.json")) if directory.exists("manifest.json") else {}
    total = sum(statuses.values())
    return {
        "output_dir": _shown(out_dir),
        "job": manifest.get("name"),
        "job_status": manifest.get("status"),
        "shards": len(shards),
        "samples": total,
        "successes": statuses.get(schema.SUCCESS, 0),
        "success_rate": statuses.get(schema.SUCCESS, 0) / total if total else 0.0,
        "status_counts": dict(statuses.most_common()),
        "error_kinds": dict(kinds.most_common()),
        "fingerprints": manifest.get("fingerprints", {}),
        "examples": samples,
    }


def _tar_samples(f: Any, n: int, samples: list[dict[str, Any]]) -> None:
    """Add the samples of one tar (an open binary file) to ``samples`` until it holds ``n``."""
    with tarfile.open(fileobj=f) as tar:
        current: dict[str, Any] = {}
        for member in tar:
            key, ext = member.name.split(".", 1)
            if current and current["key"] != key:
                samples.append(current)
                current = {}
            if len(samples) >= n:
                break
            current.setdefault("key", key)
            if ext == "json":
                current["json"] = json.loads(tar.extractfile(member).read())
            elif ext == "txt":
                current["caption"] = tar.extractfile(member).read().decode("utf-8", "replace")
            else:
                current.setdefault("files", {})[ext] = member.size
        if current and len(samples) < n:
            samples.append(current)


def render(summary: dict[str, Any]) -> str:
    lines = [f"{summary['output_dir']}: job {summary['job']!r} ({summary['job_status']}), "
             f"{summary['shards']} shards, {summary['samples']} rows, {summary['successes']} in tars "
             f"({100 * summary['success_rate']:.1f}%)", "", "status counts:"]
    lines += [f"  {k:<22} {v}" for k, v in summary["status_counts"].items()]
    if summary["error_kinds"]:
        lines += ["error kinds (filters appear under their own names):"]
        lines += [f"  {k:<22} {v}" for k, v in summary["error_kinds"].items()]
    if summary["examples"]:
        lines += ["", "examples:"]
        for ex in summary["examples"]:
            files = ", ".join(f"{e} ({s} B)" for e, s in ex.get("files", {}).items())
            meta = ex.get("json", {})
            size = f"{meta.get('width')}x{meta.get('height')}" if meta.get("width") else ""
            if meta.get("images_total") is not None:  # a document: its kept images of its image slots
                size = f"{meta.get('images_kept')}/{meta['images_total']} images"
            lines.append(f"  {ex['key']}  {size:<9} {files}")
            lines.append(f"      {ex.get('caption', '')[:100]!r}  <- {str(meta.get('url', ''))[:80]}")
    return "\n".join(lines)

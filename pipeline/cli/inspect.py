"""``mmcurate inspect OUTPUT_DIR``: totals, status and error-kind counts, a few samples."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core import schema


def summarize(out_dir: str | Path, n: int = 5) -> dict[str, Any]:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: no such output directory")
    statuses: Counter = Counter()
    kinds: Counter = Counter()
    shards = sorted(out_dir.glob("[0-9]*_stats.json"))
    for path in shards:
        stats = json.loads(path.read_text())
        statuses.update(stats["status_counts"])
        kinds.update(stats["error_kinds"])
    samples = []
    for tar_path in sorted(out_dir.glob("[0-9]*.tar")):
        with tarfile.open(tar_path) as tar:
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
        if len(samples) >= n:
            break
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    total = sum(statuses.values())
    return {
        "output_dir": str(out_dir),
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
            lines.append(f"  {ex['key']}  {size:<9} {files}")
            lines.append(f"      {ex.get('caption', '')[:100]!r}  <- {str(meta.get('url', ''))[:80]}")
    return "\n".join(lines)

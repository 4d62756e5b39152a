"""``mmcurate subset IN OUT``: a new dataset from existing WebDataset shards, filtered and/or
resharded, with no network (the job is ``input.shards: [IN]``, ``output.dir: OUT``; see
:mod:`pipeline.sources.shard_input`)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from pipeline.core.config import ConfigError

DESCRIPTION = """\
Write a new dataset from existing WebDataset shards (mmcurate's output, img2dataset's, or any
webdataset), without touching the network: the media are read from the tars, the filters given
with --filter run on them, and the kept samples are written in shards of --samples-per-shard
(a reshard), with fresh keys and each sample's source_key / source_shard. IN is a folder of
.tar files, a glob, a brace pattern (shards/{00000..00009}.tar) or an fsspec URL. Rerunning the
same command resumes."""

EXAMPLES = """examples:
  mmcurate subset out/cc3m out/cc3m-4k --samples-per-shard 4096
  mmcurate subset out/cc3m out/cc3m-clip30 --filter 'clip_score: {min: 0.30}'
  mmcurate subset 'shards/{00000..00099}.tar' out/small --filter 'image_size: {min_side: 256}' --engine ray"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("subset", help="filter and/or reshard existing WebDataset shards (no network)",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="the shards to read: a folder, glob, brace pattern or URL")
    p.add_argument("output", metavar="OUT", help="the new dataset's directory (local path or fsspec URL)")
    p.add_argument("--samples-per-shard", type=int, default=None, metavar="N",
                   help="samples per output shard (default: the job spec's, 10000)")
    p.add_argument("--filter", action="append", default=[], metavar="'NAME: {OPTIONS}'",
                   help="a filter as in a job spec, in YAML, e.g. 'clip_score: {min: 0.3}' (repeatable, in order)")
    p.add_argument("--engine", choices=("local", "ray"), default=None, help="execution engine (default local)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override any other spec value, e.g. --set output.layout=sidecar (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def parse_filter(text: str) -> dict[str, Any]:
    """``'name: {options}'`` (or a bare ``name``) as a job spec's filter entry."""
    try:
        entry = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--filter: {text!r} is not valid YAML: {e}") from None
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(f"--filter: {text!r} must be one filter, 'name: {{options}}'")
    return {str(k): (v or {}) for k, v in entry.items()}


def job_data(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec (as data) that ``subset`` runs."""
    output: dict[str, Any] = {"dir": args.output}
    if args.samples_per_shard is not None:
        output["samples_per_shard"] = args.samples_per_shard
    data: dict[str, Any] = {"name": "subset", "input": {"shards": [args.input]}, "output": output,
                            "filters": [parse_filter(f) for f in args.filter]}
    if args.engine:
        data["execution"] = {"engine": args.engine}
    source = source_job(args.input)
    if source.get("download", {}).get("media") == "document":  # its filters run per image, per document
        data["download"] = {"media": "document"}
        data["documents"] = source.get("documents", {})
    return data


def source_job(location: str) -> dict[str, Any]:
    """The job spec that wrote ``location`` (an mmcurate output's manifest.json), else {} (shards
    of another tool, a glob, a pattern)."""
    import json

    from pipeline.sinks.storage import Directory

    try:
        return json.loads(Directory(location).read_bytes("manifest.json")).get("job", {})
    except (OSError, ValueError, AttributeError):
        return {}


def run(args: argparse.Namespace) -> int:
    from pipeline.job.runner import JobFailed, run_job
    from pipeline.job.spec import load_job
    from pipeline.sinks.lock import OutputInUse

    spec = load_job(data=job_data(args), overrides=args.set)
    try:
        result = run_job(spec, progress=not args.no_progress)
    except (JobFailed, OutputInUse) as e:
        print(f"mmcurate: error: {e}", file=sys.stderr)
        return 1
    kept = result.status_counts.get("success", 0)
    print(f"{result.out_dir}: {kept} / {result.samples} samples kept in {result.shards_total} shards "
          f"({len(result.failed_shards)} failed) in {result.seconds:.1f}s")
    return 1 if result.failed_shards else 0

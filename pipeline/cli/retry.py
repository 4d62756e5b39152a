"""``mmcurate retry OUT``: fetch again what failed for a passing reason (see :mod:`pipeline.job.retry`)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = """\
Fetch again the samples of an output directory whose download failed for a reason that may pass,
and rewrite only the shards that hold them (each one replaced whole, atomically; every other file
stays byte-identical). The job is rebuilt from OUT/manifest.json: same download settings, filters,
tokenizers and thresholds. A retried sample's status row records its attempt count (attempts) and
when it was last tried (last_attempt, UTC).

Default kinds: timeout, connection, dns, truncated, http_429, http_5xx, rate_limited (yt-dlp).
A kind is a download error kind as the status table's error_kind names it (http_status means
every HTTP status), or an HTTP status as http_503 or http_5xx. Shards that are not complete are
not retried here: rerunning the job (mmcurate run) redoes them."""

EXAMPLES = """examples:
  mmcurate retry out/cc3m
  mmcurate retry out/cc3m --kinds timeout,http_503
  mmcurate retry s3://bucket/cc3m --engine local"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("retry", help="fetch again the samples that failed for a passing reason (timeouts, 5xx)",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUT", help="the output directory of a job (local path or fsspec URL)")
    p.add_argument("--kinds", default=None, metavar="KIND,KIND",
                   help="comma-separated failure kinds to retry (default: the list above)")
    p.add_argument("--engine", choices=("local", "ray"), default=None, help="execution engine (default: the job's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pipeline.job.retry import DEFAULT_KINDS, retry
    from pipeline.sinks.lock import OutputInUse

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else DEFAULT_KINDS
    try:
        result = retry(args.output, kinds, engine=args.engine, progress=not args.no_progress)
    except OutputInUse as e:
        print(f"mmcurate: error: {e}", file=sys.stderr)
        return 1
    print(f"{result.out_dir}: retried {result.rows_retried} samples in {result.shards_total} shards; "
          f"{result.recovered} now succeed ({len(result.failed_shards)} shards failed and are as before) "
          f"in {result.seconds:.1f}s")
    return 1 if result.failed_shards else 0

"""The ``mmcurate`` command line (also ``python -m pipeline``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from pipeline.core.config import ConfigError

EPILOG = """examples:
  mmcurate catalog list --modality image
  mmcurate run jobs/cc3m.yaml --set download.image_size=512 --set execution.engine=local
  mmcurate inspect out/cc3m -n 5
  mmcurate demo"""


def _run(args: argparse.Namespace) -> int:
    from pipeline.job.runner import JobFailed, check_start, run_job
    from pipeline.job.spec import load_job
    from pipeline.sinks.lock import OutputInUse

    spec = load_job(args.job, args.set)
    if args.dry_run:
        print(json.dumps(spec.to_dict(), indent=1))
        check_start(spec, writable=True)  # after the spec: it shows what was checked
        return 0
    try:
        result = run_job(spec, progress=not args.no_progress, verify=args.verify)
    except (JobFailed, OutputInUse) as e:  # the message says it all; -v logs the traceback
        print(f"mmcurate: error: {e}", file=sys.stderr)
        return 1
    print(f"\n{result.out_dir}: {result.shards_total} shards ({result.shards_skipped} already complete, "
          f"{result.shards_written} written, {len(result.failed_shards)} failed) in {result.seconds:.1f}s")
    total = result.samples
    if total:
        print(f"  {result.status_counts.get('success', 0)} / {total} samples in tars "
              f"({100 * result.status_counts.get('success', 0) / total:.1f}%)")
        for kind, count in result.error_kinds.most_common(8):
            print(f"  {kind:<22} {count}")
    if result.failed_shards:
        print(f"  failed shards (rerun the same command to retry them): "
              f"{', '.join(f'{s:05d}' for s in sorted(result.failed_shards))}", file=sys.stderr)
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.cli.inspect import render, summarize

    summary = summarize(args.output_dir, args.n)
    print(json.dumps(summary, indent=1, default=str) if args.json else render(summary))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.cli.demo import run_demo

    return run_demo(args.out, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcurate", description="Curate image-text and video-text datasets into filtered, pre-tokenized "
        "WebDataset shards: download, filter, tokenize and write in one streaming pass.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a job spec (resumes by default: complete shards are skipped)",
                         description="Run a job spec (YAML). Rerunning the same command resumes: complete "
                         "shards are skipped and partial files of a killed run are discarded.")
    run.add_argument("job", help="path to the job spec (YAML)")
    run.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                     help="override a spec value, e.g. --set download.image_size=512 (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="validate and print the spec as it would run, and check that the inputs and "
                     "the catalog exist and the output is writable (nothing is written)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--verify", action="store_true",
                     help="read complete shards back and check their sha256 before skipping them "
                     "(by default only their sizes are checked)")
    run.set_defaults(func=_run)

    insp = sub.add_parser("inspect", help="summarise an output directory and show a few samples")
    insp.add_argument("output_dir")
    insp.add_argument("-n", type=int, default=5, help="number of samples to show (default 5)")
    insp.add_argument("--json", action="store_true", help="print JSON")
    insp.set_defaults(func=_inspect)

    demo = sub.add_parser("demo", help="the whole flow offline on bundled data (local server on 127.0.0.1)")
    demo.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    demo.add_argument("--keep", action="store_true", help="keep an existing output (resume) instead of starting over")
    demo.set_defaults(func=_demo)

    for module in EXTENSIONS:
        __import__(module, fromlist=["add_parser"]).add_parser(sub)
    return parser


# Modules that add their own subcommands (catalog, report, stream, ...).
EXTENSIONS: list[str] = ["catalogs.cli", "pipeline.cli.report", "pipeline.cli.stream", "pipeline.cli.subset",
                         "pipeline.cli.retry"]


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"mmcurate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmcurate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

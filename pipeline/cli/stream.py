"""``mmcurate stream OUTPUT_DIR``: stream shards through the trainer-side loader and print samples/s.

A quick check that a job's output loads (and how fast) the way a trainer would read it:
pipeline.loader's ShardDataset in its Loader, with DataLoader workers, batching and decoding.
An index the loader refuses (malformed, impossible counts, shards outside OUTPUT_DIR without
``--allow-outside-root``) is an error (exit 2) naming the shard and the field.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

from pipeline.media.geometry import MAX_PIXELS

EPILOG = """examples:
  mmcurate stream out/cc3m --batch-size 256 --workers 4
  mmcurate stream out/cc3m --fields jpg,txt --image-size 224 --max-batches 200
  mmcurate stream out/cc3m --fields text_ids.npy --epochs 2 --shuffle"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "stream", help="stream an output directory through the training loader and print samples/s",
        description="Read OUTPUT_DIR (a path or fsspec URL) with mmcurate's loader as a trainer would "
        "(DataLoader workers, batches, decoded tensors) and report samples/s per epoch. Exits 1 when "
        "samples were skipped as missing or corrupt.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", nargs="+", metavar="OUTPUT_DIR", help="output directory; several are concatenated")
    p.add_argument("--batch-size", type=_positive, default=256, metavar="N", help="samples per batch (default 256)")
    p.add_argument("--workers", type=_non_negative, default=2, metavar="W",
                   help="DataLoader worker processes; 0 reads in this process (default 2)")
    p.add_argument("--fields", default=None, metavar="EXT,EXT",
                   help="member extensions to read, e.g. jpg,txt or text_ids.npy (default: every member)")
    p.add_argument("--epochs", type=_positive, default=1, metavar="E", help="passes over the data (default 1)")
    p.add_argument("--max-batches", type=_positive, default=None, metavar="M", help="stop each epoch after M batches")
    p.add_argument("--shuffle", action="store_true", help="shuffle shards and samples (seeded)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--image-size", type=_positive, default=None, metavar="PX", help="resize images (center crop)")
    p.add_argument("--no-decode", action="store_true", help="deliver raw bytes (measures reading alone)")
    p.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, metavar="N",
                   help=f"skip images whose header announces more pixels (default {MAX_PIXELS}, as on download)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read shards that index.json places outside OUTPUT_DIR (refused by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _epoch(loader: Any, max_batches: int | None, progress: bool) -> tuple[int, int, float]:
    """One pass (or its first ``max_batches``): (samples, batches, seconds)."""
    from tqdm import tqdm

    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    samples = batches = 0
    start = time.perf_counter()
    with tqdm(total=total, unit="batch", disable=not progress, leave=False, file=sys.stderr) as bar:
        for batch in loader:
            samples += len(batch["__key__"])
            batches += 1
            bar.update()
            bar.set_postfix(samples_per_s=f"{samples / (time.perf_counter() - start):,.0f}", refresh=False)
            if max_batches is not None and batches >= max_batches:
                break
    return samples, batches, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    from pipeline.loader import BadIndexError, Loader, ShardDataset, SkippedDataWarning

    sources = args.output_dir[0] if len(args.output_dir) == 1 else args.output_dir
    try:
        ds = ShardDataset(sources, fields=args.fields, batch_size=args.batch_size, shuffle=args.shuffle,
                          seed=args.seed, image_size=args.image_size, decode=not args.no_decode,
                          max_pixels=args.max_pixels, allow_outside_root=args.allow_outside_root)
    except BadIndexError as e:
        print(f"mmcurate stream: error: {e}", file=sys.stderr)
        return 2
    loader = Loader(ds, num_workers=args.workers)
    print(f"{', '.join(args.output_dir)}: {ds.num_samples} samples in {sum(len(s.shards) for s in ds.sources)} "
          f"shards; batch size {args.batch_size}, {args.workers} workers, fields {args.fields or 'all'}")
    damaged = 0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedDataWarning)
            samples, batches, seconds = _epoch(loader, args.max_batches, not args.no_progress)
        for w in caught:
            print(f"  warning: {w.message}", file=sys.stderr)
        complete = args.max_batches is None or batches < args.max_batches
        missing = loader.stats()["missing"] if complete else 0
        damaged += missing
        print(f"epoch {epoch}: {samples} samples in {batches} batches, {seconds:.2f} s, "
              f"{samples / seconds if seconds else 0:,.0f} samples/s"
              + (f", {missing} missing or corrupt" if missing else ""))
    return 1 if damaged else 0

"""Loader throughput: webdataset's WebLoader vs mmcurate's Loader vs the raw read of the same tars.

    .venv/bin/python benchmarks/loader.py                 # writes its shards to /tmp, ~4 minutes
    .venv/bin/python benchmarks/loader.py --cold          # evict the shards from the page cache first

Two shard sets, written once (kept between runs):

* images: 256x256 JPEGs (q95, photo-like content) + caption + json, written by the WebDataset sink,
  read as fields ``jpg`` (decoded to uint8 CHW tensors) and ``txt``;
* tokens: ``text_ids.npy`` (77 x int32) + ``image_ids.npy`` (32x32 uint16 codebook ids) per sample,
  read as both arrays.

For each set, in one run, interleaved ``--repeats`` times with the same workers and batch size:

* ``webdataset``: ``WebDataset(...).map(keep the fields).decode(...).batched(bs)`` in a
  ``WebLoader`` (the webdataset FAQ's pattern: batching in the workers);
* ``mmcurate``: ``ShardDataset(dir, fields=..., batch_size=bs)`` in ``Loader``; for tokens also
  ``mmcurate w=0``, the same read in the trainer's own process (no worker transport); both read
  the tars (``columnar=False``);
* ``columnar`` / ``columnar w=0`` (tokens): the same, gathered from the shards' column files
  (``NNNNN.columns.arrow``, memory-mapped; ``columnar=True``), with the workers and in-process;
* ``raw read``: the tars' bytes read sequentially (1 MiB reads), files split over the same number
  of processes: the storage limit; samples/s = samples in the files / seconds;
* ``raw tar``: the same processes iterating every member with the standard library's ``tarfile``
  (stream mode) and reading its bytes: a plain tar loop with no decoding;
* ``ipc ceiling`` (tokens): DataLoader workers sending copies of one of mmcurate's batches (same
  tensors and metadata, in shared memory), reading nothing: what torch's worker-to-trainer
  transport alone allows on this machine, i.e. the most any DataLoader-based loader can deliver.

Samples/s are medians over the repeats (each repeat is one full epoch, worker start included).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core import schema
from pipeline.loader import Loader, ShardDataset  # noqa: E402
from pipeline.media.npy import npy_bytes
from pipeline.sinks import Directory
from pipeline.sinks.columnar import column_file, column_name
from pipeline.sinks.webdataset import shard_name, tar_bytes
from pipeline.testing.output import write_shards

IMAGE_FIELDS = ("jpg", "txt")
TOKEN_FIELDS = ("text_ids.npy", "image_ids.npy")


# -- shards ----------------------------------------------------------------------------------------

def _photo(rng: np.random.Generator, size: int = 256) -> bytes:
    """A smooth, photo-like image (low-frequency colour field plus mild noise): JPEG size and decode
    time close to real 256px photos (~25-35 KB at q95), unlike pure noise."""
    from PIL import Image

    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 12, (size, size, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_image_shards(out: Path, n: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    batches = []
    for shard in range(-(-n // per_shard)):
        rows = range(min(per_shard, n - shard * per_shard))
        batch = {c: [None] * len(rows) for c in schema.STATUS_COLUMNS}
        batch[schema.KEY] = [schema.make_key(shard, i, per_shard) for i in rows]
        batch[schema.URL] = [f"http://example.com/{k}.jpg" for k in batch[schema.KEY]]
        batch[schema.CAPTION] = [f"a photo number {k} of something" for k in batch[schema.KEY]]
        batch[schema.STATUS] = [schema.PENDING] * len(rows)
        batch[schema.FILES] = [{"jpg": _photo(rng)} for _ in rows]
        batches.append(batch)
    write_shards(out, batches, "bench-images")


def write_token_shards(out: Path, n: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    shardlist = []
    for shard in range(-(-n // per_shard)):
        members = []
        count = min(per_shard, n - shard * per_shard)
        for i in range(count):
            key = schema.make_key(shard, i, per_shard)
            members.append((f"{key}.text_ids.npy", npy_bytes(rng.integers(0, 49408, 77, dtype=np.int32))))
            members.append((f"{key}.image_ids.npy", npy_bytes(rng.integers(0, 16384, (32, 32), dtype=np.uint16))))
        name, tar = f"{shard_name(shard)}.tar", tar_bytes(members)
        Directory(out).write(column_name(shard_name(shard)), column_file(members, len(tar)))  # as the sink does
        Directory(out).write(name, tar)
        shardlist.append({"url": name, "nsamples": count, "filesize": (out / name).stat().st_size})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "bench-tokens", "shardlist": shardlist}
    (out / "index.json").write_text(json.dumps(index))


def ensure_shards(root: Path, images: int, tokens: int) -> tuple[Path, Path]:
    img_dir, tok_dir = root / f"images-{images}", root / f"tokens-{tokens}"
    if not (img_dir / "index.json").exists():
        print(f"writing {images} image samples to {img_dir} ...", flush=True)
        write_image_shards(img_dir, images, 500)
    if not (tok_dir / "index.json").exists() or not (tok_dir / column_name(shard_name(0))).exists():
        print(f"writing {tokens} token samples to {tok_dir} ...", flush=True)
        write_token_shards(tok_dir, tokens, 5000)
    return img_dir, tok_dir


def shard_files(out: Path) -> list[str]:
    index = json.loads((out / "index.json").read_text())
    return [str(out / s["url"]) for s in index["shardlist"]]


def total_samples(out: Path) -> int:
    return sum(s["nsamples"] for s in json.loads((out / "index.json").read_text())["shardlist"])


def evict(files: list[str]) -> None:
    """Drop these files (only these) from the page cache, so the next read comes from disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- contenders (each returns the number of samples it delivered) ----------------------------------

def run_webdataset(out: Path, fields: tuple[str, ...], workers: int, batch_size: int) -> int:
    import webdataset as wds

    keep = set(fields)
    ds = (wds.WebDataset(shard_files(out), shardshuffle=False, workersplitter=wds.split_by_worker,
                         empty_check=False)
          .map(lambda s: {k: v for k, v in s.items() if k in keep or k.startswith("__")})
          .decode("torchrgb8")
          .to_tuple(*fields)
          .batched(batch_size))
    n = 0
    for batch in wds.WebLoader(ds, batch_size=None, num_workers=workers):
        n += len(batch[0])
    return n


def run_mmcurate(out: Path, fields: tuple[str, ...], workers: int, batch_size: int, columnar: bool = False) -> int:
    ds = ShardDataset(str(out), fields=list(fields), batch_size=batch_size, columnar=columnar)
    n = 0
    for batch in Loader(ds, num_workers=workers):
        n += len(batch["__key__"])
    return n


def _read_raw(files: list[str]) -> int:
    buf = bytearray(1 << 20)
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def _read_tarfile(files: list[str]) -> int:
    total = 0
    for path in files:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                total += len(tar.extractfile(member).read())
    return total


def run_in_processes(fn: Callable[[list[str]], int], out: Path, workers: int) -> int:
    files = shard_files(out)
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(fn, [files[w::workers] for w in range(workers)])
    return total_samples(out)


def run_ipc_ceiling(out: Path, fields: tuple[str, ...], workers: int, batch_size: int) -> int:
    """Workers send copies of one real mmcurate batch (same tensors, same metadata, allocated in
    shared memory the same way) and read nothing: the worker-to-trainer transport alone."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    from pipeline.loader.decode import batch_tensor

    n = total_samples(out)
    template = next(iter(ShardDataset(str(out), fields=list(fields), batch_size=batch_size, columnar=False)))

    class Ready(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            for _ in range(info.id, -(-n // batch_size), info.num_workers):
                yield {k: batch_tensor(v.shape, v.dtype).copy_(v) if isinstance(v, torch.Tensor) else list(v)
                       for k, v in template.items()}

    loader = DataLoader(Ready(), batch_size=None, num_workers=workers, collate_fn=lambda b: b)
    return sum(len(b["__key__"]) for b in loader) and n


# -- driver ----------------------------------------------------------------------------------------

def measure(contenders: dict[str, Callable[[], int]], repeats: int, files: list[str], cold: bool) -> dict[str, float]:
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            if cold:
                evict(files)
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def report(title: str, rates: dict[str, float], baseline: str, limit: str) -> None:
    print(f"\n{title}")
    for name, rate in rates.items():
        print(f"  {name:<14} {rate:>11,.0f} samples/s")
    ours = rates["mmcurate"]
    print(f"  mmcurate / {baseline}: {ours / rates[baseline]:.2f}x    mmcurate / {limit}: {ours / rates[limit]:.0%}")
    for other in ("raw tar", "ipc ceiling"):
        if other in rates and other != limit:
            print(f"  mmcurate / {other}: {ours / rates[other]:.0%}")
    if "mmcurate w=0" in rates:
        print(f"  mmcurate w=0 (in the trainer's process, no transport) / {limit}: "
              f"{rates['mmcurate w=0'] / rates[limit]:.0%}")
    if "columnar" in rates:
        print(f"  columnar w=0 / {limit}: {rates['columnar w=0'] / rates[limit]:.0%}    columnar / ipc ceiling: "
              f"{rates['columnar'] / rates['ipc ceiling']:.0%}    columnar / mmcurate: "
              f"{rates['columnar'] / ours:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/mmcurate-bench-loader", help="where the shards are written (kept)")
    p.add_argument("--images", type=int, default=3000, help="image samples (default 3000)")
    p.add_argument("--tokens", type=int, default=100_000, help="token samples (default 100000)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="evict the shards from the page cache before every read")
    p.add_argument("--sets", default="images,tokens", help="which shard sets to run (default images,tokens)")
    args = p.parse_args(argv)
    img_dir, tok_dir = ensure_shards(Path(args.dir), args.images, args.tokens)
    print(f"workers={args.workers} batch_size={args.batch_size} repeats={args.repeats} cold={args.cold} "
          f"cpus={os.cpu_count()}")

    if "images" in args.sets:
        run_images(img_dir, args)
    if "tokens" in args.sets:
        run_tokens(tok_dir, args)
    return 0


def run_images(img_dir: Path, args: argparse.Namespace) -> None:
    w, bs = args.workers, args.batch_size
    img = measure({"webdataset": lambda: run_webdataset(img_dir, IMAGE_FIELDS, w, bs),
                   "mmcurate": lambda: run_mmcurate(img_dir, IMAGE_FIELDS, w, bs),
                   "raw read": lambda: run_in_processes(_read_raw, img_dir, w)},
                  args.repeats, shard_files(img_dir), args.cold)
    report(f"images: {total_samples(img_dir)} x 256px JPEG, fields jpg (decoded) + txt", img, "webdataset", "raw read")


def run_tokens(tok_dir: Path, args: argparse.Namespace) -> None:
    w, bs = args.workers, args.batch_size
    tok = measure({"webdataset": lambda: run_webdataset(tok_dir, TOKEN_FIELDS, w, bs),
                   "mmcurate": lambda: run_mmcurate(tok_dir, TOKEN_FIELDS, w, bs),
                   "mmcurate w=0": lambda: run_mmcurate(tok_dir, TOKEN_FIELDS, 0, bs),
                   "columnar": lambda: run_mmcurate(tok_dir, TOKEN_FIELDS, w, bs, columnar=True),
                   "columnar w=0": lambda: run_mmcurate(tok_dir, TOKEN_FIELDS, 0, bs, columnar=True),
                   "raw read": lambda: run_in_processes(_read_raw, tok_dir, w),
                   "raw tar": lambda: run_in_processes(_read_tarfile, tok_dir, w),
                   "ipc ceiling": lambda: run_ipc_ceiling(tok_dir, TOKEN_FIELDS, w, bs)},
                  args.repeats, shard_files(tok_dir), args.cold)
    report(f"tokens: {total_samples(tok_dir)} x (77 int32 + 32x32 uint16) npy", tok, "webdataset", "raw read")


if __name__ == "__main__":
    sys.exit(main())

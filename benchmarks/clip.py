"""CLIP scoring throughput: the usual approach against mmcurate's ``clip_score`` stage.

Both read the same stored WebDataset shards (256 px JPEGs + captions), use the same open_clip model
(random weights are fine for speed) and batch size, and produce one score per sample:

* usual: ``webdataset`` decode to PIL + the model's open_clip transform in a torch ``DataLoader``
  with worker processes, then ``encode_image`` / ``encode_text`` and the cosine (what DataComp-style
  scoring scripts do);
* mmcurate: the shard's samples as a pipeline batch into ``ClipScoreFilter`` (decode threads
  overlapping the model, nvJPEG + bf16 autocast on a GPU).

    python -m benchmarks.clip                      # CPU, ViT-B-32, 256 samples
    python -m benchmarks.clip --n 20480 --per-shard 2560 --batch-size 512 --device cuda --threads 8 --workers 8

(webdataset gives each DataLoader worker whole shards: at least as many shards as workers, or some idle.)

Prints samples/s for each, the ratio, and how far apart the two sets of scores are. With
``--input-only`` it times the input paths alone, and what of mmcurate's input work is left on the
model thread (its own CPU time per batch: the decoders assemble, pin and tokenize on the pool)
and the captions/s of the model's tokenizer on one thread. With ``--markdown PATH`` the run's rows, with
issue 17's goals checked (>= 20,000 samples/s, >= 3x the usual loop), are added to the table
``benchmarks/gpu.sh`` writes; ``--model`` may be a config JSON (gpu.sh's CPU smoke run uses the tiny CLIP).
"""
from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import schema
from pipeline.testing import synthetic

# Issue 17's goals for ViT-B-32 on 256 px JPEGs on one GPU.
GOAL_SAMPLES_PER_S = 20_000
GOAL_RATIO = 3.0  # against the plain open_clip loop
# The table benchmarks/gpu.sh writes for BENCHMARKS.md (benchmarks/tokenization.py adds its rows too).
TABLE_COLUMNS = ("benchmark", "command", "baseline", "mmcurate", "ratio", "goal", "result")


def textured(image, rng: np.random.Generator, sigma: float):
    """Synthetic shapes plus noise, so JPEG sizes and decode cost resemble photos, not flat art."""
    from PIL import Image

    arr = np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode_chunk(start: int, count: int, size: int, quality: int, sigma: float) -> list[tuple[bytes, str]]:
    """Samples ``start .. start+count-1`` as (JPEG bytes, caption); the noise is seeded by ``start``,
    so the bytes do not depend on how the chunks are spread over processes."""
    rng = np.random.default_rng(start)
    return [(synthetic.encode(textured(image, rng, sigma), "jpg", quality), caption)
            for image, caption in synthetic.make_pairs(count, seed=0, size=size, start=start)]


def write_shards(out: Path, n: int, size: int, per_shard: int, quality: int = 95, sigma: float = 10.0,
                 chunk: int = 250) -> list[str]:
    """``n`` samples in tar shards of ``per_shard``. Rendering and noise cost ~10 ms per 256 px image,
    so chunks are made on every core (20,000 images: minutes on one core, seconds on 16)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    starts = range(0, n, chunk)
    jobs = max(1, min(os.cpu_count() or 1, len(starts)))
    # spawn: the caller may have imported torch (and touched CUDA), which a fork would copy
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        make = functools.partial(encode_chunk, size=size, quality=quality, sigma=sigma)
        flat = (sample for part in pool.map(make, starts, [min(chunk, n - s) for s in starts]) for sample in part)
        paths = []
        for shard, start in enumerate(range(0, n, per_shard)):
            path = out / f"{shard:05d}.tar"
            with wds.TarWriter(str(path)) as sink:
                for i in range(min(per_shard, n - start)):
                    jpg, caption = next(flat)
                    sink.write({"__key__": schema.make_key(shard, i, per_shard), "jpg": jpg, "txt": caption})
            paths.append(str(path))
    return paths


def read_batches(paths: list[str]):
    """Each shard as a pipeline batch (what the download stage hands the filters)."""
    for path in paths:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        keys = list(samples)
        n = len(keys)
        yield {schema.KEY: keys, schema.CAPTION: [samples[k]["txt"].decode() for k in keys],
               schema.STATUS: [schema.PENDING] * n, schema.ERROR_KIND: [None] * n, schema.ERROR_MESSAGE: [None] * n,
               schema.FILES: [{"jpg": samples[k]["jpg"]} for k in keys]}


def usual(paths: list[str], model_name: str, pretrained: str, device: str, batch_size: int, workers: int,
          amp: bool) -> tuple[dict[str, float], float]:
    import open_clip
    import torch
    import webdataset as wds

    from filters.clip_model import register_model

    torch.manual_seed(0)  # random weights: the same ones on both sides
    name, tokenizer_kwargs = register_model(model_name)  # an open_clip name, or a config JSON (tiny CLIP)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=None if pretrained == "random" else pretrained, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name, **tokenizer_kwargs)
    dataset = (wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("pil")
               .to_tuple("__key__", "jpg", "txt").map_tuple(lambda k: k, preprocess, lambda t: t))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device == "cuda", persistent_workers=False)
    scores: dict[str, float] = {}
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
        for keys, images, texts in loader:  # workers interleave shards: keep the keys
            image = model.encode_image(images.to(device, non_blocking=True)).float()
            text = model.encode_text(tokenizer(list(texts)).to(device, non_blocking=True)).float()
            image = image / image.norm(dim=-1, keepdim=True)
            text = text / text.norm(dim=-1, keepdim=True)
            scores.update(zip(keys, (image * text).sum(-1).tolist()))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return scores, time.perf_counter() - start


def ours(paths: list[str], model_name: str, pretrained: str, device: str, batch_size: int, threads: int,
         precision: str, decode: str) -> tuple[dict[str, float], float]:
    import torch

    from filters import build_filters

    [stage] = build_filters([{"clip_score": {
        "model": model_name, "pretrained": pretrained, "device": device, "batch_size": batch_size,
        "decode_threads": threads, "precision": precision, "decode": decode}}], check=True)
    torch.manual_seed(0)
    stage.setup()
    scores: dict[str, float] = {}
    start = time.perf_counter()
    for batch in read_batches(paths):
        scores.update(zip(batch[schema.KEY], stage.process(batch)["clip_score"]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return scores, time.perf_counter() - start


def usual_input(paths: list[str], model_name: str, batch_size: int, workers: int) -> tuple[int, float]:
    """The usual approach's input path alone: DataLoader decode + preprocess, and tokenization."""
    import open_clip
    import torch
    import webdataset as wds

    from filters.clip_model import register_model

    name, tokenizer_kwargs = register_model(model_name)
    preprocess = open_clip.create_model_and_transforms(name, pretrained=None)[2]
    tokenizer = open_clip.get_tokenizer(name, **tokenizer_kwargs)
    dataset = (wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("pil")
               .to_tuple("jpg", "txt").map_tuple(preprocess, lambda t: t))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    count, start = 0, time.perf_counter()
    for images, texts in loader:
        tokenizer(list(texts))
        count += len(images)
    return count, time.perf_counter() - start


def ours_input(paths: list[str], model_name: str, device: str, batch_size: int, threads: int,
               decode: str) -> tuple[int, float, float]:
    """mmcurate's input path alone: ClipScorer's decode threads and tokenization, no model. Also
    the CPU time this (the model's) thread spent per batch taking them."""
    from filters.clip_model import load_clip
    from filters.clip_scorer import ClipScorer

    scorer = ClipScorer(load_clip(model_name, "random", device), batch_size=batch_size, decode=decode, threads=threads)
    count, batches, on_thread, start = 0, 0, 0.0, time.perf_counter()
    for batch in read_batches(paths):
        prepared = scorer.batches([f["jpg"] for f in batch[schema.FILES]], batch[schema.CAPTION])
        while True:
            cpu = time.thread_time()  # this thread's CPU only: waiting on the pool does not count
            b = next(prepared, None)
            on_thread += time.thread_time() - cpu
            if b is None:
                break
            count, batches = count + len(b.ok), batches + 1
    return count, time.perf_counter() - start, on_thread / max(batches, 1)


def caption_rate(paths: list[str], model_name: str, batch_size: int) -> float:
    """Captions/s of the model's open_clip tokenizer, batch by batch on one thread."""
    import open_clip

    from filters.clip_model import register_model

    name, tokenizer_kwargs = register_model(model_name)
    tokenizer = open_clip.get_tokenizer(name, **tokenizer_kwargs)
    captions = [c for b in read_batches(paths) for c in b[schema.CAPTION]]
    start = time.perf_counter()
    for i in range(0, len(captions), batch_size):
        tokenizer(captions[i:i + batch_size])
    return len(captions) / (time.perf_counter() - start)


def verdict(met: bool) -> str:
    return "met" if met else "not met"


def command_line(script: str, argv: list[str], unshown: tuple[str, ...] = ("--markdown", "--shards")) -> str:
    """How a benchmark was started, for the table, without the options that change no figure (where
    the table and the temporary shards go)."""
    shown, skip = [], False
    for arg in argv:
        if skip or arg in unshown or arg.split("=", 1)[0] in unshown:
            skip = arg in unshown  # the option's value follows
            continue
        shown.append(arg)
    return f"`{script} {shlex.join(shown)}`"


def append_rows(path: str, rows: list[tuple[str, ...]]) -> None:
    """Append ``rows`` to the Markdown table that ends the file at ``path``; when the file does not
    end in a table (new, or only gpu.sh's description of the machine), start one with its header."""
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |\n"

    for row in rows:
        if len(row) != len(TABLE_COLUMNS):
            raise ValueError(f"a table row has {len(TABLE_COLUMNS)} cells {TABLE_COLUMNS}, got {len(row)}: {row}")
    file = Path(path)
    text = file.read_text() if file.exists() else ""
    lines = [line_ for line_ in text.splitlines() if line_.strip()]
    with file.open("a") as out:
        if not lines or not lines[-1].startswith("|"):
            out.write(("\n" if lines else "") + line(TABLE_COLUMNS) + line(["---"] * len(TABLE_COLUMNS)))
        out.writelines(line(row) for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="random", help="open_clip tag, checkpoint path, or random")
    p.add_argument("--n", type=int, default=256, help="samples")
    p.add_argument("--image-size", type=int, default=256, help="stored JPEG side")
    p.add_argument("--per-shard", type=int, default=None, help="samples per shard (default n/2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (usual approach)")
    p.add_argument("--threads", type=int, default=2, help="decode threads (mmcurate) and torch threads on CPU")
    p.add_argument("--decode", default="auto", choices=["auto", "pil", "torch"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="both sides: auto is bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--shards", default=None, help="reuse / keep the stored shards in this directory")
    p.add_argument("--input-only", action="store_true",
                   help="time decode + preprocess + tokenize only (what bounds a GPU run), no model")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="append this run's rows, with issue 17's goals checked, to the table at PATH (gpu.sh)")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.markdown and a.input_only:
        p.error("--markdown records full scoring; --input-only has no goal to check")

    import logging

    import torch

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights, on purpose here
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cpu":
        torch.set_num_threads(a.threads)
    amp = a.precision == "bf16" or (a.precision == "auto" and device == "cuda")
    shard_dir = Path(a.shards or tempfile.mkdtemp(prefix="mmcurate-clip-bench-"))
    paths = sorted(str(p) for p in shard_dir.glob("*.tar")) or write_shards(
        shard_dir, a.n, a.image_size, a.per_shard or max(a.n // 2, 1))
    n = sum(len(b[schema.KEY]) for b in read_batches(paths))
    jpeg_kb = np.mean([len(f["jpg"]) for b in read_batches(paths[:1]) for f in b[schema.FILES]]) / 1024
    print(f"{n} samples in {len(paths)} shards ({a.image_size} px JPEG, {jpeg_kb:.0f} KiB avg) · {a.model} "
          f"({a.pretrained} weights) · batch {a.batch_size} · {'bf16' if amp else 'fp32'} · {device}"
          f"{' ' + torch.cuda.get_device_name() if device == 'cuda' else f' ({torch.get_num_threads()} threads)'}"
          f" · {os.cpu_count()} CPUs visible", flush=True)

    if a.input_only:
        usual_input(paths[:1], a.model, a.batch_size, a.workers)  # warm-up
        ours_input(paths[:1], a.model, device, a.batch_size, a.threads, a.decode)
        (n_base, base_s), (n_ours, our_s, model_thread) = (
            usual_input(paths, a.model, a.batch_size, a.workers),
            ours_input(paths, a.model, device, a.batch_size, a.threads, a.decode))
        print(f"input path only (decode, preprocess, tokenize; no model):\n"
              f"usual (DataLoader x{a.workers}): {n_base / base_s:8.1f} samples/s\n"
              f"mmcurate ({a.threads} threads): {n_ours / our_s:8.1f} samples/s\n"
              f"ratio mmcurate / usual: {(n_ours / our_s) / (n_base / base_s):.2f}x\n"
              f"mmcurate input work left on the model thread: {1000 * model_thread:.2f} ms CPU per batch "
              f"of {a.batch_size}\n"
              f"open_clip tokenizer, one thread: {caption_rate(paths, a.model, a.batch_size):8.0f} captions/s")
        return 0

    warm = paths[:1]  # first pass pays for imports, worker start-up and allocator warm-up
    usual(warm, a.model, a.pretrained, device, a.batch_size, a.workers, amp)
    ours(warm, a.model, a.pretrained, device, a.batch_size, a.threads, a.precision, a.decode)

    base_scores, base_s = usual(paths, a.model, a.pretrained, device, a.batch_size, a.workers, amp)
    our_scores, our_s = ours(paths, a.model, a.pretrained, device, a.batch_size, a.threads, a.precision, a.decode)
    base_rate, our_rate = len(base_scores) / base_s, len(our_scores) / our_s
    assert base_scores.keys() == our_scores.keys()
    diff = max(abs(base_scores[k] - our_scores[k]) for k in base_scores)
    print(f"usual (webdataset + DataLoader x{a.workers} + open_clip): {base_rate:8.1f} samples/s  ({base_s:.1f}s)")
    print(f"mmcurate clip_score stage:                         {our_rate:8.1f} samples/s  ({our_s:.1f}s)")
    print(f"ratio mmcurate / usual: {our_rate / base_rate:.2f}x   max |score difference|: {diff:.2e}")
    goals = [(f">= {GOAL_SAMPLES_PER_S:,} samples/s", our_rate >= GOAL_SAMPLES_PER_S),
             (f">= {GOAL_RATIO:g}x the plain loop", our_rate / base_rate >= GOAL_RATIO)]
    for goal, met in goals:
        print(f"goal {goal}: {verdict(met)}")
    if a.markdown:
        from filters.clip_model import preprocess_config
        from filters.clip_model import resolve_decode

        decoder = resolve_decode(a.decode, device, (preprocess_config(a.model, a.pretrained) or {}).get("resize_mode"))
        what = (f"CLIP scoring: {Path(a.model).stem} ({a.pretrained} weights), {n} × {a.image_size} px JPEG "
                f"(~{jpeg_kb:.0f} KiB), {'nvJPEG' if decoder == 'torch' and device == 'cuda' else decoder} decode, "
                f"{'bf16' if amp else 'fp32'}, batch {a.batch_size}, {device}")
        ours_cell = f"clip_score stage: {our_rate:,.0f} samples/s"
        append_rows(a.markdown, [
            (what, command_line("python -m benchmarks.clip", argv), "–", ours_cell, "–", goals[0][0],
             verdict(goals[0][1])),
            ("CLIP scoring against the plain open_clip loop (same run)", "same command",
             f"webdataset + DataLoader x{a.workers} + open_clip: {base_rate:,.0f} samples/s", ours_cell,
             f"{our_rate / base_rate:.2f}x (max score diff {diff:.1e})", goals[1][0], verdict(goals[1][1]))])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

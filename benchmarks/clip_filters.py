"""The shared CLIP embedding pass against one pass per filter.

The same images (synthetic shapes with noise, stored as JPEGs, with captions) go through
``clip_score`` + ``aesthetic`` + ``nsfw``:

* shared: the three filters in one job's stage list, as ``filters.build_filters`` makes it: one
  CLIP forward pass per sample (image and text towers), the heads reading its embeddings;
* separate: each filter on its own, as three scripts would run them: clip_score (image and text
  towers), then aesthetic and then nsfw, each after its own image-only pass
  (``clip_score: {captions: false}``).

No rule rejects anything (every score is computed for every sample in both), the models are
loaded before the clock starts, and the heads are random ones in the published layouts at the
CLIP's width, so nothing is downloaded: open_clip's ``--pretrained random`` weights cost the same
time as trained ones.

    python -m benchmarks.clip_filters                           # CPU, ViT-B-32, 64 samples
    python -m benchmarks.clip_filters --n 4096 --batch-size 256 --device cuda --model ViT-L-14

Prints samples/s of each (the best of ``--repeats`` interleaved runs), the ratio, and the largest
difference between the two runs' scores (0: the same models, the same numbers).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import schema
from pipeline.testing import synthetic

SCORES = ("clip_score", "aesthetic_score", "nsfw_score")


def make_batch(n: int, size: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    pairs = []
    for image, caption in synthetic.make_pairs(n, seed=0, size=size):
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 10.0, (size, size, 3))
        pairs.append((Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), caption))
    return synthetic.make_batch(pairs, quality=90)


def entries(args, heads: Path) -> list[dict]:
    from filters.clip_model import embedding_width
    from pipeline.testing.clip_heads import aesthetic_state, nsfw_state, save_head

    width = embedding_width(args.model)
    clip = {"model": args.model, "pretrained": args.pretrained}
    run = {"batch_size": args.batch_size, "device": args.device}
    return [{"clip_score": {**clip, **run, "min": -1.0}},
            {"aesthetic": {**clip, "checkpoint": str(save_head(heads / "aesthetic.pth", aesthetic_state(width)))}},
            {"nsfw": {**clip, "checkpoint": str(save_head(heads / "nsfw.pth", nsfw_state(width)))}}]


def ready(filter_entries: list[dict]):
    import torch

    from filters import build_filters

    stages = build_filters(filter_entries, check=True)
    for stage in stages:
        torch.manual_seed(0)  # random CLIP weights: the same model in every run
        stage.setup()
    return stages


def timed(stages, batch, warm) -> tuple[float, dict]:
    for stage in stages:  # one small batch first: lazy initialisation off the clock
        warm = stage.process(warm)
    start = time.perf_counter()
    for stage in stages:
        batch = stage.process(batch)
    return time.perf_counter() - start, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="stored image side, px")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the fastest counts")
    args = parser.parse_args()

    batch, warm = make_batch(args.n, args.size), make_batch(4, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        clip, aesthetic, nsfw = entries(args, Path(tmp))
        shared = ready([clip, aesthetic, nsfw])
        # a head's own script: an image-only pass of its CLIP (the run settings of clip_score's), then it
        embed = {"clip_score": {**{k: v for k, v in clip["clip_score"].items() if k != "min"}, "captions": False}}
        separate = [ready([clip]), ready([embed, aesthetic]), ready([embed, nsfw])]
        t_shared = t_separate = float("inf")
        for _ in range(args.repeats):  # interleaved, the best of each: a busy machine's noise
            t, out = timed(shared, copy.deepcopy(batch), copy.deepcopy(warm))
            t_shared = min(t_shared, t)
            total, outs = 0.0, {}
            for stages in separate:
                t, o = timed(stages, copy.deepcopy(batch), copy.deepcopy(warm))
                total += t
                outs.update({c: o[c] for c in SCORES if c in o})
            t_separate = min(t_separate, total)
    assert all(s == schema.PENDING for s in out[schema.STATUS]), "a rule rejected samples"
    diff = max(float(np.nanmax(np.abs(np.asarray(out[c], float) - np.asarray(outs[c], float)))) for c in SCORES)
    print(f"{args.n} samples, {args.size} px JPEGs, {args.model} ({args.pretrained}), batch {args.batch_size}, "
          f"{shared[0].device}")
    print(f"shared pass (clip_score + aesthetic + nsfw): {t_shared:7.2f} s  {args.n / t_shared:8.1f} samples/s")
    print(f"one pass per filter (three runs):           {t_separate:7.2f} s  {args.n / t_separate:8.1f} samples/s")
    print(f"ratio: {t_separate / t_shared:.2f}x   largest score difference: {diff:.2g}")


if __name__ == "__main__":
    main()

"""Train the project's tiny CLIP on the synthetic shapes set (pipeline.testing.synthetic), on CPU.

    python -m pipeline.testing.tiny_clip      # into pipeline/testing/models/tiny-clip

writes ``tiny-clip.json`` (an open_clip model config), ``bpe.txt.gz`` (a BPE vocabulary covering
the synthetic captions, so the text tower needs ~600 token embeddings instead of CLIP's 49 408),
``tiny-clip.safetensors`` (the weights) and ``metrics.json`` (held-out ROC AUC and the score
threshold that best separates matched from shuffled captions). Use it like any open_clip model:

    clip_score: {model: .../tiny-clip/tiny-clip.json, pretrained: .../tiny-clip/tiny-clip.safetensors}

No hub access is needed or attempted: this is how the tests and the demo get a real CLIP.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import time
from pathlib import Path

import numpy as np

from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP

MODEL_NAME = "tiny-clip"
BPE_FILE = "bpe.txt.gz"
IMAGE_SIZE = 32   # the model's input; images are rendered at 64 and resized by its own preprocessing
RENDER_SIZE = 64
CONTEXT_LENGTH = 24


def caption_words() -> list[str]:
    """Every word the synthetic captions can use (lowercase, as open_clip's tokenizer cleans them)."""
    words = set()
    for template in synthetic.TEMPLATES:
        words.update(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", template)))
    for names in (synthetic.SHAPES, synthetic.COLOURS, synthetic.SIZES, synthetic.BACKGROUNDS):
        words.update(names)
    for _, _, where in synthetic.POSITIONS.values():
        words.update(where.split())
    return sorted(words)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE (most frequent pair first, ties broken alphabetically) until every word is one
    token, in open_clip's convention: the last symbol of a word carries ``</w>``."""
    vocab = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: collections.Counter = collections.Counter()
        for symbols in vocab.values():
            pairs.update(zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, symbols in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            vocab[w] = out


def write_bpe(path: Path, merges: list[tuple[str, str]]) -> None:
    text = "#version: 0.2 (mmcurate tiny-clip, synthetic captions)\n" + "\n".join(f"{a} {b}" for a, b in merges)
    # mtime=0: the same merges give the same bytes, so the committed file only changes when they do
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.encode("utf-8"))


def model_config(vocab_size: int) -> dict:
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": 64, "heads": 2,
                     "layers": 2, "tokenizer_kwargs": {"bpe_path": BPE_FILE}},
    }


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores = np.concatenate([positive, negative])
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tie = scores == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_threshold(positive: np.ndarray, negative: np.ndarray) -> float:
    """The cut between the classes with the fewest errors (midpoint between neighbouring scores)."""
    cuts = np.sort(np.concatenate([positive, negative]))
    mids = (cuts[1:] + cuts[:-1]) / 2
    errors = [(positive < t).sum() + (negative >= t).sum() for t in mids]
    return float(mids[int(np.argmin(errors))])


def encode_pairs(clip, images, captions, batch_size: int = 256) -> np.ndarray:
    """Cosine similarity of each image with its caption: the plain open_clip computation."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            pix = torch.stack([clip.preprocess(im) for im in images[s:s + batch_size]])
            tok = clip.tokenizer(captions[s:s + batch_size])
            img = torch.nn.functional.normalize(clip.model.encode_image(pix), dim=-1)
            txt = torch.nn.functional.normalize(clip.model.encode_text(tok), dim=-1)
            out.append((img * txt).sum(-1).numpy())
    return np.concatenate(out)


def train(out: Path, steps: int, batch_size: int, train_size: int, lr: float, threads: int, seed: int) -> dict:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from filters.clip_model import load_clip

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(caption_words())
    write_bpe(out / BPE_FILE, merges)
    vocab_size = 512 + len(merges) + 2  # bytes, bytes+</w>, merges, <start_of_text>, <end_of_text>
    config_path = out / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(model_config(vocab_size), indent=2) + "\n")

    clip = load_clip(str(config_path), None)
    model = clip.model.train()
    t0 = time.time()
    pairs = synthetic.make_pairs(train_size, seed=seed, size=RENDER_SIZE)
    pixels = torch.stack([clip.preprocess(im) for im, _ in pairs])
    tokens = clip.tokenizer([c for _, c in pairs])
    print(f"data: {train_size} pairs in {time.time() - t0:.1f}s; vocab {vocab_size}; "
          f"params {sum(p.numel() for p in model.parameters()):,}", flush=True)

    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, train_size, (batch_size,), generator=gen)
        img, txt, scale = model(pixels[idx], tokens[idx])[:3]
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  scale {model.logit_scale.exp().item():.1f}  "
                  f"{time.time() - t0:.0f}s", flush=True)

    model.eval()
    weights = out / f"{MODEL_NAME}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    metrics = evaluate(config_path, weights, seed=seed + 1)
    metrics.update(steps=steps, batch_size=batch_size, train_size=train_size, lr=lr, seed=seed,
                   train_seconds=round(time.time() - t0, 1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate(config_path: Path, weights: Path, seed: int, n: int = 1000) -> dict:
    """Held-out ROC AUC (matched vs shuffled and vs one-attribute-changed captions), loaded back
    through open_clip from the saved files."""
    import random

    from filters.clip_model import load_clip

    clip = load_clip(str(config_path), str(weights))
    scenes = synthetic.make_scenes(n, seed=seed)
    images = [s.render(RENDER_SIZE) for s in scenes]
    captions = [s.caption() for s in scenes]
    matched = encode_pairs(clip, images, captions)
    shuffled = encode_pairs(clip, images, synthetic.shuffled_captions(captions, seed))
    rng = random.Random(seed)
    altered = encode_pairs(clip, images, [s.altered(rng).caption() for s in scenes])
    return {
        "heldout_seed": seed, "heldout_pairs": n,
        "auc_shuffled": round(roc_auc(matched, shuffled), 4),
        "auc_one_attribute_changed": round(roc_auc(matched, altered), 4),
        "threshold": round(best_threshold(matched, shuffled), 4),
        "matched_mean": round(float(matched.mean()), 4), "shuffled_mean": round(float(shuffled.mean()), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(TINY_CLIP))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    metrics = train(Path(a.out), a.steps, a.batch_size, a.train_size, a.lr, a.threads, a.seed)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

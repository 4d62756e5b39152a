"""Tiny aesthetic and NSFW heads in the published checkpoint layouts (see ``filters/clip_heads.py``),
with random weights, and a Hugging Face cache folder in the hub's real layout, for tests and
benchmarks: the same loading code as LAION's checkpoints, no download."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch


def _linear(gen: torch.Generator, out: int, inp: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"weight": torch.randn(out, inp, generator=gen) * scale / inp ** 0.5,
            "bias": torch.randn(out, generator=gen) * 0.1}


def aesthetic_state(width: int, seed: int = 0, hidden: tuple[int, ...] = (1024, 128, 64, 16)) -> dict:
    """improved-aesthetic-predictor's keys: layers.{0,2,4,6,7} of its nn.Sequential."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (width, *hidden, 1)
    state = {}
    for index, (inp, out) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        for k, v in _linear(gen, out, inp).items():
            state[f"layers.{index}.{k}"] = v
    state["layers.7.bias"] += 5.0  # scores around the published model's range (about 1..10)
    return state


def nsfw_state(width: int, seed: int = 0) -> dict:
    """The PyTorch port of the CLIP-based-NSFW-Detector: norm.{mean,variance}, linear_1..4."""
    gen = torch.Generator().manual_seed(seed)
    state = {"norm.mean": torch.randn(width, generator=gen) * 0.01,
             "norm.variance": torch.rand(width, generator=gen) * 0.004 + 0.003}
    sizes = (width, 64, 512, 256, 1)
    for k, (inp, out) in enumerate(zip(sizes, sizes[1:]), 1):
        for part, v in _linear(gen, out, inp).items():
            state[f"linear_{k}.{part}"] = v
    return state


def save_head(path: Path, state: dict) -> Path:
    """``torch.save`` of the state dict, as the published ``.pth`` files are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def hub_cache(cache_dir: Path, repo_id: str, filename: str, source: Path, commit: str = "0" * 40) -> Path:
    """Put ``source`` into ``cache_dir`` as the hub client stores a download of ``repo_id``'s
    ``filename``: blobs/<sha256>, snapshots/<commit>/<filename> linking to it, refs/main."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    data = source.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, blob)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path("../" * (len(Path(filename).parts) + 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return link

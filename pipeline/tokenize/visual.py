"""The visual tokenizer stage: images and clips to discrete ids (VQ) or float16 latents (VAE).

A :class:`~pipeline.core.model_stage.ModelStage`: on Ray a pool of actors, one model per actor, on a GPU
when there is one. While
the model codes one batch, worker threads decode and resize the next ones (PIL and PyAV release
the GIL), so the accelerator does not wait on JPEG decoding. Samples are batched by pixel size
(aspect buckets give several sizes per shard); a batch that raises is retried sample by sample so
that one bad sample is marked failed instead of failing the shard. The retry starts after the
failed batch's tensors are freed (after an out-of-memory error they would hold the GPU memory the
retries need); an error that poisons the CUDA context fails the shard instead (every later sample
of the worker would fail too, and the shard would be written as if complete), so a rerun redoes it.

The compute dtype is ``dtype`` on CUDA, float32 on the CPU, and float32 for an AutoencoderKL whose
config says ``force_upcast`` when float16 is asked (the SDXL VAE overflows in float16).
"""
from __future__ import annotations

import collections
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.model_stage import ModelStage, free_cuda_memory, poisons_device
from pipeline.core.schema import Batch, ErrorKind
from pipeline.media.npy import npy_bytes

from .checkpoint import Checkpoint, resolve_checkpoint
from .common import FORMAT_VERSION, with_id
from .config import ImageTokenizeConfig
from .media import media_error_kind, read_media
from .models import MODELS, ModelInfo, VisualModel, detect, weight_filter
from .policy import ResolutionPolicy, fit, make_policy

log = logging.getLogger("mmcurate")
NORMALIZE = "rgb/127.5-1"  # every supported tokenizer reads RGB in [-1, 1]


@dataclass
class Prepared:
    """One sample's pixels as the tokenizer will read them."""

    pixels: np.ndarray   # uint8 (T, H, W, 3); T = 1 for an image
    label: str           # the policy applied, e.g. "center_crop:256x256" or "bucket:192x320,frames:8"


def prepare(files: dict[str, bytes], policy: ResolutionPolicy, frames: int) -> Prepared:
    """Decode a sample's image or clip and fit every frame to the policy's target size."""
    images, is_video = read_media(files, frames)
    width, height = images[0].size  # before any reduced-scale decode, so buckets see the true ratio
    size, label = policy.target(width, height), policy.label(width, height)
    pixels = np.stack([np.asarray(fit(im, size), dtype=np.uint8) for im in images])
    return Prepared(pixels, f"{label},frames:{frames}" if is_video else label)


def to_pixels(arrays: list[np.ndarray], device: Any = "cpu"):
    """uint8 (T, H, W, 3) arrays -> float (B, T, 3, H, W) in [-1, 1] on ``device``; the uint8
    batch crosses to the GPU (4x fewer bytes) and is normalised there."""
    import torch

    x = torch.from_numpy(np.stack(arrays))
    if torch.device(device).type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    # contiguous, as a user's tensor would be: a channels-last view may pick other conv kernels
    return x.permute(0, 1, 4, 2, 3).contiguous().float().div_(127.5).sub_(1.0)


def prefetch(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator[tuple[Any, Future]]:
    """``fn`` over ``items`` in ``pool``, in order, at most ``window`` items ahead of the consumer."""
    pending: collections.deque = collections.deque()
    items = iter(items)
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


class VisualTokenizeStage(ModelStage):
    name = "tokenize_image"
    worker_state = ("_model", "_pool")
    document_view = "image"  # on documents: each kept image, its ids in member image_NNN.image_ids.npy

    def __init__(self, config: ImageTokenizeConfig):
        super().__init__(config)
        self.checkpoint: Optional[Checkpoint] = None
        self.info: Optional[ModelInfo] = None
        self.policy: Optional[ResolutionPolicy] = None
        self._fingerprint: Optional[dict] = None
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def columns(self) -> dict[str, str]:
        return {"image_tokenizer": "string", "image_policy": "string", "image_grid": "string",
                "vae_scaling_factor": "double", "vae_shift_factor": "double"}

    # -- building ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Resolve the checkpoint and check the options that depend on it (raises ConfigError)."""
        if self.info is not None:
            return
        c = self.config
        self.checkpoint = resolve_checkpoint(c.model, c.revision, c.subfolder, weight_filter)
        info = detect(self.checkpoint.config(), c.model_class)
        if c.frames % info.temporal_factor:
            raise ConfigError(f"frames: {c.frames} is not a multiple of the model's temporal factor "
                              f"{info.temporal_factor}")
        self.policy = make_policy(c.policy, c.resolution, c.buckets, info.spatial_factor)
        self.info = info

    @property
    def compute_dtype(self) -> str:
        if self.device != "cuda":
            return "float32"
        self.check()
        if self.config.dtype == "float16" and self.info.force_upcast:
            return "float32"  # as diffusers does: the checkpoint says float16 overflows
        return self.config.dtype

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self.check()
            info, c = self.info, self.config
            fp = {
                "stage": self.name, "format_version": FORMAT_VERSION,
                "class": info.cls, "kind": info.kind, "output": info.output,
                "source": c.model, "revision": self.checkpoint.revision, "subfolder": c.subfolder,
                "weights_sha256": self.checkpoint.weights_sha256(weight_filter(self.checkpoint.config())),
                "preprocessing": {**self.policy.describe(), "normalize": NORMALIZE,
                                  "video_frames": c.frames, "frame_sampling": "uniform"},
                "dtype": self.compute_dtype,
                "spatial_factor": info.spatial_factor, "temporal_factor": info.temporal_factor,
            }
            if info.kind == "vq":
                fp.update(codebook_size=info.codebook_size, ids_dtype=info.id_dtype)
            else:
                fp.update(latents=c.latents, latent_channels=info.latent_channels, latents_dtype="float16",
                          scaling_factor=info.scaling_factor, shift_factor=info.shift_factor)
            if c.policy == "center_crop":
                side = c.resolution // info.spatial_factor
                fp["grid"] = [side, side]
                fp["video_grid"] = [c.frames // info.temporal_factor, side, side]
            self._fingerprint = with_id(fp)
        return self._fingerprint

    # -- running -----------------------------------------------------------------------------------
    def load_model(self) -> VisualModel:
        import torch

        self.fingerprint()  # resolves the checkpoint in a worker too
        return MODELS[self.info.cls](self.info, self.checkpoint, torch.device(self.device), self.config.latents)

    def setup(self) -> None:
        super().setup()
        if self._pool is None:
            # On CPU the model's own threads use the cores; several decode threads preempting them
            # cost the model ~20% (benchmarks/tokenization.py), one keeps decoding off its path.
            threads = self.config.decode_threads or (4 if self.device == "cuda" else 1)
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize-decode")

    def process(self, batch: Batch) -> Batch:
        self.setup()
        c = self.config
        groups: dict[tuple, list[tuple[int, Prepared]]] = {}
        rows = schema.alive(batch)
        window = c.batch_size * c.prefetch_batches
        decode = lambda i: prepare(batch[schema.FILES][i], self.policy, c.frames)  # noqa: E731
        for i, future in prefetch(self._pool, decode, rows, window):
            try:
                item = future.result()
            except Exception as e:  # undecodable or missing media: this sample only
                schema.mark(batch, i, media_error_kind(e), f"{self.name}: {type(e).__name__}: {e}")
                continue
            group = groups.setdefault(item.pixels.shape, [])
            group.append((i, item))
            if len(group) == c.batch_size:
                self._encode_group(batch, groups.pop(item.pixels.shape))
        for group in groups.values():
            self._encode_group(batch, group)
        return batch

    def encode(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Code a batch of same-size uint8 (T, H, W, 3) arrays with the loaded model."""
        import torch

        model = self.model
        pixels = to_pixels(arrays, model.device)
        autocast = model.device.type == "cuda" and self.compute_dtype != "float32"
        with torch.inference_mode(), torch.autocast(model.device.type, dtype=getattr(torch, self.compute_dtype),
                                                    enabled=autocast):
            return model.encode(pixels)

    def _encode_group(self, batch: Batch, group: list[tuple[int, Prepared]]) -> None:
        try:
            outputs = self.encode([p.pixels for _, p in group])
        except Exception as e:
            if poisons_device(e):
                raise self.lost_device(e) from e
            failure = f"{type(e).__name__}: {e}"
        else:
            self._store(batch, group, outputs)
            return
        # Out of the handler: the exception, its traceback and the batch's tensors are gone now.
        free_cuda_memory()
        if len(group) == 1:
            schema.mark(batch, group[0][0], ErrorKind.STAGE_ERROR, f"{self.name}: {failure}")
            return
        log.warning("%s: a batch of %d failed (%s); retrying sample by sample", self.name, len(group), failure)
        for item in group:
            self._encode_group(batch, [item])

    def _store(self, batch: Batch, group: list[tuple[int, Prepared]], outputs: list[np.ndarray]) -> None:
        info = self.info
        rows = [i for i, _ in group]
        for i, out in zip(rows, outputs):
            if info.kind == "vq":
                out = out.astype(info.id_dtype)
            batch[schema.FILES][i][info.output] = npy_bytes(out)
        schema.set_column(batch, "image_tokenizer", rows, [self._fingerprint["id"]] * len(rows))
        schema.set_column(batch, "image_policy", rows, [p.label for _, p in group])
        schema.set_column(batch, "image_grid", rows, ["x".join(map(str, o.shape)) for o in outputs])
        if info.kind == "vae":
            schema.set_column(batch, "vae_scaling_factor", rows, [info.scaling_factor] * len(rows))
            schema.set_column(batch, "vae_shift_factor", rows, [info.shift_factor] * len(rows))

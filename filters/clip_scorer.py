"""Score (image bytes, caption) pairs with an open_clip model: cosine similarity of the image and
caption embeddings, in batches, decoding the next batch on CPU threads while the model runs.

Two decoders produce the model's input:

* ``pil``: PIL decode plus the model's own open_clip transform (resize, crop, normalise), one
  image per thread: the same numbers as open_clip. With ``draft``, JPEGs at least twice the model's
  input (e.g. 512 px stored for a 224 px model; not 256 px) are decoded at reduced scale in the DCT
  domain first: several times cheaper, but the pixels differ from a full decode, so scores move a
  little (tiny CLIP, 64 -> 32 px: mean 0.006, max 0.03). ``draft: false`` keeps them exact.
* ``torch``: ``torchvision.io.decode_jpeg`` for the whole batch on the model's device (nvJPEG on a
  GPU), then resize / crop / normalise as tensor ops there; other formats go through PIL.
"""
from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.media.geometry import center_offset, torchvision_short_side

from .clip_model import ClipModel

Decoded = tuple[torch.Tensor, list[int], dict[int, str]]  # pixels of the ok images, their positions, errors


def _open(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


class PilDecoder:
    """PIL decode plus the model's own preprocessing, one image per pool thread."""

    def __init__(self, clip: ClipModel, draft: bool) -> None:
        self.preprocess = clip.preprocess
        self.size = clip.image_size
        self.draft = draft
        self.pin = clip.device.type == "cuda"  # page-locked memory: the copy to the GPU is asynchronous

    def one(self, data: bytes) -> torch.Tensor:
        im = Image.open(io.BytesIO(data))
        if self.draft:
            im.draft("RGB", (self.size, self.size))  # keeps both sides >= size; no-op unless JPEG
        return self.preprocess(im.convert("RGB"))

    def start(self, pool: ThreadPoolExecutor, images: list[bytes]) -> Callable[[], Decoded]:
        futures = [pool.submit(self.one, data) for data in images]

        def result() -> Decoded:
            tensors, ok, errors = [], [], {}
            for k, f in enumerate(futures):
                try:
                    tensors.append(f.result())
                    ok.append(k)
                except Exception as e:  # noqa: BLE001 - a bad image fails only itself
                    errors[k] = f"{type(e).__name__}: {e}"
            pixels = torch.stack(tensors) if tensors else torch.empty(0)
            return (pixels.pin_memory() if self.pin and tensors else pixels), ok, errors
        return result


class TorchDecoder:
    """Batch decode on the model's device, then the open_clip transform as tensor ops."""

    def __init__(self, clip: ClipModel) -> None:
        self.device = clip.device
        self.size = clip.image_size
        self.mode = "bilinear" if clip.interpolation == "bilinear" else "bicubic"
        self.mean = torch.tensor(clip.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(clip.std, device=self.device).view(1, 3, 1, 1)
        if clip.resize_mode != "shortest":
            raise ValueError(f"decode: torch implements resize_mode 'shortest' only; the model uses "
                             f"{clip.resize_mode!r} (use decode: pil)")

    def _decode(self, images: list[bytes]) -> tuple[list[Optional[torch.Tensor]], dict[int, str]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[Optional[torch.Tensor]] = [None] * len(images)
        errors: dict[int, str] = {}
        jpegs = [k for k, d in enumerate(images) if d[:3] == b"\xff\xd8\xff"]
        if jpegs:
            raw = [torch.frombuffer(bytearray(images[k]), dtype=torch.uint8) for k in jpegs]
            try:
                for k, t in zip(jpegs, decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)):
                    out[k] = t
            except RuntimeError:  # one corrupt JPEG fails the batch call: fall back to one by one
                for k, r in zip(jpegs, raw):
                    try:
                        out[k] = decode_jpeg(r, mode=ImageReadMode.RGB, device=self.device)
                    except RuntimeError as e:
                        errors[k] = f"RuntimeError: {e}"
        for k, d in enumerate(images):
            if out[k] is None and k not in errors:
                try:
                    arr = np.asarray(_open(d).convert("RGB"))
                    out[k] = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(self.device)
                except Exception as e:  # noqa: BLE001
                    errors[k] = f"{type(e).__name__}: {e}"
        return out, errors

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision ``Resize(size)`` (shorter side to size) then ``CenterCrop(size)``, batched."""
        h, w = x.shape[-2:]
        s = self.size
        new = torchvision_short_side(w, h, s)
        if new != (h, w):
            x = F.interpolate(x, size=new, mode=self.mode, antialias=True, align_corners=False)
            x = x.clamp_(0, 255).round_()  # as PIL: resized pixels are 8-bit again
        top, left = center_offset(x.shape[-2], s), center_offset(x.shape[-1], s)
        return x[..., top:top + s, left:left + s]

    def decode(self, images: list[bytes]) -> Decoded:
        tensors, errors = self._decode(images)
        ok = [k for k, t in enumerate(tensors) if t is not None]
        pixels = torch.empty(len(ok), 3, self.size, self.size, device=self.device)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for p, k in enumerate(ok):
            by_shape.setdefault(tuple(tensors[k].shape[-2:]), []).append(p)
        for positions in by_shape.values():  # one resize per distinct input size
            x = torch.stack([tensors[ok[p]] for p in positions]).float()
            pixels[positions] = self._resize_crop(x)
        pixels = (pixels / 255.0 - self.mean) / self.std
        return pixels, ok, errors

    def start(self, pool: ThreadPoolExecutor, images: list[bytes]) -> Callable[[], Decoded]:
        future: Future = pool.submit(self.decode, images)
        return future.result


@dataclass
class Prepared:
    start: int                 # position of the batch's first row in the call's lists
    pixels: torch.Tensor       # the decodable images, preprocessed
    ok: list[int]              # their positions within the batch
    errors: dict[int, str]     # position within the batch -> why it could not be decoded
    tokens: torch.Tensor       # every caption of the batch, tokenized


@dataclass
class Scores:
    scores: np.ndarray                 # float32, NaN where the image could not be decoded
    image_embeddings: Optional[np.ndarray]  # float16 [n, dim], L2-normalised, when asked for
    errors: dict[int, str]             # position -> why the image could not be decoded


class ClipScorer:
    def __init__(self, clip: ClipModel, batch_size: int = 256, precision: str = "auto", decode: str = "auto",
                 draft: bool = True, threads: int = 2) -> None:
        self.clip = clip
        self.batch_size = batch_size
        cuda = clip.device.type == "cuda"
        self.autocast = precision == "bf16" or (precision == "auto" and cuda)
        use_torch = decode == "torch" or (decode == "auto" and cuda)
        self.decoder = TorchDecoder(clip) if use_torch else PilDecoder(clip, draft)
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="clip-decode")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _start(self, images: list[bytes], captions: list[str]):
        decoded = self.decoder.start(self.pool, images)
        tokens = self.pool.submit(self.clip.tokenizer, captions)
        return decoded, tokens

    def _embed(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device, model = self.clip.device, self.clip.model
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        with torch.inference_mode(), amp:
            image = model.encode_image(pixels.to(device, non_blocking=True))
            text = model.encode_text(tokens.to(device, non_blocking=True))
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def batches(self, images: list[bytes], captions: list[str]) -> Iterator[Prepared]:
        """The model's inputs, batch by batch; the next batch decodes on the pool while the caller
        works on the one it was given."""
        n, bs = len(images), self.batch_size
        pending = self._start(images[:bs], captions[:bs]) if n else None
        for start in range(0, n, bs):
            decoded, tokens = pending
            if start + bs < n:
                pending = self._start(images[start + bs:start + 2 * bs], captions[start + bs:start + 2 * bs])
            pixels, ok, errors = decoded()
            yield Prepared(start, pixels, ok, errors, tokens.result())

    def score(self, images: list[bytes], captions: list[str], embeddings: bool = False) -> Scores:
        scores = np.full(len(images), np.nan, dtype=np.float32)
        stored: Optional[np.ndarray] = None
        errors: dict[int, str] = {}
        for b in self.batches(images, captions):
            errors.update({b.start + k: msg for k, msg in b.errors.items()})
            if not b.ok:
                continue
            image, text = self._embed(b.pixels, b.tokens[b.ok])
            rows = np.asarray(b.ok) + b.start
            scores[rows] = (image * text).sum(-1).cpu().numpy()
            if embeddings:
                if stored is None:
                    stored = np.zeros((len(images), image.shape[1]), dtype=np.float16)
                stored[rows] = image.cpu().numpy().astype(np.float16)
        return Scores(scores, stored, errors)

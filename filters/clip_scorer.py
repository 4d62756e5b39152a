"""Score (image bytes, caption) pairs with an open_clip model: cosine similarity of the image and
caption embeddings, in batches, decoding the next batch on CPU threads while the model runs.

Two decoders produce the model's input:

* ``pil``: PIL decode plus the model's own open_clip transform (resize, crop, normalise), one
  image per thread: the same numbers as open_clip, for every resize mode. The batch is assembled
  (and pinned, on CUDA) by a pool thread too, so the model thread only takes it. With ``draft``, JPEGs at least twice the model's
  input (e.g. 512 px stored for a 224 px model; not 256 px) are decoded at reduced scale in the DCT
  domain first: several times cheaper, but the pixels differ from a full decode, so scores move a
  little (tiny CLIP, 64 -> 32 px: mean 0.006, max 0.03). ``draft: false`` keeps them exact.
* ``torch``: ``torchvision.io.decode_jpeg`` for the whole batch on the model's device (nvJPEG on a
  GPU), then resize / crop / normalise as tensor ops there, as torchvision does them (shorter
  side resized, ``CenterCrop``'s rounding); other formats, and every JPEG the device decoder
  rejects (unusual chroma subsampling, arithmetic coding, 12-bit), go through PIL. It implements
  open_clip's ``shortest`` resize mode only: ``decode: auto`` picks it on CUDA for such models.

An item may also be a decoded RGB frame (a uint8 ``(H, W, 3)`` array: the frames of a video clip,
:mod:`filters.frames`): it skips the opening and goes to the same transform on either path.

Without captions (``score(images, None, embeddings=True)``) only the image tower runs: the image
embeddings other filters read. Captions go through the model's own open_clip tokenizer, which is pure Python (about 14k
captions/s on one thread, holding the GIL the model thread needs to launch its kernels): on CUDA
it runs in a process of its own, which gives the same ids.

Every image is opened through :func:`pipeline.media.image_open.open_image` first: the format
whitelist and the pixel cap apply before any decoding, on either path. The device, precision and
decoder are resolved by :func:`resolve_precision` and :func:`resolve_decode`, once, in the driver.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.schema import ErrorKind
from pipeline.media.geometry import MAX_PIXELS, torchvision_center_offset, torchvision_short_side
from pipeline.core.model_stage import poisons_device
from pipeline.media.image_open import ImageRejected, open_image

from .clip_model import TORCH_RESIZE_MODES, ClipModel, resolve_decode, resolve_precision

Problem = tuple[str, str]  # (ErrorKind, message): why an image could not be decoded
Decoded = tuple[torch.Tensor, list[int], dict[int, Problem]]  # pixels of the ok images, their positions, errors
_JPEG_FORMATS = ("JPEG", "MPO")


def problem(error: Exception) -> Problem:
    if poisons_device(error):  # not this image's problem: the worker's context is gone
        raise error
    if isinstance(error, ImageRejected):
        return error.kind, str(error)
    if isinstance(error, Image.DecompressionBombError):  # PIL's own backstop
        return ErrorKind.DECOMPRESSION_BOMB, str(error)
    return ErrorKind.DECODE_ERROR, f"{type(error).__name__}: {error}"


_TOKENIZER: Optional[Callable] = None  # in a tokenizer process: the model's tokenizer


def _take_tokenizer(tokenizer: Callable) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _tokenize(captions: list[str]) -> np.ndarray:
    return _TOKENIZER(captions).numpy()  # numpy: pickled back as one buffer


def _rgb(data: bytes, max_pixels: int) -> Image.Image:
    with open_image(data, max_pixels) as im:
        return im.convert("RGB")


class PilDecoder:
    """PIL decode plus the model's own preprocessing, one image per pool thread."""

    def __init__(self, clip: ClipModel, draft: bool, max_pixels: int = MAX_PIXELS) -> None:
        self.preprocess = clip.preprocess
        self.size = clip.image_size
        self.draft = draft
        self.max_pixels = max_pixels
        self.pin = clip.device.type == "cuda"  # page-locked memory: the copy to the GPU is asynchronous

    def one(self, data: Union[bytes, np.ndarray]) -> torch.Tensor:
        if isinstance(data, np.ndarray):  # a decoded video frame (RGB, uint8)
            return self.preprocess(Image.fromarray(data, "RGB"))
        with open_image(data, self.max_pixels) as im:
            if self.draft:
                im.draft("RGB", (self.size, self.size))  # keeps both sides >= size; no-op unless JPEG
            return self.preprocess(im.convert("RGB"))

    def _assemble(self, futures: list[Future]) -> Decoded:
        """The batch in one tensor, pinned on CUDA: one copy, on a pool thread. The image tasks
        were queued before this one, so waiting on them here cannot deadlock the pool."""
        tensors, ok, errors = [], [], {}
        for k, f in enumerate(futures):
            try:
                tensors.append(f.result())
                ok.append(k)
            except Exception as e:  # noqa: BLE001 - a bad image fails only itself
                errors[k] = problem(e)
        if not tensors:
            return torch.empty(0), ok, errors
        out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=self.pin)
        return torch.stack(tensors, out=out), ok, errors

    def start(self, pool: ThreadPoolExecutor, images: list[bytes]) -> Callable[[], Decoded]:
        futures = [pool.submit(self.one, data) for data in images]
        return pool.submit(self._assemble, futures).result


class TorchDecoder:
    """Batch decode on the model's device, then the open_clip transform as tensor ops."""

    def __init__(self, clip: ClipModel, max_pixels: int = MAX_PIXELS) -> None:
        self.device = clip.device
        self.size = clip.image_size
        self.max_pixels = max_pixels
        self.mode = "bilinear" if clip.interpolation == "bilinear" else "bicubic"
        self.mean = torch.tensor(clip.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(clip.std, device=self.device).view(1, 3, 1, 1)
        if clip.resize_mode not in TORCH_RESIZE_MODES:  # check() refuses this in the driver
            raise ValueError(f"decode: torch implements resize_mode 'shortest' only; the model uses "
                             f"{clip.resize_mode!r} (use decode: pil)")

    def _jpegs(self, images: list[bytes], errors: dict[int, Problem]) -> list[int]:
        """The positions of the JPEGs, after the whitelist and the pixel cap (header only)."""
        jpegs = []
        for k, data in enumerate(images):
            if isinstance(data, np.ndarray):  # a decoded video frame: nothing to open
                continue
            try:
                with open_image(data, self.max_pixels) as im:
                    if im.format in _JPEG_FORMATS:
                        jpegs.append(k)
            except Exception as e:  # noqa: BLE001 - a bad image fails only itself
                errors[k] = problem(e)
        return jpegs

    def _decode(self, images: list[bytes]) -> tuple[list[Optional[torch.Tensor]], dict[int, Problem]]:
        from torchvision import io as tvio  # looked up per call: tests stand a failing decoder in

        out: list[Optional[torch.Tensor]] = [None] * len(images)
        errors: dict[int, Problem] = {}
        jpegs = self._jpegs(images, errors)
        if jpegs:
            raw = [torch.frombuffer(bytearray(images[k]), dtype=torch.uint8) for k in jpegs]
            try:
                for k, t in zip(jpegs, tvio.decode_jpeg(raw, mode=tvio.ImageReadMode.RGB, device=self.device)):
                    out[k] = t
            except RuntimeError as e:  # one JPEG it rejects fails the batch call: one by one
                if poisons_device(e):
                    raise
                for k, r in zip(jpegs, raw):
                    try:
                        out[k] = tvio.decode_jpeg(r, mode=tvio.ImageReadMode.RGB, device=self.device)
                    except RuntimeError as e:
                        if poisons_device(e):
                            raise
                        # one the device decoder rejects: PIL decodes it below
        for k, d in enumerate(images):
            if out[k] is None and k not in errors:
                try:
                    arr = d if isinstance(d, np.ndarray) else np.asarray(_rgb(d, self.max_pixels))
                    out[k] = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(self.device)
                except Exception as e:  # noqa: BLE001
                    errors[k] = problem(e)
        return out, errors

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision ``Resize(size)`` (shorter side to size) then ``CenterCrop(size)``, batched."""
        h, w = x.shape[-2:]
        s = self.size
        new = torchvision_short_side(w, h, s)
        if new != (h, w):
            x = F.interpolate(x, size=new, mode=self.mode, antialias=True, align_corners=False)
            x = x.clamp_(0, 255).round_()  # as PIL: resized pixels are 8-bit again
        top, left = torchvision_center_offset(x.shape[-2], s), torchvision_center_offset(x.shape[-1], s)
        return x[..., top:top + s, left:left + s]

    def decode(self, images: list[bytes]) -> Decoded:
        """The images grouped by size (one resize per size), in group order: ``ok`` says which
        image each row is, so no indexed copy (a blocking host-to-device index per size) is needed."""
        tensors, errors = self._decode(images)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for k, t in enumerate(tensors):
            if t is not None:
                by_shape.setdefault(tuple(t.shape[-2:]), []).append(k)
        ok = [k for group in by_shape.values() for k in group]
        if not ok:
            return torch.empty(0, 3, self.size, self.size, device=self.device), ok, errors
        pixels = torch.cat([self._resize_crop(torch.stack([tensors[k] for k in group]).float())
                            for group in by_shape.values()])
        return (pixels / 255.0 - self.mean) / self.std, ok, errors

    def start(self, pool: ThreadPoolExecutor, images: list[bytes]) -> Callable[[], Decoded]:
        future: Future = pool.submit(self.decode, images)
        return future.result


@dataclass
class Prepared:
    start: int                 # position of the batch's first row in the call's lists
    pixels: torch.Tensor       # the decodable images, preprocessed
    ok: list[int]              # their positions within the batch, row by row of ``pixels``
    errors: dict[int, Problem]  # position within the batch -> why it could not be decoded
    tokens: Optional[torch.Tensor]  # every caption of the batch, tokenized (None: no captions)


@dataclass
class Scores:
    scores: np.ndarray                 # float32, NaN where the image could not be decoded (or no captions)
    image_embeddings: Optional[np.ndarray]  # float32 [n, dim], L2-normalised, when asked for
    errors: dict[int, Problem]         # position -> (ErrorKind, why the image could not be decoded)


class ClipScorer:
    def __init__(self, clip: ClipModel, batch_size: int = 256, precision: str = "auto", decode: str = "auto",
                 draft: bool = True, threads: int = 2, tokenize_processes: Optional[int] = None) -> None:
        self.clip = clip
        self.batch_size = batch_size
        device = clip.device.type
        self.autocast = resolve_precision(precision, device) == "bf16"
        use_torch = resolve_decode(decode, device, clip.resize_mode) == "torch"
        self.decoder = TorchDecoder(clip) if use_torch else PilDecoder(clip, draft)
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="clip-decode")
        processes = (1 if device == "cuda" else 0) if tokenize_processes is None else tokenize_processes
        # spawn, not fork: a forked child of a process that initialised CUDA cannot use it safely
        self.text_pool = ProcessPoolExecutor(processes, multiprocessing.get_context("spawn"), _take_tokenizer,
                                             (clip.tokenizer,)) if processes else None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.text_pool is not None:
            self.text_pool.shutdown(wait=False, cancel_futures=True)

    def _start(self, images: list[bytes], captions: Optional[list[str]]):
        decoded = self.decoder.start(self.pool, images)
        if captions is None:
            tokens = None
        elif self.text_pool is None:
            tokens = self.pool.submit(self.clip.tokenizer, captions)
        else:
            tokens = self.text_pool.submit(_tokenize, captions)
        return decoded, tokens

    def _embed(self, pixels: torch.Tensor, tokens: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """L2-normalised float32 image embeddings, and text ones when there are tokens."""
        device, model = self.clip.device, self.clip.model
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        with torch.inference_mode(), amp:
            image = model.encode_image(pixels.to(device, non_blocking=True))
            text = None if tokens is None else model.encode_text(tokens.to(device, non_blocking=True))
        return F.normalize(image.float(), dim=-1), None if text is None else F.normalize(text.float(), dim=-1)

    def batches(self, images: list[bytes], captions: Optional[list[str]]) -> Iterator[Prepared]:
        """The model's inputs, batch by batch; the next batch decodes on the pool while the caller
        works on the one it was given."""
        n, bs = len(images), self.batch_size
        pending = self._start(images[:bs], None if captions is None else captions[:bs]) if n else None
        for start in range(0, n, bs):
            decoded, tokens = pending
            if start + bs < n:
                pending = self._start(images[start + bs:start + 2 * bs],
                                      None if captions is None else captions[start + bs:start + 2 * bs])
            pixels, ok, errors = decoded()
            yield Prepared(start, pixels, ok, errors, None if tokens is None else torch.as_tensor(tokens.result()))

    def score(self, images: list[bytes], captions: Optional[list[str]], embeddings: bool = False) -> Scores:
        """Cosine similarity of each image with its caption (captions None: image embeddings only)."""
        scores = np.full(len(images), np.nan, dtype=np.float32)
        stored: Optional[np.ndarray] = None
        errors: dict[int, Problem] = {}
        for b in self.batches(images, captions):
            errors.update({b.start + k: msg for k, msg in b.errors.items()})
            if not b.ok:
                continue
            image, text = self._embed(b.pixels, None if b.tokens is None else b.tokens[b.ok])
            rows = np.asarray(b.ok) + b.start
            if text is not None:
                scores[rows] = (image * text).sum(-1).cpu().numpy()
            if embeddings:
                if stored is None:
                    stored = np.zeros((len(images), image.shape[1]), dtype=np.float32)
                stored[rows] = image.cpu().numpy()
        return Scores(scores, stored, errors)

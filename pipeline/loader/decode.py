"""Decoding: member bytes to tensors (images, ``.npy`` arrays, text, json), one sample or a batch
column at a time, and collation of decoded samples.

Member bytes are untrusted: every image is opened with ``pipeline.media.image_open.open_image``
(the download path's format whitelist and pixel cap, checked on the header before any pixel is
decoded, so an EPS named ``.jpg`` never reaches Ghostscript and a bomb never allocates), and
``.npy`` arrays with ``pipeline.media.npy`` (declared sizes are checked against the bytes, object
arrays refused). A failure raises; the dataset turns it into a skipped sample."""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import simplejpeg
import torch
from torch.utils.data import get_worker_info

from pipeline.core.schema import IMAGE_EXTENSIONS
from pipeline.media.geometry import MAX_PIXELS, RESIZE_MODES, plan_geometry
from pipeline.media.image_open import open_image
from pipeline.media.npy import npy_header, read_npy

def batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch. In a DataLoader worker it lives in shared memory (as
    torch's default_collate does it), so handing it to the trainer costs no further copy."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    try:
        storage = elem._typed_storage()._new_shared(math.prod(shape), device="cpu")
    except AttributeError:  # a private API; without it torch copies the tensor to shared memory itself
        return torch.empty(tuple(shape), dtype=dtype)
    return elem.new(storage).resize_(*shape)


def decode_npy_batch(datas: Sequence[bytes]) -> Union[torch.Tensor, list[np.ndarray]]:
    """Same-shape arrays in one tensor, copied once (the common case: fixed-length token ids);
    arrays of different shapes or types come back one by one."""
    first = datas[0]
    dtype, shape, fortran, start = npy_header(first)
    size = len(first)
    if fortran or not dtype.isnative or size != start + math.prod(shape) * dtype.itemsize or len(
            set(map(len, datas))) != 1:
        return [read_npy(d) for d in datas]
    rows = np.frombuffer(b"".join(datas), np.uint8).reshape(len(datas), size)
    if not (rows[:, :start] == rows[0, :start]).all():  # same header: same dtype and shape
        return [read_npy(d) for d in datas]
    out = batch_tensor((len(datas), *shape), torch.from_numpy(np.empty(0, dtype)).dtype)
    out.numpy().reshape(len(datas), -1).view(np.uint8)[:] = rows[:, start:]
    return out


@dataclass(frozen=True)
class ImageOptions:
    dtype: str = "uint8"             # "uint8" (0..255) or "float32" (0..1)
    size: Optional[int] = None       # resize with the download stage's semantics when set
    resize_mode: str = "center_crop"
    max_pixels: int = MAX_PIXELS     # width * height cap, read from the header (as on download)

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "float32"):
            raise ValueError(f"image_dtype must be 'uint8' or 'float32', got {self.dtype!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.size is not None and self.size <= 0:
            raise ValueError("image_size must be > 0")
        if type(self.max_pixels) is not int or self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")


def decode_image(data: bytes, opts: ImageOptions) -> np.ndarray:
    """HWC uint8 RGB. With a size: the download stage's geometry for ``resize_mode``, and a JPEG is
    decoded at 1/2, 1/4 or 1/8 scale in the IDCT when the target is that much smaller. Raises
    ``ImageRejected`` for a format off the whitelist or more than ``opts.max_pixels`` pixels."""
    with open_image(data, opts.max_pixels) as img:  # header only: the format and the cap come first
        if opts.size is None:
            if img.format == "JPEG":
                try:  # libjpeg-turbo without PIL's object overhead: about 2x faster at 256 px
                    return simplejpeg.decode_jpeg(data, colorspace="RGB")
                except ValueError:
                    pass  # rarer JPEG flavours (e.g. CMYK, arithmetic coding): PIL below decides
            return np.array(img.convert("RGB"))
        geometry = plan_geometry(img.size[0], img.size[1], opts.size, opts.resize_mode)
        if geometry.downscale and img.format == "JPEG":
            img.draft("RGB", geometry.resized)  # never below the requested size
        rgb = img.convert("RGB")
    return np.array(_fit(rgb, geometry))


def _fit(img: Any, geometry: Any) -> Any:
    """Resize the (possibly drafted) image to the geometry's crop of its resized size, then pad."""
    from PIL import Image

    (rw, rh), (x0, y0, x1, y1) = geometry.resized, geometry.crop
    fx, fy = img.size[0] / rw, img.size[1] / rh
    box = (x0 * fx, y0 * fy, min(x1 * fx, img.size[0]), min(y1 * fy, img.size[1]))
    if (x1 - x0, y1 - y0) != img.size or box != (0, 0, *img.size):
        resample = Image.Resampling.BOX if geometry.downscale else Image.Resampling.BICUBIC
        img = img.resize((x1 - x0, y1 - y0), resample, box=box)
    if geometry.canvas is not None:
        canvas = Image.new("RGB", geometry.canvas, (255, 255, 255))
        canvas.paste(img, geometry.offset)
        img = canvas
    return img


def _image_tensor(hwc: np.ndarray, opts: ImageOptions) -> torch.Tensor:
    t = torch.from_numpy(hwc).permute(2, 0, 1)  # HWC -> CHW, a view
    return t.to(torch.float32, memory_format=torch.contiguous_format).div_(255) if opts.dtype == "float32" else t


@functools.lru_cache(maxsize=1024)
def _kind(ext: str) -> str:
    last = ext.rsplit(".", 1)[-1].lower()
    if last in IMAGE_EXTENSIONS:
        return "image"
    return last if last in ("npy", "txt", "json") else "bytes"


def _decode_value(ext: str, data: bytes, opts: ImageOptions) -> Any:
    kind = _kind(ext)
    if kind == "image":
        return _image_tensor(decode_image(data, opts), opts)
    if kind == "npy":
        return torch.from_numpy(read_npy(data))
    if kind == "txt":
        return data.decode("utf-8")
    if kind == "json":
        return json.loads(data)
    return data


def _decode_column(exts: Sequence[str], datas: Sequence[bytes], opts: ImageOptions) -> Any:
    """One field of a batch: a stacked tensor when shapes agree, else a list."""
    kinds = {_kind(e) for e in exts}
    if kinds == {"npy"}:
        arrays = decode_npy_batch(datas)
        return arrays if isinstance(arrays, torch.Tensor) else _stack_or_list([torch.from_numpy(a) for a in arrays])
    if kinds == {"image"}:
        images = [decode_image(d, opts) for d in datas]
        if len({a.shape for a in images}) != 1:
            return [_image_tensor(a, opts) for a in images]
        h, w, c = images[0].shape
        out = batch_tensor((len(images), c, h, w), torch.float32 if opts.dtype == "float32" else torch.uint8)
        out.copy_(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))  # HWC -> CHW in the one copy
        return out.div_(255) if opts.dtype == "float32" else out
    return [_decode_value(e, d, opts) for e, d in zip(exts, datas)]


def _stack_or_list(values: list) -> Any:
    if values and all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
        return torch.stack(values)
    return values


def collate(samples: Sequence[dict]) -> dict:
    """Batch decoded samples: tensors of one shape are stacked, everything else becomes a list
    (with None where a sample lacks the field: without ``fields``, samples may differ)."""
    names = dict.fromkeys(k for s in samples for k in s)
    return {k: _stack_or_list([s.get(k) for s in samples]) for k in names}

"""Decode, resize and re-encode one image: img2dataset's size semantics, PIL's speed levers.

The output geometry itself is computed in :mod:`pipeline.media.geometry`. The rules match
img2dataset 1.47 (verified against its own ``Resizer`` by ``tests/data/make_img2dataset_sizes.py``):

* Size rules on the original size, checked in this order: ``min(w, h) < min_image_size`` →
  ``too_small``; ``w * h > max_image_area`` → ``too_large_area``;
  ``max(w, h) / min(w, h) > max_aspect_ratio`` → ``bad_aspect_ratio``.
* ``keep_ratio`` / ``center_crop``: the short side becomes ``image_size`` (each side
  ``max(1, round(side * image_size / short_side))``, Python's round-half-even), then
  ``center_crop`` cuts ``image_size`` square at ``((w - s) // 2, (h - s) // 2)``.
  ``keep_ratio_largest`` / ``border``: the long side becomes ``image_size``; ``border`` then pads
  to a square with white, ``floor(missing / 2)`` before and the rest after. ``no``: same size.
* ``resize_only_if_bigger``: resize (and crop / pad) only when the short side (keep_ratio,
  center_crop) or the long side (border, keep_ratio_largest) is strictly above ``image_size``.
* Filters: area averaging (PIL's BOX, OpenCV's INTER_AREA) to downscale, Lanczos to upscale.
  PIL's BOX weighs whole source pixels where INTER_AREA weighs partial ones, so pixels differ
  slightly at sharp edges; sizes, crop positions and padding are identical.
* Alpha is composited on white; everything is re-encoded (jpg / png / webp).

Where we deliberately differ from img2dataset:

* EXIF orientation is applied (img2dataset's ``cv2.IMREAD_UNCHANGED`` ignores it), so sizes,
  including ``original_width`` / ``original_height``, are those of the image as displayed.
* Output is always 8-bit RGB: grayscale, CMYK, palette and 16-bit inputs are converted (16-bit
  is scaled, not clipped). img2dataset keeps grayscale, and OpenCV's jpg encoder drops 16-bit
  samples to 8 bits without scaling.
* The pixel cap and the size rules are checked on the headers, before decoding (the cap on
  every size a decoder will allocate: :mod:`pipeline.media.image_open`); a truncated image,
  a JPEG whose scans stop early included, is a ``decode_error`` (OpenCV pads it with grey and
  accepts it).
* An output the encoder cannot hold (keep_ratio on a 1000x3 strip: 85333 px wide > JPEG's 65535)
  or larger than ``max_pixels`` is ``encode_error``, refused before resizing (img2dataset fails
  the same images in ``cv2.imencode``, after the work).
* png: ``encode_quality`` 0..9 is the zlib level (img2dataset's meaning); above 9, such as the
  default 95, it means the default level 6 instead of an error.

Speed: JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the IDCT (``Image.draft``) when the target
is at least that much smaller; the drafted image is always at least the target size, so the
final area resize still decides the output. Crops are folded into the resize (only the kept
region is resampled) and EXIF rotation is applied to the small result. All heavy work is in PIL's
C code, which releases the GIL; the Python around it does not, so on the local engine with
more than one CPU the download stage runs :func:`hash_and_resize` in worker processes (a
module-level function of picklable arguments, light to import: PIL, numpy and media code only).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from pipeline.core.schema import ErrorKind, error_kind
from pipeline.media.geometry import MAX_PIXELS, RESIZE_MODES, Geometry, plan_geometry
from pipeline.media.image_open import ImageRejected, open_image

ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}  # member extension -> PIL encoder
# Largest side each encoder accepts (JPEG: 16-bit header fields; WebP: 14 bits).
_MAX_SIDE = {"jpg": 65_535, "png": 2**31 - 1, "webp": 16_383}
PNG_DEFAULT_LEVEL = 6
_WHITE = {"RGB": (255, 255, 255), "L": 255}
_JPEG_FORMATS = ("JPEG", "MPO")


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ResizeConfig:
    image_size: int = 256
    resize_mode: str = "center_crop"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: Optional[float] = None
    max_aspect_ratio: Optional[float] = None
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        # Bad options are a programming or spec error, unlike bad image bytes: fail loudly.
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format must be one of {tuple(ENCODE_FORMATS)}, got {self.encode_format!r}")
        if self.image_size <= 0 or self.max_pixels <= 0:
            raise ValueError("image_size and max_pixels must be > 0")
        if not 0 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality must be in 0..100, got {self.encode_quality}")


@dataclass
class ResizeResult:
    ok: bool
    data: Optional[bytes]
    width: Optional[int]
    height: Optional[int]
    original_width: Optional[int]
    original_height: Optional[int]
    error_kind: Optional[str]
    error_message: Optional[str]
    # Diagnostics: the (width, height) of the pixels actually decoded, smaller than the original
    # when JPEG draft decoding was used; None when nothing was decoded.
    decoded_size: Optional[tuple[int, int]] = None


# -- size rules and orientation ---------------------------------------------------------------

def check_size_rules(width: int, height: int, config: ResizeConfig) -> Optional[tuple[str, str]]:
    """img2dataset's filters on the original size: ``(error_kind, message)`` or None if it passes."""
    if min(width, height) < config.min_image_size:
        return ErrorKind.TOO_SMALL, f"image too small: {width}x{height}, min_image_size {config.min_image_size}"
    if config.max_image_area is not None and width * height > config.max_image_area:
        return ErrorKind.TOO_LARGE_AREA, f"image area too large: {width}x{height}, max_image_area {config.max_image_area}"
    if config.max_aspect_ratio is not None and max(width, height) / min(width, height) > config.max_aspect_ratio:
        return (ErrorKind.BAD_ASPECT_RATIO,
                f"aspect ratio too large: {width}x{height}, max_aspect_ratio {config.max_aspect_ratio}")
    return None


def _to_stored_box(box: tuple[float, float, float, float], orientation: int,
                   size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Map a box in displayed coordinates (image ``size`` as displayed) to the stored pixel grid,
    i.e. undo the EXIF transpose, so the crop can be resampled before rotating."""
    w, h = size
    x0, y0, x1, y1 = box
    inverse = {
        1: lambda x, y: (x, y),
        2: lambda x, y: (w - x, y),
        3: lambda x, y: (w - x, h - y),
        4: lambda x, y: (x, h - y),
        5: lambda x, y: (y, x),
        6: lambda x, y: (y, w - x),
        7: lambda x, y: (h - y, w - x),
        8: lambda x, y: (h - y, x),
    }[orientation]
    (u0, v0), (u1, v1) = inverse(x0, y0), inverse(x1, y1)
    return min(u0, u1), min(v0, v1), max(u0, u1), max(v0, v1)


# -- decoding ------------------------------------------------------------------------------------

class _Reject(Exception):
    """A per-image failure with its error kind (internal control flow)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable (broken EXIF is common)."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF must not fail an otherwise good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _normalize_mode(img: Image.Image) -> Image.Image:
    """Bring any decoded mode to 8-bit ``RGB`` or ``L``. Alpha is composited on white here, before
    resizing, as img2dataset does (and resizing 3 bands is cheaper than 4)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode == "La":
        img = img.convert("LA")
    elif mode == "1":
        img = img.convert("L")
    elif mode.startswith("I;16") or mode == "I":
        # 16-bit samples: keep the high byte (PIL's own convert would clip at 255).
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    elif mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA"):
        return _on_white(img)
    return img if img.mode in ("RGB", "L") else img.convert("RGB")  # CMYK, YCbCr, RGBX, LAB, ...


def _on_white(img: Image.Image) -> Image.Image:
    base = "RGB" if img.mode == "RGBA" else "L"
    canvas = Image.new(base, img.size, _WHITE[base])
    canvas.paste(img.convert(base), mask=img.getchannel("A"))
    return canvas


def _draft(img: Image.Image, target: tuple[int, int]) -> float:
    """Ask a JPEG to decode at 1/2, 1/4 or 1/8 scale in the IDCT, never below ``target`` (stored
    orientation). Returns the scale divisor applied (1.0: not a JPEG, or no reduction)."""
    if img.format not in _JPEG_FORMATS:
        return 1.0
    full_width = img.size[0]
    # PIL picks the largest s in 8, 4, 2, 1 with size // s >= target.
    drafted = img.draft("RGB", target)
    if drafted is None:
        return 1.0
    return full_width / drafted[1][2]  # the returned box spans the full image in drafted pixels


def _source_box(img: Image.Image, geometry: Geometry, orientation: int) -> tuple[tuple[float, ...], tuple[int, int]]:
    """The region of the stored image that becomes the output, and the output size in stored
    orientation: the crop is folded into the resize so only kept pixels are resampled."""
    width, height = geometry.resized
    display = (img.size[1], img.size[0]) if orientation in _SWAPS_AXES else img.size
    fx, fy = display[0] / width, display[1] / height
    x0, y0, x1, y1 = geometry.crop
    box = _to_stored_box((x0 * fx, y0 * fy, x1 * fx, y1 * fy), orientation, display)
    out = (x1 - x0, y1 - y0)
    return box, (out[1], out[0]) if orientation in _SWAPS_AXES else out


def _render(img: Image.Image, geometry: Geometry, orientation: int, result: ResizeResult) -> Image.Image:
    """Decode ``img`` (header already read) and produce the displayed, resized, cropped image
    (mode RGB or L); records the decoded size in ``result``."""
    full_size = img.size
    box, out = _source_box(img, geometry, orientation)
    same_size = geometry.resized == ((full_size[1], full_size[0]) if orientation in _SWAPS_AXES else full_size)
    scale = 1.0
    if geometry.downscale:
        width, height = geometry.resized
        scale = _draft(img, (height, width) if orientation in _SWAPS_AXES else (width, height))
    img.load()  # decode now (at the drafted scale): the file closes when the caller returns
    result.decoded_size = img.size
    img = _normalize_mode(img)
    box = tuple(v / scale for v in box)
    # Float noise (203 * (43 / 203) > 203) must not push the box off the image.
    box = (max(0.0, box[0]), max(0.0, box[1]), min(float(img.width), box[2]), min(float(img.height), box[3]))
    if same_size and scale == 1.0:
        # img2dataset's resize is a no-op at the same size; only crop (the box is integral).
        box = tuple(round(v) for v in box)
        if box != (0, 0, *img.size):
            img = img.crop(box)
    else:
        # No reducing_gap: BOX is already PIL's cheapest filter, and reduce()'s grid is anchored
        # at the stored top-left, so results would shift with the EXIF orientation.
        resample = Image.Resampling.BOX if geometry.downscale else Image.Resampling.LANCZOS
        img = img.resize(out, resample, box=box)
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    return img


def _check_encodable(size: tuple[int, int], config: ResizeConfig) -> None:
    """Refuse before resizing an output the encoder cannot write, or one larger than the pixel cap
    (keep_ratio on a 3000x1 strip asks for 768000x256): img2dataset fails these in cv2.imencode."""
    w, h = size
    if max(w, h) > _MAX_SIDE[config.encode_format]:
        raise _Reject(ErrorKind.ENCODE_ERROR, f"output {w}x{h} exceeds the {config.encode_format} limit of "
                                      f"{_MAX_SIDE[config.encode_format]} pixels per side")
    if w * h > config.max_pixels:
        raise _Reject(ErrorKind.ENCODE_ERROR, f"output {w}x{h} exceeds max_pixels {config.max_pixels}")


def _encode(img: Image.Image, config: ResizeConfig) -> bytes:
    buf = io.BytesIO()
    fmt = ENCODE_FORMATS[config.encode_format]
    try:
        if fmt == "PNG":
            level = config.encode_quality if config.encode_quality <= 9 else PNG_DEFAULT_LEVEL
            img.save(buf, fmt, compress_level=level)
        else:  # JPEG (4:2:0, as OpenCV) and lossy WebP take a 0..100 quality
            img.save(buf, fmt, quality=config.encode_quality)
    except Exception as e:  # noqa: BLE001 - the pixels decoded fine: not a decode_error
        raise _Reject(ErrorKind.ENCODE_ERROR, f"{type(e).__name__}: {e}") from None
    return buf.getvalue()


def _process(data: bytes, config: ResizeConfig, result: ResizeResult) -> None:
    with open_image(data, config.max_pixels) as img:
        stored_w, stored_h = img.size
        orientation = _orientation(img)
        w, h = (stored_h, stored_w) if orientation in _SWAPS_AXES else (stored_w, stored_h)
        result.original_width, result.original_height = w, h
        rule = check_size_rules(w, h, config)
        if rule is not None:
            raise _Reject(*rule)
        geometry = plan_geometry(w, h, config.image_size, config.resize_mode, config.resize_only_if_bigger)
        _check_encodable(geometry.output_size, config)
        rendered = _render(img, geometry, orientation, result)
    if rendered.mode != "RGB":
        rendered = rendered.convert("RGB")
    if geometry.canvas is not None:
        canvas = Image.new("RGB", geometry.canvas, _WHITE["RGB"])
        canvas.paste(rendered, geometry.offset)
        rendered = canvas
    result.data = _encode(rendered, config)
    result.width, result.height = rendered.size
    result.ok = True


def resize_image(data: bytes, config: ResizeConfig) -> ResizeResult:
    """Decode ``data``, apply the size rules and resize mode, re-encode. Never raises for bad
    input: failures come back as ``ok=False`` with an ``error_kind`` from :class:`pipeline.core.schema.ErrorKind`."""
    result = ResizeResult(False, None, None, None, None, None, None, None)
    try:
        _process(data, config, result)
    except (_Reject, ImageRejected) as e:
        _fail(result, e.kind, str(e))
    except Image.DecompressionBombError as e:  # PIL's own backstop (2x MAX_IMAGE_PIXELS)
        _fail(result, ErrorKind.DECOMPRESSION_BOMB, str(e))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-sample status
        _fail(result, ErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}")
    return result


def hash_and_resize(data: bytes, config: ResizeConfig) -> tuple[str, ResizeResult]:
    """The sha256 of the original bytes (as published hashes are) and :func:`resize_image`, in one
    call: the unit of work a worker thread or process does per image."""
    return hashlib.sha256(data).hexdigest(), resize_image(data, config)


def _fail(result: ResizeResult, kind: str, message: str) -> None:
    error_kind(kind)  # a kind outside the schema is a bug here, not a sample's problem
    result.ok, result.data, result.width, result.height = False, None, None, None
    result.error_kind, result.error_message = kind, message[:500]

"""Opening untrusted image bytes: a format whitelist and the pixel cap, both before any decoding.

Every place that decodes an image we did not make (the download stage, the loader, filters and
tokenizers reading tar members) opens it here, so the same formats and the same cap apply everywhere.

:data:`pipeline.core.image_formats.IMAGE_FORMATS` is the one table of the image formats we take,
shared with the sniffer: bytes open only in the format their signature names (so PIL's other
variants of a format, such as PFM under "PPM" or a headerless DIB, are refused).

The cap applies to what the decoder will allocate, which is not always the size PIL reports:

* Every format: the size PIL reads from the header. That is the allocation for PNG and APNG
  (frames lie inside IHDR), GIF (PIL grows the size at open when the first frame leaves the
  logical screen), WebP (the canvas every frame is composited on), BMP and PPM (their own header
  fields, any maxval), JPEG (an MPO's first picture) and JPEG 2000 (PIL refuses an ``ihdr`` box
  that disagrees with the codestream before OpenJPEG allocates).
* ICO: PIL decodes the largest frame while opening, at the size of the embedded PNG or BMP
  header rather than the directory's: every frame's own header is checked first.
* WebP: libwebp allocates the canvas when the decoder is created, at open: checked before.
* TIFF: libtiff allocates whole tiles, which may be larger than the image: tiles are capped too.
* AVIF: PIL reports the ``ispe`` box, libavif decodes each AV1 item at its sequence header's
  size: every item's sequence header is checked (one that cannot be read is left to libavif, as
  are the tracks of an animated AVIF, which libavif bounds at 16384 x 16384).

A truncated image is a ``decode_error``. PIL already raises for PNG, GIF and WebP, and for a JPEG
that stops without its end marker; a JPEG whose scans stop early but which still ends with EOI is
padded with grey by libjpeg, so :func:`open_image` checks the scans against the frame (a marker
walk, no decoding): enough coded bits for every block, every restart interval, every component
and, in a progressive file, every coefficient band coded at least once. The header readers
themselves are in :mod:`pipeline.media.image_headers`.
"""
from __future__ import annotations

import io

from PIL import Image

from pipeline.core.image_formats import IMAGE_FORMATS
from pipeline.core.schema import ErrorKind
from pipeline.media.geometry import MAX_PIXELS
from pipeline.media.image_headers import avif_frame_sizes, ico_frame_sizes, jpeg_truncation, webp_canvas


Image.init()  # register every plugin once, at import, not lazily inside worker threads
INPUT_FORMATS = tuple(dict.fromkeys(f.pil for f in IMAGE_FORMATS if f.pil in Image.OPEN))
_BY_MAGIC = tuple((magic, f.pil) for f in IMAGE_FORMATS for magic in f.magics if f.pil in INPUT_FORMATS)
_BY_STRUCTURE = tuple(f.pil for f in IMAGE_FORMATS if not f.magics and f.pil in INPUT_FORMATS)


class ImageRejected(Exception):
    """The bytes are not an image we decode, or one over the pixel cap; ``kind`` is an ErrorKind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``data`` lazily (header only) in a whitelisted format, its size checked against
    ``max_pixels``. Raises :class:`ImageRejected` (``decode_error`` or ``decompression_bomb``)."""
    formats = _formats_for(data)
    _check_before_open(data, formats, max_pixels)
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except Image.UnidentifiedImageError:
        raise ImageRejected(ErrorKind.DECODE_ERROR,
                            f"not an image in a supported format ({', '.join(INPUT_FORMATS)})") from None
    except Image.DecompressionBombError as e:  # PIL's own guard, at open (WebP, ICO)
        raise ImageRejected(ErrorKind.DECOMPRESSION_BOMB, str(e)) from None
    except Exception as e:  # noqa: BLE001 - a broken header is this image's problem only
        raise ImageRejected(ErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    try:
        _check_after_open(img, data, max_pixels)
    except ImageRejected:
        img.close()
        raise
    return img


def decode_complete(img: Image.Image) -> Image.Image:
    """Decode ``img`` (from :func:`open_image`) now; a truncated or broken body raises
    :class:`ImageRejected` with ``decode_error`` instead of PIL's assorted exceptions."""
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageRejected(ErrorKind.DECOMPRESSION_BOMB, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this image's problem
        raise ImageRejected(ErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    return img


def _formats_for(data: bytes) -> tuple[str, ...]:
    """The one format a signature names, else the formats recognised by structure."""
    for magic, pil in _BY_MAGIC:
        if data.startswith(magic):
            return (pil,)
    return _BY_STRUCTURE


def _cap(what: str, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageRejected(ErrorKind.DECOMPRESSION_BOMB, f"{what}{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")


def _check_before_open(data: bytes, formats: tuple[str, ...], max_pixels: int) -> None:
    if formats == ("ICO",):
        for n, size in enumerate(ico_frame_sizes(data)):
            _cap(f"ICO frame {n}: ", size, max_pixels)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        canvas = webp_canvas(data)
        if canvas is not None:
            _cap("WebP canvas ", canvas, max_pixels)


def _check_after_open(img: Image.Image, data: bytes, max_pixels: int) -> None:
    _cap("", img.size, max_pixels)
    if img.format == "TIFF":
        tile = img.tag_v2.get(322), img.tag_v2.get(323)  # TileWidth, TileLength
        if isinstance(tile[0], int) and isinstance(tile[1], int):
            _cap("TIFF tile ", tile, max_pixels)
    elif img.format == "AVIF":
        for n, size in enumerate(avif_frame_sizes(data)):
            _cap(f"AVIF item {n} AV1 frame ", size, max_pixels)
    elif img.format in ("JPEG", "MPO"):
        problem = jpeg_truncation(data)
        if problem is not None:
            raise ImageRejected(ErrorKind.DECODE_ERROR, f"truncated JPEG: {problem}")

"""The image formats the project decodes, one table for the sniffer and the decoder's whitelist.

Each entry: PIL's format name, the media type :func:`pipeline.fetch.sniff.sniff` reports, and the
bytes the file starts with (none for formats recognised by their structure: RIFF WebP, BMP's
header, ISO base media AVIF, which the sniffer checks in code). :mod:`pipeline.media.image_open`
opens bytes only in the format their signature names. Pure data, so that the sniffer does not
import PIL.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    pil: str                      # PIL's format name
    media_type: str               # what the sniffer reports for it
    magics: tuple[bytes, ...] = ()  # how the file starts; () : recognised by its structure (sniff.py)


def _pnm(*kinds: int) -> tuple[bytes, ...]:
    return tuple(b"P%d%c" % (kind, space) for kind in kinds for space in b" \t\n\r")  # PIL needs the space


# A whitelist, because PIL can also open formats that shell out (EPS runs Ghostscript) or that
# nobody serves as a web image. MPO (camera multi-picture) opens as JPEG; CUR (cursors) is not here.
IMAGE_FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("JPEG", "image/jpeg", (b"\xff\xd8\xff",)),
    ImageFormat("PNG", "image/png", (b"\x89PNG\r\n\x1a\n",)),
    ImageFormat("GIF", "image/gif", (b"GIF87a", b"GIF89a")),
    ImageFormat("TIFF", "image/tiff", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),  # classic, BigTIFF
    # The JP2 file and a bare codestream share one media type.
    ImageFormat("JPEG2000", "image/jp2", (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")),
    ImageFormat("ICO", "image/x-icon", (b"\x00\x00\x01\x00",)),
    ImageFormat("PPM", "image/x-portable-bitmap", _pnm(1, 4)),
    ImageFormat("PPM", "image/x-portable-graymap", _pnm(2, 5)),
    ImageFormat("PPM", "image/x-portable-pixmap", _pnm(3, 6)),
    ImageFormat("WEBP", "image/webp"),   # RIFF....WEBP
    ImageFormat("BMP", "image/bmp"),     # "BM" and a known DIB header size
    ImageFormat("AVIF", "image/avif"),   # ISO base media file, avif brands
)

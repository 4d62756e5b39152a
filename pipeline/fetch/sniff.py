"""Media sniffing: the media type of a body from its magic numbers, never from Content-Type.

The images we decode are recognised from :data:`pipeline.core.image_formats.IMAGE_FORMATS`, the
table that also drives the decoder's whitelist: a signature there is sniffed here, and a file
sniffed as one of those types opens in that format. Images we recognise without decoding them
(JPEG XL, HEIF/HEIC) are sniffed too, so they fail as ``decode_error`` rather than ``not_media``.
"""
from __future__ import annotations

from typing import Optional

from pipeline.core.image_formats import IMAGE_FORMATS

SNIFF_BYTES = 512        # enough for every signature below (MPEG-TS needs 377)


# -- media sniffing --------------------------------------------------------------------------------

_PREFIXES: tuple[tuple[bytes, str], ...] = (
    *((magic, f.media_type) for f in IMAGE_FORMATS for magic in f.magics),
    (b"\xff\x0a", "image/jxl"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "image/jxl"),
    (b"FLV\x01", "video/x-flv"),
    (b"\x00\x00\x01\xba", "video/mpeg"),
    (b"\x00\x00\x01\xb3", "video/mpeg"),
    (b"OggS", "video/ogg"),
)
_RIFF = {b"WEBP": "image/webp", b"AVI ": "video/x-msvideo"}
_FTYP_IMAGE = {b"avif": "image/avif", b"avis": "image/avif", b"heic": "image/heic", b"heix": "image/heic",
               b"heim": "image/heic", b"heis": "image/heic", b"hevc": "image/heic", b"hevx": "image/heic"}
_FTYP_HEIF = frozenset({b"mif1", b"msf1"})  # generic HEIF: a specific brand (avif, heic) wins
_FTYP_AUDIO = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})
_QUICKTIME_ATOMS = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})


def sniff(data: bytes) -> Optional[str]:
    """The media type of ``data`` from its magic numbers ("image/jpeg", "video/mp4", ...), else None.

    HTML, text, SVG, audio-only containers and unknown bytes give None.
    """
    for magic, media_type in _PREFIXES:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF":
        return _RIFF.get(data[8:12])
    if data[4:8] == b"ftyp":
        return _sniff_ftyp(data)
    if data[4:8] in _QUICKTIME_ATOMS:
        return "video/quicktime"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: the DocType says WebM or Matroska
        return "video/webm" if b"webm" in data[:64] else "video/x-matroska"
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "image/bmp"
    if len(data) >= 377 and data[0] == data[188] == data[376] == 0x47:  # MPEG-TS sync bytes
        return "video/mp2t"
    return None


def _sniff_ftyp(data: bytes) -> Optional[str]:
    """ISO base media: the major brand, then the compatible brands, say image (AVIF/HEIF) or video."""
    size = int.from_bytes(data[:4], "big")
    major = data[8:12]
    compatible = [data[i:i + 4] for i in range(16, min(max(size, 16), len(data)) - 3, 4)]
    for brand in (major, *compatible):
        if brand in _FTYP_IMAGE:
            return _FTYP_IMAGE[brand]
    if major in _FTYP_HEIF or _FTYP_HEIF.intersection(compatible):
        return "image/heif"
    if major in _FTYP_AUDIO:
        return None
    if major == b"qt  ":
        return "video/quicktime"
    if major.startswith((b"3gp", b"3g2")):
        return "video/3gpp"
    return "video/mp4"  # isom, mp41, mp42, avc1, dash, M4V, ... and the many vendor brands

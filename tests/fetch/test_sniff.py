"""The sniffer and the decoder's whitelist agree: every image format we decode is sniffed as its
media type, and bytes the sniffer does not call a decodable image do not open either."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.core.schema import ErrorKind
from pipeline.fetch.sniff import SNIFF_BYTES, sniff
from pipeline.core.image_formats import IMAGE_FORMATS
from pipeline.media.image_open import INPUT_FORMATS, ImageRejected, open_image
from pipeline.media.resize import ResizeConfig, resize_image

PICTURE = Image.new("RGB", (48, 40), (200, 40, 10))


def saved(fmt: str, img: Image.Image = PICTURE, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# (what, bytes as PIL writes them, the media type, the PIL format it opens as)
SAMPLES = [
    ("jpeg", saved("JPEG"), "image/jpeg", "JPEG"),
    ("png", saved("PNG"), "image/png", "PNG"),
    ("gif", saved("GIF"), "image/gif", "GIF"),
    ("tiff", saved("TIFF"), "image/tiff", "TIFF"),
    ("tiff big-endian", b"MM\x00*\x00\x00\x00\x08\x00\x05" + b"".join(  # 1x1 grey, one strip
        tag.to_bytes(2, "big") + b"\x00\x03\x00\x00\x00\x01" + value.to_bytes(2, "big") + b"\x00\x00"
        for tag, value in ((256, 1), (257, 1), (258, 8), (262, 1), (273, 74))) + bytes(4) + b"\x80",
     "image/tiff", "TIFF"),
    ("bigtiff", saved("TIFF", big_tiff=True), "image/tiff", "TIFF"),
    ("jp2", saved("JPEG2000"), "image/jp2", "JPEG2000"),
    ("j2k codestream", saved("JPEG2000", no_jp2=True), "image/jp2", "JPEG2000"),
    ("ico", saved("ICO", sizes=[(32, 32)]), "image/x-icon", "ICO"),
    ("pbm P4", saved("PPM", PICTURE.convert("1")), "image/x-portable-bitmap", "PPM"),
    ("pgm P5", saved("PPM", PICTURE.convert("L")), "image/x-portable-graymap", "PPM"),
    ("pgm P5 16-bit", saved("PPM", PICTURE.convert("I")), "image/x-portable-graymap", "PPM"),
    ("ppm P6", saved("PPM"), "image/x-portable-pixmap", "PPM"),
    ("pbm P1", b"P1\n# plain\n3 2\n1 0 1\n0 1 0\n", "image/x-portable-bitmap", "PPM"),
    ("pgm P2", b"P2 3 2 255\n0 128 255\n255 128 0\n", "image/x-portable-graymap", "PPM"),
    ("ppm P3", b"P3\r3 1\r255\r255 0 0 0 255 0 0 0 255\r", "image/x-portable-pixmap", "PPM"),
    ("webp", saved("WEBP"), "image/webp", "WEBP"),
    ("webp lossless", saved("WEBP", lossless=True), "image/webp", "WEBP"),
    ("bmp", saved("BMP"), "image/bmp", "BMP"),
    ("avif", saved("AVIF"), "image/avif", "AVIF"),
]


@pytest.mark.parametrize("what,data,media_type,pil", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_every_decoded_format_is_sniffed_and_opens(what, data, media_type, pil):
    if pil not in INPUT_FORMATS:
        pytest.skip(f"this PIL has no {pil} decoder")  # reason: formats this PIL build lacks
    assert sniff(data[:SNIFF_BYTES]) == media_type
    assert any(f.pil == pil and f.media_type == media_type for f in IMAGE_FORMATS)
    with open_image(data) as img:
        assert img.format == pil
    r = resize_image(data, ResizeConfig(image_size=16))
    assert r.ok, r.error_message


def test_the_samples_cover_the_whole_table():
    assert {f.media_type for f in IMAGE_FORMATS} == {s[2] for s in SAMPLES}
    assert set(INPUT_FORMATS) <= {s[3] for s in SAMPLES}


@pytest.mark.parametrize("what,data", [
    ("headerless DIB (PIL's 'DIB' plugin opens it)", saved("DIB") if "DIB" in Image.SAVE else None),
    ("cursor", b"\x00\x00\x02\x00\x01\x00" + saved("ICO", sizes=[(16, 16)])[6:]),
    ("PFM float map (PIL opens it as 'PPM')", b"Pf\n2 1\n-1.0\n" + bytes(8)),
    ("PAM", b"P7\nWIDTH 1\nHEIGHT 1\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n\0\0\0"),
    ("TIFF with a broken byte-order mark (PIL guesses)", b"II\x00*" + saved("TIFF")[4:]),
    ("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
    ("text starting with P", b"Pixels are nice\n"),
])
def test_what_is_not_sniffed_does_not_open(what, data):
    if data is None:
        pytest.skip("no DIB writer")  # reason: PIL cannot write this case
    assert sniff(data[:SNIFF_BYTES]) is None
    with pytest.raises(ImageRejected) as info:
        open_image(data)
    assert info.value.kind == ErrorKind.DECODE_ERROR


@pytest.mark.parametrize("head,media_type", [
    (b"\xff\x0a" + bytes(40), "image/jxl"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40), "image/heic"),
])
def test_images_sniffed_but_not_decoded_here_are_decode_errors(head, media_type):
    """Recognised as images (so not ``not_media``), but no decoder: ``decode_error``."""
    assert sniff(head) == media_type
    assert resize_image(head, ResizeConfig()).error_kind == ErrorKind.DECODE_ERROR

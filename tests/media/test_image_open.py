"""pipeline.media.image_open on hostile bytes: the pixel cap applies to what a decoder will
allocate (not only to the size PIL reports), and truncated images are decode errors.

Every hostile file is made here, small on disk; memory is measured as the peak resident set
growth of this process (Linux ``/proc/self/clear_refs`` resets the peak), never as wall time.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.schema import ErrorKind
from pipeline.media.image_open import ImageRejected, decode_complete, open_image
from pipeline.media.resize import ResizeConfig, resize_image

MB = 1 << 20
SMALL_CAP = 1_000_000  # pixels: a cap that the 2000x2000-ish files below exceed


# -- memory measurement ------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_growth(fn) -> tuple[int, object]:
    """(bytes the resident set grew to at its peak while ``fn`` ran, what ``fn`` returned or raised)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")  # reason: only where the kernel offers it
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # freed heap counts again when reused, so growth is real
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the caller asserts on it
        out = e
    return (_status_kb("VmHWM") - before) * 1024, out


def rejected_kind(data: bytes, max_pixels: int) -> tuple[int, str]:
    """Peak memory growth and the error kind of opening and resizing ``data`` under ``max_pixels``."""
    def both():
        with pytest.raises(ImageRejected) as info:
            open_image(data, max_pixels).close()
        r = resize_image(data, ResizeConfig(max_pixels=max_pixels))
        assert r.error_kind == info.value.kind, (r.error_kind, r.error_message, str(info.value))
        return info.value.kind
    grown, kind = peak_growth(both)
    if isinstance(kind, BaseException):
        raise kind
    return grown, kind


# -- crafted files -----------------------------------------------------------------------------------

def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_zeros(width: int, height: int, color_type: int = 6) -> bytes:
    """A valid 8-bit PNG of zero pixels (RGBA by default), a few hundred KB even for 13000x13000:
    after each full flush deflate codes the next block of rows identically."""
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    rows = 100
    assert height % rows == 0
    block = b"\0" * ((width * channels + 1) * rows)
    comp = zlib.compressobj(9)
    head = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    piece = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    total = (width * channels + 1) * height
    idat = head + piece * (height // rows - 1) + b"\x03\x00" + struct.pack(">I", ((total % 65521) << 16) | 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ico(frame: bytes, claimed: int = 0, bpp: int = 32) -> bytes:
    """An icon whose one directory entry claims ``claimed`` x ``claimed`` (0 means 256)."""
    return (struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, bpp, len(frame), 22)
            + frame)


def dib_1bit(width: int, height: int) -> bytes:
    """An icon's BMP frame: 1-bit XOR image and AND mask (the header height counts both)."""
    row = (width + 31) // 32 * 4
    header = struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, 1, 0, 0, 0, 0, 2, 0)
    return header + b"\0\0\0\0\xff\xff\xff\0" + b"\x55" * (row * height) + b"\0" * (row * height)


def tiff_tiled(width: int, height: int, tile: int, body: bytes, compression: int = 8) -> bytes:
    """A little-endian one-tile greyscale TIFF: ``width x height`` with a ``tile x tile`` tile."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, compression), (262, 3, 1), (277, 3, 1),
               (322, 4, tile), (323, 4, tile), (324, 4, None), (325, 4, len(body))]
    offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, typ, value in entries:
        value = offset if value is None else value
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + body


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def photo(width: int = 800, height: int = 600, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: compresses like a photograph, not like a flat fill."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray((base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8), "RGB")


# -- 1. the cap applies to what is decoded -----------------------------------------------------------

def test_ico_directory_cannot_hide_a_huge_png():
    """The issue's sample: the directory says 256x256, the embedded PNG is 13000x13000 RGBA (676 MB
    decoded, under PIL's own 2x limit). Refused from the headers, without decoding."""
    data = ico(png_zeros(13_000, 13_000))
    assert len(data) < 1 * MB
    grown, kind = rejected_kind(data, ResizeConfig().max_pixels)
    assert kind == ErrorKind.DECOMPRESSION_BOMB
    assert grown < 64 * MB, f"{grown / MB:.0f} MB resident while refusing"


def test_ico_cap_holds_without_pils_own_guard(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # some libraries do this globally
    grown, kind = rejected_kind(ico(png_zeros(3000, 3000)), SMALL_CAP)
    assert kind == ErrorKind.DECOMPRESSION_BOMB and grown < 16 * MB, grown / MB


def test_ico_bmp_frame_is_capped_by_its_own_header():
    grown, kind = rejected_kind(ico(dib_1bit(2400, 2400), bpp=1), SMALL_CAP)
    assert kind == ErrorKind.DECOMPRESSION_BOMB and grown < 16 * MB, grown / MB


def test_small_icons_still_open():
    icon = Image.new("RGBA", (48, 48), (200, 30, 30, 255))
    for data in (encode(icon, "ICO", sizes=[(16, 16), (48, 48)]),
                 encode(icon.convert("RGB"), "ICO", bitmap_format="bmp")):
        img = open_image(data, 48 * 48)
        assert img.format == "ICO" and img.size == (48, 48)
        assert resize_image(data, ResizeConfig(image_size=32)).ok


def test_tiff_tile_larger_than_the_image_is_capped():
    """A 16x16 image stored in one 16384x16384 tile: libtiff allocates the whole tile (256 MB)."""
    data = tiff_tiled(16, 16, 16_384, zlib.compress(b"\0" * 4096))
    grown, kind = rejected_kind(data, ResizeConfig().max_pixels)
    assert kind == ErrorKind.DECOMPRESSION_BOMB and grown < 64 * MB, grown / MB


def test_tiled_tiff_within_the_cap_decodes():
    data = tiff_tiled(16, 16, 16, zlib.compress(bytes(range(256))))
    assert resize_image(data, ResizeConfig(image_size=8, max_pixels=256)).ok


@pytest.mark.parametrize("name", ["gif_frame_beyond_screen", "ppm_16bit", "bmp_header", "png_header",
                                  "animated_webp_canvas"])
def test_headers_that_already_tell_the_truth(name):
    """Formats whose reported size is what gets allocated (checked, not changed): a GIF frame
    outside its logical screen grows the size PIL reports at open; PPM maxval and BMP fields are
    the header's own numbers; a WebP canvas is the size of every composited frame."""
    if name == "gif_frame_beyond_screen":
        gif = encode(Image.new("P", (3000, 3000)), "GIF")
        data = gif[:6] + struct.pack("<HH", 10, 10) + gif[10:]  # logical screen 10x10
    elif name == "ppm_16bit":
        data = b"P6 3000 3000 65535\n" + bytes(64)
    elif name == "bmp_header":
        data = encode(Image.new("RGB", (8, 8)), "BMP")
        data = data[:18] + struct.pack("<ii", 3000, -3000) + data[26:]  # top-down, huge
    elif name == "png_header":
        data = png_zeros(3000, 3000)
    else:
        frames = [Image.new("RGB", (1200, 1200), c) for c in ((255, 0, 0), (0, 0, 255))]
        data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    grown, kind = rejected_kind(data, SMALL_CAP)
    assert kind == ErrorKind.DECOMPRESSION_BOMB and grown < 16 * MB, grown / MB


def test_webp_canvas_is_refused_before_libwebp_allocates_it(monkeypatch):
    """libwebp allocates the canvas (two RGBA copies) when PIL opens the file: the canvas in the
    VP8X header is capped before that, even with PIL's own guard off."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert data[12:16] == b"VP8X"
    big = data[:24] + (16_383).to_bytes(3, "little") * 2 + data[30:]  # canvas 16384x16384, frames 64x64
    with pytest.raises(ImageRejected) as info:
        open_image(big)
    assert info.value.kind == ErrorKind.DECOMPRESSION_BOMB and "WebP canvas" in str(info.value)
    assert open_image(data).size == (64, 64)


def avif_with_ispe(size: tuple[int, int], claimed: tuple[int, int], alpha: bool = False) -> bytes:
    """An AVIF whose ``ispe`` boxes claim ``claimed`` while its AV1 frames are ``size``."""
    data = encode(Image.new("RGBA" if alpha else "RGB", size, (1, 2, 3, 4)), "AVIF", quality=10, speed=10)
    for at in [m.start() for m in re.finditer(b"ispe", data)]:
        data = data[:at + 8] + struct.pack(">II", *claimed) + data[at + 16:]
    return data


def test_avif_ispe_cannot_hide_a_larger_av1_frame():
    """libavif decodes the AV1 frame at its sequence header's size, whatever ``ispe`` says."""
    lie = avif_with_ispe((3000, 3000), (100, 100))
    with Image.open(io.BytesIO(lie)) as img:
        assert img.size == (100, 100)  # all PIL knows before decoding
    grown, kind = rejected_kind(lie, SMALL_CAP)
    assert kind == ErrorKind.DECOMPRESSION_BOMB and grown < 8 * MB, grown / MB
    assert rejected_kind(avif_with_ispe((2000, 2000), (100, 100), alpha=True), SMALL_CAP)[1] == "decompression_bomb"
    assert resize_image(avif_with_ispe((300, 200), (300, 200), alpha=True), ResizeConfig(image_size=64)).ok


def test_jp2_header_smaller_than_its_codestream_is_refused_unallocated():
    """The JP2 ``ihdr`` box says 64x64, the codestream's SIZ (and its one tile) 3000x3000: PIL's
    decoder refuses the mismatch before OpenJPEG allocates."""
    data = encode(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG2000")
    siz = data.find(b"\xff\x51") + 6  # after the marker, Lsiz and Rsiz: Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz
    lie = data[:siz] + struct.pack(">IIIIII", 3000, 3000, 0, 0, 3000, 3000) + data[siz + 24:]
    grown, r = peak_growth(lambda: resize_image(lie, ResizeConfig(max_pixels=SMALL_CAP)))
    assert not r.ok and r.error_kind in (ErrorKind.DECODE_ERROR, ErrorKind.DECOMPRESSION_BOMB)
    assert grown < 16 * MB, grown / MB


# -- 2. truncated images -----------------------------------------------------------------------------

def scan_start(jpeg: bytes, nth: int = 0) -> int:
    """Offset of the entropy-coded data of the ``nth`` scan (after its SOS segment)."""
    sos = [m.start() for m in re.finditer(rb"\xff\xda", jpeg)][nth]
    return sos + 2 + struct.unpack(">H", jpeg[sos + 2:sos + 4])[0]


def cut_with_eoi(jpeg: bytes, keep: int, nth: int = 0) -> bytes:
    """Keep ``keep`` bytes of the ``nth`` scan's data, then end the file properly with EOI."""
    return jpeg[:scan_start(jpeg, nth) + keep] + b"\xff\xd9"


def assert_truncated(data: bytes) -> None:
    with pytest.raises(ImageRejected) as info:
        open_image(data)
    assert info.value.kind == ErrorKind.DECODE_ERROR and "truncated" in str(info.value)
    r = resize_image(data, ResizeConfig())
    assert r.error_kind == ErrorKind.DECODE_ERROR and "truncated" in r.error_message


def test_jpeg_scan_much_shorter_than_its_frame_is_a_decode_error():
    """libjpeg pads a scan that ends early with grey and PIL reports success; the scan data left
    (300 bytes for 800x600) cannot code that many blocks."""
    full = encode(photo(), "JPEG", quality=90)
    assert resize_image(cut_with_eoi(full, len(full)), ResizeConfig()).ok  # the cutting itself is harmless
    for keep in (0, 300, 2000):
        assert_truncated(cut_with_eoi(full, keep))


def test_jpeg_missing_restart_intervals_is_a_decode_error():
    """With restart markers the number of intervals is known exactly: half the scan is missing,
    or only the last interval (cut at its restart marker)."""
    full = encode(photo(), "JPEG", quality=90, restart_marker_rows=1)
    start = scan_start(full)
    assert_truncated(cut_with_eoi(full, (len(full) - start) // 2))
    last_restart = [m.start() for m in re.finditer(rb"\xff[\xd0-\xd7]", full)][-1]
    assert_truncated(cut_with_eoi(full, last_restart - start))


def test_progressive_jpeg_cut_in_its_first_scan_or_after_it():
    full = encode(photo(), "JPEG", quality=90, progressive=True)
    assert_truncated(cut_with_eoi(full, 40))  # the DC scan cannot code 7500 blocks in 40 bytes
    first_end = full.find(b"\xff", scan_start(full))
    while full[first_end + 1] == 0:  # skip stuffed 0xFF bytes to the next marker
        first_end = full.find(b"\xff", first_end + 2)
    assert_truncated(full[:first_end] + b"\xff\xd9")  # only the DC scan: no AC coefficient coded


@pytest.mark.parametrize("kw", [{}, {"quality": 30}, {"progressive": True}, {"subsampling": 0},
                                {"restart_marker_blocks": 7}, {"progressive": True, "restart_marker_rows": 2},
                                {"optimize": True}, {"keep_rgb": True}])
def test_complete_jpegs_are_accepted(kw):
    for img in (photo(), photo(333, 17, seed=3), Image.new("RGB", (640, 480), (128, 128, 128))):
        data = encode(img, "JPEG", **kw)
        with open_image(data) as opened:
            decode_complete(opened)
            assert opened.size == img.size
    for img in (photo().convert("L"), photo().convert("CMYK")):
        assert resize_image(encode(img, "JPEG", **kw), ResizeConfig()).ok


def test_mpo_is_checked_on_its_first_picture():
    pic = photo(400, 300)
    assert resize_image(encode(pic, "MPO", save_all=True, append_images=[pic]), ResizeConfig()).ok


def test_truncated_png_gif_webp_are_decode_errors():
    img = photo(160, 120)
    png = encode(img, "PNG")
    at = png.find(b"IDAT")
    idat = png[at + 4:at + 4 + struct.unpack(">I", png[at - 4:at])[0]]
    cases = {"png, IDAT cut, IEND kept": png[:at - 4] + chunk(b"IDAT", idat[:len(idat) // 2]) + chunk(b"IEND", b"")}
    gif = encode(img.convert("P"), "GIF")
    data_at = gif.index(b",") + 10 + 1  # image descriptor, then the LZW minimum code size
    blocks, pos = [], data_at
    while gif[pos]:
        blocks.append(gif[pos:pos + 1 + gif[pos]])
        pos += 1 + gif[pos]
    cases["gif, sub-blocks cut, terminator and trailer kept"] = (
        gif[:data_at] + b"".join(blocks[:len(blocks) // 2]) + b"\x00;")
    for lossless in (False, True):
        webp = encode(img, "WEBP", lossless=lossless)
        cut = webp[:len(webp) // 2]
        cases[f"webp lossless={lossless}, RIFF size fixed"] = cut[:4] + struct.pack("<I", len(cut) - 8) + cut[8:]
    for name, data in cases.items():
        r = resize_image(data, ResizeConfig())
        assert r.error_kind == ErrorKind.DECODE_ERROR, (name, r.error_kind)
        with pytest.raises(ImageRejected) as info:
            with open_image(data) as opened:
                decode_complete(opened)
        assert info.value.kind == ErrorKind.DECODE_ERROR, name


def test_decode_complete_maps_failures_to_kinds():
    good = encode(photo(64, 48), "PNG")
    with open_image(good) as img:
        assert decode_complete(img) is img and img.getpixel((0, 0))
    with pytest.raises(ImageRejected) as info:
        open_image(b"<html>not an image</html>")
    assert info.value.kind == ErrorKind.DECODE_ERROR


# -- callers ------------------------------------------------------------------------------------------

def test_perceptual_hashes_open_through_the_cap():
    """dedup_near's hashes decode tar members: the same whitelist and cap as the download."""
    from filters.perceptual import phash

    grown, out = peak_growth(lambda: phash(ico(png_zeros(13_000, 13_000))))
    assert isinstance(out, ImageRejected) and out.kind == ErrorKind.DECOMPRESSION_BOMB, out
    assert grown < 64 * MB, grown / MB
    with pytest.raises(ImageRejected):
        phash(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")  # EPS would run Ghostscript
    assert isinstance(phash(encode(photo(64, 48), "PNG")), int)


def _seeds() -> dict[str, bytes]:
    pic = photo(96, 64)
    frames = [pic, pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "ico png": encode(pic.convert("RGBA"), "ICO", sizes=[(16, 16), (48, 48)]),
        "ico bmp": encode(pic, "ICO", sizes=[(32, 32)], bitmap_format="bmp"),
        "avif": encode(pic.convert("RGBA"), "AVIF", quality=30, speed=10),
        "webp animated": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "tiff tiled": tiff_tiled(16, 16, 16, zlib.compress(bytes(range(256)))),
        "jpeg": encode(pic, "JPEG", quality=80, restart_marker_blocks=2),
        "jpeg progressive": encode(pic, "JPEG", quality=80, progressive=True),
    }


def test_mutated_headers_are_refused_as_kinds_never_crash():
    """Each seed file with bytes of its first 600 overwritten (4000 variants): opening and fully
    decoding gives an image or an ImageRejected with a schema kind, never another exception."""
    rng = np.random.default_rng(12)
    kinds = set()
    for name, seed in _seeds().items():
        for _ in range(4000 // 7):
            data = bytearray(seed)
            for at in rng.integers(0, min(600, len(seed)), size=int(rng.integers(1, 4))):
                data[at] = int(rng.choice([0x00, 0xFF, 0x7F, 0x80, int(rng.integers(0, 256))]))
            try:
                with open_image(bytes(data), SMALL_CAP) as img:
                    decode_complete(img)
            except ImageRejected as e:
                assert e.kind in (ErrorKind.DECODE_ERROR, ErrorKind.DECOMPRESSION_BOMB), (name, e.kind)
                kinds.add(e.kind)
    assert kinds == {ErrorKind.DECODE_ERROR, ErrorKind.DECOMPRESSION_BOMB}

"""pipeline.media.resize: img2dataset's size semantics (checked against its recorded behaviour), format
and mode handling, hostile input, and the JPEG draft-decoding speed path."""
from __future__ import annotations

import importlib.util
import io
import json
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageOps

from helpers.paths import TEST_DATA
from pipeline.core.schema import error_kind
from pipeline.media import resize as rz
from pipeline.media.geometry import plan_geometry
from pipeline.media.resize import ResizeConfig, ResizeResult, resize_image

EXPECTED = json.loads((TEST_DATA / "img2dataset_sizes.json").read_text())


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_img2dataset_sizes", TEST_DATA / "make_img2dataset_sizes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()

# img2dataset's error strings -> our kinds. Its "'tuple' object has no attribute 'tobytes'" is
# cv2.imencode failing on an output beyond the format's size limit (keep_ratio on a 1000x3 strip).
I2D_ERRORS = {
    "error: image too small": "too_small",
    "error: image area too large": "too_large_area",
    "error: aspect ratio too large": "bad_aspect_ratio",
    "error: 'tuple' object has no attribute 'tobytes'": "encode_error",
}


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return GEN.make_images()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def config_for(config_id: str) -> ResizeConfig:
    return ResizeConfig(**dict(EXPECTED["defaults"], **EXPECTED["configs"][config_id]))


# -- img2dataset compatibility ----------------------------------------------------------------------

@pytest.mark.parametrize("name", [name for name, *_ in GEN.IMAGES])
def test_matches_img2dataset(images, name):
    """Same output size, original size and failure for every mode and rule as img2dataset's own
    Resizer on the same image; colours per quadrant agree too (crop position, pad colour)."""
    for config_id, expected in EXPECTED["results"][name].items():
        result = resize_image(images[name], config_for(config_id))
        where = f"{name} / {config_id}"
        if isinstance(expected, str):
            assert not result.ok, where
            assert result.error_kind == I2D_ERRORS[expected], (where, result.error_message)
            continue
        assert result.ok, (where, result.error_message)
        assert [result.width, result.height, result.original_width, result.original_height] == expected[:4], where
        assert decode(result.data).size == (result.width, result.height)
        if min(result.width, result.height) >= 8:  # 1-2 px outputs are all JPEG chroma smear
            got = GEN.fingerprint(result.data)
            assert max(abs(a - b) for a, b in zip(got, expected[4])) <= 8, (where, got, expected[4])


def test_expectations_cover_every_mode_and_rule():
    modes = {c["resize_mode"] for c in EXPECTED["configs"].values()}
    assert modes == set(rz.RESIZE_MODES)
    kinds = {I2D_ERRORS[r] for per in EXPECTED["results"].values() for r in per.values() if isinstance(r, str)}
    assert {"too_small", "too_large_area", "bad_aspect_ratio"} <= kinds


def test_geometry_rounds_half_to_even_like_albumentations():
    assert plan_geometry(1025, 512, 256, "keep_ratio").resized == (512, 256)   # 512.5 -> 512
    assert plan_geometry(1027, 512, 256, "keep_ratio").resized == (514, 256)   # 513.5 -> 514
    g = plan_geometry(512, 301, 256, "border")
    assert g.resized == (256, 150) and g.canvas == (256, 256) and g.offset == (0, 53)


def test_border_pads_white_floor_half_before():
    """400x201 -> 256x129: 127 rows of padding, 63 above (floor) and 64 below, as albumentations."""
    src = Image.new("RGB", (400, 201), (200, 0, 0))
    r = resize_image(encode(src), ResizeConfig(resize_mode="border", image_size=256, encode_format="png"))
    out = decode(r.data).convert("RGB")
    assert out.size == (256, 256)
    column = [out.getpixel((128, y)) for y in range(256)]
    assert column[:63] == [(255, 255, 255)] * 63 and column[192:] == [(255, 255, 255)] * 64
    assert column[63:192] == [(200, 0, 0)] * 129


@pytest.mark.parametrize("scale", [1, 2])
def test_center_crop_offset_is_floor_of_half(scale):
    """301x256 (or 602x512 halved) -> 256: 45 extra columns, the crop starts at column 22."""
    src = Image.new("RGB", (301 * scale, 256 * scale), (128, 128, 128))
    for column, colour in ((21, (0, 255, 0)), (22, (255, 0, 0)), (277, (0, 0, 255)), (278, (0, 255, 0))):
        src.paste(colour, (column * scale, 0, (column + 1) * scale, 256 * scale))  # green: cut off
    r = resize_image(encode(src), ResizeConfig(resize_mode="center_crop", image_size=256, encode_format="png"))
    out = decode(r.data)
    assert out.getpixel((0, 100)) == (255, 0, 0)
    assert out.getpixel((255, 100)) == (0, 0, 255)


# -- orientation, modes and formats ----------------------------------------------------------------

def corner_image(width: int, height: int) -> Image.Image:
    """Grey with a red block in the top-left corner and a blue one in the bottom-left."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, width // 4, height // 4))
    img.paste((0, 0, 255), (0, height - height // 4, width // 4, height))
    return img


def with_orientation(img: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def test_exif_orientation_6_is_applied():
    data = with_orientation(corner_image(400, 200), 6)
    r = resize_image(data, ResizeConfig(resize_mode="no"))
    assert r.ok and (r.width, r.height) == (200, 400)
    assert (r.original_width, r.original_height) == (200, 400)
    out = decode(r.data).convert("RGB")
    assert out.getexif().get(0x0112, 1) == 1  # the output must not be rotated a second time
    # Rotated 90 degrees clockwise: stored top-left (red) -> top-right, bottom-left (blue) -> top-left.
    red = out.getpixel((190, 10))
    blue = out.getpixel((10, 10))
    assert red[0] > 200 and red[2] < 60, red
    assert blue[2] > 200 and blue[0] < 60, blue


def smooth_image(width: int, height: int, period: float = 80) -> Image.Image:
    """Sinusoids in x, y and a diagonal: no hard edges, so resampling order barely matters, but
    a mirrored or shifted crop shows up as a large difference."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = [np.sin(2 * np.pi * x / period), np.sin(2 * np.pi * y / (period * 0.7)),
             np.sin(2 * np.pi * (x + 2 * y) / (period * 1.3))]
    return Image.fromarray((127 + 100 * np.stack(bands, -1)).astype(np.uint8), "RGB")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_transposing_first(orientation):
    """Crop-in-resize on the stored grid then rotate == rotate the full image then resize."""
    data = with_orientation(smooth_image(301, 203), orientation, fmt="PNG")
    reference = encode(ImageOps.exif_transpose(decode(data)))
    for mode in ("center_crop", "keep_ratio", "border"):
        for size in (64, 97, 400):
            cfg = ResizeConfig(resize_mode=mode, image_size=size, encode_format="png")
            got, want = resize_image(data, cfg), resize_image(reference, cfg)
            assert got.ok and want.ok, (orientation, mode, size, got.error_message)
            assert (got.width, got.height) == (want.width, want.height)
            diff = np.abs(np.asarray(decode(got.data), np.int16) - np.asarray(decode(want.data), np.int16))
            # PIL's box filter is not mirror-symmetric at fractional edges: a few levels at most.
            assert diff.max() <= 8, (orientation, mode, size, diff.max())


def test_rgba_is_composited_on_white():
    src = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    src.paste((0, 0, 255, 0), (0, 0, 32, 64))       # left half fully transparent (blue, ignored)
    src.paste((0, 0, 0, 128), (32, 0, 48, 64))       # half-transparent black -> mid grey
    r = resize_image(encode(src), ResizeConfig(resize_mode="no", encode_format="png"))
    out = decode(r.data)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((40, 5)))
    assert out.getpixel((60, 5)) == (255, 0, 0)


def test_la_and_palette_transparency_become_white():
    la = Image.new("LA", (16, 16), (0, 0))
    r = resize_image(encode(la), ResizeConfig(resize_mode="no", encode_format="png"))
    assert decode(r.data).getpixel((3, 3)) == (255, 255, 255)
    p = Image.new("P", (16, 16), 1)
    p.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    p.paste(0, (0, 0, 8, 16))
    r = resize_image(encode(p, "PNG", transparency=0), ResizeConfig(resize_mode="no", encode_format="png"))
    out = decode(r.data)
    assert out.getpixel((2, 2)) == (255, 255, 255) and out.getpixel((12, 2)) == (10, 200, 10)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (80, 60), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    r = resize_image(buf.getvalue(), ResizeConfig(resize_mode="keep_ratio", image_size=30, encode_format="png"))
    assert r.ok and (r.width, r.height) == (40, 30)
    assert decode(r.data).getpixel((20, 15)) == (255, 0, 0)


def test_animated_webp_and_apng_give_first_frame():
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((0, 0, 255), (255, 255, 0))]
    for fmt in ("WEBP", "PNG"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50,
                       **({"lossless": True} if fmt == "WEBP" else {}))
        r = resize_image(buf.getvalue(), ResizeConfig(resize_mode="no", encode_format="png"))
        assert r.ok, (fmt, r.error_message)
        assert decode(r.data).getpixel((20, 20)) == (0, 0, 255), fmt


def test_cmyk_jpeg_decodes_to_rgb():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # red
    cmyk.paste((255, 0, 255, 0), (32, 0, 64, 64))        # green
    r = resize_image(encode(cmyk, "JPEG", quality=95), ResizeConfig(resize_mode="no", encode_format="png"))
    out = decode(r.data)
    assert out.mode == "RGB"
    red, green = out.getpixel((10, 30)), out.getpixel((50, 30))
    assert red[0] > 220 and red[1] < 40 and red[2] < 40, red
    assert green[1] > 220 and green[0] < 40 and green[2] < 40, green


def test_grayscale_and_16bit_become_rgb():
    r = resize_image(encode(Image.new("L", (20, 20), 77)), ResizeConfig(resize_mode="no", encode_format="png"))
    assert decode(r.data).getpixel((5, 5)) == (77, 77, 77)
    sixteen = Image.fromarray(np.full((20, 20), 0x8000, np.uint16))
    data = encode(sixteen)
    assert decode(data).mode.startswith("I")
    r = resize_image(data, ResizeConfig(resize_mode="no", encode_format="png"))
    assert decode(r.data).getpixel((5, 5)) == (128, 128, 128)  # scaled, not clipped to 255


@pytest.mark.parametrize("fmt,pil_format", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_formats_round_trip(fmt, pil_format):
    src = smooth_image(120, 90)
    cfg = ResizeConfig(resize_mode="no", encode_format=fmt, encode_quality=90 if fmt != "png" else 3)
    r = resize_image(encode(src), cfg)
    out = decode(r.data)
    assert out.format == pil_format and out.size == (120, 90) and out.mode == "RGB"
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(src, np.int16))
    assert diff.max() == 0 if fmt == "png" else diff.mean() < 3


def test_png_quality_above_9_uses_default_level():
    src = encode(Image.fromarray(GEN.pattern(64, 64), "RGB"))
    assert resize_image(src, ResizeConfig(encode_format="png", encode_quality=95)).ok


def test_jpeg_quality_changes_size():
    src = encode(Image.fromarray(GEN.pattern(300, 300), "RGB"))
    low = resize_image(src, ResizeConfig(encode_quality=30)).data
    high = resize_image(src, ResizeConfig(encode_quality=95)).data
    assert len(low) < len(high)


# -- size rules -------------------------------------------------------------------------------------

def test_min_image_size_rejects_tiny_images():
    r = resize_image(encode(Image.new("RGB", (20, 300))), ResizeConfig(min_image_size=64))
    assert not r.ok and r.error_kind == "too_small" and r.data is None
    assert (r.original_width, r.original_height) == (20, 300)
    assert r.decoded_size is None  # rejected from the header, nothing decoded


def test_max_aspect_ratio_and_area():
    data = encode(Image.new("RGB", (300, 100)))
    assert resize_image(data, ResizeConfig(max_aspect_ratio=2.5)).error_kind == "bad_aspect_ratio"
    assert resize_image(data, ResizeConfig(max_aspect_ratio=3.0)).ok  # strictly greater fails
    assert resize_image(data, ResizeConfig(max_image_area=29_999)).error_kind == "too_large_area"
    assert resize_image(data, ResizeConfig(max_image_area=30_000)).ok


def test_rules_apply_to_the_displayed_size():
    data = with_orientation(Image.new("RGB", (300, 100)), 8)  # displayed 100x300
    assert resize_image(data, ResizeConfig(min_image_size=150)).error_kind == "too_small"
    r = resize_image(data, ResizeConfig(resize_mode="keep_ratio", image_size=50))
    assert (r.width, r.height) == (50, 150)


def test_huge_output_is_refused_before_resizing():
    strip = encode(Image.new("RGB", (3000, 1)))
    r = resize_image(strip, ResizeConfig(resize_mode="keep_ratio", image_size=256))
    assert r.error_kind == "encode_error" and r.decoded_size is None
    assert resize_image(strip, ResizeConfig(resize_mode="center_crop")).ok  # only the crop is resampled


# -- hostile input -----------------------------------------------------------------------------------

def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of zeros built with zlib directly: deflate resets its state at each
    full flush, so one compressed block of rows repeats verbatim; adler32 of n zero bytes is
    ((n mod 65521) << 16) | 1."""
    rows = 100
    assert height % rows == 0
    block = b"\0" * ((width + 1) * rows)
    comp = zlib.compressobj(9)
    head = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    piece = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    total = (width + 1) * height
    idat = head + piece * (height // rows - 1) + b"\x03\x00" + struct.pack(">I", ((total % 65521) << 16) | 1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_bomb_builder_makes_a_valid_png():
    img = decode(png_bomb(300, 200))
    assert img.size == (300, 200) and img.getextrema() == (0, 0)


def test_decompression_bomb_fails_fast_without_decoding():
    bomb = png_bomb(24_000, 24_000)
    assert len(bomb) < 1_000_000
    start = time.perf_counter()
    r = resize_image(bomb, ResizeConfig())
    assert time.perf_counter() - start < 0.5
    assert r.error_kind == "decompression_bomb" and r.decoded_size is None


def test_pixel_cap_holds_even_if_pil_guard_is_disabled(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # some libraries do this globally
    r = resize_image(png_bomb(24_000, 24_000), ResizeConfig())
    assert r.error_kind == "decompression_bomb" and "max_pixels" in r.error_message
    small_cap = resize_image(png_bomb(2000, 1000), ResizeConfig(max_pixels=1_000_000))
    assert small_cap.error_kind == "decompression_bomb"


@pytest.mark.parametrize("data", [b"", b"garbage bytes", b"<!DOCTYPE html><html></html>",
                                  b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                                  b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"\xff\xd8\xff\xe0" + b"\0" * 100])
def test_corrupt_bytes_are_decode_errors(data):
    r = resize_image(data, ResizeConfig())
    assert not r.ok and r.error_kind == "decode_error" and r.error_message


def test_truncated_jpeg_is_a_decode_error():
    """Documented choice: a truncated body fails (OpenCV would pad it with grey and accept it)."""
    full = encode(Image.fromarray(GEN.pattern(800, 600), "RGB"), "JPEG", quality=90)
    for cut in (len(full) // 2, len(full) - 100):
        r = resize_image(full[:cut], ResizeConfig())
        assert r.error_kind == "decode_error" and "truncated" in r.error_message


def test_every_error_kind_is_in_the_schema():
    for kind in ("decode_error", "decompression_bomb", "too_small", "too_large_area", "bad_aspect_ratio",
                 "encode_error"):
        assert error_kind(kind).status == "failed_to_resize"


# -- the draft (reduced-scale JPEG decode) path -------------------------------------------------------

@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    # Upscaled from a small pattern: real JPEG content without generating 12M random pixels.
    small = Image.fromarray(GEN.pattern(800, 600, seed=7), "RGB")
    return encode(small.resize((4000, 3000), Image.Resampling.BICUBIC), "JPEG", quality=92)


def test_draft_decodes_a_big_jpeg_at_reduced_scale(big_jpeg):
    r = resize_image(big_jpeg, ResizeConfig(image_size=256, resize_mode="center_crop"))
    assert r.ok and (r.width, r.height) == (256, 256) and (r.original_width, r.original_height) == (4000, 3000)
    assert r.decoded_size == (500, 375)  # 1/8 scale: still >= the 341x256 the crop needs


@pytest.mark.parametrize("size,mode,decoded", [
    (256, "keep_ratio", (500, 375)),          # needs 341x256: 4000 // 341 = 11 -> 1/8
    (512, "keep_ratio", (1000, 750)),         # needs 683x512: 3000 // 512 = 5 -> 1/4
    (1024, "keep_ratio_largest", (2000, 1500)),  # needs 1024x768: 3 -> 1/2
    (2500, "keep_ratio", (4000, 3000)),       # upscale: full decode
])
def test_draft_never_decodes_below_the_needed_size(big_jpeg, size, mode, decoded):
    r = resize_image(big_jpeg, ResizeConfig(image_size=size, resize_mode=mode, max_pixels=10**9))
    assert r.decoded_size == decoded
    needed = plan_geometry(4000, 3000, size, mode).resized
    assert r.decoded_size[0] >= needed[0] and r.decoded_size[1] >= needed[1]


def test_draft_output_matches_a_full_decode(big_jpeg, monkeypatch):
    cfg = ResizeConfig(image_size=256, resize_mode="center_crop", encode_format="png")
    drafted = resize_image(big_jpeg, cfg)
    monkeypatch.setattr(rz, "_draft", lambda img, target: 1.0)
    full = resize_image(big_jpeg, cfg)
    assert full.decoded_size == (4000, 3000) and drafted.decoded_size == (500, 375)
    a, b = (np.asarray(decode(r.data), np.float64) for r in (drafted, full))
    psnr = 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2))
    assert psnr > 30, psnr


def test_draft_works_for_rgb_coded_jpeg_and_mpo():
    src = Image.new("RGB", (1200, 900), (200, 10, 10))
    for data in (encode(src, "JPEG", keep_rgb=True),  # Adobe transform 0: RGB, not YCbCr
                 encode(src, "MPO", save_all=True, append_images=[src])):  # camera multi-picture
        r = resize_image(data, ResizeConfig())
        assert r.ok and r.decoded_size == (600, 450), r.error_message
        assert all(abs(a - b) <= 3 for a, b in zip(decode(r.data).getpixel((9, 9)), (200, 10, 10)))


def test_no_draft_for_png(images):
    jpeg = encode(decode(images["big"]).reduce(2), "JPEG")  # 1024x768
    assert resize_image(jpeg, ResizeConfig()).decoded_size == (512, 384)  # needs 341x256: 1/2
    png = encode(decode(jpeg))
    assert resize_image(png, ResizeConfig()).decoded_size == (1024, 768)


# -- API ---------------------------------------------------------------------------------------------

def test_config_validation():
    for bad in ({"resize_mode": "fixed"}, {"encode_format": "gif"}, {"image_size": 0}, {"encode_quality": 101}):
        with pytest.raises(ValueError):
            ResizeConfig(**bad)


def test_deterministic_and_thread_safe(images):
    inputs = [images[n] for n in ("vga", "rgba", "gif", "webp_odd", "big", "gray")] * 4
    cfg = ResizeConfig(resize_mode="border", encode_format="webp", encode_quality=80)
    serial = [resize_image(d, cfg).data for d in inputs]
    with ThreadPoolExecutor(8) as pool:
        parallel = [r.data for r in pool.map(lambda d: resize_image(d, cfg), inputs)]
    assert serial == parallel and all(serial)


def test_result_shape_on_failure():
    r = resize_image(b"nope", ResizeConfig())
    assert isinstance(r, ResizeResult)
    assert (r.ok, r.data, r.width, r.height) == (False, None, None, None)

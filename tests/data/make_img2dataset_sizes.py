"""Record what img2dataset's own Resizer does, so our tests can check pipeline.media.resize against it
without img2dataset installed.

    bash benchmarks/peer_env.sh
    .benchvenv/bin/python tests/data/make_img2dataset_sizes.py   # rewrites img2dataset_sizes.json

The images are generated deterministically with PIL and numpy (``make_images``); tests/media/test_resize.py
imports this module to rebuild the same images and reads the JSON. For every image and every
config in ``CONFIGS`` the JSON holds img2dataset's ``[width, height, original_width,
original_height]`` plus a colour fingerprint of its output (mean RGB of each quadrant), or
``"error: <message>"``.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).with_name("img2dataset_sizes.json")
MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")

# (name, width, height, kind). Sizes cover: tiny, exactly image_size, one pixel either side, odd
# sizes, x.5 rounding (Python rounds half to even), extreme aspect ratios, portrait/landscape.
IMAGES = [
    ("tiny", 1, 1, "png"),
    ("small", 10, 7, "jpeg"),
    ("wide_strip", 1000, 3, "png"),
    ("tall_strip", 5, 700, "png"),
    ("sq255", 255, 255, "jpeg"),
    ("sq256", 256, 256, "jpeg"),
    ("sq257", 257, 257, "jpeg"),
    ("edge256", 256, 300, "jpeg"),
    ("edge256b", 300, 256, "png"),
    ("land300", 300, 200, "jpeg"),
    ("port200", 200, 300, "jpeg"),
    ("odd", 333, 517, "jpeg"),
    ("vga", 640, 480, "jpeg"),
    ("vga_port", 480, 640, "webp"),
    ("half_even", 1025, 512, "jpeg"),   # 1025 * 0.5 = 512.5 -> 512
    ("half_even2", 1027, 512, "jpeg"),  # 513.5 -> 514
    ("half_even3", 512, 301, "png"),    # long-side modes: 150.5 -> 150
    ("half_even4", 512, 303, "png"),    # 151.5 -> 152
    ("hd", 1920, 1080, "jpeg"),
    ("big", 2048, 1536, "jpeg"),
    ("pano", 1600, 400, "jpeg"),
    ("rgba", 400, 300, "png_rgba"),
    ("gray", 500, 350, "jpeg_gray"),
    ("gif", 320, 240, "gif"),
    ("webp_odd", 999, 401, "webp"),
]


def _configs() -> dict[str, dict]:
    configs = {}
    for size in (256, 64):
        for mode in MODES:
            for rib in (False, True):
                name = f"{mode}-{size}" + ("-rib" if rib else "")
                configs[name] = {"image_size": size, "resize_mode": mode, "resize_only_if_bigger": rib}
    configs["min_size"] = {"resize_mode": "center_crop", "min_image_size": 100}
    configs["max_area"] = {"resize_mode": "keep_ratio", "max_image_area": 250_000}
    configs["aspect"] = {"resize_mode": "center_crop", "max_aspect_ratio": 2.0}
    configs["all_rules"] = {"resize_mode": "border", "min_image_size": 200, "max_image_area": 1_000_000,
                            "max_aspect_ratio": 1.6}
    configs["png"] = {"resize_mode": "border", "image_size": 128, "encode_format": "png", "encode_quality": 6}
    configs["webp"] = {"resize_mode": "keep_ratio", "image_size": 128, "encode_format": "webp",
                       "encode_quality": 80}
    return configs


CONFIGS = _configs()
DEFAULTS = {"image_size": 256, "resize_mode": "center_crop", "resize_only_if_bigger": False,
            "encode_format": "jpg", "encode_quality": 95, "min_image_size": 0, "max_image_area": None,
            "max_aspect_ratio": None}


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Four coloured quadrants (red, green / blue, yellow) with a gradient and mild noise, so JPEG
    sees real content and crops, pads and rotations show in the quadrant means."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float32)
    top, left = np.arange(height)[:, None] < height / 2, np.arange(width)[None, :] < width / 2
    colours = {(True, True): (220, 30, 30), (True, False): (30, 200, 40),
               (False, True): (30, 40, 210), (False, False): (230, 220, 40)}
    for (t, l), colour in colours.items():
        mask = (top == t) & (left == l)
        img[mask] = colour
    img += np.linspace(-20, 20, width, dtype=np.float32)[None, :, None]
    img += rng.integers(-10, 11, img.shape, dtype=np.int8)  # integer noise: fast to generate
    return img.clip(0, 255).astype(np.uint8)


def encode(arr: np.ndarray, kind: str) -> bytes:
    img = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    if kind == "jpeg":
        img.save(buf, "JPEG", quality=90)
    elif kind == "jpeg_gray":
        img.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "png":
        img.save(buf, "PNG")
    elif kind == "png_rgba":
        rgba = img.convert("RGBA")
        alpha = np.full(arr.shape[:2], 255, np.uint8)
        alpha[:, : arr.shape[1] // 4] = 0          # left quarter fully transparent
        alpha[:, arr.shape[1] // 4: arr.shape[1] // 2] = 128
        rgba.putalpha(Image.fromarray(alpha, "L"))
        rgba.save(buf, "PNG")
    elif kind == "webp":
        img.save(buf, "WEBP", quality=90)
    elif kind == "gif":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, "GIF")
    else:
        raise ValueError(kind)
    return buf.getvalue()


def make_images() -> dict[str, bytes]:
    return {name: encode(pattern(w, h, seed=i), kind) for i, (name, w, h, kind) in enumerate(IMAGES)}


def fingerprint(data: bytes) -> list[int]:
    """Mean R, G, B of each quadrant (TL, TR, BL, BR) of an encoded image: a 2x2 area resize."""
    quads = Image.open(io.BytesIO(data)).convert("RGB").resize((2, 2), Image.Resampling.BOX)
    return [int(v) for v in np.asarray(quads).reshape(-1)]


def run_img2dataset(data: bytes, config: dict):
    from img2dataset.resizer import Resizer  # only in .benchvenv

    full = dict(DEFAULTS, **config)
    resizer = Resizer(
        image_size=full["image_size"], resize_mode=full["resize_mode"],
        resize_only_if_bigger=full["resize_only_if_bigger"], encode_format=full["encode_format"],
        encode_quality=full["encode_quality"], min_image_size=full["min_image_size"],
        max_image_area=full["max_image_area"] if full["max_image_area"] is not None else float("inf"),
        max_aspect_ratio=full["max_aspect_ratio"] if full["max_aspect_ratio"] is not None else float("inf"),
    )
    out, width, height, orig_w, orig_h, err = resizer(io.BytesIO(data))
    if err is not None:
        return f"error: {err}"
    return [width, height, orig_w, orig_h, fingerprint(out)]


def main() -> None:
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks online on import
    from importlib.metadata import version

    import img2dataset  # noqa: F401 - fail early outside .benchvenv

    images = make_images()
    results = {name: {cid: run_img2dataset(data, cfg) for cid, cfg in CONFIGS.items()}
               for name, data in images.items()}
    doc = {"img2dataset": version("img2dataset"), "albumentations": version("albumentations"),
           "opencv": version("opencv-python-headless"), "defaults": DEFAULTS, "configs": CONFIGS,
           "results": results}
    OUT.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
    n_err = sum(isinstance(r, str) for per in results.values() for r in per.values())
    print(f"wrote {OUT}: {len(images)} images x {len(CONFIGS)} configs, {n_err} errors", file=sys.stderr)


if __name__ == "__main__":
    main()

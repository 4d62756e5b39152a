"""A deterministic synthetic image-caption set: one coloured shape on a plain background, with a
caption that describes it (shape, colour, size, position, background).

The project's tiny models (the tiny CLIP and the tiny VQ tokenizer in ``pipeline/testing/models``) train on it,
and the demo serves it, because nothing may be downloaded from a model hub here. Every sample is a
pure function of ``(seed, index)``, so any process can regenerate sample ``i`` without the others.

    >>> image, caption = make_pairs(1, seed=0)[0]
    >>> caption
    'a photo of a large black square at the top on beige'
"""
from __future__ import annotations

import hashlib
import io
import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from pipeline.core import schema

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 65), "blue": (45, 85, 215), "yellow": (235, 205, 45),
    "purple": (135, 60, 175), "orange": (240, 135, 35), "white": (245, 245, 245), "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128), "beige": (225, 210, 180),
}
SIZES: dict[str, float] = {"small": 0.13, "large": 0.24}  # radius as a fraction of the image side
# position name -> (x, y) centre as fractions of the image side, and how a caption says it
POSITIONS: dict[str, tuple[float, float, str]] = {
    "center": (0.5, 0.5, "in the center"),
    "top": (0.5, 0.27, "at the top"),
    "bottom": (0.5, 0.73, "at the bottom"),
    "left": (0.27, 0.5, "on the left"),
    "right": (0.73, 0.5, "on the right"),
    "top left": (0.27, 0.27, "in the top left"),
    "top right": (0.73, 0.27, "in the top right"),
    "bottom left": (0.27, 0.73, "in the bottom left"),
    "bottom right": (0.73, 0.73, "in the bottom right"),
}
TEMPLATES = (
    "a {size} {colour} {shape} {where} on a {background} background",
    "{size} {colour} {shape} {where}, {background} background",
    "a photo of a {size} {colour} {shape} {where} on {background}",
)
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges without depending on PIL's AA support


@dataclass(frozen=True)
class Scene:
    """One sample's content; ``jitter`` holds the small random offsets that make images vary."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    template: int = 0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # dx, dy, scale, rotation (deg)

    def caption(self) -> str:
        return TEMPLATES[self.template].format(size=self.size, colour=self.colour, shape=self.shape,
                                               where=POSITIONS[self.position][2], background=self.background)

    def render(self, size: int = 64) -> Image.Image:
        big = size * _SUPERSAMPLE
        image = Image.new("RGB", (big, big), BACKGROUNDS[self.background])
        dx, dy, scale, rotation = self.jitter
        x, y, _ = POSITIONS[self.position]
        cx, cy = (x + dx) * big, (y + dy) * big
        r = SIZES[self.size] * scale * big
        _draw_shape(ImageDraw.Draw(image), self.shape, cx, cy, r, rotation, COLOURS[self.colour])
        return image.reduce(_SUPERSAMPLE)

    def altered(self, rng: random.Random, attribute: str | None = None) -> "Scene":
        """The same scene with one attribute changed (a hard negative for its caption)."""
        attribute = attribute or rng.choice(ATTRIBUTES)
        choices = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES),
                   "position": tuple(POSITIONS), "background": tuple(BACKGROUNDS)}[attribute]
        current = getattr(self, attribute)
        while True:
            new = replace(self, **{attribute: rng.choice([c for c in choices if c != current])})
            if _visible(new.colour, new.background):
                return new


def _visible(colour: str, background: str) -> bool:
    return colour != background


def scene(index: int, seed: int = 0) -> Scene:
    """Sample ``index`` of the set with this seed; independent of every other index."""
    rng = random.Random(f"mmcurate-synthetic:{seed}:{index}")
    while True:
        colour, background = rng.choice(tuple(COLOURS)), rng.choice(tuple(BACKGROUNDS))
        if _visible(colour, background):
            break
    return Scene(
        shape=rng.choice(SHAPES), colour=colour, size=rng.choice(tuple(SIZES)),
        position=rng.choice(tuple(POSITIONS)), background=background,
        template=rng.randrange(len(TEMPLATES)),
        jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0.85, 1.15),
                rng.uniform(-15.0, 15.0)),
    )


def make_scenes(n: int, seed: int = 0, start: int = 0) -> list[Scene]:
    return [scene(i, seed) for i in range(start, start + n)]


def make_pairs(n: int, seed: int = 0, size: int = 64, start: int = 0) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs: samples ``start .. start+n-1`` of the set with this seed."""
    return [(s.render(size), s.caption()) for s in make_scenes(n, seed, start)]


def shuffled_captions(captions: list[str], seed: int = 0) -> list[str]:
    """The captions in a deterministic order where no caption stays next to its own image (a
    derangement over distinct texts): the mismatched pairs a CLIP filter should remove."""
    n = len(captions)
    if n < 2 or len(set(captions)) < 2:
        raise ValueError("need at least two distinct captions to mismatch them")
    order = list(range(n))
    random.Random(f"mmcurate-shuffle:{seed}").shuffle(order)
    for i in range(n):  # repair fixed points by swapping with a partner that fixes both
        if captions[order[i]] == captions[i]:
            for j in range(n):
                if captions[order[j]] != captions[i] and captions[order[i]] != captions[j]:
                    order[i], order[j] = order[j], order[i]
                    break
    return [captions[k] for k in order]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                rotation: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    if shape == "cross":  # a plus sign: two bars, rotated together
        w = r * 0.38
        for bar in (((-r, -w), (r, -w), (r, w), (-r, w)), ((-w, -r), (w, -r), (w, r), (-w, r))):
            draw.polygon(_place(bar, cx, cy, rotation), fill=fill)
        return
    if shape == "square":
        s = r * 0.85
        points = ((-s, -s), (s, -s), (s, s), (-s, s))
    elif shape == "diamond":
        points = ((0, -r), (r * 0.75, 0), (0, r), (-r * 0.75, 0))
    elif shape == "triangle":
        points = tuple((r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150))
    elif shape == "star":
        points = tuple(((r if k % 2 == 0 else r * 0.45) * math.cos(math.radians(-90 + 36 * k)),
                        (r if k % 2 == 0 else r * 0.45) * math.sin(math.radians(-90 + 36 * k))) for k in range(10))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    draw.polygon(_place(points, cx, cy, rotation), fill=fill)


def _place(points, cx: float, cy: float, rotation: float) -> list[tuple[float, float]]:
    a = math.radians(rotation)
    c, s = math.cos(a), math.sin(a)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def encode(image: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=quality)
    return buf.getvalue()


def make_batch(pairs: list[tuple[Image.Image, str]], fmt: str = "jpg", shard_id: int = 0,
               quality: int = 95) -> dict[str, list]:
    """A pipeline batch (see pipeline.core.schema) of these pairs as the download stage leaves it:
    encoded images under ``fmt``, sizes and sha256 filled in, every row still pending."""
    n = len(pairs)
    images = [encode(im, fmt, quality) for im, _ in pairs]
    return {
        schema.KEY: [schema.make_key(shard_id, i, max(n, 1)) for i in range(n)],
        schema.URL: [f"synthetic://{i}" for i in range(n)],
        schema.CAPTION: [c for _, c in pairs],
        schema.STATUS: [schema.PENDING] * n,
        schema.ERROR_KIND: [None] * n,
        schema.ERROR_MESSAGE: [None] * n,
        schema.WIDTH: [im.width for im, _ in pairs],
        schema.HEIGHT: [im.height for im, _ in pairs],
        schema.ORIGINAL_WIDTH: [im.width for im, _ in pairs],
        schema.ORIGINAL_HEIGHT: [im.height for im, _ in pairs],
        schema.SHA256: [hashlib.sha256(b).hexdigest() for b in images],
        schema.FILES: [{fmt: b} for b in images],
    }

"""Perceptual image hashes (64-bit pHash and dHash, as the ``imagehash`` package defines them) and
an index that finds a stored hash within a Hamming distance without comparing against all of them."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from pipeline.media.image_open import open_image

BITS = 64
_HASH_SIDE = 8


def load_gray(data: bytes, side: int) -> Image.Image:
    """Decode to grayscale; JPEGs are decoded at reduced scale (DCT scaling) when much larger.
    Raises :class:`pipeline.media.image_open.ImageRejected` for bytes that are not a whitelisted
    image within the pixel cap."""
    with open_image(data) as im:
        im.draft("L", (side, side))  # a no-op for formats other than JPEG
        return im.convert("L")


def _bits_to_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.astype(np.uint8).ravel()).tobytes(), "big")


@lru_cache(maxsize=4)
def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of the (unnormalised) DCT-II matrix of size ``n``."""
    freq = np.arange(k)[:, None]
    pos = np.arange(n)[None, :]
    return np.cos(np.pi * freq * (2 * pos + 1) / (2 * n))


def phash(data: bytes) -> int:
    """Low-frequency 8x8 DCT coefficients of a 32x32 grayscale copy, thresholded at their median."""
    side = _HASH_SIDE * 4
    pixels = np.asarray(load_gray(data, side).resize((side, side), Image.Resampling.LANCZOS), dtype=np.float64)
    m = _dct_rows(side, _HASH_SIDE)
    low = m @ pixels @ m.T
    return _bits_to_int(low > np.median(low))


def dhash(data: bytes) -> int:
    """Whether each pixel of a 9x8 grayscale copy is brighter than its left neighbour."""
    small = load_gray(data, _HASH_SIDE + 1).resize((_HASH_SIDE + 1, _HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.int16)
    return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])


HASHES = {"phash": phash, "dhash": dhash}


class HammingIndex:
    """Stored 64-bit hashes, searchable within ``max_distance`` bits.

    The hash is cut into ``max_distance + 1`` bands; two hashes within that distance agree exactly
    on at least one band (pigeonhole), so only hashes sharing a band value are compared. Fast for
    small distances (a few bits), which is what near-duplicate detection uses.
    """

    def __init__(self, max_distance: int) -> None:
        if not 0 <= max_distance < BITS:
            raise ValueError(f"max_distance must be in 0..{BITS - 1}, got {max_distance}")
        self.max_distance = max_distance
        cuts = np.linspace(0, BITS, max_distance + 2).astype(int)
        self.bands = [(int(lo), int(hi - lo)) for lo, hi in zip(cuts[:-1], cuts[1:])]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes: list[int] = []
        self.keys: list[str] = []

    def __len__(self) -> int:
        return len(self.hashes)

    def _segments(self, h: int) -> list[int]:
        return [(h >> shift) & ((1 << width) - 1) for shift, width in self.bands]

    def find(self, h: int) -> tuple[str, int] | None:
        """The earliest stored (key, distance) within ``max_distance`` of ``h``, if any."""
        best = None
        for table, segment in zip(self.tables, self._segments(h)):
            for n in table.get(segment, ()):
                if best is not None and n >= best:
                    break  # bucket lists are in insertion order
                if (h ^ self.hashes[n]).bit_count() <= self.max_distance:
                    best = n
                    break
        if best is None:
            return None
        return self.keys[best], (h ^ self.hashes[best]).bit_count()

    def add(self, h: int, key: str) -> None:
        n = len(self.hashes)
        self.hashes.append(h)
        self.keys.append(key)
        for table, segment in zip(self.tables, self._segments(h)):
            table.setdefault(segment, []).append(n)

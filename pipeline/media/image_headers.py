"""What image headers say about the pixels to come, read without decoding: the size of every frame
an ICO embeds, a WebP canvas, the AV1 frames of an AVIF, and whether a JPEG's scans can code its
frame. Pure functions on bytes, for :mod:`pipeline.media.image_open`; each returns what it could
read and leaves structures it does not know to the decoder.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ico_frame_sizes(data: bytes) -> list[tuple[int, int]]:
    """The decoded size of every frame of an icon, from each embedded PNG or BMP header (a frame
    whose header is cut off is left to PIL, which fails on it)."""
    sizes = []
    count = int.from_bytes(data[4:6], "little")
    for n in range(count):
        entry = data[6 + 16 * n:22 + 16 * n]
        if len(entry) < 16:
            break
        offset = int.from_bytes(entry[12:16], "little")
        frame = data[offset:offset + 24]
        if frame.startswith(_PNG_MAGIC) and len(frame) >= 24:
            sizes.append(struct.unpack(">II", frame[16:24]))  # IHDR width, height
        elif len(frame) >= 12 and int.from_bytes(frame[:4], "little") == 12:  # OS/2 core header
            w, h = struct.unpack("<HH", frame[4:8])
            sizes.append((w, h // 2))
        elif len(frame) >= 12:
            w, h = struct.unpack("<Ii", frame[4:12])
            sizes.append((w, abs(h) // 2))  # the height counts the XOR image and the AND mask
    return sizes


def webp_canvas(data: bytes) -> Optional[tuple[int, int]]:
    """The canvas size from the first chunk: VP8X's canvas, or a simple file's frame size."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def avif_frame_sizes(data: bytes) -> list[tuple[int, int]]:
    """The largest frame of every item of an AVIF file (its colour image, alpha, grid tiles), from
    the AV1 sequence header that starts the item's data, found through the ``iloc`` box."""
    meta = _box(data, 0, len(data), b"meta")
    iloc = meta and _box(data, meta[0] + 4, meta[1], b"iloc")  # meta is a full box: 4 bytes of version
    if not iloc:
        return []
    sizes = []
    for start, length in _iloc_first_extents(data[iloc[0]:iloc[1]]):
        try:
            sizes.append(_av1_max_frame(data[start:start + min(length or 4096, 4096)]))  # 0: to the end
        except (ValueError, IndexError):  # not AV1 (Exif, XMP, a grid's description) or cut short
            continue
    return sizes


def _box(data: bytes, pos: int, end: int, kind: bytes) -> Optional[tuple[int, int]]:
    """(start, end) of the payload of the first ``kind`` box among the boxes in ``data[pos:end]``."""
    while pos + 8 <= end:
        size, head = int.from_bytes(data[pos:pos + 4], "big"), 8
        if size == 1:
            size, head = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        elif size == 0:
            size = end - pos
        if size < head:
            return None
        if data[pos + 4:pos + 8] == kind:
            return pos + head, min(pos + size, end)
        pos += size
    return None


def _iloc_first_extents(box: bytes) -> list[tuple[int, int]]:
    """(file offset, length) of the first extent of every item stored in the file itself."""
    if len(box) < 8:
        return []
    version, p = box[0], 4
    offset_size, length_size, base_size = box[p] >> 4, box[p] & 0x0F, box[p + 1] >> 4
    index_size = box[p + 1] & 0x0F if version in (1, 2) else 0
    p += 2
    id_size = 4 if version == 2 else 2

    def read(n: int) -> int:
        nonlocal p
        value, p = int.from_bytes(box[p:p + n], "big"), p + n
        return value

    extents = []
    for _ in range(read(id_size)):
        if p >= len(box):  # a count larger than the box: stop where the box does
            break
        read(id_size)  # item id
        method = read(2) & 0x0F if version in (1, 2) else 0
        read(2)  # data reference index
        base = read(base_size)
        first = None
        for _ in range(read(2)):
            if p >= len(box):
                break
            read(index_size)
            extent = base + read(offset_size), read(length_size)
            first = first or extent
        if first and method == 0:  # 0: a file offset (1: inside idat, 2: another item)
            extents.append(first)
    return extents


class _Bits:
    """An MSB-first bit reader over a few bytes."""

    def __init__(self, data: bytes) -> None:
        self.value, self.left = int.from_bytes(data, "big"), 8 * len(data)

    def read(self, n: int) -> int:
        if n > self.left:
            raise ValueError("AV1 sequence header cut short")
        self.left -= n
        return (self.value >> self.left) & ((1 << n) - 1)

    def uvlc(self) -> int:
        zeros = 0
        while not self.read(1):
            zeros += 1
        return self.read(zeros) + (1 << zeros) - 1


def _av1_max_frame(obus: bytes) -> tuple[int, int]:
    """max_frame_width x max_frame_height of the first sequence header OBU (AV1 spec 5.3, 5.5)."""
    p = 0
    while p < len(obus):
        header = obus[p]
        kind, extension, has_size = (header >> 3) & 0x0F, header & 0x04, header & 0x02
        p += 2 if extension else 1
        size, shift = len(obus) - p, 0
        if has_size:  # leb128
            size = 0
            while True:
                size |= (obus[p] & 0x7F) << shift
                shift, p = shift + 7, p + 1
                if not obus[p - 1] & 0x80:
                    break
        if kind == 1:
            return _sequence_header_size(_Bits(obus[p:p + size]))
        if kind != 2 or not has_size:  # only temporal delimiters may come first
            break
        p += size
    raise ValueError("no AV1 sequence header")


def _sequence_header_size(bits: _Bits) -> tuple[int, int]:
    bits.read(4)  # seq_profile, still_picture
    if bits.read(1):  # reduced_still_picture_header
        bits.read(5)
    else:
        decoder_model = 0
        if bits.read(1):  # timing_info_present_flag
            bits.read(64)
            if bits.read(1):  # equal_picture_interval
                bits.uvlc()
            decoder_model = bits.read(1)
            if decoder_model:
                delay_bits = bits.read(5) + 1
                bits.read(32 + 5 + 5)
        display_delay = bits.read(1)
        for _ in range(bits.read(5) + 1):  # operating points
            bits.read(12)
            if bits.read(5) > 7:  # seq_level_idx, then seq_tier
                bits.read(1)
            if decoder_model and bits.read(1):
                bits.read(2 * delay_bits + 1)
            if display_delay and bits.read(1):
                bits.read(4)
    width_bits, height_bits = bits.read(4) + 1, bits.read(4) + 1
    return bits.read(width_bits) + 1, bits.read(height_bits) + 1


# -- JPEG scans against the frame -----------------------------------------------------------------

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SEQUENTIAL_HUFFMAN = frozenset({0xC0, 0xC1})
_PROGRESSIVE_HUFFMAN = 0xC2


class _FFBytes:
    """Where the 0xFF bytes of a JPEG are, by what follows them: a stuffed zero, a restart marker,
    or any other marker (one vectorised pass: bytes.count and regex scans cost 5x more)."""

    def __init__(self, data: bytes) -> None:
        a = np.frombuffer(data, np.uint8)
        at = np.flatnonzero(a[:-1] == 0xFF)
        after = a[at + 1]
        restart = (after >= 0xD0) & (after <= 0xD7)
        self.stuffed, self.restarts = at[after == 0], at[restart]
        self.markers = at[~restart & (after != 0)]
        self.size = len(data)

    def scan_end(self, start: int) -> int:
        """Where the coded data starting at ``start`` ends: the next marker (or the end of data)."""
        i = int(np.searchsorted(self.markers, start))
        return int(self.markers[i]) if i < len(self.markers) else self.size

    @staticmethod
    def count(positions: np.ndarray, start: int, end: int) -> int:
        return int(np.searchsorted(positions, end) - np.searchsorted(positions, start))


@dataclass
class _Frame:
    kind: int                                   # the SOF marker
    width: int
    height: int
    sampling: dict[int, tuple[int, int]]        # component id -> (H, V)

    def blocks(self, component: int) -> int:
        """8x8 blocks of one component (a non-interleaved scan's MCUs)."""
        h, v = self.sampling[component]
        hmax = max(s[0] for s in self.sampling.values())
        vmax = max(s[1] for s in self.sampling.values())
        return math.ceil(math.ceil(self.width * h / hmax) / 8) * math.ceil(math.ceil(self.height * v / vmax) / 8)

    def mcus(self) -> int:
        """MCUs of an interleaved scan."""
        hmax = max(s[0] for s in self.sampling.values())
        vmax = max(s[1] for s in self.sampling.values())
        return math.ceil(self.width / (8 * hmax)) * math.ceil(self.height / (8 * vmax))


def jpeg_truncation(data: bytes) -> Optional[str]:
    """Why the JPEG in ``data`` (its first picture) cannot be complete, or None. Only proofs:
    too few coded bits for the blocks a scan codes, missing restart intervals, a component or a
    coefficient band that no scan codes. Structures it does not know are left to libjpeg."""
    shortest: dict[tuple[int, int], int] = {}   # (class, id) of a Huffman table -> its shortest code
    frame: Optional[_Frame] = None
    restart_interval, scans = 0, 0
    coded: dict[int, set[int]] = {}             # component -> coefficients coded at least once
    pos, n = 2, len(data)
    ff = _FFBytes(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None  # not where a marker must be: libjpeg's to judge
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        pos += 2 + length
        if marker == 0xC4:
            _read_huffman_tables(segment, shortest)
        elif marker in _SOF and frame is None:
            frame = _read_frame(marker, segment)
        elif marker == 0xDD and len(segment) >= 2:
            restart_interval = int.from_bytes(segment[:2], "big")
        elif marker == 0xDA:
            if frame is None:
                return None
            scans += 1
            end = ff.scan_end(pos)
            problem = _check_scan(ff, pos, end, segment, frame, shortest, restart_interval, coded)
            if problem is not None:
                return f"scan {scans}: {problem}"
            pos = end
    if frame is None or not scans:
        return None
    return _check_coverage(frame, coded)


def _read_huffman_tables(segment: bytes, shortest: dict[tuple[int, int], int]) -> None:
    i = 0
    while i + 17 <= len(segment):
        counts = segment[i + 1:i + 17]
        lengths = [bits + 1 for bits, count in enumerate(counts) if count]
        if lengths:
            shortest[(segment[i] >> 4, segment[i] & 0x0F)] = lengths[0]
        i += 17 + sum(counts)


def _read_frame(marker: int, segment: bytes) -> Optional[_Frame]:
    if len(segment) < 6:
        return None
    height, width, count = struct.unpack(">HHB", segment[1:6])
    sampling = {}
    for c in range(count):
        spec = segment[6 + 3 * c:9 + 3 * c]
        if len(spec) < 3 or not spec[1] >> 4 or not spec[1] & 0x0F:
            return None
        sampling[spec[0]] = (spec[1] >> 4, spec[1] & 0x0F)
    return _Frame(marker, width, height, sampling) if sampling else None


def _check_scan(ff: _FFBytes, start: int, end: int, sos: bytes, frame: _Frame, shortest: dict[tuple[int, int], int],
                restart_interval: int, coded: dict[int, set[int]]) -> Optional[str]:
    """One scan's coded data (bytes ``start:end``) against what its header ``sos`` says it codes."""
    count = sos[0] if sos else 0
    if not count or len(sos) < 4 + 2 * count:
        return None
    comps = [(sos[1 + 2 * c], sos[2 + 2 * c]) for c in range(count)]
    if any(cid not in frame.sampling for cid, _ in comps):
        return None
    ss, se, ah = sos[1 + 2 * count], sos[2 + 2 * count], sos[3 + 2 * count] >> 4
    for cid, _ in comps:
        if ah == 0:
            coded.setdefault(cid, set()).update(range(ss, se + 1))
    if frame.width == 0 or frame.height == 0:  # height set later by a DNL marker
        return None
    mcus = frame.blocks(comps[0][0]) if count == 1 else frame.mcus()
    restarts = ff.count(ff.restarts, start, end)
    if restart_interval and restarts < math.ceil(mcus / restart_interval) - 1:
        return f"{restarts + 1} of its {math.ceil(mcus / restart_interval)} restart intervals"
    bits_per_block = []
    for cid, tables in comps:
        blocks = frame.blocks(cid) if count == 1 else mcus * math.prod(frame.sampling[cid])
        least = _least_bits(frame.kind, ss, ah, tables, shortest)
        if least is None:
            return None
        bits_per_block.append((blocks, least))
    needed = sum(blocks * least for blocks, least in bits_per_block)
    have = 8 * (end - start - ff.count(ff.stuffed, start, end) - 2 * restarts)
    if have < needed:
        blocks = sum(b for b, _ in bits_per_block)
        return f"{have // 8} bytes of coded data for {blocks} blocks, which need at least {math.ceil(needed / 8)}"
    return None


def _least_bits(kind: int, ss: int, ah: int, tables: int, shortest: dict[tuple[int, int], int]) -> Optional[int]:
    """The fewest bits any 8x8 block can take in this scan (None: no bound known)."""
    dc, ac = shortest.get((0, tables >> 4)), shortest.get((1, tables & 0x0F))
    if kind in _SEQUENTIAL_HUFFMAN:  # a DC code, then at least one AC code (EOB or a coefficient)
        return None if dc is None or ac is None else dc + ac
    if kind == _PROGRESSIVE_HUFFMAN and ss == 0:  # DC first pass: a code; refinement: one bit
        return 1 if ah else dc
    return 0  # AC bands (end-of-band runs span many blocks), arithmetic coding, lossless


def _check_coverage(frame: _Frame, coded: dict[int, set[int]]) -> Optional[str]:
    """Every component is coded; in a progressive file, its DC and every AC band at least once."""
    for cid in frame.sampling:
        if cid not in coded:
            return f"component {cid} is never coded"
        if frame.kind == _PROGRESSIVE_HUFFMAN:
            missing = sorted(set(range(64)) - coded[cid])
            if missing:
                return f"coefficients {missing[0]}..{missing[-1]} of component {cid} are never coded"
    return None

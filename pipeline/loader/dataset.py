"""Stream mmcurate output directories into trainers: exact, disjoint and resumable epochs.

    ds = ShardDataset("out/laion", fields={"image": "jpg;png;webp", "text": "txt"},
                      batch_size=256, shuffle=True, seed=0, image_size=224)
    loader = Loader(ds, num_workers=8)        # a torch DataLoader that keeps the resume state
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            ...
        torch.save({"data": loader.state_dict(), ...}, checkpoint)

How an epoch is cut, before a byte is read (index.json gives every shard's sample count):

1. Each source (output directory) is an endless stream of draws: cycle ``c`` visits the source's
   shards in an order seeded by ``(seed, source, cycle)``, each shard's samples in tar order.
   Epoch ``e`` takes the next ``n_i`` draws: the whole source, or its share of a weighted mix.
2. Rank ``r`` takes a contiguous slice of each source's epoch draws; slice sizes differ by at most
   one (or are cut to the same size with ``drop_remainder``).
3. A rank's sources are merged into one stream by a fixed, smooth schedule, and each DataLoader
   worker takes a contiguous range of that stream (whole batches when batching).
4. Within a worker, consecutive windows of ``shuffle_buffer`` draws are permuted, seeded by
   ``(seed, epoch, rank, worker, window)``.

So every draw has exactly one owner ``(rank, worker, step)``: workers read disjoint (shard, sample
range) slices, a rank's epoch length is known up front, and "worker ``w`` has delivered its first
``s`` steps" is a complete resume point. Tar members are found by walking headers; the data of
members that were not asked for is never read when it is larger than a read block (it is seeked
over). A missing or corrupt shard is skipped with a warning and counted (``strict`` raises).
"""
from __future__ import annotations

import bisect
import functools
import heapq
import io
import json
import math
import os
import struct
import warnings
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import simplejpeg
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core.schema import IMAGE_EXTENSIONS
from pipeline.media.geometry import RESIZE_MODES, plan_geometry
from pipeline.media.npy import npy_header, read_npy

__all__ = ["ShardDataset", "Loader", "Shard", "Source", "ShardError", "SkippedDataWarning", "read_index",
           "open_source", "collate"]

STATE_VERSION = 1
_JPEG_MAGIC = b"\xff\xd8\xff"
READ_BLOCK = 1 << 18  # bytes read at once around headers; bigger unwanted members are seeked over
SCAN_BLOCK = 1 << 22  # bytes read at once for shards of small samples: ~1000 samples per numpy scan


class ShardError(RuntimeError):
    """A shard is missing, unreadable or corrupt (raised in strict mode)."""


class SkippedDataWarning(UserWarning):
    """A shard or sample was skipped because it is missing or corrupt (non-strict mode)."""


# -- index -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    url: str                       # absolute path or fsspec URL
    nsamples: int
    filesize: Optional[int] = None


@dataclass(frozen=True)
class Source:
    """One output directory: its shards in index order."""

    root: str
    shards: tuple[Shard, ...]

    @property
    def nsamples(self) -> int:
        return sum(s.nsamples for s in self.shards)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _join(root: str, url: str) -> str:
    if "://" in url or url.startswith("/"):
        return url
    return root.rstrip("/") + "/" + url


def _open(url: str, storage_options: Optional[dict]) -> Any:
    """A binary file object with seek/readinto: unbuffered for local files (we buffer), fsspec else."""
    if _is_local(url):
        return open(_local_path(url), "rb", buffering=0)
    import fsspec

    return fsspec.open(url, "rb", **(storage_options or {})).open()


def read_index(root: str, storage_options: Optional[dict] = None) -> Source:
    """Read ``root/index.json`` (wids shard index); without one, list ``*.tar`` and count samples
    by walking their headers (slow for big datasets, hence the warning)."""
    root = root.rstrip("/") or "/"
    try:
        with _open(_join(root, "index.json"), storage_options) as f:
            index = json.loads(f.read())
    except FileNotFoundError:
        return _scan_directory(root, storage_options)
    shards = tuple(Shard(_join(root, s["url"]), int(s["nsamples"]), s.get("filesize"))
                   for s in index["shardlist"])
    return Source(root, shards)


def _scan_directory(root: str, storage_options: Optional[dict]) -> Source:
    if _is_local(root):
        names = sorted(n for n in os.listdir(_local_path(root)) if n.endswith(".tar"))
        urls = [_join(root, n) for n in names]
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        urls = sorted(fs.unstrip_protocol(p) for p in fs.glob(path.rstrip("/") + "/*.tar"))
    if not urls:
        raise FileNotFoundError(f"{root}: no index.json and no .tar shards")
    warnings.warn(f"{root}: no index.json; counting samples by scanning {len(urls)} tars", stacklevel=3)
    shards = []
    for url in urls:
        with _open(url, storage_options) as f:
            shards.append(Shard(url, sum(1 for _ in _walk_samples(_TarReader(f), 0, None, {}))))
    return Source(root, tuple(shards))


def open_source(root: Union[str, Source], storage_options: Optional[dict] = None) -> Source:
    return root if isinstance(root, Source) else read_index(str(root), storage_options)


# -- planning: who reads which draws (pure arithmetic, no I/O) -----------------------------------

@dataclass(frozen=True)
class Segment:
    """Samples ``start:stop`` (tar order) of shard ``shard`` of source ``source``."""

    source: int
    shard: int
    start: int
    stop: int


def split_evenly(n: int, parts: int, offset: int = 0) -> list[int]:
    """``parts`` sizes summing to ``n``, differing by at most one; the larger ones start at ``offset``."""
    base, extra = divmod(n, parts)
    return [base + (1 if (p - offset) % parts < extra else 0) for p in range(parts)]


def shard_order(nshards: int, seed: int, source: int, cycle: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(nshards))
    return np.random.default_rng([seed, source, cycle, 0x5EED]).permutation(nshards).tolist()


def source_segments(src: Source, index: int, start: int, count: int, seed: int, shuffle: bool) -> list[Segment]:
    """Draws ``start:start+count`` of source ``index``'s endless stream, as shard slices."""
    size, out = src.nsamples, []
    if count <= 0:
        return out
    if size == 0:
        raise ValueError(f"{src.root}: no samples to draw from")
    end = start + count
    for cycle in range(start // size, (end - 1) // size + 1):
        order = shard_order(len(src.shards), seed, index, cycle, shuffle)
        bounds = [0, *accumulate(src.shards[s].nsamples for s in order)]
        lo, hi = max(start - cycle * size, 0), min(end - cycle * size, size)
        k = bisect.bisect_right(bounds, lo) - 1
        while lo < hi:
            a, b = bounds[k], bounds[k + 1]
            if b > lo:
                out.append(Segment(index, order[k], lo - a, min(hi, b) - a))
                lo = min(hi, b)
            k += 1
    return out


def _draw_key(j: int, count: int) -> float:
    # The j-th of `count` draws of a source sits at (j + 1/2) / count of the rank's stream: the
    # merged order is a smooth interleave whose prefix counts need no replay (see mix_prefix).
    return (2 * j + 1) / (2 * count)


def mix_prefix(counts: Sequence[int], t: int) -> list[int]:
    """How many of the first ``t`` draws of the merged stream come from each source.

    The merged order sorts every draw ``(i, j)`` by ``(_draw_key(j, counts[i]), i)``; we estimate
    the prefix and fix it up with exact comparisons, so this is O(sources) however long the stream.
    """
    if len(counts) == 1:
        return [t]
    total = sum(counts)
    x = t / total if total else 0.0
    m = [min(c, max(0, int(x * c + 0.5))) for c in counts]

    def last_in() -> Optional[tuple[float, int]]:
        return max(((_draw_key(m[i] - 1, c), i) for i, c in enumerate(counts) if m[i] > 0), default=None)

    def first_out() -> Optional[tuple[float, int]]:
        return min(((_draw_key(m[i], c), i) for i, c in enumerate(counts) if m[i] < c), default=None)

    while True:  # make m a prefix of the order: no excluded draw before an included one
        hi, lo = last_in(), first_out()
        if hi is None or lo is None or hi < lo:
            break
        m[hi[1]] -= 1
        m[lo[1]] += 1
    while sum(m) < t:
        m[first_out()[1]] += 1
    while sum(m) > t:
        m[last_in()[1]] -= 1
    return m


def mix_order(counts: Sequence[int], start: int, stop: int) -> Iterator[int]:
    """The source index of each draw ``start:stop`` of the merged stream."""
    if len(counts) == 1:
        yield from (0 for _ in range(stop - start))
        return
    m = mix_prefix(counts, start)
    heap = [(_draw_key(m[i], c), i) for i, c in enumerate(counts) if m[i] < c]
    heapq.heapify(heap)
    for _ in range(stop - start):
        _, i = heapq.heappop(heap)
        yield i
        m[i] += 1
        if m[i] < counts[i]:
            heapq.heappush(heap, (_draw_key(m[i], counts[i]), i))


@dataclass(frozen=True)
class Plan:
    """One worker's share of one epoch: draws ``begin:end`` of its rank's merged stream."""

    epoch: int
    rank: int
    worker: int
    counts: tuple[int, ...]      # the rank's draws per source this epoch
    firsts: tuple[int, ...]      # each source's stream position of the rank's first draw
    begin: int
    end: int

    @property
    def steps(self) -> int:
        return self.end - self.begin

    def segments(self, sources: Sequence[Source], seed: int, shuffle: bool, skip: int = 0) -> list[list[Segment]]:
        """Per source, the shard slices of this worker's draws after its first ``skip`` steps."""
        a, b = mix_prefix(self.counts, self.begin + skip), mix_prefix(self.counts, self.end)
        return [source_segments(sources[i], i, self.firsts[i] + a[i], b[i] - a[i], seed, shuffle)
                for i in range(len(sources))]


def epoch_draws(sizes: Sequence[int], weights: Optional[Sequence[float]], epoch_size: Optional[int]) -> list[int]:
    """Draws per source per epoch: each whole source, or (weights) its share of ``epoch_size``."""
    if weights is None:
        if epoch_size is not None:
            raise ValueError("epoch_size needs weights (a mapping of sources to weights)")
        return list(sizes)
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {list(weights)}")
    total = sum(sizes) if epoch_size is None else int(epoch_size)
    exact = [w / sum(weights) * total for w in weights]
    draws = [math.floor(x) for x in exact]
    # Largest remainder: the counts sum to exactly `total`.
    for i in sorted(range(len(exact)), key=lambda i: draws[i] - exact[i])[:total - sum(draws)]:
        draws[i] += 1
    return draws


def rank_draws(draws: Sequence[int], world_size: int, drop_remainder: bool) -> list[list[int]]:
    """``[source][rank]`` draw counts; the extra draws rotate over ranks so totals differ by <= 1."""
    out, offset = [], 0
    for n in draws:
        if drop_remainder:
            out.append([n // world_size] * world_size)
        else:
            out.append(split_evenly(n, world_size, offset))
            offset = (offset + n % world_size) % world_size
    return out


def worker_ranges(total: int, num_workers: int, batch_size: Optional[int], drop_last: bool) -> list[tuple[int, int]]:
    """Contiguous ``(begin, end)`` of the rank stream per worker. With batches, workers get whole
    batches, so only the rank's last batch can be short and the batch count is ceil(total / bs)."""
    if batch_size is None:
        sizes = split_evenly(total, num_workers)
    else:
        nbatches = total // batch_size if drop_last else -(-total // batch_size)
        sizes = [b * batch_size for b in split_evenly(nbatches, num_workers)]
        cut = sum(sizes) - (total if not drop_last else nbatches * batch_size)
        for w in reversed(range(num_workers)):  # the short batch is the stream's last one
            if sizes[w]:
                sizes[w] -= cut
                break
    bounds = [0, *accumulate(sizes)]
    return [(bounds[w], bounds[w + 1]) for w in range(num_workers)]


# -- tar reading -----------------------------------------------------------------------------------

class TarFormatError(ValueError):
    """The bytes are not a well-formed tar where a header should be."""


_HEADER = struct.Struct("100s24x12s20xc100x6s82x155s")  # name, size, typeflag, magic, prefix
_ZERO_BLOCK = bytes(512)


class _TarReader:
    """Reads a tar through one reusable buffer: headers and small members come from block reads;
    members of a quarter of the buffer or more are read on their own, or seeked over when unwanted."""

    def __init__(self, f: Any, block: int = READ_BLOCK):
        self.f = f
        self.buf = bytearray(block)
        self.view = memoryview(self.buf)
        self.start = 0   # file offset of buf[0]
        self.filled = 0  # valid bytes in buf
        self.eof = False  # buf ends where the file ends

    def _fill(self, offset: int) -> None:
        self.f.seek(offset)
        n = 0
        while n < len(self.buf):
            got = self.f.readinto(self.view[n:])
            if not got:
                break
            n += got
        self.start, self.filled, self.eof = offset, n, n < len(self.buf)

    def blocks(self, offset: int) -> tuple[np.ndarray, bool]:
        """The whole 512-byte blocks buffered from ``offset`` as an (n, 512) array, refilled when
        less than half a buffer is left; the flag says whether the file ends right after them."""
        rel = offset - self.start
        if not 0 <= rel <= self.filled or (self.filled - rel < len(self.buf) // 2 and not self.eof):
            self._fill(offset)
            rel = 0
        n, tail = divmod(self.filled - rel, 512)
        blocks = np.frombuffer(self.buf, np.uint8, count=n * 512, offset=rel).reshape(n, 512)
        return blocks, self.eof and not tail

    def header(self, offset: int) -> Optional[memoryview]:
        """The 512-byte block at ``offset``; None at a clean end of file."""
        rel = offset - self.start
        if not (0 <= rel and rel + 512 <= self.filled):
            self._fill(offset)
            rel = 0
            if self.filled == 0:
                return None
            if self.filled < 512:
                raise TarFormatError(f"truncated header at byte {offset}")
        return self.view[rel:rel + 512]

    def read(self, offset: int, size: int) -> bytes:
        rel = offset - self.start
        if 0 <= rel and rel + size <= self.filled:
            return self.view[rel:rel + size].tobytes()
        if size < len(self.buf) // 4:
            self._fill(offset)
            if self.filled >= size:
                return self.view[:size].tobytes()
        else:
            self.f.seek(offset)
            data = _read_exact(self.f, size)
            if len(data) == size:
                return data
        raise TarFormatError(f"member data truncated at byte {offset} (wanted {size} bytes)")


def _read_exact(f: Any, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = f.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for huge numbers
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field!r}") from None


def _checksum_ok(block: memoryview) -> bool:
    """The header checksum; only checked for pre-POSIX (v7) headers, which have no magic."""
    raw = bytes(block)
    try:
        stored = int(raw[148:156].split(b"\0", 1)[0].strip(), 8)
    except ValueError:
        return False
    return stored == sum(raw[:148]) + 256 + sum(raw[156:])


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _members(reader: _TarReader, offset: int = 0) -> Iterator[tuple[str, int, int, int]]:
    """``(name, data_offset, size, header_offset)`` of each regular file from the header at
    ``offset`` on; handles ustar, GNU long names and pax. ``header_offset`` is where a reader must
    restart to see the member again (its first extended header, if any)."""
    long_name, pax, head = None, {}, offset
    while True:
        block = reader.header(offset)
        if block is None or block == _ZERO_BLOCK:  # end of archive (a missing end marker is tolerated)
            return
        name, size_field, typeflag, magic, prefix = _HEADER.unpack_from(block)
        if magic[:5] != b"ustar" and not _checksum_ok(block):
            raise TarFormatError(f"not a tar header at byte {offset}")
        digits = size_field.split(b"\0", 1)[0]
        try:
            size = int(digits, 8) if digits.isdigit() else _octal(size_field)  # fast path: plain octal
        except ValueError:
            raise TarFormatError(f"bad size field {size_field!r} at byte {offset}") from None
        data = offset + 512
        offset = data + (size + 511) // 512 * 512
        if typeflag in b"0\x007":  # regular file (b"" cannot occur: the field is one byte)
            if "size" in pax:
                size = int(pax["size"])
                offset = data + (size + 511) // 512 * 512
            if long_name is not None:
                path = long_name
            elif "path" in pax:
                path = pax["path"]
            else:
                path = name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if magic == b"ustar\x00" and prefix[0]:
                    path = prefix.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + path
            yield path, data, size, head
            long_name, pax, head = None, {}, offset
        elif typeflag == b"L":
            long_name = reader.read(data, size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif typeflag == b"x":
            pax = _pax_records(reader.read(data, size))
        else:  # directories, links, global pax headers ('g') and the like carry no sample data
            head = offset


def split_name(path: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    slash = path.rfind("/")
    dot = path.find(".", slash + 1)
    return (path, "") if dot < 0 else (path[:dot], path[dot + 1:])


SampleFiles = dict[str, tuple[str, bytes]]


def _samples(reader: _TarReader, lo: int, hi: Optional[int], want: Optional[Mapping[str, str]],
             fast: bool = False) -> Iterator[tuple[str, Optional[SampleFiles]]]:
    """``(key, files)`` for each sample up to index ``hi``; ``files`` maps field -> (ext, bytes)
    for samples from ``lo`` on (None before: those are only walked over). ``want`` maps member
    extensions to field names; None reads every member under its own extension. ``fast`` scans
    buffered headers with numpy (for shards of small samples, where the walk's per-member Python
    cost dominates; it reads whole blocks, so it is not for shards of big unwanted members)."""
    if fast and want:
        return _scan_samples(reader, lo, hi, want)
    return _walk_samples(reader, lo, hi, want)


def _walk_samples(reader: _TarReader, lo: int, hi: Optional[int],
                  want: Optional[Mapping[str, str]]) -> Iterator[tuple[str, Optional[SampleFiles]]]:
    key, files, index = None, None, -1
    for path, offset, size, _ in _members(reader):
        k, ext = split_name(path)
        if k != key:
            if index >= lo:
                yield key, files
            index += 1
            if hi is not None and index >= hi:
                return
            key, files = k, ({} if index >= lo else None)
        if files is not None:
            field = ext if want is None else want.get(ext)
            if field is not None:
                files[field] = (ext, reader.read(offset, size))
    if key is not None and index >= lo:
        yield key, files


def _one_sample(reader: _TarReader, offset: int, want: Mapping[str, str],
                read: bool) -> Optional[tuple[str, Optional[SampleFiles], Optional[int]]]:
    """The sample whose first header is at ``offset``: (key, files, next sample's header offset or
    None at the end); None when the archive ends there."""
    key, files = None, None
    for path, data, size, head in _members(reader, offset):
        k, ext = split_name(path)
        if key is None:
            key, files = k, ({} if read else None)
        elif k != key:
            return key, files, head
        if files is not None and ext in want:
            files[want[ext]] = (ext, reader.read(data, size))
    return None if key is None else (key, files, None)


def _scan_samples(reader: _TarReader, lo: int, hi: Optional[int],
                  want: Mapping[str, str]) -> Iterator[tuple[str, Optional[SampleFiles]]]:
    index, offset = -1, 0
    while offset is not None and (hi is None or index + 1 < hi):
        scan = _scan(reader, offset, want)
        if scan is None:  # not the plain layout the scan handles: one sample the careful way
            one = _one_sample(reader, offset, want, read=index + 1 >= lo)
            if one is None:
                return
            key, files, offset = one
            index += 1
            if index >= lo:
                yield key, files
            continue
        keys, fields, offset = scan
        view, base = reader.view, reader.start  # every scanned member is in the buffer: slice it here
        for j, key in enumerate(keys):
            index += 1
            if hi is not None and index >= hi:
                return
            if index >= lo:
                yield key, {f: (ext, view[offs[j] - base:offs[j] - base + sizes[j]].tobytes())
                            for f, (ext, offs, sizes) in fields.items() if offs[j] >= 0}


_USTAR = np.frombuffer(b"ustar", np.uint8)
_POW8 = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_COLUMNS = np.arange(100)


def _plain_members(blocks: np.ndarray, at_eof: bool) -> Optional[tuple[np.ndarray, np.ndarray, bool]]:
    """(header blocks, sizes, archive ends after them) of the leading members that are plain
    ustar files, complete in ``blocks`` and chained: a block is taken for a header by its magic
    only if the previous header's size leads exactly to it, so data that merely looks like a
    header (a tar inside a member) can never be mistaken for one."""
    n = len(blocks)
    heads = np.flatnonzero((blocks[:, 257:262] == _USTAR).all(1))
    if not len(heads) or heads[0] != 0:
        return None
    h = blocks[heads]
    digits = h[:, 124:135].astype(np.int64) - 48
    sizes = digits @ _POW8
    nxt = heads + 1 + (sizes + 511) // 512
    good = ((digits >= 0) & (digits < 8)).all(1) & ((h[:, 135] == 0) | (h[:, 135] == 32))  # 11 octal digits
    good &= ((h[:, 156] == 48) | (h[:, 156] == 0)) & (h[:, 345] == 0)  # regular file, no name prefix
    good &= nxt <= n
    good[1:] &= nxt[:-1] == heads[1:]
    m = len(good) if good.all() else int(np.argmin(good))
    if m == 0:
        return None
    last = nxt[m - 1]
    ends = m == len(heads) and ((last < n and not blocks[last].any()) or (last == n and at_eof))
    return heads[:m], sizes[:m], ends


def _scan(reader: _TarReader, offset: int, want: Mapping[str, str]
          ) -> Optional[tuple[list[str], dict[str, tuple[str, list[int], list[int]]], Optional[int]]]:
    """The complete samples in the buffered blocks from ``offset``, found with numpy: keys, per
    field (ext, data offsets, sizes; -1 where absent) and the next sample's header offset (None at
    the end). None when the members there are not plain (long or dotted paths, pax headers...)."""
    blocks, at_eof = reader.blocks(offset)
    found = _plain_members(blocks, at_eof)
    if found is None:
        return None
    heads, sizes, ends = found
    names = blocks[heads, :100]
    dot = (names == 46).argmax(1)
    nul = np.where((names == 0).any(1), (names == 0).argmax(1), 100)
    plain = (names[np.arange(len(names)), dot] == 46) & (dot < nul) & (nul < 100) & ~(names == 47).any(1)
    if not plain.all():  # keep the leading plain names; a later scan starts at the first other one
        heads, sizes, ends = heads[:np.argmin(plain)], sizes[:np.argmin(plain)], False
        names, dot = names[:len(heads)], dot[:len(heads)]
    keys = np.where(_COLUMNS < dot[:, None], names, 0)
    new = np.ones(len(heads), bool)
    new[1:] = (keys[1:] != keys[:-1]).any(1)
    starts = np.flatnonzero(new)
    count = len(starts) if ends else len(starts) - 1  # the last sample may go on past the blocks
    if count <= 0:
        return None
    stop = starts[count] if count < len(starts) else len(heads)
    sample = np.cumsum(new[:stop]) - 1
    fields = {}
    for ext, field in want.items():
        target = np.frombuffer(ext.encode() + b"\0", np.uint8)
        cols = np.minimum(dot[:stop, None] + 1 + np.arange(len(target)), 99)
        hits = np.flatnonzero((np.take_along_axis(names[:stop], cols, 1) == target).all(1))
        offs, lens = np.full(count, -1, np.int64), np.zeros(count, np.int64)
        offs[sample[hits]] = offset + (heads[hits] + 1) * 512
        lens[sample[hits]] = sizes[hits]
        fields[field] = (ext, offs.tolist(), lens.tolist())
    key_bytes = np.ascontiguousarray(keys[starts[:count]]).view("S100").ravel().tolist()
    nxt = None if count == len(starts) else offset + int(heads[stop]) * 512
    return [k.decode("utf-8", "surrogateescape") for k in key_bytes], fields, nxt


# -- decoding --------------------------------------------------------------------------------------

def batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch. In a DataLoader worker it lives in shared memory (as
    torch's default_collate does it), so handing it to the trainer costs no further copy."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    try:
        storage = elem._typed_storage()._new_shared(math.prod(shape), device="cpu")
    except AttributeError:  # a private API; without it torch copies the tensor to shared memory itself
        return torch.empty(tuple(shape), dtype=dtype)
    return elem.new(storage).resize_(*shape)


def decode_npy_batch(datas: Sequence[bytes]) -> Union[torch.Tensor, list[np.ndarray]]:
    """Same-shape arrays in one tensor, copied once (the common case: fixed-length token ids);
    arrays of different shapes or types come back one by one."""
    first = datas[0]
    dtype, shape, fortran, start = npy_header(first)
    size = len(first)
    if fortran or not dtype.isnative or size != start + math.prod(shape) * dtype.itemsize or len(
            set(map(len, datas))) != 1:
        return [read_npy(d) for d in datas]
    rows = np.frombuffer(b"".join(datas), np.uint8).reshape(len(datas), size)
    if not (rows[:, :start] == rows[0, :start]).all():  # same header: same dtype and shape
        return [read_npy(d) for d in datas]
    out = batch_tensor((len(datas), *shape), torch.from_numpy(np.empty(0, dtype)).dtype)
    out.numpy().reshape(len(datas), -1).view(np.uint8)[:] = rows[:, start:]
    return out


@dataclass(frozen=True)
class ImageOptions:
    dtype: str = "uint8"             # "uint8" (0..255) or "float32" (0..1)
    size: Optional[int] = None       # resize with the download stage's semantics when set
    resize_mode: str = "center_crop"

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "float32"):
            raise ValueError(f"image_dtype must be 'uint8' or 'float32', got {self.dtype!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.size is not None and self.size <= 0:
            raise ValueError("image_size must be > 0")


def decode_image(data: bytes, opts: ImageOptions) -> np.ndarray:
    """HWC uint8 RGB. With a size: the download stage's geometry for ``resize_mode``, and a JPEG is
    decoded at 1/2, 1/4 or 1/8 scale in the IDCT when the target is that much smaller."""
    from PIL import Image

    if opts.size is None:
        if data[:3] == _JPEG_MAGIC:
            try:  # libjpeg-turbo without PIL's object overhead: about 2x faster at 256 px
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            except ValueError:
                pass  # rarer JPEG flavours (e.g. CMYK, arithmetic coding): PIL below decides
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"))
    with Image.open(io.BytesIO(data)) as img:
        geometry = plan_geometry(img.size[0], img.size[1], opts.size, opts.resize_mode)
        if geometry.downscale and img.format == "JPEG":
            img.draft("RGB", geometry.resized)  # never below the requested size
        rgb = img.convert("RGB")
    return np.array(_fit(rgb, geometry))


def _fit(img: Any, geometry: Any) -> Any:
    """Resize the (possibly drafted) image to the geometry's crop of its resized size, then pad."""
    from PIL import Image

    (rw, rh), (x0, y0, x1, y1) = geometry.resized, geometry.crop
    fx, fy = img.size[0] / rw, img.size[1] / rh
    box = (x0 * fx, y0 * fy, min(x1 * fx, img.size[0]), min(y1 * fy, img.size[1]))
    if (x1 - x0, y1 - y0) != img.size or box != (0, 0, *img.size):
        resample = Image.Resampling.BOX if geometry.downscale else Image.Resampling.BICUBIC
        img = img.resize((x1 - x0, y1 - y0), resample, box=box)
    if geometry.canvas is not None:
        canvas = Image.new("RGB", geometry.canvas, (255, 255, 255))
        canvas.paste(img, geometry.offset)
        img = canvas
    return img


def _image_tensor(hwc: np.ndarray, opts: ImageOptions) -> torch.Tensor:
    t = torch.from_numpy(hwc).permute(2, 0, 1)  # HWC -> CHW, a view
    return t.to(torch.float32, memory_format=torch.contiguous_format).div_(255) if opts.dtype == "float32" else t


@functools.lru_cache(maxsize=1024)
def _kind(ext: str) -> str:
    last = ext.rsplit(".", 1)[-1].lower()
    if last in IMAGE_EXTENSIONS:
        return "image"
    return last if last in ("npy", "txt", "json") else "bytes"


def _decode_value(ext: str, data: bytes, opts: ImageOptions) -> Any:
    kind = _kind(ext)
    if kind == "image":
        return _image_tensor(decode_image(data, opts), opts)
    if kind == "npy":
        return torch.from_numpy(read_npy(data))
    if kind == "txt":
        return data.decode("utf-8")
    if kind == "json":
        return json.loads(data)
    return data


def _decode_column(exts: Sequence[str], datas: Sequence[bytes], opts: ImageOptions) -> Any:
    """One field of a batch: a stacked tensor when shapes agree, else a list."""
    kinds = {_kind(e) for e in exts}
    if kinds == {"npy"}:
        arrays = decode_npy_batch(datas)
        return arrays if isinstance(arrays, torch.Tensor) else _stack_or_list([torch.from_numpy(a) for a in arrays])
    if kinds == {"image"}:
        images = [decode_image(d, opts) for d in datas]
        if len({a.shape for a in images}) != 1:
            return [_image_tensor(a, opts) for a in images]
        h, w, c = images[0].shape
        out = batch_tensor((len(images), c, h, w), torch.float32 if opts.dtype == "float32" else torch.uint8)
        out.copy_(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))  # HWC -> CHW in the one copy
        return out.div_(255) if opts.dtype == "float32" else out
    return [_decode_value(e, d, opts) for e, d in zip(exts, datas)]


def _stack_or_list(values: list) -> Any:
    if values and all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
        return torch.stack(values)
    return values


def collate(samples: Sequence[dict]) -> dict:
    """Batch decoded samples: tensors of one shape are stacked, everything else becomes a list
    (with None where a sample lacks the field: without ``fields``, samples may differ)."""
    names = dict.fromkeys(k for s in samples for k in s)
    return {k: _stack_or_list([s.get(k) for s in samples]) for k in names}


# -- the dataset -----------------------------------------------------------------------------------

SourcesArg = Union[str, os.PathLike, Source, Sequence[Union[str, os.PathLike, Source]],
                   Mapping[Union[str, os.PathLike], float]]


def _parse_fields(fields: Union[None, str, Sequence[str], Mapping[str, str]]) -> Optional[dict[str, str]]:
    """Member extension -> output field. ``"jpg;png"`` means either extension, as one field."""
    if fields is None:
        return None
    if isinstance(fields, str):
        fields = fields.split(",")
    pairs = fields.items() if isinstance(fields, Mapping) else ((f, f) for f in fields)
    want: dict[str, str] = {}
    for name, spec in pairs:
        for ext in str(spec).split(";"):
            ext = ext.strip()
            if not ext or ext in want:
                raise ValueError(f"field {name!r}: empty or repeated extension {ext!r}")
            want[ext] = name.split(";")[0].strip()
    return want


def _resolve_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size


class ShardDataset(IterableDataset):
    """A torch ``IterableDataset`` over one or more mmcurate output directories.

    * ``sources``: a directory (path or fsspec URL), a list of them (each read whole every epoch),
      or a mapping ``{dir: weight}`` (weights are shares of each epoch's ``epoch_size`` draws,
      default the total size; a source is repeated or sub-sampled to match, and a sub-sampled
      source continues where the previous epoch stopped, so all of it is seen over epochs).
    * ``fields``: member extensions to read, e.g. ``["jpg", "txt"]`` or
      ``{"image": "jpg;png;webp", "tokens": "text_ids.npy"}``; None reads every member. Only the
      listed members' bytes are read; a sample lacking one of them is skipped and counted.
    * ``decode``: images to CHW tensors (``image_dtype`` uint8 or float32, optional
      ``image_size`` / ``resize_mode`` as in the job spec), ``.npy`` to tensors, ``.txt`` to str,
      ``.json`` to objects, anything else stays bytes. ``decoders`` overrides per field. False
      leaves every field as bytes.
    * ``batch_size``: yield collated batches (same-shape tensors stacked, else lists); workers
      get whole batches so a rank has ceil(samples / batch_size) batches (floor with drop_last).
    * ``rank`` / ``world_size``: default from torch.distributed, else the RANK / WORLD_SIZE
      environment, else 0 / 1. ``drop_remainder`` gives every rank the same number of samples.
    * ``shuffle``: shard order per (seed, cycle) and a window of ``shuffle_buffer`` samples per
      (seed, epoch, rank, worker, window).
    * ``strict``: raise :class:`ShardError` instead of skipping a missing or corrupt shard/sample.

    Every sample carries ``__key__``, ``__url__``, ``__worker__`` and ``__step__``. Resume state is
    kept when the dataset is iterated in this process or through :class:`Loader`; with a plain
    torch DataLoader and workers, call :meth:`set_epoch` every epoch (as with DistributedSampler).
    """

    def __init__(self, sources: SourcesArg, *, fields: Union[None, str, Sequence[str], Mapping[str, str]] = None,
                 batch_size: Optional[int] = None, drop_last: bool = False, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 1000, rank: Optional[int] = None, world_size: Optional[int] = None,
                 drop_remainder: bool = False, epoch_size: Optional[int] = None, decode: bool = True,
                 image_dtype: str = "uint8", image_size: Optional[int] = None, resize_mode: str = "center_crop",
                 decoders: Optional[Mapping[str, Callable[[bytes], Any]]] = None, strict: bool = False,
                 storage_options: Optional[dict] = None):
        if batch_size is not None and batch_size <= 0:
            raise ValueError("batch_size must be > 0")
        if shuffle_buffer <= 0:
            raise ValueError("shuffle_buffer must be > 0")
        roots, weights = self._split_sources(sources)
        self.sources = [open_source(r, storage_options) for r in roots]
        self.weights = weights
        self.epoch_size = epoch_size
        self.draws = epoch_draws([s.nsamples for s in self.sources], weights, epoch_size)
        for src, n in zip(self.sources, self.draws):
            if n and not src.nsamples:
                raise ValueError(f"{src.root}: weighted source has no samples")
        self.want = _parse_fields(fields)
        self._nfields = len(set(self.want.values())) if self.want else 0
        self.batch_size, self.drop_last = batch_size, drop_last
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, int(seed), shuffle_buffer
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.drop_remainder = drop_remainder
        self.decode = decode
        self.image = ImageOptions(image_dtype, image_size, resize_mode)
        self.decoders = dict(decoders or {})
        self.strict = strict
        self.storage_options = storage_options
        self.epoch = 0
        self._consumed: dict[int, int] = {}   # worker -> steps delivered this epoch
        self._num_workers: Optional[int] = None  # the worker count the consumed steps refer to
        self._delivered = 0

    @staticmethod
    def _split_sources(sources: SourcesArg) -> tuple[list, Optional[list[float]]]:
        if isinstance(sources, Mapping):
            return list(sources), [float(w) for w in sources.values()]
        if isinstance(sources, (str, os.PathLike, Source)):
            return [sources], None
        return list(sources), None

    # -- sizes -------------------------------------------------------------------------------------
    def rank_counts(self) -> list[int]:
        """This rank's draws per source in every epoch."""
        return [c[self.rank] for c in rank_draws(self.draws, self.world_size, self.drop_remainder)]

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (before any skipped as corrupt)."""
        total = sum(self.rank_counts())
        if self.batch_size is not None and self.drop_last:
            return total // self.batch_size * self.batch_size
        return total

    @property
    def num_batches(self) -> Optional[int]:
        if self.batch_size is None:
            return None
        total = sum(self.rank_counts())
        return total // self.batch_size if self.drop_last else -(-total // self.batch_size)

    def __len__(self) -> int:
        return self.num_samples if self.batch_size is None else self.num_batches

    def plan(self, worker: int = 0, num_workers: int = 1, epoch: Optional[int] = None) -> Plan:
        """The draws of ``worker`` (of ``num_workers``) on this rank in ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        per_rank = rank_draws(self.draws, self.world_size, self.drop_remainder)
        counts = tuple(c[self.rank] for c in per_rank)
        firsts = tuple(epoch * n + sum(c[:self.rank]) for n, c in zip(self.draws, per_rank))
        begin, end = worker_ranges(sum(counts), num_workers, self.batch_size, self.drop_last)[worker]
        return Plan(epoch, self.rank, worker, counts, firsts, begin, end)

    # -- epochs and resume state -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; progress is kept when it is the current one (resume)."""
        if epoch != self.epoch:
            self.epoch, self._consumed, self._delivered = int(epoch), {}, 0

    def _config(self) -> dict:
        return {"sizes": [s.nsamples for s in self.sources], "draws": self.draws, "seed": self.seed,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "drop_remainder": self.drop_remainder,
                "rank": self.rank, "world_size": self.world_size}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "num_workers": self._num_workers,
                "consumed": {str(w): s for w, s in sorted(self._consumed.items())},
                "delivered": self._delivered, "config": self._config()}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        consumed = {int(w): int(s) for w, s in state["consumed"].items()}
        if consumed and state["config"] != self._config():
            diff = {k: (v, self._config().get(k)) for k, v in state["config"].items() if self._config().get(k) != v}
            raise ValueError(f"cannot resume mid-epoch with a different dataset or setup (saved, now): {diff}")
        self.epoch, self._consumed = int(state["epoch"]), consumed
        self._num_workers = state["num_workers"] if consumed else None
        self._delivered = int(state.get("delivered", 0))

    def _begin(self, num_workers: int) -> None:
        """Before a pass: check the worker count matches the progress, and move to the next epoch
        when this one is complete (so a loop without set_epoch still sees fresh epochs)."""
        if self._consumed and self._num_workers not in (None, num_workers):  # None: recorded by hand
            raise ValueError(f"this epoch was started with {self._num_workers} workers; resume it with the "
                             f"same number (got {num_workers}), or start the next epoch with set_epoch")
        self._num_workers = num_workers
        if self._consumed and all(self._consumed.get(w, 0) >= self.plan(w, num_workers).steps
                                  for w in range(num_workers)):
            self.set_epoch(self.epoch + 1)

    def record(self, item: Mapping) -> None:
        """Note that a sample or batch from this dataset was delivered (the Loader calls this)."""
        workers, steps = item["__worker__"], item["__step__"]
        if isinstance(workers, int):
            workers, steps = [workers], [steps]
        for w, s in zip(_ints(workers), _ints(steps)):
            if s + 1 > self._consumed.get(w, 0):
                self._consumed[w] = s + 1
        self._delivered += len(item["__key__"]) if isinstance(item["__key__"], list) else 1

    def stats(self) -> dict:
        """Progress of the current epoch on this rank, as recorded in this process."""
        return {"epoch": self.epoch, "expected": self.num_samples, "delivered": self._delivered}

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        self._begin(num_workers)
        for item in self.iter_worker(worker, num_workers):
            if info is None:  # iterated in this process: the progress is ours to keep
                self.record(item)
            yield item

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[dict]:
        """What DataLoader worker ``worker`` of ``num_workers`` yields, iterated here (for custom
        process pools, debugging and tests); it resumes from, but does not record, progress."""
        return self._batches(worker, num_workers) if self.batch_size else self._samples(worker, num_workers)

    def _samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        for step, raw in self._raw(worker, num_workers):
            sample = self._decode_one(raw) if raw is not None else None
            if sample is not None:
                sample["__worker__"], sample["__step__"] = worker, step
                yield sample

    def _batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Batches of ``batch_size`` consecutive steps (worker ranges are whole batches); samples
        skipped as corrupt leave their batch short rather than shift every later batch."""
        pending: list[tuple[int, tuple]] = []
        steps, size = self.plan(worker, num_workers).steps, self.batch_size
        for step, raw in self._raw(worker, num_workers):
            if raw is not None:
                pending.append((step, raw))
            if (step + 1) % size == 0 or step + 1 == steps:
                batch = self._decode_batch(pending, worker) if pending else None
                pending = []
                if batch is not None:
                    yield batch

    def _raw(self, worker: int, num_workers: int) -> Iterator[tuple[int, Optional[tuple]]]:
        """``(step, raw sample or None)`` for this worker's undelivered steps, shuffled."""
        plan = self.plan(worker, num_workers)
        first = self._consumed.get(worker, 0)
        if first >= plan.steps:
            return
        if not self.shuffle:
            yield from enumerate(self._draws(plan, first), start=first)
            return
        window = self.shuffle_buffer
        w0 = first // window
        stream = self._draws(plan, w0 * window)
        for w in range(w0, -(-plan.steps // window)):
            items = [next(stream) for _ in range(min(window, plan.steps - w * window))]
            order = self._window_order(w, worker, len(items))
            for k in range(first - w * window if w == w0 else 0, len(items)):
                yield w * window + k, items[order[k]]

    def _window_order(self, window: int, worker: int, n: int) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, window, 0xB0F])
        return rng.permutation(n).tolist()

    def _draws(self, plan: Plan, skip: int) -> Iterator[Optional[tuple]]:
        """The raw samples of the plan's draws from step ``skip`` on, in merged-stream order."""
        segments = plan.segments(self.sources, self.seed, self.shuffle, skip)
        readers = [chain.from_iterable(map(self._read_shard, s)) for s in segments]
        if len(readers) == 1:
            yield from readers[0]
            return
        for i in mix_order(plan.counts, plan.begin + skip, plan.end):
            yield next(readers[i])

    def _read_shard(self, seg: Segment) -> Iterator[Optional[tuple]]:
        """Exactly ``seg.stop - seg.start`` items: ``(key, url, files)``, or None where a sample
        is missing or corrupt (so every later draw keeps its step)."""
        shard = self.sources[seg.source].shards[seg.shard]
        done = 0
        try:
            fast = _small_samples(shard)
            with _open(shard.url, self.storage_options) as f:
                reader = _TarReader(f, SCAN_BLOCK if fast else READ_BLOCK)
                for key, files in _samples(reader, seg.start, seg.stop, self.want, fast):
                    done += 1
                    yield self._check_fields(key, shard.url, files)
            if done < seg.stop - seg.start:
                raise TarFormatError(f"has fewer samples than index.json says ({shard.nsamples})")
        except (OSError, TarFormatError, ValueError) as e:
            self._problem(f"shard {shard.url}: {type(e).__name__}: {e}; skipping samples "
                          f"{seg.start + done}..{seg.stop - 1}", e)
            yield from (None for _ in range(seg.stop - seg.start - done))

    def _check_fields(self, key: str, url: str, files: dict) -> Optional[tuple]:
        if self.want is not None and len(files) != self._nfields:
            missing = set(self.want.values()) - set(files)
            if missing:
                self._problem(f"sample {key} in {url} lacks {sorted(missing)}; skipping it")
                return None
        return key, url, files

    def _problem(self, message: str, cause: Optional[BaseException] = None) -> None:
        if self.strict:
            raise ShardError(message) from cause
        warnings.warn(message, SkippedDataWarning, stacklevel=2)

    def _decode_field(self, field: str, ext: str, data: bytes) -> Any:
        if field in self.decoders:
            return self.decoders[field](data)
        return _decode_value(ext, data, self.image) if self.decode else data

    def _decode_one(self, raw: tuple) -> Optional[dict]:
        key, url, files = raw
        try:
            sample = {f: self._decode_field(f, ext, data) for f, (ext, data) in files.items()}
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample, not a crash
            self._problem(f"sample {key} in {url}: cannot decode: {type(e).__name__}: {e}; skipping it", e)
            return None
        sample["__key__"], sample["__url__"] = key, url
        return sample

    def _decode_batch(self, pending: list[tuple[int, tuple]], worker: int) -> Optional[dict]:
        fields = pending[0][1][2].keys()
        same_fields = self.want is not None or all(raw[2].keys() == fields for _, raw in pending)  # checked on read
        if self.decode and not self.decoders and same_fields:
            try:  # column-wise: one copy for fixed-shape arrays, one stack for images
                batch = {f: _decode_column([raw[2][f][0] for _, raw in pending], [raw[2][f][1] for _, raw in pending],
                                           self.image) for f in fields}
            except Exception:  # noqa: BLE001 - find the bad sample(s) one by one below
                batch = None
            if batch is not None:
                batch["__key__"] = [raw[0] for _, raw in pending]
                batch["__url__"] = [raw[1] for _, raw in pending]
                batch["__worker__"] = [worker] * len(pending)
                batch["__step__"] = [step for step, _ in pending]
                return batch
        samples = []
        for step, raw in pending:
            sample = self._decode_one(raw)
            if sample is not None:
                sample["__worker__"], sample["__step__"] = worker, step
                samples.append(sample)
        return collate(samples) if samples else None


def _small_samples(shard: Shard) -> bool:
    """Samples small enough that reading whole blocks costs less than walking headers in Python."""
    return bool(shard.filesize and shard.nsamples and shard.filesize / shard.nsamples <= READ_BLOCK // 16)


def _ints(values: Any) -> list[int]:
    return values.tolist() if isinstance(values, torch.Tensor) else [int(v) for v in values]


# -- loader ----------------------------------------------------------------------------------------

def _as_is(item: Any) -> Any:
    return item


class Loader:
    """A torch DataLoader over a :class:`ShardDataset` that records what it delivered, so that
    ``state_dict()`` taken between batches resumes without repeating or skipping a sample.

    Extra keyword arguments go to ``torch.utils.data.DataLoader`` (pin_memory, prefetch_factor,
    multiprocessing_context, ...). Workers are not persistent: each pass starts them afresh
    from the recorded state. Without ``batch_size`` on the dataset, this yields single samples.
    """

    def __init__(self, dataset: ShardDataset, num_workers: int = 0, **dataloader_kwargs: Any):
        if dataloader_kwargs.get("persistent_workers"):
            raise ValueError("persistent workers would keep a stale resume state; they are not supported")
        self.dataset = dataset
        self.num_workers = num_workers
        self.kwargs = dataloader_kwargs

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        ds._begin(max(1, self.num_workers))
        kwargs = {"collate_fn": _as_is, **self.kwargs}  # items are tensors already: skip default_convert's walk
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, **kwargs)
        for item in loader:
            if self.num_workers:  # in-process iteration records by itself
                ds.record(item)
            yield item
        missing = ds.num_samples - ds.stats()["delivered"]  # reached only when the pass is complete
        if missing > 0:
            self._warn_missing(missing)

    def _warn_missing(self, missing: int) -> None:
        warnings.warn(f"epoch {self.dataset.epoch}: {missing} of {self.dataset.num_samples} samples on rank "
                      f"{self.dataset.rank} were skipped as missing or corrupt", SkippedDataWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.dataset.load_state_dict(state)

    def stats(self) -> dict:
        """The dataset's stats plus ``missing``: samples skipped as missing or corrupt, once a pass
        is complete (before that, also the samples still to come)."""
        stats = self.dataset.stats()
        return dict(stats, missing=stats["expected"] - stats["delivered"])

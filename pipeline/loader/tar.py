"""The tar reader: walks member headers through one reusable buffer (ustar, GNU long names, pax),
groups members into webdataset samples, and scans shards of small samples with numpy.

Shards are untrusted input, so every header is checked before it is believed, and anything that
is not a well-formed tar raises :class:`TarFormatError` (the dataset skips the rest of the shard):
a bad checksum, a size field that is not octal (or base-256) digits, a negative or base-256
negative size, a member whose data runs past the end of the file (wanted or not), a truncated
header, a pax record whose length is not a positive decimal that ends on its newline inside the
header, a pax ``size`` that is not a non-negative decimal, and pax or GNU long-name headers over
``MAX_EXTENDED_HEADER``. Every step moves forward by at least one block, so no input loops.
Extended headers (pax ``x``, GNU ``L``) apply to the next member only: several in a row are
merged (the later wins), and a directory or link in between consumes them. Global pax headers
(``g``) and GNU long link names (``K``) carry nothing a sample needs and are passed over.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Iterator, Mapping, Optional

import numpy as np

READ_BLOCK = 1 << 18  # bytes read at once around headers; bigger unwanted members are seeked over
SCAN_BLOCK = 1 << 22  # bytes read at once for shards of small samples: ~1000 samples per numpy scan
MIN_MEMBER_BYTES = 512  # every member takes at least its header block
MAX_EXTENDED_HEADER = 1 << 20  # a pax or GNU long-name header bigger than this is refused, not read


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
        self._size: Optional[int] = None

    @property
    def size(self) -> int:
        """The file's length (asked once): no member may claim data past it."""
        if self._size is None:
            self._size = self.f.seek(0, os.SEEK_END)
        return self._size

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


def _octal(field: bytes, what: str = "number") -> int:
    """A header number: octal digits (optionally space-padded, NUL-ended) or GNU base-256. A sign,
    an underscore or a negative base-256 value is refused: a negative size would walk backwards."""
    if field[:1] and field[0] & 0x80:
        if field[0] != 0x80:  # 0xff is a negative base-256 number; other high bytes are not numbers
            raise TarFormatError(f"bad {what} field {bytes(field)!r}: negative or not a number")
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if digits.isdigit():  # ASCII digits only: no sign, space or underscore reaches int()
        try:
            return int(digits, 8)
        except ValueError:  # an 8 or a 9
            pass
    elif not digits:
        return 0
    raise TarFormatError(f"bad {what} field {bytes(field)!r}: not octal digits")


def _checksum_ok(block: memoryview) -> bool:
    """The header checksum (the unsigned byte sum, or the signed one some old writers used)."""
    field = bytes(block[148:156])
    try:
        stored = _octal(field)
    except TarFormatError:
        return False
    array = np.frombuffer(block, np.uint8)  # numpy sums the block about 3x faster than sum()
    unsigned = int(array.sum()) - sum(field) + 256
    if stored == unsigned:
        return True
    high = int(np.count_nonzero(array > 127)) - sum(1 for b in field if b > 127)
    return stored == unsigned - 256 * high


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """The ``LENGTH KEY=VALUE\\n`` records of a pax header whose data starts at byte ``offset``.
    LENGTH counts the whole record, so it must be a positive decimal that ends on the record's
    newline inside the header (0 or a negative value would never move on). NUL padding may follow."""
    out, pos = {}, 0
    while pos < len(data) and data[pos]:
        where = f"pax record at byte {offset + pos}"
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise TarFormatError(f"{where}: length {data[pos:pos + 21]!r} is not a decimal number")
        end = pos + int(digits)
        if end > len(data) or end <= space + 1 or data[end - 1] != 0x0A:
            raise TarFormatError(f"{where}: length {int(digits)} does not end on a newline within "
                                 f"the {len(data)}-byte header")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        try:
            if not eq or not key:
                raise ValueError("no KEY=VALUE")
            out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        except ValueError as e:
            raise TarFormatError(f"{where}: {data[space + 1:end - 1][:60]!r} is not KEY=VALUE: {e}") from None
        pos = end
    if data[pos:].strip(b"\0"):
        raise TarFormatError(f"pax header at byte {offset}: data after the NUL padding")
    return out


def _pax_size(pax: dict[str, str], offset: int) -> int:
    value = pax["size"]
    if not (value.isascii() and value.isdigit()):
        raise TarFormatError(f"pax size {value!r} of the member at byte {offset} is not a non-negative integer")
    return int(value)


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
        if not _checksum_ok(block):
            raise TarFormatError(f"not a tar header at byte {offset} (bad checksum)")
        size = _octal(size_field, f"size (header at byte {offset})")
        data = offset + 512
        if typeflag in b"0\x007" and "size" in pax:  # regular file (b"" cannot occur: the field is one byte)
            size = _pax_size(pax, offset)
        if data + size > reader.size:
            raise TarFormatError(f"member at byte {offset} declares {size} bytes of data, past the end "
                                 f"of the {reader.size}-byte file")
        if typeflag in b"0\x007":
            if long_name is not None:
                path = long_name
            elif "path" in pax:
                path = pax["path"]
            else:
                path = name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if magic == b"ustar\x00" and prefix[0]:
                    path = prefix.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + path
            offset = data + (size + 511) // 512 * 512
            yield path, data, size, head
            long_name, pax, head = None, {}, offset
            continue
        if typeflag in b"Lx" and size > MAX_EXTENDED_HEADER:
            raise TarFormatError(f"extended header at byte {offset} is {size} bytes (the limit is "
                                 f"{MAX_EXTENDED_HEADER})")
        if typeflag == b"L":
            long_name = reader.read(data, size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif typeflag == b"x":
            pax.update(_pax_records(reader.read(data, size), data))
        offset = data + (size + 511) // 512 * 512
        if typeflag not in b"LxgK":  # a directory, link or device: the extended headers were its own
            long_name, pax, head = None, {}, offset


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
                            for f, ext, offs, sizes in fields if offs[j] >= 0}


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
    good &= _checksums_ok(h)
    good[1:] &= nxt[:-1] == heads[1:]
    m = len(good) if good.all() else int(np.argmin(good))
    if m == 0:
        return None
    last = nxt[m - 1]
    ends = m == len(heads) and ((last < n and not blocks[last].any()) or (last == n and at_eof))
    return heads[:m], sizes[:m], ends


_POW8_6 = _POW8[-6:]


def _checksums_ok(h: np.ndarray) -> np.ndarray:
    """Per header block: the checksum in the common layouts (six or seven octal digits, then a
    NUL or space) matches the byte sum. Any other layout is left to the header walk."""
    digits = h[:, 148:155].astype(np.int64) - 48
    octal = (digits >= 0) & (digits < 8)
    end = (h[:, 154:156] == 0) | (h[:, 154:156] == 32)
    six, seven = octal[:, :6].all(1) & end[:, 0], octal.all(1) & end[:, 1]
    stored = np.where(seven, digits.clip(0, 7) @ _POW8[-7:], digits[:, :6].clip(0, 7) @ _POW8_6)
    total = h.sum(1, dtype=np.int64) - h[:, 148:156].sum(1, dtype=np.int64) + 256
    return (six | seven) & (stored == total)


def _scan(reader: _TarReader, offset: int, want: Mapping[str, str]
          ) -> Optional[tuple[list[str], list[tuple[str, str, list[int], list[int]]], Optional[int]]]:
    """The complete samples in the buffered blocks from ``offset``, found with numpy: keys, per
    wanted extension (field, ext, data offsets, sizes; -1 where absent) and the next sample's
    header offset (None at the end). None when the members there are not plain (long or dotted
    paths, pax headers...)."""
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
    fields = []  # one entry per extension: several may feed one field ("jpg;png")
    for ext, field in want.items():
        target = np.frombuffer(ext.encode() + b"\0", np.uint8)
        cols = np.minimum(dot[:stop, None] + 1 + np.arange(len(target)), 99)
        hits = np.flatnonzero((np.take_along_axis(names[:stop], cols, 1) == target).all(1))
        offs, lens = np.full(count, -1, np.int64), np.zeros(count, np.int64)
        offs[sample[hits]] = offset + (heads[hits] + 1) * 512
        lens[sample[hits]] = sizes[hits]
        fields.append((field, ext, offs.tolist(), lens.tolist()))
    key_bytes = np.ascontiguousarray(keys[starts[:count]]).view("S100").ravel().tolist()
    nxt = None if count == len(starts) else offset + int(heads[stop]) * 512
    return [k.decode("utf-8", "surrogateescape") for k in key_bytes], fields, nxt

"""A response body on its way in: the Content-Encoding undone (:class:`Decoder`), and where the
bytes go (:class:`MemorySink` for images, :class:`FileSink` for videos)."""
from __future__ import annotations

import os
import zlib
from typing import Iterator, Optional

from pipeline.core.schema import ErrorKind
from pipeline.fetch.failure import Failure

ACCEPT_ENCODING = "gzip, deflate"  # the codings Decoder undoes
CHUNK_BYTES = 1 << 16                 # bytes read, and inflated, at a time


class MemorySink:
    in_memory = True  # its bytes count against the byte budget

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self._parts.append(chunk)

    def finish(self) -> tuple[Optional[bytes], Optional[str]]:
        return b"".join(self._parts), None

    def discard(self) -> None:
        self._parts.clear()


class FileSink:
    """Writes to ``PATH.part`` and renames on success, so a failed fetch never leaves a partial file."""

    in_memory = False

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self._tmp = self.path + ".part"
        self._file = None

    def write(self, chunk: bytes) -> None:
        try:
            if self._file is None:
                self._file = open(self._tmp, "wb")
            self._file.write(chunk)  # page-cache writes of 64 KiB: cheaper than a thread hop per chunk
        except OSError as exc:  # a full disk is the job's problem, not this URL's: not an OSError here
            raise RuntimeError(f"cannot write {self._tmp}: {exc}") from exc

    def finish(self) -> tuple[Optional[bytes], Optional[str]]:
        self.write(b"")  # opens the file if the body was empty
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.path)
        return None, self.path

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)



class Decoder:
    """Undoes a gzip or deflate Content-Encoding as the chunks arrive, in pieces of at most
    CHUNK_BYTES (a small body may inflate to gigabytes: the byte cap is checked between pieces).

    A body that does not start with its coding's header (the gzip magic, a zlib header) is taken as
    identity: the label is wrong (servers label already compressed images gzip) and the bytes are
    sniffed like any others. One that starts with it but does not inflate is ``bad_encoding``.
    Other codings (we ask only for gzip and deflate) pass through and are sniffed as they are.
    """

    _WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._inflater = None
        self._head = b""
        self._decided = coding not in self._WBITS

    @property
    def passes_through(self) -> bool:
        """A coding we do not undo: the bytes are sniffed as they are."""
        return self.coding not in ("", *self._WBITS)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if not self._decided:
            self._head += chunk
            if len(self._head) < 2:
                return
            chunk, self._head, self._decided = self._head, b"", True
            if _starts_like(self.coding, chunk):
                self._inflater = zlib.decompressobj(self._WBITS[self.coding])
        if self._inflater is None:
            if chunk:
                yield chunk
            return
        yield from self._inflate(chunk)

    def finish(self) -> Iterator[bytes]:
        if not self._decided and self._head:
            yield self._head  # under 2 bytes: too short to be encoded
        elif self._inflater is not None and not self._inflater.eof:
            raise self._bad("the stream ends before its end marker")

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        while True:
            if self._inflater.eof:  # trailing bytes after the stream: ignored, as browsers do
                return
            try:
                out = self._inflater.decompress(data, CHUNK_BYTES)
            except zlib.error as exc:
                raise self._bad(str(exc)) from None
            if out:
                yield out
            data = self._inflater.unconsumed_tail
            if not data and len(out) < CHUNK_BYTES:
                return

    def _bad(self, why: str) -> "Failure":
        return Failure(ErrorKind.BAD_ENCODING, f"Content-Encoding {self.coding}: {why}")


def _starts_like(coding: str, head: bytes) -> bool:
    if coding == "gzip":
        return head[:2] == b"\x1f\x8b"
    return head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0  # a zlib header (RFC 1950)


def content_coding(value: str) -> str:
    """The Content-Encoding to undo: "gzip", "deflate", "" (identity), or the header as written."""
    codings = [c.strip().lower() for c in value.split(",")]
    codings = [c for c in codings if c not in ("", "identity")]
    if not codings:
        return ""
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return "deflate" if codings[0] == "deflate" else "gzip"
    return value.strip()[:100]


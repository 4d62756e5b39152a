"""A hostile HTTP server on 127.0.0.1: every way a web-scale URL list goes wrong, as named cases.

    from helpers.hostile_server import hostile_server, fetch_config   # tests/ is on sys.path (pyproject pythonpath)

    with hostile_server() as (server, cases):
        case = cases["redirect_loop"]
        case.url            # http://127.0.0.1:PORT/...
        case.status         # schema status the sample should end in (after download and decode)
        case.error_kind     # schema error kind for that status; None on success
        case.fetch_kind     # what pipeline.fetch alone ends in (None: the download succeeds)
        server.state        # what the server saw: requests per path, bytes sent, attempts, ...

Expectations assume :func:`fetch_config`: ``allow_private_addresses=False`` with
``allowed_networks=("127.0.0.0/8",)`` (the server is reachable, the redirect to 169.254.169.254 is
refused before any connection), ``respect_optouts=True``, ``retries=0``, ``max_bytes`` of at least
4 MB and a timeout well under the 30 s of ``slow_headers``; decode expectations assume the
DownloadSpec defaults (``max_pixels`` 89.5 M, ``min_image_size`` 0). Cases with
``needs_loopback_only`` must not be requested when private addresses are allowed (the client would
really try 169.254.169.254): :func:`safe_cases` leaves them out. Cases with ``media="video"``
(video_mp4, mp4_garbage) expect ``FetchConfig(media="video")``; fetched as images they are not_media.

Cases (name: what the server does -> status / error kind):

  Media that download fine (status success unless noted):
    ok_jpeg, ok_jpeg_2, ok_jpeg_3   ordinary RGB JPEGs (320x240, 640x480, 200x300)
    ok_png_alpha                    RGBA PNG with a transparent half (64x48)
    ok_gif_animated                 animated GIF, 3 frames (48x32)
    ok_webp                         WebP (80x60)
    ok_cmyk_jpeg                    CMYK JPEG (40x30)
    ok_exif_rotated                 JPEG stored 64x32 with EXIF orientation 6 (shown 32x64)
    ok_tiny                         4x4 JPEG
    ok_wrong_content_type           a JPEG served as text/html (the type is sniffed, not trusted)
    ok_redirect_chain               3 redirects (absolute, relative, 307) ending in a JPEG
    optout_scoped_other             X-Robots-Tag: otherbot: noai  (not for us)
    optout_unrelated                X-Robots-Tag: nofollow, noarchive
    video_mp4                       a real 10-frame MPEG-4 video (64x64); media="video" fetches it
    jpeg_garbage                    JPEG magic then random bytes -> failed_to_resize / decode_error
    mp4_garbage                     3 MB: an ftyp header then random bytes -> (video) decode_error
    bomb_png                        PNG whose IHDR says 24000x24000 (~70 KB, 1-bit zeros)
                                    -> failed_to_resize / decompression_bomb

  Download failures (status failed_to_download):
    http_404, http_500              plain error statuses                     -> http_status
    http_429, http_503              always busy, with Retry-After: 1          -> http_status
    html_200, text_200, empty_200   an HTML page / plain text / no body      -> not_media
    random_bytes                    random bytes served as image/jpeg         -> not_media
    truncated                       Content-Length says N, N/2 sent, closed   -> truncated
    endless_slow                    a JPEG head, then 1 KB every 0.2 s forever -> timeout
    endless_fast                    a JPEG head, then 64 KB chunks forever    -> too_large
    too_large_declared              Content-Length 200 MB (sends slowly)     -> too_large
    slow_headers                    answers after 30 s                        -> timeout
    reset                           closes the connection without answering  -> connection
    refused                         a port nobody listens on                  -> connection
    redirect_loop                   a -> b -> a                               -> redirect_loop
    redirect_too_many               7 redirects                               -> too_many_redirects
    redirect_private                to http://169.254.169.254/latest/meta-data/ -> forbidden_address
                                    (needs_loopback_only)
    redirect_file_scheme            to file:///etc/passwd                     -> forbidden_scheme
    redirect_no_location            302 without Location                      -> http_status
    optout_noai, optout_noimageai, optout_noindex, optout_noimageindex        -> opted_out
    optout_multi_header             two X-Robots-Tag headers, the 2nd noimageai -> opted_out
    optout_comma                    "nofollow, NoAI"                          -> opted_out
    optout_scoped_us                "mmcurate: noimageai"                     -> opted_out
    optout_slow_body                noai, then a 1.2 MB body over ~1.2 s; the server records how much
                                    it sent (state.sent / state.finished)     -> opted_out

  Content-Encoding (the client decodes gzip/deflate itself; see pipeline.fetch):
    ok_gzip                         a JPEG, really gzipped, Content-Encoding: gzip   -> success
    ok_deflate                      a JPEG in a zlib stream, Content-Encoding: deflate -> success
    ok_gzip_mislabelled             a plain JPEG labelled Content-Encoding: gzip (no gzip magic:
                                    taken as identity)                              -> success
    gzip_corrupt                    the gzip magic, then garbage                    -> bad_encoding
    gzip_bomb                       32 KB of gzip that inflates to 32 MB (a JPEG head, then zeros)
                                                                                    -> too_large

Instrumented endpoints (not cases):
    server.retry_url(key, fails=1, status=429, after="1")  fails ``fails`` times, then a JPEG;
        ``after`` is the Retry-After value ("" for none, "date:N" for an HTTP-date N s ahead);
        ``server.state.attempts[key]`` counts the requests.
    server.counted_url(group, delay=0.1, host="127.0.0.1")  a JPEG after ``delay`` s; the server
        tracks requests in flight: state.max_in_flight[group] and state.max_in_flight[(group, host)].
    server.retry_url(..., host="h.test")  the same, addressed to a made-up name (a lookup maps it).
    server.redirect_to(location)  a 302 to ``location``, verbatim (hostile Location values).
    server.raw_url(response)  these bytes, verbatim, as the whole response (malformed headers).
    server.large_url(key, size, chunked=False, pause=0)  a ``size``-byte JPEG-headed body in 64 KB
        chunks, ``pause`` s apart, with Content-Length unless ``chunked``.
    state.log  (kind, key, host) per request to retry / counted / large, in arrival order.
    server.url(path)  any path above; state.requests[path] counts requests per path.
"""
from __future__ import annotations

import asyncio
import email.utils
import functools
import gzip
import io
import random
import socket
import struct
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional
from urllib.parse import urlencode

from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

from pipeline.core.schema import FAILED_TO_DECODE, FAILED_TO_DOWNLOAD, SUCCESS
from pipeline.fetch import FetchConfig
from pipeline.testing.serve import LocalServer

LOOPBACK = ("127.0.0.0/8",)


def fetch_config(**overrides) -> FetchConfig:
    """The fetch options the case expectations assume (small timeout, loopback allowed)."""
    options = dict(timeout=1.5, retries=0, allowed_networks=LOOPBACK, max_bytes=8_000_000, backoff_base=0.05)
    options.update(overrides)
    return FetchConfig(**options)


@dataclass(frozen=True)
class Case:
    name: str
    url: str
    status: str                       # schema status after download + decode
    error_kind: Optional[str] = None  # schema error kind; None on success
    media_type: Optional[str] = None  # what fetch sniffs when the download succeeds
    size: Optional[tuple[int, int]] = None  # (width, height) as displayed (EXIF orientation applied)
    needs_loopback_only: bool = False
    media: str = "image"              # the FetchConfig.media it is fetched with

    @property
    def fetch_kind(self) -> Optional[str]:
        """The error kind pipeline.fetch ends in; None when the download itself succeeds."""
        return self.error_kind if self.status == FAILED_TO_DOWNLOAD else None


def safe_cases(cases: dict[str, Case], allow_private_addresses: bool) -> dict[str, Case]:
    """The cases that are safe and meaningful under the given address policy."""
    if not allow_private_addresses:
        return dict(cases)
    return {n: c for n, c in cases.items() if not c.needs_loopback_only}


# -- media ------------------------------------------------------------------------------------------

def _jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.linear_gradient("L").resize((width, height))
    return Image.merge("RGB", (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image)).convert(mode)


def bomb_png(side: int = 24000) -> bytes:
    """A valid PNG of side x side 1-bit zeros, compressed row block by row block (never allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" * (1 + (side + 7) // 8)) * 1000  # filter byte + packed row, 1000 rows at a time
    comp = zlib.compressobj(6)  # as small as level 9 on zeros, twice as fast
    idat = b"".join([comp.compress(rows) for _ in range(side // 1000)]
                    + [comp.compress(rows[: (side % 1000) * (1 + (side + 7) // 8)]), comp.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _mp4() -> Optional[bytes]:
    """A real 10-frame MPEG-4 video, or None where PyAV is missing."""
    try:
        import av
        import numpy as np
    except ImportError:
        return None
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 20, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def _gzip_bomb(size: int = 32 << 20) -> bytes:
    """gzip of a JPEG head then ``size`` zero bytes (about 1000:1), compressed block by block."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [comp.compress(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")]
    parts += [comp.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + comp.flush()


@functools.lru_cache(maxsize=None)
def media_samples() -> dict[str, bytes]:
    """Every generated body, by name (deterministic: fixed seeds)."""
    rng = random.Random(1234)
    rgba = _gradient(64, 48).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((64, 48)).point(lambda v: 0 if v < 128 else 255))
    frames = [Image.new("RGB", (48, 32), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display

    def save(image: Image.Image, fmt: str, **options) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        return buf.getvalue()

    samples = {
        "ok_jpeg": _jpeg(_gradient(320, 240)),
        "ok_jpeg_2": _jpeg(_gradient(640, 480)),
        "ok_jpeg_3": _jpeg(_gradient(200, 300)),
        "ok_png_alpha": save(rgba, "PNG"),
        "ok_gif_animated": save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "ok_webp": save(_gradient(80, 60), "WEBP", quality=80),
        "ok_cmyk_jpeg": _jpeg(_gradient(40, 30, "CMYK")),
        "ok_exif_rotated": _jpeg(_gradient(64, 32), exif=exif.tobytes()),
        "ok_tiny": _jpeg(_gradient(4, 4)),
        "random_bytes": bytes(rng.getrandbits(8) for _ in range(4096)).replace(b"\xff\xd8", b"\x00\x00"),
        "jpeg_garbage": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(rng.getrandbits(8) for _ in range(8192)),
        "mp4_garbage": (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
                        + rng.randbytes(3_000_000)),
        "bomb_png": bomb_png(),
        "html_200": b"<!DOCTYPE html><html><head><title>Not found</title></head><body>gone</body></html>",
        "text_200": b"This image is no longer available.\n",
        "gzip_bomb": _gzip_bomb(),
    }
    video = _mp4()
    if video is not None:
        samples["video_mp4"] = video
    return samples


# -- server -----------------------------------------------------------------------------------------

class ServerState:
    """What the server saw. Written on the server thread, read by tests (plain counters)."""

    def __init__(self) -> None:
        self.requests: Counter = Counter()       # path -> requests
        self.hosts: Counter = Counter()          # Host header -> requests
        self.attempts: Counter = Counter()       # retry key -> requests
        self.sent: Counter = Counter()           # path -> body bytes written by streaming handlers
        self.finished: set[str] = set()          # streaming handlers that wrote their whole body
        self.in_flight: Counter = Counter()      # group and (group, host) -> requests being served
        self.max_in_flight: Counter = Counter()
        self.log: list[tuple[str, str, str]] = []  # (endpoint, key, host) per instrumented request

    def reset(self) -> None:
        self.__init__()


class HostileServer(LocalServer):
    def __init__(self) -> None:
        self.state = ServerState()
        self.raw_responses: list[bytes] = []  # raw_url(): served verbatim
        super().__init__()

    def retry_url(self, key: str, fails: int = 1, status: int = 429, after: str = "1",
                  host: str = "127.0.0.1") -> str:
        query = urlencode(dict(key=key, fails=fails, status=status, after=after))
        return f"http://{host}:{self.port}/retry?{query}"

    def redirect_to(self, location: str) -> str:
        return self.url("redirect_to?" + urlencode(dict(location=location)))

    def raw_url(self, response: bytes) -> str:
        self.raw_responses.append(response)
        return self.url(f"raw?n={len(self.raw_responses) - 1}")

    def large_url(self, key: str, size: int, chunked: bool = False, pause: float = 0.0) -> str:
        return self.url("large?" + urlencode(dict(key=key, size=size, chunked=int(chunked), pause=pause)))

    def counted_url(self, group: str, delay: float = 0.1, host: str = "127.0.0.1", n: int = 0) -> str:
        return f"http://{host}:{self.port}/counted?" + urlencode(dict(group=group, delay=delay, n=n))

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.state.requests[request.path.lstrip("/")] += 1
        self.state.hosts[request.host] += 1
        return await super()._dispatch(request)


def _static(body: bytes, content_type: str = "image/jpeg", status: int = 200, headers=None):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type=content_type, headers=headers)
    return handler


def _redirect(location: str, status: int = 302):
    async def handler(request: web.Request) -> web.Response:
        target = location.replace("{origin}", f"http://{request.host}")
        return web.Response(status=status, headers={"Location": target})
    return handler


def _handlers(server: HostileServer, media: dict[str, bytes]) -> dict[str, object]:
    state = server.state
    jpeg = media["ok_jpeg"]

    async def truncated(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = len(jpeg)
        await resp.prepare(request)
        await resp.write(jpeg[: len(jpeg) // 2])
        request.transport.close()  # close with half the promised bytes
        return resp

    def streaming(path: str, chunk: bytes, pause: float, count: Optional[int], headers=None,
                  content_length: Optional[int] = None):
        async def handler(request):
            resp = web.StreamResponse(headers=headers or {"Content-Type": "image/jpeg"})
            if content_length is not None:
                resp.content_length = content_length
            await resp.prepare(request)
            await resp.write(jpeg[:64])
            state.sent[path] += 64
            i = 0
            while count is None or i < count:
                await asyncio.sleep(pause)  # also yields, so a fast stream notices a closed client
                await resp.write(chunk)
                state.sent[path] += len(chunk)
                i += 1
            state.finished.add(path)
            await resp.write_eof()
            return resp
        return handler

    async def slow_headers(request):
        await asyncio.sleep(30)
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def reset(request):
        request.transport.abort()
        return web.Response()

    async def retry(request):
        q = request.query
        key = q["key"]
        state.attempts[key] += 1
        state.log.append(("retry", key, request.host.rsplit(":", 1)[0]))
        if state.attempts[key] > int(q.get("fails", 1)):
            return web.Response(body=jpeg, content_type="image/jpeg")
        after = q.get("after", "")
        if after.startswith("date:"):
            after = email.utils.formatdate(time.time() + float(after[5:]), usegmt=True)
        return web.Response(status=int(q.get("status", 429)), text="busy",
                            headers={"Retry-After": after} if after else None)

    async def counted(request):
        group = request.query["group"]
        keys = (group, (group, request.host.rsplit(":", 1)[0]))
        state.log.append(("counted", group, keys[1][1]))
        for k in keys:
            state.in_flight[k] += 1
            state.max_in_flight[k] = max(state.max_in_flight[k], state.in_flight[k])
        try:
            await asyncio.sleep(float(request.query.get("delay", 0.1)))
            return web.Response(body=media["ok_tiny"], content_type="image/jpeg")
        finally:
            for k in keys:
                state.in_flight[k] -= 1

    async def redirect_to(request):
        return web.Response(status=302, headers={"Location": request.query["location"]})

    async def raw(request):
        request.transport.write(server.raw_responses[int(request.query["n"])])  # malformed included
        request.transport.close()
        return web.Response()

    async def large(request):
        key, size = request.query["key"], int(request.query["size"])
        state.log.append(("large", key, request.host.rsplit(":", 1)[0]))
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if request.query.get("chunked") != "1":
            resp.content_length = size
        await resp.prepare(request)
        pause, zeros = float(request.query.get("pause", 0)), bytes(65536)
        for i in range(0, size, 65536):  # chunk by chunk: the server's memory is not the client's
            chunk = zeros[:min(65536, size - i)]
            await resp.write(jpeg[:64] + chunk[64:] if i == 0 else chunk)
            await asyncio.sleep(pause)  # slow: every body is in flight at once
        await resp.write_eof()
        return resp

    def encoded(body: bytes, coding: str):
        return _static(body, headers={"Content-Encoding": coding})

    def robots(*values: str):
        return _static(jpeg, headers=CIMultiDict(("X-Robots-Tag", v) for v in values))

    handlers = {name: _static(body) for name, body in media.items()
                if name.startswith(("ok_", "jpeg_garbage", "bomb_png", "random_bytes"))}
    handlers.update({
        "video_mp4": _static(media.get("video_mp4", b""), "video/mp4"),
        "mp4_garbage": _static(media["mp4_garbage"], "video/mp4"),
        "ok_wrong_content_type": _static(jpeg, "text/html"),
        "http_404": _static(b"not found", "text/plain", 404),
        "http_500": _static(b"oops", "text/plain", 500),
        "http_429": _static(b"slow down", "text/plain", 429, {"Retry-After": "1"}),
        "http_503": _static(b"busy", "text/plain", 503, {"Retry-After": "1"}),
        "html_200": _static(media["html_200"], "text/html"),
        "text_200": _static(media["text_200"], "text/plain"),
        "empty_200": _static(b"", "image/jpeg"),
        "truncated": truncated,
        "endless_slow": streaming("endless_slow", b"\0" * 1024, 0.2, None),
        "endless_fast": streaming("endless_fast", b"\0" * 65536, 0, None),
        "too_large_declared": streaming("too_large_declared", b"\0" * 65536, 0.05, 3000,
                                        content_length=64 + 3000 * 65536),
        "slow_headers": slow_headers,
        "reset": reset,
        "redirect/chain1": _redirect("{origin}/redirect/chain2", 302),
        "redirect/chain2": _redirect("/redirect/chain3", 301),
        "redirect/chain3": _redirect("../ok_jpeg", 307),
        "redirect/loop_a": _redirect("/redirect/loop_b"),
        "redirect/loop_b": _redirect("{origin}/redirect/loop_a"),
        "redirect/private": _redirect("http://169.254.169.254/latest/meta-data/"),
        "redirect/file": _redirect("file:///etc/passwd"),
        "redirect/no_location": _static(b"", "text/plain", 302),
        "optout_noai": robots("noai"),
        "optout_noimageai": robots("noimageai"),
        "optout_noindex": robots("noindex"),
        "optout_noimageindex": robots("noimageindex"),
        "optout_multi_header": robots("nofollow", "noimageai"),
        "optout_comma": robots("nofollow, NoAI"),
        "optout_scoped_us": robots("mmcurate: noimageai"),
        "optout_scoped_other": robots("otherbot: noai"),
        "optout_unrelated": robots("nofollow, noarchive"),
        "optout_slow_body": streaming("optout_slow_body", b"\0" * 32768, 0.03, 40,
                                      headers={"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"}),
        "retry": retry,
        "counted": counted,
        "redirect_to": redirect_to,
        "large": large,
        "raw": raw,
        "ok_gzip": encoded(gzip.compress(media["ok_jpeg_2"]), "gzip"),
        "ok_deflate": encoded(zlib.compress(media["ok_jpeg_3"]), "deflate"),
        "ok_gzip_mislabelled": encoded(jpeg, "gzip"),
        "gzip_corrupt": encoded(b"\x1f\x8b\x08\x00" + media["random_bytes"], "gzip"),
        "gzip_bomb": encoded(media["gzip_bomb"], "gzip"),
    })
    for i in range(1, 8):
        handlers[f"redirect/many{i}"] = _redirect(f"/redirect/many{i + 1}" if i < 7 else "/ok_jpeg", 302)
    return handlers


def _cases(server: HostileServer, media: dict[str, bytes]) -> dict[str, Case]:
    url = server.url
    ok, dl, dec = SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_DECODE
    sizes = {"ok_jpeg": (320, 240), "ok_jpeg_2": (640, 480), "ok_jpeg_3": (200, 300), "ok_png_alpha": (64, 48),
             "ok_gif_animated": (48, 32), "ok_webp": (80, 60), "ok_cmyk_jpeg": (40, 30),
             "ok_exif_rotated": (32, 64), "ok_tiny": (4, 4)}
    types = {"ok_png_alpha": "image/png", "ok_gif_animated": "image/gif", "ok_webp": "image/webp"}
    cases = [Case(n, url(n), ok, None, types.get(n, "image/jpeg"), size) for n, size in sizes.items()]
    cases += [
        Case("ok_wrong_content_type", url("ok_wrong_content_type"), ok, None, "image/jpeg", (320, 240)),
        Case("ok_redirect_chain", url("redirect/chain1"), ok, None, "image/jpeg", (320, 240)),
        Case("ok_gzip", url("ok_gzip"), ok, None, "image/jpeg", (640, 480)),
        Case("ok_deflate", url("ok_deflate"), ok, None, "image/jpeg", (200, 300)),
        Case("ok_gzip_mislabelled", url("ok_gzip_mislabelled"), ok, None, "image/jpeg", (320, 240)),
        Case("gzip_corrupt", url("gzip_corrupt"), dl, "bad_encoding"),
        Case("gzip_bomb", url("gzip_bomb"), dl, "too_large"),
        Case("optout_scoped_other", url("optout_scoped_other"), ok, None, "image/jpeg", (320, 240)),
        Case("optout_unrelated", url("optout_unrelated"), ok, None, "image/jpeg", (320, 240)),
        Case("jpeg_garbage", url("jpeg_garbage"), dec, "decode_error", "image/jpeg"),
        Case("mp4_garbage", url("mp4_garbage"), dec, "decode_error", "video/mp4", media="video"),
        Case("bomb_png", url("bomb_png"), dec, "decompression_bomb", "image/png", (24000, 24000)),
        Case("http_404", url("http_404"), dl, "http_status"),
        Case("http_500", url("http_500"), dl, "http_status"),
        Case("http_429", url("http_429"), dl, "http_status"),
        Case("http_503", url("http_503"), dl, "http_status"),
        Case("html_200", url("html_200"), dl, "not_media"),
        Case("text_200", url("text_200"), dl, "not_media"),
        Case("empty_200", url("empty_200"), dl, "not_media"),
        Case("random_bytes", url("random_bytes"), dl, "not_media"),
        Case("truncated", url("truncated"), dl, "truncated"),
        Case("endless_slow", url("endless_slow"), dl, "timeout"),
        Case("endless_fast", url("endless_fast"), dl, "too_large"),
        Case("too_large_declared", url("too_large_declared"), dl, "too_large"),
        Case("slow_headers", url("slow_headers"), dl, "timeout"),
        Case("reset", url("reset"), dl, "connection"),
        Case("refused", f"http://127.0.0.1:{_unused_port()}/x.jpg", dl, "connection"),
        Case("redirect_loop", url("redirect/loop_a"), dl, "redirect_loop"),
        Case("redirect_too_many", url("redirect/many1"), dl, "too_many_redirects"),
        Case("redirect_private", url("redirect/private"), dl, "forbidden_address", needs_loopback_only=True),
        Case("redirect_file_scheme", url("redirect/file"), dl, "forbidden_scheme"),
        Case("redirect_no_location", url("redirect/no_location"), dl, "http_status"),
    ]
    cases += [Case(n, url(n), dl, "opted_out") for n in (
        "optout_noai", "optout_noimageai", "optout_noindex", "optout_noimageindex", "optout_multi_header",
        "optout_comma", "optout_scoped_us", "optout_slow_body")]
    if "video_mp4" in media:
        cases.append(Case("video_mp4", url("video_mp4"), ok, None, "video/mp4", (64, 64), media="video"))
    return {c.name: c for c in cases}


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def hostile_server() -> Iterator[tuple[HostileServer, dict[str, Case]]]:
    """Start the server; yield it and its cases (name -> Case)."""
    media = media_samples()
    server = HostileServer()
    server.handlers.update(_handlers(server, media))
    with server:
        yield server, _cases(server, media)

"""The async HTTP client for media: many requests in flight, safe by default, hostile input expected.

Every URL ends in a :class:`FetchResult`; a per-URL problem never raises. Its ``error_kind`` is one
of :class:`pipeline.core.schema.ErrorKind`.

What one fetch does, and why:

* Redirects are followed by hand (at most ``max_redirects``) so that every hop is checked again:
  scheme (http/https only), loops, and the destination address.
* Address safety: the host is resolved here and *every* address is vetted with :mod:`ipaddress`
  (private, loopback, link-local such as 169.254.169.254, multicast, reserved, unspecified, and
  their IPv4-mapped / 6to4 / NAT64 spellings) before any connection. The connector's resolver is
  the same vetting resolver, so a connection only ever goes to an address that passed the check
  (no DNS-rebinding window).
* ``timeout`` bounds the network time of one attempt: DNS, connect, headers and body over all
  hops. Time spent queued for a concurrency slot is not counted, so a long per-host queue does
  not turn into timeouts.
* Retries (``retries``) with exponential backoff on connection errors, timeouts, truncated bodies,
  429 and 5xx; ``Retry-After`` (seconds or HTTP-date) is honoured for 429/503, capped to
  ``max_retry_wait`` and to what is left of ``total_timeout``.
* X-Robots-Tag opt-outs are read from the headers; an opted-out body is never read.
* The body is streamed under a byte cap, checked against Content-Length (truncation), and its
  media type is sniffed from the bytes (never from Content-Type) as soon as the head arrives.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import os
import random
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable, Iterable, Literal, Optional, Sequence, Union

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pipeline.core.schema import error_kind

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout as _timeout

DEFAULT_USER_AGENT = "mmcurate/0.1 (+https://github.com/mmcurate/mmcurate)"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_AFTER_STATUSES = frozenset({429, 503})
RETRYABLE_KINDS = frozenset({"timeout", "connection", "truncated"})
OPTOUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})  # none = noindex, nofollow
SNIFF_BYTES = 512        # enough for every signature below (MPEG-TS needs 377)
CHUNK_BYTES = 1 << 16

Lookup = Callable[[str], Awaitable[list[str]]]  # host name -> IP addresses


# -- configuration and result ----------------------------------------------------------------------

@dataclass
class FetchConfig:
    timeout: float = 10.0                  # seconds of network time per attempt (all hops + body)
    retries: int = 0                       # extra attempts after a retryable failure
    max_redirects: int = 5
    max_bytes: int = 50_000_000            # body cap
    concurrency: int = 256                 # requests in flight per Fetcher
    per_host_limit: int = 16               # requests in flight to one host
    user_agent: str = DEFAULT_USER_AGENT
    respect_optouts: bool = True
    allow_private_addresses: bool = False
    allowed_networks: tuple[str, ...] = ()  # networks allowed even when private (tests: "127.0.0.0/8")
    media: Literal["image", "video"] = "image"
    backoff_base: float = 0.5              # first retry waits about this long, then doubles
    max_retry_wait: float = 60.0           # cap on one backoff / Retry-After wait
    total_timeout: Optional[float] = None  # wall-clock budget per URL over all attempts; None: unbounded

    def __post_init__(self) -> None:
        self.allowed_networks = tuple(self.allowed_networks)
        for net in self.allowed_networks:
            ipaddress.ip_network(net, strict=False)  # fail at configuration time, not per URL
        if self.media not in ("image", "video"):
            raise ValueError(f"media: expected 'image' or 'video', got {self.media!r}")


@dataclass
class FetchResult:
    url: str
    ok: bool = False
    body: Optional[bytes] = None          # get(): the whole body
    path: Optional[str] = None            # get_to_file(): where the body was written
    media_type: Optional[str] = None      # sniffed from the bytes, e.g. "image/jpeg"
    final_url: Optional[str] = None       # after redirects
    error_kind: Optional[str] = None      # an ErrorKind
    error_message: Optional[str] = None
    http_status: Optional[int] = None
    attempts: int = 0                     # requests made for this URL, retries included


class _Failure(Exception):
    """A per-URL failure with its error kind; turned into a FetchResult at the top."""

    def __init__(self, kind: str, message: str, http_status: Optional[int] = None,
                 retry_after: Optional[float] = None):
        error_kind(kind)  # a kind outside the schema is a bug here
        super().__init__(message)
        self.kind, self.message, self.http_status, self.retry_after = kind, message, http_status, retry_after


class ForbiddenAddress(OSError):
    """A host resolved to an address the policy refuses (an OSError so aiohttp wraps it as such)."""


# -- media sniffing --------------------------------------------------------------------------------

_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"\xff\x0a", "image/jxl"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "image/jxl"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "image/jp2"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
    (b"FLV\x01", "video/x-flv"),
    (b"\x00\x00\x01\xba", "video/mpeg"),
    (b"\x00\x00\x01\xb3", "video/mpeg"),
    (b"OggS", "video/ogg"),
)
_RIFF = {b"WEBP": "image/webp", b"AVI ": "video/x-msvideo"}
_FTYP_IMAGE = {b"avif": "image/avif", b"avis": "image/avif", b"heic": "image/heic", b"heix": "image/heic",
               b"heim": "image/heic", b"heis": "image/heic", b"hevc": "image/heic", b"hevx": "image/heic"}
_FTYP_HEIF = frozenset({b"mif1", b"msf1"})  # generic HEIF: a specific brand (avif, heic) wins
_FTYP_AUDIO = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})
_QUICKTIME_ATOMS = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})


def sniff(data: bytes) -> Optional[str]:
    """The media type of ``data`` from its magic numbers ("image/jpeg", "video/mp4", ...), else None.

    HTML, text, SVG, audio-only containers and unknown bytes give None.
    """
    for magic, media_type in _PREFIXES:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF":
        return _RIFF.get(data[8:12])
    if data[4:8] == b"ftyp":
        return _sniff_ftyp(data)
    if data[4:8] in _QUICKTIME_ATOMS:
        return "video/quicktime"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: the DocType says WebM or Matroska
        return "video/webm" if b"webm" in data[:64] else "video/x-matroska"
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "image/bmp"
    if len(data) >= 377 and data[0] == data[188] == data[376] == 0x47:  # MPEG-TS sync bytes
        return "video/mp2t"
    return None


def _sniff_ftyp(data: bytes) -> Optional[str]:
    """ISO base media: the major brand, then the compatible brands, say image (AVIF/HEIF) or video."""
    size = int.from_bytes(data[:4], "big")
    major = data[8:12]
    compatible = [data[i:i + 4] for i in range(16, min(max(size, 16), len(data)) - 3, 4)]
    for brand in (major, *compatible):
        if brand in _FTYP_IMAGE:
            return _FTYP_IMAGE[brand]
    if major in _FTYP_HEIF or _FTYP_HEIF.intersection(compatible):
        return "image/heif"
    if major in _FTYP_AUDIO:
        return None
    if major == b"qt  ":
        return "video/quicktime"
    if major.startswith((b"3gp", b"3g2")):
        return "video/3gpp"
    return "video/mp4"  # isom, mp41, mp42, avc1, dash, M4V, ... and the many vendor brands


# -- address policy and the vetting resolver -------------------------------------------------------

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _reached_address(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 spelling reaches (mapped, 6to4, NAT64), else ``ip`` itself."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_problem(address: str, allowed_networks: Sequence = ()) -> Optional[str]:
    """Why ``address`` is refused ("loopback", "private", ...), or None if it may be contacted.

    ``allowed_networks`` (ip_network objects or strings) are accepted even when not global.
    """
    ip = _reached_address(ipaddress.ip_address(address.partition("%")[0]))
    for net in allowed_networks:
        if ip in ipaddress.ip_network(net, strict=False):
            return None
    for reason, flag in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                         ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                         ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if flag:
            return reason
    return None if ip.is_global else "not globally routable"


def _ip_literal(host: str) -> Optional[str]:
    try:
        return str(ipaddress.ip_address(host.strip("[]").partition("%")[0]))
    except ValueError:
        return None


class VettingResolver(AbstractResolver):
    """Resolves names, refuses the whole host if any address is forbidden, and caches the vetted
    answer (in-flight lookups shared) so the pre-check and aiohttp's connector see the same addresses.
    """

    def __init__(self, allow_all: bool, allowed_networks: Sequence[str], lookup: Lookup,
                 ttl: float = 60.0, max_entries: int = 10_000):
        self._allow_all = allow_all
        self._allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        self._lookup = lookup
        self._ttl = ttl
        self._max_entries = max_entries
        self._cache: dict[str, tuple[float, asyncio.Future]] = {}

    async def addresses(self, host: str) -> list[str]:
        """The vetted addresses of ``host``; raises ForbiddenAddress or socket.gaierror."""
        literal = _ip_literal(host)
        if literal is not None:
            return self._vet(None, [literal])
        now = time.monotonic()
        entry = self._cache.get(host)
        if entry is None or entry[0] <= now:
            future = asyncio.ensure_future(self._lookup_and_vet(host))
            future.add_done_callback(_consume_exception)
            self._cache[host] = (now + self._ttl, future)
            self._trim(now)
        else:
            future = entry[1]
        return list(await asyncio.shield(future))  # one waiter's timeout must not cancel the shared lookup

    async def _lookup_and_vet(self, host: str) -> list[str]:
        found = await self._lookup(host)
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
        return self._vet(host, found)

    def _vet(self, host: Optional[str], found: list[str]) -> list[str]:
        """``found`` if every address may be contacted; ``host`` is None for an IP literal."""
        if not self._allow_all:
            for address in found:
                reason = address_problem(address, self._allowed)
                if reason:
                    where = f"{host} resolves to {address}" if host else address
                    raise ForbiddenAddress(f"{where}: {reason} address refused")
        return found

    def _trim(self, now: float) -> None:
        if len(self._cache) <= self._max_entries:
            return
        for host in [h for h, (expiry, _) in self._cache.items() if expiry <= now]:
            del self._cache[host]
        while len(self._cache) > self._max_entries:  # oldest first (dict order)
            del self._cache[next(iter(self._cache))]

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        for address in await self.addresses(host):
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (socket.AF_UNSPEC, fam):
                results.append({"hostname": host, "host": address, "port": port, "family": fam, "proto": 0,
                                "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV})
        if not results:
            raise socket.gaierror(socket.EAI_ADDRFAMILY, f"{host} has no address of family {family}")
        return results

    async def close(self) -> None:
        self._cache.clear()


def _consume_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # a failed lookup whose waiters all timed out is not an "unretrieved" error


def system_lookup(pool: Optional[ThreadPoolExecutor] = None) -> Lookup:
    """getaddrinfo in ``pool`` (the default executor has only a handful of threads)."""

    async def lookup(host: str) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.run_in_executor(pool, socket.getaddrinfo, host, None, 0, socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    return lookup


# -- headers ---------------------------------------------------------------------------------------

_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_AGENT_TOKEN = re.compile(r"^[a-z0-9_.*-]+$")


def agent_tokens(user_agent: str) -> frozenset[str]:
    """The product names in a User-Agent, lower case: "mmcurate/0.1 (+https://...)" -> {"mmcurate"},
    "Mozilla/5.0 (compatible; ExampleBot/2.1)" -> {"mozilla", "examplebot"}."""
    text = re.sub(r"\S*://\S*", "", user_agent)  # a contact URL is not a product
    products = re.findall(r"([A-Za-z][\w.-]*)/", text) or text.split()[:1]
    return frozenset(p.lower() for p in products)


def optouts(header_values: Iterable[str], tokens: frozenset[str]) -> set[str]:
    """The opt-out directives among X-Robots-Tag values that apply to an agent named by ``tokens``.

    ``noai, noimageai`` applies to everyone; ``otherbot: noai`` only to otherbot; within one header a
    ``bot:`` prefix scopes the directives that follow it.
    """
    found: set[str] = set()
    for value in header_values:
        scope = None
        for part in value.split(","):
            name, sep, rest = part.partition(":")
            name = name.strip().lower()
            if sep and name not in _VALUED_DIRECTIVES and _AGENT_TOKEN.match(name):
                scope, part = name, rest
            directive = part.strip().lower()
            if directive in OPTOUT_DIRECTIVES and (scope is None or scope in tokens):
                found.add(directive)
    return found


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds from now (delta-seconds or HTTP-date), or None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# -- body sinks ------------------------------------------------------------------------------------

class _MemorySink:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self._parts.append(chunk)

    def finish(self) -> tuple[Optional[bytes], Optional[str]]:
        return b"".join(self._parts), None

    def discard(self) -> None:
        self._parts.clear()


class _FileSink:
    """Writes to ``PATH.part`` and renames on success, so a failed fetch never leaves a partial file."""

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


# -- concurrency helpers ---------------------------------------------------------------------------

class _HostSlots:
    """One semaphore per host, dropped when no request uses it (millions of hosts over a job)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots: dict[str, list] = {}  # host -> [semaphore, users]

    @contextlib.asynccontextmanager
    async def hold(self, host: str):
        slot = self._slots.setdefault(host, [asyncio.Semaphore(self._limit), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                del self._slots[host]


class _Clock:
    """The network time left to one attempt; only time spent holding a slot is charged."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds

    async def __aenter__(self) -> None:
        if self.left <= 0:
            raise _Failure("timeout", "no time left for this request")
        self._start = time.monotonic()
        self._timeout = _timeout(self.left)
        await self._timeout.__aenter__()

    async def __aexit__(self, *exc) -> Optional[bool]:
        self.left -= time.monotonic() - self._start
        return await self._timeout.__aexit__(*exc)


# -- the fetcher -----------------------------------------------------------------------------------

@dataclass
class _Redirect:
    target: URL


@dataclass
class _Body:
    status: int
    media_type: str
    body: Optional[bytes]
    path: Optional[str]


class Fetcher:
    """Owns one aiohttp session (keep-alive pool, vetting resolver). Use ``async with``.

    ``lookup`` replaces the system resolver (tests: map made-up names to 127.0.0.1).
    """

    def __init__(self, config: Optional[FetchConfig] = None, *, lookup: Optional[Lookup] = None):
        self.config = config or FetchConfig()
        self._lookup = lookup
        self._agent = agent_tokens(self.config.user_agent)
        self._session: Optional[aiohttp.ClientSession] = None
        self.resolver: Optional[VettingResolver] = None
        self._dns_pool: Optional[ThreadPoolExecutor] = None

    async def __aenter__(self) -> "Fetcher":
        cfg = self.config
        if self._lookup is None:
            self._dns_pool = ThreadPoolExecutor(min(64, cfg.concurrency), thread_name_prefix="mmcurate-dns")
        self.resolver = VettingResolver(cfg.allow_private_addresses, cfg.allowed_networks,
                                        self._lookup or system_lookup(self._dns_pool))
        connector = aiohttp.TCPConnector(limit=cfg.concurrency, limit_per_host=0, resolver=self.resolver,
                                         use_dns_cache=False)  # the resolver caches vetted answers itself
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": cfg.user_agent},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),  # ours: _Clock
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._hosts = _HostSlots(cfg.per_host_limit)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._dns_pool is not None:
            self._dns_pool.shutdown(wait=False, cancel_futures=True)  # a hung getaddrinfo must not block exit
            self._dns_pool = None

    async def get(self, url: str) -> FetchResult:
        """Fetch ``url`` into memory (images)."""
        return await self._fetch(url, _MemorySink)

    async def get_to_file(self, url: str, path: str) -> FetchResult:
        """Stream ``url`` to ``path`` (videos); the body is never whole in memory, no partial file on failure."""
        return await self._fetch(url, lambda: _FileSink(path))

    # One URL: attempts, waits between them.
    async def _fetch(self, url: str, new_sink: Callable) -> FetchResult:
        if self._session is None:
            raise RuntimeError("use Fetcher inside 'async with'")
        cfg = self.config
        deadline = None if cfg.total_timeout is None else time.monotonic() + cfg.total_timeout
        attempt = 0
        while True:
            attempt += 1
            budget = cfg.timeout if deadline is None else min(cfg.timeout, deadline - time.monotonic())
            result, failure = await self._attempt(url, new_sink(), budget)
            result.attempts = attempt
            wait = None if failure is None or attempt > cfg.retries else self._retry_wait(failure, attempt)
            if wait is None or (deadline is not None and time.monotonic() + wait >= deadline):
                return result
            await asyncio.sleep(wait)

    def _retry_wait(self, failure: _Failure, attempt: int) -> Optional[float]:
        """Seconds to wait before retrying, or None if the failure is not worth a retry."""
        status = failure.http_status
        if failure.kind not in RETRYABLE_KINDS and not (
                failure.kind == "http_status" and status is not None and (status == 429 or status >= 500)):
            return None
        if failure.retry_after is not None:
            return min(failure.retry_after, self.config.max_retry_wait)
        backoff = self.config.backoff_base * 2 ** (attempt - 1)
        return min(backoff, self.config.max_retry_wait) * random.uniform(0.5, 1.0)  # jitter spreads a herd

    async def _attempt(self, url: str, sink, budget: float) -> tuple[FetchResult, Optional[_Failure]]:
        current: Optional[URL] = None
        try:
            current = _parse_url(url)
            clock = _Clock(budget)
            visited = {_visit_key(current)}
            for _ in range(self.config.max_redirects + 1):
                outcome = await self._hop(current, sink, clock)
                if isinstance(outcome, _Body):
                    return FetchResult(url=url, ok=True, body=outcome.body, path=outcome.path,
                                       media_type=outcome.media_type, final_url=str(current),
                                       http_status=outcome.status), None
                current = _redirect_target(current, outcome.target, visited)
            raise _Failure("too_many_redirects", f"more than {self.config.max_redirects} redirects")
        except _Failure as failure:
            return self._failed(url, current, sink, failure)
        except (asyncio.TimeoutError, TimeoutError):
            return self._failed(url, current, sink, _Failure("timeout", f"no complete response in {budget:.3g} s"))
        except Exception as exc:  # noqa: BLE001 - only the exceptions a network request can raise
            failure = _classify(exc)
            if failure is None:
                sink.discard()
                raise
            return self._failed(url, current, sink, failure)

    @staticmethod
    def _failed(url: str, current: Optional[URL], sink, failure: _Failure) -> tuple[FetchResult, _Failure]:
        sink.discard()
        return FetchResult(url=url, ok=False, final_url=None if current is None else str(current),
                           error_kind=failure.kind, error_message=failure.message[:500],
                           http_status=failure.http_status), failure

    # One request: vet the destination, then connect, headers, body, all on the attempt's clock.
    async def _hop(self, url: URL, sink, clock: _Clock) -> Union[_Redirect, _Body]:
        # Host slot first: a request queued behind a busy host must not hold a global slot.
        async with self._hosts.hold(url.raw_host), self._slots, clock:
            try:
                await self.resolver.addresses(url.raw_host)
            except ForbiddenAddress as exc:
                raise _Failure("forbidden_address", str(exc)) from None
            except OSError as exc:
                raise _Failure("dns", f"cannot resolve {url.raw_host}: {exc}") from None
            async with self._session.get(url, allow_redirects=False) as resp:
                return await self._response(resp, sink)

    async def _response(self, resp: aiohttp.ClientResponse, sink) -> Union[_Redirect, _Body]:
        cfg = self.config
        if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
            return _Redirect(_join_location(resp.url, resp.headers["Location"]))
        if not 200 <= resp.status < 300:
            retry_after = (retry_after_seconds(resp.headers.get("Retry-After"))
                           if resp.status in RETRY_AFTER_STATUSES else None)
            raise _Failure("http_status", f"HTTP {resp.status} {resp.reason or ''}".strip(), resp.status,
                           retry_after)
        if cfg.respect_optouts:
            found = optouts(resp.headers.getall("X-Robots-Tag", ()), self._agent)
            if found:
                resp.close()  # drop the connection: the body is never read
                raise _Failure("opted_out", f"X-Robots-Tag: {', '.join(sorted(found))}", resp.status)
        if resp.content_length is not None and resp.content_length > cfg.max_bytes:
            resp.close()
            raise _Failure("too_large", f"Content-Length {resp.content_length} > {cfg.max_bytes} bytes",
                           resp.status)
        media_type = await self._stream(resp, sink)
        body, path = sink.finish()
        return _Body(resp.status, media_type, body, path)

    async def _stream(self, resp: aiohttp.ClientResponse, sink) -> str:
        """Copy the body into ``sink`` under the byte cap; sniff as soon as the head is in."""
        cap = self.config.max_bytes
        head, size, media_type = b"", 0, None
        try:
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                size += len(chunk)
                if size > cap:
                    raise _Failure("too_large", f"body exceeds {cap} bytes", resp.status)
                if media_type is None:
                    head = (head + chunk)[:SNIFF_BYTES]
                    if len(head) >= SNIFF_BYTES:
                        media_type = self._media_type(head, resp.status)  # a page of HTML stops here
                sink.write(chunk)
        except aiohttp.ClientPayloadError as exc:
            raise _Failure("truncated", f"body ended after {size} bytes: {_cause(exc)}", resp.status) from None
        except _Failure:
            resp.close()
            raise
        return media_type or self._media_type(head, resp.status)

    def _media_type(self, head: bytes, status: int) -> str:
        media_type = sniff(head)
        if media_type is None or not media_type.startswith(self.config.media + "/"):
            what = media_type or ("an empty body" if not head else f"bytes starting {head[:24]!r}")
            raise _Failure("not_media", f"not an {self.config.media}: {what}", status)
        return media_type


# -- URL helpers and exception mapping -------------------------------------------------------------

def _parse_url(url) -> URL:
    if not isinstance(url, str) or not url.strip():
        raise _Failure("missing_url", f"no URL: {url!r}"[:200])
    try:
        parsed = URL(url.strip())
        parsed.raw_host  # noqa: B018 - IDNA encoding happens here and may fail
    except (ValueError, UnicodeError) as exc:
        raise _Failure("bad_url", f"cannot parse {url[:200]!r}: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise _Failure("bad_scheme", f"only http(s) URLs are fetched: {url[:200]!r}")
    if not parsed.raw_host:
        raise _Failure("bad_url", f"no host in {url[:200]!r}")
    return parsed


def _join_location(base: URL, location: str) -> URL:
    try:
        return base.join(URL(location.strip()))
    except (ValueError, UnicodeError) as exc:
        raise _Failure("bad_url", f"bad redirect Location {location[:200]!r}: {exc}") from None


def _visit_key(url: URL) -> str:
    return str(url.with_fragment(None))


def _redirect_target(current: URL, target: URL, visited: set[str]) -> URL:
    """Check a redirect hop before following it: scheme, host, loop."""
    if target.scheme not in ("http", "https"):
        raise _Failure("forbidden_scheme", f"redirect from {current} to {str(target)[:200]}")
    if not target.raw_host:
        raise _Failure("bad_url", f"redirect to a URL without host: {str(target)[:200]}")
    key = _visit_key(target)
    if key in visited:
        raise _Failure("redirect_loop", f"redirect from {current} back to {key[:200]}")
    visited.add(key)
    return target


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    return f"{exc} ({inner})" if inner else str(exc) or type(exc).__name__


def _classify(exc: Exception) -> Optional[_Failure]:
    """The error kind of an exception raised by a request; None for anything else (a bug)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return _Failure("timeout", "timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ForbiddenAddress):
            return _Failure("forbidden_address", str(exc.os_error))
        if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(exc.os_error, socket.gaierror):
            return _Failure("dns", str(exc))
        return _Failure("connection", str(exc))
    if isinstance(exc, aiohttp.ClientPayloadError):
        return _Failure("truncated", _cause(exc))
    if isinstance(exc, aiohttp.InvalidURL):
        return _Failure("bad_url", str(exc))
    if isinstance(exc, (aiohttp.ClientError, OSError)):  # resets, bad status lines, oversized headers
        return _Failure("connection", f"{type(exc).__name__}: {exc}")
    return None


# -- many URLs -------------------------------------------------------------------------------------

async def fetch_many(urls: Iterable[str], config: Optional[FetchConfig] = None,
                     on_result: Optional[Callable[[int, FetchResult], None]] = None, *,
                     paths: Optional[Sequence[str]] = None, lookup: Optional[Lookup] = None) -> list[FetchResult]:
    """Fetch ``urls`` with ``config.concurrency`` in flight; results in input order.

    ``on_result(index, result)`` is called as each one finishes. With ``paths``, URL i is streamed to
    ``paths[i]`` (get_to_file) instead of kept in memory.
    """
    config = config or FetchConfig()
    urls = list(urls)
    results: list[Optional[FetchResult]] = [None] * len(urls)
    work = iter(enumerate(urls))

    async with Fetcher(config, lookup=lookup) as fetcher:
        async def worker() -> None:
            for i, url in work:  # one shared iterator: each worker takes the next URL when free
                got = await (fetcher.get(url) if paths is None else fetcher.get_to_file(url, paths[i]))
                results[i] = got
                if on_result is not None:
                    on_result(i, got)

        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, len(urls)))))
    return results  # type: ignore[return-value]


def fetch_all(urls: Iterable[str], config: Optional[FetchConfig] = None) -> list[FetchResult]:
    """Synchronous :func:`fetch_many`."""
    return asyncio.run(fetch_many(urls, config))

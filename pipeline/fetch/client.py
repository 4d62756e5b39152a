"""The HTTP client: :class:`Fetcher` (one aiohttp session, many requests in flight), its
configuration and results, and :func:`fetch_many` / :func:`fetch_all` over many URLs.

What one fetch does, and why, is in :mod:`pipeline.fetch`.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Optional, Sequence, Union

import aiohttp
from yarl import URL

from pipeline.core.schema import ErrorKind
from pipeline.fetch.address import ForbiddenAddress, Lookup, VettingResolver, normal_host, system_lookup
from pipeline.fetch.body import ACCEPT_ENCODING, CHUNK_BYTES, Decoder, FileSink, MemorySink, content_coding
from pipeline.fetch.failure import Failure
from pipeline.fetch.limits import ByteBudget, KeyedSlots, Lease, park
from pipeline.fetch.headers import DEFAULT_USER_AGENT, agent_tokens, optouts, retry_after_seconds
from pipeline.fetch.sniff import SNIFF_BYTES, sniff

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout as _timeout

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_AFTER_STATUSES = frozenset({429, 503})
RETRYABLE_KINDS = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.TRUNCATED})
ADDRESS_LIMIT_PER_HOST_LIMIT = 4  # per_address_limit None: this many host caps (a CDN address serves many sites)
DEFAULT_MAX_BYTES_IN_FLIGHT = 1 << 30


# -- configuration and result ----------------------------------------------------------------------

@dataclass
class FetchConfig:
    timeout: float = 10.0                  # seconds of network time per attempt (all hops + body)
    retries: int = 0                       # extra attempts after a retryable failure
    max_redirects: int = 5
    max_bytes: int = 50_000_000            # body cap
    concurrency: int = 256                 # requests in flight per Fetcher
    per_host_limit: int = 16               # requests in flight to one host (its normalised name)
    per_address_limit: Optional[int] = None  # requests in flight to one IP address, over all its names;
                                             # None: ADDRESS_LIMIT_PER_HOST_LIMIT x per_host_limit
    user_agent: str = DEFAULT_USER_AGENT
    respect_optouts: bool = True
    allow_private_addresses: bool = False
    allowed_networks: tuple[str, ...] = ()  # networks allowed even when private (tests: "127.0.0.0/8")
    media: Literal["image", "video"] = "image"
    backoff_base: float = 0.5              # first retry waits about this long, then doubles
    max_retry_wait: float = 60.0           # cap on one backoff / Retry-After wait
    sample_deadline: Optional[float] = None  # per URL: network time + retry waits, all attempts; None: unbounded
    # Bytes of bodies in memory at once (get_to_file's are on disk); None: unbounded.
    max_bytes_in_flight: Optional[int] = DEFAULT_MAX_BYTES_IN_FLIGHT

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
    # get(hold_body=True): the body's share of the byte budget, until release()
    _lease: Optional["Lease"] = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Give the body's bytes back to the byte budget (after get(hold_body=True)); idempotent."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None



class _Clock:
    """The network time left to one attempt; only time spent holding a slot is charged, and not
    the time :meth:`paused` (waiting for the byte budget)."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds

    async def __aenter__(self) -> None:
        if self.left <= 0:
            raise Failure(ErrorKind.TIMEOUT, "no time left for this request")
        self._start = time.monotonic()
        self._timeout = _timeout(self.left)
        await self._timeout.__aenter__()

    async def __aexit__(self, *exc) -> Optional[bool]:
        self.left -= time.monotonic() - self._start
        return await self._timeout.__aexit__(*exc)

    @contextlib.asynccontextmanager
    async def paused(self):
        """Inside an entered clock: the time spent here is not charged and cannot time out."""
        loop = asyncio.get_running_loop()
        deadline = self._timeout.when() if hasattr(self._timeout, "when") else self._timeout.deadline  # async-timeout
        remaining = deadline - loop.time()
        self._timeout.reschedule(None)
        started = time.monotonic()
        try:
            yield
        finally:
            waited = time.monotonic() - started
            self._start += waited
            self._timeout.reschedule(loop.time() + remaining)


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
    lease: Optional[Lease] = None


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
            connector=connector, headers={"User-Agent": cfg.user_agent, "Accept-Encoding": ACCEPT_ENCODING},
            auto_decompress=False,  # ours: Decoder (a wrong label, a bomb, a corrupt stream)
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),  # ours: _Clock
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        self._slots, self._lookups = asyncio.Semaphore(cfg.concurrency), asyncio.Semaphore(cfg.concurrency)
        self._hosts = KeyedSlots(cfg.per_host_limit)
        self._addresses = KeyedSlots(cfg.per_address_limit or ADDRESS_LIMIT_PER_HOST_LIMIT * cfg.per_host_limit)
        self.memory = ByteBudget(cfg.max_bytes_in_flight)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._dns_pool is not None:
            self._dns_pool.shutdown(wait=False, cancel_futures=True)  # a hung getaddrinfo must not block exit
            self._dns_pool = None

    async def get(self, url: str, *, slot: Optional[asyncio.Semaphore] = None,
                  hold_body: bool = False) -> FetchResult:
        """Fetch ``url`` into memory (images).

        ``slot``: a semaphore the caller holds for this URL; it is released while the fetch waits
        to retry (Retry-After, backoff) and held again for the next attempt, so a parked URL does
        not keep others waiting. ``hold_body``: the body keeps its share of the byte budget until
        ``result.release()`` (while the caller still holds the bytes, e.g. until resized).
        """
        result = await self._fetch(url, MemorySink, slot)
        if not hold_body:
            result.release()
        return result

    async def get_to_file(self, url: str, path: str, *, slot: Optional[asyncio.Semaphore] = None) -> FetchResult:
        """Stream ``url`` to ``path`` (videos); the body is never whole in memory, no partial file on failure."""
        return await self._fetch(url, lambda: FileSink(path), slot)

    # One URL: attempts, waits between them (parked: no slot held).
    async def _fetch(self, url: str, new_sink: Callable, slot: Optional[asyncio.Semaphore]) -> FetchResult:
        if self._session is None:
            raise RuntimeError("use Fetcher inside 'async with'")
        cfg = self.config
        left = cfg.sample_deadline  # network time and waits; None: unbounded
        attempt = 0
        while True:
            attempt += 1
            clock = _Clock(cfg.timeout if left is None else min(cfg.timeout, left))
            budget = clock.left
            result, failure = await self._attempt(url, new_sink(), clock)
            result.attempts = attempt
            if left is not None:
                left -= budget - clock.left
            wait = None if failure is None or attempt > cfg.retries else self._retry_wait(failure, attempt)
            if wait is None or (left is not None and wait >= left):
                return result
            if left is not None:
                left -= wait
            await park(slot, wait)

    def _retry_wait(self, failure: Failure, attempt: int) -> Optional[float]:
        """Seconds to wait before retrying, or None if the failure is not worth a retry."""
        status = failure.http_status
        if failure.kind not in RETRYABLE_KINDS and not (
                failure.kind == ErrorKind.HTTP_STATUS and status is not None and (status == 429 or status >= 500)):
            return None
        if failure.retry_after is not None:
            return min(failure.retry_after, self.config.max_retry_wait)
        backoff = self.config.backoff_base * 2 ** (attempt - 1)
        return min(backoff, self.config.max_retry_wait) * random.uniform(0.5, 1.0)  # jitter spreads a herd

    async def _attempt(self, url: str, sink, clock: _Clock) -> tuple[FetchResult, Optional[Failure]]:
        current: Optional[URL] = None
        budget = clock.left
        try:
            current = _parse_url(url)
            visited = {_visit_key(current)}
            for _ in range(self.config.max_redirects + 1):
                outcome = await self._hop(current, sink, clock)
                if isinstance(outcome, _Body):
                    return FetchResult(url=url, ok=True, body=outcome.body, path=outcome.path,
                                       media_type=outcome.media_type, final_url=str(current),
                                       http_status=outcome.status, _lease=outcome.lease), None
                current = _redirect_target(current, outcome.target, visited)
            raise Failure(ErrorKind.TOO_MANY_REDIRECTS, f"more than {self.config.max_redirects} redirects")
        except Failure as failure:
            return self._failed(url, current, sink, failure)
        except (asyncio.TimeoutError, TimeoutError):
            return self._failed(url, current, sink,
                                Failure(ErrorKind.TIMEOUT, f"no complete response in {budget:.3g} s"))
        except Exception as exc:  # noqa: BLE001 - only the exceptions a network request can raise
            failure = _classify(exc)
            if failure is None:
                sink.discard()
                raise
            return self._failed(url, current, sink, failure)

    @staticmethod
    def _failed(url: str, current: Optional[URL], sink, failure: Failure) -> tuple[FetchResult, Failure]:
        sink.discard()
        return FetchResult(url=url, ok=False, final_url=None if current is None else str(current),
                           error_kind=failure.kind, error_message=failure.message[:500],
                           http_status=failure.http_status), failure

    # One request: vet the destination, then connect, headers, body, all on the attempt's clock.
    async def _hop(self, url: URL, sink, clock: _Clock) -> Union[_Redirect, _Body]:
        # Slots are taken host, then address, then global: a request queued behind a busy host or
        # address holds no global slot. The host is its normalised name ("Cap.Test." is
        # "cap.test"); the address is the first vetted one, where the connector connects first,
        # so the many names of one server share its cap too.
        async with self._hosts.hold(normal_host(url.raw_host)):
            async with self._lookups, clock:  # at most `concurrency` lookups; queueing is not charged
                addresses = await self._vetted(url.raw_host)
            async with self._addresses.hold(addresses[0]), self._slots, clock:
                async with self._session.get(url, allow_redirects=False) as resp:
                    return await self._response(resp, sink, clock)

    async def _vetted(self, host: str) -> list[str]:
        try:
            return await self.resolver.addresses(host)
        except ForbiddenAddress as exc:
            raise Failure(ErrorKind.FORBIDDEN_ADDRESS, str(exc)) from None
        except OSError as exc:
            raise Failure(ErrorKind.DNS, f"cannot resolve {host}: {exc}") from None

    async def _response(self, resp: aiohttp.ClientResponse, sink, clock: _Clock) -> Union[_Redirect, _Body]:
        cfg = self.config
        if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
            return _Redirect(_join_location(resp.url, resp.headers["Location"]))
        if not 200 <= resp.status < 300:
            retry_after = (retry_after_seconds(resp.headers.get("Retry-After"))
                           if resp.status in RETRY_AFTER_STATUSES else None)
            raise Failure(ErrorKind.HTTP_STATUS, f"HTTP {resp.status} {resp.reason or ''}".strip(), resp.status,
                           retry_after)
        if cfg.respect_optouts:
            found = optouts(resp.headers.getall("X-Robots-Tag", ()), self._agent)
            if found:
                resp.close()  # drop the connection: the body is never read
                raise Failure(ErrorKind.OPTED_OUT, f"X-Robots-Tag: {', '.join(sorted(found))}", resp.status)
        declared = resp.content_length
        if declared is not None and declared > cfg.max_bytes:
            resp.close()
            raise Failure(ErrorKind.TOO_LARGE, f"Content-Length {declared} > {cfg.max_bytes} bytes", resp.status)
        decoder = Decoder(content_coding(resp.headers.get("Content-Encoding", "")))
        lease = await self._lease(resp, sink, clock, declared if decoder.coding == "" else None)
        try:
            media_type = await self._stream(resp, sink, decoder, lease)
            body, path = sink.finish()
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        return _Body(resp.status, media_type, body, path, lease)

    async def _lease(self, resp: aiohttp.ClientResponse, sink, clock: _Clock,
                     size: Optional[int]) -> Optional[Lease]:
        """The body's share of the byte budget (memory bodies only): ``size`` (an identity body's
        Content-Length) or the byte cap. Waiting for it is not charged to the attempt's clock."""
        limit = self.config.max_bytes_in_flight
        if not sink.in_memory:
            return None
        if size is not None and limit is not None and size > limit:
            resp.close()
            raise Failure(ErrorKind.TOO_LARGE, f"Content-Length {size} > max_bytes_in_flight {limit} bytes",
                           resp.status)
        async with clock.paused():
            return await self.memory.lease(self.config.max_bytes if size is None else size)

    async def _stream(self, resp: aiohttp.ClientResponse, sink, decoder: Decoder, lease: Optional[Lease]) -> str:
        """Copy the decoded body into ``sink`` under the byte cap and the budget; sniff as soon as
        the head is in."""
        cap = self.config.max_bytes
        head, size, received, media_type = b"", 0, 0, None

        def take(piece: bytes) -> None:
            nonlocal head, size, media_type
            size += len(piece)
            if size > cap:
                raise Failure(ErrorKind.TOO_LARGE, f"body exceeds {cap} bytes", resp.status)
            if lease is not None:
                lease.take(len(piece))
            if media_type is None:
                head = (head + piece)[:SNIFF_BYTES]
                if len(head) >= SNIFF_BYTES:
                    media_type = self._media_type(head, resp.status, decoder)  # a page of HTML stops here
            sink.write(piece)

        try:
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                received += len(chunk)
                for piece in decoder.feed(chunk):
                    take(piece)
            for piece in decoder.finish():
                take(piece)
        except aiohttp.ClientPayloadError as exc:
            raise Failure(ErrorKind.TRUNCATED, f"body ended after {received} bytes: {_cause(exc)}",
                           resp.status) from None
        except Failure as failure:
            resp.close()
            failure.http_status = failure.http_status or resp.status
            raise
        return media_type or self._media_type(head, resp.status, decoder)

    def _media_type(self, head: bytes, status: int, decoder: Decoder) -> str:
        media_type = sniff(head)
        if media_type is None or not media_type.startswith(self.config.media + "/"):
            what = media_type or ("an empty body" if not head else f"bytes starting {head[:24]!r}")
            if decoder.passes_through:
                what += f" (Content-Encoding {decoder.coding!r} is not decoded)"
            raise Failure(ErrorKind.NOT_MEDIA, f"not an {self.config.media}: {what}", status)
        return media_type


# -- URL helpers and exception mapping -------------------------------------------------------------

def _parse_url(url) -> URL:
    if not isinstance(url, str) or not url.strip():
        raise Failure(ErrorKind.MISSING_URL, f"no URL: {url!r}"[:200])
    try:
        parsed = URL(url.strip())
        parsed.raw_host  # noqa: B018 - IDNA encoding happens here and may fail
    except (ValueError, UnicodeError) as exc:
        raise Failure(ErrorKind.BAD_URL, f"cannot parse {url[:200]!r}: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise Failure(ErrorKind.BAD_SCHEME, f"only http(s) URLs are fetched: {url[:200]!r}")
    _check_destination(parsed, f"in {url[:200]!r}")
    return parsed


def _check_destination(url: URL, where: str) -> None:
    """A host that can be resolved and a port that can be connected to, else bad_url: what
    getaddrinfo, the IDNA codec or the connector would raise on, refused before any of them."""
    if not url.raw_host:
        raise Failure(ErrorKind.BAD_URL, f"no host {where}")
    try:
        normal_host(url.raw_host)
    except ValueError as exc:
        raise Failure(ErrorKind.BAD_URL, f"{exc} ({where})") from None
    if url.port == 0:
        raise Failure(ErrorKind.BAD_URL, f"port 0 {where}")
    try:  # user:password go out as Basic auth, which aiohttp encodes as latin-1
        f"{url.user or ''}:{url.password or ''}".encode("latin-1")
    except UnicodeEncodeError:
        raise Failure(ErrorKind.BAD_URL, f"user or password not latin-1 {where}") from None


def _join_location(base: URL, location: str) -> URL:
    try:
        return base.join(URL(location.strip()))
    except (ValueError, UnicodeError) as exc:
        raise Failure(ErrorKind.BAD_URL, f"bad redirect Location {location[:200]!r}: {exc}") from None


def _visit_key(url: URL) -> str:
    return str(url.with_fragment(None))


def _redirect_target(current: URL, target: URL, visited: set[str]) -> URL:
    """Check a redirect hop before following it: scheme, host, loop."""
    if target.scheme not in ("http", "https"):
        raise Failure(ErrorKind.FORBIDDEN_SCHEME, f"redirect from {current} to {str(target)[:200]}")
    _check_destination(target, f"in the redirect from {current} to {str(target)[:200]}")
    key = _visit_key(target)
    if key in visited:
        raise Failure(ErrorKind.REDIRECT_LOOP, f"redirect from {current} back to {key[:200]}")
    visited.add(key)
    return target


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    return f"{exc} ({inner})" if inner else str(exc) or type(exc).__name__


def _classify(exc: Exception) -> Optional[Failure]:
    """The error kind of an exception raised by a request; None for anything else (a bug)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Failure(ErrorKind.TIMEOUT, "timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ForbiddenAddress):
            return Failure(ErrorKind.FORBIDDEN_ADDRESS, str(exc.os_error))
        if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(exc.os_error, socket.gaierror):
            return Failure(ErrorKind.DNS, str(exc))
        return Failure(ErrorKind.CONNECTION, str(exc))
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Failure(ErrorKind.TRUNCATED, _cause(exc))
    if isinstance(exc, aiohttp.InvalidURL):
        return Failure(ErrorKind.BAD_URL, str(exc))
    if isinstance(exc, (aiohttp.ClientError, OSError)):  # resets, bad status lines, oversized headers
        return Failure(ErrorKind.CONNECTION, f"{type(exc).__name__}: {exc}")
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
    # A slot per URL being fetched, given up while it waits to retry: a URL parked on Retry-After
    # lets the next one start.
    slots = asyncio.Semaphore(config.concurrency)

    async with Fetcher(config, lookup=lookup) as fetcher:
        async def one(i: int, url: str) -> None:
            try:
                got = await (fetcher.get(url, slot=slots) if paths is None
                             else fetcher.get_to_file(url, paths[i], slot=slots))
            finally:
                slots.release()
            results[i] = got
            if on_result is not None:
                on_result(i, got)

        tasks = []
        for i, url in enumerate(urls):
            await slots.acquire()
            tasks.append(asyncio.ensure_future(one(i, url)))
        await asyncio.gather(*tasks)
    return results  # type: ignore[return-value]


def fetch_all(urls: Iterable[str], config: Optional[FetchConfig] = None) -> list[FetchResult]:
    """Synchronous :func:`fetch_many`."""
    return asyncio.run(fetch_many(urls, config))

"""The HTTP client: :class:`Fetcher` (one aiohttp session, many requests in flight), its
configuration and results, and :func:`fetch_many` / :func:`fetch_all` over many URLs.

What one fetch does, and why, is in :mod:`pipeline.fetch`.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional, Sequence, Union

import aiohttp
from yarl import URL

from pipeline.core.schema import ErrorKind, error_kind
from pipeline.fetch.address import ForbiddenAddress, Lookup, VettingResolver, system_lookup
from pipeline.fetch.headers import DEFAULT_USER_AGENT, agent_tokens, optouts, retry_after_seconds
from pipeline.fetch.sniff import SNIFF_BYTES, sniff

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout as _timeout

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_AFTER_STATUSES = frozenset({429, 503})
RETRYABLE_KINDS = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.TRUNCATED})
CHUNK_BYTES = 1 << 16


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

    def __init__(self, kind: ErrorKind, message: str, http_status: Optional[int] = None,
                 retry_after: Optional[float] = None):
        error_kind(kind)  # a kind outside the schema is a bug here
        super().__init__(message)
        self.kind, self.message, self.http_status, self.retry_after = kind, message, http_status, retry_after


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
            raise _Failure(ErrorKind.TIMEOUT, "no time left for this request")
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
                failure.kind == ErrorKind.HTTP_STATUS and status is not None and (status == 429 or status >= 500)):
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
            raise _Failure(ErrorKind.TOO_MANY_REDIRECTS, f"more than {self.config.max_redirects} redirects")
        except _Failure as failure:
            return self._failed(url, current, sink, failure)
        except (asyncio.TimeoutError, TimeoutError):
            return self._failed(url, current, sink,
                                _Failure(ErrorKind.TIMEOUT, f"no complete response in {budget:.3g} s"))
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
                raise _Failure(ErrorKind.FORBIDDEN_ADDRESS, str(exc)) from None
            except OSError as exc:
                raise _Failure(ErrorKind.DNS, f"cannot resolve {url.raw_host}: {exc}") from None
            async with self._session.get(url, allow_redirects=False) as resp:
                return await self._response(resp, sink)

    async def _response(self, resp: aiohttp.ClientResponse, sink) -> Union[_Redirect, _Body]:
        cfg = self.config
        if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
            return _Redirect(_join_location(resp.url, resp.headers["Location"]))
        if not 200 <= resp.status < 300:
            retry_after = (retry_after_seconds(resp.headers.get("Retry-After"))
                           if resp.status in RETRY_AFTER_STATUSES else None)
            raise _Failure(ErrorKind.HTTP_STATUS, f"HTTP {resp.status} {resp.reason or ''}".strip(), resp.status,
                           retry_after)
        if cfg.respect_optouts:
            found = optouts(resp.headers.getall("X-Robots-Tag", ()), self._agent)
            if found:
                resp.close()  # drop the connection: the body is never read
                raise _Failure(ErrorKind.OPTED_OUT, f"X-Robots-Tag: {', '.join(sorted(found))}", resp.status)
        if resp.content_length is not None and resp.content_length > cfg.max_bytes:
            resp.close()
            raise _Failure(ErrorKind.TOO_LARGE, f"Content-Length {resp.content_length} > {cfg.max_bytes} bytes",
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
                    raise _Failure(ErrorKind.TOO_LARGE, f"body exceeds {cap} bytes", resp.status)
                if media_type is None:
                    head = (head + chunk)[:SNIFF_BYTES]
                    if len(head) >= SNIFF_BYTES:
                        media_type = self._media_type(head, resp.status)  # a page of HTML stops here
                sink.write(chunk)
        except aiohttp.ClientPayloadError as exc:
            raise _Failure(ErrorKind.TRUNCATED, f"body ended after {size} bytes: {_cause(exc)}",
                           resp.status) from None
        except _Failure:
            resp.close()
            raise
        return media_type or self._media_type(head, resp.status)

    def _media_type(self, head: bytes, status: int) -> str:
        media_type = sniff(head)
        if media_type is None or not media_type.startswith(self.config.media + "/"):
            what = media_type or ("an empty body" if not head else f"bytes starting {head[:24]!r}")
            raise _Failure(ErrorKind.NOT_MEDIA, f"not an {self.config.media}: {what}", status)
        return media_type


# -- URL helpers and exception mapping -------------------------------------------------------------

def _parse_url(url) -> URL:
    if not isinstance(url, str) or not url.strip():
        raise _Failure(ErrorKind.MISSING_URL, f"no URL: {url!r}"[:200])
    try:
        parsed = URL(url.strip())
        parsed.raw_host  # noqa: B018 - IDNA encoding happens here and may fail
    except (ValueError, UnicodeError) as exc:
        raise _Failure(ErrorKind.BAD_URL, f"cannot parse {url[:200]!r}: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise _Failure(ErrorKind.BAD_SCHEME, f"only http(s) URLs are fetched: {url[:200]!r}")
    if not parsed.raw_host:
        raise _Failure(ErrorKind.BAD_URL, f"no host in {url[:200]!r}")
    return parsed


def _join_location(base: URL, location: str) -> URL:
    try:
        return base.join(URL(location.strip()))
    except (ValueError, UnicodeError) as exc:
        raise _Failure(ErrorKind.BAD_URL, f"bad redirect Location {location[:200]!r}: {exc}") from None


def _visit_key(url: URL) -> str:
    return str(url.with_fragment(None))


def _redirect_target(current: URL, target: URL, visited: set[str]) -> URL:
    """Check a redirect hop before following it: scheme, host, loop."""
    if target.scheme not in ("http", "https"):
        raise _Failure(ErrorKind.FORBIDDEN_SCHEME, f"redirect from {current} to {str(target)[:200]}")
    if not target.raw_host:
        raise _Failure(ErrorKind.BAD_URL, f"redirect to a URL without host: {str(target)[:200]}")
    key = _visit_key(target)
    if key in visited:
        raise _Failure(ErrorKind.REDIRECT_LOOP, f"redirect from {current} back to {key[:200]}")
    visited.add(key)
    return target


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    return f"{exc} ({inner})" if inner else str(exc) or type(exc).__name__


def _classify(exc: Exception) -> Optional[_Failure]:
    """The error kind of an exception raised by a request; None for anything else (a bug)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return _Failure(ErrorKind.TIMEOUT, "timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ForbiddenAddress):
            return _Failure(ErrorKind.FORBIDDEN_ADDRESS, str(exc.os_error))
        if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(exc.os_error, socket.gaierror):
            return _Failure(ErrorKind.DNS, str(exc))
        return _Failure(ErrorKind.CONNECTION, str(exc))
    if isinstance(exc, aiohttp.ClientPayloadError):
        return _Failure(ErrorKind.TRUNCATED, _cause(exc))
    if isinstance(exc, aiohttp.InvalidURL):
        return _Failure(ErrorKind.BAD_URL, str(exc))
    if isinstance(exc, (aiohttp.ClientError, OSError)):  # resets, bad status lines, oversized headers
        return _Failure(ErrorKind.CONNECTION, f"{type(exc).__name__}: {exc}")
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

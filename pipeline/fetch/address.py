"""The address policy (which IP addresses may be contacted) and the vetting resolver that applies it
to every host name before any connection."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Optional, Sequence, Union

from aiohttp.abc import AbstractResolver, ResolveResult

Lookup = Callable[[str], Awaitable[list[str]]]  # host name -> IP addresses


class ForbiddenAddress(OSError):
    """A host resolved to an address the policy refuses (an OSError so aiohttp wraps it as such)."""


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

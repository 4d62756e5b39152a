"""The address policy (which IP addresses may be contacted: :data:`SPECIAL_NETWORKS`), the one
spelling of a host name (:func:`normal_host`, which also refuses names DNS cannot hold), and the
vetting resolver that applies the policy to every host name before any connection."""
from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Optional, Sequence, Union

from aiohttp.abc import AbstractResolver, ResolveResult

Lookup = Callable[[str], Awaitable[list[str]]]  # host name -> IP addresses


class ForbiddenAddress(OSError):
    """A host resolved to an address the policy refuses (an OSError so aiohttp wraps it as such)."""


# -- address policy and the vetting resolver -------------------------------------------------------

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_net = ipaddress.ip_network

# Every network a fetch refuses, with the reason reported: the IANA IPv4 and IPv6 Special-Purpose
# Address Registries (RFC 6890 and successors) plus the deprecated site-local block. The few
# globally reachable anycast service addresses inside 192.0.0.0/24 and 2001::/23 (PCP, TURN, AMT,
# AS112-v6) are refused with their block: they are never web servers. Checked in order, so a
# specific row comes before the block that contains it. IPv6 spellings of an IPv4 address
# (IPv4-mapped, 6to4, NAT64 64:ff9b::/96) are judged by the IPv4 address they reach, and every IPv6
# address outside 2000::/3 (the only block allocated for global unicast) is refused as reserved.
SPECIAL_NETWORKS: tuple[tuple[Union[ipaddress.IPv4Network, ipaddress.IPv6Network], str], ...] = tuple(
    (_net(cidr), reason) for cidr, reason in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "this network"),                       # RFC 791
        ("10.0.0.0/8", "private"),                           # RFC 1918
        ("100.64.0.0/10", "not globally routable"),          # shared address space, carrier NAT (RFC 6598)
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),                    # cloud metadata 169.254.169.254
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignment"),        # DS-Lite, NAT64 discovery, PCP/TURN anycast
        ("192.0.2.0/24", "documentation"),                   # TEST-NET-1
        ("192.88.99.0/24", "reserved"),                      # 6to4 relay anycast, deprecated (RFC 7526)
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),                   # RFC 2544
        ("198.51.100.0/24", "documentation"),                # TEST-NET-2
        ("203.0.113.0/24", "documentation"),                 # TEST-NET-3
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "reserved"),                  # limited broadcast
        ("240.0.0.0/4", "reserved"),                         # former class E
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "not globally routable"),         # local-use IPv4/IPv6 translation (RFC 8215)
        ("100::/64", "reserved"),                            # discard-only (RFC 6666)
        ("100:0:0:1::/64", "reserved"),                      # dummy prefix (RFC 9780)
        ("2001::/32", "Teredo tunnel"),                      # its embedded IPv4 addresses are unvetted
        ("2001:2::/48", "benchmarking"),                     # RFC 5180
        ("2001::/23", "IETF protocol assignment"),           # ORCHID, AMT, AS112-v6, anycast services
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),                      # RFC 9637
        ("5f00::/16", "not globally routable"),              # SRv6 SIDs (RFC 9602)
        ("fc00::/7", "private"),                             # unique local
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),                         # deprecated (RFC 3879), still routed on some LANs
        ("ff00::/8", "multicast"),
    ))
_GLOBAL_UNICAST_V6 = _net("2000::/3")
_NAT64 = _net("64:ff9b::/96")


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
    """Why ``address`` is refused (a reason of :data:`SPECIAL_NETWORKS`, or "reserved"), or None if
    it may be contacted.

    ``allowed_networks`` (ip_network objects or strings) are accepted even when special; they match
    the address as written or the IPv4 address it reaches.
    """
    written = ipaddress.ip_address(address.partition("%")[0])
    ip = _reached_address(written)
    for net in allowed_networks:
        net = ipaddress.ip_network(net, strict=False)
        if ip in net or written in net:
            return None
    for net, reason in SPECIAL_NETWORKS:
        if ip in net:
            return reason
    if ip.version == 6 and ip not in _GLOBAL_UNICAST_V6:
        return "reserved"  # unallocated, or deprecated forms such as IPv4-compatible ::a.b.c.d
    return None


_HOST_LABEL = re.compile(r"[a-z0-9_-]+")  # letters, digits, hyphen (underscore: seen in real names)


def normal_host(host: str) -> str:
    """The one spelling of a URL's host: an IP literal in its compressed form, else the name in
    lower case, IDNA-encoded, without its trailing dot ("Cap.Test." and "cap.test" are one host).

    Raises ValueError naming the host when it cannot be a DNS name: an empty label ("a..b"), a label
    over 63 or a name over 253 characters, a character outside letters, digits, "-" and "_".
    """
    literal = _ip_literal(host)
    if literal is not None:
        return literal
    name = host.lower()
    name = name[:-1] if name.endswith(".") else name
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError as exc:
        raise ValueError(f"host {host[:100]!r} is not a valid name: {exc}") from None
    problem = _name_problem(name)
    if problem:
        raise ValueError(f"host {host[:100]!r} is not a valid name: {problem}")
    return name


def _name_problem(name: str) -> Optional[str]:
    if not name:
        return "it is empty"
    if len(name) > 253:
        return f"{len(name)} characters, over 253"
    for label in name.split("."):
        if not label:
            return "an empty label"
        if len(label) > 63:
            return f"a label of {len(label)} characters, over 63"
        if not _HOST_LABEL.fullmatch(label):
            return f"label {label[:30]!r} has a character other than letters, digits, '-' and '_'"
    return None


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
        try:
            infos = await loop.run_in_executor(pool, socket.getaddrinfo, host, None, 0, socket.SOCK_STREAM)
        except (UnicodeError, ValueError) as exc:  # the idna codec, an embedded NUL: not a resolvable name
            raise socket.gaierror(socket.EAI_NONAME, f"{host[:100]!r} is not a host name: {exc}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    return lookup

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
from pipeline.fetch.address import ForbiddenAddress, IPAddress, Lookup, VettingResolver, address_problem, system_lookup
from pipeline.fetch.client import FetchConfig, Fetcher, FetchResult, fetch_all, fetch_many
from pipeline.fetch.headers import DEFAULT_USER_AGENT, agent_tokens, optouts, retry_after_seconds
from pipeline.fetch.sniff import SNIFF_BYTES, sniff

__all__ = [
    "Fetcher", "FetchConfig", "FetchResult", "fetch_many", "fetch_all",
    "ForbiddenAddress", "VettingResolver", "address_problem", "system_lookup", "Lookup", "IPAddress",
    "optouts", "agent_tokens", "retry_after_seconds", "DEFAULT_USER_AGENT",
    "sniff", "SNIFF_BYTES",
]

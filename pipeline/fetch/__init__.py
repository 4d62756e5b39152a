"""The async HTTP client for media: many requests in flight, safe by default, hostile input expected.

Every URL ends in a :class:`FetchResult`; a per-URL problem never raises. Its ``error_kind`` is one
of :class:`pipeline.core.schema.ErrorKind`.

What one fetch does, and why:

* URLs and redirect targets are checked before any lookup: a host that cannot be a DNS name (an
  empty label as in ``a..example``, a label over 63 characters, a character outside letters,
  digits, ``-``, ``_``) or port 0 is ``bad_url``, whether in the first URL or a ``Location``.
* Redirects are followed by hand (at most ``max_redirects``) so that every hop is checked again:
  scheme (http/https only), loops, and the destination address.
* Address safety: the host is resolved here and *every* address is vetted against
  :data:`~pipeline.fetch.address.SPECIAL_NETWORKS` (the IANA special-purpose registries: private,
  loopback, link-local such as 169.254.169.254, shared, benchmarking, documentation, multicast,
  reserved, site-local, Teredo, ...; IPv4-mapped / 6to4 / NAT64 spellings judged by the IPv4 address
  they reach) before any connection. The connector's resolver is the same vetting resolver, so a
  connection only ever goes to an address that passed the check (no DNS-rebinding window).
* ``timeout`` bounds the network time of one attempt: DNS, connect, headers and body over all
  hops. Time spent queued for a slot (or for the byte budget) is not counted, so a long per-host
  queue does not turn into timeouts.
* Caps: ``concurrency`` requests in flight, ``per_host_limit`` per host (keyed on the normalised
  name: lower case, IDNA, no trailing dot), ``per_address_limit`` per resolved IP address (several
  names of one server share it), and ``max_bytes_in_flight`` bytes of in-memory bodies: each body
  reserves its Content-Length (or ``max_bytes`` when not known or encoded) before it is read, so
  readers never wait on each other midway; a body larger than the whole budget is ``too_large``.
* Retries (``retries``) with exponential backoff on connection errors, timeouts, truncated bodies,
  429 and 5xx; ``Retry-After`` (seconds or HTTP-date; a malformed value is ignored) is honoured
  for 429/503, capped to ``max_retry_wait`` and to what is left of ``sample_deadline`` (network
  time plus waits, over all attempts). A URL waiting to retry holds no slot (nor the caller's,
  passed as ``slot``), so a host answering 429 does not hold up the others.
* X-Robots-Tag opt-outs are read from the headers; an opted-out body is never read.
* Content-Encoding gzip and deflate are undone here, under the byte cap (a gzip bomb is
  ``too_large``, never inflated whole). A body labelled gzip/deflate that does not start with that
  coding's header is taken as identity (a mislabelled image is still an image); one that starts
  with it but does not inflate is ``bad_encoding``.
* The body is streamed under a byte cap, checked against Content-Length (truncation), and its
  media type is sniffed from the bytes (never from Content-Type) as soon as the head arrives.
"""
from pipeline.fetch.address import (SPECIAL_NETWORKS, ForbiddenAddress, IPAddress, Lookup, VettingResolver,
                                    address_problem, normal_host, system_lookup)
from pipeline.fetch.client import DEFAULT_MAX_BYTES_IN_FLIGHT, FetchConfig, Fetcher, FetchResult, fetch_all, fetch_many
from pipeline.fetch.headers import DEFAULT_USER_AGENT, agent_tokens, optouts, retry_after_seconds
from pipeline.fetch.sniff import SNIFF_BYTES, sniff

__all__ = [
    "Fetcher", "FetchConfig", "FetchResult", "fetch_many", "fetch_all", "DEFAULT_MAX_BYTES_IN_FLIGHT",
    "ForbiddenAddress", "VettingResolver", "address_problem", "normal_host", "system_lookup", "Lookup", "IPAddress",
    "SPECIAL_NETWORKS",
    "optouts", "agent_tokens", "retry_after_seconds", "DEFAULT_USER_AGENT",
    "sniff", "SNIFF_BYTES",
]

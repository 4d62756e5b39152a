"""Issue 12, the HTTP side: hostile header values, host names and redirect targets end in a
per-URL failure (never an exception), the address policy follows the IANA special-purpose
registries, Content-Encoding is decoded by us, a sample waiting on Retry-After holds no slot, the
per-host cap is keyed on the normalised name and also applies per address, and bodies in flight
stay under a byte budget. Everything runs against the hostile server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import tracemalloc

import pytest

from helpers.hostile_server import fetch_config, hostile_server, media_samples
from pipeline.core import schema
from pipeline.download.image import ImageDownloadConfig, ImageDownloadStage
from pipeline.fetch import Fetcher, address_problem, fetch_all, fetch_many, retry_after_seconds
from pipeline.fetch import address as policy
from pipeline.media.resize import ResizeConfig


@pytest.fixture(scope="module")
def hostile():
    with hostile_server() as (server, cases):
        yield server, cases


def names_to_loopback(*names: str):
    """A lookup that maps ``names`` to 127.0.0.1 and fails every other name like NXDOMAIN."""
    async def lookup(host: str) -> list[str]:
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ["127.0.0.1"]
    return lookup


def pending_batch(urls: list[str]) -> dict[str, list]:
    n = len(urls)
    return {"key": [f"{i:09d}" for i in range(n)], "url": urls, "caption": [""] * n,
            "status": [schema.PENDING] * n, "error_kind": [None] * n, "error_message": [None] * n,
            "width": [None] * n, "height": [None] * n, "original_width": [None] * n,
            "original_height": [None] * n, "sha256": [None] * n, "files": [{} for _ in range(n)]}


def fetch_with(urls, config, lookup=None):
    return asyncio.run(fetch_many(urls, config, lookup=lookup))


# -- 1. header values from the network never raise --------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    ("7", 7.0), (" 7 ", 7.0), ("007", 7.0), ("0", 0.0),
    ("²", None), ("¹²", None), ("١٢", None), ("𝟗", None), ("٣", None), ("7²", None),  # isdigit(), not ASCII
    ("1.5", None), ("-1", None), ("+5", None), ("0x10", None), ("1e3", None), ("inf", None), ("nan", None),
    ("", None), (" ", None), ("\x00", None), ("soon", None), ("7 seconds", None),
    ("Wed, 21 Oct 99999 07:28:00 GMT", None), ("Wed, 21 Oct 2015 25:28:00 GMT", None),
    ("Wed, 21 Oct 2015 07:28:00 +9999", None), ("Fri, 31 Dec 9999 23:59:59 -2359", "large"),
    ("1" * 5000, "large"),
])
def test_retry_after_values_never_raise(value, seconds):
    got = retry_after_seconds(value)
    if seconds == "large":
        assert got > 1e9
    else:
        assert got == seconds


@pytest.mark.parametrize("after", ["²", "١٢", "1" * 5000, "Fri, 31 Dec 9999 23:59:59 -2359"])
def test_hostile_retry_after_is_a_retry_not_a_crash(hostile, after):
    server, _ = hostile
    key = f"hostile-ra-{len(after)}-{ord(after[0])}"
    got = fetch_all([server.retry_url(key, fails=1, after=after)], fetch_config(retries=1, max_retry_wait=0.05))[0]
    assert got.ok and got.attempts == 2 and server.state.attempts[key] == 2


def _response(*headers: bytes, status: bytes = b"200 OK", body: bytes = b"") -> bytes:
    body = body or media_samples()["ok_jpeg"]
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


@pytest.mark.parametrize("response, kind", [
    (_response(b"Content-Length: \xc2\xb2"), "connection"), (_response(b"Content-Length: -1"), "connection"),
    (_response(b"Content-Length: 99999999999999999999999999"), "connection"),
    (_response(b"Content-Length: 5", b"Content-Length: 6"), "connection"),
    (_response(b"Retry-After: \xff\xfe", status=b"429 Slow"), "http_status"),
    (_response(b"Retry-After: \xc2\xb2", status=b"503 Busy"), "http_status"),
    (_response(b"Retry-After: \xd9\xa1\xd9\xa2", status=b"429 Slow"), "http_status"),
    (_response(b"Location: http://\xff\xfe/", status=b"302 Found"), "bad_url"),
    (_response(b"Location: http://a..b/", status=b"301 Moved"), "bad_url"),
    (_response(b"Content-Encoding: \xff"), None), (_response(b"Content-Encoding: gzip, br"), None),
    (_response(b"Content-Encoding: x-gzip"), None), (_response(b"X-Robots-Tag: \xff: noai"), None),
    (_response(b"X-Robots-Tag: \xc2\xb2, noai"), "opted_out"), (_response(status=b"2x0 OK"), "connection"),
    (_response(status=b"999 What"), "http_status"), (_response(b"X-A: a\x00b"), "connection"),
    (_response(b"Transfer-Encoding: chunked", body=b"zz\r\nabc\r\n0\r\n\r\n"), "connection"),
])
def test_malformed_response_headers_end_in_a_kind(hostile, response, kind):
    server, _ = hostile
    got = fetch_all([server.raw_url(response)], fetch_config(retries=1, max_retry_wait=0.01))[0]
    assert got.error_kind == kind, got


# -- 2. hostile host names and redirect targets: bad_url, never an exception ------------------------

BAD_HOSTS = ["a..example", "." + "example", "example..", "a" * 64 + ".example", ("a" * 60 + ".") * 5 + "com",
             "ä..example", "xn--a..example"]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_bad_host_names_are_bad_urls(host, connections):
    got = fetch_all([f"http://{host}/x.jpg"], fetch_config())[0]
    assert got.error_kind == "bad_url" and not got.ok, got
    assert connections == []


@pytest.mark.parametrize("url", ["http://example.com:0/x", "http://example.com:65536/x", "http://[::1/x",
                                 "http://[zz::1]/x", "http://user@:80/x", "http://%zz/x"])
def test_bad_ports_and_literals_are_bad_urls(url, connections):
    got = fetch_all([url], fetch_config())[0]
    assert got.error_kind == "bad_url", got
    assert connections == []


@pytest.mark.parametrize("location", [f"http://{h}/x.jpg" for h in BAD_HOSTS] + [
    "http://127.0.0.1:0/x", "http://127.0.0.1:99999/x", "http://[::1/x", "//a..b/x", "http://a b/x", "http://a%00b/x"])
def test_bad_redirect_targets_are_bad_urls(hostile, location):
    server, _ = hostile
    got = fetch_all([server.redirect_to(location)], fetch_config())[0]
    assert got.error_kind == "bad_url" and not got.ok, (location, got)


@pytest.mark.parametrize("url, kind", [
    ("http://exa mple.test/x", "bad_url"), ("http://ex%41mple.test/x", "bad_url"), ("http://xn--zz.test/x", "dns"),
    ("http://user:pass@nowhere.test/x", "dns"), ("http://[fe80::1%25eth0]/x", "forbidden_address"),
    ("http://0x7f.1/x", "dns"), ("http://nowhere.test:/x", "dns"), ("HTTP://NOWHERE.TEST/x", "dns"),
    ("http://nowhere.test./x", "dns"), ("http://\u2024.test/x", "bad_url"), ("http://\udcff.test/x", "bad_url"),
])
def test_odd_urls_end_in_a_kind(url, kind, connections):
    got = fetch_with([url], fetch_config(), names_to_loopback())[0]
    assert got.error_kind == kind, (url, got)
    assert connections == []


def test_credentials_aiohttp_cannot_encode_are_bad_urls(connections):
    got = fetch_with(["http://\u4e2d:pw@u.test:9/x"], fetch_config(), names_to_loopback("u.test"))[0]
    assert got.error_kind == "bad_url" and "latin-1" in got.error_message, got
    assert connections == []


def test_random_urls_and_locations_end_in_a_kind(hostile):
    """A seeded fuzz of hosts, ports, schemes and Location values: every URL ends in a result."""
    server, _ = hostile
    rng = random.Random(12)
    alphabet = "aZ09.-_:@[]%/?#\\ \t\x7f\u00e9\u2024\u3002\uff0e\ufffd!$&'()*+,;=~^`{|}<>\"" + "xn--"

    def junk(n):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))

    urls = []
    for _ in range(150):
        urls += [f"http://{junk(20)}/{junk(10)}", f"http://a.test:{junk(6)}/x", f"{junk(5)}://{junk(15)}",
                 f"http://{junk(8)}.test:{server.port}/ok_jpeg?{junk(10)}",
                 server.redirect_to(rng.choice([f"http://{junk(15)}/", f"//{junk(15)}", junk(20),
                                                f"http://a.test:{junk(5)}/"]).replace("\t", ""))]

    async def anything_is_loopback(host):
        return ["127.0.0.1"]

    results = fetch_with(urls, fetch_config(timeout=1, concurrency=64), anything_is_loopback)
    assert len(results) == len(urls)
    assert all(r.ok or schema.error_kind(r.error_kind) for r in results)


# -- 3. the address policy: the IANA special-purpose registries, as one table -----------------------

@pytest.mark.parametrize("address", [
    "0.1.2.3", "100.64.0.1", "100.127.255.254", "192.0.0.8", "192.0.0.170", "192.0.2.1", "192.88.99.1",
    "198.18.0.1", "198.19.255.255", "198.51.100.7", "203.0.113.9", "240.0.0.1", "255.255.255.255",
    "239.255.255.250", "fec0::1", "feff::1", "fe80::1", "fc00::1", "fdff::1", "ff02::1", "::", "::1",
    "::10.0.0.1", "::8.8.8.8", "100::1", "2001::1", "2001:0:4136:e378:8000:63bf:f5ff:fffe", "2001:2::1",
    "2001:10::1", "2001:db8::1", "3fff::1", "5f00::1", "64:ff9b:1::8.8.8.8", "::ffff:192.168.1.1",
    "::ffff:100.64.0.1", "64:ff9b::10.0.0.1", "64:ff9b::198.18.0.1", "2002:0a00:0001::1", "2002:c000:0201::1",
    "4000::1", "::ffff:0:8.8.8.8",
])
def test_special_purpose_addresses_are_refused(address):
    assert address_problem(address) is not None, address


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "192.31.196.1", "192.175.48.1", "2606:4700:4700::1111",
    "2001:4860:4860::8888", "64:ff9b::8.8.8.8", "::ffff:8.8.8.8", "2002:0808:0808::1", "2620:4f:8000::1",
])
def test_public_addresses_are_allowed(address):
    assert address_problem(address) is None, address


def test_every_row_of_the_table_is_refused_at_both_ends():
    for network, reason in policy.SPECIAL_NETWORKS:
        assert reason and isinstance(reason, str)
        for ip in (network[0], network[-1]):
            if network.version == 6 and (ip.ipv4_mapped or ip.sixtofour or ip in ipaddress.ip_network("64:ff9b::/96")):
                continue  # these spell an IPv4 address: the IPv4 row decides
            assert address_problem(str(ip)) is not None, (network, ip)
    assert address_problem("fec0::1") == "site-local"
    assert address_problem("2001:db8::1") == address_problem("192.0.2.1") == "documentation"
    assert address_problem("198.18.0.1") == "benchmarking"


# -- 4. Content-Encoding --------------------------------------------------------------------------

def test_content_encoding_is_decoded_or_labelled(hostile):
    server, cases = hostile
    names = ["ok_gzip", "ok_deflate", "ok_gzip_mislabelled", "gzip_corrupt", "gzip_bomb"]
    tracemalloc.start()
    try:
        results = fetch_all([cases[n].url for n in names], fetch_config(max_bytes=2_000_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    got = {n: (r.error_kind, r.media_type) for n, r in zip(names, results)}
    assert got == {"ok_gzip": (None, "image/jpeg"), "ok_deflate": (None, "image/jpeg"),
                   "ok_gzip_mislabelled": (None, "image/jpeg"), "gzip_corrupt": ("bad_encoding", None),
                   "gzip_bomb": ("too_large", None)}
    assert peak < 16_000_000, peak  # the 32 MB bomb is stopped at the cap, not inflated whole
    media = media_samples()
    assert results[0].body == media["ok_jpeg_2"] and results[1].body == media["ok_jpeg_3"]
    assert results[2].body == media["ok_jpeg"]


# -- 5. a sample waiting on Retry-After holds no slot ----------------------------------------------

def _busy_then_free(server, tag: str, busy: int = 2, free: int = 6) -> list[str]:
    return ([server.retry_url(f"{tag}-busy{i}", fails=1, after="2", host="busy.test") for i in range(busy)]
            + [server.counted_url(f"{tag}-free", delay=0.01, host="free.test", n=i) for i in range(free)])


def _free_before_retries(server, tag: str) -> bool:
    """Whether every request to free.test arrived before any second attempt on busy.test."""
    log = [e for e in server.state.log if e[1].startswith(tag)]
    retries = [i for i, e in enumerate(log) if e[0] == "retry" and log[:i].count(e) == 1]  # second attempts
    frees = [i for i, e in enumerate(log) if e[0] == "counted"]
    return len(frees) == 6 and len(retries) == 2 and max(frees) < min(retries)


def test_a_parked_sample_frees_its_slot_in_fetch_many(hostile):
    server, _ = hostile
    config = fetch_config(concurrency=2, per_host_limit=2, retries=1, max_retry_wait=30)
    results = fetch_with(_busy_then_free(server, "many"), config, names_to_loopback("busy.test", "free.test"))
    assert all(r.ok for r in results) and [r.attempts for r in results[:2]] == [2, 2]
    assert _free_before_retries(server, "many"), server.state.log


def test_a_parked_sample_frees_its_slot_in_the_image_stage(hostile, monkeypatch):
    server, _ = hostile
    urls = _busy_then_free(server, "stage")
    batch = pending_batch(urls)
    config = ImageDownloadConfig(fetch=fetch_config(concurrency=2, per_host_limit=2, retries=1, max_retry_wait=30),
                                 resize=ResizeConfig(image_size=16))
    lookup = names_to_loopback("busy.test", "free.test")
    real_init = Fetcher.__init__
    monkeypatch.setattr(Fetcher, "__init__", lambda self, cfg=None, **kw: real_init(self, cfg, lookup=lookup))
    ImageDownloadStage(config).process(batch)
    assert batch["status"] == [schema.SUCCESS] * len(urls), batch["error_message"]
    assert _free_before_retries(server, "stage"), server.state.log


def test_a_parked_video_frees_its_slot_in_the_video_stage(hostile, monkeypatch, tmp_path):
    from pipeline.download.video import VideoDownloadConfig, VideoDownloadStage
    from pipeline.media.video import CutConfig

    server, _ = hostile
    urls = _busy_then_free(server, "video")
    batch = pending_batch(urls)
    fetch = fetch_config(media="video", concurrency=2, per_host_limit=2, retries=1, max_retry_wait=30)
    lookup = names_to_loopback("busy.test", "free.test")
    real_init = Fetcher.__init__
    monkeypatch.setattr(Fetcher, "__init__", lambda self, cfg=None, **kw: real_init(self, cfg, lookup=lookup))
    VideoDownloadStage(VideoDownloadConfig(fetch=fetch, cut=CutConfig(), tmp_dir=str(tmp_path))).process(batch)
    assert set(batch["error_kind"]) == {"not_media"}  # the server sends JPEGs: only the order matters here
    assert _free_before_retries(server, "video"), server.state.log


def test_sample_deadline_counts_waits_not_queueing(hostile):
    server, _ = hostile
    # 20 samples queue behind a cap of 1 for far longer than the deadline; none of them times out.
    urls = [server.counted_url("queue", delay=0.05, n=i) for i in range(20)]
    results = fetch_with(urls, fetch_config(per_host_limit=1, sample_deadline=0.5))
    assert all(r.ok for r in results), [r.error_message for r in results if not r.ok]
    # A wait longer than what is left of the deadline: give up at once.
    late = fetch_all([server.retry_url("deadline", after="3")], fetch_config(retries=2, sample_deadline=2))[0]
    assert late.error_kind == "http_status" and late.attempts == 1


# -- 6. the per-host cap: normalised names, and per address ----------------------------------------

def test_spellings_of_one_host_share_its_cap(hostile):
    server, _ = hostile
    hosts = ["cap.test", "cap.test.", "CAP.Test", "Cap.TEST."]
    urls = [server.counted_url("spell", delay=0.1, host=h, n=i) for i in range(6) for h in hosts]
    config = fetch_config(per_host_limit=2, per_address_limit=100, concurrency=64)
    results = fetch_with(urls, config, names_to_loopback("cap.test", "cap.test."))
    assert all(r.ok for r in results)
    assert server.state.max_in_flight["spell"] == 2


def test_names_of_one_address_share_the_address_cap(hostile):
    server, _ = hostile
    hosts = ["a.test", "b.test", "c.test"]
    urls = [server.counted_url("addr", delay=0.1, host=h, n=i) for i in range(6) for h in hosts]
    config = fetch_config(per_host_limit=3, per_address_limit=3, concurrency=64)
    results = fetch_with(urls, config, names_to_loopback(*hosts))
    assert all(r.ok for r in results)
    assert server.state.max_in_flight["addr"] == 3
    assert all(server.state.max_in_flight[("addr", h)] >= 1 for h in hosts)


# -- 7. a byte budget for bodies in flight --------------------------------------------------------

def _large_bodies_at_once(server, tag: str, budget) -> tuple[bool, int, int]:
    """8 slow 1 MB bodies (half without Content-Length) fetched at once: (all ok, the fetcher's peak
    of bytes buffered, the traced memory peak)."""
    size = 1_000_000
    urls = [server.large_url(f"{tag}{i}", size, chunked=i % 2 == 1, pause=0.01) for i in range(8)]
    config = fetch_config(max_bytes=1_500_000, max_bytes_in_flight=budget, concurrency=16, per_host_limit=16,
                          timeout=20)

    async def scenario():
        async with Fetcher(config) as fetcher:
            async def one(url):
                got = await fetcher.get(url)
                return got.ok and len(got.body) == size  # the body is dropped here

            ok = await asyncio.gather(*(one(u) for u in urls))
            return all(ok), fetcher.memory.peak

    tracemalloc.start()
    try:
        ok, peak = asyncio.run(scenario())
        return ok, peak, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_bodies_in_flight_stay_under_the_byte_budget(hostile):
    server, _ = hostile
    budget = 3_000_000
    ok, peak, traced = _large_bodies_at_once(server, "budget", budget)
    assert ok and 0 < peak <= budget  # bytes really buffered, counted chunk by chunk
    assert traced < 3 * budget, traced  # the joined copy of each body, socket buffers
    # Control: without a budget the same bodies are in memory nearly all at once (8 MB).
    ok, peak, _ = _large_bodies_at_once(server, "unbounded", None)
    assert ok and peak > 2 * budget, peak


def test_a_body_larger_than_the_budget_fails_cleanly(hostile):
    server, _ = hostile
    config = fetch_config(max_bytes=8_000_000, max_bytes_in_flight=2_000_000, timeout=10)
    urls = [server.large_url("over-declared", 3_000_000), server.large_url("over-chunked", 3_000_000, chunked=True),
            server.large_url("under", 500_000)]
    declared, chunked, small = fetch_all(urls, config)
    assert declared.error_kind == chunked.error_kind == "too_large"
    assert "max_bytes_in_flight" in declared.error_message and "max_bytes_in_flight" in chunked.error_message
    assert small.ok and len(small.body) == 500_000

"""pipeline.fetch against the hostile server on 127.0.0.1: every case ends in its documented kind,
retries and Retry-After, per-host caps, many requests in flight, the address policy (refused before
any connection), opt-outs (body never read), byte caps and streaming to files."""
from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
import time
import tracemalloc
import zlib
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from aiohttp import web
from PIL import Image, ImageOps

from helpers.hostile_server import Case, fetch_config, hostile_server, media_samples
from pipeline.core import schema
from pipeline.fetch import (FetchConfig, Fetcher, ForbiddenAddress, VettingResolver, address_problem, fetch_all,
                            fetch_many, optouts, retry_after_seconds, sniff)


@pytest.fixture(scope="module")
def hostile():
    with hostile_server() as (server, cases):
        yield server, cases


def run(coro):
    return asyncio.run(coro)


def fake_lookup(table: dict[str, list[str]]):
    """A resolver for made-up names; unknown names fail like NXDOMAIN."""
    async def lookup(host: str) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    return lookup


async def get_one(url: str, config: FetchConfig, lookup=None):
    async with Fetcher(config, lookup=lookup) as fetcher:
        return await fetcher.get(url)


# -- the hostile cases ------------------------------------------------------------------------------

def test_every_hostile_case_ends_in_its_documented_kind(hostile):
    server, cases = hostile
    media = media_samples()
    by_media: dict[str, list[Case]] = {}
    for case in cases.values():
        by_media.setdefault(case.media, []).append(case)
    started = time.monotonic()
    for kind, group in by_media.items():
        results = fetch_all([c.url for c in group], fetch_config(media=kind))
        for case, got in zip(group, results):
            assert got.error_kind == case.fetch_kind, (case.name, got)
            assert got.ok == (case.fetch_kind is None), case.name
            assert got.error_kind is None or schema.error_kind(got.error_kind)
            if got.ok:
                assert got.media_type == case.media_type, case.name
                assert got.http_status == 200 and got.final_url
                if case.name in media:
                    assert got.body == media[case.name], case.name
            else:
                assert got.body is None and got.error_message
    # The slow cases run concurrently and end at the 1.5 s timeout, not at 30 s or never.
    assert time.monotonic() - started < 20
    assert cases["http_404"].fetch_kind == "http_status"
    assert "404" in fetch_all([cases["http_404"].url], fetch_config())[0].error_message


def test_redirects_report_final_url_and_are_counted(hostile):
    server, cases = hostile
    chain = fetch_all([cases["ok_redirect_chain"].url], fetch_config())[0]
    assert chain.ok and chain.final_url == server.url("ok_jpeg")
    # The same 3-hop chain is too long when only 2 redirects are allowed.
    short = fetch_all([cases["ok_redirect_chain"].url], fetch_config(max_redirects=2))[0]
    assert short.error_kind == "too_many_redirects"


def test_hostile_media_are_what_the_docs_say(hostile):
    server, cases = hostile
    media = media_samples()
    for name, case in cases.items():
        if case.status == schema.SUCCESS and case.media == "image" and name in media:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(media[name])))
            assert image.size == case.size, name
    assert Image.open(io.BytesIO(media["ok_gif_animated"])).n_frames >= 2
    assert Image.open(io.BytesIO(media["ok_png_alpha"])).mode == "RGBA"
    assert Image.open(io.BytesIO(media["ok_cmyk_jpeg"])).mode == "CMYK"
    assert Image.open(io.BytesIO(media["ok_exif_rotated"])).getexif()[0x0112] == 6
    with pytest.raises(Exception):
        Image.open(io.BytesIO(media["jpeg_garbage"])).load()
    assert sniff(media["jpeg_garbage"]) == "image/jpeg" and sniff(media["random_bytes"]) is None


def test_bomb_png_is_small_valid_and_announces_24000_squared():
    data = media_samples()["bomb_png"]
    assert len(data) < 300_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (24000, 24000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    # The IDAT really holds every row (so an uncapped decoder would allocate it all): inflate in steps.
    idat_len = struct.unpack(">I", data[33:37])[0]
    inflater, total, pending = zlib.decompressobj(), 0, data[41:41 + idat_len]
    while pending or not inflater.eof:
        total += len(inflater.decompress(pending, 1 << 20))
        pending = inflater.unconsumed_tail
    assert total == 24000 * (1 + 24000 // 8)


def test_video_case_decodes(hostile):
    av = pytest.importorskip("av")
    server, cases = hostile
    got = fetch_all([cases["video_mp4"].url], fetch_config(media="video"))[0]
    assert got.ok and got.media_type == "video/mp4"
    with av.open(io.BytesIO(got.body)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 10


# -- retries ----------------------------------------------------------------------------------------

def test_retry_after_seconds_then_success(hostile):
    server, _ = hostile
    started = time.monotonic()
    got = fetch_all([server.retry_url("ra-seconds", fails=1, status=429, after="1")], fetch_config(retries=2))[0]
    elapsed = time.monotonic() - started
    assert got.ok and got.attempts == 2 and server.state.attempts["ra-seconds"] == 2
    assert 0.9 <= elapsed < 10  # waited for Retry-After: 1, not the 0.05 s backoff


def test_retry_after_http_date_on_503(hostile):
    server, _ = hostile
    started = time.monotonic()
    got = fetch_all([server.retry_url("ra-date", fails=1, status=503, after="date:2")], fetch_config(retries=1))[0]
    assert got.ok and got.attempts == 2
    assert 0.5 <= time.monotonic() - started < 10


def test_retry_after_is_capped_and_bounded_by_the_budget(hostile):
    server, _ = hostile
    started = time.monotonic()
    capped = fetch_all([server.retry_url("ra-cap", after="3600")], fetch_config(retries=1, max_retry_wait=0.2))[0]
    assert capped.ok and capped.attempts == 2 and time.monotonic() - started < 10
    # A wait longer than what is left of sample_deadline: give up now rather than sleep in vain.
    started = time.monotonic()
    budget = fetch_all([server.retry_url("ra-budget", after="30")], fetch_config(retries=3, sample_deadline=2))[0]
    assert budget.error_kind == "http_status" and budget.http_status == 429 and budget.attempts == 1
    assert time.monotonic() - started < 2
    none = fetch_all([server.retry_url("ra-none", after="1")], fetch_config(retries=0))[0]
    assert none.error_kind == "http_status" and none.attempts == 1 and server.state.attempts["ra-none"] == 1


def test_exponential_backoff_on_5xx(hostile):
    server, _ = hostile
    started = time.monotonic()
    got = fetch_all([server.retry_url("5xx-ok", fails=2, status=500, after="")],
                    fetch_config(retries=3, backoff_base=0.2))[0]
    assert got.ok and got.attempts == 3 and server.state.attempts["5xx-ok"] == 3
    assert time.monotonic() - started >= 0.2 * 0.5 + 0.4 * 0.5  # two waits, jitter at most halves them
    failed = fetch_all([server.retry_url("5xx-fail", fails=5, status=502, after="")], fetch_config(retries=1))[0]
    assert failed.error_kind == "http_status" and "502" in failed.error_message
    assert failed.attempts == 2 and server.state.attempts["5xx-fail"] == 2


def test_no_retry_on_4xx_and_retry_on_connection_errors(hostile):
    server, cases = hostile
    before = dict(server.state.requests)
    not_found, reset = fetch_all([cases["http_404"].url, cases["reset"].url], fetch_config(retries=2))
    assert not_found.attempts == 1 and server.state.requests["http_404"] - before.get("http_404", 0) == 1
    assert reset.error_kind == "connection" and reset.attempts == 3
    # aiohttp itself resends once when a kept-alive connection is dropped (RFC 9112 9.3.1).
    assert 3 <= server.state.requests["reset"] - before.get("reset", 0) <= 6


def test_retry_on_timeout(hostile):
    server, cases = hostile
    before = server.state.requests["slow_headers"]
    got = fetch_all([cases["slow_headers"].url], fetch_config(timeout=0.3, retries=1))[0]
    assert got.error_kind == "timeout" and got.attempts == 2
    assert server.state.requests["slow_headers"] - before == 2


# -- concurrency ------------------------------------------------------------------------------------

def test_per_host_cap_is_respected(hostile):
    server, _ = hostile
    lookup = fake_lookup({"host-a.test": ["127.0.0.1"], "host-b.test": ["127.0.0.1"]})
    urls = [server.counted_url("cap", delay=0.15, host=h, n=i) for i in range(24) for h in ("host-a.test", "host-b.test")]
    config = fetch_config(per_host_limit=4, concurrency=64)
    results = run(fetch_many(urls, config, lookup=lookup))
    assert all(r.ok for r in results)
    peaks = server.state.max_in_flight
    assert all(1 <= peaks[("cap", host)] <= 4 for host in ("host-a.test", "host-b.test"))
    assert peaks["cap"] > 4  # the cap is per host, not global


def test_hundreds_of_requests_in_flight(hostile):
    server, _ = hostile
    urls = [server.counted_url("many", delay=1.0, n=i) for i in range(300)]
    seen: list[int] = []
    started = time.monotonic()
    results = run(fetch_many(urls, fetch_config(concurrency=300, per_host_limit=300, timeout=10),
                             on_result=lambda i, r: seen.append(i)))
    assert all(r.ok for r in results) and sorted(seen) == list(range(300))
    assert [r.url for r in results] == urls  # input order
    assert server.state.max_in_flight["many"] >= 100
    assert time.monotonic() - started < 30  # 300 x 1 s sequentially would be 300 s


# -- address safety ---------------------------------------------------------------------------------

def test_private_addresses_are_refused_without_connecting(hostile, connections):
    server, cases = hostile
    before = server.state.requests["ok_jpeg"]
    port = server.port
    urls = [server.url("ok_jpeg"), f"http://[::ffff:7f00:1]:{port}/ok_jpeg", f"http://2130706433:{port}/ok_jpeg",
            f"http://0.0.0.0:{port}/ok_jpeg"]
    for got in fetch_all(urls, FetchConfig(timeout=2)):
        assert got.error_kind == "forbidden_address", got
    assert server.state.requests["ok_jpeg"] == before
    assert connections == []
    allowed = fetch_all([server.url("ok_jpeg")], FetchConfig(timeout=2, allow_private_addresses=True))[0]
    assert allowed.ok and server.state.requests["ok_jpeg"] == before + 1


def test_redirect_to_metadata_address_is_refused_before_connecting(hostile, connections):
    server, cases = hostile
    got = fetch_all([cases["redirect_private"].url], fetch_config())[0]
    assert got.error_kind == "forbidden_address" and "169.254.169.254" in got.error_message
    assert connections and set(connections) == {"127.0.0.1"}


def test_every_resolved_address_is_checked_and_the_vetted_one_is_used(hostile, connections):
    server, _ = hostile
    port = server.port
    lookup = fake_lookup({"mixed.test": ["127.0.0.1", "10.0.0.1"], "pinned.test": ["127.0.0.1"]})
    before = server.state.requests["ok_jpeg"]
    mixed = run(get_one(f"http://mixed.test:{port}/ok_jpeg", fetch_config(), lookup))
    assert mixed.error_kind == "forbidden_address" and "10.0.0.1" in mixed.error_message
    assert server.state.requests["ok_jpeg"] == before and connections == []
    # A made-up name the system cannot resolve: the connection goes to the vetted address.
    pinned = run(get_one(f"http://pinned.test:{port}/ok_jpeg", fetch_config(), lookup))
    assert pinned.ok and server.state.hosts[f"pinned.test:{port}"] == 1 and set(connections) == {"127.0.0.1"}
    unknown = run(get_one(f"http://nowhere.test:{port}/ok_jpeg", fetch_config(), lookup))
    assert unknown.error_kind == "dns"


def test_connector_resolution_is_vetted_again():
    """aiohttp's connector resolves through the same resolver: a rebinding answer is refused there too."""
    answers = iter([["127.0.0.1"], ["127.0.0.2"]])

    async def rebinding(host: str) -> list[str]:
        return next(answers)

    async def scenario():
        resolver = VettingResolver(False, ["127.0.0.1/32"], rebinding, ttl=0)
        first = await resolver.resolve("rebind.test", 80)
        with pytest.raises(ForbiddenAddress):
            await resolver.resolve("rebind.test", 80)
        return first

    assert [r["host"] for r in run(scenario())] == ["127.0.0.1"]


@pytest.mark.parametrize("address, problem", [
    ("169.254.169.254", "link-local"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("172.16.5.4", "private"), ("127.0.0.1", "loopback"), ("::1", "loopback"), ("fe80::1%eth0", "link-local"),
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("100.64.0.1", "not globally routable"),
    ("::ffff:10.0.0.1", "private"), ("2002:a9fe:a9fe::1", "link-local"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("fd00::1", "private"), ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("93.184.216.34", None)])
def test_address_policy(address, problem):
    assert address_problem(address) == problem


def test_allowed_networks_open_only_themselves():
    assert address_problem("127.0.0.5", ["127.0.0.0/8"]) is None
    assert address_problem("127.0.0.2", ["127.0.0.1/32"]) == "loopback"
    assert address_problem("169.254.169.254", ["127.0.0.0/8"]) == "link-local"
    with pytest.raises(ValueError):
        FetchConfig(allowed_networks=("not-a-network",))


# -- opt-outs ---------------------------------------------------------------------------------------

def test_opted_out_body_is_never_read(hostile):
    server, cases = hostile
    state, path, chunk = server.state, "optout_slow_body", 32768
    sent_before = state.sent[path]
    got = fetch_all([cases[path].url], fetch_config())[0]
    assert got.error_kind == "opted_out" and got.body is None
    time.sleep(1.5)  # longer than the whole body takes to send
    assert path not in state.finished  # the server was cut off
    assert state.sent[path] - sent_before < 64 + 10 * chunk  # a few chunks in flight at most, of 40
    # Control: the same URL read in full when opt-outs are not respected.
    full = fetch_all([cases[path].url], fetch_config(respect_optouts=False, timeout=10))[0]
    assert full.ok and len(full.body) == 64 + 40 * chunk and path in state.finished


@pytest.mark.parametrize("values, expected", [
    (["noai"], {"noai"}),
    (["NoImageAI"], {"noimageai"}),
    (["nofollow", "noindex"], {"noindex"}),
    (["nofollow, noimageindex"], {"noimageindex"}),
    (["none"], {"none"}),
    (["otherbot: noai"], set()),
    (["mmcurate: noai"], {"noai"}),
    (["otherbot: noai, noindex"], set()),                       # the scope covers what follows it
    (["otherbot: noai", "noimageai"], {"noimageai"}),           # a new header starts unscoped
    (["googlebot: nofollow, mmcurate: noai"], {"noai"}),
    (["unavailable_after: Wednesday, 25 Jun 2010 15:00:00 PST, noai"], {"noai"}),
    (["max-image-preview: large, nofollow"], set()),
    ([], set()),
])
def test_optout_parsing(values, expected):
    assert optouts(values, frozenset({"mmcurate"})) == expected


# -- caps, streaming, sniffing ----------------------------------------------------------------------

def test_byte_cap_rejects_declared_and_streamed_bodies(hostile):
    server, cases = hostile
    state = server.state
    before = state.sent["too_large_declared"]
    declared, streamed, small = fetch_all(
        [cases["too_large_declared"].url, cases["endless_fast"].url, cases["ok_jpeg_2"].url],
        fetch_config(max_bytes=10_000))
    assert declared.error_kind == "too_large" and "Content-Length" in declared.error_message
    time.sleep(0.3)
    assert state.sent["too_large_declared"] - before < 10 * 65536  # closed upfront, not read to the cap
    assert streamed.error_kind == "too_large" and small.error_kind == "too_large"


def test_get_to_file_streams_to_disk_within_the_cap(hostile, tmp_path):
    server, cases = hostile
    blob = media_samples()["mp4_garbage"]

    async def chunked(request):  # no Content-Length: only the streaming cap can stop it
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        await resp.prepare(request)
        view = memoryview(blob)
        for i in range(0, len(blob), 65536):
            await resp.write(view[i:i + 65536])
        return resp

    server.handlers["chunked_video"] = chunked
    config = fetch_config(media="video")
    target = tmp_path / "clip.mp4"

    async def fetch_to(url, path, cfg):
        async with Fetcher(cfg) as fetcher:
            return await fetcher.get_to_file(url, str(path))

    tracemalloc.start()
    try:
        got = run(fetch_to(server.url("chunked_video"), target, config))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.ok and got.path == str(target) and got.body is None and got.media_type == "video/mp4"
    assert target.read_bytes() == blob
    assert peak < len(blob) / 2, peak  # never the whole body in memory
    assert not os.path.exists(f"{target}.part")

    capped = run(fetch_to(server.url("chunked_video"), tmp_path / "capped.mp4", fetch_config(media="video",
                                                                                       max_bytes=1_000_000)))
    endless = run(fetch_to(cases["endless_fast"].url, tmp_path / "endless.jpg", fetch_config()))
    html = run(fetch_to(cases["html_200"].url, tmp_path / "page.mp4", config))
    assert (capped.error_kind, endless.error_kind, html.error_kind) == ("too_large", "too_large", "not_media")
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]  # no partial files left behind


def test_fetch_many_to_files(hostile, tmp_path):
    server, cases = hostile
    urls = [cases["video_mp4"].url, cases["http_404"].url] if "video_mp4" in cases else [cases["mp4_garbage"].url]
    paths = [str(tmp_path / f"{i}.mp4") for i in range(len(urls))]
    results = run(fetch_many(urls, fetch_config(media="video"), paths=paths))
    assert results[0].ok and os.path.getsize(paths[0]) > 0
    assert all(r.ok == os.path.exists(p) for r, p in zip(results, paths))


@pytest.mark.parametrize("head, media_type", [
    (b"\xff\xd8\xff\xdb" + bytes(60), "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n" + bytes(60), "image/png"),
    (b"GIF89a" + bytes(60), "image/gif"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(60), "image/webp"),
    (b"BM" + bytes(12) + (40).to_bytes(4, "little") + bytes(40), "image/bmp"),
    (b"II*\x00" + bytes(60), "image/tiff"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(40), "image/avif"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40), "image/heic"),
    (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1avif" + bytes(40), "image/avif"),
    (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(40), "video/mp4"),
    (b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00qt  " + bytes(40), "video/quicktime"),
    (b"\x00\x00\x00\x08wide\x00\x00\x00\x00mdat" + bytes(40), "video/quicktime"),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm" + bytes(40), "video/webm"),
    (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska" + bytes(40), "video/x-matroska"),
    (b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(60), "video/x-msvideo"),
    (b"FLV\x01\x05" + bytes(60), "video/x-flv"),
    ((b"\x47" + bytes(187)) * 3, "video/mp2t"),
    (b"\x00\x00\x00\x18ftypM4A \x00\x00\x00\x00M4A isom" + bytes(40), None),  # audio only
    (b"<!DOCTYPE html><html><body>404</body></html>", None),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', None),
    (b"BMW is a car", None),
    (b"", None),
])
def test_sniff(head, media_type):
    assert sniff(head) == media_type


def test_media_kind_must_match(hostile):
    server, cases = hostile
    as_video = fetch_all([cases["ok_jpeg"].url], fetch_config(media="video"))[0]
    assert as_video.error_kind == "not_media" and "image/jpeg" in as_video.error_message


# -- URLs, config, helpers --------------------------------------------------------------------------

@pytest.mark.parametrize("url, kind", [
    ("", "missing_url"), (None, "missing_url"), ("ftp://example.com/a.jpg", "bad_scheme"),
    ("javascript:alert(1)", "bad_scheme"), ("http:///no-host.jpg", "bad_url"), ("http://a.com:99999/x", "bad_url")])
def test_bad_urls_are_results_not_exceptions(url, kind, connections):
    got = fetch_all([url], FetchConfig())[0]
    assert got.error_kind == kind and not got.ok and connections == []


def test_retry_after_parsing():
    assert retry_after_seconds("7") == 7.0
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after_seconds(soon) <= 31
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None

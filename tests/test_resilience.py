"""Heartbeats, failover, circuit breaker, client disconnect, backpressure."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time

import aiohttp
import pytest

from conftest import Relayd
from fakes import Scenario, fixture, free_port, sse_events


@pytest.fixture(scope="module")
def relay(tmp_path_factory, fake):
    port, dead, admin = free_port(), free_port(), free_port()
    f = fake.url
    text = f"""
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
workers: 1  # the breaker tests count one process's failures (breakers are per worker)
shutdown_grace: 2
defaults:
  timeouts: {{connect: 1, first_byte: 5, idle: 10, total: 60}}
  heartbeat: 0
upstreams:
  good:   {{url: "{f}", provider: openai}}
  dead:   {{url: "http://127.0.0.1:{dead}", provider: openai, breaker: {{failures: 2, cooldown: 1s}}}}
  r429:   {{url: "{f}", provider: openai, headers: {{x-fake: s429}}}}
  r529:   {{url: "{f}", provider: anthropic, headers: {{x-fake: s529}}}}
  r503:   {{url: "{f}", provider: openai, headers: {{x-fake: s503}}}}
  good_a: {{url: "{f}", provider: anthropic}}
routes:
  - {{path: /hb, upstream: good, heartbeat: 300ms}}
  - {{path: /dead-good, upstream: [dead, good]}}
  - {{path: /breaker, upstream: [dead, good]}}
  - {{path: /429-good, upstream: [r429, good]}}
  - {{path: /529-good, upstream: [r529, good_a]}}
  - {{path: /429-503, upstream: [r429, r503]}}
  - {{path: /429-dead, upstream: [r429, dead]}}
  - {{path: /plain, upstream: good}}
"""
    fake.add("s429", Scenario(body=fixture("errors/openai-429-rate-limit.json"), status=429,
                              content_type="application/json"))
    fake.add("s529", Scenario(body=b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
                              status=529, content_type="application/json"))
    fake.add("s503", Scenario(body=b'{"error":{"message":"busy","type":"server_error","param":null,"code":null}}',
                              status=503, content_type="application/json"))
    r = Relayd(tmp_path_factory.mktemp("resil"), text)
    r.port, r.admin = port, admin  # type: ignore[attr-defined]
    r.start()
    yield r
    r.stop()


async def breaker_gauge(relay, upstream: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{relay.admin}/metrics") as r:
            text = await r.text()
    return next(l for l in text.splitlines() if l.startswith(f'relayd_breaker_open{{upstream="{upstream}"}}'))


def url(relay, path: str) -> str:
    return f"http://127.0.0.1:{relay.port}{path}"


def strip_comments(body: bytes) -> bytes:
    return body.replace(b": keep-alive\n\n", b"")


async def test_heartbeats_during_silence_and_data_unchanged(relay, fake):
    body = fixture("openai-chat-tools.sse")
    sc = fake.add("hb-gap", Scenario(body=body, chunking="lines", delay=0.0, first_delay=1.0))
    async with aiohttp.ClientSession() as s:
        async with s.post(url(relay, "/hb/v1/chat/completions"), headers={"x-fake": sc}) as r:
            got = await r.read()
    assert got.count(b": keep-alive\n\n") >= 2
    assert got.startswith(b": keep-alive\n\n")
    assert strip_comments(got) == body
    assert sse_events(got) == sse_events(body)


async def test_no_heartbeat_inside_a_held_partial_event(relay, fake):
    body = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    cut = body.index(b'{"b"') + 3  # half an event, 1.2 s of silence, then the rest
    sc = fake.add("hb-partial", Scenario(body=body, chunking=f"cut:{cut}", delay=1.2))
    async with aiohttp.ClientSession() as s:
        async with s.post(url(relay, "/hb/x"), headers={"x-fake": sc}) as r:
            got = await r.read()
    assert strip_comments(got) == body
    # the torn event was held back, so no comment could land inside it
    assert b'data: {"b":2}\n\n' in got
    # while the torn event was held nothing was written: no heartbeat after event a
    assert got.startswith(b'data: {"a":1}\n\ndata: {"b":2}\n\n')


async def _hb_stream(relay, fake, name: str, sc: Scenario, path: str = "/hb/x") -> bytes:
    sc = fake.add(name, sc)
    async with aiohttp.ClientSession() as s:
        async with s.post(url(relay, path), headers={"x-fake": sc}) as r:
            return await r.read()  # raises if the stream ended without its final chunk


BIG = b'data: {"a":1}\n\ndata: {"x":"' + b"A" * (17 * 2**20) + b'"}\n\ndata: [DONE]\n\n'
BIG_END, BIG_DONE = BIG.index(b'"}'), BIG.index(b"[DO") + 3  # in the big event's last line; in [DONE]


async def test_no_heartbeat_inside_an_event_larger_than_16_mib(relay, fake):
    # Past 16 MiB the tracker stops holding the event back; a heartbeat written in the
    # silence inside it would cut the event in two for every client parser.
    got = await _hb_stream(relay, fake, "hb-big", Scenario(
        body=BIG, chunking=f"cut:{BIG_END}", delay=1.2))
    assert b": keep-alive" not in got
    assert got == BIG


async def test_an_end_marker_split_after_an_event_larger_than_16_mib_ends_the_stream(relay, fake):
    # Alignment comes back at the end of the oversized event: "[DONE]" split across reads
    # is still recognised (it used to end the stream as broken, without a final chunk).
    got = await _hb_stream(relay, fake, "big-split", Scenario(
        body=BIG, chunking=f"cut:{BIG_DONE}", delay=0.2), path="/plain/v1/chat/completions")
    assert got == BIG
    a = relay.wait_access(where=lambda l: l["path"] == "/plain/v1/chat/completions")[-1]
    assert a["end_reason"] == "done" and a["events"] == 3, a


async def test_a_bom_after_a_heartbeat_does_not_cost_the_first_event(relay, fake):
    body = b'\xef\xbb\xbfdata: {"first":1}\n\ndata: [DONE]\n\n'
    got = await _hb_stream(relay, fake, "hb-bom", Scenario(body=body, first_delay=1.0))
    assert got.startswith(b": keep-alive\n\n")
    assert sse_events(got) == sse_events(body)  # the BOM no longer leads: it was dropped
    assert strip_comments(got) == body[3:]


async def test_heartbeats_reach_a_cr_only_stream(relay, fake):
    body = b"data: a\r\rdata: [DONE]\r\r"
    got = await _hb_stream(relay, fake, "hb-cr", Scenario(body=body, chunking="cut:9", delay=1.2))
    assert got.count(b": keep-alive\n\n") >= 2, got
    assert strip_comments(got) == body


async def test_failover_dead_then_good(relay, fake):
    fake.reset_stats()
    async with aiohttp.ClientSession() as s:
        async with s.post(url(relay, "/dead-good/v1/echo"), data=b"payload-1") as r:
            assert r.status == 200
            res = await r.json()
    assert res["sha256"] == hashlib.sha256(b"payload-1").hexdigest()
    a = relay.wait_access(where=lambda l: l["path"] == "/dead-good/v1/echo")[-1]
    assert a["attempts"] == 2 and a["upstream"] == "good"
    warn = [l for l in relay.logs() if l.get("event") == "upstream attempt failed" and l.get("request_id") == a["request_id"]]
    assert warn and warn[0]["reason"] == "connect_error"


@pytest.mark.parametrize("path", ["/429-good/v1/echo", "/529-good/v1/echo"])
async def test_failover_on_retryable_status_replays_body(relay, fake, path):
    blob = os.urandom(2 * 1024 * 1024)
    fake.reset_stats()
    async with aiohttp.ClientSession() as s:
        async with s.post(url(relay, path), data=blob) as r:
            assert r.status == 200
            res = await r.json()
    assert res["sha256"] == hashlib.sha256(blob).hexdigest()
    # both upstreams received the whole body
    assert [rq["sha256"] for rq in fake.requests] == [hashlib.sha256(blob).hexdigest()] * 2


async def test_all_failed_relays_last_upstream_error(relay, fake):
    async with aiohttp.ClientSession() as s:
        async with s.post(url(relay, "/429-503/v1/x"), data=b"x") as r:
            assert r.status == 503
            assert (await r.json())["error"]["message"] == "busy"
        async with s.post(url(relay, "/429-dead/v1/x"), data=b"x") as r:
            # the only answer came from the first upstream: relay it as is
            assert r.status == 429
            assert await r.read() == fixture("errors/openai-429-rate-limit.json")
            rid = r.headers["x-request-id"]
    # its access line names the upstream that answered, and the bytes the client got
    line = relay.wait_access(1, where=lambda l: l["request_id"] == rid)[-1]
    assert line["upstream"] == "r429" and line["status"] == 429 and line["attempts"] == 2
    assert line["bytes_out"] == len(fixture("errors/openai-429-rate-limit.json"))
    assert line["ttfb_ms"] is not None and line["ttfb_ms"] <= line["duration_ms"]


async def test_no_retry_for_bodies_over_8mib(relay, fake):
    blob = os.urandom(9 * 1024 * 1024)
    fake.reset_stats()
    async with aiohttp.ClientSession() as s:
        async with s.post(url(relay, "/429-good/v1/echo"), data=blob) as r:
            assert r.status == 429
    assert len(fake.requests) == 1 and fake.requests[0]["sha256"] == hashlib.sha256(blob).hexdigest()


async def test_circuit_breaker_skips_then_retries_after_cooldown(relay, fake):
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(url(relay, "/breaker/v1/echo")) as r:
                assert r.status == 200
        lines = relay.wait_access(3, where=lambda l: l["path"] == "/breaker/v1/echo")
        attempts = [a["attempts"] for a in lines]
        assert attempts[-1] == 1, attempts  # breaker open: dead upstream skipped
        assert (await breaker_gauge(relay, "dead")).endswith(" 1.0")
        assert (await breaker_gauge(relay, "good")).endswith(" 0.0")
        await asyncio.sleep(1.2)
        async with s.get(url(relay, "/breaker/v1/echo")) as r:
            assert r.status == 200
    lines = relay.wait_access(4, where=lambda l: l["path"] == "/breaker/v1/echo")
    attempts = [a["attempts"] for a in lines]
    assert attempts[-1] == 2, attempts  # cooldown over: tried again (and failed over)


@pytest.mark.parametrize("phase", ["before_headers", "mid_stream", "non_streaming"])
async def test_client_disconnect_closes_upstream_within_1s(relay, fake, phase):
    body = fixture("openai-chat-basic.sse")
    if phase == "before_headers":
        sc = Scenario(body=body, header_delay=30)
    elif phase == "mid_stream":
        sc = Scenario(body=body, fault="stall", fault_at=5000, chunking="lines")
    else:
        sc = Scenario(body=b'{"choices":[]}' * 10, content_type="application/json", fault="stall", fault_at=20)
    name = fake.add(f"disc-{phase}", sc)
    fake.reset_stats()
    seen = len(relay.access())
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(f"POST /plain/v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-fake: {name}\r\n"
                 f"Content-Length: 2\r\n\r\n{{}}".encode())
    await writer.drain()
    if phase != "before_headers":
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(100)
    else:
        await fake.has_requests(1)  # the request is waiting at the upstream
    t0 = time.monotonic()
    writer.transport.abort()
    for _ in range(100):
        if fake.disconnects:
            break
        await asyncio.sleep(0.02)
    assert fake.disconnects, "upstream never saw the client go"
    assert fake.disconnects[0] - t0 < 1.0
    assert relay.wait_access(seen + 1)[seen]["end_reason"] == "client_gone"


async def test_slow_reader_backpressure_keeps_memory_flat(relay, fake):
    chunk = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
    name = fake.add("flood", Scenario(body=chunk, repeat=3200))  # ~200 MB
    rss = lambda: int(next(l for l in open(f"/proc/{relay.proc.pid}/status") if l.startswith("VmRSS")).split()[1])
    before = rss()
    received = 0
    async with aiohttp.ClientSession(read_bufsize=65536) as s:
        async with s.post(url(relay, "/plain/x"), headers={"x-fake": name}) as r:
            t0 = time.monotonic()
            peak = before
            while time.monotonic() - t0 < 3:
                data = await r.content.read(64 * 1024)
                received += len(data)
                peak = max(peak, rss())
                await asyncio.sleep(0.06)  # about 1 MB/s
            sent = fake.sent[name]
    growth_mb = (peak - before) / 1024
    print(f"backpressure: upstream sent {sent / 2**20:.1f} MiB, client read {received / 2**20:.1f} MiB "
          f"in 3 s, relayd RSS growth {growth_mb:.1f} MiB")
    assert received < 8 * 1024 * 1024
    # relayd stopped reading upstream: what the fake managed to send is bounded by socket buffers
    assert sent - received < 48 * 1024 * 1024, (sent, received)
    assert growth_mb < 32, f"relayd RSS grew {growth_mb:.1f} MB"


async def test_50mb_upload_streams_without_buffering(relay, fake):
    rss = lambda: int(next(l for l in open(f"/proc/{relay.proc.pid}/status") if l.startswith("VmRSS")).split()[1])
    before = rss()
    peak = before
    h = hashlib.sha256()

    async def gen():
        nonlocal peak
        block = os.urandom(1024 * 1024)
        for i in range(50):
            piece = block[i:] + block[:i]
            h.update(piece)
            yield piece
            if i % 5 == 0:
                peak = max(peak, rss())

    fake.reset_stats()
    async with aiohttp.ClientSession() as s:
        async with s.post(url(relay, "/plain/v1/echo"), data=gen()) as r:
            res = await r.json()
    assert res["length"] == 50 * 1024 * 1024 and res["sha256"] == h.hexdigest()
    assert (peak - before) / 1024 < 25, f"relayd RSS grew {(peak - before) / 1024:.0f} MB during a 50 MB upload"

"""Byte-exact relay: every corpus transcript, every chunking mode, through a real relayd."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from multidict import CIMultiDict

from fakes import FIXTURES, Scenario, fixture, gzip_of

TRANSCRIPTS = sorted(p.name for p in FIXTURES.glob("*.sse"))
MODES = ["whole", "lines", "random", "utf8", "bytes"]
ROUTE_FOR = {"openai-chat": "/openai/v1/chat/completions", "openai-responses": "/openai/v1/responses",
             "anthropic": "/anthropic/v1/messages", "gemini": "/gemini/v1beta/models/g:streamGenerateContent?alt=sse"}


def route_for(name: str) -> str:
    for prefix, path in ROUTE_FOR.items():
        if name.startswith(prefix):
            return path
    raise AssertionError(name)


async def fetch(port: int, path: str, scenario: str, **kw) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(f"http://127.0.0.1:{port}{path}", json={"stream": True},
                          headers={"x-fake": scenario}, **kw) as r:
            return r.status, CIMultiDict(r.headers), await r.read()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TRANSCRIPTS)
async def test_transcript_byte_exact(shared, fake, name, mode):
    body = fixture(name)
    if mode == "bytes" and len(body) > 20000:
        pytest.skip("one-byte reads of the 90 KB transcript are covered by 'random'")
    sc = fake.add(f"{name}-{mode}", Scenario(body=body, chunking=mode, seed=len(body)))
    status, headers, got = await fetch(shared.port, route_for(name), sc)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert got == body


async def test_gzip_body_untouched(shared, fake):
    raw = fixture("anthropic-messages-tools.sse.gz")
    sc = fake.add("gz", Scenario(gzip_body=raw, chunking="random", seed=3))
    status, headers, got = await fetch(shared.port, "/anthropic/v1/messages", sc,
                                       )
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert got == raw
    import gzip
    assert gzip.decompress(got) == fixture("anthropic-messages-tools.sse")


async def test_non_sse_json_with_content_length(shared, fake):
    body = fixture("errors/openai-429-rate-limit.json")
    sc = fake.add("json429", Scenario(body=body, status=429, content_type="application/json; charset=utf-8",
                                      content_length=True, headers={"x-request-id": "req_upstream_1",
                                                                    "x-ratelimit-limit-requests": "3500"}))
    status, headers, got = await fetch(shared.port, "/openai/v1/chat/completions", sc)
    assert status == 429
    assert got == body
    assert headers["Content-Length"] == str(len(body))
    assert headers["x-request-id"] == "req_upstream_1"  # the provider's id is never overwritten
    assert headers["x-ratelimit-limit-requests"] == "3500"


async def test_streaming_is_incremental(shared, fake):
    events = [f"data: {{\"n\":{i}}}\n\n".encode() for i in range(6)]
    sc = fake.add("slow", Scenario(body=b"".join(events) + b"data: [DONE]\n\n", chunking="lines",
                                   delay=0.1))
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(f"http://127.0.0.1:{shared.port}/openai/v1/chat/completions",
                          headers={"x-fake": sc}) as r:
            first = await r.content.readuntil(b"\n\n")
            t_first = time.monotonic() - t0
            rest = await r.read()
            t_all = time.monotonic() - t0
    assert first == events[0]
    # 6 events and [DONE], split per line with 100 ms between lines: ~1.3 s in all.
    assert t_all > 1.0
    assert t_first < 0.5, f"first event after {t_first:.2f}s of {t_all:.2f}s"


async def test_megabyte_sse_lines_are_relayed_whole(shared, fake):
    # one-api/new-api broke on 64 KiB lines; image and reasoning streams carry megabytes per line
    big = b'data: {"b64":"' + b"A" * (3 * 1024 * 1024) + b'"}\n\n'
    body = b'data: {"a":1}\n\n' + big + b"data: [DONE]\n\n"
    sc = fake.add("mb-line", Scenario(body=body, chunking="lines"))
    status, _, got = await fetch(shared.port, "/openai/v1/chat/completions", sc)
    assert status == 200 and got == body

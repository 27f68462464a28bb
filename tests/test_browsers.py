"""Browsers and plain HTTP clients: CORS preflights and relayd's own errors, HTTP/1.0
framing, the upstream's own headers (review 42)."""

from __future__ import annotations

import asyncio

import aiohttp

from conftest import basic_config
from fakes import Scenario, free_port

_ORIGIN = {"Origin": "https://app.example"}
_PREFLIGHT = {**_ORIGIN, "Access-Control-Request-Method": "POST",
              "Access-Control-Request-Headers": "x-api-key, anthropic-version, content-type"}


async def test_a_preflight_needs_no_client_key(fake, make_relayd):
    """Browsers send preflights without credentials: with `clients:` every one got 401, and
    no browser could ever send its key.  relayd, the gate, answers it itself: forwarded, an
    unauthenticated request (body and all) reached the upstream on the operator's key."""
    port = free_port()
    make_relayd(basic_config(fake.url, port, top='clients:\n  web: {key: "client-key-0123456789abcdef"}'))
    fake.reset_stats()
    async with aiohttp.ClientSession() as s:
        async with s.options(f"http://127.0.0.1:{port}/anthropic/v1/messages", headers=_PREFLIGHT,
                             data=b'{"model":"m","messages":[]}') as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert r.headers["Access-Control-Allow-Methods"] == "POST"
            assert r.headers["Access-Control-Allow-Headers"] == "x-api-key, anthropic-version, content-type"
        assert fake.requests == []  # the upstream never saw it
        # the request itself still needs the key (and its 401 is readable by the page)
        async with s.post(f"http://127.0.0.1:{port}/anthropic/v1/messages", headers=_ORIGIN, data=b"{}") as r:
            assert r.status == 401
            assert r.headers["Access-Control-Allow-Origin"] == "*"
        # an OPTIONS that is not a preflight is an ordinary request
        async with s.options(f"http://127.0.0.1:{port}/anthropic/v1/messages") as r:
            assert r.status == 401


async def test_without_client_keys_a_preflight_gets_the_upstreams_answer(fake, make_relayd):
    port = free_port()
    make_relayd(basic_config(fake.url, port))
    sc = fake.add("preflight", Scenario(status=204, content_type="text/plain", headers={
        "Access-Control-Allow-Origin": "https://app.example", "Access-Control-Allow-Methods": "POST"}))
    async with aiohttp.ClientSession() as s:
        async with s.options(f"http://127.0.0.1:{port}/anthropic/v1/messages",
                             headers={**_PREFLIGHT, "x-fake": sc}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert r.headers["Access-Control-Allow-Methods"] == "POST"


async def test_relayds_own_errors_are_readable_by_browser_code(fake, make_relayd):
    port, dead = free_port(), free_port()
    make_relayd(basic_config(fake.url, port, extra_upstreams=f'  dead: {{url: "http://127.0.0.1:{dead}", provider: openai}}\n',
                             extra_routes="  - {path: /dead, upstream: dead}\n"))
    async with aiohttp.ClientSession() as s:
        for path in ("/dead/v1/chat/completions", "/nowhere"):
            async with s.post(f"http://127.0.0.1:{port}{path}", headers=_ORIGIN, data=b"{}") as r:
                assert r.status in (502, 404)
                assert r.headers["Access-Control-Allow-Origin"] == "*", dict(r.headers)
                assert "x-request-id" in r.headers["Access-Control-Expose-Headers"]
            async with s.post(f"http://127.0.0.1:{port}{path}", data=b"{}") as r:  # no Origin: none
                assert "Access-Control-Allow-Origin" not in r.headers


async def test_an_http10_keep_alive_client_gets_a_close_delimited_body_closed(fake, make_relayd):
    """HTTP/1.0 has no chunks: a relayed body of unknown length ends at the close, and the
    connection was kept open, so the body never ended (and the next answer landed in it)."""
    port = free_port()
    make_relayd(basic_config(fake.url, port))
    sc = fake.add("http10", Scenario(body=b'data: {"n":1}\n\ndata: [DONE]\n\n'))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /openai/v1/chat/completions HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
                     b"x-fake: " + sc.encode() + b"\r\nContent-Length: 2\r\n\r\n{}")
        got = await asyncio.wait_for(reader.read(), 5)  # ends only when relayd closes
    finally:
        writer.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"content-length" not in head.lower()
    assert body == b'data: {"n":1}\n\ndata: [DONE]\n\n'


async def test_an_upstream_server_header_is_kept_whatever_it_says(fake, make_relayd):
    """An upstream that is itself an aiohttp app sends aiohttp's default `Server`; it was
    taken for aiohttp's own addition and dropped."""
    port = free_port()
    make_relayd(basic_config(fake.url, port))
    from aiohttp.http import SERVER_SOFTWARE
    sc = fake.add("server", Scenario(body=b"{}", content_type="application/json",
                                     headers={"Server": SERVER_SOFTWARE}))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/openai/v1/x", headers={"x-fake": sc}) as r:
            assert r.headers.get("Server") == SERVER_SOFTWARE


async def test_a_kept_upstream_error_gets_no_cors_or_server_header_of_relayds(fake, make_relayd):
    """A failover route relays the last upstream error as it came: relayd's CORS and
    Server headers (meant for its own errors) went onto it, and overwrote the upstream's
    Access-Control-Expose-Headers."""
    port, dead = free_port(), free_port()
    make_relayd(basic_config(fake.url, port, extra_upstreams=f'  dead: {{url: "http://127.0.0.1:{dead}", provider: openai}}\n',
                             extra_routes="  - {path: /two, upstream: [generic, dead]}\n"))
    sc = fake.add("busy", Scenario(status=429, body=b'{"error":"busy"}', content_type="application/json",
                                   headers={"Access-Control-Expose-Headers": "retry-after", "Retry-After": "1"}))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/two/x", headers={**_ORIGIN, "x-fake": sc}, data=b"{}") as r:
            assert r.status == 429 and await r.read() == b'{"error":"busy"}'
            assert r.headers["Access-Control-Expose-Headers"] == "retry-after"
            assert "Access-Control-Allow-Origin" not in r.headers
            assert r.headers.get("Server") != "relayd"

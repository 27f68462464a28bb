"""Routing, headers, auth, keep-alive, pre-header errors, request ids, uploads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from conftest import basic_config
from fakes import Scenario, free_port


async def echo(port: int, path: str, method: str = "POST", headers=None, data=None) -> tuple[int, CIMultiDict, dict]:
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as s:
        url = URL(f"http://127.0.0.1:{port}{path}", encoded=True)
        async with s.request(method, url, headers=headers or {},
                             data=data) as r:
            body = await r.read()
            return r.status, CIMultiDict(r.headers), json.loads(body) if body else {}


def hdrs(result: dict) -> CIMultiDict:
    return CIMultiDict(result["headers"])


@pytest.mark.parametrize("path,upstream_path", [
    ("/openai/v1/echo", "/oai/v1/echo"),                       # base path joined, prefix stripped
    ("/openai/echo?a=1&b=%20x&c=%2F", "/oai/echo?a=1&b=%20x&c=%2F"),  # query byte-exact
    ("/gemini/v1beta/echo", "/v1beta/echo"),                   # base url with trailing slash: no //
    ("/azure/echo?api-version=2024-10-21", "/openai/deployments/d1/echo?api-version=2024-10-21"),
    ("/keep/x/echo", "/keep/x/echo"),                          # strip_prefix: false
    ("/local/a%2Fb/echo", "/a%2Fb/echo"),                      # encoded path not decoded
])
async def test_route_and_path_join(shared, path, upstream_path):
    status, _, res = await echo(shared.port, path)
    assert status == 200
    assert res["raw_path"] == upstream_path


async def test_longest_prefix_and_segment_boundary(fake, make_relayd):
    port = free_port()
    make_relayd(basic_config(fake.url, port, extra_upstreams=f'  deep: {{url: "{fake.url}/deep", provider: generic}}',
                             extra_routes="  - {path: /openai/v2, upstream: deep}"))
    _, _, res = await echo(port, "/openai/v2/echo")
    assert res["raw_path"] == "/deep/echo"
    _, _, res = await echo(port, "/openai/v1/echo")
    assert res["raw_path"] == "/oai/v1/echo"
    status, headers, res = await echo(port, "/openaix/echo")
    assert status == 404
    assert res == {"error": {"message": f"no route for /openaix/echo (request id {headers['X-Request-Id']})",
                             "type": "not_found"}}


async def test_unknown_path_404_json_with_request_id(shared):
    status, headers, res = await echo(shared.port, "/nope/v1/x?y=1")
    assert status == 404
    assert headers["Content-Type"].startswith("application/json")
    assert len(headers["X-Request-Id"]) >= 16
    assert res == {"error": {"message": f"no route for /nope/v1/x (request id {headers['X-Request-Id']})",
                             "type": "not_found"}}


async def test_hop_by_hop_not_forwarded_and_host_rewritten(shared, fake):
    status, _, res = await echo(shared.port, "/local/echo", headers={
        "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic eA==", "TE": "trailers", "Trailer": "X-T", "Upgrade": "h2c",
        "X-End-To-End": "kept", "Host": "client.example"})
    h = hdrs(res)
    for name in ("Connection", "X-Secret-Hop", "Keep-Alive", "Proxy-Authorization", "TE", "Trailer",
                 "Upgrade", "Transfer-Encoding"):
        assert name not in h, name
    assert h["X-End-To-End"] == "kept"
    assert h["Host"] == f"127.0.0.1:{fake.port}"
    assert not any(k.lower().startswith("x-forwarded") for k in h)
    assert "User-Agent" not in h  # relayd adds nothing the client did not send


async def test_response_hop_by_hop_dropped(shared, fake):
    sc = fake.add("hop", Scenario(body=b"{}", content_type="application/json",
                                  headers={"Connection": "X-Up-Hop", "X-Up-Hop": "1", "Keep-Alive": "timeout=1",
                                           "X-Up-End": "kept", "Server": "cloudflare"}))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{shared.port}/local/x", headers={"x-fake": sc}) as r:
            assert r.headers["X-Up-End"] == "kept"
            assert r.headers.getall("Server") == ["cloudflare"]  # the provider's, unchanged
            assert "X-Up-Hop" not in r.headers
            assert "Keep-Alive" not in r.headers


CREDS = {"Authorization": "Bearer client-key", "x-api-key": "client-key", "api-key": "client-key",
         "x-goog-api-key": "client-key"}


@pytest.mark.parametrize("route,header,value", [
    ("/openai", "Authorization", "Bearer sk-test-openai-KEY1"),
    ("/anthropic", "x-api-key", "sk-ant-test-KEY2"),
    ("/gemini", "x-goog-api-key", "gem-test-KEY3"),
    ("/azure", "api-key", "az-test-KEY4"),
])
async def test_auth_with_key_replaces_client_credentials(shared, route, header, value):
    _, _, res = await echo(shared.port, f"{route}/echo",
                           headers={**CREDS, "anthropic-version": "2023-06-01"})
    h = hdrs(res)
    assert h.getall(header) == [value]
    for other in CREDS:
        if other.lower() != header.lower():
            assert other not in h, other
    assert h["anthropic-version"] == "2023-06-01"


async def test_gemini_key_parameter_is_replaced_by_the_upstream_key(shared):
    # Google's SDKs may send the key as ?key=; with relayd's key set, the client's goes.
    _, _, res = await echo(shared.port, "/gemini/echo?alt=sse&key=client-key&x=1")
    assert res["raw_path"].endswith("/echo?alt=sse&x=1"), res["raw_path"]
    _, _, res = await echo(shared.port, "/gemini/echo?%24key=c1&alt=sse&access_token=c2&oauth_token=c3")
    assert res["raw_path"].endswith("/echo?alt=sse"), res["raw_path"]
    assert hdrs(res)["x-goog-api-key"] == "gem-test-KEY3"
    _, _, res = await echo(shared.port, "/openai/echo?key=client-key")  # key= is no credential there
    assert res["raw_path"].endswith("/echo?key=client-key")


@pytest.mark.parametrize("route", ["/nokey", "/local"])
async def test_auth_without_key_passes_client_credentials(shared, route):
    _, _, res = await echo(shared.port, f"{route}/echo", headers=CREDS)
    h = hdrs(res)
    for k, v in CREDS.items():
        assert h[k] == v


async def test_env_interpolation_for_keys_and_headers(fake, make_relayd):
    port = free_port()
    cfg = f"""
listen: 127.0.0.1:{port}
upstreams:
  a: {{url: "{fake.url}", provider: openai, api_key: "${{TEST_KEY}}", headers: {{OpenAI-Organization: ${{TEST_ORG:-}}, X-Static: "v-${{TEST_SUFFIX:-dflt}}"}}}}
routes:
  - {{path: /a, upstream: a}}
"""
    make_relayd(cfg, env={"TEST_KEY": "sk-from-env", "TEST_ORG": ""})
    _, _, res = await echo(port, "/a/echo", headers={"Authorization": "Bearer client"})
    h = hdrs(res)
    assert h["Authorization"] == "Bearer sk-from-env"
    assert "OpenAI-Organization" not in h  # interpolates to empty: not set
    assert h["X-Static"] == "v-dflt"


async def test_keepalive_reuses_one_upstream_connection(fake, make_relayd):
    port = free_port()
    make_relayd(basic_config(fake.url, port))
    fake.reset_stats()
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(f"http://127.0.0.1:{port}/local/echo") as r:
                assert r.status == 200
                await r.read()
    assert len(fake.requests) == 10
    assert len({p for p in fake.peers}) == 1
    assert fake.connections_made == 1


async def test_after_a_burst_the_newest_pooled_connection_is_reused_and_the_rest_expire(
        fake, make_relayd):
    # A burst opens 10 upstream connections; a steady trickle after it needs one.  Reusing
    # the oldest idle connection first (aiohttp's order) would keep all 10 alive — each is
    # reused every 0.5 s, inside the 1 s keepalive — and cycle through them; reusing the
    # newest (nginx's order) keeps one busy and lets the other nine expire.
    port = free_port()
    cfg = basic_config(fake.url, port, top="workers: 1").replace(
        "provider: generic}", "provider: generic, keepalive: 1}", 1)  # one worker: one pool
    make_relayd(cfg)
    slow = fake.add("slow", Scenario(body=b"{}", content_type="application/json", first_delay=0.3))
    fake.reset_stats()
    lost0 = fake.connections_lost
    async with aiohttp.ClientSession() as s:
        async def one(headers: dict[str, str]) -> None:
            async with s.get(f"http://127.0.0.1:{port}/local/x", headers=headers) as r:
                assert r.status == 200
                await r.read()

        await asyncio.gather(*(one({"x-fake": slow}) for _ in range(10)))
        assert fake.connections_made == 10
        burst = len(fake.peers)
        end = time.monotonic() + 5
        while fake.connections_lost - lost0 < 9 and time.monotonic() < end:
            await one({})
            await asyncio.sleep(0.05)
    trickle = fake.peers[burst:]
    # (the first trickle request may find a burst connection not yet released)
    assert len(trickle) >= 10 and len(set(trickle[-8:])) == 1, f"{len(set(trickle))} connections reused"
    assert fake.connections_lost - lost0 >= 9
    assert fake.connections_made == 10


async def test_connect_refused_is_502_in_provider_format(fake, make_relayd):
    port, dead = free_port(), free_port()
    cfg = f"""
listen: 127.0.0.1:{port}
upstreams:
  o: {{url: "http://127.0.0.1:{dead}", provider: openai, api_key: "sk-secret-never-shown"}}
  a: {{url: "http://127.0.0.1:{dead}", provider: anthropic}}
  g: {{url: "http://127.0.0.1:{dead}", provider: gemini}}
routes:
  - {{path: /o, upstream: o}}
  - {{path: /a, upstream: a}}
  - {{path: /g, upstream: g}}
"""
    make_relayd(cfg)
    s, h, o = await echo(port, "/o/v1/chat/completions")
    assert s == 502 and set(o["error"]) == {"message", "type", "param", "code"}
    assert o["error"]["code"] == "connect_error"
    assert o["error"]["message"].startswith("cannot connect to upstream 'o': connection refused")
    assert str(dead) not in o["error"]["message"]  # no internal addresses in client errors
    assert h["X-Request-Id"] in o["error"]["message"]
    assert "sk-secret" not in json.dumps(o) and "Traceback" not in json.dumps(o)
    s, _, a = await echo(port, "/a/v1/messages")
    assert s == 502 and a["type"] == "error" and a["error"]["type"] == "api_error"
    s, _, g = await echo(port, "/g/v1beta/x")
    assert s == 502 and g["error"]["code"] == 502 and g["error"]["status"] == "UNAVAILABLE"


async def test_first_byte_timeout_is_504(fake, make_relayd):
    port = free_port()
    cfg = basic_config(fake.url, port, defaults="").replace("first_byte: 5", "first_byte: 300ms")
    make_relayd(cfg)
    sc = fake.add("slowhdr", Scenario(body=b"{}", content_type="application/json", header_delay=2))
    for route, check in [("/openai", lambda b: b["error"]["type"] == "timeout" and b["error"]["code"] == "first_byte_timeout"),
                         ("/anthropic", lambda b: b["error"]["type"] == "timeout_error"),
                         ("/gemini", lambda b: b["error"]["status"] == "DEADLINE_EXCEEDED" and b["error"]["code"] == 504)]:
        s, _, body = await echo(port, f"{route}/x", headers={"x-fake": sc})
        assert s == 504, body
        assert check(body), body


@pytest.mark.parametrize("timeouts", ["connect: 300ms", "connect: 10, first_byte: 300ms"])
async def test_connect_timeout_is_504(make_relayd, timeouts):
    # A listener with a full backlog that never accepts: further SYNs are dropped, so the
    # connect hangs on loopback exactly as it would towards a dead host.  When first_byte
    # ends the connect, it is a connect failure too: the upstream got nothing, so the SDKs
    # may retry (no x-should-retry: false), and nobody is told it "sent no headers".
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(lsock.getsockname())
        fillers.append(c)
    port = free_port()
    cfg = f"""
listen: 127.0.0.1:{port}
defaults: {{timeouts: {{{timeouts}}}}}
upstreams:
  o: {{url: "http://127.0.0.1:{lsock.getsockname()[1]}", provider: openai}}
routes:
  - {{path: /o, upstream: o}}
"""
    try:
        make_relayd(cfg)
        s, h, body = await echo(port, "/o/x")
        assert s == 504, body
        assert body["error"]["code"] == "connect_error"
        assert "timed out connecting" in body["error"]["message"]
        assert "x-should-retry" not in h
    finally:
        for c in fillers:
            c.close()
        lsock.close()


async def test_request_id_passthrough_and_generation(shared, fake):
    s, h, res = await echo(shared.port, "/local/echo", headers={"X-Request-Id": "abc.DEF:1-2_3"})
    assert h["X-Request-Id"] == "abc.DEF:1-2_3"
    assert hdrs(res)["X-Request-Id"] == "abc.DEF:1-2_3"
    s, h, res = await echo(shared.port, "/local/echo", headers={"X-Request-Id": "bad id with spaces"})
    assert h["X-Request-Id"] != "bad id with spaces"
    assert hdrs(res)["X-Request-Id"] == h["X-Request-Id"]
    s, h, res = await echo(shared.port, "/local/echo", headers={"X-Request-Id": "x" * 129})
    assert h["X-Request-Id"] != "x" * 129


async def test_upstream_request_id_header_wins(shared, fake):
    sc = fake.add("upid", Scenario(body=b"{}", content_type="application/json", headers={"x-request-id": "req_abc"}))
    s, h, _ = await echo(shared.port, "/openai/x", headers={"x-fake": sc, "X-Request-Id": "mine"})
    assert h.getall("X-Request-Id") == ["req_abc"]


async def test_chunked_upload_5mb_byte_exact(shared, fake):
    blob = os.urandom(5 * 1024 * 1024)

    async def gen():
        for i in range(0, len(blob), 65536 + 7):
            yield blob[i:i + 65536 + 7]

    s, _, res = await echo(shared.port, "/local/echo", data=gen())
    assert s == 200
    assert res["length"] == len(blob)
    assert res["sha256"] == hashlib.sha256(blob).hexdigest()


async def test_content_length_upload_byte_exact(shared, fake):
    blob = os.urandom(3 * 1024 * 1024 + 5)
    s, _, res = await echo(shared.port, "/local/echo", data=blob)
    assert res["length"] == len(blob) and not res["chunked"]
    assert res["sha256"] == hashlib.sha256(blob).hexdigest()


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(data)
        s.settimeout(5)
        out = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                out += b
        except socket.timeout:
            pass
        return out


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET /local/echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    b"POST /local/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /local/echo HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /local/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    b"GET /local/echo HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
])
def test_malformed_requests_get_4xx_and_never_reach_upstream(shared, fake, raw):
    fake.reset_stats()
    out = _raw(shared.port, raw)
    assert out[:10] in (b"HTTP/1.1 4", b"HTTP/1.0 4"), out[:200]
    assert fake.requests == []
    # still alive and well
    out = _raw(shared.port, b"GET /local/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert len(fake.requests) == 1
    assert out.startswith(b"HTTP/1.1 200")


async def test_expect_100_continue(shared):
    with socket.create_connection(("127.0.0.1", shared.port), 5) as s:
        s.sendall(b"POST /local/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        s.settimeout(3)
        first = s.recv(100)
        assert first.startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"hello")
        rest = b""
        while b'"sha256"' not in rest:
            rest += s.recv(65536)
    assert hashlib.sha256(b"hello").hexdigest().encode() in rest


def test_an_answer_before_100_continue_closes_the_connection(shared, fake):
    """Review 78: relayd refused a request before sending ``100 Continue``, kept the
    connection, and read the client's next request (it need not send the announced body)
    as that body."""
    fake.reset_stats()
    with socket.create_connection(("127.0.0.1", shared.port), 5) as s:
        s.sendall(b"POST /local/a/%2e%2e/%2e%2e/%2e%2e/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        s.settimeout(3)
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(65536)
        head = got.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 400") and b"connection: close" in head
        try:
            s.sendall(b"GET /local/echo HTTP/1.1\r\nHost: x\r\n\r\n")
            while chunk := s.recv(65536):  # the body of the 400, then the close
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    assert got.count(b"HTTP/1.1") == 1 and fake.requests == []
    # review 84: and it closes at once, not after aiohttp's 10 s wait for the body
    with socket.create_connection(("127.0.0.1", shared.port), 5) as s:
        s.sendall(b"POST /local/a/%2e%2e/%2e%2e/%2e%2e/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        s.settimeout(5)
        t0 = time.monotonic()
        while s.recv(65536):
            pass
        assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("method,status", [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_bodiless_responses_do_not_hang(shared, fake, method, status):
    sc = fake.add(f"nobody-{method}-{status}", Scenario(body=b"" if status != 200 else b'{"a":1}',
                                                       status=status, content_type="application/json",
                                                       content_length=True))
    out = _raw(shared.port, f"{method} /local/x HTTP/1.1\r\nHost: x\r\nx-fake: {sc}\r\n"
                            f"Connection: close\r\n\r\n".encode())
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), out[:200]
    assert body == b""

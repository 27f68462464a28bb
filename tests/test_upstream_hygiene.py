"""Upstreams that misbehave at the byte level, driven by raw asyncio servers.

Each upstream here is a plain ``asyncio.start_server`` that writes exactly the bytes a
broken or hostile server would: unsolicited responses on idle keep-alive connections,
malformed status lines, control bytes in headers, non-UTF-8 header bytes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from typing import Awaitable, Callable

import aiohttp
import pytest

from fakes import free_port
from test_operations import get_metrics, metric

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawUpstream:
    """A raw HTTP/1.1 server: `handler(reader, writer, n)` answers the n-th request."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests = 0
        self.connections = 0
        self.closed = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "RawUpstream":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                await self.handler(reader, writer, self.requests)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def config(port: int, admin: int, url: str, provider: str = "openai", extra: str = "",
           timeouts: str = "connect: 2, first_byte: 3, idle: 5, total: 30") -> str:
    return f"""
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
defaults:
  timeouts: {{{timeouts}}}
upstreams:
  u: {{url: "{url}", provider: {provider}, api_key: "sk-hygiene-SECRET", breaker: {{failures: 2, cooldown: 30s}}}}
{extra}
routes:
  - {{path: /u, upstream: u}}
"""


async def get(port: int, path: str = "/u/v1/x") -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status, await r.read(), r.headers


async def repeat(port: int, method: str, n: int) -> list[tuple[int, bytes]]:
    """``n`` requests one after another on one client connection."""
    async with aiohttp.ClientSession() as s:
        out = []
        for _ in range(n):
            async with s.request(method, f"http://127.0.0.1:{port}/u/v1/x") as r:
                out.append((r.status, await r.read()))
        return out


async def raw_get(port: int, body_len: int = 0) -> tuple[bytes, bytes]:
    """A GET on a raw socket: the response head byte for byte (aiohttp's client would
    normalise it), and the first ``body_len`` body bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /u/v1/x HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return head, await asyncio.wait_for(reader.readexactly(body_len), 5)
    finally:
        writer.close()


async def test_unsolicited_response_on_idle_connection_is_never_relayed(make_relayd):
    """The issue's reproduction: a response written 200 ms after a complete one."""
    async def handler(reader, writer, n):
        writer.write(ok(b'{"n":%d}' % n))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(ok(b'{"evil":true}'))  # nobody asked
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        seen = []
        for i in range(3):
            status, body, _ = await get(port)
            seen.append(json.loads(body))
            # the stray response reached relayd's idle connection, which closed it
            end = time.monotonic() + 5
            while up.closed < i + 1 and time.monotonic() < end:
                await asyncio.sleep(0.02)
            assert up.closed == i + 1
        assert all("evil" not in b for b in seen), seen
        assert [b["n"] for b in seen] == sorted(b["n"] for b in seen)
        assert up.connections == 3  # each poisoned connection was closed, never reused


async def test_two_responses_in_one_segment_close_the_connection(make_relayd):
    async def handler(reader, writer, n):
        writer.write(ok(b'{"n":%d}' % n) + ok(b'{"evil":true}'))
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        for _ in range(3):
            status, body, _ = await get(port)
            assert status == 200 and b"evil" not in body


async def test_malformed_status_line_gives_a_fixed_502_without_upstream_bytes(make_relayd):
    """A broken upstream echoing the key in its status line: none of it reaches the client."""
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 2OO sk-hygiene-SECRET oops\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        # breakers are per worker: both failures must reach the same one
        r = make_relayd(config(port, admin, up.url, provider="anthropic"), args=["--workers", "1"])
        for _ in range(2):
            status, body, headers = await get(port)
            assert status == 502
            err = json.loads(body)
            assert err["type"] == "error" and err["error"]["type"] == "api_error"
            assert err["error"]["message"].startswith("invalid response from upstream 'u'")
            assert b"SECRET" not in body and b"oops" not in body and b"2OO" not in body
            assert headers["request-id"] == headers["X-Request-Id"]  # where the Anthropic SDK looks
        m = await get_metrics(admin)
        assert metric(m, "relayd_breaker_open", upstream="u") == 1  # two failures trip it
        assert "SECRET" not in "".join(json.dumps(l) for l in r.logs())


@pytest.mark.parametrize("value", [b"a\x01b", b"a\x7fb", b"a\rb", b"a\x00b"])
async def test_control_byte_in_upstream_header_is_a_502_not_a_500(make_relayd, value):
    async def handler(reader, writer, n):
        writer.write(ok(b"{}", b"X-Odd: " + value + b"\r\n"))
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        status, body, _ = await get(port)
        assert status == 502, body
        assert json.loads(body)["error"]["message"].startswith("invalid response from upstream 'u'")


async def test_obs_text_in_upstream_header_passes_byte_exact(make_relayd):
    """nginx passes 8-bit header bytes on; so does relayd (no UTF-8 decoding losses)."""
    async def handler(reader, writer, n):
        writer.write(ok(b"{}", b"X-Latin: caf\xe9\r\nX-Utf: caf\xc3\xa9\r\n"))
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        head, _ = await raw_get(port)
        assert b"\r\nX-Latin: caf\xe9\r\n" in head and b"\r\nX-Utf: caf\xc3\xa9\r\n" in head


async def test_start_of_another_response_after_a_complete_one_closes_the_connection(make_relayd):
    """A complete response followed, in the same segment, by the start of another: the
    connection is closed, so the rest of the stray one can never be read as the next
    request's answer."""
    async def handler(reader, writer, n):
        writer.write(ok(b'{"n":%d}' % n) + b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b'ngth: 13\r\n\r\n{"evil":true}')
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url), args=["--workers", "1"])
        for i in range(3):
            status, body, _ = await get(port)
            assert status == 200 and b"evil" not in body, (i, status, body)
        assert up.connections == 3


@pytest.mark.parametrize("method,tail", [("GET", b"\r\n"), ("HEAD", b"")])
async def test_clean_ends_keep_the_connection_pooled(make_relayd, method, tail):
    """What is not the start of a message (a stray CRLF), and a HEAD answer's announced
    length with no body, leave the connection reusable."""
    async def handler(reader, writer, n):
        if method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n")
        else:
            writer.write(ok(b'{"n":%d}' % n) + tail)
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url), args=["--workers", "1"])
        assert [st for st, _ in await repeat(port, method, 3)] == [200] * 3
        assert up.connections == 1


def _chunked(ctype: bytes, pieces: list[bytes]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize("ctype", [b"application/json", b"text/event-stream"])
async def test_a_whole_chunked_body_larger_than_the_read_buffer_arrives_whole(make_relayd, ctype):
    """A 40 KB chunked body that is all there when the stream takes it over: the reader
    had paused at its 16 KiB buffer, and taking its bytes resumed the parser, which
    parsed the rest and the end at once.  Every byte must still reach the client (it
    lost the last 7 KB, and an SSE stream its [DONE], replaced by an error event)."""
    if ctype == b"text/event-stream":
        pieces = [b'data: {"i":%d,"p":"%s"}\n\n' % (i, b"x" * 970) for i in range(40)] + [b"data: [DONE]\n\n"]
    else:
        pieces = [b'{"a":"' + b"x" * 990 + b'"},' for _ in range(40)]
    want = b"".join(pieces)

    async def handler(reader, writer, n):
        writer.write(_chunked(ctype, pieces))
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url), args=["--workers", "1"])
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(f"http://127.0.0.1:{port}/u/v1/chat/completions", json={"stream": True}) as r:
                    assert r.status == 200
                    assert await r.read() == want


async def test_a_compressed_request_body_goes_upstream_as_sent(make_relayd):
    """A gzip body is relayed compressed, under its own Content-Encoding and length.
    Decompressed (as aiohttp's server does by default) under the client's headers, a
    body could carry a second request to the upstream on relayd's keyed connection."""
    import gzip
    smuggled = b"GET /admin/secret HTTP/1.1\r\nHost: internal\r\n\r\n"
    gz = gzip.compress(b"{" + b" " * 70 + smuggled, mtime=0)
    seen: list[bytes] = []
    done = asyncio.Event()

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")).split(b":")[1])
        body = await reader.readexactly(length)
        seen.append(head + body)
        writer.write(ok(b"{}"))
        await writer.drain()
        try:
            seen.append(await asyncio.wait_for(reader.read(65536), 0.5))  # nothing more may come
        except asyncio.TimeoutError:
            pass
        writer.close()
        done.set()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    try:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /u/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gz) + gz)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(done.wait(), 5)  # the upstream's look for more is over
        sent = seen[0]
        assert sent.endswith(b"\r\n\r\n" + gz)
        assert b"content-encoding: gzip" in sent.lower() and b"content-length: %d" % len(gz) in sent.lower()
        assert not any(b"/admin/secret" in s for s in seen)
    finally:
        server.close()


@pytest.mark.parametrize("stall", [False, True])
async def test_a_kept_error_answer_is_relayed_whole_or_not_at_all(make_relayd, stall):
    """Failover keeps upstream a's 503 to relay if b fails too.  Its body comes in two
    writes: the client gets all of it, not the first write's half.  A body that never
    comes ends in relayd's own error after ``idle``, not a hang holding a's slot."""
    err = b'{"error":{"message":"overloaded, please retry later","type":"server_error"}}'

    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(err) + (b"" if stall else err[:20]))
        await writer.drain()
        await asyncio.sleep(5 if stall else 0.2)
        writer.write(err if stall else err[20:])
        await writer.drain()

    dead = free_port()  # nothing listens: b fails at connect
    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        extra = f'  b: {{url: "http://127.0.0.1:{dead}", provider: openai, api_key: "sk-b"}}'
        cfg = config(port, admin, up.url, timeouts="connect: 1, first_byte: 2, idle: 1, total: 10").replace(
            "\nroutes:\n  - {path: /u, upstream: u}", f"\n{extra}\nroutes:\n  - {{path: /u, upstream: [u, b]}}")
        assert "upstream: [u, b]" in cfg
        make_relayd(cfg)
        start = time.monotonic()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/u/v1/chat/completions", json={}) as r:
                body = await r.read()
                status = r.status
        took = time.monotonic() - start
        if stall:
            assert took < 4, took
            assert status == 502 and b"overloaded" not in body  # relayd's own: b's connect error
        else:
            assert status == 503 and body == err


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EV1 = b'data: {"id":"1","choices":[{"delta":{"content":"hi"}}]}\n\n'


@pytest.mark.parametrize("bad,text", [
    (b"zz\r\n", "upstream sent a malformed body after"),
    (b"0\r\nBad Trailer\r\n\r\n", "upstream sent a malformed body after"),
    (b"40\r\ndata: cut", "upstream connection reset after"),  # a close mid-chunk: truncated
])
async def test_a_body_the_parser_gives_up_on_fails_the_stream_at_once(make_relayd, bad, text):
    """A bad chunk size (or a bad trailer) mid-stream: aiohttp's parser drops the body and
    tells only the connection; the stream must end at once with one upstream_reset event,
    not wait for idle and blame the upstream's silence.  Its message says the framing broke
    (review 69: it said "connection reset", sending an operator after a network fault)."""
    async def handler(reader, writer, n):
        writer.write(SSE_HEAD + b"%x\r\n%b\r\n" % (len(EV1), EV1))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(bad)
        await writer.drain()
        if bad.startswith(b"40"):
            writer.close()
            return
        await asyncio.sleep(3)

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        r = make_relayd(config(port, admin, up.url, timeouts="connect: 2, first_byte: 3, idle: 5, total: 30"),
                        args=["--workers", "1"])
        start = time.monotonic()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/u/v1/chat/completions", json={"stream": True}) as resp:
                body = await resp.read()
        assert time.monotonic() - start < 2
        assert body.startswith(EV1) and body.count(b"\n\n") == 2
        error = json.loads(body[len(EV1):].split(b"data: ", 1)[1])["error"]
        assert error["code"] == "upstream_reset"
        assert error["message"].startswith("relayd: " + text), error
        assert r.wait_access(1)[-1]["end_reason"] == "upstream_reset"
        # review 72: a warning of its own, as before the headers (with the access log off
        # it was nowhere)
        warned = [l for l in r.logs() if l.get("event") == "upstream stream failed"]
        assert len(warned) == 1 and warned[0]["reason"] == "upstream_reset", warned
        assert warned[0]["cause"] == ("malformed body" if "malformed" in text else None)
        assert warned[0]["upstream"] == "u" and warned[0]["level"] == "warning"


@pytest.mark.parametrize("method,head", [
    ("POST", b"HTTP/1.1 204 No Content\r\nContent-Type: text/event-stream\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Type: text/event-stream\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"),
])
async def test_an_sse_answer_without_a_body_gets_no_error_event(make_relayd, method, head):
    """HEAD, 204 and 304 have no body: no end marker is missing, and bytes after the head
    would be read as the next response on the client's keep-alive connection."""
    async def handler(reader, writer, n):
        writer.write(head if n == 1 else ok(b'{"n":2}'))
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        r = make_relayd(config(port, admin, up.url), args=["--workers", "1"])
        async with aiohttp.ClientSession() as s:
            async with s.request(method, f"http://127.0.0.1:{port}/u/v1/chat/completions") as resp:
                assert await resp.read() == b""
            async with s.get(f"http://127.0.0.1:{port}/u/v1/x") as resp:  # same connection
                assert resp.status == 200 and await resp.read() == b'{"n":2}'
        line = r.wait_access(2)[0]
        assert line["end_reason"] == "done" and line["injected_error"] is None


async def test_a_head_answer_on_an_sse_resource_keeps_its_content_length(make_relayd):
    """Review 71: an SSE answer's Content-Length is dropped (relayd may add an error event),
    a HEAD's was too, though no event ever follows it; nginx passes it (it says what a GET
    would get)."""
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 500\r\n\r\n"
                     if n == 1 else ok(b'{"n":2}'))
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url), args=["--workers", "1"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD /u/v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /u/v1/x HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b'{"n":2}' not in got:
            part = await asyncio.wait_for(reader.read(65536), 5)
            assert part, got
            got += part
        writer.close()
        head = got.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\r\ncontent-length: 500" in head, got
        assert got.count(b"HTTP/1.1 200") == 2


@pytest.mark.parametrize("answer", [
    # relayd never forwards Upgrade: a switch is one no client asked relayd for
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAW",
    # a status below 100 went out as "99"
    b"HTTP/1.1 099 Weird\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    # codings besides chunked: stripped with the header, the bytes would pass as plain
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: xchunked\r\n\r\n{}",
    # whitespace before the colon (RFC 9112 §5.1): framed by aiohttp's lenient parser,
    # the name went out beside relayd's own Transfer-Encoding
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length : 2\r\n\r\n{}",
    # a control character in the reason phrase (it was a 500 and a traceback)
    b"HTTP/1.1 200 Ol\xc3\xa9\x7f\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\x7f\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
], ids=["101", "099", "gzip-chunked", "xchunked", "space-before-colon", "reason-del-utf8", "reason-del"])
async def test_answers_relayd_cannot_relay_as_sent_are_a_502(make_relayd, answer):
    async def handler(reader, writer, n):
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        r = make_relayd(config(port, admin, up.url))
        status, body, headers = await get(port)
        assert status == 502, (status, body)
        assert "invalid response from upstream" in json.loads(body)["error"]["message"]
        assert headers["x-should-retry"] == "false"  # the upstream acted: an SDK must not resend
    # the operator is told why (without the upstream's bytes)
    failed = [l for l in r.logs() if l.get("event") == "upstream attempt failed"]
    assert failed and failed[0]["cause"].endswith(")"), failed  # "invalid response ... (why)"
    assert not any(w in failed[0]["cause"] for w in ("websocket", "gzip", "xchunked", "Weird")), failed


async def test_an_answer_without_content_type_gets_none(make_relayd):
    """aiohttp adds ``Content-Type: application/octet-stream`` to a response that has
    none; a proxy adds no header of its own (nginx neither)."""
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        head, body = await raw_get(port, 2)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"ok"
        assert b"content-type" not in head.lower(), head


@pytest.mark.parametrize("method,answer,status,body", [
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}EXTRA", 200, b"{}"),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\nEXTRA", 200, b"{}"),
    ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", 204, b""),
    ("GET", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}EXTRA", 200, b"{}"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello", 200, b""),
], ids=["content-length", "chunked", "204", "after-103", "head"])
async def test_junk_after_a_whole_answer_in_the_same_read_relays_the_answer(make_relayd, method, answer,
                                                                            status, body):
    """The answer is relayed, as nginx does, and the connection is never reused: the
    parser raised at the junk and used to drop the answer with it (a 502)."""
    async def handler(reader, writer, n):
        writer.write(answer)
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url), args=["--workers", "1"])
        assert await repeat(port, method, 3) == [(status, body)] * 3
        assert up.connections == 3


async def test_junk_after_an_answer_whose_head_came_in_pieces_relays_the_answer(make_relayd):
    async def handler(reader, writer, n):
        for piece in (b"HTTP/1.1 200 OK\r\nContent-Ty", b"pe: application/json\r\nContent-Len",
                      b"gth: 2\r\n\r\n{}EXTRA"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url), args=["--workers", "1"])
        for _ in range(2):
            status, body, _ = await get(port)
            assert (status, body) == (200, b"{}")
        assert up.connections == 2


async def test_a_broken_body_before_the_junk_is_still_a_502(make_relayd):
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"zz\r\n{}\r\n0\r\n\r\n")
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        status, body, _ = await get(port)
        assert status == 502, (status, body)


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]  # tcpi_state


_TCP_CLOSE = 7


@pytest.mark.parametrize("route", ["/f", "/u"], ids=["buffered-for-failover", "streamed"])
async def test_an_upstream_answering_without_reading_the_body_is_aborted_and_not_reused(make_relayd, route):
    """A 401 to a 32 MB upload the upstream never reads: relayd closed that connection
    gracefully, and a transport waits for its unsent bytes forever (the descriptor and
    megabytes of buffers stayed); the buffered path even put it back in the pool, so the
    next request went out behind the rest of the body and timed out."""
    conns: list[socket.socket] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer.get_extra_info("socket"))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"content-length: 0\r\n" in head.lower() or not head.startswith(b"POST"):
                    writer.write(ok(b"{}"))
                    continue
                writer.transport.pause_reading()  # the body is never read
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\n\r\n{}")
                await asyncio.sleep(30)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    port, admin = free_port(), free_port()
    make_relayd(f"""
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
limits: {{replay_body: 64MiB}}
defaults:
  timeouts: {{connect: 2, first_byte: 10, idle: 5, total: 30}}
upstreams:
  a: {{url: "{url}", provider: openai}}
  b: {{url: "{url}", provider: openai}}
routes:
  - {{path: /f, upstream: [a, b]}}
  - {{path: /u, upstream: a}}
""", args=["--workers", "1"])
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}{route}/v1/x", data=b"x" * (32 << 20)) as r:
                assert r.status == 401
            end = time.monotonic() + 5
            while _tcp_state(conns[0]) != _TCP_CLOSE and time.monotonic() < end:
                await asyncio.sleep(0.05)
            assert _tcp_state(conns[0]) == _TCP_CLOSE  # reset by relayd, not left half-sent
            started = time.monotonic()
            async with s.get(f"http://127.0.0.1:{port}{route}/v1/x") as r:
                assert r.status == 200
            assert time.monotonic() - started < 2 and len(conns) == 2  # a fresh connection
    finally:
        server.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n"
    b'{"answer":"paid"}',
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 2000 What\r\n\r\n",
], ids=["control-char", "gzip-chunked", "bad-status-line"])
async def test_an_answer_relayd_cannot_relay_is_not_sent_to_the_next_upstream(make_relayd, answer):
    """The upstream answered (it acted on the prompt): the POST is not sent again to the
    next upstream of a failover route, as nginx never passes a non-idempotent request on
    once sent; the client gets relayd's 502, and the breaker is charged."""
    async def bad(reader, writer, n):
        writer.write(answer)
        await writer.drain()

    async def good(reader, writer, n):
        writer.write(ok(b'{"from":"b"}'))
        await writer.drain()

    async with RawUpstream(bad) as a, RawUpstream(good) as b:
        port, admin = free_port(), free_port()
        make_relayd(f"""
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
upstreams:
  a: {{url: "{a.url}", provider: openai}}
  b: {{url: "{b.url}", provider: openai}}
routes:
  - {{path: /u, upstream: [a, b]}}
""")
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/u/v1/chat/completions", data=b'{"prompt":"x"}') as r:
                assert r.status == 502
                assert "invalid response from upstream 'a'" in (await r.json())["error"]["message"]
        assert (a.requests, b.requests) == (1, 0)
        m = await get_metrics(admin)
        assert metric(m, "relayd_upstream_attempts_total", upstream="a", outcome="connect_error") == 1


def _reset_now(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed server's kernel would."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("provider", ["generic", "openai"])
async def test_a_reset_on_a_body_that_ends_with_the_connection_is_a_failure(make_relayd, provider):
    """A body without length (HTTP/1.0 style: it ends when the connection does) cut by a
    reset: aiohttp's parser takes the end of the connection for the end of the body, reset
    or not.  A reset is a failure — one upstream_reset event, not a clean end (generic)
    or an "ended without its marker" (openai)."""
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + EV1 + EV1)
        await writer.drain()
        await asyncio.sleep(0.3)
        _reset_now(writer)

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        r = make_relayd(config(port, admin, up.url, provider=provider), args=["--workers", "1"])
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/u/v1/chat/completions", json={"stream": True}) as resp:
                body = await resp.read()
        assert body.startswith(EV1 + EV1) and body.count(b"\n\n") == 3, body
        assert json.loads(body[2 * len(EV1):].split(b"data: ", 1)[1])["error"]["code"] == "upstream_reset"
        assert r.wait_access(1)[-1]["end_reason"] == "upstream_reset"


async def test_a_reset_ndjson_body_without_length_is_not_relayed_as_complete(make_relayd):
    """The same reset on a body relayd cannot add an event to (Ollama's NDJSON): the client
    connection ends without the final chunk, so the client sees a cut body."""
    lines = b'{"message":{"content":"a"},"done":false}\n' * 3

    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n" + lines)
        await writer.drain()
        await asyncio.sleep(0.3)
        _reset_now(writer)

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        r = make_relayd(config(port, admin, up.url, provider="generic"), args=["--workers", "1"])
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/u/api/chat", json={}) as resp:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
        assert r.wait_access(1)[-1]["end_reason"] == "upstream_reset"


async def test_keepalive_0_never_reuses_a_connection(make_relayd):
    """keepalive: 0 is no reuse: an expiry of 1 ms still let back-to-back requests share
    a connection."""
    async def handler(reader, writer, n):
        writer.write(ok(b'{"n":%d}' % n))
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url).replace("breaker:", "keepalive: 0, breaker:"),
                    args=["--workers", "1"])
        got = await repeat(port, "POST", 6)
        assert [s for s, _ in got] == [200] * 6
        assert up.connections == 6


async def test_a_connection_whose_large_body_the_upstream_never_read_is_not_pooled(make_relayd):
    """The upstream answered 401 after the head and read none of a 1 MB body.  On loopback
    the whole body had left relayd's buffer for the kernel's, so the connection looked
    clean, went back to the pool, and the next request queued behind the unread body until
    first_byte (a 504, and the breaker charged)."""
    conns = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if len(conns) == 1:  # the first connection: answer, then never read again
                    writer.write(ok(b'{"error":"no"}').replace(b"200 OK", b"401 Unauthorized"))
                    await writer.drain()
                    await asyncio.sleep(10)
                    return
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(ok(b'{"ok":true}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        port, admin = free_port(), free_port()
        # A failover route buffers the body, which then goes out in one write.
        make_relayd(config(port, admin, url, timeouts="connect: 2, first_byte: 3, idle: 5, total: 30",
                           extra=f'  v: {{url: "{url}", provider: openai}}\n')
                    + "  - {path: /f, upstream: [u, v]}\n", args=["--workers", "1"])
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/f/v1/x", data=b"x" * 1_000_000) as r:
                assert r.status == 401
            async with s.post(f"http://127.0.0.1:{port}/u/v1/x", data=b"{}") as r:
                assert r.status == 200, await r.text()
        assert len(conns) == 2
    finally:
        server.close()


@pytest.mark.parametrize("sse", [False, True])
async def test_a_reason_phrase_in_obs_text_is_relayed_byte_for_byte(make_relayd, sse):
    """A reason phrase is opaque bytes (RFC 9112 §4: obs-text allowed): Latin-1 from an
    upstream reached the client with those bytes dropped (nginx passes them)."""
    ctype = b"text/event-stream" if sse else b"application/json"

    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 429 Trop de requ\xeates\r\nContent-Type: " + ctype
                     + b"\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        head, body = await raw_get(port, 0 if sse else 2)  # (an SSE answer goes out chunked)
    assert head.startswith(b"HTTP/1.1 429 Trop de requ\xeates\r\n"), head
    assert sse or body == b"{}"


async def test_a_content_type_the_upstream_names_in_connection_is_not_replaced(make_relayd):
    """A header listed in ``Connection`` is hop-by-hop and dropped; for Content-Type,
    aiohttp then added its own default (``application/octet-stream``): relayd adds none."""
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: Content-Type\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        head, body = await raw_get(port, 2)
    assert b"content-type" not in head.lower(), head
    assert body == b"{}"


async def test_a_client_leaving_after_the_last_event_got_a_complete_stream(make_relayd):
    """The official SDKs close a stream's response at ``[DONE]`` (``message_stop``), before
    the upstream's final chunk: relayd logged such complete streams ``client_gone`` with
    their usage ``partial``.  They are ``done``, their usage final."""
    from fakes import fixture
    body = fixture("openai-chat-usage.sse")

    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(body), body))
        await writer.drain()
        await asyncio.sleep(1.0)  # the final chunk comes late
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        r = make_relayd(config(port, admin, up.url))
        async with aiohttp.ClientSession() as s:
            resp = await s.post(f"http://127.0.0.1:{port}/u/v1/chat/completions", json={})
            got = b""
            while b"data: [DONE]" not in got:
                got += await resp.content.readany()
            resp.close()  # as the SDK does
        line = r.wait_access(1)[-1]
    assert line["end_reason"] == "done", line
    assert line["usage"] is not None and line["usage"]["partial"] is False, line


async def test_a_connection_broken_before_an_answer_is_a_retryable_502(make_relayd):
    """An upstream that drops the connection before answering — after reading the whole
    request (a crash mid-generation), or at once (an upstream restarting), or on a pooled
    connection (the keep-alive race) — ended its work with it; relayd cannot tell these
    apart, and a retry is what mends each: the 502 leaves the SDKs free to retry (no
    ``x-should-retry: false``, which the first_byte 504 says: there the upstream may still
    be generating)."""
    async def handler(reader, writer, n):
        if n == 2:  # a keep-alive answer, for the pooled case
            writer.write(ok(b'{"ok":true}'))
            await writer.drain()
            return
        if n == 4:
            writer.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # request read, then gone (n == 4: with a reset)

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        statuses = []
        async with aiohttp.ClientSession() as s:
            for _ in range(3):  # fresh and closed; fresh and answered; pooled and closed
                async with s.post(f"http://127.0.0.1:{port}/u/v1/x", json={}) as r:
                    statuses.append(r.status)
                    assert "x-should-retry" not in r.headers, r.headers
        async with aiohttp.ClientSession() as s:  # fresh and reset
            async with s.post(f"http://127.0.0.1:{port}/u/v1/x", json={}) as r:
                statuses.append(r.status)
                assert "x-should-retry" not in r.headers, r.headers
        assert statuses == [502, 200, 502, 502], statuses

async def test_a_gone_clients_upload_the_kernel_still_holds_is_reset_not_delivered(make_relayd):
    """Review 70: the client reset mid-upload while the upstream had paused reading.  relayd's
    own buffer was empty (the kernel had taken the bytes), so its close was graceful: the
    upstream, reading again, got the whole body a gone client sent and a clean end, and
    could run (and bill) the prompt.  The kernel's queue counts too: a reset."""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    headed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        headed.set_result(None)
        await asyncio.sleep(1.5)  # not reading: relayd's kernel queue fills
        try:
            while await reader.read(65536):
                pass
            outcome.set_result("clean end")
        except ConnectionError:
            outcome.set_result("reset")
        writer.close()

    # A small receive buffer at the upstream (set before listen, so the window is small):
    # what relayd sends beyond it waits in relayd's kernel queue, as with a real upstream
    # that stopped reading a large body.  (With loopback's default buffers the upstream
    # could hold all of it, and the close was graceful without being wrong.)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    lsock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(upstream, sock=lsock)
    try:
        port, admin = free_port(), free_port()
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        r = make_relayd(config(port, admin, url), args=["--workers", "1"])
        c = socket.create_connection(("127.0.0.1", port))
        size = 1 << 20
        c.sendall(b"POST /u/v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        c.setblocking(False)
        sent, block = 0, b"u" * 65536
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            try:
                sent += c.send(block[:size - sent]) if sent < size else 0
            except BlockingIOError:
                pass
            await asyncio.sleep(0.02)
        await asyncio.wait_for(headed, 5)  # the upstream has the request: now the client goes
        assert sent > 256 * 1024, sent  # (far more than the upstream's socket buffer holds)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # a reset
        assert await asyncio.wait_for(outcome, 10) == "reset"
        assert r.wait_access(1)[-1]["end_reason"] == "client_gone"
    finally:
        server.close()


async def test_a_kept_error_without_a_content_type_gets_none(make_relayd):
    """Review 86: on a failover route the kept upstream error gained aiohttp's
    ``Content-Type: application/octet-stream``; relayed from one upstream it had none."""
    async def slow_down(reader, writer, n):
        writer.write(b"HTTP/1.1 503 Slow Down\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy")
        await writer.drain()

    async with RawUpstream(slow_down) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url, extra=f'  dead: {{url: "http://127.0.0.1:{free_port()}", '
                                                      f'provider: openai}}').replace(
            "  - {path: /u, upstream: u}", "  - {path: /u, upstream: [u, dead]}"))
        status, body, headers = await get(port)
        assert (status, body, headers.get("Retry-After")) == (503, b"busy", "7")
        assert "Content-Type" not in headers, headers

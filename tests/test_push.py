"""The pushed body path (``stream.Stream.pump``) at the byte level, with raw upstreams.

relayd takes over the response reader once headers are out: bytes the reader already
held, bytes its parser held back while the reader was full, and bytes of later reads
must all reach the client once and in order; a client that stops reading must stop the
upstream being read.  Raw asyncio upstreams write exactly the segments that exercise
those seams.
"""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp

from fakes import free_port, splice
from test_upstream_hygiene import RawUpstream, config


def sse_chunked(events: list[bytes]) -> bytes:
    """A chunked SSE response head and body, each event its own HTTP chunk."""
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    return head + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def events(n: int, size: int) -> list[bytes]:
    return [b"data: {\"i\":%d,\"pad\":\"%s\"}\n\n" % (i, b"x" * size) for i in range(n)]


async def read_all(port: int) -> bytes:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/u/v1/chat/completions", json={"stream": True}) as r:
            assert r.status == 200
            return await r.read()


async def test_many_chunks_in_one_segment_arrive_whole_and_in_order(make_relayd):
    """Headers and 2,000 chunks in one write: the reader fills and pauses its parser
    before relayd takes it over; the held-back chunks must still be relayed, once."""
    evs = events(2000, 200)
    evs.append(b"data: [DONE]\n\n")

    async def handler(reader, writer, n):
        writer.write(sse_chunked(evs))
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        for _ in range(5):
            assert await read_all(port) == b"".join(evs)


async def test_events_split_across_segments_with_pauses(make_relayd):
    """One event torn over three segments, 30 ms apart: the client gets it once, whole."""
    evs = events(50, 10) + [b"data: [DONE]\n\n"]
    wire = sse_chunked(evs)
    head_end = wire.index(b"\r\n\r\n") + 4

    async def handler(reader, writer, n):
        writer.write(wire[:head_end])
        await writer.drain()
        for i in range(head_end, len(wire), 333):
            writer.write(wire[i:i + 333])
            await writer.drain()
            await asyncio.sleep(0.001 if i % 2 else 0.03)

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        assert await read_all(port) == b"".join(evs)


async def test_client_that_reads_nothing_stops_the_upstream_being_read(make_relayd):
    """Backpressure: relayd reads the upstream no faster than the client takes bytes."""
    written = 0
    done = asyncio.Event()
    ev = b"data: " + b"y" * 16378 + b"\n\n"  # 16 KiB events

    async def handler(reader, writer, n):
        nonlocal written
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(4000):  # 64 MiB if nothing pushed back
                writer.write(b"%x\r\n%b\r\n" % (len(ev), ev))
                await writer.drain()
                written += len(ev)
        except ConnectionError:
            pass
        done.set()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url, timeouts="connect: 2, first_byte: 3, idle: 30, total: 60"))
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"POST /u/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        try:
            deadline = time.monotonic() + 10
            while written < 1 << 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # let it settle: nothing is read from the client socket
            stuck = written
            await asyncio.sleep(1.0)
            assert written == stuck, "relayd kept reading an upstream its client does not read"
            # socket buffers on both sides plus relayd's bounded hold, far below the 64 MiB offered
            assert written < 16 << 20, written
            # now read: the stream moves again
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            got = 0
            deadline = time.monotonic() + 10
            while got < 8 << 20 and time.monotonic() < deadline:
                got += len(await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5))
            assert written > stuck
        finally:
            sock.close()


# -- the short request path (upstream_http): what aiohttp's client did, relayd must still do


async def test_interim_1xx_responses_are_skipped(make_relayd):
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
                     b"HTTP/1.1 100 Continue\r\n\r\n"
                     + b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n"
                     + b'{"ok":1}')
        await writer.drain()

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url))
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/u/v1/models") as r:
                assert r.status == 200 and await r.read() == b'{"ok":1}'


async def test_request_head_framing_upstream_sees(make_relayd):
    """Host, a Content-Length for a body in memory (or 0 for a bodiless POST), one request."""
    heads: list[bytes] = []

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                length = int(next((l.split(b":")[1] for l in head.split(b"\r\n")
                                   if l.lower().startswith(b"content-length:")), b"0"))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, url,
                           extra="  v: {url: \"%s\", provider: openai, api_key: k2}" % url)
                    .replace("- {path: /u, upstream: u}", "- {path: /u, upstream: [u, v]}"))
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/u/v1/chat/completions", data=b'{"a":"b"}',
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200
            async with s.post(f"http://127.0.0.1:{port}/u/v1/x", data=b"") as r:
                assert r.status == 200
    finally:
        server.close()
    first = heads[0].decode("latin-1").lower()
    assert first.startswith("post /v1/chat/completions http/1.1\r\n")
    assert f"host: {url.removeprefix('http://')}\r\n" in first
    assert "content-length: 9\r\n" in first and "transfer-encoding" not in first
    assert "content-length: 0\r\n" in heads[1].decode("latin-1").lower()


async def test_dead_pooled_connection_is_retried_once_for_get_not_for_post(make_relayd):
    """An upstream that drops a kept-alive connection just as it is reused: a GET is sent
    again on a fresh connection (as aiohttp does); a POST is not (it may have been acted on)."""
    served: set[asyncio.StreamWriter] = set()  # the writers themselves: an id can be reused

    async def handler(reader, writer, n):
        if writer not in served:  # a connection's first request
            served.add(writer)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            return
        writer.transport.abort()  # its second one: reset, no answer

    async with RawUpstream(handler) as up:
        port, admin = free_port(), free_port()
        make_relayd(config(port, admin, up.url), args=["--workers", "1"])
        async with aiohttp.ClientSession() as s:
            for method, want in (("POST", 502), ("GET", 200)):  # each begins on a fresh connection
                async with s.request(method, f"http://127.0.0.1:{port}/u/v1/x") as r:
                    assert r.status == 200  # a fresh connection's first request
                async with s.request(method, f"http://127.0.0.1:{port}/u/v1/x") as r:
                    assert r.status == want, (method, r.status, await r.text())


async def test_proxied_upstream_takes_aiohttp_path_and_reaches_the_upstream(make_relayd, fake):
    """`proxy:` sends requests through an HTTP forward proxy (aiohttp's whole client path)."""
    from yarl import URL
    seen: list[bytes] = []

    async def proxy_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b"\r\n", 1)[0])
            target = URL(head.split(b" ", 2)[1].decode())
            up_r, up_w = await asyncio.open_connection(target.host, target.port)
            up_w.write(head)
            await splice(reader, writer, up_r, up_w)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    proxy = await asyncio.start_server(proxy_conn, "127.0.0.1", 0)
    pport = proxy.sockets[0].getsockname()[1]
    try:
        port = free_port()
        make_relayd(f"""listen: 127.0.0.1:{port}
upstreams:
  p: {{url: "{fake.url}", provider: openai, api_key: sk-proxied, proxy: "http://127.0.0.1:{pport}"}}
routes:
  - {{path: /p, upstream: p}}
""")
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/p/v1/chat/completions", json={}) as r:
                assert r.status == 200
                assert await r.read() == b'{"ok":true}'
        assert seen and seen[0].startswith(b"POST " + fake.url.encode() + b"/v1/chat/completions ")
    finally:
        proxy.close()

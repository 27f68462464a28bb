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

from fakes import free_port
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

"""Benchmark upstream: a raw asyncio HTTP/1.1 server, cheap enough never to be the bottleneck.

It is a plain ``asyncio.Protocol`` (no framework) because at 1,000 paced streams it must
write 50,000 events a second on a core it shares with the client; a framework costs more
per write than the relays under test.  Every SSE event carries ``"t":<CLOCK_MONOTONIC ns>``
taken just before the write, so the client (another process on the same machine, same
clock) can compute per-event delay through any relay.

POST|GET /json                         small chat-completion JSON (Content-Length, keep-alive)
POST|GET /stream?n=100&gap_ms=20&id=X  n OpenAI-style chunks, gap_ms apart, then usage + [DONE]
POST|GET /hold                         headers + one event, then silence until the client leaves
GET      /bulk?bytes=N&chunk=262144    application/octet-stream, chunked, as fast as TCP takes it
GET      /gone?id=X                    {"t": ns} when the connection streaming id X was lost
Usage: python bench/upstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import time
from urllib.parse import parse_qsl, urlsplit

JSON_BODY = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-bench",'
             b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
             b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}')
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
EVENT_PRE = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
             b'"model":"gpt-bench","choices":[{"index":0,"delta":{"content":"token')
TAIL = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","choices":[],'
        b'"usage":{"prompt_tokens":10,"completion_tokens":%d,"total_tokens":%d}}\n\ndata: [DONE]\n\n')
GONE: dict[str, int] = {}
_PHASE = random.Random(20)


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def event(i: int) -> bytes:
    return chunk(EVENT_PRE + b'%d"},"finish_reason":null}],"t":%d}\n\n' % (i, time.monotonic_ns()))


def reply(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (status.encode(), ctype, len(body), body))


class Conn(asyncio.Protocol):
    """One client connection; requests are served one after another (keep-alive)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.buf = b""
        self.tr: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.stream_id: str | None = None
        self.bulk_left = 0
        self.bulk_frame = b""
        self.bulk_step = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer:
            self.timer.cancel()
        if self.stream_id is not None:
            GONE[self.stream_id] = time.monotonic_ns()
        self.bulk_left = 0

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            method, target = head.split(" ", 2)[:2]
            self.serve(method, target)

    def serve(self, method: str, target: str) -> None:
        parts = urlsplit(target)
        q = dict(parse_qsl(parts.query))
        path = parts.path
        assert self.tr is not None
        if path.endswith("/json"):
            self.tr.write(reply("200 OK", JSON_BODY))
        elif path.endswith("/stream") or path.endswith("/hold"):
            n = 1 if path.endswith("/hold") else int(q.get("n", "100"))
            gap = float(q.get("gap_ms", "20")) / 1000
            self.stream_id = q.get("id")
            self.tr.write(SSE_HEAD + event(0))
            if not path.endswith("/hold"):
                # A random phase within the gap: streams tick spread over the gap as real
                # ones do, whenever their requests came.  Ticking from each request's
                # arrival made the load as bursty as the relay's start-up was quick: nginx
                # started 500 streams within ~30 ms (bursts of 60-70 events in one ms),
                # relayd's set-up turns spread them over ~300 ms, and its delays were
                # measured under a smoother load (review 73).
                self.schedule(1, n, gap, self.loop.time() - _PHASE.uniform(0, gap))
        elif path.endswith("/bulk"):
            size = int(q.get("chunk", "262144"))
            self.bulk_left = int(q.get("bytes", str(50 << 20)))
            self.bulk_frame, self.bulk_step = chunk(b"\xab" * size), size
            self.tr.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n")
            self.pump()
        elif path.endswith("/gone"):
            self.tr.write(reply("200 OK", json.dumps({"t": GONE.get(q.get("id", ""))}).encode()))
        else:
            self.tr.write(reply("404 Not Found", b'{"error":"no such path"}'))

    def schedule(self, i: int, n: int, gap: float, start: float) -> None:
        """Absolute schedule (start + i*gap): a late tick does not push every later event back."""
        self.timer = self.loop.call_at(start + i * gap, self.tick, i, n, gap, start)

    def tick(self, i: int, n: int, gap: float, start: float) -> None:
        assert self.tr is not None
        if self.tr.is_closing():
            return
        if i < n:
            self.tr.write(event(i))
            self.schedule(i + 1, n, gap, start)
        else:
            self.tr.write(chunk(TAIL % (n, n + 10)) + b"0\r\n\r\n")
            self.stream_id = None
            self.timer = None

    def pump(self) -> None:
        """Write bulk frames until the transport asks for a pause; resume_writing continues."""
        assert self.tr is not None
        frame, step = self.bulk_frame, self.bulk_step
        while self.bulk_left > 0 and not self.paused and not self.tr.is_closing():
            if self.bulk_left >= step:
                self.tr.write(frame)
                self.bulk_left -= step
            else:
                self.tr.write(chunk(b"\xab" * self.bulk_left))
                self.bulk_left = 0
            if self.bulk_left == 0:
                self.tr.write(b"0\r\n\r\n")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.bulk_left:
            self.pump()


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        Conn, "127.0.0.1", port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        try:  # the generator must not be the bottleneck at 1,000 streams (review 73)
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        asyncio.run(main(int(sys.argv[1])))
    except KeyboardInterrupt:
        pass

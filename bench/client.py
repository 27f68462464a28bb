"""The load client: a raw asyncio HTTP/1.1 client and one coroutine per scenario.

Raw protocol, not aiohttp, for the same reason as the upstream: the client shares a core
with the upstream and must stay cheaper per event than the relay it measures.  Times are
CLOCK_MONOTONIC nanoseconds, the clock the upstream stamps events with.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Callable

T_RE = re.compile(rb'"t":(\d+)')
REQ_BODY = b'{"model":"gpt-bench","stream":true,"messages":[{"role":"user","content":"hi"}]}'
now = time.monotonic_ns


@dataclass
class Target:
    """Where a client sends requests: host/port plus the path prefix the relay routes on."""

    name: str
    port: int
    prefix: str  # "/v1" for relays (route prefix, stripped), "" for direct


class Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time, body decoded as it arrives.

    ``on_body(piece, t_ns)`` sees every decoded body piece with the time its read
    completed; ``first`` is the time of the first body byte of the current response.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.tr: asyncio.Transport | None = None
        self.buf = bytearray()
        self.on_body: Callable[[bytes, int], None] | None = None
        self.done: asyncio.Future[int] | None = None
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.first = 0
        self.status = 0
        self.mode = ""  # "" = reading head, "len", "chunked", "eof"
        self.left = 0
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done and not self.done.done():
            if self.closing:  # we hung up ourselves (held or abandoned stream): not an error
                self.done.cancel()
            elif self.mode == "eof":
                self.done.set_result(self.status)
            else:
                self.done.set_exception(ConnectionError(f"connection lost mid-response: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, method: str, path: str, body: bytes = b"",
             on_body: Callable[[bytes, int], None] | None = None) -> asyncio.Future[int]:
        assert self.tr is not None
        self.done = self.loop.create_future()
        self.on_body, self.first, self.mode = on_body, 0, ""
        ctype = b"Content-Type: application/json\r\n" if body else b""
        self.tr.write(b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Length: %d\r\n\r\n%s"
                      % (method.encode(), path.encode(), ctype, len(body), body))
        return self.done

    def _piece(self, piece: bytes, t: int) -> None:
        if not self.first:
            self.first = t
        if self.on_body:
            self.on_body(piece, t)

    def _finish(self) -> None:
        self.mode = "idle"
        if self.done and not self.done.done():
            self.done.set_result(self.status)

    def data_received(self, data: bytes) -> None:
        t = now()
        buf = self.buf
        buf += data
        while buf:
            if self.mode == "":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                del buf[:end + 4]
                self.status = int(head[9:12])
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
                if b"transfer-encoding: chunked" in head:
                    self.mode, self.left = "chunked", 0
                elif m:
                    self.mode, self.left = "len", int(m.group(1))
                    if self.left == 0:
                        self._finish()
                else:
                    self.mode = "eof"
            elif self.mode == "len" or self.mode == "eof":
                take = len(buf) if self.mode == "eof" else min(self.left, len(buf))
                self._piece(bytes(buf[:take]), t)
                del buf[:take]
                self.left -= take
                if self.mode == "len" and self.left == 0:
                    self._finish()
            elif self.mode == "chunked":
                if self.left > 0:
                    take = min(self.left, len(buf))
                    self._piece(bytes(buf[:take]), t)
                    del buf[:take]
                    self.left -= take
                    if self.left == 0:
                        self.left = -2  # CRLF after the chunk data
                elif self.left == -2:
                    if len(buf) < 2:
                        return
                    del buf[:2]
                    self.left = 0
                else:
                    i = buf.find(b"\r\n")
                    if i < 0:
                        return
                    size = int(bytes(buf[:i]).split(b";")[0], 16)
                    del buf[:i + 2]
                    if size:
                        self.left = size
                    else:
                        self.mode = "trailer"
            elif self.mode == "trailer":
                if len(buf) < 2:
                    return
                del buf[:2]  # no trailers are ever sent here
                self._finish()
            else:  # bytes outside a response: a relay's bug, or a heartbeat after the end
                raise RuntimeError(f"unexpected bytes after response: {bytes(buf[:80])!r}")

    def close(self) -> None:
        self.closing = True
        if self.tr:
            self.tr.close()


async def connect(t: Target) -> Conn:
    _, proto = await asyncio.get_running_loop().create_connection(Conn, "127.0.0.1", t.port)
    return proto


class Events:
    """Per-event delays (receive time - the upstream's stamp) and inter-event gaps."""

    def __init__(self) -> None:
        self.carry = b""
        self.delays: list[int] = []
        self.arrivals: list[int] = []

    def feed(self, piece: bytes, t: int) -> None:
        data = self.carry + piece
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.carry = data
            return
        self.carry = data[cut + 2:]
        for stamp in T_RE.findall(data, 0, cut):
            self.delays.append(t - int(stamp))
            self.arrivals.append(t)


@dataclass
class StreamRun:
    events: int = 0
    delays: list[int] = field(default_factory=list)
    ttfb: list[int] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)
    wall: float = 0.0


async def one_stream(c: Conn, t: Target, n: int, gap_ms: float, run: StreamRun,
                     keep_gaps: bool = False) -> None:
    ev = Events()
    t0 = now()
    status = await c.send("POST", f"{t.prefix}/stream?n={n}&gap_ms={gap_ms}", REQ_BODY, ev.feed)
    if status != 200:
        raise RuntimeError(f"{t.name}: stream answered {status}")
    if len(ev.delays) != n:
        raise RuntimeError(f"{t.name}: stream delivered {len(ev.delays)} of {n} events")
    run.events += n
    run.delays.extend(ev.delays)
    run.ttfb.append(c.first - t0)
    if keep_gaps:
        run.gaps.extend(b - a for a, b in zip(ev.arrivals, ev.arrivals[1:]))


async def streams(t: Target, count: int, n: int, gap_ms: float) -> StreamRun:
    """`count` concurrent streams, each on its own new connection."""
    run = StreamRun()
    conns = await asyncio.gather(*(connect(t) for _ in range(count)))
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one_stream(c, t, n, gap_ms, run) for c in conns))
    finally:
        for c in conns:
            c.close()
    run.wall = time.perf_counter() - t0
    return run


async def sequential(t: Target, count: int, n: int, gap_ms: float, keep_gaps: bool) -> StreamRun:
    """One stream at a time over one keep-alive connection (TTFB and latency scenarios)."""
    run = StreamRun()
    c = await connect(t)
    try:
        for _ in range(count):
            await one_stream(c, t, n, gap_ms, run, keep_gaps)
    finally:
        c.close()
    return run


async def small_json(t: Target, clients: int, total: int, max_s: float) -> tuple[int, float, list[int]]:
    """`clients` keep-alive connections issuing requests back to back: (count, seconds, latencies)."""
    conns = await asyncio.gather(*(connect(t) for _ in range(clients)))
    lat: list[int] = []
    deadline = time.perf_counter() + max_s
    budget = [total]

    async def worker(c: Conn) -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            t0 = now()
            status = await c.send("POST", f"{t.prefix}/json", REQ_BODY)
            lat.append(now() - t0)
            if status != 200:
                raise RuntimeError(f"{t.name}: /json answered {status}")

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    return len(lat), time.perf_counter() - t0, lat


async def open_held(t: Target, conns: list[Conn], upto: int, batch: int = 250,
                    timeout: float = 30.0) -> None:
    """Open held streams until `upto` are open, each having received its first event
    within `timeout` seconds (a relay under tracemalloc needs longer)."""
    async def one() -> None:
        c = await connect(t)
        got = asyncio.get_running_loop().create_future()
        c.send("POST", f"{t.prefix}/hold", REQ_BODY,
               lambda piece, _t: got.done() or got.set_result(None))
        await asyncio.wait_for(got, timeout)
        conns.append(c)

    while len(conns) < upto:
        await asyncio.gather(*(one() for _ in range(min(batch, upto - len(conns)))))


async def bulk(t: Target, conns: int, total: int, chunk: int = 262144) -> tuple[int, float]:
    """`conns` parallel downloads sharing `total` bytes: (bytes received, seconds)."""
    got = [0]

    def count(piece: bytes, _t: int) -> None:
        got[0] += len(piece)

    cs = await asyncio.gather(*(connect(t) for _ in range(conns)))
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(c.send("GET", f"{t.prefix}/bulk?bytes={total // conns}&chunk={chunk}",
                                      on_body=count) for c in cs))
    finally:
        for c in cs:
            c.close()
    return got[0], time.perf_counter() - t0


async def client_gone(t: Target, direct: Target, samples: int, tag: str) -> list[int]:
    """Close mid-stream, then ask the upstream when it saw its request go: close-to-seen ns."""
    out: list[int] = []
    probe = await connect(direct)
    try:
        for i in range(samples):
            sid = f"{tag}-{i}"
            c = await connect(t)
            got = asyncio.get_running_loop().create_future()
            c.send("POST", f"{t.prefix}/stream?n=10000&gap_ms=20&id={sid}", REQ_BODY,
                   lambda piece, _t: got.done() or got.set_result(None))
            await asyncio.wait_for(got, 10)
            closed = now()
            c.close()
            for _ in range(1000):  # bounded: 1000 polls x 5 ms = 5 s
                seen: list[bytes] = []
                await probe.send("GET", f"/gone?id={sid}", on_body=lambda p, _t: seen.append(p))
                value = re.search(rb'"t":\s*(\d+)', b"".join(seen))
                if value:
                    out.append(int(value.group(1)) - closed)
                    break
                await asyncio.sleep(0.005)
            else:
                raise RuntimeError(f"{t.name}: upstream never saw client-gone stream {sid} end")
    finally:
        probe.close()
    return out

"""A fake AI provider on 127.0.0.1 that speaks the providers' real wire format.

It runs in its own thread and event loop so one instance can serve a whole test module
(and relayd subprocesses) whatever loop the test itself uses.  Behaviour is chosen per
request by the ``x-fake`` header naming a registered ``Scenario`` (SDKs can send it via
default headers), else by ``FakeProvider.default``.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
import hashlib
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


_HANDED: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this test run: the kernel can give
    the same ephemeral port to two binds in a row once the first socket is closed (two
    of a config's listeners then collided)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED:
            _HANDED.add(port)
            return port
    raise RuntimeError("no fresh free port in 100 tries")


async def splice(a_r: asyncio.StreamReader, a_w: asyncio.StreamWriter,
                 b_r: asyncio.StreamReader, b_w: asyncio.StreamWriter) -> None:
    """Copy bytes both ways between two connections (a test proxy's tunnel) until both end."""
    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    await asyncio.gather(pipe(a_r, b_w), pipe(b_r, a_w), return_exceptions=True)


def split(body: bytes, mode: str, seed: int = 0, max_size: int = 7) -> list[bytes]:
    """Cut a body into the reads a proxy would see."""
    if mode == "whole":
        return [body]
    if mode == "lines":
        out, start = [], 0
        for i, b in enumerate(body):
            if b == 0x0A:
                out.append(body[start:i + 1])
                start = i + 1
        if start < len(body):
            out.append(body[start:])
        return out
    if mode == "random":
        rnd = random.Random(seed)
        out, i = [], 0
        while i < len(body):
            n = rnd.randint(1, max_size)
            out.append(body[i:i + n])
            i += n
        return out
    if mode == "utf8":  # split inside every multi-byte character and every CRLF
        cuts = [i for i in range(1, len(body))
                if (body[i] & 0xC0) == 0x80 or (body[i - 1] == 0x0D and body[i] == 0x0A)]
        if not cuts:
            return split(body, "random", seed, 3)
        out, prev = [], 0
        for c in cuts:
            out.append(body[prev:c])
            prev = c
        out.append(body[prev:])
        return [p for p in out if p]
    if mode.startswith("cut:"):  # two reads, split at the given offset
        n = int(mode[4:])
        return [body[:n], body[n:]]
    if mode == "bytes":
        return [body[i:i + 1] for i in range(len(body))]
    raise ValueError(mode)


@dataclass
class Scenario:
    body: bytes = b""
    status: int = 200
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    chunking: str = "whole"
    seed: int = 0
    delay: float = 0.0             # seconds between chunks
    first_delay: float = 0.0       # before the first body byte (after headers)
    header_delay: float = 0.0      # before sending headers
    fault: str | None = None       # None | "reset" | "eof" | "stall"
    fault_at: int | None = None    # byte offset where the fault happens
    content_length: bool = False   # send Content-Length instead of chunked
    gzip_body: bytes | None = None # raw bytes sent as-is with Content-Encoding: gzip
    gzip_if_asked: bool = False    # as Anthropic: `body` gzipped, flushed part by part, when accepted
    repeat: int = 1                # send `body` this many times (large streams without the memory)
    hold: threading.Event | None = None  # when given, wait for it (up to 30 s) before chunk hold_at
    hold_at: int = 0


class FakeProvider:
    def __init__(self) -> None:
        self.port = 0
        self.default = Scenario(body=b'{"ok":true}', content_type="application/json")
        self.scenarios: dict[str, Scenario] = {}
        self.requests: list[dict[str, Any]] = []
        self.peers: list[tuple[str, int]] = []
        self.disconnects: list[float] = []
        self.completed: list[float] = []
        self.connections_made = 0
        self.connections_lost = 0
        self.sent: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    # -- lifecycle

    def start(self) -> "FakeProvider":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        fake = self

        class Counted(web.RequestHandler):
            __slots__ = ()

            def connection_lost(self, exc: BaseException | None) -> None:
                fake.connections_lost += 1
                super().connection_lost(exc)

        def factory() -> web.RequestHandler:
            fake.connections_made += 1
            return Counted(server, loop=fake._loop, access_log=None)

        srv = await self._loop.create_server(factory, "127.0.0.1", 0)
        self.port = srv.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        srv.close()
        await server.shutdown(0.5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_stats(self) -> None:
        self.requests.clear()
        self.peers.clear()
        self.disconnects.clear()
        self.completed.clear()
        self.connections_made = 0

    async def has_requests(self, n: int, timeout: float = 5) -> None:
        """Wait until n requests arrived since the last reset_stats().

        A test that must act while a request is live (reload, drain, disconnect)
        waits for it to reach the upstream rather than sleeping a guessed amount.
        """
        end = time.monotonic() + timeout
        while len(self.requests) < n and time.monotonic() < end:
            await asyncio.sleep(0.02)
        assert len(self.requests) >= n, f"{len(self.requests)} of {n} requests reached the upstream"

    def add(self, name: str, scenario: Scenario) -> str:
        self.scenarios[name] = scenario
        return name

    # -- handling

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.content.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.append(peer)
        record = {"method": request.method, "raw_path": request.raw_path,
                  "headers": list(request.headers.items()), "body": body,
                  "sha256": hashlib.sha256(body).hexdigest(), "peer": peer,
                  "chunked": "chunked" in request.headers.get("Transfer-Encoding", "")}
        self.requests.append(record)
        named = request.headers.get("x-fake", "") in self.scenarios
        if not named and request.raw_path.split("?")[0].endswith("/echo"):
            out = {"method": request.method, "raw_path": request.raw_path,
                   "headers": [[k, v] for k, v in request.headers.items()],
                   "length": len(body), "sha256": record["sha256"], "chunked": record["chunked"]}
            return web.json_response(out, headers={"x-echo": "1"})
        sc = self.scenarios.get(request.headers.get("x-fake", ""), self.default)
        try:
            return await self._play(request, sc, request.headers.get("x-fake", ""))
        except (asyncio.CancelledError, ConnectionError):
            self.disconnects.append(time.monotonic())
            raise

    async def _play(self, request: web.BaseRequest, sc: Scenario, name: str) -> web.StreamResponse:
        if sc.header_delay:
            await asyncio.sleep(sc.header_delay)
        headers = {"Content-Type": sc.content_type, **sc.headers}
        body = sc.gzip_body if sc.gzip_body is not None else sc.body
        if sc.gzip_body is not None:
            headers["Content-Encoding"] = "gzip"
        zipper = None
        if sc.gzip_if_asked and "gzip" in request.headers.get("Accept-Encoding", ""):
            headers["Content-Encoding"] = "gzip"
            zipper = zlib.compressobj(wbits=31)
        resp = web.StreamResponse(status=sc.status, headers=headers)
        if sc.content_length:
            resp.content_length = len(body)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        if sc.first_delay:
            await asyncio.sleep(sc.first_delay)
        if sc.repeat > 1:
            self.sent[name] = 0
            for _ in range(sc.repeat):
                await resp.write(body)
                self.sent[name] += len(body)
            await resp.write_eof()
            return resp
        limit = sc.fault_at if sc.fault is not None and sc.fault_at is not None else len(body)
        sent = 0
        for i, part in enumerate(split(body, sc.chunking, sc.seed)):
            if sent >= limit:
                break
            part = part[: limit - sent]
            if i and sc.delay:
                await asyncio.sleep(sc.delay)
            if sc.hold is not None and i == sc.hold_at:
                await _held(sc.hold, 30)
            await resp.write(part if zipper is None else zipper.compress(part) + zipper.flush(zlib.Z_SYNC_FLUSH))
            sent += len(part)
        if sc.fault == "reset":
            await asyncio.sleep(0.01)
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError()
        if sc.fault == "stall":
            await asyncio.sleep(3600)
        if zipper is not None:
            await resp.write(zipper.flush())
        await resp.write_eof()
        self.completed.append(time.monotonic())
        return resp


async def _held(gate: threading.Event, timeout: float) -> None:
    """Until the test thread sets gate: a stream that must outlast some steps of a test
    stays open until the test says so, not for a length of time guessed to be enough."""
    end = time.monotonic() + timeout
    while not gate.is_set() and time.monotonic() < end:
        await asyncio.sleep(0.01)


def gzip_of(data: bytes) -> bytes:
    return gzip.compress(data)


def sse_events(body: bytes) -> list[tuple[str, str]]:
    """A tiny reference SSE parser (WHATWG): (event type, data) of every dispatched event."""
    text = body.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    events: list[tuple[str, str]] = []
    etype, data = "", []
    i, n = 0, len(text)
    lines: list[str] = []
    start = 0
    while i < n:
        c = text[i]
        if c in "\r\n":
            lines.append(text[start:i])
            if c == "\r" and i + 1 < n and text[i + 1] == "\n":
                i += 1
            start = i + 1
        i += 1
    for line in lines:
        if line == "":
            if data:
                events.append((etype or "message", "\n".join(data)))
            etype, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            etype = value
        elif name == "data":
            data.append(value)
    return events


def json_events(body: bytes) -> list[Any]:
    out = []
    for _, data in sse_events(body):
        try:
            out.append(json.loads(data))
        except ValueError:
            out.append(data)
    return out


def block_ends(body: bytes) -> list[int]:
    """Offsets just after each blank line (WHATWG line rules), computed independently of relayd."""
    ends, i, n = [], 0, len(body)
    line_start = 0
    if body.startswith(b"\xef\xbb\xbf"):
        i = line_start = 3
    while i < n:
        c = body[i]
        if c in (0x0A, 0x0D):
            j = i + 2 if c == 0x0D and i + 1 < n and body[i + 1] == 0x0A else i + 1
            if i == line_start:
                ends.append(j)
            line_start = i = j
        else:
            i += 1
    return ends


def split_prefix_and_last_block(got: bytes) -> tuple[bytes, bytes]:
    """(everything before the final block, the final block); the input must end on a boundary."""
    ends = block_ends(got)
    assert ends and ends[-1] == len(got), f"does not end on an event boundary: {got[-80:]!r}"
    # the last *non-empty* block starts after the previous boundary
    k = len(ends) - 1
    start = ends[k - 1] if k >= 1 else 0
    return got[:start], got[start:]

"""The request body on its way upstream: buffered for failover, or streamed.

A body in memory can be sent again to the next upstream; a streamed one cannot, and
while it streams relayd reads the client only as fast as the upstream takes the bytes
(backpressure).  Memory for buffering is bounded per request (``replay_body``) and per
process (``ReplayBudget``), and a client that resets while its upload is paused is still
noticed (``ClientWatch``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, AsyncIterator

from aiohttp import HttpVersion11, web

from . import lean


class ReplayBudget:
    """Bytes of request bodies held in memory for failover, across the whole process.

    Buffering is what makes failover possible, and also what a crowd of slow uploads
    could use to pin memory; past the budget a request simply gets one attempt with its
    body streamed, which is what a one-upstream route does anyway.
    """

    def __init__(self) -> None:
        self.used = 0

    def take(self, n: int, limit: int) -> bool:
        if self.used + n > limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class RequestBody:
    """The request body as it goes upstream, and how much of it came in.

    With ``replay`` the body is buffered (up to ``replay_body`` and while the process
    budget lasts) so another upstream can be tried; otherwise, or past either limit, it
    streams and the request gets one attempt.  Reading it counts against ``first_byte``
    like the rest of the wait for a response.
    """

    __slots__ = ("request", "replay", "budget", "limits", "bytes_in", "data", "replayable",
                 "complete", "_held", "_head", "broken", "reading")

    def __init__(self, request: web.BaseRequest, replay: bool, budget: ReplayBudget,
                 limits: Any) -> None:
        self.request = request
        self.replay = replay
        self.budget, self.limits = budget, limits
        self.bytes_in = 0
        self.data: Any = None
        self.replayable = True
        self.complete = True   # every byte the client announced has arrived
        self._held = 0         # bytes of the budget this body holds
        self._head: bytes | bytearray = b""
        self.broken: str | None = None  # why the client's body broke its framing, if it did
        self.reading = False  # waiting for the client's next bytes (not for the upstream to take them)

    def ready(self) -> bool:
        """True when nothing is left to wait for: no body, or (no failover to buffer for)
        a Content-Length body that arrived whole with the head, as small ones do.  That
        one goes upstream as bytes, which aiohttp frames exactly as the streamed body
        (the client's Content-Length) at a fraction of an async generator's cost."""
        request = self.request
        if not request.body_exists:
            return True
        if self.replay or request.content_length is None or "Expect" in request.headers:
            return False
        content = request.content
        if not content.is_eof() or content.exception() is not None:
            return False  # still coming, or broken: the streaming path reports it as before
        data = content.read_nowait()
        lean.drop_buffer(content)  # read to its end: a held stream keeps no empty buffer
        self.data, self.bytes_in, self.replayable = data, len(data), False
        return True

    async def prepare(self) -> None:
        request = self.request
        if not request.body_exists:
            return
        self.complete = False
        if request.headers.get("Expect", "").lower() == "100-continue" \
                and request.version >= HttpVersion11:  # a 1.0 client may take a 1xx for its answer
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.replay:
            content = request.content
            buf = bytearray()
            cap = self.limits.replay_body
            while True:
                chunk = await content.readany()  # (a broken body: RequestPayloadError, a 400)
                if not chunk:
                    self.data = buf  # (not copied: a bytes copy doubled what the budget counts)
                    self.complete = True
                    return
                buf += chunk
                self.bytes_in = len(buf)  # as it comes: an upload that never ends is logged too
                if len(buf) > cap or not self.budget.take(len(chunk), self.limits.replay_memory):
                    break
                self._held += len(chunk)
            self._head = buf  # (not copied: nothing is added to it any more)
            # One attempt now: what was read is sent, not kept for a replay (holding its
            # budget until the request ended, it refused failover to uploads that fit).
            self.budget.give(self._held)
            self._held = 0
        self.replayable = False
        self.data = self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        head, self._head = self._head, b""
        if head:
            yield head
            del head  # (up to replay_body bytes, sent: not held for the whole response)
        content = self.request.content
        while True:
            self.reading = True
            try:
                chunk = await content.readany()
            except web.RequestPayloadError as exc:
                self.broken = str(exc)  # for the attempt to say "client", not "upstream"
                raise
            finally:
                self.reading = False
            if not chunk:
                self.complete = True
                return
            self.bytes_in += len(chunk)
            yield chunk

    def release(self) -> None:
        """The attempts are over: give the bytes back to the budget, and let the body go
        (a long stream would keep a large prompt for its whole length)."""
        self.budget.give(self._held)
        self._held = 0
        self.data = None


class ClientWatch:
    """While an upload streams, a client that resets its connection is noticed.

    When the upstream stops taking the body, relayd stops reading the client (backpressure),
    and a transport that is not reading does not see the client's reset either: the request
    would hold the upstream until ``first_byte``.  Once a second this looks at the socket's
    TCP state; a reset one is aborted, which ends the request as ``client_gone`` at once.  (A
    half-close is left alone: the rest of the body may be waiting, unread, in the kernel.)"""

    __slots__ = ("transport", "handle")
    EVERY = 1.0
    _CLOSED = 7  # TCP_CLOSE: the peer reset the connection

    def __init__(self, request: web.BaseRequest) -> None:
        self.transport = request.transport
        self.handle: asyncio.TimerHandle | None = None
        if self.transport is not None:
            self.handle = asyncio.get_running_loop().call_later(self.EVERY, self._look)

    def _look(self) -> None:
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None or transport.is_closing():
            return
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return  # not TCP (a test's pipe): nothing to watch
        if state == self._CLOSED:
            transport.abort()
            return
        self.handle = asyncio.get_running_loop().call_later(self.EVERY, self._look)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()

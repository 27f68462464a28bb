"""After commit: the response body, from the upstream to a client that already has headers.

Once the status line went out nothing can be retried; what is left is to copy faithfully
and to end honestly.  SSE bodies are forwarded a complete block at a time
(``sse.BoundaryTracker``) so that relayd's own bytes — heartbeat comments, one error
event — can only land between events, and a stream that completes is byte for byte the
upstream's.  A failure after headers becomes exactly one error event in the endpoint's
own format (``providers.Endpoint``) and a clean end; other bodies end by closing the
connection, the only failure signal HTTP/1.1 has after headers.

One timer per stream (``_Clock``) watches every deadline: upstream silence (``idle``),
the whole request (``total``), a client that accepts nothing (``send``) and heartbeats.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp
from aiohttp import web

from . import providers
from .exchange import End
from .forward import fmt
from .headers import for_client, media_type
from .sse import BoundaryTracker
from .usage import Usage, UsageMeter

HEARTBEAT = b": keep-alive\n\n"


class _Clock:
    """One lazily re-armed timer per stream for every deadline.

    Arming an ``asyncio.timeout`` around every read and write costs a Timeout object and
    a heap-scheduled handle per event.  Instead the copy loop only records when it last
    made progress; this timer wakes at the earliest deadline that could have passed,
    re-arms itself if progress was made in the meantime, and only on a real deadline
    interrupts the loop's pending read or write by cancelling its task (the loop tells
    that apart from a client disconnect by ``reason`` and hands a real cancel on).
    """

    __slots__ = ("loop", "task", "idle", "send", "total_deadline", "beat", "tracker", "last",
                 "last_beat", "reading", "reason", "handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float, send: float,
                 total_deadline: float, beat: float, tracker: BoundaryTracker | None) -> None:
        self.loop = loop
        self.task = asyncio.current_task()
        self.idle, self.send, self.total_deadline = idle, send, total_deadline
        self.beat, self.tracker = beat, tracker
        self.last = self.last_beat = loop.time()  # last progress: a read or a write returned
        self.reading = False
        self.reason: End | None = None
        self.handle: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        # A write begins after `last` (data) or `last_beat` (a heartbeat), so waking at
        # the earlier of idle and send from there is never late for either.
        since = max(self.last, self.last_beat)
        when = min(self.last + self.idle, since + self.send, self.total_deadline)
        if self.tracker is not None:
            when = min(when, since + self.beat)
        self.handle = self.loop.call_at(when, self._fire) if when != math.inf else None

    def _fire(self) -> None:
        now = self.loop.time()
        reason: End | None = None
        if now >= self.total_deadline:
            reason = End.TOTAL_TIMEOUT
        elif not self.reading:
            if now >= max(self.last, self.last_beat) + self.send:
                reason = End.SEND_TIMEOUT
        elif now >= self.last + self.idle:
            reason = End.IDLE_TIMEOUT
        elif self.tracker is not None and now >= max(self.last, self.last_beat) + self.beat:
            if self.tracker.at_boundary:
                self.last_beat = now
                self._interrupt("heartbeat")
                return
            self.last_beat = now  # never inside a held event; try again one period later
        if reason is not None:
            self._interrupt(reason)
            return
        self._arm()

    def _interrupt(self, reason: End | str) -> None:
        self.reason = reason  # type: ignore[assignment]
        if self.task is not None:
            self.task.cancel()

    def woke(self) -> End | str | None:
        """After a CancelledError: our reason, or None when the cancel came from outside."""
        reason, self.reason = self.reason, None
        if reason is None or self.task is None:
            return None
        if self.task.uncancel() > 0:  # a real cancellation arrived as well: honour it
            return None
        if reason == "heartbeat":
            self._arm()
        return reason

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class Stream:
    """Copies one upstream body to the client; its counters are live for the handler.

    The handler reads ``bytes_out``, ``events``, ``heartbeats``, ``injected`` and
    ``usage()`` when the request ends, however it ends — a client that leaves mid-stream
    is logged with what it really received.
    """

    def __init__(self, request: web.BaseRequest, resp: aiohttp.ClientResponse,
                 provider: providers.Provider, timeouts: Any, heartbeat: float,
                 request_id: str) -> None:
        self.request, self.resp, self.provider = request, resp, provider
        self.timeouts, self.heartbeat = timeouts, heartbeat
        self.request_id = request_id
        ctype = media_type(resp.headers.get("Content-Type", ""))
        identity = resp.headers.get("Content-Encoding", "identity").lower() in ("", "identity")
        sse = ctype == "text/event-stream"
        self.endpoint = provider.endpoint(resp.url.raw_path)
        self.json_body = identity and (ctype == "application/json" or ctype.endswith("+json"))
        self.out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                      headers=for_client(resp.headers, request_id, sse))
        self.committed = False
        # A compressed SSE body cannot be split into events: it is piped, never added to.
        self.tracker = BoundaryTracker() if sse and identity else None
        self.meter = UsageMeter()
        self.bytes_out = 0
        self.heartbeats = 0
        self.injected: End | None = None
        self.stop_reason: End | None = None
        self.ended = False  # the upstream said its last word (end marker or its own error)
        self.stalled = False  # a deadline passed while the client was not reading
        self.last_block = b""
        self.crlf: bool | None = None  # the upstream's line ends, from its first released block

    @property
    def events(self) -> int:
        return self.tracker.blocks if self.tracker is not None else 0

    def usage(self, partial: bool) -> Usage | None:
        return self.meter.result(partial=partial)

    def stop(self, reason: End) -> None:
        """End the stream from outside (drain): wake the copy loop by closing the upstream."""
        self.stop_reason = reason
        self.resp.close()

    async def relay(self) -> End:
        """Send the headers (the point of no return), copy the body, say how it ended.

        The upstream response is released to its pool only when it was read to the end;
        on every other path, including a cancelled task, its connection is closed.
        """
        ok = False
        try:
            await self.out.prepare(self.request)
            self.committed = True
            reason = await self._copy()
            if reason != End.DONE and self.ended:
                reason = End.DONE  # the provider had already said its last word
            if reason != End.DONE and not await self._inject(reason):
                # Nothing in-band can say "failed" here: end without a clean final chunk.
                # A client that reads nothing would hold a flushing close open: abort.
                transport = self.request.transport
                if transport is not None:
                    transport.abort() if self.stalled else transport.close()
            ok = reason == End.DONE
            return reason
        except ConnectionError:
            return End.CLIENT_GONE
        finally:
            if ok:
                self.resp.release()
            else:
                self.resp.close()  # never pool a connection whose response was not read to the end

    async def _copy(self) -> End:
        loop = asyncio.get_running_loop()
        content = self.resp.content
        t = self.timeouts
        tracker = self.tracker
        clock = _Clock(loop, t.idle or math.inf, t.send or math.inf,
                       loop.time() + t.total if t.total else math.inf,
                       self.heartbeat if tracker is not None and self.heartbeat else math.inf,
                       tracker)
        ends = self.endpoint.ends if tracker is not None else None
        meter = self.meter
        write = self.out.write
        try:
            while True:
                clock.reading = True
                try:
                    chunk = await content.readany()
                except asyncio.CancelledError:
                    woke = clock.woke()
                    if woke is None:
                        raise
                    if woke != "heartbeat":
                        return woke  # type: ignore[return-value]
                    clock.reading = False
                    self.heartbeats += 1
                    stalled = await self._write(write, HEARTBEAT, clock)
                    if stalled is not None:
                        return stalled
                    continue
                except (aiohttp.ClientError, OSError):
                    return self.stop_reason or End.UPSTREAM_RESET
                clock.reading = False
                clock.last = loop.time()
                if not chunk:
                    return await self._at_eof(write)
                if tracker is not None:
                    chunk = tracker.feed(chunk)
                    if not chunk:
                        continue
                    if ends is not None and not self.ended and ends(chunk):
                        self.ended = True
                    meter.observe_events(chunk)
                    self.last_block = chunk
                    if self.crlf is None:
                        self.crlf = b"\r" in chunk
                elif self.json_body:
                    meter.observe_body(chunk)
                stalled = await self._write(write, chunk, clock)
                if stalled is not None:
                    self.ended = False  # the client never got the chunk that ended it
                    return stalled
                self.bytes_out += len(chunk)
                clock.last = loop.time()  # upstream silence counts from when relayd can read again
        finally:
            clock.stop()

    async def _write(self, write: Any, data: bytes, clock: _Clock) -> End | None:
        """Write; the deadline that interrupted a client reading nothing, else None."""
        try:
            await write(data)
            return None
        except asyncio.CancelledError:
            woke = clock.woke()
            if woke is None:
                raise
            self.stalled = True
            return woke  # type: ignore[return-value]

    async def _at_eof(self, write: Any) -> End:
        if self.stop_reason:
            return self.stop_reason
        tracker = self.tracker
        if tracker is None:
            return End.DONE
        tail = tracker.tail
        if (self.ended or not self.endpoint.natural_end
                or (tail and self.provider.tail_is_error(tail))):
            if tail:
                await write(tail)
                self.bytes_out += len(tail)
            return End.DONE
        return End.UPSTREAM_EOF

    async def _inject(self, reason: End) -> bool:
        """Write the one error event; False where none can be written."""
        tracker = self.tracker
        if tracker is None or not tracker.aligned or self.stalled:
            return False
        t = self.timeouts
        message = providers.REASON_TEXT[reason].format(
            bytes=self.bytes_out, idle=fmt(t.idle), total=fmt(t.total),
            send=fmt(t.send))
        last = self.last_block
        crlf = self.crlf if self.crlf is not None else self.provider.crlf
        event = self.endpoint.error_event(reason, f"relayd: {message} (request id {self.request_id})",
                                          last, crlf)
        await self.out.write(event)
        self.injected = reason
        return True

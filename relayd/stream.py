"""After commit: the response body, from the upstream to a client that already has headers.

Once the status line went out nothing can be retried; what is left is to copy faithfully
and to end honestly.  SSE bodies are forwarded a complete block at a time
(``sse.BoundaryTracker``) so that relayd's own bytes — heartbeat comments, one error
event — can only land between events, and a stream that completes is byte for byte the
upstream's.  A failure after headers becomes exactly one error event in the endpoint's
own format (``providers.Endpoint``) and a clean end; other bodies end by closing the
connection, the only failure signal HTTP/1.1 has after headers.

The body is pushed, not pulled.  Pulling each read through aiohttp's ``StreamReader``
cost a future, a task wake-up and a chunked-writer call per read — most of relayd's CPU
per event (bench/PROFILE.md).  Instead the response's reader becomes a ``_Pushed`` one:
aiohttp's parser still frames the body, but hands the bytes to a list, and the upstream
protocol (``upstream_conn.Guarded``) calls ``Stream.pump`` once after each read, which
writes what is complete to the client transport in one write.  The handler task only
waits: for the end, for a deadline, or for a slow client to drain.  While the client
drains, the upstream connection stops reading, so a client that reads nothing holds at
most the transport's high-water mark and one read.

One timer per stream (``StreamClock``) watches every deadline: upstream silence (``idle``),
the response from its headers to its end (``total``), a client that accepts nothing
(``send``) and heartbeats.
"""

from __future__ import annotations

import asyncio
import gc
import math
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from . import lean, logs, providers
from .clock import StreamClock
from .exchange import End
from .forward import fmt
from .headers import UpstreamAnswer, for_client, media_type, relocate
from .sse import BoundaryTracker
from .upstream_conn import kernel_queued
from .upstream_http import Response
from .usage import Unmetered, Usage, UsageMeter

_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_WRITELINES = 16384  # from this size a chunk is sent with its framing by writev, not copied
# For the per-event path: on 3.11 ``End.DONE`` goes through ``EnumType``'s Python-level
# attribute hook, about 100 ns a lookup; a module global is a dict read.
_DONE, _GONE = End.DONE, End.CLIENT_GONE


class _Pushed(aiohttp.StreamReader):
    """A response reader whose body bytes go to the stream's list instead of a buffer.

    The instance's class is swapped in place (``__slots__ = ()`` keeps the layout) because
    aiohttp's parser holds the reader it created.  Only the body path changes: marking the
    end or an error, and the callbacks that return the connection to its pool, stay
    aiohttp's own.  Chunk-boundary bookkeeping is for ``readchunk``, which nothing uses.
    """

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        self._protocol.pushed.append(data)  # type: ignore[attr-defined]
        return False

    # The parser calls these two around every HTTP chunk (two Python calls per event):
    # a C function that takes no argument and changes nothing costs less than a frame.
    # (Builtins do not bind, so the instance is not passed.)
    begin_http_chunk_receiving = end_http_chunk_receiving = gc.isenabled  # type: ignore[assignment]


class _Out(UpstreamAnswer, web.StreamResponse):
    """The client response: its head waits for the first body bytes and leaves with them.

    aiohttp's ``StreamResponse`` sends the head at ``prepare`` in a write of its own, so an
    upstream read holding the headers and the first event cost the client two sends
    (``Response`` opts out the same way).  ``_copy`` sends the head alone only when no
    body byte came with it.
    """

    _send_headers_immediately = False


class _UntypedOut(_Out):
    """A client response for an upstream answer without ``Content-Type``: aiohttp would
    add ``application/octet-stream`` to it, and a proxy adds no header of its own
    (nginx neither)."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self._headers.popall("Content-Type", None)


def flush_deadline(transport: asyncio.Transport | None, send: float) -> None:
    """``send`` for what is left in the client transport's buffer when the stream's clock
    has stopped.  The last bytes of an answer (under the buffer's pause mark) wait there
    for the client; a client that never reads held the connection open with no deadline,
    a graceful close or a keep-alive expiry waiting to flush them.  nginx's send_timeout
    covers every write: so does this.  No progress for ``send`` aborts the connection."""
    if send and transport is not None and _waiting(transport):
        _flush_later(transport, send, _unsent(transport))


def _flush_later(transport: asyncio.Transport, send: float, before: int) -> None:
    handle = asyncio.get_running_loop().call_later(send, _flushing, transport, send, before)
    # The connection's next answer cancels it when it begins (``server.Request._prepare_hook``):
    # it has its own deadlines, and its bytes are not this answer's lack of progress.
    proto = transport.get_protocol()
    if hasattr(proto, "flush_timer"):
        proto.flush_timer = handle


def _flushing(transport: asyncio.Transport, send: float, before: int) -> None:
    if not _waiting(transport):
        return  # all in the kernel's hands (the connection's close can complete)
    left = _unsent(transport)
    if left >= before:
        transport.abort()
    else:  # the client reads: another period
        _flush_later(transport, send, left)


def _waiting(transport: asyncio.Transport) -> bool:
    """Bytes of relayd's wait for the client.  A TLS transport's own buffer does not count
    what it handed to the connection under it (uvloop hides that transport), which fills
    when the kernel's does: there, bytes the kernel could not send tell instead."""
    if transport.get_write_buffer_size():
        return True
    return (transport.get_extra_info("ssl_object") is not None
            and kernel_queued(transport, unsent_only=True) > 0)


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes not yet taken by the client: relayd's buffer and what the kernel could not
    send yet (a client reading slowly empties the kernel's first; relayd's moves only after)."""
    return transport.get_write_buffer_size() + kernel_queued(transport, unsent_only=True)


class Stream:
    """Copies one upstream body to the client; its counters are live for the handler.

    The handler reads ``bytes_out``, ``events``, ``heartbeats``, ``injected`` and
    ``usage()`` when the request ends, however it ends — a client that leaves mid-stream
    is logged with what it really received.
    """

    __slots__ = ("request", "resp", "provider", "timeouts", "heartbeat", "request_id", "endpoint",
                 "json_body", "out", "committed", "tracker", "_ends", "meter", "bytes_out",
                 "heartbeats", "injected", "stop_reason", "ended", "stalled", "last_block", "crlf",
                 "_pending", "_result", "_blocked", "_waiter", "_proto", "_transport", "_chunked",
                 "_writer", "_high", "_clock", "_unsent_mark")

    def __init__(self, request: web.BaseRequest, resp: aiohttp.ClientResponse,
                 provider: providers.Provider, timeouts: Any, heartbeat: float,
                 request_id: str, moved: tuple[str, str] = ("", "")) -> None:
        """``moved``: (the upstream's URL prefix, the route's path prefix) — URLs of the
        upstream's in its answer's headers are rewritten to relayd's (``headers.relocate``)."""
        self.request, self.resp, self.provider = request, resp, provider
        self.timeouts, self.heartbeat = timeouts, heartbeat
        self.request_id = request_id
        ctype = media_type(resp.headers.get("Content-Type", ""))
        identity = resp.headers.get("Content-Encoding", "identity").lower() in ("", "identity")
        sse = ctype == "text/event-stream"
        upstream_path = resp.url.raw_path
        self.endpoint = provider.endpoint(upstream_path)
        self.json_body = identity and (ctype == "application/json" or ctype.endswith("+json"))
        # A compressed SSE body cannot be split into events: it is piped, never added to.
        # Nor is an answer without a body (HEAD, 204, 304): an error event after it would
        # be read as the next response on the client's connection.  So such an answer
        # keeps the upstream's Content-Length (a HEAD's says what a GET would get).
        bodiless = request.method == "HEAD" or resp.status in (204, 304)
        headers = for_client(resp.headers, request_id, sse and not bodiless)
        relocate(headers, moved, request)
        # (from what the client gets: a Content-Type the upstream listed in Connection is gone)
        out = _Out if "Content-Type" in headers else _UntypedOut
        self.out = out(status=resp.status, reason=resp.reason, headers=headers)
        if type(resp) is Response:  # (aiohttp's own ClientResponse keeps its head)
            # Copied for the client: a held stream does not keep the upstream's head too
            # (a provider's is 20-odd headers, rate limits and cookies, about 1.5 KB).
            resp.headers = _NO_HEADERS
        self.committed = False
        self.tracker = BoundaryTracker() if sse and identity and not bodiless else None
        self._ends = self.endpoint.ends if self.tracker is not None else None
        self.meter = (UsageMeter() if provider.generates(request.method, upstream_path)
                      else Unmetered())
        self.bytes_out = 0
        self.heartbeats = 0
        self.injected: End | None = None
        self.stop_reason: End | None = None
        self.ended = False  # the upstream said its last word (end marker or its own error)
        self.stalled = False  # a deadline passed while the client was not reading
        self.last_block = b""
        self.crlf: bool | None = None  # the upstream's line ends, from its first released block
        # The push path (set up by _copy).
        self._pending: list[bytes] = []  # body bytes parsed from the current read
        self._result: End | None = None  # how the body ended, once known
        self._blocked = False  # the client's buffer is full: upstream reading is paused
        self._waiter: asyncio.Future[None] | None = None
        self._proto: Any = None  # the upstream connection's protocol while attached
        self._transport: asyncio.Transport | None = None
        self._chunked = False
        self._writer: Any = None
        self._high = 0
        self._clock: StreamClock | None = None
        self._unsent_mark = 0  # bytes the client had not taken when the last wait for it began

    @property
    def events(self) -> int:
        return self.tracker.blocks if self.tracker is not None else 0

    def usage(self, partial: bool) -> Usage | None:
        """``partial``: the stream did not end as the upstream ended it.  Nor is the count
        final where usage can follow the natural end and the client left before the
        upstream's body ended (review 82: Gemini's count logged final, without its output)."""
        if self.endpoint.usage_after_end and self._result is not _DONE:
            partial = True
        return self.meter.result(partial=partial)

    def stop(self, reason: End) -> None:
        """End the stream from outside (drain): close the upstream and wake the handler."""
        self.stop_reason = reason
        self.resp.close()
        if self._proto is not None:
            self.pump()
        clock = self._clock
        if clock is not None and not clock.reading:
            # Waiting for a client that does not read: nothing the upstream does wakes
            # that wait (it ended as "client_gone" when the drain's end cancelled it).
            clock.interrupt(reason)

    async def relay(self) -> End:
        """Send the headers (the point of no return), copy the body, say how it ended.

        The upstream response is released to its pool only when it was read to the end;
        on every other path, including a cancelled task, its connection is closed.
        """
        ok = False
        try:
            writer = await self.out.prepare(self.request)
            self.committed = True
            # The head is serialized in the writer now; its headers are not read again.
            self.out._headers = CIMultiDict()
            reason = await self._copy(writer)
            if reason is End.CLIENT_GONE:
                return End.DONE if self.ended else reason  # (after the last word: ``App._gone``)
            if reason != End.DONE and self.ended:
                # The provider had already said its last word.  Its own error after it
                # (Gemini's bare JSON), held as an unfinished tail when the connection then
                # broke or stalled, still reaches the client, as at a clean close (review 76).
                tail = self.tracker.tail if self.tracker is not None else b""
                if tail and not self.stalled and self.provider.tail_is_error(tail):
                    await self.out.write(tail)
                    self.bytes_out += len(tail)
                reason = End.DONE
            if reason != End.DONE and not await self._inject(reason):
                # Nothing in-band can say "failed" here: end without a clean final chunk.
                # A client that reads nothing would hold a flushing close open: abort.
                transport = self.request.transport
                if transport is not None:
                    if self.stalled:  # what relayd still held never reaches the client
                        self.bytes_out = max(0, self.bytes_out - transport.get_write_buffer_size())
                        transport.abort()
                    else:
                        transport.close()
            if not self.stalled:
                flush_deadline(self.request.transport, self.timeouts.send)
            ok = reason == End.DONE
            return reason
        except ConnectionError:
            return End.CLIENT_GONE
        finally:
            if ok:
                self.resp.release()
            else:
                self.resp.close()  # never pool a connection whose response was not read to the end

    async def _copy(self, writer: Any) -> End:
        loop = asyncio.get_running_loop()
        resp = self.resp
        content = resp.content
        transport = self._transport = self.request.transport
        if transport is not None:
            self._high = transport.get_write_buffer_limits()[1]
        self._chunked = writer.chunked
        self._writer = writer
        try:
            first = self._take(self._buffered(content))
            conn = resp.connection
            if self._result is None:
                if conn is None or conn.protocol is None or type(content) is not aiohttp.StreamReader:
                    self._result = End.UPSTREAM_RESET
                else:
                    proto = self._proto = conn.protocol
                    proto.pushed = self._pending
                    content.__class__ = _Pushed
                    lean.drop_buffer(content)  # nothing is buffered in it again
                    proto.sink = self.pump
            if self._result is End.DONE:
                # The whole body came with the head (most JSON answers): head, body and
                # end leave in one write, and only a client too slow to take them needs
                # the clock.
                writer._send_headers_with_payload(first, True)
                writer._eof = True
                if transport is not None and transport.get_write_buffer_size() > self._high:
                    self._start_clock()
                    stalled = await self._await_client(writer.drain())
                    if stalled is not None:
                        return stalled
                self.bytes_out += len(first)
                return End.DONE
            clock = self._start_clock()
            if first:
                stalled = await self._await_client(self.out.write(first))
            else:
                writer.send_headers()  # the client learns the status now, not at the first event
                stalled = None
            if stalled is not None:
                return stalled
            self.bytes_out += len(first)
            while self._result is None:
                if self._blocked:
                    stalled = await self._await_client(writer.drain())
                    if stalled is not None:
                        return stalled
                    self._blocked = False
                    clock.last = loop.time()  # upstream silence counts from when relayd reads again
                    upstream = self._proto.transport
                    if upstream is not None:
                        upstream.resume_reading()
                    continue
                clock.wait_for_upstream()
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                except asyncio.CancelledError:
                    woke = clock.woke()
                    if woke is None:
                        raise
                    # A deadline that fell in the turn the body ended (its final chunk may
                    # be written already) does not make the ended stream a failed one.
                    return self._result if self._result is not None else woke
                finally:
                    self._waiter = None
            return self._result
        finally:
            if self._clock is not None:
                self._clock.stop()
                self._clock = None  # the clock holds self._beat: no cycle for the GC to find
            proto = self._proto
            if proto is not None and proto.sink == self.pump:  # (not if another request has it now)
                proto.sink = None
                proto.pushed.clear()

    def _start_clock(self) -> StreamClock:
        loop = asyncio.get_running_loop()
        t = self.timeouts
        self._clock = StreamClock(
            loop, t.idle or math.inf, t.send or math.inf,
            loop.time() + t.total if t.total else math.inf,
            self.heartbeat if self.tracker is not None and self.heartbeat else math.inf,
            self._beat, self._took)
        return self._clock

    @staticmethod
    def _buffered(content: aiohttp.StreamReader) -> bytes:
        """Everything the reader holds.  What came with the headers goes out with them.

        One ``read_nowait`` is not enough: reading can resume a reader that paused on a
        full buffer, which parses held-back bytes into it again, after the read.
        """
        parts = []
        try:
            # Until it comes back empty: ``is_eof`` only says the end has been parsed,
            # and a resumed parser can parse the rest of a read and the end at once.
            while part := content.read_nowait():
                parts.append(part)
        except (aiohttp.ClientError, OSError):
            pass  # the error stays on the reader for _take
        return b"".join(parts)

    # -- the push path: runs in the upstream connection's data_received / connection_lost

    def pump(self) -> None:
        """After each upstream read and at the connection's loss: forward what is complete.

        Each parsed piece (an HTTP chunk: nearly always one event) is taken on its own and
        the pieces leave in one write.  Joining a large read first and then slicing it at
        its last boundary made two short-lived copies of up to 256 KiB per read, which
        fragment the heap: a client that stops reading cost about 100 KiB more RSS.
        """
        pending = self._pending
        if self._result is not None:
            pending.clear()
            return
        try:
            outs = []
            ended = self.ended
            if pending:
                clock = self._clock
                assert clock is not None
                clock.last = clock.loop.time()
                self._feed(pending, outs)
                pending.clear()
            content = self.resp.content
            if content._eof or content._exception is not None:  # (is_eof(), exception())
                tail = self._end()
                if tail:
                    outs.append(tail)
            # A chunked body that ended here ends in the same write as its last bytes: the
            # client's SDK waits for the final chunk, which would otherwise wait for this
            # request's handler to run again (behind every other stream ending with it).
            last = self._result is _DONE and self._chunked
            if outs or last:
                self.bytes_out += self._send(outs, last)  # the upstream's: heartbeats do not count
                if self._result is _GONE and not ended:
                    self.ended = False  # the last word was in this write: it never left
                if last and self._result is _DONE:  # (not if the client turned out gone)
                    self._writer._eof = True  # aiohttp's write_eof: nothing left to write
        except Exception:
            # A relayd bug here runs in the upstream connection's callback, not in the
            # handler: the stream would wait for ``idle`` and blame the upstream's silence.
            pending.clear()
            self._result = End.ERROR
            self.ended = False  # (an end marker it had seen was never sent)
            logs.get().error("internal error", request_id=self.request_id, exc_info=True)
        if self._result is not None or self._blocked:
            self._wake()

    def _wake(self) -> None:
        """Wake the handler when it has something to do: the body ended, or the client's
        buffer is full and it must wait for the drain (and resume the upstream)."""
        if self._result is not None or self._blocked:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _take(self, data: bytes) -> bytes:
        """What the reader held at takeover: bytes the client may have now (and the end)."""
        outs: list[bytes] = []
        if data:
            self._feed([data], outs)
        return b"".join(outs) + self._end()

    def _feed(self, pieces: list[bytes], outs: list[bytes]) -> None:
        """Upstream body bytes in, the complete blocks among them (with what was held)
        appended to ``outs``.  One call per read, not per piece: this is the per-event path."""
        tracker = self.tracker
        if tracker is not None:
            ends, meter = self._ends, self.meter
            for piece in pieces:
                out = tracker.feed(piece)
                if out:
                    if ends is not None and not self.ended and ends(out):
                        self.ended = True
                    meter.observe_events(out)
                    if out.find(b"data:") >= 0:  # (not a gateway's comment keep-alive: the error
                        self.last_block = out  # event continues the last event's numbers)
                    if self.crlf is None:
                        self.crlf = out.find(b"\r") >= 0
                    outs.append(out)
            return
        if self.json_body:
            for piece in pieces:
                self.meter.observe_body(piece)
        outs.extend(piece for piece in pieces if piece)

    def malformed(self) -> bool:
        """Did the body fail at the upstream's framing rather than with its connection?"""
        proto = self._proto
        if proto is None:
            conn = self.resp.connection
            proto = conn.protocol if conn is not None else None
        return bool(getattr(proto, "malformed", False))

    def _end(self) -> bytes:
        """Notes how the body ended, if it has; the held tail the client should still get."""
        content = self.resp.content
        if content.exception() is not None:
            self._result = self.stop_reason or End.UPSTREAM_RESET
        elif content.is_eof():
            if self.stop_reason:
                self._result = self.stop_reason
                return b""
            self._result = End.DONE
            tracker = self.tracker
            if tracker is not None:
                tail = tracker.tail
                if (self.ended or not self.endpoint.natural_end
                        or (tail and self.provider.tail_is_error(tail))):
                    if tail:  # an unterminated last event the client gets: its usage counts
                        self.meter.observe_events(tail)
                    return tail
                self._result = End.UPSTREAM_EOF
        return b""

    def _send(self, parts: list[bytes], last: bool = False) -> int:
        """Write to the client now (with ``last``, the final chunk too), saying how many
        body bytes; a full client buffer pauses the upstream (backpressure)."""
        tr = self._transport
        if tr is None or tr.is_closing():
            self._result = End.CLIENT_GONE
            return 0
        size = 0
        for part in parts:
            size += len(part)
        if self._chunked:
            # One chunk per write, however many pieces the read held: chunk framing is
            # hop-by-hop, and every chunk costs the client a parse step.
            framed = [b"%x\r\n" % size, *parts, b"\r\n"] if size else []
            if last:
                framed.append(b"0\r\n\r\n")
        else:
            framed = parts
        if size < _WRITELINES:
            tr.write(framed[0] if len(framed) == 1 else b"".join(framed))
        else:
            tr.writelines(framed)  # large parts are not copied
        if self._result is None and tr.get_write_buffer_size() > self._high:
            self._blocked = True
            # The transport, not the protocol: aiohttp's protocol-level pause also pauses
            # its parser, which would then hold the rest of a read until the next one.
            upstream = self._proto.transport
            if upstream is not None:
                upstream.pause_reading()
        return size

    def _beat(self) -> None:
        """The clock's heartbeat: only while reading, so never into a full client buffer,
        only at a block boundary, never inside a held event, and never after the
        provider's last word (a client may stop reading there: ``[DONE]``)."""
        tracker = self.tracker
        if (self._result is None and not self._blocked and tracker is not None
                and tracker.at_boundary and not self.ended):
            self.heartbeats += 1
            tracker.interject()
            self._send([self.provider.heartbeat])
            self._wake()  # the beat may have filled the client's buffer (or found it gone)

    def _took(self) -> bool:
        """The clock's question at the send deadline: did the client take bytes since the
        wait (or the last question) began?"""
        transport = self._transport
        if transport is None:
            return False
        left = _unsent(transport)
        before, self._unsent_mark = self._unsent_mark, left
        return left < before

    async def _await_client(self, write: Awaitable[None]) -> End | None:
        """Await a write or a drain; the deadline that interrupted it, else None."""
        clock = self._clock
        assert clock is not None
        if self._transport is not None:
            self._unsent_mark = _unsent(self._transport)
        clock.wait_for_client()
        try:
            await write
            return None
        except asyncio.CancelledError:
            woke = clock.woke()
            if woke is None:
                raise
            self.stalled = True
            self.ended = False  # the client never got the chunk that ended it
            return woke

    async def _inject(self, reason: End) -> bool:
        """Write the one error event; False where none can be written."""
        tracker = self.tracker
        if tracker is None or not tracker.aligned or self.stalled:
            return False
        t = self.timeouts
        text = providers.REASON_TEXT[reason]
        if reason is End.UPSTREAM_RESET and self.malformed():
            text = providers.MALFORMED_TEXT
        message = text.format(
            bytes=self.bytes_out, idle=fmt(t.idle), total=fmt(t.total),
            send=fmt(t.send))
        last = self.last_block
        after = self.request.query.get("starting_after", "") if not last else ""
        if after.isdigit():  # a resumed stream cut before its first event: after the cursor
            last = b'"sequence_number":' + after.encode()
        crlf = self.crlf if self.crlf is not None else self.provider.crlf
        event = self.endpoint.error_event(reason, f"relayd: {message} (request id {self.request_id})",
                                          last, crlf)
        await self.out.write(event)
        self.injected = reason
        return True

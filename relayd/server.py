"""Client connections: how long a client may take, how much head it may send, and what
it gets when it sends garbage.

aiohttp's ``RequestHandler`` has one idle timer (``keepalive_timeout``, 3630 s) and no
deadline for a request head that trickles in, so 1,000 half-open connections stay open
for an hour.  ``Connection`` adds nginx's two client clocks with one ``loop.call_at``
handle per connection (armed once per request head, never per byte):

- ``client_header``: the request line and headers must be complete within this long of
  the connection's accept (first request) or of the first byte of a keep-alive request;
  a connection that misses it is closed without a response (nginx logs a 408 and
  closes too).
- ``client_keepalive``: an idle keep-alive connection closes after this long (aiohttp's
  own keep-alive timer, set to this value).

``_Parser`` wraps aiohttp's request parser for what aiohttp does not do: it stops a
head that outgrows ``max_request_headers`` before aiohttp buffers up to its own ~1 MiB
(answered 431), it keeps a valid request that shares a TCP segment with a malformed
one (aiohttp drops every message of a segment that fails to parse), and it fails a request
body whose framing breaks (aiohttp leaves the request waiting for the rest).  Bodies are
never decompressed: they go upstream as sent.

Every response relayd itself makes says ``Server: relayd``; a relayed response keeps
the upstream's ``Server`` header, or has none (never aiohttp's own).

The allow lists are checked at accept (``allow.GATES``) before any of this runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser

from . import lean, logs
from .allow import GATES
from .headers import UpstreamAnswer, short_reason
from .tls import ListenerCert
from .stream import flush_deadline
from .upstream_http import NO_TIMER

SERVER = "relayd"
_QUEUE = 32  # aiohttp's MAX_MSG_QUEUE_SIZE: pipelined requests parsed ahead


# -- running out of file descriptors

class FdShortage:
    """asyncio stops accepting for a second on EMFILE/ENFILE and retries by itself;
    this turns its per-failure traceback into one warning per ``every`` seconds with
    counts, so an operator sees "out of file descriptors" and not log spam."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, log: object, every: float = 10.0) -> None:
        self.log, self.every = log, every
        self.total = 0
        self._since = 0
        self._last = -every

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        if context.get("message") != self.MESSAGE or not isinstance(exc, OSError):
            loop.default_exception_handler(context)
            return
        self.total += 1
        self._since += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            self.log.warning("out of file descriptors: not accepting connections for 1s",
                             error=exc.strerror, failures=self._since, failures_total=self.total)
            self._last, self._since = now, 0


def exception_handler(log: object) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The loop's exception handler for a process that accepts connections: running out
    of descriptors is one warning per 10 s (with counts), anything else ``logs.loop_exception``.
    The main process with workers needs it too, for its admin listener: there asyncio
    reported EMFILE up to a backlog's worth of times a second, each an error line with a
    traceback (review 80: 608 lines in 5 s)."""
    shortage = FdShortage(log)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        (shortage if context.get("message") == FdShortage.MESSAGE else logs.loop_exception)(
            loop, context)
    return handle


class FdWatch:
    """uvloop (libuv) never reports EMFILE on accept: it accepts and closes the excess
    connections itself.  This samples the process's fd table once a second and says
    the same "out of file descriptors" as ``FdShortage`` while the table is full."""

    def __init__(self, log: object, every: float = 10.0) -> None:
        self.log, self.every = log, every

    async def run(self) -> None:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        last, full = -self.every, 0
        while limit != resource.RLIM_INFINITY:
            await asyncio.sleep(1)
            fds = _open_fds(limit)
            if fds < limit - 2:
                continue
            full += 1
            if time.monotonic() - last >= self.every:
                last = time.monotonic()
                self.log.warning("out of file descriptors: new connections are closed at once",
                                 fds=fds, limit=limit, full_checks=full)


def _open_fds(limit: int) -> int:
    """The process's open descriptors.  Linux 6.2 and later give the count as the size of
    /proc/self/fd, one ``stat``; listing the directory (older kernels) cost a worker
    holding a few thousand streams a millisecond every second."""
    try:
        n = os.stat("/proc/self/fd").st_size
        return n if n > 0 else len(os.listdir("/proc/self/fd")) - 1  # minus the listing's own fd
    except OSError:  # no /proc, or the table is full right now
        return limit


# -- errors that never reach the handler

class HeadTooLarge(HttpProcessingError):
    """The request head outgrew ``max_request_headers`` before it was complete."""

    code = 431
    message = "Request Header Fields Too Large"


# Called for requests aiohttp could not parse (and handler failures aiohttp caught):
# (peer address, status, short reason, request line if known, seconds the request had
# taken already) → the response to send.
Reject = Callable[[str | None, int, str, bytes, float], web.StreamResponse]


class _Parser:
    """aiohttp's request parser, plus a head-size cap and recovery of pipelined requests."""

    def __init__(self, conn: "Connection", make: Callable[..., Any], cap: int) -> None:
        self.conn, self._make, self._cap = conn, make, cap
        self._real = make()
        self._head = 0               # bytes of the current unfinished head
        self.first_line = b""        # start of the current head, for error responses
        self._clean = True           # the parser holds no partial message
        self._body: Any = None       # the payload of a request whose body is still coming
        self._pending: HttpProcessingError | None = None
        # A segment that began at a message boundary and that the parser holds part of
        # (its queue of parsed requests was full), with how many of its requests were
        # handed out: an error in the held part can still keep the requests before it.
        self._segment: bytes | None = None
        self._handed = 0
        self._held = False      # the parser may hold requests back (its queue was full)
        self._waking = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def feed_data(self, data: bytes) -> Any:
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc
        if not data:
            return self._resumed()
        in_body = self._body is not None and not self._body.is_eof()
        at_start = not in_body and self._head == 0
        clean = at_start and self._clean
        if at_start:
            end = data.find(b"\r\n", 0, 8192)
            self.first_line = bytes(data[:end if end >= 0 else 8192])
            self.conn.head_started()
        elif in_body:
            # A head that fails after this body's end, in this read, is not the request
            # whose body this is: its error must not be logged under that request's line.
            self.first_line = b""
        self._segment = None
        try:
            result = self._real.feed_data(data)
        except HttpProcessingError as exc:
            if in_body:
                self._fail_body(self._body, exc)
            return self._recover(bytes(data), exc, clean)
        messages = result[0]
        if messages and messages[-1][0].upgrade and not result[1]:
            # llhttp stops after a request asking for an upgrade aiohttp does not take
            # (h2c: ``curl --http2`` on http://), and aiohttp drops the rest of the read: a
            # request pipelined behind it would wait unanswered until client_keepalive.
            # The connection closes after the answer instead, which tells a client to
            # send again what it did not get an answer to (RFC 9112 §9.3.2).
            self.conn._close = True
        if messages:
            # The parser pauses when the requests queued and not yet handled reach its cap:
            # it may have stopped short of the end of this read.  (One below the cap: the
            # parser's own count runs one high after a request taken before its body came.)
            held = self._held = len(self.conn._messages) + len(messages) >= _QUEUE - 1
            if held and clean:
                self._segment, self._handed = bytes(data), len(messages)
            self._parsed(messages, not held and bytes(data[-4:]) == b"\r\n\r\n")
        else:
            self._clean = False
            if not in_body:
                self._head += len(data)
                if self._head > self._cap:
                    raise HeadTooLarge()
        return result

    @property
    def head_bytes(self) -> int:
        """Bytes of a request head begun and not complete (0 between requests)."""
        return self._head

    def message_consumed(self) -> None:
        """aiohttp took a request from its queue.  While the parser may hold requests back,
        have it parse on: aiohttp resumes it only when it paused the socket too, and the
        parser's count can pause it while aiohttp's queue is one short of that."""
        self._real.message_consumed()
        if self._held and not self._waking:
            self._waking = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._waking = False
        if self.conn.transport is not None and not self.conn.transport.is_closing():
            self.conn.data_received(b"")

    def _resumed(self) -> Any:
        """aiohttp resuming the parser (its request queue drained, or a body read down):
        what it parses now is accounted like any read's requests."""
        try:
            result = self._real.feed_data(b"")
        except HttpProcessingError as exc:
            self._fail_body(self._body, exc)
            segment, self._segment = self._segment, None
            if segment is None:
                raise
            return self._recover(segment, exc, True, skip=self._handed)
        messages = result[0]
        if messages:
            self._handed += len(messages)
            self._parsed(messages, False)
        return result

    @staticmethod
    def _fail_body(body: Any, exc: HttpProcessingError) -> None:
        """A request body the error broke: the request handling it (or about to) is told,
        or it would wait for the rest until ``first_byte``."""
        if body is not None and not body.is_eof() and body.exception() is None:
            body.set_exception(web.RequestPayloadError(f"malformed request body: {_short(exc)}"))

    def _parsed(self, messages: list[Any], clean: bool) -> None:
        self._head = 0
        last = messages[-1][1]
        self._body = None if last.is_eof() else last
        self._clean = clean and self._body is None
        self.conn.head_done()

    def _recover(self, data: bytes, exc: HttpProcessingError, clean: bool, skip: int = 0) -> Any:
        """Parse the failing segment again, head by head, to keep the requests before
        the broken one (less the ``skip`` already handed out).  Only from a message
        boundary: mid-message bytes read as a fresh request could smuggle one in."""
        if not clean:
            raise exc
        # No queue cap while re-parsing (a capped parser pauses at 32 and would drop the
        # rest); the connection answers these, then the error, and closes.
        fresh, got, start, head = self._make(2**30), [], 0, 0
        while start < len(data):
            end = data.find(b"\r\n\r\n", start)
            end = len(data) if end < 0 else end + 4
            try:
                msgs = fresh.feed_data(data[start:end])[0]
            except HttpProcessingError:
                break
            if msgs:
                head = start  # (where the last request parsed began: a body broken next is its)
            got.extend(msgs)
            start = end
        got = got[skip:]
        if not got:
            raise exc
        # The error is logged under the broken request's line, not the segment's first:
        # the head that failed, or the request whose body did.
        at = head if not got[-1][1].is_eof() else start
        end = data.find(b"\r\n", at, at + 8192)
        self.first_line = data[at:end if end >= 0 else at + 8192]
        self._fail_body(got[-1][1], exc)  # a body the error cut off is a malformed one
        self._real, self._pending = fresh, exc
        self.conn.head_done()
        self.conn.reparse_soon()
        return got, False, b""


_SOCKNAMES: dict[tuple[Any, ...], tuple[Any, ...]] = {}


class Connection(web.RequestHandler):
    """One client connection: aiohttp's handler with a request-head deadline."""

    def __init__(self, manager: "ClientServer", *, head_timeout: float, reject: Reject,
                 max_head: int, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_since: float | None = None  # when the unfinished head began, if one is
        self._reject = reject
        self._refused = False
        self.flush_timer: asyncio.TimerHandle | None = None  # ``stream.flush_deadline``'s
        self._allow: Any = ()  # the allow list this connection last passed
        self._messages = lean.SmallQueue()  # type: ignore[assignment]
        loop, size = kwargs["loop"], kwargs.get("read_bufsize", 2 ** 16)
        self._head_loop: asyncio.AbstractEventLoop = loop
        # auto_decompress=False: a body goes upstream as the client sent it, with its
        # Content-Encoding and Content-Length (decompressed under them, it could carry a
        # second request to the upstream on relayd's connection).
        self._parser = _Parser(self, lambda queue=_QUEUE: HttpRequestParser(
            self, loop, size, max_line_size=self.max_line_size,
            max_field_size=self.max_field_size, max_headers=self.max_headers,
            payload_exception=web.RequestPayloadError, auto_decompress=False,
            max_msg_queue_size=queue, timer=NO_TIMER), max_head)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if isinstance(manager, ClientServer):
            self._allow = manager.config().allow
            if not GATES["listen"].admits(transport, self._allow):
                self._refused = True  # never handed to aiohttp: nothing to clean up there
                return
        super().connection_made(transport)
        # Each request asks for the local address (aiohttp caches it per connection): a
        # listener's few addresses shared, not a tuple held by every held stream.
        sockname = transport.get_extra_info("sockname")
        if type(sockname) is tuple:
            shared = _SOCKNAMES.get(sockname)
            if shared is None and len(_SOCKNAMES) < 64:
                shared = _SOCKNAMES[sockname] = sockname
            sockname = shared or sockname
        self._cache["sockname"] = sockname
        self.head_started()

    def drain(self) -> None:
        """relayd is stopping: an idle keep-alive connection (or one whose next head is
        still arriving) closes now, as nginx's and Envoy's do; a busy one after its answer.
        (aiohttp's ``close`` only ends an idle connection's task, leaving its socket open
        until the drain ended: a request sent on it meanwhile waited and got nothing.)"""
        if self._request_in_progress or self._messages:
            self.close()
        else:
            self.force_close()

    def admitted_under(self, allow: Any) -> bool:
        """Is this connection's peer still allowed under ``allow`` (the request's config)?

        A reload that narrows ``allow`` must shut out keep-alive connections it admitted
        earlier too, as nginx checks its list per request: an abusive network would keep
        spending the operator's key on a connection it keeps busy.  The list is checked
        again only when it is another list than the one this connection last passed."""
        return GATES["listen"].still_admits(self, allow)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self.head_done()
        if self._head_timer is not None:  # it holds this connection: let both go now
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    # The head deadline is one lazily re-armed timer per connection, not a timer made
    # and cancelled per request (about 2.7 us each): a head only records when it began
    # and when it ended; the timer, when it fires, ends the connection if the head in
    # progress is late, or re-arms at that head's own deadline (so it is never late).

    def head_started(self) -> None:
        # A head has begun: client_header governs it now, not the keep-alive idle time (a
        # head begun a moment before that ran out was cut off; nginx's is not).  aiohttp's
        # keep-alive timer re-arms lazily at ``_next_keepalive_close_time``: moved past
        # this head's deadline, it stays one timer per connection, not one per request.
        if self._head_since is None and self._head_timeout > 0:
            now = self._head_since = self._head_loop.time()
            self._next_keepalive_close_time = now + self._head_timeout + 1.0
            if self._head_timer is None:
                self._head_timer = self._head_loop.call_at(now + self._head_timeout,
                                                           self._head_check)
        elif self._head_timeout <= 0 and self._keepalive_handle is not None:
            self._keepalive_handle.cancel()  # (no head deadline: keep-alive does not cut it either)
            self._keepalive_handle = None

    def head_done(self) -> None:
        self._head_since = None

    def reparse_soon(self) -> None:
        """Deliver the error kept back by ``_Parser`` after the good requests before it."""
        asyncio.get_running_loop().call_soon(self.data_received, b"")

    def _head_check(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None:
            return  # no head in progress: the next one arms the timer again
        deadline = since + self._head_timeout
        now = self._head_loop.time()
        if now < deadline:
            self._head_timer = self._head_loop.call_at(deadline, self._head_check)
            return
        if self._request_in_progress:
            # A head pipelined behind an answer still going: its time starts over (nginx
            # reads it only after that answer), and it is checked again then.  Dropped,
            # it had no deadline left at all (review 85).
            self._head_since = now
            self._head_timer = self._head_loop.call_at(now + self._head_timeout, self._head_check)
            return
        self._head_since = None
        if self.transport is not None:
            parser = self._parser
            if isinstance(parser, _Parser) and parser.head_bytes:
                # Part of a head came (slowloris, a stalled client): no answer, as nginx,
                # but an access line (408, header_timeout) where it logs its 408.
                peer = self.transport.get_extra_info("peername")
                self._reject(peer[0] if isinstance(peer, tuple) else None, 408,
                             "request head timed out", parser.first_line,
                             self._head_loop.time() - since)
            self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A JSON error (not aiohttp's plain text) with an access line, then close."""
        if status == 500 and exc is not None:
            # A relayd bug that escaped the handler: said before anything else, even when
            # the answer has begun and all that is left is to drop the connection.
            self.log_exception("handle_error", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        first = self._parser.first_line if isinstance(self._parser, _Parser) else b""
        if isinstance(exc, HeadTooLarge):
            status, why = 431, "request headers too large"
        elif status == 400 and first.startswith(b"PRI * HTTP/2.0"):
            # An HTTP/2 client with prior knowledge (h2c): say so, not llhttp's "Pause on PRI".
            status, why = 505, "HTTP/2 is not supported: relayd speaks HTTP/1.1"
        elif status == 400:
            why = f"malformed request: {_short(exc)}"
        else:
            why = "internal error" if status == 500 else "timed out"
        resp = self._reject(request.remote, status, why, first, 0.0)
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's error lines (a relayd bug it caught: ``Unhandled exception``) go to
        relayd's log; aiohttp's own loggers are silenced, their tracebacks being mostly
        client noise.  One of them is: a broken request body (a bad chunk size) raises
        again when aiohttp reads the rest of it after relayd's 400 — the client's framing,
        answered already, and the connection is closed by aiohttp right after."""
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError):
            return
        logs.get().error("request failed outside the handler", where=str(args[0]) if args else None,
                         exc_info=exc if isinstance(exc, BaseException) else True)


def _short(exc: BaseException | None) -> str:
    """aiohttp's parser messages quote the offending bytes; keep only the reason."""
    if exc is None:
        return "bad request"
    return short_reason(getattr(exc, "message", "") or type(exc).__name__) or "bad request"


class Request(web.BaseRequest):
    def _body_unasked(self) -> bool:
        """Answered before ``100 Continue`` was sent (a refusal, a 404): the client may
        never send the body it announced (RFC 9110 §10.1.1), and what it sends next on
        this connection would be read as that body (review 78).  The connection closes
        after the answer."""
        return (self.writer.output_size == 0 and not self._payload.is_eof()
                and self.headers.get("Expect", "").lower() == "100-continue")

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        proto = self.protocol
        flush = getattr(proto, "flush_timer", None)
        if flush is not None:
            # The last answer's leftover deadline (``stream.flush_deadline``) ends where
            # the next answer begins writing: its bytes are not that answer's lack of
            # progress (a pipelined request's answer was cut), and it has its own deadlines.
            # Not at the next head: a head that never completes would cancel it for good.
            flush.cancel()
            proto.flush_timer = None
        unasked = response.keep_alive and self._body_unasked()
        if unasked:
            # The connection closes, and at once: aiohttp would wait 10 s for the body
            # nobody asked for.
            self.protocol._lingering_time = 0.0
        if response.keep_alive and (unasked or getattr(self.protocol, "_close", False)):
            # The connection closes after this answer (an h2c upgrade request, a drain):
            # it says so, or a client would send its next request into the close.  (This
            # hook runs after aiohttp wrote the Connection header from keep_alive.)
            response.force_close()
            response.headers.popall("Connection", None)
            if self.version >= HttpVersion11:
                response.headers["Connection"] = "close"
        if isinstance(response, web.Response):
            # An answer written whole (relayd's own, a kept upstream error) gets ``send``
            # for its bytes once they are written, as a stream's last bytes do: a client
            # that pipelined requests and read nothing held the connection for good, each
            # answer's wait for the buffer to drain having no deadline (review 85).
            conn = self.protocol
            manager = getattr(conn, "_manager", None)
            if isinstance(manager, ClientServer) and self.transport is not None:
                send = manager.config().defaults.timeouts.send
                asyncio.get_running_loop().call_soon(flush_deadline, self.transport, send)
        # relayd's own responses (web.Response) say relayd where aiohttp put its own name;
        # an upstream's answer (headers.UpstreamAnswer) keeps its Server or carries none.
        if isinstance(response, web.Response) and not isinstance(response, UpstreamAnswer):
            if response.headers.get("Server") == SERVER_SOFTWARE:
                response.headers["Server"] = SERVER
            origin = self.headers.get("Origin")
            if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
                # A browser reads no answer without it: relayd's own errors would reach
                # browser code (and the SDKs in it) as opaque network failures.
                response.headers["Access-Control-Allow-Origin"] = "*"
                response.headers["Access-Control-Expose-Headers"] = "x-request-id, request-id"


class ClientServer(web.Server):
    """aiohttp's low-level server making ``Connection``s with the current limits, and
    the listener's TLS context (``tls.context``: None for plain HTTP)."""

    def __init__(self, handler: Any, current: Callable[[], Any], reject: Reject) -> None:
        super().__init__(handler, handler_cancellation=True, access_log=None,
                         request_factory=self._request)
        self._current, self._reject = current, reject
        self.tls = ListenerCert(current().tls)

    def config(self) -> Any:
        return self._current()

    def _request(self, message: Any, payload: Any, protocol: Any, writer: Any,
                 task: Any) -> web.BaseRequest:
        return Request(message, payload, protocol, writer, task, asyncio.get_running_loop())

    def __call__(self) -> web.RequestHandler:
        lim = self._current().limits
        return Connection(self, loop=asyncio.get_running_loop(), access_log=None,
                          keepalive_timeout=lim.client_keepalive, head_timeout=lim.client_header,
                          max_head=lim.max_request_headers, reject=self._reject)


def log_warnings(log: Any, config: Any) -> None:
    """Log what ``relayd check`` warns about (``Config.warnings``: a listener exposed with
    nothing guarding the keys) — at start and after each successful reload, so an
    operator who never ran ``check`` still sees it in the journal."""
    for text in config.warnings:
        log.warning("config warning", warning=text)

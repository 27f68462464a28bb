"""One upstream connection: the protocol under aiohttp's client that keeps a pooled
connection honest and hands a streamed body straight to its stream.

aiohttp's ``ResponseHandler`` parses whatever a connection receives, queues it as a
response, and drops what it parsed when its parser raises.  ``Guarded`` closes a
connection that speaks out of turn (it is never pooled again), relays an answer that junk
follows in the same read (as nginx does), fails a body the parser gave up on, and, once a
``stream.Stream`` takes a body over, feeds each read to the parser and the stream with
no more Python than that.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from contextvars import ContextVar
from typing import Any, Callable

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import _EXC_SENTINEL, EMPTY_BODY_STATUS_CODES, set_exception
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD

from . import lean

_SALVAGE_MAX = 2**16  # reads kept while a head trickles in (a first read is kept whatever its size)


_LINGER_RESET = struct.pack("ii", 1, 0)
_NO_PARAMS: dict[str, Any] = {}
# Set by ``upstreams.Pool.send`` around a request with a large body: the connection aiohttp
# picks for it learns so when the request is sent, whichever client path sends it.
LARGE_REQUEST: ContextVar[bool] = ContextVar("relayd_large_request", default=False)
_NO_PUSHED: list[bytes] = []  # (a stream gives its own list before anything is pushed)


_SIOCOUTQ = 0x5411     # Linux (TIOCOUTQ): bytes in a socket's send queue, sent but unacknowledged or unsent
_SIOCOUTQNSD = 0x894B  # Linux: only the bytes not sent yet
_INT = bytes(4)


def kernel_queued(transport: Any, unsent_only: bool = False) -> int:
    """Bytes of a connection the kernel still holds for the peer (0 where it cannot say).

    A transport's own write buffer empties as soon as the kernel takes its bytes; a peer
    that stopped reading leaves them queued there, unseen by the transport."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD if unsent_only
                                                  else _SIOCOUTQ, _INT))[0]
        except (OSError, ValueError):
            pass
    return 0


def _undelivered(transport: Any) -> bool:
    """Request bytes the upstream has not taken: in relayd's buffer or in the kernel's."""
    return bool(transport.get_write_buffer_size() or kernel_queued(transport))


def _reset(transport: Any) -> None:
    """Make the coming close a reset: a socket closed with bytes still in the kernel's send
    buffer otherwise goes on sending them, so an upstream could still receive a whole request
    whose client is gone.  A reset drops them, and the upstream learns at once."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass


class Guarded(ResponseHandler):
    """An upstream connection that is closed, never reused, when it speaks out of turn.

    aiohttp parses whatever an idle pooled connection receives and queues it as a
    response, so an upstream that writes an unsolicited response after a complete one
    would hand it to the next request — one client could read another's data.  nginx
    closes an idle upstream connection that receives bytes; so does this: bytes while no
    request is waiting for a response, or a second final response to one request, close
    the connection, and ``should_close`` keeps it out of the pool.
    """

    # Slots, not entries in aiohttp's instance dict: set per request, in varying order,
    # they made each connection's dict a larger unshared one (about 800 B per held stream).
    __slots__ = ("_awaiting", "_finals", "_heading", "_head_bytes", "_salvaging", "_params",
                 "sink", "pushed", "_large", "malformed")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffer = lean.SmallQueue()  # type: ignore[assignment]  # one response at a time
        self._awaiting = False  # a request was sent and its response has not ended yet
        self._finals = 0        # final (non-1xx) responses parsed for the current request
        self._heading = False   # no response parsed yet for the current request
        self._head_bytes: bytes | bytearray = b""  # what it has sent so far, for ``_salvage``
        self._salvaging = False  # a read of those bytes is being parsed
        self._params: dict[str, Any] = _NO_PARAMS  # the parser's settings, until a response is parsed
        # A stream that takes its body pushed (``stream.Stream``): the parser's body bytes
        # land in ``pushed`` and ``sink`` runs once after each read and at the connection's end.
        self.sink: Callable[[], None] | None = None
        self.pushed: list[bytes] = _NO_PUSHED
        self._large = False  # the request sent is a large upload (``LARGE_REQUEST``)
        self.malformed = False  # the parser gave up on the answer's bytes (not a lost connection)

    def set_response_params(self, **kwargs: Any) -> None:  # called once per request sent
        # A new request: the stream that took the last body over is done with this
        # connection, though its handler may not have run yet to say so (it can be waiting
        # for a slow client while the body ended and the connection went back to the pool).
        self.sink = None
        self._awaiting, self._finals, self._heading, self._params = True, 0, True, kwargs
        self._head_bytes = b""
        self._large = LARGE_REQUEST.get()
        self.malformed = False
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None and self._awaiting and self._read_timeout is None \
                and self._payload_parser is None and not self._upgraded:
            # A read of the body a stream took over, straight to the parser: what aiohttp's
            # ``data_received`` adds (a read-timeout re-arm relayd never asks for, the
            # message loop, websocket and upgrade branches) is a Python frame and a dozen
            # tests per event.  Any message parsed now (a response after the body ended)
            # is out of turn.
            try:
                messages = self._parser.feed_data(data)[0]
            except Exception as exc:
                self._body_failed(exc)
            else:
                if messages or (not self._awaiting and self._started_another()):
                    self._poisoned()
            sink()
            return
        if not self._awaiting and data and not self.upgraded:  # mid-response: one attribute test
            self._poisoned()
            return
        if self._heading and data:
            self._read_heading(data)
        else:
            super().data_received(data)
        if not self._awaiting and self._started_another():
            self._poisoned()
        if self.sink is not None:
            self.sink()

    def _read_heading(self, data: bytes) -> None:
        """A read before any answer to the current request was parsed: its bytes are kept
        (a head is small) so that ``_salvage`` can parse them again."""
        got = self._head_bytes
        if not got:
            self._head_bytes = data  # the common case: the whole head in one read, no copy
        elif len(got) + len(data) > _SALVAGE_MAX:
            self._salvaged()  # a head this long is not kept
            super().data_received(data)
            return
        else:
            if type(got) is bytes:
                got = self._head_bytes = bytearray(got)  # (a head trickling in: no n² copies)
            got += data
        self._salvaging = True
        super().data_received(data)
        self._salvaging = False
        if self._finals or not self._awaiting:  # answered (or failed): nothing to salvage
            self._salvaged()

    def _salvaged(self) -> None:
        self._heading, self._head_bytes = False, b""
        self._params = _NO_PARAMS  # (a held stream keeps its connection: no dict more than needed)

    def _body_failed(self, exc: Exception) -> None:
        """The parser gave up on a taken-over body: as aiohttp's, the connection is spent
        and the body failed."""
        if self.transport is not None:
            self.transport.close()
        failure = (HttpProcessingError(code=exc.code, message=exc.message, headers=exc.headers)
                   if isinstance(exc, HttpProcessingError) else HttpProcessingError())
        self.set_exception(failure, exc)

    def _started_another(self) -> bool:
        """After a response ended within a read: did the same read begin another one?

        A complete second response is caught in ``feed_data``; the start of one (``HTTP/1.1
        200 OK\r\nContent-Le``) stays in the parser, raises nothing, and the rest would be
        read as the next request's answer.  Ending the parser's input tells: llhttp's parser
        answers a message only for a message it has begun.  The parser is replaced when
        the connection sends its next request, so this one is spent anyway."""
        parser = self._parser
        if parser is None or self.upgraded:
            return False
        try:
            return parser.feed_eof() is not None
        except Exception:  # noqa: BLE001 - whatever is left in it is not a clean end
            return True

    def connection_lost(self, exc: BaseException | None) -> None:
        payload = self._payload
        if exc is not None:
            # A body that ends with the connection (no length, HTTP/1.0 style) ends on
            # aiohttp's ``feed_eof`` below, reset or not: a reset is a failure, said first.
            self._fail_body(payload, exc)
        super().connection_lost(exc)
        self._fail_body(payload, exc)
        if self.sink is not None:
            self.sink()

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        if not isinstance(exc, HttpProcessingError):  # (a failed upload, a lost connection)
            super().set_exception(exc, exc_cause)
            return
        # The parser gave up: the answer before the junk is delivered if it was whole, else
        # the body fails.  Either way aiohttp has closed the connection, and a close with
        # request bytes unsent would wait for them: ``_shut`` resets it then.
        salvaging, self._salvaging = self._salvaging, False
        if not (salvaging and self._salvage(bytes(self._head_bytes))):
            self.malformed = True
            super().set_exception(exc, exc_cause)
            self._fail_body(self._payload, exc)
        transport = self.transport
        if transport is not None and transport.is_closing():
            self._shut(transport)

    def _salvage(self, data: bytes) -> bool:
        """A whole answer followed by bytes that are not one (more body than
        ``Content-Length``, a body on a 204), in the read that completed its head: aiohttp's
        parser raises at the junk and drops the answer it had parsed.  nginx relays the
        answer and drops the connection; so does this.  Everything the response sent so far
        (``data``) is parsed again by a fresh parser, head first: when the answer before the
        junk is whole, it is delivered, and the connection (closed already by aiohttp)
        never returns to the pool.  Anything else, a broken head or body, stays the
        failure it was."""
        ResponseHandler.set_response_params(self, **self._params)  # the failed parser is spent
        parser = self._parser
        messages: list[Any] = []  # interim (1xx) answers first, as they came, then the final one
        start = 0
        try:
            while not messages or messages[-1][0].code < 200:
                end = data.find(b"\r\n\r\n", start)
                if end < 0:
                    return False
                got = parser.feed_data(data[start:end + 4])[0]
                if len(got) != 1:
                    return False
                messages += got
                start = end + 4
            parser.feed_data(data[start:])
            return False  # it parsed this time: not the failure this is for
        except HttpProcessingError:
            if not messages or messages[-1][0].code < 200:
                return False
        message, payload = messages[-1]
        bodiless = self._skip_payload or message.code in EMPTY_BODY_STATUS_CODES
        if not bodiless and not payload.is_eof():
            return False  # the body itself broke
        self._parser = None  # (its end at connection_lost would fail the complete body)
        self._should_close = True
        for interim, _ in messages[:-1]:
            self.feed_data((interim, EMPTY_PAYLOAD), 0)
        self._payload = payload
        self.feed_data((message, EMPTY_PAYLOAD if bodiless else payload), 0)
        return True

    @staticmethod
    def _fail_body(payload: Any, why: BaseException | None) -> None:
        """A body the parser gave up on (a bad chunk size, a bad trailer) is a failed one.

        aiohttp's parser drops the body it was reading when it raises, and tells only the
        connection: the body's reader would wait, unended, until a deadline blamed the
        upstream's silence (the connection was already closed)."""
        if payload is not None and payload is not EMPTY_PAYLOAD and not payload.is_eof() \
                and payload.exception() is None:
            set_exception(payload, aiohttp.ClientPayloadError(
                f"Response payload is not completed: {why!r}"))

    def feed_data(self, data: Any, size: int = 0) -> None:
        message, payload = data
        if message.code >= 200:
            self._finals += 1
            if self._finals > 1:
                self._poisoned()
                return
            if self._large and message.code >= 300:
                # An upstream refusing a large upload (401, 413, 429) may answer without
                # reading it: the rest sits in its socket buffers, where no buffer of
                # relayd's shows it, and a next request on this connection would be read
                # after it (a 504 at first_byte).  Such a connection is not reused.
                self._should_close = True
            payload.on_eof(self._ended)
        super().feed_data(data, size)

    def _ended(self) -> None:
        self._awaiting = False

    def _poisoned(self) -> None:
        self._should_close = True
        if self.transport is not None:
            self._shut(self.transport)

    # -- a request not fully written

    @property
    def should_close(self) -> bool:
        """Also when request bytes are still unsent (the upstream answered without reading
        the whole body, a 401 to a large upload): pooled, the next request would go out
        behind the rest of this one's body."""
        transport = self.transport
        return super().should_close or (transport is not None and (
            transport.get_write_buffer_size() > 0
            # A TLS transport's buffer reads 0 while the one under it holds bytes, and a
            # peer that stopped reading leaves them in the kernel (review 75).  Asked only
            # after a body too large for the socket buffers: a system call on every
            # request's release cost about 10 µs per small request (two relayds, A/B).
            or (self._large and kernel_queued(transport, unsent_only=True) > 0)))

    def close(self) -> None:
        """Closed means gone now: the connection is aborted, never closed gracefully.

        A transport closed with bytes still unsent waits for the upstream to take them:
        forever, if it stopped reading, with its descriptor and buffers (and the upstream
        may yet receive a whole request from a client long gone); such a close is a reset,
        also when only the kernel still holds them (review 70: an upstream that paused
        reading got a gone client's whole body seconds later, then a clean FIN).
        And a TLS transport's graceful close sends close_notify and then waits up to 30 s
        for the upstream's, reading on: a provider whose client left went on generating
        (and billing) a stream nobody read.  An abort closes the socket at once, as
        nginx's upstream close does without waiting for the peer."""
        transport = self.transport
        if transport is not None and _undelivered(transport):
            _reset(transport)
        self.abort()

    @staticmethod
    def _shut(transport: Any) -> None:
        if _undelivered(transport):
            _reset(transport)
        transport.abort()

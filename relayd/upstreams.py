"""Upstream connection pools: one aiohttp ClientSession per upstream, kept across reloads.

A pool is keyed by what decides its connections (url origin, pool size, keepalive, TLS,
proxy).  A reload asks the registry for pools again: unchanged upstreams get their warm
pool back; pools no longer wanted are retired.  A retired pool closes when no route
table that uses it is still live — the current table, or an old one a request still
holds (``routes.RouteTable.enter``/``leave``).  Counting tables rather than attempts
means a request that is still reading its upload, or whose first failover attempt is
in flight, can never find its next upstream's pool closed under it.  The passive
circuit breaker lives on the pool, so it survives reloads with it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import ssl
import time
from http.cookies import BaseCookie, SimpleCookie
from typing import Any, Callable, Iterable

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import _EXC_SENTINEL, EMPTY_BODY_STATUS_CODES, set_exception
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import CIMultiDict
from yarl import URL

from . import lean, upstream_http
from .config import Upstream

# aiohttp would add these on its own; a proxy must send only what the client sent.
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
_READ_BUFSIZE = 2**14
# asyncio keeps only weak references to tasks: hold closing pools until they are closed.
_closing: set[asyncio.Task[None]] = set()


def _close_later(pool: "Pool") -> None:
    task = asyncio.get_running_loop().create_task(pool.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


_CONTEXTS: dict[tuple[str | None, object], ssl.SSLContext] = {}


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """One verifying context per CA bundle, shared by every pool that names it: loading
    the system bundle takes about 40 ms, once per upstream made a worker with hundreds of
    HTTPS upstreams start (and reload) for seconds.  A named bundle is keyed by its bytes
    (a rotated bundle of the same size and mtime is a new one) and built from the bytes
    read; the system store is reused for a minute, so a reload after
    ``update-ca-certificates`` sees it soon."""
    if ca_file is None:
        key: tuple[str | None, object] = (None, int(time.monotonic() // 60))
        data = None
    else:
        with open(ca_file, "rb") as f:
            data = f.read()
        key = (ca_file, hashlib.sha256(data).digest())
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        if len(_CONTEXTS) >= 64:  # bundles renewed many times over: start afresh
            _CONTEXTS.clear()
        ctx = ssl.create_default_context(cadata=data.decode("latin-1") if data is not None else None)
        if data is not None and not ctx.get_ca_certs():
            raise ssl.SSLError(f"no certificate found in {ca_file}")
        _CONTEXTS[key] = ctx
    return ctx


class _NoCookies(aiohttp.DummyCookieJar):
    """A proxy keeps no cookies; aiohttp's dummy jar still builds a SimpleCookie per request."""

    _EMPTY: "BaseCookie[str]" = SimpleCookie()

    def filter_cookies(self, request_url: Any) -> "BaseCookie[str]":
        return self._EMPTY  # aiohttp only reads it when the request passes no cookies of its own


class _Guarded(ResponseHandler):
    """An upstream connection that is closed, never reused, when it speaks out of turn.

    aiohttp parses whatever an idle pooled connection receives and queues it as a
    response, so an upstream that writes an unsolicited response after a complete one
    would hand it to the next request — one client could read another's data.  nginx
    closes an idle upstream connection that receives bytes; so does this: bytes while no
    request is waiting for a response, or a second final response to one request, close
    the connection, and ``should_close`` keeps it out of the pool.
    """

    _awaiting = False  # a request was sent and its response has not ended yet
    _finals = 0        # final (non-1xx) responses parsed for the current request
    _virgin = False    # no byte of the current response read yet
    _salvaging: bytes | None = None  # the response's first read, while it is parsed
    _params: dict[str, Any] = {}  # the parser's settings, until the response's first read
    # A stream that takes its body pushed (``stream.Stream``): the parser's body bytes
    # land in ``pushed`` and ``sink`` runs once after each read and at the connection's end.
    sink: Callable[[], None] | None = None
    pushed: list[bytes]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffer = lean.SmallQueue()  # type: ignore[assignment]  # one response at a time

    def set_response_params(self, **kwargs: Any) -> None:  # called once per request sent
        # A new request: the stream that took the last body over is done with this
        # connection, though its handler may not have run yet to say so (it can be waiting
        # for a slow client while the body ended and the connection went back to the pool).
        self.sink = None
        self._awaiting, self._finals, self._virgin, self._params = True, 0, True, kwargs
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None and self._awaiting and self._read_timeout is None \
                and self._payload_parser is None and not self._upgraded:
            self._body_received(data)
            sink()
            return
        if not self._awaiting and data and not self.upgraded:  # mid-response: one attribute test
            self._poisoned()
            return
        if self._virgin and data:
            self._virgin = False
            self._salvaging = data
            super().data_received(data)
            self._salvaging = None
            del self._params  # (a held stream keeps its connection: no dict more than needed)
        else:
            super().data_received(data)
        if not self._awaiting and self._started_another():
            self._poisoned()
        if self.sink is not None:
            self.sink()

    def _body_received(self, data: bytes) -> None:
        """A read of the body a stream took over, straight to the parser: what aiohttp's
        ``data_received`` adds (a read-timeout re-arm relayd never asks for, the message
        loop, websocket and upgrade branches) is a Python frame and a dozen tests per event.
        Any message parsed now (a response after the body ended) is out of turn."""
        parser = self._parser
        try:
            messages, _, _ = parser.feed_data(data)
        except Exception as exc:  # as aiohttp's: the connection is spent, the body failed
            if self.transport is not None:
                self.transport.close()
            failure = (HttpProcessingError(code=exc.code, message=exc.message, headers=exc.headers)
                       if isinstance(exc, HttpProcessingError) else HttpProcessingError())
            self.set_exception(failure, exc)
            return
        if messages or (not self._awaiting and self._started_another()):
            self._poisoned()

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
        super().connection_lost(exc)
        self._fail_body(payload, exc)
        if self.sink is not None:
            self.sink()

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        first, self._salvaging = self._salvaging, None
        if first is not None and isinstance(exc, HttpProcessingError) and self._salvage(first):
            return
        super().set_exception(exc, exc_cause)
        if isinstance(exc, HttpProcessingError):  # the parser gave up (not a failed upload)
            self._fail_body(self._payload, exc)

    def _salvage(self, data: bytes) -> bool:
        """A whole answer and bytes that are not one, in the response's first read (more
        body than ``Content-Length``, a body on a 204): aiohttp's parser raises at the junk
        and drops the answer it had parsed.  nginx relays the answer and drops the
        connection; so does this.  The read is parsed again by a fresh parser, head
        first: when the answer before the junk is whole, it is delivered, and the
        connection (closed already by aiohttp) never returns to the pool.  Anything
        else, a broken head or body included, stays the failure it was."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        ResponseHandler.set_response_params(self, **self._params)  # the failed parser is spent
        parser = self._parser
        messages: list[Any] = []
        try:
            messages = parser.feed_data(data[:end + 4])[0]
            if len(messages) != 1 or messages[0][0].code < 200:
                return False
            parser.feed_data(data[end + 4:])
            return False  # it parsed this time: not the failure this is for
        except HttpProcessingError:
            if len(messages) != 1:
                return False
        message, payload = messages[0]
        bodiless = self._skip_payload or message.code in EMPTY_BODY_STATUS_CODES
        if not bodiless and not payload.is_eof():
            return False  # the body itself broke
        self._parser = None  # (its end at connection_lost would fail the complete body)
        self._should_close = True
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
            payload.on_eof(self._ended)
        super().feed_data(data, size)

    def _ended(self) -> None:
        self._awaiting = False

    def _poisoned(self) -> None:
        self._should_close = True
        if self.transport is not None:
            self.transport.close()


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, reusing the most recently released connection first.

    aiohttp hands out the idle connection released longest ago (a FIFO).  After a burst
    of 1,000 streams every later request then cycles through all 1,000 idle connections —
    none ever ages out while traffic continues, and each request touches a cold
    connection's objects.  nginx's upstream keepalive cache is a LIFO: a steady load reuses
    a few warm connections and the surplus expires after ``keepalive``.
    """

    async def _get(self, key: Any, traces: list[Any]) -> Any:
        conns = self._conns.get(key)
        if conns is not None and len(conns) > 1:
            conns.rotate(1)  # aiohttp pops from the left: the newest comes first
        return await super()._get(key, traces)


class Pool:
    """Connections to one upstream, with in-flight accounting and breaker state."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.key = upstream.pool_key
        tls = upstream.tls
        ssl_ctx: ssl.SSLContext | bool
        if upstream.url.scheme != "https":
            ssl_ctx = True
        elif not tls.verify:
            ssl_ctx = False
        else:
            ssl_ctx = tls_context(tls.ca_file)
        self.connector = _Connector(
            limit=upstream.max_connections, limit_per_host=0,
            keepalive_timeout=upstream.keepalive or 0.001, ssl=ssl_ctx, ttl_dns_cache=60)
        # aiohttp has no public protocol-factory option.  This and the other aiohttp
        # internals relayd relies on (the reader takeover in stream.py, the connector and
        # parser in upstream_http.py) are why setup.cfg pins aiohttp to one minor version.
        self.connector._factory = functools.partial(_Guarded, loop=self.connector._loop)
        self.session = aiohttp.ClientSession(
            connector=self.connector, auto_decompress=False, trust_env=False,
            skip_auto_headers=_SKIP_AUTO, timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=_NoCookies(), read_bufsize=_READ_BUFSIZE)
        self.sender: upstream_http.Sender | None = None  # built at first use, inside the loop
        self.inflight = 0  # requests holding one of the pool's slots now
        self.limit = upstream.max_connections
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.tables = 0    # live route tables that hand out this pool
        self.retired = False
        self.closed = False
        self.failures = 0
        self.open_until = 0.0

    async def send(self, method: str, url: URL, headers: CIMultiDict[str], data: Any,
                   timeout: aiohttp.ClientTimeout) -> Any:
        """Send one request; the response has aiohttp's status/headers/content/release/close.

        A body in memory without a proxy takes relayd's short path (``upstream_http``);
        a streamed body or a proxied upstream takes aiohttp's whole client path.
        """
        up = self.upstream
        if up.proxy is None and (data is None or type(data) is bytes):
            if self.sender is None:
                self.sender = upstream_http.Sender(self.connector, up.url.origin(), _READ_BUFSIZE)
            return await self.sender.send(method, url, headers, data, timeout)
        return await self.session.request(method, url, headers=headers, data=data, timeout=timeout,
                                          allow_redirects=False, proxy=up.proxy, compress=None)

    # -- breaker: consecutive failures open it for `cooldown` seconds

    def record(self, ok: bool) -> None:
        if ok:
            self.failures = 0
            self.open_until = 0.0
            return
        self.failures += 1
        if self.failures >= self.upstream.breaker.failures:
            self.open_until = time.monotonic() + self.upstream.breaker.cooldown

    @property
    def breaker_open(self) -> bool:
        return self.open_until > time.monotonic()

    # -- lifetime

    # -- slots: one per upstream connection in use, handed out first come, first served

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def take(self, timeout: float | None) -> float:
        """Take a connection slot, waiting up to `timeout`; return the seconds waited.

        aiohttp's connector would wait for a free connection too, silently and without
        a bound of its own; gating here makes the wait visible (a gauge, ``queue_ms``)
        and bounded (``PoolTimeout``).
        """
        if self.inflight < self.limit and not self._waiters:
            self.inflight += 1
            return 0.0
        loop = asyncio.get_running_loop()
        start = loop.time()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut  # release() hands its slot straight to us
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot in the same instant: pass it on
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass  # a release() in the same loop turn already dropped it, done
            raise
        return loop.time() - start

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.inflight -= 1

    def ref(self) -> None:
        self.tables += 1

    def unref(self) -> None:
        self.tables -= 1
        if self.retired and self.tables == 0:
            _close_later(self)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.session.close()


class PoolRegistry:
    """Hands out pools by key so that unchanged upstreams keep their warm connections."""

    def __init__(self) -> None:
        self._pools: dict[tuple[object, ...], Pool] = {}

    def build(self, upstreams: Iterable[Upstream]) -> dict[str, Pool]:
        """Pools for a new config; retire the ones it no longer uses."""
        wanted: dict[tuple[object, ...], Pool] = {}
        by_name: dict[str, Pool] = {}
        made: list[Pool] = []
        try:
            for up in upstreams:  # first build every new pool: one that fails changes nothing
                if up.pool_key not in self._pools and up.pool_key not in wanted:
                    made.append(Pool(up))
                    wanted[up.pool_key] = made[-1]
        except BaseException:
            for pool in made:
                _close_later(pool)
            raise
        for up in upstreams:
            pool = wanted.get(up.pool_key) or self._pools[up.pool_key]
            if pool not in made:
                pool.upstream = up  # same connections; key, headers, breaker limits may differ
            wanted[up.pool_key] = pool
            by_name[up.name] = pool
        for key, pool in self._pools.items():
            if key not in wanted:
                pool.retired = True
                if pool.tables == 0:
                    _close_later(pool)
        self._pools = wanted
        return by_name

    def pools(self) -> list[Pool]:
        return list(self._pools.values())

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self._pools.values()))

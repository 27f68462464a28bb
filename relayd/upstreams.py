"""Upstream connection pools: one aiohttp ClientSession per upstream, kept across reloads.

A pool is keyed by what decides its connections (url origin, pool size, keepalive, TLS
and the CA bytes it trusts, proxy).  A reload asks the registry for pools again:
unchanged upstreams get their warm pool back; pools no longer wanted are retired.  A
retired pool closes when no route table that uses it is still live — the current table,
or an old one a request still holds (``routes.RouteTable.enter``/``leave``).  Counting
tables rather than attempts means a request that is still reading its upload, or whose
first failover attempt is in flight, can never find its next upstream's pool closed
under it.  The passive circuit breaker lives on the pool, so it survives reloads with it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import os
import ssl
import time
from contextvars import ContextVar
from http.cookies import BaseCookie, SimpleCookie
from typing import Any, Callable, Iterable

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from . import logs, upstream_http
from .config import Upstream
from .upstream_conn import LARGE_REQUEST, Guarded

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


def _system_store() -> object:
    """Where the system CA store stands now: ``update-ca-certificates`` rewrites the bundle
    file and the hashed directory, so a reload after it keys its pools anew, while an
    unchanged store keeps them warm across any number of reloads."""
    paths = ssl.get_default_verify_paths()
    stamp = []
    for path in (paths.cafile or paths.openssl_cafile, paths.capath or paths.openssl_capath):
        try:
            st = os.stat(path)
            stamp.append((path, st.st_ino, st.st_mtime_ns, st.st_size))
        except (OSError, TypeError, ValueError):
            stamp.append(None)
    return tuple(stamp)


def _tls_keyed(ca_file: str | None) -> tuple[tuple[str | None, object], ssl.SSLContext]:
    """One verifying context per CA bundle, shared by every pool that names it: loading
    the system bundle takes about 40 ms, once per upstream made a worker with hundreds of
    HTTPS upstreams start (and reload) for seconds.  A named bundle is keyed by its bytes
    (a bundle rotated in place is a new one) and built from the bytes read; the system
    store by where its files stand.  The key is part of the pool's key, so a reload after
    a rotation makes new pools with the new trust (the old ones finish their streams)."""
    if ca_file is None:
        key: tuple[str | None, object] = (None, _system_store())
        data = None
    else:
        with open(ca_file, "rb") as f:
            data = f.read()
        key = (ca_file, hashlib.sha256(data).digest())
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        if len(_CONTEXTS) >= 64:  # bundles renewed many times over: start afresh
            _CONTEXTS.clear()
        if data is None:
            ctx = ssl.create_default_context()
        else:
            # The bundle's CAs only: create_default_context(cadata=...) takes an empty
            # bundle (a file truncated by a deploy) for none given and trusts the whole
            # system store instead.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if data.strip():
                ctx.load_verify_locations(cadata=data.decode("latin-1"))
            if not ctx.get_ca_certs():
                raise ssl.SSLError(f"no certificate found in {ca_file}")
        _CONTEXTS[key] = ctx
    return key, ctx


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    return _tls_keyed(ca_file)[1]


def _tls_for(upstream: Upstream) -> tuple[object, ssl.SSLContext | bool]:
    """What the pool's connections trust, and a key that changes when that does."""
    if upstream.url.scheme != "https":
        return None, True
    if not upstream.tls.verify:
        return False, False
    return _tls_keyed(upstream.tls.ca_file)


class _NoCookies(aiohttp.DummyCookieJar):
    """A proxy keeps no cookies; aiohttp's dummy jar still builds a SimpleCookie per request."""

    _EMPTY: "BaseCookie[str]" = SimpleCookie()

    def filter_cookies(self, request_url: Any) -> "BaseCookie[str]":
        return self._EMPTY  # aiohttp only reads it when the request passes no cookies of its own


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, reusing the most recently released connection first.

    aiohttp hands out the idle connection released longest ago (a FIFO).  After a burst
    of 1,000 streams every later request then cycles through all 1,000 idle connections —
    none ever ages out while traffic continues, and each request touches a cold
    connection's objects.  nginx's upstream keepalive cache is a LIFO: a steady load reuses
    a few warm connections and the surplus expires after ``keepalive``.
    """

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        CONNECTED.set(True)  # (the awaiting task's context: its attempt has a connection)
        return conn

    async def _get(self, key: Any, traces: list[Any]) -> Any:
        conns = self._conns.get(key)
        if conns is not None and len(conns) > 1:
            conns.rotate(1)  # aiohttp pops from the left: the newest comes first
        return await super()._get(key, traces)

    def _update_proxy_auth_header_and_build_proxy_req(self, req: Any) -> Any:
        """The egress proxy's CONNECT request carried aiohttp's own User-Agent, Accept and
        Accept-Encoding (the library and its version, to the operator's proxy): relayd adds
        no header of its own anywhere."""
        proxy_req = super()._update_proxy_auth_header_and_build_proxy_req(req)
        for name in _SKIP_AUTO:
            proxy_req.headers.popall(name, None)
        return proxy_req


_LARGE_BODY = 65536  # a request body an upstream may leave partly unread (``Guarded``)
# Set by ``_Connector.connect`` when an attempt has its connection (new or pooled): a
# deadline before that is a connect failure — the upstream got nothing (``forward``).
CONNECTED: ContextVar[bool] = ContextVar("relayd_connected", default=False)


class Pool:
    """Connections to one upstream, with in-flight accounting and breaker state."""

    def __init__(self, upstream: Upstream, ssl_ctx: ssl.SSLContext | bool) -> None:
        self.upstream = upstream
        # keepalive 0: no connection is ever reused (an expiry of 1 ms still let
        # back-to-back requests share one).
        idle: dict[str, Any] = ({"keepalive_timeout": upstream.keepalive} if upstream.keepalive
                                else {"force_close": True})
        self.connector = _Connector(
            limit=upstream.max_connections, limit_per_host=0, ssl=ssl_ctx, ttl_dns_cache=60,
            **idle)
        # aiohttp has no public protocol-factory option.  This and the other aiohttp
        # internals relayd relies on (the reader takeover in stream.py, the connector and
        # parser in upstream_http.py) are why setup.cfg pins aiohttp to one minor version.
        self.connector._factory = functools.partial(Guarded, loop=self.connector._loop)
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
        # (a streamed body's size is unknown: it may be large)
        large = data is not None and (not isinstance(data, (bytes, bytearray)) or len(data) >= _LARGE_BODY)
        token = LARGE_REQUEST.set(large) if large else None
        try:
            if up.proxy is None and (data is None or type(data) is bytes):
                if self.sender is None:
                    self.sender = upstream_http.Sender(self.connector, up.url.origin(), _READ_BUFSIZE)
                return await self.sender.send(method, url, headers, data, timeout)
            return await self.session.request(method, url, headers=headers, data=data, timeout=timeout,
                                              allow_redirects=False, proxy=up.proxy, compress=None)
        finally:
            if token is not None:
                LARGE_REQUEST.reset(token)

    # -- breaker: consecutive failures open it for `cooldown` seconds

    def record(self, ok: bool) -> None:
        """One attempt's outcome.  The breaker's turns are logged (review 72: an upstream
        ejected and one recovered looked the same in the log; nginx says "upstream server
        temporarily disabled")."""
        if ok:
            self.failures = 0
            if self.open_until:
                self.open_until = 0.0
                logs.get().info("circuit breaker closed", upstream=self.upstream.name)
            return
        self.failures += 1
        breaker = self.upstream.breaker
        if self.failures >= breaker.failures:
            if not self.breaker_open:
                logs.get().warning("circuit breaker opened", upstream=self.upstream.name,
                                   failures=self.failures, cooldown_s=breaker.cooldown)
            self.open_until = time.monotonic() + breaker.cooldown

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
        # (above the limit after a reload lowered it: the slot is not passed on)
        if self.inflight <= self.limit and self._hand_on():
            return  # the slot passes straight on
        self.inflight -= 1

    def _hand_on(self) -> bool:
        """Give a slot to the longest waiting request still waiting; False if none is."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return True
        return False

    def resize(self, limit: int) -> None:
        """A reload's new ``max_connections`` for the pool it keeps.  Requests already
        waiting get the new slots at once: a new pool per limit left them waiting on the
        old one's, to time out while later requests went ahead (review 83)."""
        self.limit = limit
        self.connector._limit = limit  # (aiohttp's own cap, which relayd's gate mirrors)
        while self.inflight < limit and self._hand_on():
            self.inflight += 1

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
        self._retired: set[Pool] = set()

    def build(self, upstreams: Iterable[Upstream]) -> dict[str, Pool]:
        """Pools for a new config; retire the ones it no longer uses."""
        wanted: dict[tuple[object, ...], Pool] = {}
        by_name: dict[str, Pool] = {}
        made: list[Pool] = []
        keys: list[tuple[Upstream, tuple[object, ...]]] = []
        trusts: dict[tuple[object, ...], tuple[object, ssl.SSLContext | bool]] = {}
        try:
            for up in upstreams:  # first build every new pool: one that fails changes nothing
                how = (up.url.scheme, up.tls.verify, up.tls.ca_file)  # a bundle read once per build
                trust, ctx = trusts.get(how) or trusts.setdefault(how, _tls_for(up))
                key = (*up.pool_key, trust)
                keys.append((up, key))
                if key not in self._pools and key not in wanted:
                    made.append(Pool(up, ctx))
                    wanted[key] = made[-1]
        except BaseException:
            for pool in made:
                _close_later(pool)
            raise
        for up, key in keys:
            pool = wanted.get(key) or self._pools[key]
            if pool not in made:
                pool.upstream = up  # same connections; key, headers, breaker limits may differ
                pool.resize(up.max_connections)
            wanted[key] = pool
            by_name[up.name] = pool
        # (closed ones leave here too, not only at a scrape: reloads without scrapes kept
        # every retired pool, about 20 KB each)
        self._retired = {p for p in self._retired if not p.closed}
        for key, pool in self._pools.items():
            if key not in wanted:
                pool.retired = True
                self._retired.add(pool)
                if pool.tables == 0:
                    _close_later(pool)
        self._pools = wanted
        return by_name

    def pools(self) -> list[Pool]:
        """The current pools, then the retired ones still open: requests on those are
        still in flight (the gauges count them)."""
        self._retired = {p for p in self._retired if not p.closed}
        return [*self._pools.values(), *self._retired]

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self._pools.values()))

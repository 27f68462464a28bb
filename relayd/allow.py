"""Allow lists: which peers may talk to a listener, checked when a connection is made.

``Gate`` applies a listener's list when a connection is made, before a byte of it is read
(``allow`` in ``server.Connection``, ``admin_allow`` in ``AdminConnection``): a peer
outside is closed with no response (nothing to learn about relayd from it), counted, and
logged at most once per ``every`` seconds with the count, so a scan cannot flood the log
(the refusals since the last line are logged when the interval ends, with the last
refused peer's address).
The list is read from the current config, so a reload changes it for new connections (and
for open connections at their next request: ``server.Connection.admitted_under``,
``AdminConnection.still_admitted``).
With ``tls`` the handshake comes first (asyncio calls the protocol only once it is done);
nothing of the HTTP layer is read either way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any, Callable, Sequence

from aiohttp import web

from . import logs


class Gate:
    """One listener's allow list check, with its refusal count and rate-limited log."""

    def __init__(self, listener: str, every: float = 10.0) -> None:
        self.listener, self.every = listener, every
        self.counter: Any = None  # the process's metric child, once metrics exist
        self.total = 0
        self._since = 0
        self._last = -every
        self._flush: asyncio.TimerHandle | None = None
        self._peer: str | None = None  # the last refused peer's address

    def admits(self, transport: asyncio.BaseTransport, allow: Sequence[Any]) -> bool:
        """True if the peer may talk to this listener; else close the transport now."""
        if not allow:
            return True
        peer = transport.get_extra_info("peername")
        ip = _address(peer[0] if isinstance(peer, (tuple, list)) and peer else None)
        if ip is not None and any(ip in net for net in allow):
            return True
        transport.close()
        self.total += 1
        if self.counter is not None:
            self.counter.inc()
        self._since += 1
        self._peer = str(ip) if ip else None
        now = time.monotonic()
        if now - self._last >= self.every:
            self._log()
        elif self._flush is None:
            # The refusals until the next line would otherwise be told only by a refusal
            # after the interval: a scan that stops would never be logged in full.
            self._flush = asyncio.get_running_loop().call_later(
                self._last + self.every - now, self._log)
        return False

    def _log(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._since:
            logs.get().warning("connection refused: peer not in the allow list",
                               listener=self.listener, peer=self._peer,
                               refused=self._since, refused_total=self.total)
        self._last, self._since = time.monotonic(), 0


    def still_admits(self, conn: Any, allow: Sequence[Any]) -> bool:
        """A connection admitted earlier (``conn._allow``: the list it last passed), at its
        next request: checked again only when the list is another one (a reload); a peer
        the new list shuts out is closed like one refused at accept."""
        if allow is conn._allow or conn.transport is None:
            return True
        conn._allow = allow
        return self.admits(conn.transport, allow)


def _address(host: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address; an IPv4-mapped IPv6 peer (dual-stack socket) as IPv4."""
    try:
        ip = ipaddress.ip_address(str(host).partition("%")[0])
    except ValueError:
        return None  # not an IP peer: no allow entry can match it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# One per listener of the process; metrics reads their totals.
GATES = {"listen": Gate("listen"), "admin_listen": Gate("admin_listen")}


class AdminRunner(web.AppRunner):
    """aiohttp's runner for the admin app, with ``admin_allow`` applied when a connection
    is accepted, before a byte of it is read, as ``allow`` is on the client listener.

    aiohttp builds the runner's server itself (``Application._make_handler``) and offers no
    hook at accept, so the server it built becomes an ``AdminServer``: the same object, with
    a protocol factory that checks the list first and the function that reads the list.
    """

    def __init__(self, app: web.Application, allow: Callable[[], Sequence[Any]],
                 limits: Callable[[], Any]) -> None:
        app.middlewares.append(_still_admitted)
        app.on_response_prepare.append(_server_name)
        super().__init__(app, access_log=None, handle_signals=False)
        self._allow, self._limits = allow, limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = AdminServer
        server.allow = self._allow  # type: ignore[attr-defined]
        server.limits = self._limits  # type: ignore[attr-defined]
        return server


class AdminServer(web.Server):
    allow: Callable[[], Sequence[Any]]
    limits: Callable[[], Any]  # the current config's ``limits``

    def __call__(self) -> web.RequestHandler:
        return AdminConnection(self, loop=self._loop, **self._kwargs)


class AdminConnection(web.RequestHandler):
    """An admin connection must complete a request head within ``client_header`` of its
    start or of its last one (else ``client_keepalive``; neither set: no limit), checked
    every that long: aiohttp's only timer is an hour's keep-alive, and connections that
    sent nothing, half a head, or idled after an answer stayed open for good, until the
    descriptors ran out and the proxy itself failed (review 80)."""

    _refused = False
    _allow: Sequence[Any] = ()  # the list this connection last passed
    _timer: asyncio.TimerHandle | None = None
    _seen = 0  # requests parsed on it at the last check

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        assert isinstance(manager, AdminServer)
        self._allow = manager.allow()
        if not GATES["admin_listen"].admits(transport, self._allow):
            self._refused = True  # never handed to aiohttp: nothing to clean up there
            return
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        manager = self._manager
        assert isinstance(manager, AdminServer)
        limits = manager.limits()
        every = limits.client_header or limits.client_keepalive
        if every:
            self._timer = asyncio.get_running_loop().call_later(every, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        if self._request_count == self._seen and not self._request_in_progress:
            self.transport.close()  # nothing came in the whole period
            return
        self._seen = self._request_count
        self._arm()

    def still_admitted(self) -> bool:
        """After a reload that changed ``admin_allow``: is the peer of this (keep-alive)
        connection still on it?  A scraper shut out must not keep its open connection."""
        manager = self._manager
        assert isinstance(manager, AdminServer)
        return GATES["admin_listen"].still_admits(self, manager.allow())

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._refused:
            super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """As on the client listener: a short JSON error, never aiohttp's plain text
        that quotes the request's bytes back, nor its name and version."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        why = "malformed request" if status == 400 else "internal error" if status == 500 else "error"
        resp = web.json_response({"error": {"message": why, "status": status}}, status=status,
                                 headers={"Server": "relayd"})
        resp.force_close()
        return resp


async def _server_name(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "relayd"  # (not aiohttp's name and version)


@web.middleware
async def _still_admitted(request: web.Request, handler: Any) -> web.StreamResponse:
    proto = request.protocol
    if isinstance(proto, AdminConnection) and not proto.still_admitted():
        return web.Response(status=403)  # goes nowhere: the connection is closed
    return await handler(request)

"""App wiring: the request handler, the admin endpoints, and the one swappable reference.

``App.table`` is the only thing a reload changes.  ``handle`` reads it once per request
and holds it to the end, so a request finishes on the table (routes, keys, pools) it
started with.  The handler is the one writer of the request's ``Exchange``: it runs the
two phases — ``forward`` (before commit) and ``stream.Stream`` (after) — and records
what they return.
"""

from __future__ import annotations

import asyncio
import collections
import re
import secrets
from typing import Any, cast

from aiohttp import HttpVersion10, HttpVersion11, web

from . import logs, metrics, providers
from .clients import ClientTable, Forwardable, preflight, preflight_answer
from .config import Config
from .exchange import End, Exchange
from .forward import Forwarded, ReplayBudget, RequestBody, error_response, forward
from .metrics import CONTENT_TYPE
from .routes import Match, RouteTable, resolve, separators_read, split_target, under
from .stream import Stream
from .upstreams import PoolRegistry

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is safe to echo and log, else a fresh one."""
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return secrets.token_hex(16)


# A TRACE is echoed back by servers that honour it, the operator's key with it; a CONNECT
# would become a tunnel request to the upstream's host.  No provider API uses either.
_NEVER_FORWARDED = frozenset({"TRACE", "CONNECT"})
_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def _head_size(request: web.BaseRequest) -> int:
    """The request head's size in bytes as it came: request line and header lines."""
    line = len(request.method) + len(request.raw_path) + 11
    return line + sum(len(k) + len(v) + 4 for k, v in request.raw_headers)


def _provider(match: Match | None) -> providers.Provider:
    """Whose format relayd's own errors speak: the route's first upstream's, if a route matched."""
    return providers.get(match.targets[0].upstream.provider) if match else providers.DEFAULT


class _EarlyStop:
    """The drain's stop for a request that has no answer yet (``Exchange.stop`` before the
    stream takes over): its task is cancelled, and the handler tells that cancel apart
    from a client that left, to answer 503 instead of cutting the connection unanswered."""

    __slots__ = ("task", "reason")

    def __init__(self, task: "asyncio.Task[Any] | None") -> None:
        self.task = task
        self.reason: End | None = None

    def stop(self, reason: End) -> None:
        if self.reason is None and self.task is not None:
            self.reason = reason
            self.task.cancel()

    def consume(self) -> bool:
        """After a CancelledError: was it this stop's, and no other cancel with it?"""
        return self.reason is not None and self.task is not None and self.task.uncancel() == 0


# How a stream can end by the upstream's doing, after the response headers.
_UPSTREAM_BROKE = frozenset((End.UPSTREAM_RESET, End.UPSTREAM_EOF, End.IDLE_TIMEOUT, End.TOTAL_TIMEOUT))


class Turns:
    """At most ``per_turn`` request set-ups per event-loop turn; the rest wait their turn.

    A request's set-up (route, headers, the upstream write; then, when the answer comes,
    the stream and the response head) runs as task steps of a few hundred µs each, and the
    loop runs every ready step before it polls sockets again.  When 500 streams start at
    once that is 100+ ms in which no established stream is pumped.  Letting a few set-ups
    through per turn keeps the loop polling every millisecond or so.  An answer's set-up
    goes before a new request's: its events are already arriving, and every turn it waits
    adds to their delay, while a new request only waits longer for its first byte.  A
    request that finds no queue goes on at once, with no extra turn.
    """

    __slots__ = ("per_turn", "used", "answers", "requests", "armed")

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self.used = 0
        self.answers: collections.deque[asyncio.Future[None]] = collections.deque()
        self.requests: collections.deque[asyncio.Future[None]] = collections.deque()
        self.armed = False

    def take(self, answer: bool) -> asyncio.Future[None] | None:
        """None: go on now.  Else a future to await: set when this set-up's turn comes."""
        if not self.answers and not self.requests and self.used < self.per_turn:
            self.used += 1
            self._arm()
            return None
        fut = asyncio.get_running_loop().create_future()
        (self.answers if answer else self.requests).append(fut)
        self._arm()
        return fut

    def _arm(self) -> None:
        if not self.armed:
            self.armed = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        """Runs once per loop turn while set-ups are counted or waiting."""
        self.armed = False
        self.used = 0
        for waiting in (self.answers, self.requests):
            while waiting and self.used < self.per_turn:
                fut = waiting.popleft()
                if not fut.done():  # a cancelled waiter (the client left) gives its turn on
                    fut.set_result(None)
                    self.used += 1
        if self.used or self.answers or self.requests:
            self._arm()


SETUPS_PER_TURN = 8
LINES_PER_TURN = 8  # access lines rendered and written per event-loop turn
LINES_BACKLOG = 1024  # queued access lines beyond which they are all written at once


class App:
    def __init__(self, config: Config) -> None:
        self.log = logs.get()
        self.metrics = metrics.make()
        self.registry = PoolRegistry()
        self.replay = ReplayBudget()
        self.active: set[Exchange] = set()
        self.turns = Turns(SETUPS_PER_TURN)
        self._lines: collections.deque[dict[str, Any]] = collections.deque()
        self._writing = False
        self._draining = False
        self.generation = 0
        self.table: RouteTable | None = None
        self.install(config)

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        """From the start of a drain every count reaches the metrics at once: the
        process may exit as soon as the last request has ended."""
        self._draining = value
        self.metrics.eager = value
        if value:
            self.metrics.flush()

    @property
    def config(self) -> Config:
        assert self.table is not None
        return self.table.config

    def install(self, config: Config) -> RouteTable:
        """Build the table for a new config and make it current (one reference swap)."""
        pools = self.registry.build(config.upstreams.values())
        self.generation += 1
        table = RouteTable(config, pools, self.generation, ClientTable(config.clients, config.client_keys))
        old, self.table = self.table, table
        if old is not None:
            old.supersede()
        self.metrics.generation.set(self.generation)
        return table

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        table = self.table
        assert table is not None
        admitted = getattr(request.protocol, "admitted_under", None)
        if admitted is not None and not admitted(table.config.allow):
            return web.Response(status=403)  # goes nowhere: the connection is closed
        table.enter()
        raw = request.raw_path
        if not raw.startswith("/") and raw != "*":  # absolute-form request target
            raw = request.rel_url.raw_path_qs
            if not raw.startswith("/"):  # (``http://host`` or ``http://host?q``: the path is "/")
                raw = "/" + raw
        # A fragment (which no client should send) is not part of the path: routes match
        # without it, as nginx's locations do (``/pub#/../priv/x`` is ``/pub``).
        path, _, query = split_target(raw)
        # request.remote: the peer aiohttp already asked the transport for (each ask makes a
        # new tuple, which a held stream would keep)
        ex = Exchange(request_id(request.headers.get("X-Request-Id")), request.method, path,
                      request.remote)
        self.active.add(ex)
        match: Match | None = None
        body: RequestBody | None = None
        st: Stream | None = None
        tried = Forwarded()
        early = _EarlyStop(asyncio.current_task())
        ex.stopper = early.stop  # until the stream takes over
        try:
            wait = self.turns.take(answer=False)
            if wait is not None:
                await wait  # a client that leaves meanwhile is logged as gone, like any
            if raw == "*":  # OPTIONS * asks about relayd itself, not an upstream (nginx: 400)
                return self._refuse(ex, None, 400, "the asterisk-form request target is not "
                                    "forwarded", "invalid_request")
            found = table.match(path)
            version = request.version
            if version != HttpVersion11 and version != HttpVersion10:
                # HTTP/2.0 or 0.9 in a request line: aiohttp would answer in that version
                # (its status line reads ``request.version``, a cached property).
                request._cache["version"] = HttpVersion11
                resp = self._refuse(ex, found, 505, f"HTTP/{version.major}.{version.minor} is not "
                                    "supported", "http_version_not_supported")
                resp.force_close()
                return resp
            if request.method in _NEVER_FORWARDED:
                return self._refuse_method(ex, found, request.method)
            codings = request.headers.getall("Transfer-Encoding", ())
            if codings and version == HttpVersion10:
                # RFC 9112 §6.1: framing an HTTP/1.0 peer may not share (nginx: 400).
                resp = self._refuse(ex, found, 400, "Transfer-Encoding in an HTTP/1.0 request",
                                    "invalid_request")
                resp.force_close()
                return resp
            if codings and (len(codings) > 1 or codings[0].strip().lower() != "chunked"):
                # ``gzip, chunked``: relayd would strip the framing and forward the coded
                # bytes as if plain.  nginx, too, implements chunked alone.
                resp = self._refuse(ex, found, 501, "transfer codings other than chunked are not "
                                    "supported", "unsupported_transfer_encoding")
                resp.force_close()
                return resp
            if _head_size(request) > table.config.limits.max_request_headers:
                return self._refuse(ex, found, 431, "request headers too large",
                                    "request_header_too_large")
            resolved = resolve(path)
            if resolved is None or (found is not None and not under(found.route.path, resolved)):
                return self._refuse(ex, found, 400, f"path {path} climbs above its route",
                                    "invalid_path")
            match = found if resolved == path else table.match(resolved)
            if match is not None:
                alt = separators_read(resolved)
                # Read that way, the path must stay on its route, and what is forwarded
                # below the upstream's base path must not climb above it (``/pub/..%2Fpub/x``
                # stays on /pub, but its remainder climbs out of the base: review 75).
                if alt != resolved and (alt is None or (other := table.match(alt)) is None
                                        or other.route is not match.route
                                        or separators_read("/" + match.rest.lstrip("/")) is None):
                    return self._refuse(ex, match, 400, f"path {path} leaves its route when its "
                                        "encoded slashes are read as slashes", "invalid_path")
            if match is None:
                ex.status, ex.error = 404, "no route"
                return web.Response(status=404, body=providers.not_found_body(path, ex.request_id),
                                    content_type="application/json",
                                    headers={"X-Request-Id": ex.request_id})
            ex.route = match.route.path
            outgoing = request
            clients = table.clients
            if clients.active and preflight(request):
                ex.status = 204
                return preflight_answer(request, ex.request_id)
            if clients.active:
                provider = _provider(match)
                client, refused = clients.check(provider, request.headers, query, match.route.path)
                ex.client_name = client.name if client is not None else None
                if refused is not None:
                    return self._refuse(ex, match, refused.status, refused.message, refused.code)
                outgoing = cast(web.BaseRequest, Forwardable(request, provider, [
                    providers.get(t.upstream.provider) for t in match.targets]))
            body = RequestBody(outgoing, len(match.targets) > 1, self.replay, table.config.limits)
            fw = await forward(outgoing, match, ex.request_id, body, self.metrics, self.log, tried)
            self._forwarded(ex, fw)
            if fw.error is not None:
                return fw.error
            assert fw.resp is not None and fw.target is not None
            try:
                wait = self.turns.take(answer=True)  # the answer's set-up: a turn of its own
                if wait is not None:
                    await wait
                up = fw.target.upstream
                st = Stream(request, fw.resp, providers.get(up.provider), match.route.timeouts,
                            match.route.heartbeat, ex.request_id,
                            (up.base_url, match.route.path.rstrip("/") if match.route.strip_prefix else ""))
                if fw.no_retry:
                    st.out.headers["x-should-retry"] = "false"
                ex.stopper = st.stop
                ex.streaming = True
                self.metrics.stream_started(match.route.path)
                ex.end = await st.relay()
                if ex.end in _UPSTREAM_BROKE:
                    # Before the headers such a failure is a warning ("upstream attempt
                    # failed"); after them it was only in the access line, and with that
                    # off nowhere (review 72; nginx: "upstream prematurely closed").
                    self.log.warning("upstream stream failed", request_id=ex.request_id,
                                     upstream=up.name, route=match.route.path, reason=ex.end,
                                     cause="malformed body" if st.malformed() else None,
                                     bytes_out=st.bytes_out, events=st.events)
            finally:
                fw.target.pool.release()
                if st is None:
                    fw.resp.close()
                else:
                    self.metrics.stream_ended(match.route.path)
            if self.draining:
                st.out.force_close()
            return st.out
        except asyncio.CancelledError:
            if st is None and early.consume():
                # The drain ended it before an answer came: the client hears why.
                ex.end, ex.status = early.reason, 503
                resp = error_response(_provider(match), 503, f"relayd is shutting down (request id "
                                      f"{ex.request_id})", "shutdown", ex.request_id)
                resp.force_close()
                return resp
            ex.end = self._gone(st)
            raise
        except ConnectionError:
            ex.end = self._gone(st)
            raise
        except Exception:
            self.log.exception("internal error", request_id=ex.request_id)
            ex.end = End.ERROR
            if st is not None and st.committed:
                if request.transport is not None:
                    request.transport.close()
                return st.out
            ex.status = 500
            return error_response(_provider(match), 500, f"relayd internal error (request id {ex.request_id})",
                                  "internal_error", ex.request_id)
        finally:
            table.leave()
            ex.stopper = None
            if not ex.attempts:  # ended before forward returned: what it had tried
                ex.attempts, ex.upstream, ex.queued = tried.attempts, tried.upstream, tried.queued
            if body is not None:
                ex.bytes_in = body.bytes_in
            if st is not None:
                ex.bytes_out, ex.events, ex.heartbeats = st.bytes_out, st.events, st.heartbeats
                ex.injected = st.injected
                try:
                    ex.usage = st.usage(partial=ex.end != End.DONE)
                except Exception:  # a bug here must not cost the access line and the counts
                    self.log.exception("usage not read", request_id=ex.request_id)
            self.active.discard(ex)
            self.metrics.finished(ex)
            if table.config.access_log:
                self._access(ex)

    @staticmethod
    def _gone(st: Stream | None) -> End:
        """The client left.  After the provider's last word reached it (``[DONE]``,
        ``message_stop``: an SDK closes the response there, before the upstream's final
        chunk), the stream was complete: ``done``, its usage final."""
        return End.DONE if st is not None and st.ended else End.CLIENT_GONE

    @classmethod
    def _refuse_method(cls, ex: Exchange, match: Match | None, method: str) -> web.Response:
        """405 for TRACE and CONNECT, and the connection closed (what follows a CONNECT is
        tunnel bytes, not HTTP)."""
        resp = cls._refuse(ex, match, 405, f"method {method} is not allowed", "method_not_allowed")
        resp.headers["Allow"] = _ALLOW
        resp.force_close()
        return resp

    @staticmethod
    def _refuse(ex: Exchange, match: Match | None, status: int, why: str,
                code: str) -> web.Response:
        """relayd's own 4xx, in the route's provider format when a route matched."""
        ex.status, ex.error = status, why
        if match is not None:
            ex.route = match.route.path
        return error_response(_provider(match), status, f"{why} (request id {ex.request_id})", code,
                              ex.request_id)

    def reject(self, peer: str | None, status: int, why: str, first_line: bytes,
               taken: float = 0.0) -> web.Response:
        """The answer to a request aiohttp could not parse (or to a head too large to
        parse), with its own access line: the request line is all relayd knows of it."""
        parts = first_line.decode("latin-1").split(" ")
        method, target = (parts[0][:16], parts[1]) if len(parts) == 3 else ("-", "-")
        if "://" in target[:16]:  # absolute form: the path only (no host, no userinfo)
            target = "/" + target.partition("://")[2].partition("/")[2]
        path = split_target(target)[0]
        ex = Exchange(request_id(None), method, path, peer)
        ex.start -= taken  # (a late head: its duration runs from its first byte)
        table = self.table
        assert table is not None
        match = table.match(path) if path.startswith("/") else None
        code = {431: "request_header_too_large", 505: "http_version_not_supported",
                500: "internal_error"}.get(status, "invalid_request")
        resp = self._refuse(ex, match, status, why, code)
        ex.end = (End.ERROR if status == 500 else  # (a 505 is the client's HTTP/2)
                  End.HEADER_TIMEOUT if status == 408 else End.DONE)
        self.metrics.finished(ex)
        if table.config.access_log:
            self._access(ex)
        return resp

    @staticmethod
    def _forwarded(ex: Exchange, fw: Forwarded) -> None:
        ex.attempts, ex.upstream, ex.status, ex.end = fw.attempts, fw.upstream, fw.status, fw.reason
        ex.queued = fw.queued
        if fw.resp is not None:
            ex.ttfb = ex.duration
        elif fw.error is not None and fw.kept_at is not None:  # a kept upstream answer: its head's time
            ex.ttfb = fw.kept_at - ex.start
        ex.bytes_out = fw.relayed

    def _access(self, ex: Exchange) -> None:
        """Queue the request's access line; a few are written per loop turn.

        Written where a request ends, 500 streams ending together held up the loop for
        15+ ms and delayed every other stream's events (p99 7 ms with the log, 2 ms
        without).  The fields are taken now (the duration is the request's, not the
        queue's); the lines are written in order, a turn later at the latest, in one
        write per turn (``logs.write_lines``), and all of them when relayd exits.
        """
        self._lines.append({
            "request_id": ex.request_id, "method": ex.method, "path": ex.path, "route": ex.route,
            "upstream": ex.upstream, "attempts": ex.attempts, "status": ex.status,
            "end_reason": str(ex.end), "queue_ms": round(ex.queued * 1000, 1),
            "ttfb_ms": round(ex.ttfb * 1000, 1) if ex.ttfb is not None else None,
            "duration_ms": round(ex.duration * 1000, 1), "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out, "events": ex.events, "heartbeats": ex.heartbeats,
            "injected_error": str(ex.injected) if ex.injected else None, "error": ex.error,
            "client": ex.client,
            "client_name": ex.client_name, "usage": ex.usage.as_log() if ex.usage else None})
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().call_soon(self._write_lines)

    def _write_lines(self) -> None:
        lines = self._lines
        # Past a backlog every line goes now: the queue must not outgrow the lines' pace.
        n = len(lines) if len(lines) > LINES_BACKLOG else min(len(lines), LINES_PER_TURN)
        try:
            logs.write_lines("access", [lines.popleft() for _ in range(n)])
        finally:  # a failed write (a full disk) loses its lines, never the ones after it
            if lines:
                asyncio.get_running_loop().call_soon(self._write_lines)
            else:
                self._writing = False

    def flush_access(self) -> None:
        """Every queued access line, now (at exit)."""
        logs.write_lines("access", list(self._lines))
        self._lines.clear()

    # -- admin listener

    def admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ready", "generation": self.generation})

    async def _metrics(self, _: web.Request) -> web.Response:
        body = self.metrics.render(self.registry.pools(), len(self.active))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def status_line(self) -> str:
        streams = sum(1 for e in self.active if e.streaming)
        # Every STATUS= says it while it lasts: the watchdog's periodic one replaced the
        # drain's, and ``systemctl status`` showed no drain in progress (review 68).
        draining = "draining; " if self.draining else ""
        return f"{draining}config generation {self.generation}; {streams} active streams"

    def stop_streams(self, reason: End) -> int:
        n = 0
        for ex in list(self.active):
            ex.stop(reason)
            n += 1
        return n

"""The streaming pipe: one client request, relayed to an upstream and back.

Shape (after Go's httputil.ReverseProxy): copy end-to-end request headers, set the
provider's auth, send with the body streaming as it arrives, then copy status and
end-to-end headers back and pump the body chunk by chunk.  What relayd adds is what an
LLM stream needs:

* SSE bodies are forwarded a complete block at a time (``sse.BoundaryTracker``) so that
  relayd's own bytes — heartbeat comments, one error event — can only land between
  events.  The bytes of a stream that completes are exactly the upstream's.
* Before response headers, failures become a provider-format 502/504, or the next
  upstream of the route (failover).  After headers, an SSE failure becomes exactly one
  provider-format error event and a clean end; other bodies end by closing the
  connection, the only failure signal HTTP/1.1 has after headers.
* A client that goes away cancels this task (the server runs with handler
  cancellation); the upstream response is then closed, never pooled, so the provider
  stops generating.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import providers
from .providers import StreamKind
from .routes import Match, Target, upstream_url
from .sse import BoundaryTracker
from .usage import Usage, UsageMeter

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade"})
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect", "x-request-id"}
_RESPONSE_DROP_LENGTH = HOP_BY_HOP | {"content-length"}
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
REPLAY_LIMIT = 8 * 1024 * 1024
_KEEP_ERROR_BODY = 1024 * 1024
HEARTBEAT = b": keep-alive\n\n"


class Exchange:
    """What one request did; read by the access log and metrics when it ends."""

    __slots__ = ("request_id", "method", "path", "client", "route", "upstream", "attempts",
                 "status", "end_reason", "start", "ttfb", "bytes_in", "bytes_out", "events",
                 "heartbeats", "injected", "usage", "streaming", "stop_reason", "_upstream_resp")

    def __init__(self, request_id: str, method: str, path: str, client: str | None) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.client = client
        self.route: str | None = None
        self.upstream: str | None = None
        self.attempts = 0
        self.status = 0
        self.end_reason = "done"
        self.start = time.monotonic()
        self.ttfb: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.events = 0
        self.heartbeats = 0
        self.injected: str | None = None
        self.usage: Usage | None = None
        self.streaming = False
        self.stop_reason: str | None = None
        self._upstream_resp: aiohttp.ClientResponse | None = None

    @property
    def duration(self) -> float:
        return time.monotonic() - self.start

    def stop(self, reason: str) -> None:
        """End this exchange from outside (drain): wake the pump by closing the upstream."""
        self.stop_reason = reason
        if self._upstream_resp is not None:
            self._upstream_resp.close()


class _Failure(Exception):
    """An attempt that produced no usable response."""

    def __init__(self, reason: str, status: int, message: str) -> None:
        self.reason, self.status, self.message = reason, status, message


def end_to_end(headers: Any, drop: frozenset[str]) -> CIMultiDict[str]:
    """A copy of headers without hop-by-hop ones: those in `drop` and those Connection names."""
    named: set[str] = set()
    for v in headers.getall("Connection", ()):
        named.update(t.strip().lower() for t in v.split(","))
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk not in drop and lk not in named:
            out.add(k, v)
    return out


def request_headers(request: web.BaseRequest, request_id: str) -> CIMultiDict[str]:
    out = end_to_end(request.headers, _REQUEST_DROP)
    out["X-Request-Id"] = request_id
    return out


def response_headers(resp: aiohttp.ClientResponse, request_id: str, drop_length: bool) -> CIMultiDict[str]:
    """drop_length: relayd frames the body itself (SSE it may add to, replayed error bodies)."""
    out = end_to_end(resp.headers, _RESPONSE_DROP_LENGTH if drop_length else HOP_BY_HOP)
    if "x-request-id" not in out:  # never overwrite the provider's own id
        out["X-Request-Id"] = request_id
    return out


async def _body_for(request: web.BaseRequest, ex: Exchange, replay: bool) -> tuple[Any, bool]:
    """The request body to send: (data, can it be sent again for failover)."""
    if not request.body_exists:
        return None, True
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    content = request.content
    if replay:
        buf = bytearray()
        while len(buf) <= REPLAY_LIMIT:
            chunk = await content.readany()
            if not chunk:
                ex.bytes_in = len(buf)
                return bytes(buf), True
            buf += chunk
        head = bytes(buf)
        ex.bytes_in = len(head)
    else:
        head = b""

    async def stream() -> AsyncIterator[bytes]:
        if head:
            yield head
        while True:
            chunk = await content.readany()
            if not chunk:
                return
            ex.bytes_in += len(chunk)
            yield chunk

    return stream(), False


def _order(targets: tuple[Target, ...]) -> list[Target]:
    """Route order, skipping upstreams whose breaker is open while another is available."""
    closed = [t for t in targets if not t.pool.breaker_open]
    return closed or list(targets)


def _error_response(kind_provider: str, status: int, message: str, code: str,
                    request_id: str) -> web.Response:
    return web.Response(status=status, body=providers.error_body(kind_provider, status, message, code),
                        content_type="application/json", headers={"X-Request-Id": request_id})


async def relay(request: web.BaseRequest, match: Match, ex: Exchange, metrics: Any,
                log: Any) -> web.StreamResponse:
    route = match.route
    ex.route = route.path
    timeouts = route.timeouts
    primary = match.targets[0].upstream
    raw = request.raw_path
    query = raw.partition("?")[2]
    base_headers = request_headers(request, ex.request_id)
    data, replayable = await _body_for(request, ex, replay=len(match.targets) > 1)

    resp: aiohttp.ClientResponse | None = None
    target = match.targets[0]
    kept_error: tuple[int, str | None, CIMultiDict[str], bytes] | None = None
    last_failure: _Failure | None = None
    candidates = _order(match.targets)
    for i, target in enumerate(candidates):
        if i > 0 and not replayable:
            break
        up = target.upstream
        ex.upstream = up.name
        ex.attempts += 1
        headers = CIMultiDict(base_headers)
        providers.set_auth(headers, up.provider, up.api_key)
        for k, v in up.headers:
            headers[k] = v
        url = URL(up.origin + upstream_url(up.url.raw_path, match.rest, query), encoded=True)
        last = i == len(candidates) - 1
        target.pool.acquire()
        try:
            resp = await _send(target, request.method, url, headers, data, timeouts)
        except _Failure as f:
            target.pool.release()
            target.pool.record(False)
            metrics.attempt(up.name, f.reason)
            log.warning("upstream attempt failed", request_id=ex.request_id, upstream=up.name,
                        attempt=ex.attempts, reason=f.reason)
            last_failure = f
            continue
        except BaseException:  # the client went away while we waited: free the slot all the same
            target.pool.release()
            raise
        if resp.status in RETRY_STATUSES and not last and replayable:
            target.pool.record(False)
            metrics.attempt(up.name, f"status_{resp.status}")
            log.warning("upstream attempt failed", request_id=ex.request_id, upstream=up.name,
                        attempt=ex.attempts, reason=f"status {resp.status}")
            try:
                body = await resp.content.read(_KEEP_ERROR_BODY)
                kept_error = (resp.status, resp.reason,
                              response_headers(resp, ex.request_id, drop_length=True), body)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                kept_error = None
            finally:
                if resp.content.is_eof():
                    resp.release()  # read to the end: the connection can be reused
                else:
                    resp.close()
                target.pool.release()
            resp = None
            last_failure = None
            continue
        target.pool.record(resp.status < 500 or resp.status in (501, 505))
        metrics.attempt(up.name, "ok" if resp.status < 400 else f"status_{resp.status}")
        break

    if resp is None:
        if kept_error is not None and last_failure is not None:
            status, reason, headers, body = kept_error
            ex.status = status
            ex.end_reason = last_failure.reason
            return web.Response(status=status, reason=reason, headers=headers, body=body)
        f = last_failure or _Failure("connect_error", 502, "no upstream available")
        ex.status = f.status
        ex.end_reason = f.reason
        return _error_response(primary.provider, f.status,
                               f"{f.message} (request id {ex.request_id})", f.reason, ex.request_id)

    try:
        return await _pump(request, resp, target, match, ex, metrics)
    finally:
        target.pool.release()


async def _send(target: Target, method: str, url: URL, headers: CIMultiDict[str], data: Any,
                timeouts: Any) -> aiohttp.ClientResponse:
    up = target.upstream
    ct = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect or None)
    try:
        async with asyncio.timeout(timeouts.first_byte or None):
            return await target.pool.session.request(
                method, url, headers=headers, data=data, timeout=ct, allow_redirects=False,
                proxy=up.proxy, compress=None)
    except aiohttp.ConnectionTimeoutError:
        raise _Failure("connect_error", 504,
                       f"timed out connecting to upstream '{up.name}' after {_fmt(timeouts.connect)}") from None
    except TimeoutError:
        raise _Failure("first_byte_timeout", 504,
                       f"upstream '{up.name}' sent no response headers within {_fmt(timeouts.first_byte)}") from None
    except aiohttp.ClientConnectorError as exc:
        raise _Failure("connect_error", 502,
                       f"cannot connect to upstream '{up.name}': {_connect_why(exc)}") from None
    except aiohttp.ClientResponseError as exc:
        raise _Failure("connect_error", 502, f"invalid response from upstream '{up.name}': {exc.message}") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise _Failure("connect_error", 502,
                       f"upstream '{up.name}' failed before responding: {_short(exc)}") from None


def _connect_why(exc: aiohttp.ClientConnectorError) -> str:
    """A short reason for clients: no addresses, paths or library text."""
    os_error = exc.os_error
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(os_error, ConnectionResetError):
        return "connection reset"
    if isinstance(os_error, TimeoutError):
        return "timed out"
    if isinstance(os_error, socket.gaierror):
        return "host name not resolved"
    return "network error"


def _short(exc: BaseException) -> str:
    """Like _connect_why: what happened, without library text that may name hosts."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "incomplete request body"
    if isinstance(exc, (ConnectionResetError, aiohttp.ClientOSError)):
        return "connection reset"
    return "request failed"


def _fmt(seconds: float) -> str:
    return f"{seconds:g}s" if seconds >= 1 or seconds == 0 else f"{seconds * 1000:g}ms"


async def _pump(request: web.BaseRequest, resp: aiohttp.ClientResponse, target: Target,
                match: Match, ex: Exchange, metrics: Any) -> web.StreamResponse:
    route = match.route
    up = target.upstream
    ex.ttfb = time.monotonic() - ex.start
    ex.status = resp.status
    ex._upstream_resp = resp
    ctype = resp.headers.get("Content-Type", "")
    encoding = resp.headers.get("Content-Encoding", "identity").lower()
    sse = ctype.startswith("text/event-stream")
    aligned = sse and encoding in ("", "identity")
    kind = providers.stream_kind(up.provider, match.rest or up.url.raw_path)
    out = web.StreamResponse(status=resp.status, reason=resp.reason,
                             headers=response_headers(resp, ex.request_id, drop_length=sse))
    ok = False
    try:
        await out.prepare(request)
        ex.streaming = True
        metrics.stream_started(route.path)
        reason = await _copy_body(resp, out, route, kind, ex, aligned,
                                  json_body=ctype.startswith("application/json") and encoding in ("", "identity"))
        ex.end_reason = reason
        ok = reason == "done"
        if not ok and not ex.injected:
            # Nothing in-band can say "failed" here: end without a clean final chunk.
            if request.transport is not None:
                request.transport.close()
        return out
    except (asyncio.CancelledError, ConnectionError) as exc:
        ex.end_reason = "client_gone"
        if isinstance(exc, asyncio.CancelledError):
            raise
        return out
    finally:
        ex._upstream_resp = None
        if ok:
            resp.release()
        else:
            resp.close()  # never pool a connection whose response was not read to the end
        if ex.streaming:
            metrics.stream_ended(route.path)


class _Clock:
    """One timer per stream for idle, total and heartbeat deadlines.

    Arming an ``asyncio.timeout`` around every read costs a Timeout object and a
    heap-scheduled handle per event.  Instead the pump only records when data last
    arrived; this timer wakes up at the earliest deadline, re-arms itself if data came
    in the meantime, and only on real silence interrupts the pump's pending read by
    cancelling its task (the pump tells that apart from a client disconnect by
    ``reason``, and hands a real cancellation on).
    """

    __slots__ = ("loop", "task", "idle", "total_deadline", "beat", "tracker", "last", "last_beat",
                 "reading", "reason", "handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float, total_deadline: float,
                 beat: float, tracker: BoundaryTracker | None) -> None:
        self.loop = loop
        self.task = asyncio.current_task()
        self.idle, self.total_deadline, self.beat, self.tracker = idle, total_deadline, beat, tracker
        self.last = self.last_beat = loop.time()
        self.reading = False
        self.reason: str | None = None
        self.handle: asyncio.TimerHandle | None = None
        self._arm()

    def _next(self) -> float:
        nxt = min(self.last + self.idle, self.total_deadline)
        if self.tracker is not None:
            nxt = min(nxt, max(self.last, self.last_beat) + self.beat)
        return nxt

    def _arm(self) -> None:
        when = self._next()
        self.handle = self.loop.call_at(when, self._fire) if when != math.inf else None

    def _fire(self) -> None:
        now = self.loop.time()
        if not self.reading:
            # The pump is writing to a slow client. Deadlines only ever interrupt a read,
            # so look again shortly; silence is counted from when relayd reads again.
            self.handle = self.loop.call_at(now + 0.25, self._fire)
            return
        if now >= self.total_deadline:
            self.reason = "total_timeout"
        elif now >= self.last + self.idle:
            self.reason = "idle_timeout"
        elif self.tracker is not None and now >= max(self.last, self.last_beat) + self.beat:
            if self.tracker.at_boundary:
                self.reason = "heartbeat"
            else:
                self.last_beat = now  # never inside a held event; try again one period later
        if self.reason is not None and self.task is not None:
            self.task.cancel()
            return
        self._arm()

    def woke(self) -> str | None:
        """After a CancelledError: our reason, or None when the cancel came from outside."""
        reason, self.reason = self.reason, None
        if reason is None or self.task is None:
            return None
        if self.task.uncancel() > 0:  # a real cancellation arrived as well: honour it
            return None
        if reason == "heartbeat":
            self.last_beat = self.loop.time()
            self._arm()
        return reason

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


async def _copy_body(resp: aiohttp.ClientResponse, out: web.StreamResponse, route: Any,
                     kind: StreamKind, ex: Exchange, aligned: bool, json_body: bool) -> str:
    """Pump the upstream body to the client; return the end reason."""
    loop = asyncio.get_running_loop()
    content = resp.content
    timeouts = route.timeouts
    start = loop.time()
    tracker = BoundaryTracker() if aligned else None
    clock = _Clock(loop, timeouts.idle or math.inf,
                   start + timeouts.total if timeouts.total else math.inf,
                   route.heartbeat if aligned and route.heartbeat else math.inf, tracker)
    ended = False
    marker = providers.end_marker(kind) if aligned else None
    meter = UsageMeter()
    last_block = b""
    crlf: bool | None = None  # the upstream's line ends, decided from its first complete block
    reason = "done"
    write = out.write
    try:
        while True:
            clock.reading = True
            try:
                chunk = await content.readany()
            except asyncio.CancelledError:
                woke = clock.woke()
                if woke is None:
                    raise
                if woke == "heartbeat":
                    clock.reading = False
                    await write(HEARTBEAT)
                    ex.heartbeats += 1
                    continue
                reason = woke
                break
            except (aiohttp.ClientError, OSError):
                reason = ex.stop_reason or "upstream_reset"
                break
            clock.reading = False
            if not chunk:
                if ex.stop_reason:
                    reason = ex.stop_reason
                elif tracker is not None:
                    tail = tracker.tail
                    if ended or not kind.strict_end or (tail and providers.is_bare_error(tail)):
                        if tail:
                            await write(tail)
                            ex.bytes_out += len(tail)
                    else:
                        reason = "upstream_eof"
                break
            if tracker is not None:
                chunk = tracker.feed(chunk)
                if not chunk:
                    clock.last = loop.time()
                    continue
                if not ended and marker is not None and marker(chunk):
                    ended = True
                meter.observe_events(chunk)
                last_block = chunk
                if crlf is None:
                    crlf = b"\r" in chunk
            elif json_body:
                meter.observe_body(chunk)
            await write(chunk)
            ex.bytes_out += len(chunk)
            clock.last = loop.time()  # upstream silence counts from when relayd can read again
    finally:
        clock.stop()
    if tracker is not None:
        ex.events = tracker.blocks
    if reason != "done" and ended:
        reason = "done"  # the provider had already said its last word
    ex.usage = meter.result(partial=reason != "done")
    if reason != "done" and tracker is not None and tracker.aligned:
        message = providers.REASON_TEXT[reason].format(
            bytes=ex.bytes_out, idle=_fmt(timeouts.idle), total=_fmt(timeouts.total))
        event = providers.error_event(
            kind, reason, f"relayd: {message} (request id {ex.request_id})",
            seq=providers.last_sequence_number(last_block) if kind.responses else None,
            crlf=crlf if crlf is not None else kind.provider == "gemini")
        await write(event)
        ex.injected = reason
    return reason

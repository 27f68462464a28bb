"""Before commit: from a matched request to an open upstream response, or an error.

Until the first response byte goes to the client nothing is promised, so everything
can still be retried: this phase reads (and, for failover, buffers) the request body,
picks upstreams in route order past open breakers, sends, classifies each failure, and
fails over.  It returns either an upstream response with its status and headers read
(the point of no return is the caller's ``prepare``) or a complete provider-format error
response.  No provider is named here; ``providers`` answers everything that differs.

Failures become short client messages that never carry upstream bytes, addresses or
library text (they can hold a host name, a key echoed by a broken upstream, a path).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import headers as hdrs
from . import providers
from .body import ClientWatch, ReplayBudget, RequestBody
from .exchange import End
from .routes import Match, Target, split_target, upstream_url
from .upstreams import CONNECTED

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
_KEEP_ERROR_BODY = 1024 * 1024


class _Failure(Exception):
    """An attempt that produced no usable response."""

    def __init__(self, reason: End, status: int, message: str, detail: str | None = None,
                 answered: bool = False, local: bool = False) -> None:
        self.reason, self.status, self.message = reason, status, message
        self.detail = detail  # for the operator's log only (a TLS verify reason)
        # The upstream answered, with something relayd cannot relay: it acted on the
        # request, so the request is not sent to another upstream (a prompt billed twice).
        self.answered = answered
        # relayd itself could not connect (out of file descriptors): not the upstream's
        # failure (no breaker charge), and the next upstream would fail the same way.
        self.local = local

    @property
    def cause(self) -> str:
        return self.message if self.detail is None else f"{self.message} ({self.detail})"


@dataclass
class Forwarded:
    """What the phase did: an open upstream response, or the response to send instead."""

    attempts: int = 0
    queued: float = 0.0  # seconds spent waiting for a free upstream connection
    upstream: str | None = None
    resp: aiohttp.ClientResponse | None = None
    target: Target | None = None
    error: web.Response | None = None
    reason: End = End.DONE
    status: int = 0
    relayed: int = 0  # body bytes of a kept upstream answer sent instead (``error``)
    kept_at: float | None = None  # when that answer's head came (time.monotonic)
    # The open response is an error after an upstream had the request in whole (it thought
    # past ``first_byte``): it must say ``x-should-retry: false``, or the SDKs send the
    # prompt there twice more (review 83).
    no_retry: bool = False


def _order(targets: tuple[Target, ...]) -> list[Target]:
    """Route order, skipping upstreams whose breaker is open while another is available."""
    closed = [t for t in targets if not t.pool.breaker_open]
    return closed or list(targets)


async def forward(request: web.BaseRequest, match: Match, request_id: str, body: RequestBody,
                  metrics: Any, log: Any, out: Forwarded) -> Forwarded:
    """``out`` is filled as the attempts go: a request cancelled in the middle (the client
    left) still tells which upstream it had reached."""
    provider = providers.get(match.targets[0].upstream.provider)
    try:
        return await _attempts(request, match, request_id, body, metrics, log, out, provider)
    except _Failure as f:  # the client's body did not arrive in time
        _refused(out, f, provider, request_id).force_close()  # the unread rest of the body
        return out                                            # makes the connection unusable
    finally:
        body.release()


async def _attempts(request: web.BaseRequest, match: Match, request_id: str, body: RequestBody,
                    metrics: Any, log: Any, out: Forwarded, provider: providers.Provider
                    ) -> Forwarded:
    route = match.route
    query = split_target(request.raw_path)[2]
    base_headers = hdrs.for_upstream(request.headers, request_id)
    timeouts = route.timeouts
    if not body.ready():
        try:
            async with asyncio.timeout(timeouts.first_byte or None):
                await body.prepare()
        except TimeoutError:
            raise _Failure(End.BODY_TIMEOUT, 408, _body_late(timeouts)) from None
        except web.RequestPayloadError as exc:
            raise _Failure(End.BODY_INVALID, 400, str(exc)) from None

    kept_error: web.Response | None = None
    kept_from: str | None = None  # the upstream that sent it
    kept_at: float | None = None  # and when its head came
    last_failure: _Failure | None = None
    # An attempt the upstream took in whole and thought about (first_byte ran out): the
    # request may be generating and billed there, so the final error says so, whatever
    # the upstreams after it did (a refused connection would read as "retry me").
    spent: _Failure | None = None
    spent_at: str | None = None  # the upstream that has it
    candidates = _order(match.targets)
    for i, target in enumerate(candidates):
        if i > 0 and not body.replayable:
            break
        up = target.upstream
        out.upstream = up.name
        out.attempts += 1
        # The last candidate may change the request's own copy; earlier ones get theirs.
        headers = base_headers if i == len(candidates) - 1 else CIMultiDict(base_headers)
        speaks = providers.get(up.provider)
        speaks.set_auth(headers, up.api_key)
        for k, v in up.headers:
            headers[k] = v
        # relayd's key replaces the client's wherever the client put it (Gemini: ?key=)
        q = speaks.without_key_param(query) if up.api_key else query
        url = URL(up.origin + upstream_url(up.url.raw_path, match.rest, q), encoded=True)
        last = i == len(candidates) - 1
        try:
            await _slot(target, timeouts, out)
        except _Failure as f:  # every connection busy: try the next upstream, breaker untouched
            metrics.attempt(up.name, f.reason)
            log.warning("upstream attempt failed", request_id=request_id, route=match.route.path,
                        upstream=up.name, attempt=out.attempts, reason=f.reason, cause=f.cause)
            last_failure = f
            continue
        except (asyncio.CancelledError, ConnectionError):
            metrics.attempt(up.name, "cancelled")
            raise
        try:
            resp = await _send(target, request.method, url, headers, body, timeouts)
        except _Failure as f:
            target.pool.release()
            if f.reason in (End.BODY_TIMEOUT, End.BODY_INVALID):
                metrics.attempt(up.name, "cancelled")
                raise  # the client's fault, not the upstream's: no breaker, no failover
            if not f.local:  # (relayd's own shortage is not the upstream's failure)
                target.pool.record(False)
            reason = "local_error" if f.local else f.reason
            metrics.attempt(up.name, reason)
            log.warning("upstream attempt failed", request_id=request_id, route=match.route.path,
                        upstream=up.name, attempt=out.attempts, reason=reason, cause=f.cause)
            last_failure = f
            if f.local or f.answered:
                break
            if f.reason is End.FIRST_BYTE_TIMEOUT and spent is None:
                spent, spent_at = f, up.name
            continue
        except BaseException as exc:  # the client went away while we waited: free the slot all the same
            target.pool.release()
            if isinstance(exc, (asyncio.CancelledError, ConnectionError)):
                metrics.attempt(up.name, "cancelled")  # (tokens may have been spent upstream)
            raise
        if resp.status in RETRY_STATUSES and not last and body.replayable:
            target.pool.record(False)
            metrics.attempt(up.name, f"status_{resp.status}")
            log.warning("upstream attempt failed", request_id=request_id, route=match.route.path,
                        upstream=up.name, attempt=out.attempts, reason=f"status_{resp.status}",
                        cause=f"upstream answered {resp.status}")
            try:
                answered_at = time.monotonic()
                kept = await _keep(resp, request_id, timeouts)
                if kept is not None:
                    kept_error, kept_from, kept_at = kept, up.name, answered_at
            finally:
                target.pool.release()
            last_failure = None
            continue
        target.pool.record(resp.status < 500 or resp.status in (501, 505))
        metrics.attempt(up.name, "ok" if resp.status < 400 else f"status_{resp.status}")
        out.resp, out.target, out.status = resp, target, resp.status
        out.no_retry = spent is not None and resp.status >= 400
        return out

    if kept_error is not None and last_failure is not None:
        # Every upstream failed; the last real provider answer says more than relayd can.
        out.error, out.status, out.reason = kept_error, kept_error.status, last_failure.reason
        # The access line names the upstream whose answer the client got, and its bytes.
        out.upstream, out.relayed, out.kept_at = kept_from, len(kept_error.body or b""), kept_at
        if spent is not None or last_failure.answered:
            # An upstream had the request in whole (thought past first_byte, or answered
            # what relayd could not relay): the SDKs would retry the kept 503 (reviews 75, 83).
            kept_error.headers["x-should-retry"] = "false"
        return out
    if spent is not None:
        out.upstream = spent_at  # the access line names the upstream whose failure it gives
    _refused(out, spent or last_failure or _Failure(End.CONNECT_ERROR, 502, "no upstream available"),
             provider, request_id)
    return out


def _refused(out: Forwarded, f: _Failure, provider: providers.Provider,
             request_id: str) -> web.Response:
    """relayd's own answer for a failure before commit, recorded on ``out``."""
    out.status, out.reason = f.status, f.reason
    out.error = error_response(provider, f.status, f"{f.message} (request id {request_id})",
                               f.reason, request_id)
    if f.answered or f.reason is End.FIRST_BYTE_TIMEOUT:
        # The upstream had the whole request and acted on it (answered, or thought for
        # first_byte): the official SDKs would send it again, twice, each time billed.
        out.error.headers["x-should-retry"] = "false"
    return out.error


async def _slot(target: Target, timeouts: Any, out: Forwarded) -> None:
    up = target.upstream
    wait = up.pool_wait if up.pool_wait is not None else timeouts.first_byte
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        out.queued += await target.pool.take(wait or None)
    except TimeoutError:
        out.queued += wait
        raise _Failure(End.POOL_TIMEOUT, 503,
                       f"all {up.max_connections} connections to upstream '{up.name}' are busy "
                       f"(waited {fmt(wait)})") from None
    except BaseException:  # the client left (or the drain ended it) while it waited
        out.queued += loop.time() - start
        raise


def _body_late(timeouts: Any) -> str:
    return f"the request body did not arrive within {fmt(timeouts.first_byte)}"


def error_response(provider: providers.Provider, status: int, message: str, code: str,
                   request_id: str) -> web.Response:
    return web.Response(status=status, body=provider.error_body(status, message, code),
                        content_type="application/json", headers=provider.error_headers(request_id))


class _Kept(hdrs.UpstreamAnswer, web.Response):
    """A failover route's kept upstream error: relayed as the upstream sent it (no
    ``Server`` or CORS header of relayd's, and no ``Content-Type`` where it had none:
    aiohttp adds ``application/octet-stream`` to a body without one, review 86)."""

    untyped = False

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if self.untyped:
            self._headers.popall("Content-Type", None)


async def _keep(resp: aiohttp.ClientResponse, request_id: str, timeouts: Any) -> web.Response | None:
    """A retryable error answer, kept to relay as is should every other upstream fail.

    Kept whole or not at all: a body cut short is a JSON document no SDK can parse, so
    one that is larger than 1 MiB, broken, or slower than ``idle`` (``first_byte`` when
    idle is off) gives way to relayd's own error."""
    try:
        async with asyncio.timeout(timeouts.idle or timeouts.first_byte or None):
            body = bytearray()
            while chunk := await resp.content.readany():
                body += chunk
                if len(body) > _KEEP_ERROR_BODY:
                    return None
        kept = _Kept(status=resp.status, reason=resp.reason, body=bytes(body),
                     headers=hdrs.for_client(resp.headers, request_id, drop_length=True))
        kept.untyped = "Content-Type" not in resp.headers
        return kept
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    finally:
        if resp.content.is_eof():
            resp.release()  # read to the end: the connection can be reused
        else:
            resp.close()


async def _send(target: Target, method: str, url: URL, headers: CIMultiDict[str],
                body: RequestBody, timeouts: Any) -> aiohttp.ClientResponse:
    try:
        return await _send_once(target, method, url, headers, body, timeouts)
    except Exception:
        # A streamed body that broke its framing fails the upload, which the client
        # library reports as a connection error: the client's fault, said as such.
        if body.broken is not None:
            raise _Failure(End.BODY_INVALID, 400, body.broken) from None
        raise


async def _send_once(target: Target, method: str, url: URL, headers: CIMultiDict[str],
                     body: RequestBody, timeouts: Any) -> aiohttp.ClientResponse:
    """One upstream attempt, each failure classified for the client and the breaker."""
    up = target.upstream
    ct = _client_timeout(timeouts.connect)
    watch = None if body.complete else ClientWatch(body.request)
    # (reset after the attempt: a context variable left set stays in the task's context,
    # a held stream's for its minutes)
    connected = CONNECTED.set(False)
    try:
        async with asyncio.timeout(timeouts.first_byte or None):
            resp = await target.pool.send(method, url, headers, body.data, ct)
    except aiohttp.ConnectionTimeoutError:
        raise _Failure(End.CONNECT_ERROR, 504,
                       f"timed out connecting to upstream '{up.name}' after {fmt(timeouts.connect)}") from None
    except TimeoutError:
        if not CONNECTED.get():  # first_byte ended the connect (``connect`` longer, or 0):
            raise _Failure(End.CONNECT_ERROR, 504,  # the upstream got nothing, a retry is safe
                           f"timed out connecting to upstream '{up.name}' after "
                           f"{fmt(timeouts.first_byte)}") from None
        if not body.complete and body.reading:
            raise _Failure(End.BODY_TIMEOUT, 408, _body_late(timeouts)) from None
        if not body.complete:  # relayd had bytes for it: the upstream stopped taking them
            raise _Failure(End.FIRST_BYTE_TIMEOUT, 504,
                           f"upstream '{up.name}' did not read the request body within "
                           f"{fmt(timeouts.first_byte)}") from None
        raise _Failure(End.FIRST_BYTE_TIMEOUT, 504,
                       f"upstream '{up.name}' sent no response headers within {fmt(timeouts.first_byte)}") from None
    except aiohttp.ClientConnectorError as exc:
        if getattr(exc.os_error, "errno", None) in (errno.EMFILE, errno.ENFILE):
            raise _Failure(End.CONNECT_ERROR, 503, "relayd cannot open a connection now (out of file "
                           "descriptors); try again", f"{exc.os_error.strerror}", local=True) from None
        raise _Failure(End.CONNECT_ERROR, 502,
                       f"cannot connect to upstream '{up.name}': {_connect_why(exc)}",
                       _tls_why(exc)) from None
    except aiohttp.ClientHttpProxyError as exc:  # (before its base class: the upstream got nothing)
        raise _Failure(End.CONNECT_ERROR, 502, f"cannot connect to upstream '{up.name}' through its proxy",
                       f"the proxy answered CONNECT with {exc.status}") from None
    except aiohttp.ClientResponseError as exc:
        if exc.request_info.method == "CONNECT":  # (relayd never forwards a CONNECT of a client's)
            # the egress proxy's answer to relayd's CONNECT was not HTTP: the upstream got nothing
            raise _Failure(End.CONNECT_ERROR, 502, f"cannot connect to upstream '{up.name}' through its proxy",
                           "the proxy's answer to CONNECT was not HTTP") from None
        raise _Failure(End.CONNECT_ERROR, 502, f"invalid response from upstream '{up.name}'",
                       hdrs.short_reason(exc.message) or None, answered=True) from None
    except (aiohttp.ClientError, OSError) as exc:
        # Retryable, even after the whole request went out (unlike the first_byte 504,
        # where the upstream may still be generating): the upstream's work ended with the
        # connection, and a close right after accept (an upstream restarting, a balancer
        # without backends) or the keep-alive race look the same from here.
        raise _Failure(End.CONNECT_ERROR, 502,
                       f"upstream '{up.name}' failed before responding: {_short(exc)}") from None
    finally:
        CONNECTED.reset(connected)
        if watch is not None:
            watch.stop()
    why = _unframed(resp) or ("an invalid header name or a control character in a header value"
                              if hdrs.malformed(resp.headers) else None)
    if why is not None:
        resp.close()
        raise _Failure(End.CONNECT_ERROR, 502, f"invalid response from upstream '{up.name}'",
                       why, answered=True)  # (the why for the log: the client is told none of it)
    return resp


def _unframed(resp: aiohttp.ClientResponse) -> str | None:
    """Why an answer cannot be relayed as sent, if it cannot: a status below 100 (``099``
    would go out as ``99``); a 101 (relayd never forwards ``Upgrade``, so any switch is one
    the client did not ask relayd for); a transfer coding other than chunked (stripped with
    the hop-by-hop header, the coded bytes would reach the client as plain; nginx fails
    ``xchunked`` too)."""
    if resp.status < 100 or resp.status == 101:
        return f"status {resp.status}"
    if hdrs.control_character(resp.reason or ""):
        return "a control character in the reason phrase"
    codings = resp.headers.getall("Transfer-Encoding", ())
    if codings and not (len(codings) == 1 and codings[0].strip().lower() == "chunked"):
        return "transfer coding other than chunked"
    return None


_TIMEOUTS: dict[float, aiohttp.ClientTimeout] = {}


def _client_timeout(connect: float) -> aiohttp.ClientTimeout:
    """One (immutable) ClientTimeout per connect value, not one per request."""
    ct = _TIMEOUTS.get(connect)
    if ct is None:
        # connect: the whole connection (DNS, TCP, TLS, an egress proxy's CONNECT exchange);
        # sock_connect: each address tried.
        ct = _TIMEOUTS[connect] = aiohttp.ClientTimeout(total=None, connect=connect or None,
                                                        sock_connect=connect or None)
    return ct


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


def _tls_why(exc: aiohttp.ClientConnectorError) -> str | None:
    """Why a TLS handshake failed, for the operator: OpenSSL's verify message ("self-signed
    certificate", "Hostname mismatch, ...") or reason.  Clients get "TLS handshake failed"
    only: the reason names the upstream's certificate."""
    if not isinstance(exc, aiohttp.ClientSSLError):
        return None
    err = exc.os_error
    if isinstance(err, ssl.SSLCertVerificationError) and err.verify_message:
        return f"certificate verify failed: {err.verify_message}"
    return getattr(err, "reason", None) or type(err).__name__


def _short(exc: BaseException) -> str:
    """Like _connect_why: what happened, without library text that may name hosts."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "incomplete request body"
    if isinstance(exc, (ConnectionResetError, aiohttp.ClientOSError)):
        return "connection reset"
    return "request failed"


def fmt(seconds: float) -> str:
    return f"{seconds:g}s" if seconds >= 1 or seconds == 0 else f"{seconds * 1000:g}ms"

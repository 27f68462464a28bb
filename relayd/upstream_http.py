"""One request on a pooled upstream connection, without aiohttp's client request machinery.

``ClientSession.request`` builds a ``ClientRequest`` with a payload object, cookie, auth,
redirect, tracing and middleware handling, then a ``ClientResponse``: about 150 µs of CPU
per request on the bench machine, against about 60 µs to write the same bytes on the same
pooled connection and read the answer from aiohttp's own protocol (bench/PROFILE.md).
relayd needs none of that machinery — its headers are final and its body is in memory —
so for that common request this module writes the head and the body in one write, on a
connection from the pool's aiohttp connector (pooling, keep-alive, DNS and TLS stay
aiohttp's), and reads the response head from aiohttp's parser in ``upstream_conn.Guarded``.

A request through a proxy, or with a body that streams, takes aiohttp's whole path
(``Pool.send``); both paths raise the same aiohttp exceptions, which ``forward``
classifies.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import http_writer
from aiohttp.client_reqrep import ClientRequest
from aiohttp.helpers import TimerNoop
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# aiohttp's body readers make a do-nothing timer each when given none: one, stateless,
# serves them all (128 B less per held stream, in each direction).
NO_TIMER = TimerNoop()
# Methods aiohttp retries once when a pooled connection turns out dead (RFC 9112 §9.3.1).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods that get "Content-Length: 0" when they carry no body, as aiohttp sends them.
_BODYLESS = frozenset({"CONNECT", "GET", "HEAD", "OPTIONS", "TRACE"})


class Response:
    """The part of aiohttp's ``ClientResponse`` that relayd reads.

    The connection goes back to its pool the moment the body has been read to its end
    (as aiohttp does); ``close`` — any other ending — closes it, and marks the body
    reader failed so a stream still waiting on it wakes.
    """

    __slots__ = ("status", "reason", "headers", "url", "content", "connection")

    def __init__(self, message: Any, content: aiohttp.StreamReader, connection: Any,
                 url: URL) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.url = url
        self.content = content
        self.connection = connection
        content.on_eof(self._eof)

    def _eof(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.release()  # aiohttp closes it instead if the body was not read to the end

    def _abandon(self) -> None:
        content = self.content
        if content.exception() is None and not content.is_eof():
            content.set_exception(aiohttp.ClientConnectionError("Connection closed"))

    def release(self) -> None:
        self._abandon()
        self._eof()

    def close(self) -> None:
        self._abandon()
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.close()


class Sender:
    """Sends requests on one pool's connector; built once per pool."""

    def __init__(self, connector: aiohttp.BaseConnector, origin: URL, read_bufsize: int) -> None:
        self.connector = connector
        self.read_bufsize = read_bufsize
        # The connector only reads a request's origin, TLS and proxy fields (its pool
        # key); one template stands for every request of this pool.
        self.template = ClientRequest("GET", origin, loop=asyncio.get_running_loop())

    async def send(self, method: str, url: URL, headers: CIMultiDict[str],
                   data: bytes | bytearray | None, timeout: aiohttp.ClientTimeout) -> Response:
        head = self._head(method, url, headers, data)
        # A large body goes out by writev, not copied next to the head (a buffered body is
        # the largest thing relayd holds; joined, every failover upload cost twice its size).
        out = (head,) if not data else (head + data,) if len(data) < 16384 else (head, data)
        retry = method in _IDEMPOTENT
        while True:
            try:
                return await self._exchange(method, url, headers, out, timeout)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                if not retry:  # a pooled connection the upstream had closed: once more
                    raise
                retry = False

    def _head(self, method: str, url: URL, headers: CIMultiDict[str],
              data: bytes | bytearray | None) -> bytes:
        lines = [f"{method} {url.raw_path_qs} HTTP/1.1"]
        if "Host" not in headers:
            lines.append(f"Host: {url.host_port_subcomponent}")
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            if data:
                lines.append(f"Content-Length: {len(data)}")
            elif method not in _BODYLESS:
                lines.append("Content-Length: 0")
        # relayd's serializer (headers.py) keeps obs-text bytes and refuses CR/LF; the
        # request line and the two added fields are built from parsed, checked values.
        fields = http_writer._serialize_headers("-", headers)[3:]
        return "\r\n".join(lines).encode("latin-1") + b"\r\n" + fields

    async def _exchange(self, method: str, url: URL, headers: CIMultiDict[str],
                        out: tuple[bytes | bytearray, ...], timeout: aiohttp.ClientTimeout) -> Response:
        try:
            conn = await self.connector.connect(self.template, [], timeout)
        except asyncio.TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {url}") from exc
        try:
            proto = conn.protocol
            transport = conn.transport
            if proto is None or transport is None or transport.is_closing():
                raise aiohttp.ServerDisconnectedError()
            proto.set_response_params(skip_payload=method == "HEAD", read_until_eof=True,
                                      auto_decompress=False, read_bufsize=self.read_bufsize,
                                      timer=NO_TIMER)
            transport.write(out[0]) if len(out) == 1 else transport.writelines(out)
            try:
                while True:
                    message, payload = await proto.read()
                    if not 100 <= message.code <= 199 or message.code == 101:
                        break  # 1xx interim responses are the upstream's business
            except HttpProcessingError as exc:
                info = aiohttp.RequestInfo(url, method, CIMultiDictProxy(headers), url)
                raise aiohttp.ClientResponseError(info, (), status=exc.code, message=exc.message,
                                                  headers=exc.headers) from exc
        except BaseException:
            conn.close()
            raise
        return Response(message, payload, conn, url)

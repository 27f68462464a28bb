"""End-to-end header copying (RFC 9110 §7.6.1), the same rule in both directions.

A proxy forwards end-to-end headers and drops hop-by-hop ones: the fixed list and every
header the ``Connection`` header names.  relayd sets ``X-Request-Id`` itself (one id
per request, in logs and in both directions) but never overwrites the provider's own.

Header values keep their bytes.  aiohttp's parsers decode values as UTF-8 with
``surrogateescape``, so a non-UTF-8 obs-text byte (``caf\xe9``) becomes a lone
surrogate — which aiohttp's C serializer silently drops.  nginx passes such bytes on;
so does relayd: ``_serialize_headers`` below replaces aiohttp's serializer (one
module attribute, both directions) and sends any value that is not pure ASCII through
a path that turns the surrogates back into the original bytes.  ASCII values, nearly
all of them, still take the C path; ``str.isascii`` is O(1).
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import http_writer
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade"})
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect", "x-request-id"}
_RESPONSE_DROP_LENGTH = HOP_BY_HOP | {"content-length"}
_CTL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # field-value may hold HTAB and obs-text, no CTLs
_NOT_TOKEN = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")  # a field-name is a token


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


def for_upstream(headers: Any, request_id: str) -> CIMultiDict[str]:
    out = end_to_end(headers, _REQUEST_DROP)
    out["X-Request-Id"] = request_id
    # An SSE stream relayd cannot read (gzip: Anthropic compresses when asked, and its SDK
    # asks) gets no error event when it breaks, no heartbeat and no usage: the upstream is
    # asked for the body as it is.  The client may get identity whatever it accepted.
    out["Accept-Encoding"] = "identity"
    return out


def for_client(headers: Any, request_id: str, drop_length: bool) -> CIMultiDict[str]:
    """drop_length: relayd frames the body itself (SSE it may add to, replayed error bodies)."""
    out = end_to_end(headers, _RESPONSE_DROP_LENGTH if drop_length else HOP_BY_HOP)
    if "x-request-id" not in out:  # never overwrite the provider's own id
        out["X-Request-Id"] = request_id
    return out


_MOVED = ("Location", "Content-Location", "X-Goog-Upload-URL")


def relocate(headers: CIMultiDict[str], moved: tuple[str, str], request: Any) -> None:
    """An absolute URL of the upstream's in a header that sends the client somewhere
    (a redirect, Google's resumable upload URL) points back through relayd, as nginx's
    ``proxy_redirect default``: followed as is, the client would go to the provider
    directly — with no key of its own (the upload failed) or with relayd's client key.
    ``moved``: (the upstream's scheme://host[:port]/base, the route's prefix)."""
    upstream, route = moved
    for name in _MOVED:
        value = headers.get(name)
        if value is None or not upstream or not value.startswith(upstream):
            continue
        rest = value[len(upstream):]
        if rest and rest[0] not in "/?#":
            continue  # (another path that only begins the same: /v1beta vs /v1)
        headers[name] = f"{request.scheme}://{_authority(request)}{route}{rest}"


def _authority(request: Any) -> str:
    """host[:port] the client reached relayd at: an absolute-form target's own (RFC 9112
    §3.2.2), else ``Host``, else the listening socket's.  aiohttp's ``request.host`` drops
    the port of the first and the last, so a redirect went to the wrong port (review 86)."""
    raw = request.raw_path
    if not raw.startswith("/") and "://" in raw[:16]:
        return raw.partition("://")[2].partition("/")[0].partition("?")[0].rpartition("@")[2]
    host = request.headers.get("Host")
    if host:
        return str(host)
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if isinstance(sock, tuple) and len(sock) >= 2:
        return f"[{sock[0]}]:{sock[1]}" if ":" in str(sock[0]) else f"{sock[0]}:{sock[1]}"
    return str(request.host)


def media_type(value: str) -> str:
    """``Text/Event-Stream; charset=utf-8`` → ``text/event-stream`` (RFC 9110 §8.3.1)."""
    return value.partition(";")[0].strip().lower()


def malformed(headers: Any) -> bool:
    """A header a proxy must not pass on (RFC 9110 §5.5, RFC 9112 §5.1): a value with a
    control character, or a name that is not a token — ``Content-Length : 5`` was framed
    by aiohttp's lenient parser and went out beside relayd's own framing (nginx: 502).

    One regex over all names joined, and ``str.isprintable`` over each value, clear a
    well-formed head at C speed; only values it flags (tabs, obs-text, controls) get the
    exact test.
    """
    if _NOT_TOKEN.search("".join(headers.keys())) is not None:
        return True
    for v in headers.values():
        if not v.isprintable() and control_character(v):  # (no call for a plain value)
            return True
    return False


def control_character(text: str) -> bool:
    """A CTL other than HTAB: never sent in a status line or a field value."""
    return not text.isprintable() and _CTL.search(text) is not None


class UpstreamAnswer:
    """For a client response that relays an upstream's answer (``stream._Out``, the kept
    error of a failover route): aiohttp adds its own ``Server`` where none is set, and a
    proxy adds none; the upstream's own ``Server`` stays, whatever it says.  relayd's own
    answers are the other responses (``server.Request._prepare_hook``).

    To an HTTP/1.0 client a body of unknown length ends with the connection (HTTP/1.0 has
    no chunks): aiohttp omits the length yet kept a keep-alive connection open, so the
    client's body never ended and its next answer landed inside it."""

    _headers: Any
    _req: Any
    _must_be_empty_body: bool | None

    async def _prepare_headers(self) -> None:
        upstream_server = "Server" in self._headers
        await super()._prepare_headers()  # type: ignore[misc]
        if not upstream_server:
            self._headers.popall("Server", None)
        if (self._req.version < HttpVersion11 and "Content-Length" not in self._headers
                and not self._must_be_empty_body):
            self.force_close()  # type: ignore[attr-defined]


def short_reason(message: object) -> str:
    """aiohttp's parser messages quote the offending bytes (a header line, a cookie):
    only the reason before them is logged or shown."""
    return str(message).split(":", 1)[0].split("\n", 1)[0][:120]


_c_serialize = http_writer._serialize_headers


def _serialize_headers(status_line: str, headers: Any) -> bytes:
    # aiohttp's serializer drops what is not UTF-8 (obs-text, kept by its parser as
    # surrogates): a Latin-1 value or reason phrase goes out as the upstream sent it.
    for v in headers.values():
        if not v.isascii():
            break
    else:
        if status_line.isascii():
            return _c_serialize(status_line, headers)  # type: ignore[no-any-return]
    lines = [status_line, *(f"{k}: {v}" for k, v in headers.items())]
    for line in lines:
        if _CTL.search(line):
            raise ValueError("control character in a header: refusing to send it")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


http_writer._serialize_headers = _serialize_headers

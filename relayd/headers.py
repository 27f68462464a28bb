"""End-to-end header copying (RFC 9110 §7.6.1), the same rule in both directions.

A proxy forwards end-to-end headers and drops hop-by-hop ones: the fixed list and every
header the ``Connection`` header names.  relayd sets ``X-Request-Id`` itself (one id
per request, in logs and in both directions) but never overwrites the provider's own.
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade"})
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect", "x-request-id"}
_RESPONSE_DROP_LENGTH = HOP_BY_HOP | {"content-length"}


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
    return out


def for_client(headers: Any, request_id: str, drop_length: bool) -> CIMultiDict[str]:
    """drop_length: relayd frames the body itself (SSE it may add to, replayed error bodies)."""
    out = end_to_end(headers, _RESPONSE_DROP_LENGTH if drop_length else HOP_BY_HOP)
    if "x-request-id" not in out:  # never overwrite the provider's own id
        out["X-Request-Id"] = request_id
    return out


def media_type(value: str) -> str:
    """``Text/Event-Stream; charset=utf-8`` → ``text/event-stream`` (RFC 9110 §8.3.1)."""
    return value.partition(";")[0].strip().lower()

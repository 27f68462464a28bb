"""What one request did: the record the access log and metrics read when it ends.

The handler (``app.App.handle``) is the only writer: it fills an ``Exchange`` from what
the two phases of a request return (``forward.Forwarded`` before commit,
``stream.StreamEnd`` after).  ``End`` names every way a request can end, once, so a
log reader and a metric label speak the same words.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Callable

from .usage import Usage


class End(StrEnum):
    """How a request ended; the value is what logs and metrics show."""

    DONE = "done"                              # the response ended as the upstream ended it
    CLIENT_GONE = "client_gone"                # the client closed its connection first
    CONNECT_ERROR = "connect_error"            # no response from any upstream (or a broken one)
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"  # no response headers in time
    POOL_TIMEOUT = "pool_timeout"              # no free upstream connection in time
    HEADER_TIMEOUT = "header_timeout"          # the client began a request head, not in time
    BODY_TIMEOUT = "body_timeout"              # the client did not send its body in time
    BODY_INVALID = "body_invalid"              # the client's body broke its own framing
    UPSTREAM_RESET = "upstream_reset"          # the upstream connection broke mid-body
    UPSTREAM_EOF = "upstream_eof"              # clean close before the endpoint's natural end
    IDLE_TIMEOUT = "idle_timeout"              # upstream silent for too long mid-body
    TOTAL_TIMEOUT = "total_timeout"            # the response, headers to end, took too long
    SEND_TIMEOUT = "send_timeout"              # the client accepted no bytes for too long
    SHUTDOWN = "shutdown"                      # relayd ended it while draining
    ERROR = "error"                            # a relayd bug: logged with a traceback


class Exchange:
    """One request's record.  Written by the handler only; read when the request ends."""

    __slots__ = ("request_id", "method", "path", "client", "route", "upstream", "attempts",
                 "status", "end", "start", "queued", "ttfb", "bytes_in", "bytes_out", "events",
                 "heartbeats", "injected", "usage", "streaming", "stopper",
                 "client_name", "error")

    def __init__(self, request_id: str, method: str, path: str, client: str | None) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.client = client  # the peer address
        self.client_name: str | None = None  # the configured client whose key it sent
        self.route: str | None = None
        self.upstream: str | None = None
        self.attempts = 0
        self.status = 0
        self.end = End.DONE
        self.start = time.monotonic()
        self.queued = 0.0
        self.ttfb: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.events = 0
        self.heartbeats = 0
        self.injected: End | None = None
        self.error: str | None = None  # why relayd answered it itself (a 4xx), for the access line
        self.usage: Usage | None = None
        self.streaming = False
        # Set while a phase can be ended from outside (drain): how to end it.
        self.stopper: Callable[[End], None] | None = None

    @property
    def duration(self) -> float:
        return time.monotonic() - self.start

    def stop(self, reason: End) -> None:
        if self.stopper is not None:
            self.stopper(reason)

"""Provider rules: auth headers, error bodies, injected error events, end markers.

Everything that differs between OpenAI, Anthropic, Azure, Gemini and generic
OpenAI-compatible servers lives here, so that the pipe stays provider-agnostic.  Error
shapes follow what each official SDK raises on (see tests/fixtures/error-formats.md):
a client talking to relayd must get the same exception type it would get from the
provider itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from multidict import CIMultiDict

CLIENT_CREDENTIALS = ("Authorization", "x-api-key", "api-key", "x-goog-api-key")

# Why each end reason happened, as a client-facing sentence (no secrets, no tracebacks).
REASON_TEXT = {
    "upstream_reset": "upstream connection reset after {bytes} bytes",
    "upstream_eof": "upstream closed the stream after {bytes} bytes without its end marker",
    "idle_timeout": "no data from upstream for {idle}",
    "total_timeout": "stream exceeded the total time limit of {total}",
    "shutdown": "relayd is shutting down; the stream was ended",
}


def set_auth(headers: CIMultiDict[str], provider: str, api_key: str | None) -> None:
    """Replace client credentials with the upstream's key; without a key, pass them through."""
    if not api_key:
        return
    for name in CLIENT_CREDENTIALS:
        headers.popall(name, None)
    if provider == "anthropic":
        headers["x-api-key"] = api_key
    elif provider == "azure":
        headers["api-key"] = api_key
    elif provider == "gemini":
        headers["x-goog-api-key"] = api_key
    else:
        headers["Authorization"] = f"Bearer {api_key}"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- HTTP errors

_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                  500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}
_ANTHROPIC_TYPE = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 500: "api_error", 502: "api_error",
                   503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
_OPENAI_TYPE = {400: "invalid_request_error", 404: "not_found", 413: "invalid_request_error",
                502: "server_error", 503: "server_error", 504: "timeout"}


def error_body(provider: str, status: int, message: str, code: str) -> bytes:
    """A JSON error body in the provider's own HTTP error shape."""
    if provider == "anthropic":
        return _dumps({"type": "error",
                       "error": {"type": _ANTHROPIC_TYPE.get(status, "api_error"),
                                 "message": message}})
    if provider == "gemini":
        return _dumps({"error": {"code": status, "message": message,
                                 "status": _GEMINI_STATUS.get(status, "UNKNOWN")}})
    return _dumps({"error": {"message": message, "type": _OPENAI_TYPE.get(status, "server_error"),
                             "param": None, "code": code}})


def not_found_body(path: str) -> bytes:
    return _dumps({"error": {"message": f"no route for {path}", "type": "not_found"}})


# --------------------------------------------------------------------------- stream errors

@dataclass(frozen=True)
class StreamKind:
    """How one response stream ends naturally and how relayd reports its failure."""

    provider: str
    responses: bool  # OpenAI Responses API (…/responses)

    @property
    def strict_end(self) -> bool:
        """Whether a clean close without the end marker counts as a failure."""
        return self.provider != "generic"


def stream_kind(provider: str, upstream_path: str) -> StreamKind:
    return StreamKind(provider, upstream_path.rstrip("/").endswith("/responses"))


# Field lines that end a stream; they must start a line.  Each pattern begins with its
# literal ("data:", "event:") so the regex engine can scan for it instead of trying
# every position; the line-start condition is checked on the match.
_CHAT_END = re.compile(rb'data: ?(?:\[DONE\]|\{"error")|event: ?error[\r\n]')
_RESPONSES_END = re.compile(rb'event: ?(?:response\.(?:completed|incomplete|failed)|error)[\r\n]')
_RESPONSES_TYPE = re.compile(rb'"type": ?"response\.(?:completed|incomplete|failed)"')
_ANTHROPIC_END = re.compile(rb'event: ?(?:message_stop|error)[\r\n]')
_ANTHROPIC_STOP = re.compile(rb'"type": ?"message_stop"')
_DATA_ERROR = re.compile(rb'data: ?\{"error"')


def _starts_line(rx: re.Pattern[bytes], seg: bytes) -> bool:
    """A match at the start of a line (segments always begin at a line start)."""
    for m in rx.finditer(seg):
        s = m.start()
        if s == 0 or seg[s - 1] in b"\r\n":
            return True
    return False


def end_marker(kind: StreamKind) -> Callable[[bytes], bool]:
    """A test over released complete blocks that finds the provider's natural end.

    It runs once per released segment, so a substring pre-check (C speed) decides for
    nearly every event; a regex only confirms candidates.
    """
    if kind.provider == "anthropic":
        def anthropic(seg: bytes) -> bool:
            return ((b"message_stop" in seg or b"error" in seg)
                    and (_starts_line(_ANTHROPIC_END, seg) or _ANTHROPIC_STOP.search(seg) is not None))
        return anthropic
    if kind.provider == "gemini":
        def gemini(seg: bytes) -> bool:
            return b"finishReason" in seg or (b'{"error"' in seg and _starts_line(_DATA_ERROR, seg))
        return gemini
    if kind.responses:
        def responses(seg: bytes) -> bool:
            return ((b"error" in seg or b"response.completed" in seg
                     or b"response.incomplete" in seg or b"response.failed" in seg)
                    and (_starts_line(_RESPONSES_END, seg) or _RESPONSES_TYPE.search(seg) is not None))
        return responses

    def chat(seg: bytes) -> bool:
        return (b"[DONE]" in seg or b"error" in seg) and _starts_line(_CHAT_END, seg)
    return chat


def is_bare_error(tail: bytes) -> bool:
    """Gemini's own mid-stream error: bare JSON after the last event (upstream content)."""
    return tail.lstrip().startswith(b"{") and b'"error"' in tail


_SEQ = re.compile(rb'"sequence_number": ?(\d+)')


def last_sequence_number(block: bytes) -> int | None:
    found = _SEQ.findall(block)
    return int(found[-1]) if found else None


def error_event(kind: StreamKind, reason: str, message: str, *, seq: int | None = None,
                crlf: bool = False) -> bytes:
    """Exactly one SSE event, in the provider's mid-stream error format.

    Chat-style streams get ``data: {"error": …}`` and no ``[DONE]`` (so a client that
    ignores the error still sees a truncated stream, not a complete one).
    """
    timeout = reason.endswith("timeout")
    if kind.provider == "anthropic":
        etype = "timeout_error" if timeout else ("overloaded_error" if reason == "shutdown"
                                                 else "api_error")
        lines = [b"event: error",
                 b"data: " + _dumps({"type": "error", "error": {"type": etype, "message": message}})]
    elif kind.provider == "gemini":
        code, status = (504, "DEADLINE_EXCEEDED") if timeout else (503, "UNAVAILABLE")
        lines = [b"data: " + _dumps({"error": {"code": code, "message": message, "status": status}})]
    elif kind.responses:
        etype = "timeout" if timeout else "server_error"
        inner = {"type": etype, "code": reason, "message": message, "param": None}
        # Flat fields for strict schema readers, nested "error" so openai-python raises.
        lines = [b"event: error",
                 b"data: " + _dumps({"type": "error", "sequence_number": (seq + 1) if seq is not None else 0,
                                     "code": reason, "message": message, "param": None,
                                     "error": inner})]
    else:
        etype = "timeout" if timeout else "server_error"
        lines = [b"data: " + _dumps({"error": {"message": message, "type": etype,
                                               "param": None, "code": reason}})]
    eol = b"\r\n" if crlf else b"\n"
    return eol.join(lines) + eol + eol

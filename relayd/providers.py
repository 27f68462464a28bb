"""Provider rules, one record per provider: auth, error bodies, error events, stream ends.

Everything that differs between OpenAI, Azure, Anthropic, Gemini and generic
OpenAI-compatible servers lives here; no other module names a provider.  Error shapes
follow what each official SDK raises on (tests/fixtures/error-formats.md): a client
talking to relayd gets the exception type it would get from the provider itself.

The endpoint table says, per provider and upstream path, what a *natural* end of an SSE
stream looks like.  A clean close before it is a truncation and gets one injected error
event; a clean close on an endpoint the table does not know is a natural end (as on a
``generic`` route), because relayd cannot tell a finished unknown stream from a cut one
and must not turn a success into a failure.  Transport failures (reset, short body,
timeouts, shutdown) get the event on every SSE endpoint.  A stream whose provider
already sent its own error event never gets a second one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import unquote, unquote_plus

from multidict import CIMultiDict

from .exchange import End

# Every header a client may put its provider credential in; all are removed when relayd
# sets the upstream's own key, so a client key never reaches a provider.
CLIENT_CREDENTIALS = ("Authorization", "x-api-key", "api-key", "x-goog-api-key")

# Why a stream was ended, as a client-facing sentence (no secrets, no tracebacks).
REASON_TEXT: Mapping[End, str] = {
    End.UPSTREAM_RESET: "upstream connection reset after {bytes} bytes",
    End.UPSTREAM_EOF: "upstream closed the stream after {bytes} bytes without its end marker",
    End.IDLE_TIMEOUT: "no data from upstream for {idle}",
    End.TOTAL_TIMEOUT: "stream exceeded the total time limit of {total}",
    End.SEND_TIMEOUT: "client accepted no data for {send}",
    End.SHUTDOWN: "relayd is shutting down; the stream was ended",
    End.ERROR: "relayd internal error",
}
# The same end reason, for a body whose framing the upstream broke (a bad chunk size): the
# connection was not reset, and an operator looking for a network fault would look wrongly.
MALFORMED_TEXT = "upstream sent a malformed body after {bytes} bytes"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _timeout(reason: End) -> bool:
    return reason in (End.IDLE_TIMEOUT, End.TOTAL_TIMEOUT, End.SEND_TIMEOUT)


# --------------------------------------------------------------------------- end tests

def end_test(events: tuple[str, ...] = (), data: tuple[str, ...] = (),
             fields: tuple[str, ...] = (),
             fields_end: Callable[[Any], bool] | None = None) -> Callable[[bytes], bool]:
    """A test over released runs of complete SSE blocks: did the stream end here?

    ``events`` are event names, found as an ``event:`` line or as the ``"type"`` that
    opens a data line's object; ``data`` are data-line payload prefixes (``[DONE]``);
    ``fields`` are literal JSON fragments whose presence ends the stream (the legacy
    ``"stop_reason":"``), or, with ``fields_end``, whose data lines are decoded and
    ``fields_end(object)`` decides (Gemini's ``finishReason``).  The provider's own error
    (``event: error``, ``data: {"type":"error"``, ``data: {"error"``) always ends it.
    A substring pre-check decides for nearly every event at C speed; a regex only
    confirms candidates.

    Only the top of an event counts: a model's function-call arguments are JSON objects
    in Gemini's events, and ``{"type":"error"}`` or ``"finishReason"`` among them ended
    the stream early, so that a failure after it reached the client as a clean end
    (review 76).
    """
    names = (*events, "error")
    alt = "|".join(re.escape(n) for n in names).encode()
    # Each pattern begins with its literal ("event:", "data:") so the regex engine scans
    # for it instead of trying every position.
    event_rx = re.compile(rb"event: ?(?:" + alt + rb")[\r\n]")
    data_rx = re.compile(rb'data: ?(?:\{"error"|\{"type": ?"(?:' + alt + rb')"'
                         + b"".join(b"|" + re.escape(d.encode()) for d in data) + rb")")
    candidates = _any_found(dict.fromkeys([n.encode() for n in names] + [d.encode() for d in data]))

    def confirm(seg: bytes) -> bool:
        return _starts_line(event_rx, seg) or _starts_line(data_rx, seg)

    # This runs on every released segment of every stream, so the pre-check is built
    # once per endpoint as one expression — ``f1 found or … or ((n1 found or …) and
    # confirm(seg))`` — whose scans run at C speed with no Python loop per literal.
    found = [_any_found((f.encode(),)) for f in fields]
    literals = tuple(f.encode() for f in fields)

    def decoded(seg: bytes) -> bool:
        assert fields_end is not None
        return any(fields_end(obj) for obj in _data_objects(seg, literals))

    if fields_end is not None and found:
        found = [f"(({' or '.join(found)}) and decoded(seg))"]
    return eval("lambda seg: " + " or ".join([*found, f"(({candidates}) and confirm(seg))"]),
                {"confirm": confirm, "decoded": decoded})  # type: ignore[no-any-return]


def _data_objects(seg: bytes, literals: tuple[bytes, ...]) -> Iterator[Any]:
    """The JSON of each data line in ``seg`` that holds one of ``literals`` (an event's
    data split over several lines is not decoded)."""
    for line in seg.splitlines():
        if line.startswith(b"data:") and any(line.find(lit) >= 0 for lit in literals):
            try:
                yield json.loads(line[5:])
            except ValueError:
                continue


def _gemini_finished(obj: Any) -> bool:
    """A ``GenerateContentResponse`` that ends the stream: a candidate with its
    ``finishReason``, or the prompt blocked (``promptFeedback.blockReason``)."""
    if not isinstance(obj, dict):
        return False
    candidates = obj.get("candidates")
    if isinstance(candidates, list) and any(isinstance(c, dict) and c.get("finishReason")
                                            for c in candidates):
        return True
    feedback = obj.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def _any_found(needles: Iterable[bytes]) -> str:
    """``seg.find(b'n1') >= 0 or …``: the source of a literal pre-check (``find``, not
    ``in``: on 3.11 ``in`` on bytes first tries the needle as an int, and makes and clears
    a TypeError each time, about twice the cost of the scan)."""
    return " or ".join(f"seg.find({n!r}) >= 0" for n in needles)


def _starts_line(rx: re.Pattern[bytes], seg: bytes) -> bool:
    """A match at the start of a line (released segments always begin at one)."""
    for m in rx.finditer(seg):
        s = m.start()
        if s == 0 or seg[s - 1] in b"\r\n":
            return True
    return False


# --------------------------------------------------------------------------- error events

EventMaker = Callable[[End, str, bytes], list[bytes]]  # (reason, message, last block) -> lines

_SEQ = re.compile(rb'"sequence_number": ?(\d+)')


def _openai_error(reason: End, message: str) -> dict[str, object]:
    return {"message": message, "type": "timeout" if _timeout(reason) else "server_error",
            "param": None, "code": str(reason)}


def _chat_event(reason: End, message: str, last: bytes) -> list[bytes]:
    """``data: {"error": …}`` and no ``[DONE]``: a client that ignores the error still
    sees a truncated stream, not a complete one."""
    return [b"data: " + _dumps({"error": _openai_error(reason, message)})]


def _responses_event(reason: End, message: str, last: bytes) -> list[bytes]:
    """Flat fields for strict schema readers, nested ``error`` so openai-python raises;
    ``sequence_number`` continues the stream's own numbering."""
    found = _SEQ.findall(last)
    seq = int(found[-1]) + 1 if found else 0
    inner = _openai_error(reason, message)
    return [b"event: error",
            b"data: " + _dumps({"type": "error", "sequence_number": seq, "code": str(reason),
                                "message": message, "param": None, "error": inner})]


def _typed_event(reason: End, message: str, last: bytes) -> list[bytes]:
    """OpenAI's typed event streams (audio, images): an ``error`` event."""
    return [b"event: error",
            b"data: " + _dumps({"type": "error", "error": _openai_error(reason, message)})]


def _anthropic_type(status_or_reason: int | End) -> str:
    if isinstance(status_or_reason, End):
        if _timeout(status_or_reason):
            return "timeout_error"
        return "overloaded_error" if status_or_reason == End.SHUTDOWN else "api_error"
    return _ANTHROPIC_TYPE.get(status_or_reason, "api_error")


def _anthropic_event(reason: End, message: str, last: bytes) -> list[bytes]:
    return [b"event: error", b"data: " + _dumps(
        {"type": "error", "error": {"type": _anthropic_type(reason), "message": message}})]


def _gemini_error(reason: End, message: str) -> dict[str, object]:
    code, status = (504, "DEADLINE_EXCEEDED") if _timeout(reason) else (503, "UNAVAILABLE")
    return {"error": {"code": code, "message": message, "status": status}}


def _gemini_event(reason: End, message: str, last: bytes) -> list[bytes]:
    return [b"data: " + _dumps(_gemini_error(reason, message))]


def _interactions_event(reason: End, message: str, last: bytes) -> list[bytes]:
    return [b"event: error", b"data: " + _dumps(_gemini_error(reason, message))]


# --------------------------------------------------------------------------- endpoints

@dataclass(frozen=True)
class Endpoint:
    """One kind of SSE stream: how it ends naturally and how its failure is reported."""

    name: str
    path: re.Pattern[str] | None  # searched in the upstream path; None: the provider's fallback
    natural_end: bool             # False: a clean close counts as the natural end
    ends: Callable[[bytes], bool]
    event: EventMaker
    # Usage may come after the natural end (Gemini: a usage-only chunk after the one with
    # finishReason): a client that leaves at the end can leave before the final count.
    usage_after_end: bool = False

    def error_event(self, reason: End, message: str, last: bytes, crlf: bool) -> bytes:
        """Exactly one SSE event, in this endpoint's mid-stream error format."""
        eol = b"\r\n" if crlf else b"\n"
        return eol.join(self.event(reason, message, last)) + eol + eol


def _ep(name: str, path: str | None, event: EventMaker, usage_after_end: bool = False,
        **end: Any) -> Endpoint:
    return Endpoint(name, re.compile(path) if path else None, path is not None,
                    end_test(**end), event, usage_after_end)


_DONE = ("[DONE]",)
_RESPONSES = ("response.completed", "response.incomplete", "response.failed")
_OPENAI = (
    _ep("chat", r"/chat/completions$", _chat_event, data=_DONE),
    _ep("completions", r"/completions$", _chat_event, data=_DONE),
    _ep("responses", r"/responses$", _responses_event, events=_RESPONSES),
    _ep("responses.resume", r"/responses/[^/]+$", _responses_event, events=_RESPONSES),
    _ep("assistants.runs", r"/threads/(?:[^/]+/)?runs(?:/[^/]+/submit_tool_outputs)?$",
        _chat_event, events=("done",), data=_DONE),
    _ep("audio.speech", r"/audio/speech$", _typed_event, events=("speech.audio.done",)),
    _ep("audio.transcriptions", r"/audio/transcriptions$", _typed_event,
        events=("transcript.text.done",)),
    _ep("images.generations", r"/images/generations$", _typed_event,
        events=("image_generation.completed",)),
    _ep("images.edits", r"/images/edits$", _typed_event, events=("image_edit.completed",)),
)
_ANTHROPIC = (
    _ep("messages", r"/messages$", _anthropic_event, events=("message_stop",)),
    # Legacy text completions: the last `completion` event carries a non-null stop_reason.
    _ep("complete", r"/complete$", _anthropic_event, fields=('"stop_reason":"', '"stop_reason": "')),
)
_GEMINI = (
    _ep("streamGenerateContent", r"(?::|%3[aA])streamGenerateContent$", _gemini_event,
        fields=('"finishReason"', '"blockReason"'), fields_end=_gemini_finished, usage_after_end=True),
    _ep("interactions", r"/interactions(?:/[^/]+)?$", _interactions_event,
        events=("interaction.completed", "interaction.complete")),
)


# POSTs that answer with a stored object: its usage is not this request's (``generates``).
_STORED = re.compile(r"(?:[/:]cancel|/chat/completions/[^/]+|/threads/[^/]+/runs/[^/]+)$")


# --------------------------------------------------------------------------- providers

_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                  431: "INVALID_ARGUMENT", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                  505: "INVALID_ARGUMENT", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_ANTHROPIC_TYPE = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                   413: "request_too_large", 429: "rate_limit_error", 431: "invalid_request_error",
                   500: "api_error", 501: "invalid_request_error", 502: "api_error",
                   505: "invalid_request_error",
                   503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
_OPENAI_TYPE = {400: "invalid_request_error", 401: "invalid_request_error",
                403: "invalid_request_error", 404: "not_found", 405: "invalid_request_error",
                413: "invalid_request_error", 431: "invalid_request_error",
                501: "invalid_request_error", 502: "server_error", 503: "server_error",
                504: "timeout", 505: "invalid_request_error"}


def _openai_body(status: int, message: str, code: str) -> bytes:
    return _dumps({"error": {"message": message, "type": _OPENAI_TYPE.get(status, "server_error"),
                             "param": None, "code": code}})


def _anthropic_body(status: int, message: str, code: str) -> bytes:
    return _dumps({"type": "error", "error": {"type": _anthropic_type(status), "message": message}})


def _gemini_body(status: int, message: str, code: str) -> bytes:
    return _dumps({"error": {"code": status, "message": message,
                             "status": _GEMINI_STATUS.get(status, "UNKNOWN")}})


def _tail_is_json_error(tail: bytes) -> bool:
    """Gemini's own mid-stream error: bare JSON after the last event (upstream content)."""
    return tail.lstrip().startswith(b"{") and b'"error"' in tail


def _never(tail: bytes) -> bool:
    return False


@dataclass(frozen=True)
class Provider:
    name: str
    auth_header: str                         # where the upstream key goes
    auth_prefix: str                         # e.g. "Bearer "
    error_body: Callable[[int, str, str], bytes]  # (status, message, code) -> HTTP error body
    crlf: bool                               # line ends for an event before any upstream block
    endpoints: tuple[Endpoint, ...]
    fallback: Endpoint                       # an SSE endpoint the table does not know
    tail_is_error: Callable[[bytes], bool] = _never  # unterminated tail that is the provider's error
    id_header: str | None = None             # where the provider's SDK reads a request id
    # Where a client's SDK puts the key, (header, prefix) in order of preference; empty:
    # (auth_header, auth_prefix) only.  key_param: a query parameter used when no header is.
    key_headers: tuple[tuple[str, str], ...] = ()
    key_param: str | None = None
    # Every query parameter the provider reads a credential from (removed, never forwarded).
    credential_params: frozenset[str] = frozenset()
    # What relayd writes into a silent stream: an SSE comment, or for Google's SDK, which
    # takes every line not starting with "data: " for JSON (a comment failed the stream),
    # a blank line — at a block boundary it dispatches nothing for any SSE reader.
    heartbeat: bytes = b": keep-alive\n\n"

    def endpoint(self, upstream_path: str) -> Endpoint:
        for ep in self.endpoints:
            assert ep.path is not None
            if ep.path.search(upstream_path):
                return ep
        return self.fallback

    def generates(self, method: str, upstream_path: str) -> bool:
        """Whether the answer's usage is tokens this request spent.  Generating is a POST
        (a GET of a stored response shows the usage of a generation counted when it ran),
        but not every POST generates: a cancel (OpenAI's batches, responses and runs,
        Gemini's ``:cancel``) or OpenAI's metadata update of a stored chat completion
        answers with the stored object, whose usage was counted when it was made."""
        return method == "POST" and _STORED.search(upstream_path) is None

    def set_auth(self, headers: CIMultiDict[str], api_key: str | None) -> None:
        """Replace client credentials with the upstream's key; without a key, pass them on."""
        if not api_key:
            return
        for name in CLIENT_CREDENTIALS:
            headers.popall(name, None)
        headers[self.auth_header] = self.auth_prefix + api_key

    @property
    def key_spots(self) -> tuple[tuple[str, str], ...]:
        return self.key_headers or ((self.auth_header, self.auth_prefix),)

    def presented_key(self, headers: Mapping[str, str], query: str) -> str | None:
        """The key a client sent where this provider's SDKs send it (the first of
        ``key_spots`` present, else the ``key_param`` query parameter); None if absent or
        not in the expected form.  relayd's client keys sit exactly there."""
        for name, prefix in self.key_spots:
            value = headers.get(name)
            if value is None:
                continue
            scheme = prefix.strip()
            if scheme:
                given, _, value = value.strip().partition(" ")
                if given.lower() != scheme.lower():
                    return None
            return value.strip() or None
        if self.key_param:
            for part in query.split("&"):
                _, eq, v = part.partition("=")
                if eq and _param_name(part) == self.key_param:
                    return unquote(v) or None
        return None

    def without_key_param(self, query: str) -> str:
        """The raw query minus every credential parameter, however its name is encoded
        (``%6Bey`` reached Google as a second credential); the rest keeps its bytes.
        Google reads a key from ``key`` or ``$key`` and an OAuth token from
        ``access_token`` or ``oauth_token`` (its "system parameters"): a client's would
        ride along next to relayd's key, or past a route that sends none (review 74)."""
        if not self.key_param or not query:
            return query
        names = self.credential_params
        return drop_params(query, lambda p: _param_name(p) in names)

    def error_headers(self, request_id: str) -> dict[str, str]:
        """Headers of relayd's own error responses: its name and the request id, where the
        provider's SDK looks for it (the Anthropic SDK reads ``request-id``)."""
        out = {"X-Request-Id": request_id, "Server": "relayd"}
        if self.id_header:
            out[self.id_header] = request_id
        return out


_SEPARATED = re.compile(r"([&;])")


def drop_params(query: str, unwanted: Callable[[str], bool]) -> str:
    """The raw query without the parameters ``unwanted`` picks; the rest keeps its bytes and
    separators.  ``;`` separates too: some servers still split on it (the WHATWG form
    decoder does not), and a credential must be gone for every reader."""
    pieces = _SEPARATED.split(query)  # parameter, separator, parameter, …
    out: list[str] = []
    for i in range(0, len(pieces), 2):
        if unwanted(pieces[i]):
            continue
        if out:
            out.append(pieces[i - 1] if i else "&")
        out.append(pieces[i])
    return "".join(out)


def _param_name(param: str) -> str:
    """A query parameter's name as the upstream will decode it: ``%6Bey`` is ``key``."""
    name = param.partition("=")[0]
    return unquote_plus(name) if "%" in name or "+" in name else name


# An endpoint relayd does not know (and every generic, OpenAI-compatible server: vLLM,
# llama.cpp, Ollama's /v1): a clean close is a natural end, and so is ``[DONE]``, after
# which nothing is added to the stream (no heartbeat, no error event); so is the
# server's own error (vLLM: ``data: {"object":"error",…}``).
_OPENAI_FALLBACK = _ep("unknown", None, _chat_event, data=_DONE,
                       fields=('"object":"error"', '"object": "error"'))
PROVIDERS: Mapping[str, Provider] = {
    "openai": Provider("openai", "Authorization", "Bearer ", _openai_body, False, _OPENAI,
                       _OPENAI_FALLBACK),
    "azure": Provider("azure", "api-key", "", _openai_body, False, _OPENAI, _OPENAI_FALLBACK),
    # The Anthropic API takes x-api-key or a bearer token; SDK releases differ in which
    # they send for api_key (anthropic-python 2.x: Authorization: Bearer).
    "anthropic": Provider("anthropic", "x-api-key", "", _anthropic_body, False, _ANTHROPIC,
                          _ep("unknown", None, _anthropic_event), id_header="request-id",
                          key_headers=(("x-api-key", ""), ("Authorization", "Bearer "))),
    "gemini": Provider("gemini", "x-goog-api-key", "", _gemini_body, True, _GEMINI,
                       _ep("unknown", None, _gemini_event), _tail_is_json_error, key_param="key",
                       credential_params=frozenset(("key", "$key", "access_token", "oauth_token")),
                       heartbeat=b"\r\n"),
    "generic": Provider("generic", "Authorization", "Bearer ", _openai_body, False, (),
                        _OPENAI_FALLBACK),
}
NAMES = tuple(PROVIDERS)
DEFAULT = PROVIDERS["generic"]  # relayd's own errors where no route matched


def get(name: str) -> Provider:
    return PROVIDERS[name]


def not_found_body(path: str, request_id: str) -> bytes:
    return _dumps({"error": {"message": f"no route for {path} (request id {request_id})",
                             "type": "not_found"}})

"""Passive token-usage accounting, read on the side of the relay.

Providers report usage inside the stream (OpenAI's final usage chunk, Responses'
``response.completed``, Anthropic's ``message_start``/``message_delta``, Gemini's
``usageMetadata``) or at the end of a JSON body.  relayd never changes the request to
ask for it and never touches a byte; per released segment it only runs one C-level
regex search; the first segment that mentions usage is decoded when seen (rather than
held for the stream's minutes), the last one is kept and decoded when the request ends.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_DECODER = json.JSONDecoder()
_MENTION = re.compile(rb'"usage(?:"\s*:\s*\{|Metadata")')
_JSON_TAIL = 64 * 1024

_INPUT_KEYS = ("prompt_tokens", "input_tokens", "promptTokenCount", "total_input_tokens",
               "totalInputTokens")
_OUTPUT_KEYS = ("completion_tokens", "output_tokens")
# Anthropic counts cache reads and writes apart from input_tokens; OpenAI's prompt_tokens
# and Gemini's promptTokenCount include cached tokens.  Added, "input" means one thing.
_CACHE_KEYS = ("cache_creation_input_tokens", "cache_read_input_tokens")
# Input counted apart from the main count and added to it: Anthropic's cache reads and
# writes; Gemini's tool-use prompt tokens (search grounding, code execution: part of its
# totalTokenCount, not of promptTokenCount), in generateContent's names and in the
# Interactions API's (review 82: its usage was never counted).
_ADDED = {"input_tokens": _CACHE_KEYS, "promptTokenCount": ("toolUsePromptTokenCount",),
          "total_input_tokens": ("total_tool_use_tokens",),
          "totalInputTokens": ("totalToolUseTokens",)}
# Output as two counts to add, answer and thinking: generateContent's, the Interactions API's.
_OUTPUT_PAIRS = (("candidatesTokenCount", "thoughtsTokenCount"),
                 ("total_output_tokens", "total_thought_tokens"),
                 ("totalOutputTokens", "totalThoughtTokens"))
# A usage object is a few hundred bytes: one is decoded from at most this much, and at most
# the first and last few usage keys of a buffer are.  Decoding from every key, a hostile
# upstream's usage objects nested 800 deep in a 2 MB event were each decoded whole again:
# 1.5 GB and the loop stalled for seconds (review 82).
_USAGE_MAX = 8 * 1024
_FIRST_KEYS, _LAST_KEYS = 8, 24
_MAX_TOKENS = 10**12  # a count beyond this (or below 0) is the upstream's bug, not usage


@dataclass(frozen=True)
class Usage:
    input: int | None
    output: int | None
    partial: bool

    def as_log(self) -> dict[str, object]:
        return {"input_tokens": self.input, "output_tokens": self.output, "partial": self.partial}


class UsageMeter:
    """Remembers the usage objects of the first segment that carries one, and the last
    such segment."""

    __slots__ = ("_first", "_start_only", "_last", "_tail")

    def __init__(self) -> None:
        # The first mention is decoded at once rather than kept: a stream lasts minutes,
        # and its first read (Anthropic's message_start) would be held all that time.
        self._first: list[dict[str, object]] | None = None
        self._start_only = False
        self._last: bytes | None = None
        # Only JSON bodies fill it; an SSE stream, held for minutes, never needs one.
        self._tail: bytes | bytearray | None = None

    def observe_events(self, segment: bytes) -> None:
        """Called with each released run of complete SSE blocks."""
        # Literal forms only, in one literal-first scan: every OpenAI chunk carries
        # "usage":null, which must stay cheap.
        # ``find`` first: it scans about three times faster than the regex, which then
        # starts at the mention (OpenAI's "usage":null) or is never run.
        at = segment.find(b'"usage')
        if at >= 0 and _MENTION.search(segment, at) is not None:
            if self._first is None:
                try:
                    self._first = _objects(segment)
                except Exception:  # (this runs inside the stream: never let it end one)
                    self._first = []
                self._start_only = b'"message_start"' in segment and b'"message_delta"' not in segment
            else:
                self._last = segment

    def observe_body(self, chunk: bytes) -> None:
        """Called with each chunk of a JSON body; keeps only its last 64 to 128 KiB."""
        tail = self._tail
        if tail is None:
            # Most bodies come in one piece: keep it, copy nothing.
            if len(chunk) <= 2 * _JSON_TAIL:
                self._tail = chunk
                return
            self._dropping(chunk, len(chunk) - _JSON_TAIL)
            self._tail = chunk[-_JSON_TAIL:]
            return
        if type(tail) is not bytearray:
            tail = self._tail = bytearray(tail)
        tail += chunk
        if len(tail) > 2 * _JSON_TAIL:
            cut = len(tail) - _JSON_TAIL
            self._dropping(tail, cut)
            del tail[:cut]

    def _dropping(self, body: bytes | bytearray, cut: int) -> None:
        """A usage object about to leave the window (before ``cut``) is decoded now, whole
        (vLLM writes prompt_logprobs, megabytes, after usage); a later one still wins."""
        # (a key that begins before the cut and ends after it leaves too: review 82)
        if _KEY_BYTES.search(body, 0, cut + _KEY_SPAN) is not None:
            try:
                self._first = _objects(body)
            except Exception:  # (never let accounting end a response)
                pass

    def result(self, partial: bool) -> Usage | None:
        if self._first is None and not self._tail:
            return None
        found: list[dict[str, object]] = list(self._first or ())
        for buf in (self._last, self._tail):
            if buf:
                found.extend(_objects(buf))
        if not found:
            return None
        inp = out = None
        for u in found:
            for k in _INPUT_KEYS:
                v = _count(u.get(k))
                if v is not None and k in _ADDED:
                    v += sum(_count(u.get(c)) or 0 for c in _ADDED[k])
                if v is not None and (v or inp is None):
                    inp = v
            o = _output(u)
            if o is not None:
                out = o
        if inp is None and out is None:
            return None
        return Usage(inp, out, partial or self._placeholder_only())

    def _placeholder_only(self) -> bool:
        """Anthropic's ``message_start`` carries a placeholder output count (1); the real one
        comes in ``message_delta``.  A stream the provider ended with its own error event
        after ``message_start`` ends as the upstream ended it, yet its count is not final.
        (In a JSON string the name would be escaped: text cannot fake either name.)"""
        last = self._last
        return self._start_only and (last is None or b'"message_delta"' not in last)


def _count(v: object) -> int | None:
    """A token count, or None: a negative or absurd number (an upstream bug) would make a
    Prometheus counter raise and take the whole batch of pending counts with it."""
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_TOKENS:
        return v
    if isinstance(v, float) and v.is_integer() and 0 <= v <= _MAX_TOKENS:
        return int(v)  # (12.0: some servers' JSON encoders write counts as floats)
    return None


def _output(u: dict[str, object]) -> int | None:
    for k in _OUTPUT_KEYS:
        v = _count(u.get(k))
        if v is not None:
            return v
    for answer, thinking in _OUTPUT_PAIRS:
        c, t = _count(u.get(answer)), _count(u.get(thinking))
        if c is not None or t is not None:
            return (c or 0) + (t or 0)
    return None


# A usage object's key: searched for in the bytes (most bodies have none), then matched in
# the decoded text (raw_decode needs character offsets).
_KEY_PATTERN = r'"(?:usage|usageMetadata)"\s*:\s*\{'
_KEY_BYTES = re.compile(_KEY_PATTERN.encode())
_KEY_SPAN = 64  # bytes a key can span ('"usageMetadata"', spaces, ':', '{')


def _objects(buf: bytes | bytearray) -> list[dict[str, object]]:
    """The usage objects in ``buf`` (most JSON bodies without usage are not decoded at
    all): each from its own window of ``_USAGE_MAX`` bytes, none from inside one decoded
    already, and only the first and last few (Gemini names usage in every event; the
    last wins, the first is Anthropic's input count)."""
    starts = [m.end() - 1 for m in _KEY_BYTES.finditer(buf)]
    if len(starts) > _FIRST_KEYS + _LAST_KEYS:
        starts = starts[:_FIRST_KEYS] + starts[-_LAST_KEYS:]
    out: list[dict[str, object]] = []
    done = 0
    for at in starts:
        if at < done:
            continue  # a usage key inside the object decoded last: not one of its own
        window = bytes(buf[at:at + _USAGE_MAX]).decode("utf-8", "replace")  # from '{'
        try:
            obj, end = _DECODER.raw_decode(window)
        except (ValueError, RecursionError):  # (larger than a window, or nested 1,000 deep)
            continue
        done = at + len(window[:end].encode("utf-8", "replace"))
        if isinstance(obj, dict):
            out.append(obj)
    return out


class Unmetered(UsageMeter):
    """For answers that spend no tokens though they may show a usage object (a GET of a
    stored response): nothing is kept, nothing counted."""

    __slots__ = ()

    def observe_events(self, segment: bytes) -> None:
        pass

    def observe_body(self, chunk: bytes) -> None:
        pass

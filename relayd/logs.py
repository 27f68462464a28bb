"""JSON logs on stdout (journald-friendly), via structlog.

Secrets are kept out by construction (relayd never logs headers or bodies); the
``scrub`` processor is the second line: any configured API key that still finds its way
into a log value is replaced before the line is rendered.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from typing import Any, Iterable

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_secrets: tuple[str, ...] = ()   # every held key, longest first (a key inside another)
_held: dict[object, frozenset[str]] = {}
_worker: int | None = None


class _Sink:
    """Where every line goes (structlog's lines and the access lines): stdout, whose
    failures must never be relayd's.

    A line that cannot be written — the reader gone (EPIPE), a full disk (ENOSPC), stdout
    closed — raised inside whatever logged it: an upstream error became a 500, and a
    SIGTERM whose first act is a log line never started the drain.  Such lines are
    dropped and counted, and the count goes out with the first line that gets through
    again.  Lines go to the descriptor in one ``write`` each batch, unbuffered, so a failed
    write leaves nothing behind to come out later.  (A reader that stops reading a pipe
    still blocks the write, as it blocks nginx's stderr: the systemd watchdog restarts a
    relayd that stalls that long.)
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.dropped = 0
        try:
            stream.flush()  # what was printed before goes first
            self.fd: int | None = stream.fileno()
        except (OSError, ValueError, AttributeError):  # (a test's capture, or no stdout)
            self.fd = None

    def write(self, text: str) -> None:
        lost = self.dropped
        try:
            if lost:
                note = _warning + _ENCODER.encode(_add_worker(None, "warning", {
                    "event": "log lines lost", "level": "warning", "lines": lost,
                    "ts": _STAMP(None, "warning", {})["ts"]}))
                text = note + "\n" + text
            self._put(text)
            self.dropped -= lost
        except (OSError, ValueError, AttributeError):  # (ValueError: closed; AttributeError: None)
            self.dropped += text.count("\n") - (1 if lost else 0) or 1

    def _put(self, text: str) -> None:
        if self.fd is None:
            self.stream.write(text)
            self.stream.flush()
            return
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        while data:
            data = data[os.write(self.fd, data):]

    def flush(self) -> None:
        pass  # each write is done when it returns


_out = _Sink(sys.stdout)  # where structlog writes too: sys.stdout as configure found it


def set_worker(n: int) -> None:
    """Every line this process writes from now on says which worker wrote it."""
    global _worker
    _worker = n


def _add_worker(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if _worker is not None:
        event["worker"] = _worker
    return event


def hold_secrets(owner: object, values: Iterable[str | None]) -> None:
    """Values that must never be printed (API keys) while ``owner`` (a route table) lives.

    Keys are listed per table, not forever: a service that rotates its key file hourly
    and reloads would otherwise check every line against every key it ever had (8,760
    after a year: 1.3 ms per access line)."""
    _held[owner] = frozenset(v for v in values if v and len(v) >= 4)
    _list_secrets()


def release_secrets(owner: object) -> None:
    if _held.pop(owner, None) is not None:
        _list_secrets()


def _list_secrets() -> None:
    global _secrets
    _secrets = tuple(sorted(frozenset().union(*_held.values()), key=len, reverse=True))


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        for s in _secrets:
            if s in value:
                value = value.replace(s, "[redacted]")
        return value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def scrub(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    # Most values of a line are numbers or None: only strings and containers are looked
    # at (a call per value made this a third of an access line's cost).
    if _secrets:
        for key, value in event.items():
            kind = value.__class__
            if kind is str:
                for s in _secrets:
                    if s in value:
                        event[key] = _clean(value)  # an existing key: the dict keeps its size
                        break
            elif kind not in _SCALARS and isinstance(value, (str, dict, list, tuple)):
                event[key] = _clean(value)
    return event


_SCALARS = frozenset({int, float, bool, type(None)})
_ENCODER = json.JSONEncoder(default=repr)  # structlog's renderer falls back to repr too
_STAMP = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")  # both writers' ts


def write_lines(event: str, lines: list[dict[str, Any]]) -> None:
    """Info lines (``event``) in one write, without structlog's per-call chain.

    For the access log, a line per request: structlog's bound-logger proxy, processor
    chain and a write and flush per line cost 25 to 30 µs a line on the bench machine,
    this about 15 with one write per batch.  The lines are the same JSON as structlog's
    (same fields, ``ts``, ``level``, ``worker``, scrubbed; ``test_units`` compares them).
    They are written whatever ``log_level`` says: access lines have their own switch
    (``access_log``), as nginx's access log does not follow ``error_log``'s level.
    """
    if not lines:
        return
    ts = _STAMP(None, "info", {})["ts"]  # one stamp per batch: the lines are written now
    out = []
    for fields in lines:
        fields["event"] = event
        fields["level"] = "info"
        fields["ts"] = ts
        out.append(_info + _ENCODER.encode(scrub(None, "info", _add_worker(None, "info", fields))))
    out.append("")
    _out.write("\n".join(out))


# syslog priorities, for journald: a line that begins with "<N>" is stored at priority N
# (and the prefix dropped), so ``journalctl -p warning -u relayd`` finds relayd's warnings.
_PRIORITY = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>", "critical": "<2>"}
_info = _warning = ""  # the prefixes of info and warning lines on the journal's stream
_RENDER = structlog.processors.JSONRenderer()


def _prioritized(logger: Any, name: str, event: dict[str, Any]) -> str:
    return _PRIORITY.get(event.get("level", "info"), "<6>") + _RENDER(logger, name, event)


def on_journal(stream: Any) -> bool:
    """Is ``stream`` the journal's?  systemd says which stream it connected to journald in
    ``JOURNAL_STREAM`` (``device:inode``); run by hand, in a pipe or to a file, lines stay
    plain JSON (review 72: without the prefix every line was stored at priority 6)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _PrioritizedStderr:
    """stderr on the journal's stream: relayd prints there only what stops it (a config
    that does not load, a listener it cannot bind, a bug) and warnings; each line gets its
    priority (review 75: they were stored at 6 beside the JSON lines' own)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.at_start = True  # (``print`` writes a line's parts and its end separately)

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self.at_start and piece.strip("\n"):
                out.append(_PRIORITY["warning"] if "warning" in piece[:24] else _PRIORITY["error"])
            out.append(piece)
            self.at_start = piece.endswith("\n")
        return self.stream.write("".join(out))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def prioritize_stderr() -> None:
    """For ``relayd run``: stderr lines carry their priority when stderr is the journal's."""
    if on_journal(sys.stderr) and not isinstance(sys.stderr, _PrioritizedStderr):
        sys.stderr = _PrioritizedStderr(sys.stderr)  # type: ignore[assignment]


def configure(level: str = "info") -> None:
    global _out, _info, _warning
    _out = _Sink(sys.stdout)
    journal = on_journal(sys.stdout)
    _info, _warning = (_PRIORITY["info"], _PRIORITY["warning"]) if journal else ("", "")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _STAMP,
            structlog.processors.format_exc_info,
            _add_worker,
            scrub,
            _prioritized if journal else _RENDER,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=_out),
        cache_logger_on_first_use=False,
    )
    # aiohttp's own loggers must not print tracebacks of client-caused errors as plain text.
    for name in ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.client",
                 "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def loop_exception(_: Any, context: dict[str, Any]) -> None:
    """The event loop's exception handler: asyncio's own writes to the "asyncio" logger,
    which ``configure`` silences (its tracebacks are mostly client noise), so an exception
    escaping a callback or task (a worker restart that failed, say) would vanish."""
    exc = context.get("exception")
    where = context.get("handle") or context.get("task") or context.get("future")
    get().error("unexpected error in the event loop", message=str(context.get("message")),
                where=repr(where)[:300] if where is not None else None,
                exc_info=exc if isinstance(exc, BaseException) else None)


def get() -> Any:
    return structlog.get_logger("relayd")


def raised_at(exc: BaseException) -> str:
    """``TypeName at file.py:LINE``: what a relayd bug was and where, never its message,
    which may quote a config value (and values can be keys)."""
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} at {os.path.basename(where.filename)}:{where.lineno}"

"""Experiments for bench/memstreams.py: monkeypatches applied in relayd's process before
it starts, each a candidate memory reduction measured before it is proposed."""

from __future__ import annotations

from typing import Callable

PATCHES: dict[str, Callable[[], None]] = {}


def patch(fn: Callable[[], None]) -> Callable[[], None]:
    PATCHES[fn.__name__.replace("_", "-")] = fn
    return fn


def apply(name: str) -> None:
    if name not in PATCHES:
        raise SystemExit(f"memstreams: no patch {name!r}; known: {', '.join(sorted(PATCHES))}")
    PATCHES[name]()


@patch
def no_chunk_splits() -> None:
    """aiohttp's StreamReader remembers HTTP chunk ends (a 760-byte deque per chunked
    body) for ``readchunk``/``iter_chunks``; relayd only calls ``readany``."""
    from aiohttp import streams
    streams.StreamReader.begin_http_chunk_receiving = lambda self: None  # type: ignore[method-assign]
    streams.StreamReader.end_http_chunk_receiving = lambda self: None  # type: ignore[method-assign]


@patch
def slots() -> None:
    """``__slots__`` on the per-stream objects that have a ``__dict__``: Stream, Forwarded,
    RequestBody (rebuilt as slotted copies of themselves)."""
    import dataclasses
    from relayd import app, body, forward, stream

    def slotted(cls: type, names: tuple[str, ...]) -> type:
        ns = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        ns["__slots__"] = names
        return type(cls.__name__, cls.__bases__, ns)

    app.Stream = stream.Stream = slotted(stream.Stream, (
        "request", "resp", "provider", "timeouts", "heartbeat", "request_id", "endpoint",
        "json_body", "out", "committed", "tracker", "meter", "bytes_out", "heartbeats",
        "injected", "stop_reason", "ended", "stalled", "last_block", "crlf"))
    app.RequestBody = body.RequestBody = slotted(body.RequestBody, (
        "request", "replay", "budget", "limits", "bytes_in", "data", "replayable", "complete",
        "_held", "_head", "broken", "reading"))
    fw = dataclasses.dataclass(slots=True)(
        type("Forwarded", (), {"__annotations__": forward.Forwarded.__annotations__,
                               **{f.name: f.default for f in dataclasses.fields(forward.Forwarded)}}))
    forward.Forwarded = fw


@patch
def wheel() -> None:
    """One shared timer per 0.25 s slot instead of one uvloop TimerHandle (and libuv
    uv_timer_t) per stream: ``StreamClock`` deadlines go into the slot's dict."""
    import asyncio
    import math
    from relayd import clock

    res = 0.25
    buckets: dict[int, dict[object, None]] = {}

    def run(slot: int) -> None:
        for c in list(buckets.pop(slot, ())):
            c._fire()

    def _arm(self: clock.StreamClock) -> None:
        since = max(self.last, self.last_beat)
        when = min(self.last + self.idle, since + self.send, self.total_deadline)
        if self.tracker is not None:
            when = min(when, since + self.beat)
        if when == math.inf:
            self.handle = None
            return
        slot = math.ceil(when / res)
        bucket = buckets.get(slot)
        if bucket is None:
            bucket = buckets[slot] = {}
            asyncio.get_running_loop().call_at(slot * res, run, slot)
        bucket[self] = None
        self.handle = bucket

    def stop(self: clock.StreamClock) -> None:
        if self.handle is not None:
            self.handle.pop(self, None)

    clock.StreamClock._arm = _arm  # type: ignore[method-assign]
    clock.StreamClock.stop = stop  # type: ignore[method-assign]


@patch
def none_baseline() -> None:
    """Nothing: relayd started through ``serve`` like the patched runs, for comparison."""


@patch
def drop_request_info() -> None:
    """Once the response head is in, forget what aiohttp keeps of the request that was
    sent (``ClientResponse.request_info``: URL, method, a copy of every header): relayd
    never reads it after ``_send``."""
    from relayd import forward

    send = forward._send

    async def _send(*args, **kwargs):  # type: ignore[no-untyped-def]
        resp = await send(*args, **kwargs)
        resp._request_info = None
        return resp

    forward._send = _send


class ListQueue(list):  # type: ignore[type-arg]
    """What aiohttp asks of its deques (append, popleft, appendleft, [0], [-1], len), on a
    list: an empty one is 56 bytes where an empty deque is 760.  popleft is O(n), and
    these queues hold a handful of items (reads not yet taken, pipelined requests)."""

    __slots__ = ()

    def popleft(self):  # type: ignore[no-untyped-def]
        return self.pop(0)

    def appendleft(self, item):  # type: ignore[no-untyped-def]
        self.insert(0, item)


@patch
def list_queues() -> None:
    """aiohttp makes up to five empty deques per held stream (two StreamReader buffers,
    one chunk-split list, the client protocol's DataQueue, the server's message queue)."""
    import types
    from aiohttp import streams, web_protocol
    streams.collections = types.SimpleNamespace(deque=ListQueue)  # type: ignore[attr-defined]
    web_protocol.deque = ListQueue  # type: ignore[attr-defined]

"""The one timer of a stream: every deadline it has, re-armed lazily.

A stream has up to four deadlines (upstream silence ``idle``, a client that takes nothing
``send``, ``total``, and the heartbeat period); arming a timer per read or write would cost
more per event than the event.  ``StreamClock`` is the whole of that bookkeeping; the
stream only records its progress in ``last`` and says what it waits for.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Callable

from .exchange import End


class _Wakes:
    """Every stream clock's next wake in one heap, under one loop timer.

    A loop timer per stream (uvloop's handle, its libuv timer and a copy of the task's
    context) cost about 700 B for each held stream, most of which wait minutes; an entry
    here is a tuple.  A clock's entry is current while its ``at`` still says that time:
    re-arming leaves the old entry behind, skipped when it comes up (and the heap is
    rebuilt when such entries outnumber the live ones).
    """

    __slots__ = ("loop", "heap", "handle", "at", "live")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, StreamClock]] = []
        self.handle: asyncio.TimerHandle | None = None
        self.at = math.inf  # when the loop timer fires
        self.live = 0       # clocks with a current entry

    def add(self, when: float, clock: "StreamClock") -> None:
        heap = self.heap
        self.live += 1
        if len(heap) > 2 * self.live + 64:
            heap[:] = [e for e in heap if e[1].at == e[0]]
            heapq.heapify(heap)
        heapq.heappush(heap, (when, clock))
        if when < self.at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.at = when
        self.handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        # (-inf: the clocks re-armed below add entries without arming the loop timer;
        # it is armed once, for the earliest, after them)
        self.handle, self.at = None, -math.inf
        heap = self.heap
        # uvloop's clock ticks in whole milliseconds: what is due within one is due now
        # (a clock that finds it early re-arms a tick later, at ``due``: not in this pass).
        due = self.loop.time() + 0.001
        try:
            while heap and heap[0][0] < due:
                when, clock = heapq.heappop(heap)
                if clock.at == when:  # (not an entry a re-arm or a stop left behind)
                    self.live -= 1
                    clock.at = math.inf
                    clock._fire()
        finally:
            self.at = math.inf
            if heap:
                self._arm(heap[0][0])


_wakes: _Wakes | None = None


def _nothing() -> None:
    pass


def _wakes_for(loop: asyncio.AbstractEventLoop) -> _Wakes:
    global _wakes
    if _wakes is None or _wakes.loop is not loop:  # (a new loop: a test's, or a worker's)
        _wakes = _Wakes(loop)
    return _wakes


class StreamClock:
    """One lazily re-armed timer per stream for every deadline.

    Arming an ``asyncio.timeout`` per read or write would cost a Timeout object and a
    heap-scheduled handle per event.  Instead the stream only records when it last made
    progress; this timer wakes at the earliest deadline that could have passed, re-arms
    itself if progress was made in the meantime, writes a heartbeat when one is due, and
    only on a real deadline interrupts the handler task by cancelling it (the task tells
    that apart from a client disconnect by ``reason`` and hands a real cancel on).

    Which deadlines apply depends on what the stream waits for: ``idle`` and heartbeats
    while it reads the upstream, ``send`` while it waits for the client, ``total``
    always.  The timer is armed for the ones that apply (one that does not could be long
    past, and would fire again at once, every loop turn); progress only moves deadlines
    later, so only a change of state (``wait_for_client``/``wait_for_upstream``) can
    need an earlier wake.
    """

    __slots__ = ("loop", "task", "idle", "send", "total_deadline", "beat", "last", "last_beat",
                 "reading", "reason", "wakes", "at", "on_beat", "took")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float, send: float,
                 total_deadline: float, beat: float, on_beat: Callable[[], None],
                 took: Callable[[], bool] | None = None) -> None:
        self.loop = loop
        # Did the client take bytes since the last ask?  A write waits for relayd's whole
        # buffer to drain below its mark; a client reading slowly but steadily takes
        # bytes all along, which ``send`` must count (nginx: between two writes).
        self.took = took
        self.task = asyncio.current_task()
        self.idle, self.send, self.total_deadline = idle, send, total_deadline
        self.beat, self.on_beat = beat, on_beat  # beat: math.inf for no heartbeats
        self.last = self.last_beat = loop.time()  # last progress: bytes arrived, or a drain ended
        self.reading = False  # False while a write waits for the client: `send` applies, not `idle`
        self.reason: End | None = None
        self.wakes = _wakes_for(loop)
        self.at = math.inf  # when it wakes next (its current entry in ``wakes``)
        # At the start every deadline lies ahead: the earliest of all is never late for
        # either state, and the first change of state needs no re-arm.
        self._arm(min(self.last + self.idle, self.last + self.send, self.last + self.beat,
                      total_deadline))

    def _next(self) -> float:
        """The earliest deadline that applies in the current state."""
        since = max(self.last, self.last_beat)  # a write begins after data or a heartbeat
        if self.reading:
            return min(self.last + self.idle, since + self.beat, self.total_deadline)
        return min(since + self.send, self.total_deadline)

    def _arm(self, when: float) -> None:
        # uvloop's clock ticks in whole milliseconds and runs a call_at less than 0.5 ms
        # ahead at once: a deadline closer than a tick would fire, find itself not due,
        # and re-arm, every loop turn until the tick.  A tick later it is due.
        when = max(when, self.loop.time() + 0.001)
        if when != math.inf:
            self.at = when
            self.wakes.add(when, self)

    def _state(self, reading: bool) -> None:
        if self.reading is reading:
            return
        self.reading = reading
        when = self._next()
        if self.at > when:
            self._drop()
            self._arm(when)

    def wait_for_client(self) -> None:
        self._state(False)

    def wait_for_upstream(self) -> None:
        self._state(True)

    def _fire(self) -> None:
        now = self.loop.time()
        reason: End | None = None
        if now >= self.total_deadline:
            reason = End.TOTAL_TIMEOUT
        elif not self.reading:
            if now >= max(self.last, self.last_beat) + self.send:
                if self.took is not None and self.took():
                    self.last = now  # progress: another period
                else:
                    reason = End.SEND_TIMEOUT
        elif now >= self.last + self.idle:
            reason = End.IDLE_TIMEOUT
        elif now >= max(self.last, self.last_beat) + self.beat:
            self.last_beat = now  # a beat the stream cannot send now is tried a period later
            self.on_beat()
        if reason is not None:
            self.reason = reason
            if self.task is not None:
                self.task.cancel()
            return
        self._arm(self._next())

    def interrupt(self, reason: End) -> None:
        """End the current wait now, as a deadline would (the drain's ``Stream.stop``
        reaching a stream that waits for a client that does not read)."""
        if self.reason is None and self.task is not None:
            self._drop()
            self.reason = reason
            self.task.cancel()

    def woke(self) -> End | None:
        """After a CancelledError: our reason, or None when the cancel came from outside."""
        reason, self.reason = self.reason, None
        if reason is None or self.task is None:
            return None
        if self.task.uncancel() > 0:  # a real cancellation arrived as well: honour it
            return None
        return reason

    def stop(self) -> None:
        """For good: its left-behind entry may stay in the heap until its time, so what
        the clock holds goes now (``on_beat`` is the stream's: all of it, for minutes)."""
        self._drop()
        self.on_beat = _nothing
        self.task = self.took = None

    def _drop(self) -> None:
        """Its current entry, if any, is left behind (skipped when it comes up)."""
        if self.at != math.inf:
            self.at = math.inf
            self.wakes.live -= 1

    def __lt__(self, other: "StreamClock") -> bool:  # (heap entries of one time: any order)
        return id(self) < id(other)

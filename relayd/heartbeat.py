"""Is every worker answering?  The main process pings each serving worker over its
channel every second; a worker whose event loop is stuck (stopped, spinning, deadlocked)
stops answering, while its process is alive and its socket still takes a share of new
connections.

- silent for ``SILENT_AFTER`` (3 s): not serving (/readyz 503, reloads stop waiting for
  it), and the main process withholds systemd's ``WATCHDOG=1``;
- silent for ``kill_after()``: SIGKILL, so it is restarted like a crashed worker: 30 s
  (gunicorn's ``timeout``), or half of ``WatchdogSec`` when systemd's watchdog is on (15 s
  with the shipped unit), so a hung worker is replaced before systemd restarts the whole
  service for the missing pings (never under ``SILENT_AFTER``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import TYPE_CHECKING

from . import lifecycle

if TYPE_CHECKING:
    from .supervisor import Slot, Supervisor

PING_EVERY, SILENT_AFTER, KILL_AFTER = 1.0, 3.0, 30.0
# A start-up builds every pool: it can take seconds with hundreds of upstreams on a loaded
# machine.  One is taken for stuck only past the kill delay and ten times the slowest
# start-up seen so far, or ten times the main process's own parse of the config: a worker
# builds what that parse read.  The same allowance holds for a worker taking a new config,
# which answers no ping while it builds: judged by the plain kill delay, a config that takes
# longer than that to build had every worker killed, and every restart killed again while
# building it (review 77).
START_FACTOR, START_CAP = 10.0, 5.0  # (one slow start-up must not make a stuck one wait forever)


def silence(slot: "Slot", now: float) -> float:
    """How long the worker has left a ping unanswered: time the main process did not ping
    (its own loop busy, a reload's parse) is not the worker's silence."""
    return 0.0 if slot.waiting is None else now - slot.waiting


def watchdog_usec() -> int | None:
    """systemd's WatchdogSec in µs, when it watches this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
        return int(usec)
    return None


def kill_after(usec: int | None) -> float:
    return KILL_AFTER if usec is None else max(SILENT_AFTER, min(KILL_AFTER, usec / 2e6))


async def run(sup: Supervisor) -> None:
    """Ping, judge silence, and tell systemd (status always; WATCHDOG=1 while every
    worker answers)."""
    usec = watchdog_usec()
    every = 10.0 if usec is None else min(10.0, usec / 2e6)
    kill, told = kill_after(usec), 0.0
    while True:
        await asyncio.sleep(min(PING_EVERY, every))
        now = time.monotonic()
        building = max(kill, min(START_FACTOR * max(sup.slowest_start, sup.last_parse),
                                 START_CAP * kill))
        for slot in sup.slots:
            if slot.pid is not None and not slot.ready and now - slot.started > building:
                # stuck before it ever served (no ping is sent to a starting worker)
                pid = slot.pid  # killed before the line: a log write can block
                sup.kill_pid(pid, signal.SIGKILL)
                sup.log.error("worker not answering; killing it", worker=slot.wid, pid=pid,
                              starting_s=round(now - slot.started, 1))
                continue
            if slot.pid is None or not slot.ready or slot.chan is None:
                continue
            silent = silence(slot, now)
            limit = building if slot.generation < sup.generation else kill
            if silent > limit:
                pid = slot.pid
                sup.kill_pid(pid, signal.SIGKILL)
                sup.log.error("worker not answering; killing it", worker=slot.wid,
                              pid=pid, silent_s=round(silent, 1))
            elif silent > SILENT_AFTER and not slot.quiet:
                slot.quiet = True
                sup.log.warning("worker not answering", worker=slot.wid, pid=slot.pid,
                                silent_s=round(silent, 1), kill_in_s=round(limit - silent, 1))
            slot.chan.send("ping")
            if slot.waiting is None:
                slot.waiting = now
        sup.changed.set()  # (silence changes who serves)
        if now - told >= every - 0.01:
            told = now
            alive = all(sup.answers(s) for s in sup.slots if s.pid is not None and s.ready)
            lifecycle.notify(("WATCHDOG=1\n" if usec is not None and alive and sup.announced else "")
                             + f"STATUS={sup.status_line()}")

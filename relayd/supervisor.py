"""The main process with ``workers`` > 1: binds the listeners once, forks the workers
that serve them, and speaks for the whole service.

- Listening sockets are bound here: one per worker in one ``SO_REUSEPORT`` group
  (``listeners.ListenGroup``), so the kernel spreads new connections evenly.  Each worker
  inherits its own; the main process keeps its copies open until it drains, so no reload
  ever closes one (closing a listening socket drops its queued connections).  A dead
  worker's socket is closed (nothing would accept on it) and its restart gets a new one.
- SIGHUP: the file is validated here, once; an invalid one is logged ("reload failed")
  and never reaches a worker.  A valid one is sent to every worker, which swaps it in
  process (requests in flight keep their table), and the reload is done (READY=1) when
  every worker has said so.
- SIGTERM/SIGINT: the listeners close here, every worker drains; exit 0 when every
  worker exited 0.  A second signal kills the workers and exits at once.
- A worker that drains on its own (SIGTERM sent to it) says so: its sockets close here
  at once and its replacement starts while it drains.
- A worker that exits on its own is restarted (after 0.1 s, doubling up to 10 s while
  it keeps dying young), and logged.
- sd_notify comes from here only; workers run without NOTIFY_SOCKET.  Workers are pinged
  (``heartbeat``): a silent one stops counting as serving, and is killed if it stays so.
- The admin listener runs here (``mainadmin``).

This process runs plain asyncio (it forks from inside its loop; see ``workers``), and
does no request work.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Callable

from aiohttp import web

from . import heartbeat, lifecycle, listeners, logs, mainadmin, metrics, tls, workers
from .config import Config, ConfigError
from .server import exception_handler, log_warnings

RESTART_MIN, RESTART_MAX, YOUNG = 0.1, 10.0, 5.0


class Slot:
    """One worker position: its id stays, its process changes on restart."""

    def __init__(self, wid: int) -> None:
        self.wid = wid
        self.pid: int | None = None
        self.chan: workers.Channel | None = None
        self.ready = False
        self.generation = 0
        self.snapped = 0
        self.started = 0.0
        self.heard = 0.0  # its last message
        self.waiting: float | None = None  # when the oldest unanswered ping was sent (``heartbeat``)
        self.quiet = False  # said to be silent
        self.crashes = 0
        self.exit_code: int | None = None
        self.sockets: list[socket.socket] = []  # its listening sockets in the group
        self.restart: asyncio.TimerHandle | None = None


def _order(chan: workers.Channel, generation: int, config: Config) -> None:
    """A config for a worker, always with the certificate bytes this process checked for it:
    a worker never reads the files itself."""
    chan.send("config", generation, config, tls.kept(config.tls))


class Supervisor(lifecycle.Reloads):
    def __init__(self, path: str, config: Config, n: int, loop: str) -> None:
        self.path, self.config, self.loop_name = path, config, loop
        self.log = logs.get()
        self.slots = [Slot(i) for i in range(n)]
        # pid: (channel, slot) of a worker draining on its own
        self.retiring: dict[int, tuple[workers.Channel, Slot]] = {}
        self.generation = 1
        self.swap_failed: dict[int, str] = {}  # worker id: why it could not take this generation
        self.slowest_start = 0.0  # fork to "ready", the longest seen (``heartbeat``)
        self.last_parse = 0.0  # how long this process took to read the running config (``heartbeat``)
        self.group: listeners.ListenGroup | None = None
        self.admin: web.AppRunner | None = None
        self.draining = False
        self.stopping = asyncio.Event()
        self.changed = asyncio.Event()
        self._signals = 0
        self.dir = tempfile.mkdtemp(prefix="relayd-metrics-")
        metrics.use_multiprocess(self.dir)
        self.metrics = metrics.make()
        self.metrics.generation.set(1)

    def run(self) -> int:
        try:
            return asyncio.run(self._main())
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- start

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(exception_handler(self.log))
        if self.config.tls is not None:
            try:
                tls.check(self.config.tls, self.path)  # the pair every worker forked serves
            except ConfigError as exc:
                for p in exc.problems:
                    print(p, file=sys.stderr)
                return 1
        try:
            self.group = listeners.ListenGroup(self.config.listen, "listen")
            for slot in self.slots:
                slot.sockets = self.group.member()
            if self.config.admin_listen is not None:
                self.admin = await mainadmin.start(self)
        except listeners.ListenError as exc:
            self.log.error("cannot listen", **{exc.key: exc.address}, error=exc.why)
            print(f"relayd: {exc}", file=sys.stderr)
            self._close_listeners(self.slots)
            if self.admin is not None:
                await self.admin.cleanup()
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.on_hup)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for slot in self.slots:
            self._spawn(slot)
        # Pinging and judging from the first fork: a worker stuck in its first start-up is
        # killed and restarted like a later one (WATCHDOG=1 only once READY is sent).
        dog = loop.create_task(heartbeat.run(self))
        await self.until(lambda: self.serving or self.stopping.is_set(), None)
        if not self.stopping.is_set():
            cfg = self.config
            self.log.info("ready", listen=str(cfg.listen),
                          admin_listen=str(cfg.admin_listen) if cfg.admin_listen else None,
                          routes=len(cfg.routes), upstreams=len(cfg.upstreams),
                          generation=self.generation, pid=os.getpid(), workers=len(self.slots),
                          worker_pids=[s.pid for s in self.slots])
            log_warnings(self.log, cfg)
            self.announce(f"READY=1\nSTATUS={self.status_line()}\nMAINPID={os.getpid()}")
        lifecycle.tune_gc()
        await self.stopping.wait()
        code = await self._drain()
        dog.cancel()
        self.log.info("exit", code=code)
        return code

    def serves(self, slot: Slot) -> bool:
        return slot.ready and self.answers(slot)

    @staticmethod
    def answers(slot: Slot) -> bool:
        return heartbeat.silence(slot, time.monotonic()) <= heartbeat.SILENT_AFTER

    @property
    def n_serving(self) -> int:
        return sum(1 for s in self.slots if self.serves(s))

    @property
    def serving(self) -> bool:
        return self.n_serving == len(self.slots)

    def status_line(self) -> str:
        draining = "draining; " if self.draining else ""  # (as ``App.status_line``)
        return f"{draining}config generation {self.generation}; {self.n_serving}/{len(self.slots)} workers serving"

    # -- workers

    def _spawn(self, slot: Slot) -> None:
        slot.restart = None
        if self.draining or self.stopping.is_set():
            return
        slot.started = time.monotonic()  # every attempt: one that fails at once died young
        slot.generation = 0  # its predecessor's is not its own: it says its own when ready
        if not slot.sockets:
            assert self.group is not None
            try:
                slot.sockets = self.group.member()
            except listeners.ListenError as exc:
                self._restart(slot, None, None, f"cannot listen: {exc.why}")
                return
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:
            return self._not_started(slot, "socketpair", exc, [])
        sys.stdout.flush()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, workers.FORK_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                workers.child(slot.wid, self.path, self.config, self.generation, slot.sockets,
                              theirs, self.loop_name)
        except OSError as exc:
            return self._not_started(slot, "fork", exc, [ours, theirs])
        finally:  # (the child never gets here: it leaves through os._exit)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        theirs.close()
        slot.pid, slot.ready, slot.exit_code, slot.quiet, slot.waiting = pid, False, None, False, None
        slot.chan = workers.Channel(ours)
        asyncio.get_running_loop().create_task(self._listen(slot, slot.chan))

    def _not_started(self, slot: Slot, call: str, exc: OSError, socks: list[socket.socket]) -> None:
        """A restart the kernel refused (fork: EAGAIN under TasksMax, ENOMEM; socketpair:
        EMFILE): its sockets leave the group at once (a share of new connections would
        queue on them for nobody) and it is retried like a crash."""
        for s in socks:
            s.close()
        self._close_listeners([slot])
        self._restart(slot, None, None, f"{call}: {exc.strerror or exc}")

    async def _listen(self, slot: Slot, chan: workers.Channel) -> None:
        await chan.open()
        while (msg := await chan.recv()) is not None:
            if slot.chan is not chan or slot.pid is None:
                continue  # a dead (or retired) worker's last words: its slot is not its own
            slot.heard, slot.waiting = time.monotonic(), None
            if slot.quiet:
                slot.quiet = False
                self.log.info("worker answering again", worker=slot.wid, pid=slot.pid)
            if msg[0] == "ready":
                slot.ready, slot.generation = True, msg[1]
                self.slowest_start = max(self.slowest_start, time.monotonic() - slot.started)
                self.log.info("worker serving", worker=slot.wid, pid=slot.pid, generation=msg[1])
                if msg[1] < self.generation:
                    # Forked before a reload whose order it could not get yet (the
                    # channel opens after the fork): it gets the config now.
                    _order(chan, self.generation, self.config)
            elif msg[0] == "swapped":
                slot.generation = msg[1]
            elif msg[0] == "swap_failed" and msg[1] == self.generation:
                self.swap_failed[slot.wid] = msg[2]
            elif msg[0] == "snapped":
                slot.snapped = msg[1]
            elif msg[0] == "draining" and not self.draining and not self.stopping.is_set():
                self._retire(slot, chan)  # (not a stop of the whole service: systemctl kill)
            self.changed.set()
        chan.close()

    def _retire(self, slot: Slot, chan: workers.Channel) -> None:
        """A worker that got SIGTERM on its own (``systemctl kill``): its sockets leave the
        group now (it closed its copy; ours would queue new connections for nobody), and
        its replacement starts while it drains."""
        assert slot.pid is not None
        pid, self.retiring[slot.pid] = slot.pid, (chan, slot)
        slot.pid, slot.chan, slot.ready = None, None, False
        self._close_listeners([slot])
        self.changed.set()
        loop = asyncio.get_running_loop()
        loop.call_later(self.config.shutdown_grace + 5, self.kill_pid, pid, signal.SIGKILL)
        # A turn later, through the restart timer the drain cancels: the same SIGTERM sent
        # to every process (``systemctl kill``, Ctrl-C in a terminal) reaches the main
        # process in a moment, and then nothing is replaced, nor said to be (review 81).
        slot.restart = loop.call_later(RESTART_MIN, self._replace, slot, pid)

    def _replace(self, slot: Slot, pid: int) -> None:
        if not (self.draining or self.stopping.is_set()):
            self.log.info("worker draining; starting its replacement", worker=slot.wid, pid=pid)
        self._spawn(slot)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            metrics.process_gone(pid, self.dir)
            slot = next((s for s in self.slots if s.pid == pid), None)
            if pid in self.retiring:
                chan, retired = self.retiring.pop(pid)
                chan.close()
                if retired.pid is None:  # no replacement yet (a stop cancelled it): its code counts
                    retired.exit_code = code
                (self.log.info if code == 0 else self.log.error)(
                    "worker drained", pid=pid, exit_code=code)
                self.changed.set()
            if slot is None:
                continue
            slot.pid, slot.ready, slot.exit_code = None, False, code
            self._close_listeners([slot])  # connections would queue on it for nobody
            if slot.chan is not None:
                slot.chan.close()
                slot.chan = None
            self.changed.set()
            if not self.draining and not self.stopping.is_set():  # (a stop's SIGTERM reached it first)
                self._restart(slot, pid, code)

    @staticmethod
    def _close_listeners(slots: list[Slot]) -> None:
        for slot in slots:
            for s in slot.sockets:
                s.close()
            slot.sockets = []

    def _restart(self, slot: Slot, pid: int | None, code: int | None, why: str = "") -> None:
        young = time.monotonic() - slot.started < YOUNG
        slot.crashes = slot.crashes + 1 if young else 0
        delay = min(RESTART_MIN * 2 ** max(slot.crashes - 1, 0), RESTART_MAX)
        if code is None:
            self.log.error("worker could not start; retrying", worker=slot.wid, error=why,
                           restart_in_s=round(delay, 2), crash_loop=slot.crashes)
        else:
            how = {"exit_code": code} if code >= 0 else {"signal": signal.Signals(-code).name}
            self.log.error("worker exited unexpectedly; restarting", worker=slot.wid, pid=pid,
                           **how, restart_in_s=round(delay, 2), crash_loop=slot.crashes)
        lifecycle.notify(f"STATUS={self.status_line()}")
        slot.restart = asyncio.get_running_loop().call_later(delay, self._spawn, slot)

    def _live(self) -> list[Slot]:
        return [s for s in self.slots if s.pid is not None]

    async def until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait for a state the workers' messages (or exits) bring about."""
        end = None if timeout is None else time.monotonic() + timeout
        while not done():
            self.changed.clear()
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return done()
        return True

    # -- reload

    async def reload(self) -> bool:
        lifecycle.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        began = time.monotonic()
        pem = tls.kept(self.config.tls)  # (the running pair, should this reload roll back)
        # The loop goes on pinging the workers and systemd's watchdog while a large file is
        # read (it shares the GIL, so the pings may come late: not the workers' silence).
        new = await self.read_config(self.config)
        stalled = time.monotonic() - began
        if new is not None:
            self.last_parse = stalled
        for slot in self.slots:
            if slot.waiting is not None:
                slot.waiting += stalled
        if self.stopping.is_set():  # (the drain speaks for the service now)
            self.log.info("reload dropped: draining", config=self.path)
            return False
        if new is None:
            tls.keep(self.config.tls, pem)
            self.metrics.reloaded("failed")
            lifecycle.notify(f"READY=1\nSTATUS=reload failed; {self.status_line()}")
            return False
        old = self.config
        gen = await self._send_config(new)
        if self.stopping.is_set():  # a stop came meanwhile: the drain speaks for the service now
            self.log.info("reload dropped: draining", config=self.path, generation=gen)
            return False
        if self.swap_failed:
            # A config valid on paper that a worker could not build (its pools): the
            # workers that took it go back, as a generation of its own, and restarts use
            # the config that works.
            failed = dict(self.swap_failed)
            tls.keep(old.tls, pem)
            back = await self._send_config(old)
            self.metrics.generation.set(back)
            # A worker that cannot build the previous config again either (its pools for
            # it were retired) is replaced: its restart forks with the previous config.
            stuck = sorted(self.swap_failed)
            for slot in self.slots:
                if slot.wid in stuck and slot.pid is not None:
                    self.kill_pid(slot.pid, signal.SIGTERM)
            self.metrics.reloaded("failed")
            self.log.error("reload failed", config=self.path, generation=gen,
                           errors=[f"worker {w}: {why}" for w, why in sorted(failed.items())],
                           hint="every worker is back on the previous config",
                           workers_replaced=stuck)
            lifecycle.notify(f"READY=1\nSTATUS=reload failed; {self.status_line()}")
            return False
        behind = [s.wid for s in self._live() if s.ready and s.generation < gen]  # hung, > 30 s
        self.metrics.reloaded("ok")
        self.metrics.generation.set(gen)
        (self.log.warning if behind else self.log.info)(
            "reload incomplete" if behind else "reload ok", config=self.path, generation=gen,
            routes=len(new.routes), upstreams=len(new.upstreams), workers_behind=behind,
            parse_s=round(self.last_parse, 3))
        log_warnings(self.log, new)
        lifecycle.notify(f"READY=1\nSTATUS={self.status_line()}")
        return True

    async def _send_config(self, new: Config) -> int:
        """Make ``new`` the config of a new generation, send it to every worker, and wait
        (30 s at most) until each serving worker took it or said it could not."""
        if new.log_level != self.config.log_level:
            logs.configure(new.log_level)
            self.log = logs.get()
        self.config, self.generation = new, self.generation + 1
        gen = self.generation
        self.swap_failed = {}
        for slot in self._live():
            assert slot.chan is not None
            _order(slot.chan, gen, new)
        # a worker that dies meanwhile is restarted on the new config: it does not count
        await self.until(lambda: all(s.generation >= gen or s.wid in self.swap_failed
                                     for s in self._live() if self.serves(s)), 30)
        return gen

    # -- stop

    def _on_stop(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            self.log.warning("second stop signal: exiting now", signal=signal.Signals(sig).name)
            for pid in self._pids():
                self.kill_pid(pid, signal.SIGKILL)
            sys.stdout.flush()
            shutil.rmtree(self.dir, ignore_errors=True)
            os._exit(1)
        self.log.info("drain", signal=signal.Signals(sig).name,
                      grace_s=self.config.shutdown_grace, workers=len(self._live()))
        self.stopping.set()

    def _pids(self) -> list[int]:
        """Every worker process, those draining on their own included."""
        return [s.pid for s in self._live() if s.pid is not None] + list(self.retiring)

    def kill_pid(self, pid: int, sig: int) -> None:
        if pid in self._pids():  # (not reaped: the pid is still ours)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    async def _drain(self) -> int:
        self.draining = True
        lifecycle.notify(f"STOPPING=1\nSTATUS={self.status_line()}")
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
            if slot.pid is not None:
                self.kill_pid(slot.pid, signal.SIGTERM)
        self._close_listeners(self.slots)  # with the workers' copies closed too, connections are refused
        if not await self.until(lambda: not self._pids(), self.config.shutdown_grace + 5):
            self.log.error("workers did not finish draining; killing them", pids=self._pids())
            for pid in self._pids():
                self.kill_pid(pid, signal.SIGKILL)
            await self.until(lambda: not self._pids(), 5)
        if self.admin is not None:
            await self.admin.cleanup()
        codes = {s.wid: s.exit_code for s in self.slots}
        if any(c != 0 for c in codes.values()):
            self.log.error("workers exited with errors", exit_codes=codes)
            return 1
        return 0

"""Process lifecycle: listen, notify systemd, reload on SIGHUP, drain on SIGTERM/SIGINT.

Reload follows Caddy's discipline: parse → validate → build → swap one reference.  A
config that fails any check never gets in; the old one keeps serving.  Reloads run one
at a time, and a burst of SIGHUPs collapses into "read the file again once more", so
the newest file always wins.

Drain: stop accepting at once, let in-flight requests finish within ``shutdown_grace``,
then end the remaining SSE streams with a provider-format error event (reason
``shutdown``) and close the rest.  A second signal exits at once.

With ``workers`` > 1 the main process (``supervisor``) owns signals, sd_notify and the
admin listener; each worker runs a ``Daemon`` here on its own listening sockets, which the
main process bound (``listeners.ListenGroup``), takes validated configs from it (``apply``) and drains
on SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Coroutine
from aiohttp import web

from . import config as config_mod
from . import logs, tls
from .app import App
from .config import Config, ConfigError
from .exchange import End
from .listeners import ListenError, bind
from .allow import AdminRunner
from .server import ClientServer, Connection, FdWatch, exception_handler, log_warnings

_TLS_SHUTDOWN = 3.0  # seconds a closing TLS client connection waits for close_notify


def notify(message: str) -> bool:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (path or @abstract)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    # Non-blocking: a notify socket nobody reads (its queue full) must not stop the event
    # loop.  A state change (READY, RELOADING, STOPPING: systemd waits for them) is tried
    # for up to 50 ms more; a status or watchdog ping is dropped.
    tries = 6 if "READY=1" in message or "RELOADING=1" in message or "STOPPING=1" in message else 1
    for i in range(tries):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                               | socket.SOCK_NONBLOCK) as s:
                s.connect(addr)
                s.sendall(message.encode())
            return True
        except BlockingIOError:
            if i + 1 < tries:
                time.sleep(0.01)
        except OSError:
            return False
    return False


_held_hups: list[int] = []  # SIGHUPs taken by ``hold_sighup``'s handler


def hold_sighup(earlier: list[int]) -> None:
    """From the first moment of ``relayd run`` (``earlier``: the ones the command line
    held before this module was imported): a SIGHUP (a script reloading right after a
    start) is remembered until the daemon can reload, not fatal — SIGHUP's default action
    ends the process, and the loop's own handler comes only once listeners are up."""
    signal.signal(signal.SIGHUP, lambda *_: _held_hups.append(1))
    _held_hups.extend(earlier)


def exit_now(code: int) -> int:
    """Leave without the interpreter's finalization when a reloaded config is still being
    parsed: the parser (C, holding the interpreter) would keep a stopped process alive,
    its port and unit with it, until the parse ended — seconds after "exit"."""
    if any(t.name == _READER and t.is_alive() for t in threading.enumerate()):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


_READER = "relayd-reload"


class Reloads:
    """One reload at a time; a burst of SIGHUPs collapses into "read the file again once
    more", so the newest file always wins (for ``Daemon`` and ``supervisor.Supervisor``)."""

    stopping: asyncio.Event
    _reload_pending = False
    _reload_task: asyncio.Task[None] | None = None
    announced = False  # READY=1 sent for the start: a SIGHUP before it waits for it

    def on_hup(self) -> None:
        """SIGHUP.  Before the start is announced it is remembered, not run: a reload
        racing the start would say READY (and "reload ok") before any worker served."""
        if self.announced:
            self.request_reload()
        else:
            _held_hups.append(1)

    def announce(self, message: str) -> None:
        """READY=1 for the start; then any SIGHUP that came before (since ``hold_sighup``)."""
        notify(message)
        self.announced = True
        if _held_hups:
            _held_hups.clear()
            self.request_reload()

    async def reload(self) -> bool:
        raise NotImplementedError

    def request_reload(self) -> None:
        self._reload_pending = True
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.get_running_loop().create_task(self._reload_loop())

    async def read_config(self, old: Config) -> Config | None:
        """``load_for_reload`` beside the loop, on a daemon thread of its own: the loop
        serves (and pings) while a large file is read, and not on the loop's executor,
        which ``asyncio.run`` waits for at exit — a stop during a long parse lingered until
        it ended and logged its result after "exit"."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Config | None] = loop.create_future()
        path, log = self.path, self.log  # type: ignore[attr-defined]

        def run() -> None:
            try:
                result = load_for_reload(path, old, log)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                outcome: Callable[[], Any] = lambda: done.done() or done.set_exception(exc)
            else:
                outcome = lambda: done.done() or done.set_result(result)  # noqa: E731
            try:
                loop.call_soon_threadsafe(outcome)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

        threading.Thread(target=run, name=_READER, daemon=True).start()
        return await done

    async def _reload_loop(self) -> None:
        while self._reload_pending and not self.stopping.is_set():
            self._reload_pending = False
            await self.reload()
        if self._reload_pending:  # a SIGHUP during the drain: said, not silently dropped
            self._reload_pending = False
            logs.get().info("reload dropped: draining")


class Daemon(Reloads):
    """One serving process: the whole daemon with ``workers: 1``, else one worker
    (``sockets`` inherited from the main process, no admin listener, no sd_notify)."""

    def __init__(self, path: str, config: Config, sockets: list[socket.socket] | None = None,
                 worker: int | None = None) -> None:
        self.path = path
        self.log = logs.get()
        self.app = App(config)
        self.sockets, self.worker = sockets, worker
        self.server: web.Server | None = None
        self.listeners: list[asyncio.AbstractServer] = []
        self.admin: web.AppRunner | None = None
        self.stopping = asyncio.Event()
        self._signals = 0

    # -- start

    async def start(self) -> None:
        cfg = self.app.config
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(exception_handler(self.log))
        self.server = ClientServer(self.app.handle, lambda: self.app.config, self.app.reject)
        await self.open_listener(loop)
        if not isinstance(loop, asyncio.BaseEventLoop):  # uvloop: EMFILE is never reported
            self._fdwatch = loop.create_task(FdWatch(self.log).run())
        if self.worker is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_stop, sig)
            self.log.info("worker ready", generation=self.app.generation, pid=os.getpid())
            return
        if cfg.admin_listen is not None:
            self.admin = AdminRunner(self.app.admin_app(), lambda: self.app.config.admin_allow,
                                     lambda: self.app.config.limits)
            await self.admin.setup()
            try:
                await web.TCPSite(self.admin, cfg.admin_listen.host, cfg.admin_listen.port,
                                  reuse_address=True).start()
            except OSError as exc:
                raise ListenError("admin_listen", cfg.admin_listen, exc) from None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.on_hup)
        self.log.info("ready", listen=str(cfg.listen),
                      admin_listen=str(cfg.admin_listen) if cfg.admin_listen else None,
                      routes=len(cfg.routes), upstreams=len(cfg.upstreams),
                      generation=self.app.generation, pid=os.getpid())
        log_warnings(self.log, cfg)
        self.announce(f"READY=1\nSTATUS={self.app.status_line()}\nMAINPID={os.getpid()}")

    async def open_listener(self, loop: asyncio.AbstractEventLoop) -> None:
        """The one place the client listener is created: on the sockets the main process
        bound, or on ones bound here (``workers: 1``)."""
        socks = self.sockets if self.sockets is not None else bind(self.app.config.listen, "listen")
        tls = self.server.tls.context
        # client_header covers the handshake too (asyncio's default is 60 s); the value at
        # start holds until a restart
        handshake = self.app.config.limits.client_header if tls is not None else None
        # A TLS connection relayd closes (a late head, an idle keep-alive) sends close_notify
        # and waits for the client's: 3 s at most, as nginx (asyncio's default, 30 s, kept a
        # silent client's descriptor that much longer than the deadline that ended it).
        shutdown = {"ssl_shutdown_timeout": _TLS_SHUTDOWN} if tls is not None else {}
        try:
            for sock in socks:
                self.listeners.append(await loop.create_server(
                    self.server, sock=sock, backlog=1024, ssl=tls,
                    ssl_handshake_timeout=handshake if handshake and handshake > 0 else None,
                    **shutdown))
        except OSError as exc:
            raise ListenError("listen", self.app.config.listen, exc) from None

    # -- reload

    async def reload(self) -> bool:
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        began = time.monotonic()
        new = await self.read_config(self.app.config)
        parsed = time.monotonic() - began
        if self.stopping.is_set():  # a stop came while the file was read: it wins
            self.log.info("reload dropped: draining", config=self.path)
            return False
        if new is None:
            self.app.metrics.reloaded("failed")
            notify(f"READY=1\nSTATUS=reload failed; {self.app.status_line()}")
            return False
        try:
            self.apply(new)
        except Exception as exc:  # noqa: BLE001 - valid on paper, not buildable: keep serving
            self.app.metrics.reloaded("failed")
            self.log.exception("reload failed", config=self.path, errors=[f"{type(exc).__name__}: {exc}"],
                               hint="the running config stays")
            notify(f"READY=1\nSTATUS=reload failed; {self.app.status_line()}")
            return False
        self.app.metrics.reloaded("ok")
        self.log.info("reload ok", config=self.path, generation=self.app.generation,
                      routes=len(new.routes), upstreams=len(new.upstreams), parse_s=round(parsed, 3))
        log_warnings(self.log, new)
        notify(f"READY=1\nSTATUS={self.app.status_line()}")
        return True

    def apply(self, new: Config, generation: int | None = None) -> None:
        """Swap in a config that was already validated (here, or by the main process,
        which numbers generations for all workers alike).  Raises, with the running
        config still in place, when the new one cannot be built."""
        level = new.log_level != self.app.config.log_level
        current = self.app.generation
        if generation is not None:
            self.app.generation = generation - 1
        try:
            self.app.install(new)
        except BaseException:
            self.app.generation = current
            raise
        try:
            # (A worker restarted after a reload applies it before it listens: its server,
            # made at start, reads the new config's certificate then.)  After the table:
            # a config that cannot be built changes nothing, the certificate included.
            if self.server is not None:
                self.server.tls.reload(new, self.path)  # checked already: this only swaps the pair
        except ConfigError as exc:
            self.log.error("listener certificate not reloaded", errors=[str(p) for p in exc.problems])
        if level:
            logs.configure(new.log_level)
            self.log = logs.get()

    # -- stop

    def _on_stop(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1 and self.worker is not None:
            return  # the main process forwards stop signals and decides "at once"
        if self._signals > 1:
            self.app.flush_access()
            self.log.warning("second stop signal: exiting now", signal=signal.Signals(sig).name)
            os._exit(1)  # (log lines are flushed as written)
        self.log.info("drain", signal=signal.Signals(sig).name,
                      grace_s=self.app.config.shutdown_grace, active=len(self.app.active))
        self.stopping.set()

    async def drain(self) -> None:
        app = self.app
        app.draining = True
        notify(f"STOPPING=1\nSTATUS={app.status_line()}")
        for listener in self.listeners:
            listener.close()
        assert self.server is not None
        for proto in list(self.server.connections):
            if isinstance(proto, Connection):
                proto.drain()
            else:
                proto.close()
        deadline = time.monotonic() + app.config.shutdown_grace
        while app.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if app.active:
            n = app.stop_streams(End.SHUTDOWN)
            self.log.info("grace over: ending remaining requests", requests=n)
            end = time.monotonic() + 1
            while app.active and time.monotonic() < end:
                await asyncio.sleep(0.02)
        await self.server.shutdown(timeout=0.5)
        if self.admin is not None:
            await self.admin.cleanup()
        await app.registry.close()
        app.flush_access()

    async def watchdog(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        every = 10.0
        ping = False
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            every = min(every, int(usec) / 2e6)
            ping = True
        while True:
            await asyncio.sleep(every)
            notify(("WATCHDOG=1\n" if ping else "") + f"STATUS={self.app.status_line()}")


def load_for_reload(path: str, old: Config, log: Any) -> Config | None:
    """The file's new config, or None after logging "reload failed" once.  Listener
    addresses and ``workers`` are kept: changing them needs a restart."""
    try:
        new = config_mod.load(path)
        if new.tls is not None:
            tls.check(new.tls, path)  # a bad certificate never reaches a listener
    except ConfigError as exc:
        errors = [str(p) for p in exc.problems]
        if any("environment variable" in e for e in errors):
            log.error("reload failed", config=path, errors=errors,
                      hint="relayd reads its environment once, at start: after changing "
                           "relayd.env, restart it (systemctl restart relayd); a reload "
                           "re-reads the config file, key files and credentials only")
        else:
            log.error("reload failed", config=path, errors=errors)
        return None
    except Exception as exc:  # noqa: BLE001 - a loader bug must not leave the reload half done
        # (RELOADING=1 without READY=1, the error surfacing at the next SIGHUP): it is a
        # failed reload like any other.  Where it was raised, not its message: a message
        # may quote a value from the file, and values can be keys.
        log.error("reload failed", config=path,
                  errors=[f"{path}: internal error while loading: {logs.raised_at(exc)}"])
        return None
    if new.listen != old.listen or new.admin_listen != old.admin_listen:
        log.warning("listen address changes need a restart; keeping the old listeners",
                    listen=str(old.listen), wanted=str(new.listen),
                    admin_listen=str(old.admin_listen), wanted_admin=str(new.admin_listen))
        unapplied = config_mod.listen_warnings(new.listen, new.admin_listen, new.client_keys,
                                               new.upstreams.values())
        new = replace(new, listen=old.listen, admin_listen=old.admin_listen)
        # the warnings of the listeners that serve, not of the file's addresses
        new = replace(new, warnings=tuple(config_mod.listen_warnings(
            new.listen, new.admin_listen, new.client_keys, new.upstreams.values()))
            + tuple(w for w in new.warnings if w not in unapplied))
    if (new.tls is None) != (old.tls is None):
        # A new listener is a restart's job.  The config keeps the running side, so a
        # worker restarted later serves what its siblings serve (it served the file's).
        log.warning("turning tls on or off needs a restart; keeping the listener as it is",
                    tls="on" if old.tls is not None else "off")
        new = replace(new, tls=old.tls)
    # ``old.workers`` is the running count (``run`` resolved auto and ``--workers``); the
    # file's is compared resolved too: ``auto`` on a 2-CPU VM is 2 (review 77).
    if (new.workers or usable_cpus()) != old.workers:
        log.warning("workers changes need a restart; keeping the running workers",
                    workers=old.workers, wanted=new.workers or f"auto ({usable_cpus()})")
    new = replace(new, workers=old.workers)
    return new


def tune_gc() -> None:
    """After start-up: freeze what start-up allocated (never collected again, and left
    unwritten in forked workers) and collect generation 0 less often (50,000 allocations
    instead of 700): a proxy allocates per chunk, but makes few reference cycles."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop unless ``--loop asyncio`` (or uvloop is not installed and was not asked for)."""
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_loop(name: str, main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        return runner.run(main)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


async def serve(path: str, config: Config) -> int:
    daemon = Daemon(path, config)
    log = daemon.log
    try:
        await daemon.start()
    except ListenError as exc:
        log.error("cannot listen", **{exc.key: exc.address}, error=exc.why)
        print(f"relayd: {exc}", file=sys.stderr)
        for listener in daemon.listeners:
            listener.close()
        if daemon.admin is not None:
            await daemon.admin.cleanup()
        await daemon.app.registry.close()
        return 1
    dog = asyncio.get_running_loop().create_task(daemon.watchdog())
    tune_gc()
    await daemon.stopping.wait()
    await daemon.drain()
    dog.cancel()
    log.info("exit", code=0)
    return 0


def run(path: str, workers: int | None = None, loop: str = "auto") -> int:
    """``workers``/``loop`` from the command line override the config's ``workers``
    (``workers``: None when not given, 0 for ``--workers auto``)."""
    began = time.monotonic()
    try:
        config = config_mod.load(path)
    except ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return 1
    parsed = time.monotonic() - began
    logs.configure(config.log_level)
    n = (config.workers if workers is None else workers) or usable_cpus()  # (0: --workers auto)
    config = replace(config, workers=n)  # what runs: a reload compares the file's with it
    logs.get().info("start", config=path, pid=os.getpid(), workers=n,
                    loop=loop_factory(loop).__module__.split(".")[0])
    if n == 1:
        return exit_now(run_loop(loop, serve(path, config)))
    from .supervisor import Supervisor
    sup = Supervisor(path, config, n, loop)
    sup.last_parse = parsed  # (a worker's start-up builds what this read: ``heartbeat``)
    return exit_now(sup.run())

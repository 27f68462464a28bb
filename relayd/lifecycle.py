"""Process lifecycle: listen, notify systemd, reload on SIGHUP, drain on SIGTERM/SIGINT.

Reload follows Caddy's discipline: parse → validate → build → swap one reference.  A
config that fails any check never gets in; the old one keeps serving.  Reloads run one
at a time, and a burst of SIGHUPs collapses into "read the file again once more", so
the newest file always wins.

Drain: stop accepting at once, let in-flight requests finish within ``shutdown_grace``,
then end the remaining SSE streams with a provider-format error event (reason
``shutdown``) and close the rest.  A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import replace
from aiohttp import web

from . import config as config_mod
from . import logs
from .app import App
from .config import Config, ConfigError
from .exchange import End
from .server import ClientServer


class ListenError(Exception):
    """A listener could not bind: says which config key named the address."""

    def __init__(self, key: str, address: object, exc: OSError) -> None:
        super().__init__(f"cannot listen on {address} ({key}): {exc.strerror or exc}")
        self.key, self.address, self.why = key, str(address), exc.strerror or str(exc)


class FdShortage:
    """asyncio stops accepting for a second on EMFILE/ENFILE and retries by itself;
    this turns its per-failure traceback into one warning per ``every`` seconds with
    counts, so an operator sees "out of file descriptors" and not log spam."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, log: object, every: float = 10.0) -> None:
        self.log, self.every = log, every
        self.total = 0
        self._since = 0
        self._last = -every

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        if context.get("message") != self.MESSAGE or not isinstance(exc, OSError):
            loop.default_exception_handler(context)
            return
        self.total += 1
        self._since += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            self.log.warning("out of file descriptors: not accepting connections for 1s",
                             error=exc.strerror, failures=self._since, failures_total=self.total)
            self._last, self._since = now, 0


def notify(message: str) -> bool:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (path or @abstract)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


class Daemon:
    def __init__(self, path: str, config: Config) -> None:
        self.path = path
        self.log = logs.get()
        self.app = App(config)
        self.server: web.Server | None = None
        self.listener: asyncio.AbstractServer | None = None
        self.admin: web.AppRunner | None = None
        self.stopping = asyncio.Event()
        self._reload_pending = False
        self._reload_task: asyncio.Task[None] | None = None
        self._signals = 0

    # -- start

    async def start(self) -> None:
        cfg = self.app.config
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(FdShortage(self.log))
        self.server = ClientServer(self.app.handle, lambda: self.app.config, self.app.reject)
        try:
            self.listener = await loop.create_server(self.server, cfg.listen.host,
                                                     cfg.listen.port, reuse_address=True,
                                                     backlog=1024,
                                                     ssl=self.server.tls.context)  # [clients] TLS
        except OSError as exc:
            raise ListenError("listen", cfg.listen, exc) from None
        if cfg.admin_listen is not None:
            self.admin = web.AppRunner(self.app.admin_app(), access_log=None, handle_signals=False)
            await self.admin.setup()
            try:
                await web.TCPSite(self.admin, cfg.admin_listen.host, cfg.admin_listen.port,
                                  reuse_address=True).start()
            except OSError as exc:
                raise ListenError("admin_listen", cfg.admin_listen, exc) from None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self.log.info("ready", listen=str(cfg.listen),
                      admin_listen=str(cfg.admin_listen) if cfg.admin_listen else None,
                      routes=len(cfg.routes), upstreams=len(cfg.upstreams),
                      generation=self.app.generation, pid=os.getpid())
        notify(f"READY=1\nSTATUS={self.app.status_line()}\nMAINPID={os.getpid()}")

    # -- reload

    def request_reload(self) -> None:
        self._reload_pending = True
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.get_running_loop().create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        while self._reload_pending and not self.stopping.is_set():
            self._reload_pending = False
            await self.reload()

    async def reload(self) -> bool:
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        old = self.app.config
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, config_mod.load, self.path)
            self.server.tls.reload(new, self.path)  # [clients] re-read the listener certificate
        except ConfigError as exc:
            self.app.metrics.reloads.labels("failed").inc()
            self.log.error("reload failed", config=self.path, generation=self.app.generation,
                           errors=[str(p) for p in exc.problems])
            notify(f"READY=1\nSTATUS=reload failed; {self.app.status_line()}")
            return False
        if new.listen != old.listen or new.admin_listen != old.admin_listen:
            self.log.warning("listen address changes need a restart; keeping the old listeners",
                             listen=str(old.listen), wanted=str(new.listen))
            new = _keep_listeners(new, old)
        if new.log_level != old.log_level:
            logs.configure(new.log_level)
            self.log = logs.get()
        self.app.install(new)
        self.app.metrics.reloads.labels("ok").inc()
        self.log.info("reload ok", config=self.path, generation=self.app.generation,
                      routes=len(new.routes), upstreams=len(new.upstreams))
        notify(f"READY=1\nSTATUS={self.app.status_line()}")
        return True

    # -- stop

    def _on_stop(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            self.log.warning("second stop signal: exiting now", signal=signal.Signals(sig).name)
            sys.stdout.flush()
            os._exit(1)
        self.log.info("drain", signal=signal.Signals(sig).name,
                      grace_s=self.app.config.shutdown_grace, active=len(self.app.active))
        self.stopping.set()

    async def drain(self) -> None:
        app = self.app
        app.draining = True
        notify(f"STOPPING=1\nSTATUS=draining; {app.status_line()}")
        if self.listener is not None:
            self.listener.close()
        assert self.server is not None
        for proto in list(self.server.connections):
            proto.close()  # idle keep-alive connections close now, busy ones after their response
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


def _keep_listeners(new: Config, old: Config) -> Config:
    return replace(new, listen=old.listen, admin_listen=old.admin_listen)


async def serve(path: str, config: Config) -> int:
    daemon = Daemon(path, config)
    log = daemon.log
    try:
        await daemon.start()
    except ListenError as exc:
        log.error("cannot listen", **{exc.key: exc.address}, error=exc.why)
        print(f"relayd: {exc}", file=sys.stderr)
        if daemon.listener is not None:
            daemon.listener.close()
        if daemon.admin is not None:
            await daemon.admin.cleanup()
        await daemon.app.registry.close()
        return 1
    dog = asyncio.get_running_loop().create_task(daemon.watchdog())
    await daemon.stopping.wait()
    await daemon.drain()
    dog.cancel()
    log.info("exit", code=0)
    return 0


def run(path: str) -> int:
    try:
        config = config_mod.load(path)
    except ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return 1
    logs.configure(config.log_level)
    logs.get().info("start", config=path, pid=os.getpid())
    return asyncio.run(serve(path, config))

"""A worker process: the child side of ``supervisor``.

The main process forks a worker from inside its own (plain asyncio) event loop.  The
child must never touch that inherited loop: its epoll instance is shared with the
parent, so closing or unregistering anything through it would unregister the parent's
sockets.  The child keeps a reference to it (so it is never garbage-collected and
closed), resets signal handling, unsets NOTIFY_SOCKET (only the main process speaks to
systemd) and runs a fresh loop with a ``lifecycle.Daemon`` on its own inherited listening
sockets (``listeners.ListenGroup``); every other fd it inherited is the main process's
and is dropped (``_keep_only``), the epoll one included.  It never returns into the
parent's code: it leaves through ``os._exit``.

Main and worker talk over a socketpair (``Channel``): length-prefixed pickled tuples.
Main → worker: ``("config", generation, Config, certificate bytes or None)``, ``("snap", n)``, ``("ping",)``.  Worker → main:
``("ready", generation)``, ``("swapped", generation)``, ``("snapped", n)``,
``("draining",)``, ``("pong",)``.
"""

from __future__ import annotations

import asyncio
import copyreg
import os
import pickle
import signal
import socket
import sys
import types
from typing import Any, NoReturn

from . import logs, tls
from .config import Config

# signals held back around fork(): the child installs its handlers, then unblocks them
FORK_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_inherited: list[Any] = []  # the parent's loop, kept alive in the child (see above)


def _proxy(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


# Config holds read-only mappings; pickle cannot copy them without this.
copyreg.pickle(types.MappingProxyType, lambda m: (_proxy, (dict(m),)))


class Channel:
    """Messages over one end of a socketpair, on the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self.sock)

    def send(self, *message: Any) -> None:
        if self._writer is None or self._writer.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(len(data).to_bytes(4, "big") + data)

    async def recv(self) -> tuple[Any, ...] | None:
        """The next message, or None once the other side is gone."""
        assert self._reader is not None
        try:
            size = int.from_bytes(await self._reader.readexactly(4), "big")
            return pickle.loads(await self._reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()


def child(wid: int, path: str, config: Config, generation: int, sockets: list[socket.socket],
          sock: socket.socket, loop: str) -> NoReturn:
    """Run worker ``wid`` in a just-forked child, then exit the process."""
    code = 70
    try:
        try:
            _inherited.append(asyncio.get_running_loop())
        except RuntimeError:
            pass
        asyncio.events._set_running_loop(None)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from main, validated
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _keep_only({0, 1, 2, sock.fileno(), *(s.fileno() for s in sockets)})
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
        logs.set_worker(wid)
        from .lifecycle import run_loop
        code = run_loop(loop, _serve(wid, path, config, generation, sockets, sock))
    except BaseException:
        try:
            logs.get().exception("worker failed", pid=os.getpid())
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def _keep_only(keep: set[int]) -> None:
    """Every other fd the fork copied is the main process's: the admin listener and its
    accepted connections (one a worker held open never saw its EOF), other workers'
    channels and sockets, the parent loop's epoll and self-pipe.  Each is pointed at
    /dev/null rather than closed: the main process's objects that own these numbers live
    on in this memory, and one closing "its" number after the number was reused would
    close a worker's socket."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc
        fds = list(range(3, os.sysconf("SC_OPEN_MAX")))
    for fd in fds:
        if fd in keep or fd == null:
            continue
        try:
            os.fstat(fd)  # (listdir's own fd is closed by now)
        except OSError:
            continue
        os.dup2(null, fd, inheritable=False)
    os.close(null)


async def _serve(wid: int, path: str, config: Config, generation: int,
                 sockets: list[socket.socket], sock: socket.socket) -> int:
    from .lifecycle import Daemon, tune_gc
    chan = Channel(sock)
    await chan.open()
    daemon = Daemon(path, config, sockets=sockets, worker=wid)
    if generation != daemon.app.generation:
        daemon.apply(config, generation)
    await daemon.start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_SIGNALS)
    chan.send("ready", daemon.app.generation)
    tune_gc()
    orders = asyncio.get_running_loop().create_task(_obey(chan, daemon))
    await daemon.stopping.wait()
    chan.send("draining")  # (SIGTERM sent to this worker alone: main replaces it now)
    gauges = asyncio.get_running_loop().create_task(_gauges_while_draining(daemon))
    await daemon.drain()
    gauges.cancel()
    orders.cancel()
    daemon.log.info("worker exit", code=0)
    return 0


async def _gauges_while_draining(daemon: Any) -> None:
    """A worker retired alone (``systemctl kill``) is no longer asked for its live gauges
    (its slot has its replacement's channel): it sets them itself while it drains, so a
    scrape never sums its last answer, or none, with the others'."""
    app = daemon.app
    while True:
        app.metrics.refresh(app.registry.pools(), len(app.active))
        await asyncio.sleep(0.5)


async def _obey(chan: Channel, daemon: Any) -> None:
    while True:
        msg = await chan.recv()
        if msg is None:  # the main process is gone: nobody supervises this worker
            daemon.log.warning("main process gone; draining")
            daemon.stopping.set()
            return
        if msg[0] == "config":
            if msg[1] > daemon.app.generation:  # (sent twice to a worker that was starting)
                tls.keep(msg[2].tls, msg[3])  # the pair the main process checked, not the files
                try:
                    daemon.apply(msg[2], msg[1])
                except Exception as exc:  # noqa: BLE001 - the loop must go on answering
                    # The running table stays; the main process rolls every worker back.
                    daemon.log.exception("config not applied; keeping the running one",
                                         generation=msg[1])
                    chan.send("swap_failed", msg[1], f"{type(exc).__name__}: {exc}"[:300])
                    continue
                daemon.log.info("config swapped", generation=msg[1])
            chan.send("swapped", msg[1])
        elif msg[0] == "ping":  # (``heartbeat``: this loop still turns)
            chan.send("pong")
        elif msg[0] == "snap":
            app = daemon.app
            app.metrics.refresh(app.registry.pools(), len(app.active))
            chan.send("snapped", msg[1])

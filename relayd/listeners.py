"""Listening sockets: bound once, never closed by a reload (a closed listening socket drops
the connections queued on it); with workers, one ``SO_REUSEPORT`` group the main process
binds a member of for each worker (``ListenGroup``)."""

from __future__ import annotations

import socket
from typing import Any

from .config import Listen


class ListenError(Exception):
    """A listener could not bind: says which config key named the address."""

    def __init__(self, key: str, address: object, exc: OSError) -> None:
        super().__init__(f"cannot listen on {address} ({key}): {exc.strerror or exc}")
        self.key, self.address, self.why = key, str(address), exc.strerror or str(exc)


def bind(listen: Listen, key: str) -> list[socket.socket]:
    """The listening sockets for one address, bound by the ``Daemon`` itself when it runs
    alone.  Never closed by a reload: a closed listening socket drops the connections
    queued on it."""
    try:
        infos = socket.getaddrinfo(listen.host or None, listen.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(key, listen, OSError(exc.errno, exc.strerror)) from None
    return _listeners(listen, key, [(f, k, p, a) for f, k, p, _, a in dict.fromkeys(infos)], False)


def _listeners(listen: Listen, key: str, addrs: list[tuple[Any, Any, int, Any]],
               reuseport: bool) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, addr in addrs:
            s = socket.socket(family, kind, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(1024)
            s.setblocking(False)
    except OSError as exc:
        for s in socks:
            s.close()
        raise ListenError(key, listen, exc) from None
    return socks


class ListenGroup:
    """The client listener with workers: one socket per worker per address, all in one
    ``SO_REUSEPORT`` group, so the kernel spreads new connections evenly over the workers.

    With one shared socket the worker that wakes first accepts every connection queued
    (libuv accepts until the queue is empty): 100 connections at once on 2 workers went
    100 to 0, every time, in the test that now guards this.  Bound by the main process; a worker inherits
    its own socket and closes the others'.  The address is first bound once without
    ``SO_REUSEPORT``, so a port another process holds (a second relayd included) is an
    error, not a silent share of its traffic.  A worker's socket is closed when the worker
    dies — nothing would accept on it — and a new one joins the group for its restart.
    """

    def __init__(self, listen: Listen, key: str) -> None:
        self.listen, self.key = listen, key
        probe = bind(listen, key)  # EADDRINUSE here if anyone listens on the address
        self.addrs = [(s.family, socket.SOCK_STREAM, s.proto, s.getsockname()) for s in probe]
        for s in probe:
            s.close()

    def member(self) -> list[socket.socket]:
        """A new set of sockets in the group (port 0 resolved to the probe's port)."""
        return _listeners(self.listen, self.key, self.addrs, True)

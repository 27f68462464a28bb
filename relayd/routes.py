"""The route table: longest-prefix match from a local path to upstream targets.

A table is built once per config generation and never changes; a request takes the
table current when it arrives and keeps it to the end, so a reload can never change
where a running request goes or which key it uses.  A request holds its table
(``enter``/``leave``) for its whole life, and a table holds its pools and its keys'
place in the log scrub: the pools of a generation stay open while anyone can still use
them.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import logs
from .config import Config, Route, Upstream
from .upstreams import Pool

if TYPE_CHECKING:
    from .clients import ClientTable

_SECRETS_LINGER = 10.0  # seconds a retired table's keys stay scrubbed


@dataclass(frozen=True)
class Target:
    """One upstream of a route, as the config of this generation describes it."""

    upstream: Upstream
    pool: Pool


@dataclass(frozen=True)
class Match:
    route: Route
    targets: tuple[Target, ...]
    rest: str  # the raw path to append to the upstream base path


class RouteTable:
    def __init__(self, config: Config, pools: dict[str, Pool], generation: int,
                 clients: "ClientTable") -> None:
        self.config = config
        self.generation = generation
        self.clients = clients  # who may use these routes: swapped with them
        self.users = 0          # requests holding this table
        self.current = True     # the table new requests get
        self._pools = tuple({id(p): p for p in pools.values()}.values())
        logs.hold_secrets(self, config.secrets)  # scrubbed from logs while the table lives
        for p in self._pools:
            p.ref()
        # Longest prefix first, so the first hit is the best one.
        self._routes = sorted(
            ((r, tuple(Target(config.upstreams[n], pools[n]) for n in r.upstreams))
             for r in config.routes),
            key=lambda rt: len(rt[0].path), reverse=True)

    def enter(self) -> None:
        self.users += 1

    def leave(self) -> None:
        self.users -= 1
        if not self.users and not self.current:
            self._retire()

    def supersede(self) -> None:
        """A newer table took over: let go of the pools once the last request left."""
        self.current = False
        if not self.users:
            self._retire()

    def _retire(self) -> None:
        # Its requests' access lines are written a loop turn or so after they end: the
        # table's keys stay scrubbed a while longer.
        try:
            asyncio.get_running_loop().call_later(_SECRETS_LINGER, logs.release_secrets, self)
        except RuntimeError:
            logs.release_secrets(self)
        pools, self._pools = self._pools, ()
        for p in pools:
            p.unref()

    def match(self, raw_path: str) -> Match | None:
        """Match on the raw (still percent-encoded) path, so what is forwarded is what came in."""
        for route, targets in self._routes:
            rest = _rest(route.path, raw_path)
            if rest is not None:
                return Match(route, targets, rest if route.strip_prefix else raw_path)
        return None


def _rest(prefix: str, raw_path: str) -> str | None:
    """What follows the route prefix in the path, or None if the path is not under it."""
    if prefix == "/":
        return raw_path
    if raw_path == prefix or raw_path.startswith(prefix + "/"):
        return raw_path[len(prefix):]
    return None


def under(prefix: str, raw_path: str) -> bool:
    return _rest(prefix, raw_path) is not None


def resolve(raw_path: str) -> str | None:
    """RFC 3986 §5.2.4 remove_dot_segments on the raw path, or None if it climbs above '/'.

    ``.`` and ``..`` count in their percent-encoded forms too (``%2e``, ``%2E``): an
    upstream that decodes before resolving would otherwise climb out of its base path.
    ``%2F`` stays part of its segment (not a separator) and every other byte is kept
    as it came, so the upstream sees the client's own encoding.
    """
    if "." not in raw_path and "%2" not in raw_path:
        return raw_path  # the usual path: nothing to resolve
    segments = raw_path.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        dots = seg.replace("%2e", ".").replace("%2E", ".")
        if dots == "..":
            if not out:
                return None
            out.pop()
        if dots in (".", ".."):
            if i == len(segments) - 1:
                out.append("")  # "/a/b/.." is "/a/", as the RFC says
            continue
        out.append(seg)
    return "/" + "/".join(out)


_SEPARATOR = re.compile(r"%2[fF]|%5[cC]|\\")


def separators_read(raw_path: str) -> str | None:
    """The path as an upstream reads it that decodes ``%2F`` and ``%5C`` (or takes ``\\``
    for ``/``) before it resolves dot segments, as nginx does: resolved, or None where that
    reading climbs above '/'.  The path itself when it has no such separator.

    relayd forwards the client's bytes, so ``/pub/..%2Fprivate/x`` goes out unresolved;
    an upstream of that kind (nginx in front of vLLM) serves ``/private/x`` under the
    route's key — past a client key scoped to ``/pub`` (review 74).  ``App.handle``
    refuses a path whose reading this way leaves its route."""
    if "%" not in raw_path and "\\" not in raw_path:
        return raw_path
    alt = _SEPARATOR.sub("/", raw_path)
    return raw_path if alt == raw_path else resolve(alt)


def split_target(raw_path: str) -> tuple[str, str, str]:
    """(path, "?" or "", query) of a request target: a fragment, which no client should
    send, is part of neither (not forwarded, and a "?" inside it is no query)."""
    return raw_path.partition("#")[0].partition("?")


def upstream_url(base: str, rest: str, query: str) -> str:
    """Join the upstream base path and the request's path without doubling or losing '/'."""
    base = base.rstrip("/")
    if rest and not rest.startswith("/"):
        rest = "/" + rest
    path = base + rest
    if not path.startswith("/"):
        path = "/" + path
    return f"{path}?{query}" if query else path

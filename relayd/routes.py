"""The route table: longest-prefix match from a local path to upstream targets.

A table is built once per config generation and never changes; a request takes the
table current when it arrives and keeps it to the end, so a reload can never change
where a running request goes or which key it uses.  A request holds its table
(``enter``/``leave``) for its whole life, and a table holds its pools: the pools of a
generation stay open while anyone can still use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, Route, Upstream
from .upstreams import Pool


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
    def __init__(self, config: Config, pools: dict[str, Pool], generation: int) -> None:
        self.config = config
        self.generation = generation
        self.users = 0          # requests holding this table
        self.current = True     # the table new requests get
        self._pools = tuple({id(p): p for p in pools.values()}.values())
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
        pools, self._pools = self._pools, ()
        for p in pools:
            p.unref()

    def match(self, raw_path: str) -> Match | None:
        """Match on the raw (still percent-encoded) path, so what is forwarded is what came in."""
        for route, targets in self._routes:
            p = route.path
            if p == "/":
                rest = raw_path
            elif raw_path == p or raw_path.startswith(p + "/"):
                rest = raw_path[len(p):]
            else:
                continue
            return Match(route, targets, rest if route.strip_prefix else raw_path)
        return None


def upstream_url(base: str, rest: str, query: str) -> str:
    """Join the upstream base path and the request's path without doubling or losing '/'."""
    base = base.rstrip("/")
    if rest and not rest.startswith("/"):
        rest = "/" + rest
    path = base + rest
    if not path.startswith("/"):
        path = "/" + path
    return f"{path}?{query}" if query else path

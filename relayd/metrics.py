"""Prometheus metrics (prometheus_client, on a private registry served by the admin listener).

With workers, prometheus_client's multiprocess mode: every process writes its values to
mmap'ed files in a private directory the main process made, and the main process's
admin listener serves their sum (``render_all``).  A gauge says how its processes'
values combine (``multiprocess_mode``); ``live*`` modes forget a worker that exited.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import disable_created_metrics, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.mmap_dict import MmapedDict

from .allow import GATES

if TYPE_CHECKING:
    from .exchange import Exchange
    from .upstreams import Pool

CONTENT_TYPE = CONTENT_TYPE_LATEST
# One process exposed a ``*_created`` sample per series that the sum over workers does not
# have: one exposition whatever ``workers`` says.
disable_created_metrics()
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_DURATION = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


_FIRST_SIZE = 1 << 16  # a new file's size (prometheus_client's own first size, 64 KiB)


class _Reserved(MmapedDict):
    """prometheus_client's file of values, with its space reserved before it is used.

    It grows its files by ``truncate`` (sparse) and writes through ``mmap``: on a full
    filesystem (the host's /tmp, under ``PrivateTmp``) the first write to a page with no
    space behind it is a SIGBUS, which killed a worker at its next new series, its
    replacements, and then the main process.  ``posix_fallocate`` first makes it an
    ``OSError`` where the file grows; the series is then not counted (``_child``).
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            with open(filename, "a+b") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    try:
                        os.posix_fallocate(f.fileno(), 0, _FIRST_SIZE)
                    except OSError:
                        os.remove(filename)  # an empty file would break every scrape
                        raise
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        n = len(key.encode("utf-8"))
        need = self._used + 4 + n + (8 - (n + 4) % 8) + 16  # the entry prometheus_client packs
        capacity = self._capacity
        while need > capacity:
            capacity *= 2
        if capacity != self._capacity:
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)


class _Uncounted:
    """Stands in for a series whose file could not grow: not counted, tried again later."""

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


_UNCOUNTED = _Uncounted()


def use_multiprocess(directory: str) -> None:
    """From now on, metrics created in this process and its children live in files under
    ``directory`` (prometheus_client reads the variable at import; it is set too late for
    that, so its value class is switched here, before any metric exists)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.MmapedDict = _Reserved  # type: ignore[attr-defined, misc]
    values.ValueClass = values.MultiProcessValue()


def process_gone(pid: int, directory: str) -> None:
    """A worker exited: its live gauges stop counting; its counters and histograms stay in
    the sums, added into one file for all exited workers.  Kept per process, a worker
    crash-looping every 10 s left 8,640 files a day, every one read at every scrape.

    The sum is written to a new file that replaces the old one in one rename, so a merge
    that fails part-way (no space) adds nothing twice: the worker's own file then stays,
    still counted.  A file that cannot be read (a worker killed while making it) is
    removed: it would break every scrape.  Runs in the SIGCHLD path: it never raises.
    """
    multiprocess.mark_process_dead(pid, directory)
    for kind in ("counter", "histogram"):
        dead = os.path.join(directory, f"{kind}_{pid}.db")
        merged = os.path.join(directory, f"{kind}_exited.db")
        scratch = merged[:-3] + ".merging"  # not *.db: the collector never reads it
        try:
            found = list(MmapedDict.read_all_values_from_file(dead))
        except FileNotFoundError:
            continue
        except Exception:
            _remove(dead)
            continue
        try:
            sums: dict[str, tuple[float, float]] = {}
            if os.path.exists(merged):
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(merged):
                    sums[key] = (value, timestamp)
            for key, value, timestamp, _ in found:
                sums[key] = (sums.get(key, (0.0, 0.0))[0] + value, timestamp)
            _remove(scratch)
            out = _Reserved(scratch)
            try:
                for key, (value, timestamp) in sums.items():
                    out.write_value(key, value, timestamp)
            finally:
                out.close()
            os.replace(scratch, merged)
        except Exception:
            _remove(scratch)
            continue  # the worker's own file stays, still counted
        _remove(dead)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def make() -> "Metrics":
    """This process's metrics.  With workers their values live in the shared files; when
    those cannot be made (no space under the metrics directory) the process keeps its
    values to itself rather than fail to start: its counts are missing from ``/metrics``
    (a warning says so), its requests are served."""
    try:
        return Metrics()
    except OSError as exc:
        from . import logs  # (logs imports nothing of relayd's)
        logs.get().warning("metrics not shared: this process's counts are missing from /metrics",
                           error=exc.strerror or str(exc))
    shared = values.ValueClass
    values.ValueClass = values.MutexValue  # for this object's series only: the workers
    try:                                   # forked later, and its own new series, try the files
        return Metrics()
    finally:
        values.ValueClass = shared


def render_all(directory: str) -> bytes:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return generate_latest(registry)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # client: a configured client's name, or "none" (no clients: section, or no valid key)
        self.requests = Counter("relayd_requests_total",
                                "Requests by route, upstream, status and client",
                                ["route", "upstream", "status", "client"], registry=r)
        self.active = Gauge("relayd_active_streams", "Responses being streamed now", ["route"],
                            registry=r, multiprocess_mode="livesum")
        self.ttfb = Histogram("relayd_ttfb_seconds", "Time to upstream response headers",
                              ["route"], buckets=_LATENCY, registry=r)
        self.duration = Histogram("relayd_stream_duration_seconds", "Request duration, start to end",
                                  ["route"], buckets=_DURATION, registry=r)
        self.stream_end = Counter("relayd_stream_end_total", "Requests by end reason",
                                  ["route", "reason"], registry=r)
        self.injected = Counter("relayd_injected_errors_total", "Error events injected into streams",
                                ["route", "reason"], registry=r)
        self.heartbeats = Counter("relayd_heartbeats_total", "SSE keep-alive comments sent",
                                  registry=r)
        self.bytes = Counter("relayd_bytes_total", "Body bytes relayed", ["route", "direction"],
                             registry=r)
        self.attempts = Counter("relayd_upstream_attempts_total", "Upstream attempts by outcome",
                                ["upstream", "outcome"], registry=r)
        self.breaker = Gauge("relayd_breaker_open", "1 while an upstream's circuit breaker is open (in any worker)",
                             ["upstream"], registry=r, multiprocess_mode="livemax")
        self.inflight = Gauge("relayd_upstream_inflight", "Requests holding an upstream's pool now",
                              ["upstream"], registry=r, multiprocess_mode="livesum")
        self.waiting = Gauge("relayd_upstream_waiting",
                             "Requests waiting for a free connection to an upstream", ["upstream"],
                             registry=r, multiprocess_mode="livesum")
        self.requests_active = Gauge("relayd_requests_active",
                                     "Requests being handled now, in any phase", registry=r,
                                     multiprocess_mode="livesum")
        self.reloads = Counter("relayd_reloads_total", "Config reloads by result", ["result"],
                               registry=r)
        self.generation = Gauge("relayd_config_generation",
                                "Generation of the config in use (by every worker)",
                                registry=r, multiprocess_mode="livemin")
        self.tokens = Counter("relayd_tokens_total", "Tokens reported by providers",
                              ["route", "kind"], registry=r)
        self.client_tokens = Counter("relayd_client_tokens_total",
                                     "Tokens reported by providers, by configured client",
                                     ["client", "kind"], registry=r)
        self.refused = Counter("relayd_refused_connections",
                               "Connections closed at accept: peer not in the listener's allow list",
                               ["listener"], registry=r)
        for name, gate in GATES.items():  # the gates run before any request exists
            gate.counter = self.refused.labels(name)

        self._children: dict[tuple[object, ...], Any] = {}
        self._gauged: set[str] = set()  # upstreams whose pool gauges were last set
        self._ended: dict[tuple[object, ...], tuple[Any, ...]] = {}
        # Counter increments and stream counts wait here and go to prometheus_client in
        # one pass (``flush``): before every scrape (``refresh``: the admin listener, or
        # a worker's "snap"), at most FLUSH_EVERY seconds after they happened (a worker
        # that dies loses no more than that), and at once while draining (``eager``).
        # A prometheus_client increment costs a lock, checks and, with workers, an mmap
        # write; about nine of them per request were 3 to 5 % of a small request's CPU.
        self._pending: dict[Any, float] = {}
        self._streams: dict[str, int] = {}  # route -> responses being streamed now
        self._flush_timer: asyncio.TimerHandle | None = None
        self.eager = False

    FLUSH_EVERY = 1.0

    def _child(self, metric: Any, *labels: str) -> Any:
        """prometheus_client's labels() hashes and locks on every call; label sets repeat."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            try:
                child = metric.labels(*labels)
            except OSError:  # its file could not grow (_Reserved): tried again next time
                return _UNCOUNTED
            self._children[key] = child
        return child

    def reloaded(self, result: str) -> None:
        self._child(self.reloads, result).inc()

    def _count(self, child: Any, amount: float = 1) -> None:
        pending = self._pending
        pending[child] = pending.get(child, 0) + amount

    def _counted(self) -> None:
        """After a request's counts: flush now (draining) or make sure a flush will come."""
        if self.eager:
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(self.FLUSH_EVERY,
                                                                      self.flush)

    def flush(self) -> None:
        """Hand every waiting increment and stream count to prometheus_client."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        pending, self._pending = self._pending, {}
        for child, amount in pending.items():
            child.inc(amount)
        for route, n in self._streams.items():
            self._child(self.active, route).set(n)

    def attempt(self, upstream: str, outcome: str) -> None:
        self._count(self._child(self.attempts, upstream, outcome))

    def stream_started(self, route: str) -> None:
        self._streams[route] = self._streams.get(route, 0) + 1

    def stream_ended(self, route: str) -> None:
        self._streams[route] -= 1

    def finished(self, ex: Exchange) -> None:
        client = ex.client_name
        # One lookup for the children every request touches: per label set, the same ones
        # each time (a request's labels repeat; building each child's key costs more than
        # the increment).  The ttfb child is created only for requests that had one, as it
        # always was: a series must not appear for requests that never reached an upstream.
        key = (ex.route, ex.upstream, ex.status, client, ex.end, ex.ttfb is not None)
        b = self._ended.get(key)
        if b is None:
            b = self._ended_children(ex)
            if _UNCOUNTED not in b:
                self._ended[key] = b
        requests, end, ttfb, duration, bytes_in, bytes_out = b
        count = self._count
        count(requests)
        count(end)
        if ttfb is not None:
            ttfb.observe(ex.ttfb)
        duration.observe(ex.duration)
        if ex.injected:
            count(self._child(self.injected, ex.route or "none", str(ex.injected)))
        if ex.heartbeats:
            count(self.heartbeats, ex.heartbeats)
        count(bytes_in, ex.bytes_in)
        count(bytes_out, ex.bytes_out)
        usage = ex.usage
        if usage is not None:
            c = self._child
            route = ex.route or "none"
            if usage.input:
                count(c(self.tokens, route, "input"), usage.input)
            if usage.output:
                count(c(self.tokens, route, "output"), usage.output)
            if client is not None:
                if usage.input:
                    count(c(self.client_tokens, client, "input"), usage.input)
                if usage.output:
                    count(c(self.client_tokens, client, "output"), usage.output)
        self._counted()

    def _ended_children(self, ex: Exchange) -> tuple[Any, ...]:
        route = ex.route or "none"
        c = self._child
        return (c(self.requests, route, ex.upstream or "none", str(ex.status),
                  ex.client_name or "none"),
                c(self.stream_end, route, str(ex.end)),
                c(self.ttfb, route) if ex.ttfb is not None else None,
                c(self.duration, route),
                c(self.bytes, route, "in"),
                c(self.bytes, route, "out"))

    def render(self, pools: Iterable[Pool], active: int) -> bytes:
        self.refresh(pools, active)
        return generate_latest(self.registry)

    def refresh(self, pools: Iterable[Pool], active: int) -> None:
        """Gauges read from live state, set when someone asks for metrics (not per request);
        the waiting counts go out first."""
        self.flush()
        self.requests_active.set(active)
        inflight: dict[str, int] = {}
        waiting: dict[str, int] = {}
        for p in pools:  # a retired pool counts with the current one of its name
            name = p.upstream.name
            inflight[name] = inflight.get(name, 0) + p.inflight
            waiting[name] = waiting.get(name, 0) + p.waiting
            if not p.retired:
                self._child(self.breaker, name).set(1 if p.breaker_open else 0)
        # An upstream a reload removed reads 0 once its last request is over (a removed
        # child would live on in the multiprocess files at its last value).
        for name in self._gauged - inflight.keys():
            for g in (self.breaker, self.inflight, self.waiting):
                self._child(g, name).set(0)
        self._gauged = set(inflight)
        for name, n in inflight.items():
            self._child(self.inflight, name).set(n)
            self._child(self.waiting, name).set(waiting[name])

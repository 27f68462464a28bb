"""Prometheus metrics (prometheus_client, on a private registry served by the admin listener)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .server import GATES

if TYPE_CHECKING:
    from .exchange import Exchange
    from .upstreams import Pool

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_DURATION = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # client: a configured client's name, or "none" (no clients: section, or no valid key)
        self.requests = Counter("relayd_requests_total",
                                "Requests by route, upstream, status and client",
                                ["route", "upstream", "status", "client"], registry=r)
        self.active = Gauge("relayd_active_streams", "Responses being streamed now", ["route"],
                            registry=r)
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
        self.breaker = Gauge("relayd_breaker_open", "1 while an upstream's circuit breaker is open",
                             ["upstream"], registry=r)
        self.inflight = Gauge("relayd_upstream_inflight", "Requests holding an upstream's pool now",
                              ["upstream"], registry=r)
        self.waiting = Gauge("relayd_upstream_waiting",
                             "Requests waiting for a free connection to an upstream", ["upstream"],
                             registry=r)
        self.requests_active = Gauge("relayd_requests_active",
                                     "Requests being handled now, in any phase", registry=r)
        self.reloads = Counter("relayd_reloads_total", "Config reloads by result", ["result"],
                               registry=r)
        self.generation = Gauge("relayd_config_generation", "Generation of the config in use",
                                registry=r)
        self.tokens = Counter("relayd_tokens_total", "Tokens reported by providers",
                              ["route", "kind"], registry=r)
        self.client_tokens = Counter("relayd_client_tokens_total",
                                     "Tokens reported by providers, by configured client",
                                     ["client", "kind"], registry=r)
        r.register(_Refused())

        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """prometheus_client's labels() hashes and locks on every call; label sets repeat."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def attempt(self, upstream: str, outcome: str) -> None:
        self._child(self.attempts, upstream, outcome).inc()

    def stream_started(self, route: str) -> None:
        self._child(self.active, route).inc()

    def stream_ended(self, route: str) -> None:
        self._child(self.active, route).dec()

    def finished(self, ex: Exchange) -> None:
        route = ex.route or "none"
        c = self._child
        client = ex.client_name
        c(self.requests, route, ex.upstream or "none", str(ex.status), client or "none").inc()
        c(self.stream_end, route, str(ex.end)).inc()
        if ex.ttfb is not None:
            c(self.ttfb, route).observe(ex.ttfb)
        c(self.duration, route).observe(ex.duration)
        if ex.injected:
            c(self.injected, route, str(ex.injected)).inc()
        if ex.heartbeats:
            self.heartbeats.inc(ex.heartbeats)
        c(self.bytes, route, "in").inc(ex.bytes_in)
        c(self.bytes, route, "out").inc(ex.bytes_out)
        usage = ex.usage
        if usage is not None:
            if usage.input:
                c(self.tokens, route, "input").inc(usage.input)
            if usage.output:
                c(self.tokens, route, "output").inc(usage.output)
            if client is not None:
                if usage.input:
                    c(self.client_tokens, client, "input").inc(usage.input)
                if usage.output:
                    c(self.client_tokens, client, "output").inc(usage.output)

    def render(self, pools: Iterable[Pool], active: int) -> bytes:
        self.requests_active.set(active)
        for p in pools:
            self._child(self.breaker, p.upstream.name).set(1 if p.breaker_open else 0)
            self._child(self.inflight, p.upstream.name).set(p.inflight)
            self._child(self.waiting, p.upstream.name).set(p.waiting)
        return generate_latest(self.registry)


class _Refused(Collector):
    """Connections closed at accept because the peer is outside ``allow``/``admin_allow``.
    The gates count them (they run before any request exists); this reads their totals."""

    def collect(self) -> Iterable[CounterMetricFamily]:
        fam = CounterMetricFamily("relayd_refused_connections",
                                  "Connections closed at accept: peer not in the listener's allow list",
                                  labels=["listener"])
        for gate in GATES.values():
            fam.add_metric([gate.listener], gate.total)
        yield fam

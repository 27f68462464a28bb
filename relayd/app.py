"""App wiring: the request entry point, the admin endpoints, and the one swappable reference.

``App.table`` is the only thing a reload changes.  ``handle`` reads it once per request,
so a request finishes on the table (routes, keys, pools) it started with.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from aiohttp import web

from . import logs
from .config import Config
from .metrics import CONTENT_TYPE, Metrics
from .pipe import Exchange, relay
from .providers import not_found_body
from .routes import RouteTable
from .upstreams import PoolRegistry

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is safe to echo and log, else a fresh one."""
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return secrets.token_hex(16)


class App:
    def __init__(self, config: Config) -> None:
        self.log = logs.get()
        self.metrics = Metrics()
        self.registry = PoolRegistry()
        self.active: set[Exchange] = set()
        self.draining = False
        self.generation = 0
        self.table: RouteTable = self.install(config)

    @property
    def config(self) -> Config:
        return self.table.config

    def install(self, config: Config) -> RouteTable:
        """Build the table for a new config and make it current (one reference swap)."""
        pools = self.registry.build(config.upstreams.values())
        self.generation += 1
        table = RouteTable(config, pools, self.generation)
        logs.set_secrets(u.api_key for u in config.upstreams.values())
        self.table = table
        self.metrics.generation.set(self.generation)
        return table

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        table = self.table
        raw = request.raw_path
        if not raw.startswith("/"):  # absolute-form request target
            raw = request.rel_url.raw_path_qs
        path = raw.partition("?")[0]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ex = Exchange(request_id(request.headers.get("X-Request-Id")), request.method, path,
                      peer[0] if peer else None)
        self.active.add(ex)
        try:
            match = table.match(path)
            if match is None:
                ex.status, ex.end_reason = 404, "done"
                return web.Response(status=404, body=not_found_body(path),
                                    content_type="application/json",
                                    headers={"X-Request-Id": ex.request_id})
            resp = await relay(request, match, ex, self.metrics, self.log)
            if self.draining:
                resp.force_close()
            return resp
        except asyncio.CancelledError:
            ex.end_reason = "client_gone"
            raise
        except ConnectionError:
            ex.end_reason = "client_gone"
            raise
        except Exception:
            self.log.exception("internal error", request_id=ex.request_id)
            ex.status, ex.end_reason = 500, "error"
            return web.Response(status=500, content_type="application/json",
                                body=b'{"error":{"message":"relayd internal error","type":"server_error","param":null,"code":null}}')
        finally:
            self.active.discard(ex)
            self.metrics.finished(ex)
            if table.config.access_log:
                self._access(ex)

    def _access(self, ex: Exchange) -> None:
        self.log.info(
            "access", request_id=ex.request_id, method=ex.method, path=ex.path, route=ex.route,
            upstream=ex.upstream, attempts=ex.attempts, status=ex.status, end_reason=ex.end_reason,
            ttfb_ms=round(ex.ttfb * 1000, 1) if ex.ttfb is not None else None,
            duration_ms=round(ex.duration * 1000, 1), bytes_in=ex.bytes_in, bytes_out=ex.bytes_out,
            events=ex.events, heartbeats=ex.heartbeats, injected_error=ex.injected,
            client=ex.client, usage=ex.usage.as_log() if ex.usage else None)

    # -- admin listener

    def admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ready", "generation": self.generation})

    async def _metrics(self, _: web.Request) -> web.Response:
        body = self.metrics.render(self.registry.pools())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def status_line(self) -> str:
        streams = sum(1 for e in self.active if e.streaming)
        return f"config generation {self.generation}; {streams} active streams"

    def stop_streams(self, reason: str) -> int:
        n = 0
        for ex in list(self.active):
            ex.stop(reason)
            n += 1
        return n

"""The admin listener of the main process with workers: /healthz answers from the main
process, /readyz is 200 only while every worker serves, /metrics sums all processes
(``metrics.render_all``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import metrics
from .allow import AdminRunner
from .listeners import ListenError
from .metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from .supervisor import Supervisor


async def start(sup: Supervisor) -> AdminRunner:
    app = web.Application()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", lambda _: _readyz(sup))
    app.router.add_get("/metrics", lambda _: _metrics(sup))
    admin = AdminRunner(app, lambda: sup.config.admin_allow, lambda: sup.config.limits)
    await admin.setup()
    listen = sup.config.admin_listen
    assert listen is not None
    try:
        await web.TCPSite(admin, listen.host, listen.port, reuse_address=True).start()
    except OSError as exc:
        await admin.cleanup()
        raise ListenError("admin_listen", listen, exc) from None
    return admin


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(sup: Supervisor) -> web.Response:
    body: dict[str, Any] = {"generation": sup.generation, "workers": len(sup.slots),
                            "workers_serving": sup.n_serving}
    if sup.draining:
        return web.json_response({"status": "draining", **body}, status=503)
    if not sup.serving:
        return web.json_response({"status": "starting", **body}, status=503)
    return web.json_response({"status": "ready", **body})


_snaps = 0


async def _metrics(sup: Supervisor) -> web.Response:
    """Workers set their live gauges (pools, breakers) first, then everything is summed."""
    global _snaps
    _snaps += 1
    n = _snaps
    live = [s for s in sup.slots if sup.serves(s)]
    for slot in live:
        assert slot.chan is not None
        slot.chan.send("snap", n)
    await sup.until(lambda: all(s.snapped >= n for s in live if sup.serves(s)), 1.0)
    body = metrics.render_all(sup.dir)  # no executor thread: this process forks
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

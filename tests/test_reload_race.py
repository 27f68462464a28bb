"""A reload never pulls a pool from under a request that started on the old table.

A request holds its route table (and so every pool of that generation) from the moment
it reads it until it ends, whatever it is doing in between: reading a slow upload, or
waiting for a first failover attempt.
"""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
from aiohttp import web

from fakes import free_port
from test_operations import wait_for, wait_metric


def failover_config(port: int, admin: int, a_url: str, b_url: str, a_conns: int = 10,
                    b_conns: int = 10) -> str:
    return f"""
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
defaults:
  timeouts: {{connect: 2, first_byte: 10, idle: 5, total: 30}}
upstreams:
  a: {{url: "{a_url}", provider: anthropic, max_connections: {a_conns}}}
  b: {{url: "{b_url}", provider: anthropic, max_connections: {b_conns}}}
routes:
  - {{path: /fo, upstream: [a, b]}}
"""


def reloads(r) -> int:
    return sum(1 for l in r.logs() if l.get("event") == "reload ok")


async def test_reload_during_slow_upload_keeps_the_request(fake, make_relayd):
    """The issue's reproduction: body arrives late, a SIGHUP retires the first pool meanwhile."""
    port, admin = free_port(), free_port()
    r = make_relayd(failover_config(port, admin, fake.url, fake.url))
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": []}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /fo/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    await writer.drain()
    assert await wait_metric(admin, "relayd_requests_active", 1) == 1  # relayd is reading the body
    r.config.write_text(failover_config(port, admin, fake.url, fake.url, a_conns=11))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: reloads(r) == 1)
    writer.write(body)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    line = r.wait_access(1)[-1]
    assert line["status"] == 200 and line["end_reason"] == "done" and line["bytes_in"] == len(body)
    # the old generation's retired pool closes once that request let go of it
    assert await wait_metric(admin, "relayd_requests_active", 0) == 0


async def test_failover_target_retired_during_first_attempt(fake, make_relayd):
    """The second upstream's pool is retired while the first attempt is still in flight."""
    first_seen = asyncio.Event()

    async def slow_overloaded(request: web.BaseRequest) -> web.Response:
        await request.read()
        first_seen.set()
        await asyncio.sleep(1.0)
        return web.json_response({"type": "error", "error": {"type": "overloaded_error",
                                                            "message": "busy"}}, status=529)

    server = web.Server(slow_overloaded)
    srv = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    a_url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    port, admin = free_port(), free_port()
    r = make_relayd(failover_config(port, admin, a_url, fake.url))
    try:
        async with aiohttp.ClientSession() as s:
            task = asyncio.ensure_future(s.post(f"http://127.0.0.1:{port}/fo/v1/echo", json={"x": 1}))
            await asyncio.wait_for(first_seen.wait(), 5)
            r.config.write_text(failover_config(port, admin, a_url, fake.url, b_conns=12))
            r.signal(signal.SIGHUP)
            assert wait_for(lambda: reloads(r) == 1)
            resp = await asyncio.wait_for(task, 10)
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["raw_path"] == "/v1/echo"
            resp.release()
        line = r.wait_access(1)[-1]
        assert line["attempts"] == 2 and line["upstream"] == "b" and line["status"] == 200
    finally:
        srv.close()
        await server.shutdown(0.1)


async def test_internal_error_uses_the_routes_provider_format(fake, monkeypatch):
    """relayd's own 500 speaks the route's provider format (here Anthropic), not OpenAI's.

    An internal error is a bug, so there is no honest way to provoke one from outside:
    this test breaks the after-commit phase on purpose, in process.
    """
    from relayd import app as app_mod
    from relayd import config as cfg

    def broken(*args, **kwargs):
        raise RuntimeError("boom: secret internals")

    monkeypatch.setattr(app_mod, "Stream", broken)
    port = free_port()
    c = cfg.parse(failover_config(port, free_port(), fake.url, fake.url), "t.yaml", {})
    app = app_mod.App(c)
    server = web.Server(app.handle, handler_cancellation=True)
    srv = await asyncio.get_running_loop().create_server(server, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/fo/v1/echo", json={}) as resp:
                assert resp.status == 500
                body = await resp.json()
                rid = resp.headers["X-Request-Id"]
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
        assert body["error"]["message"] == f"relayd internal error (request id {rid})"
        assert all(p.inflight == 0 for p in app.registry.pools())  # the slot came back
    finally:
        srv.close()
        await server.shutdown(0.1)
        await app.registry.close()

"""The egress proxy (`upstreams.NAME.proxy`): a raw asyncio HTTP proxy on 127.0.0.1 that
tunnels CONNECT to a local TLS upstream, or refuses it, or never answers it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from fakes import free_port, splice
from test_operations import get_metrics, metric
from test_tls import https_site, make_cert, pytestmark  # noqa: F401  (needs the openssl CLI)


class Proxy:
    """CONNECT host:port → 200 and a byte tunnel, or a refusal (the status given as the
    mode), or an answer that is not HTTP (`garbage`), or none (`stall`)."""

    def __init__(self, mode: str = "tunnel") -> None:
        self.mode = mode
        self.connects: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "Proxy":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for t in self._tasks:
            t.cancel()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.connects.append(head)
            if self.mode == "stall":
                await asyncio.sleep(30)
                return
            if self.mode == "garbage":
                writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                await writer.drain()
                return
            if self.mode != "tunnel":
                writer.write(b"HTTP/1.1 %s Refused\r\nProxy-Authenticate: Basic realm=x\r\n"
                             b"Content-Length: 0\r\n\r\n" % self.mode.encode())
                await writer.drain()
                return
            host, _, port = head.split(b" ")[1].decode().rpartition(":")
            up_r, up_w = await asyncio.open_connection("127.0.0.1", int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await splice(reader, writer, up_r, up_w)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def _tls_upstream(tmp_path: Path) -> tuple[web.AppRunner, int, Path]:
    cert, key = make_cert(tmp_path / "up", "upstream", 21)

    async def answer(req: web.Request) -> web.StreamResponse:
        await req.read()
        if req.path.endswith("/stream"):
            r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await r.prepare(req)
            for i in range(3):
                await r.write(b'data: {"n":%d}\n\n' % i)
            await r.write(b"data: [DONE]\n\n")
            return r
        return web.json_response({"path": req.path, "auth": req.headers.get("Authorization")})

    port = free_port()
    return await https_site((cert, key), port, answer), port, cert


async def test_https_upstream_through_a_connect_tunnel(make_relayd, tmp_path):
    runner, up, cert = await _tls_upstream(tmp_path)
    try:
        async with Proxy() as proxy:
            port = free_port()
            make_relayd(f"""listen: 127.0.0.1:{port}
upstreams:
  u: {{url: "https://127.0.0.1:{up}/v1", provider: openai, api_key: sk-proxy-KEY, proxy: "{proxy.url}",
       tls: {{ca_file: {cert}}}}}
routes:
  - {{path: /u, upstream: u}}
""")
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{port}/u/chat", data=b"{}",
                                  headers={"Authorization": "Bearer client"}) as r:
                    assert r.status == 200, await r.text()
                    assert await r.json() == {"path": "/v1/chat", "auth": "Bearer sk-proxy-KEY"}
                async with s.get(f"http://127.0.0.1:{port}/u/stream") as r:
                    assert await r.read() == b'data: {"n":0}\n\ndata: {"n":1}\n\ndata: {"n":2}\n\ndata: [DONE]\n\n'
            assert proxy.connects and proxy.connects[0].startswith(b"CONNECT 127.0.0.1:%d HTTP/1.1" % up)
            assert not any(b"sk-proxy-KEY" in c for c in proxy.connects)  # the key stays inside the tunnel
            # and relayd adds no header of its own (aiohttp's User-Agent named the library)
            names = {l.split(b":")[0].lower() for l in proxy.connects[0].split(b"\r\n")[1:] if l}
            assert names == {b"host"}, proxy.connects[0]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("mode", ["407", "403", "502", "garbage", "stall"])
async def test_a_proxy_that_refuses_or_stalls_connect_fails_over(make_relayd, tmp_path, mode):
    """A refused CONNECT was taken for the upstream's own answer (no failover: "the
    upstream acted"); the upstream never got the request.  A CONNECT left unanswered held
    the attempt for the whole ``first_byte``, not ``connect``."""
    runner, up, cert = await _tls_upstream(tmp_path)
    try:
        async with Proxy(mode) as proxy:
            port, admin = free_port(), free_port()
            r = make_relayd(f"""listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
workers: 1
defaults: {{timeouts: {{connect: 1, first_byte: 20}}}}
upstreams:
  via: {{url: "https://127.0.0.1:{up}", provider: anthropic, proxy: "{proxy.url}", tls: {{ca_file: {cert}}}}}
  direct: {{url: "https://127.0.0.1:{up}", provider: anthropic, tls: {{ca_file: {cert}}}}}
routes:
  - {{path: /one, upstream: via}}
  - {{path: /two, upstream: [via, direct]}}
""")
            async with aiohttp.ClientSession() as s:
                t0 = time.monotonic()
                async with s.post(f"http://127.0.0.1:{port}/two/v1/messages", data=b"{}") as resp:
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["path"] == "/v1/messages"
                assert time.monotonic() - t0 < 5  # connect (1 s), not first_byte (20 s)
                async with s.post(f"http://127.0.0.1:{port}/one/v1/messages", data=b"{}") as resp:
                    body = await resp.json()
                    assert resp.status == (504 if mode == "stall" else 502), body
                    assert body["type"] == "error"  # the provider's format, not the proxy's answer
            failed = [l for l in r.logs() if l.get("event") == "upstream attempt failed"]
            assert failed and all(l["upstream"] == "via" for l in failed)
            if mode == "garbage":
                assert "the proxy's answer to CONNECT was not HTTP" in failed[0]["cause"], failed
            elif mode != "stall":
                assert f"the proxy answered CONNECT with {mode}" in failed[0]["cause"], failed
            m = await get_metrics(admin)
            assert metric(m, "relayd_upstream_attempts_total", upstream="direct", outcome="ok") == 1
    finally:
        await runner.cleanup()

"""The floor for small requests: CPU per request of two servers that proxy nothing, beside
relayd and nginx, on scenario 4 (64 keep-alive clients, small JSON POSTs), in one run.

- ``aiohttp server``: aiohttp's low-level server (``web.Server``, the one relayd runs on)
  with a handler that reads the body and returns a fixed JSON answer: no upstream, no
  routing, no logs or metrics.  What it costs is the least relayd can cost per request
  while aiohttp parses its requests and writes its responses.
- ``raw protocol``: a bare uvloop ``asyncio.Protocol`` that finds the end of each request
  and writes a fixed answer: the event loop and the two syscalls, in Python.

Issue 10 asks for at most 60 µs per proxied request; compare the first line with it.
Usage: python bench/jsonfloor.py (about 1 minute).  Each server runs pinned to core 1,
the load and the fake upstream to core 0, like ``make bench``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import client  # noqa: E402
import procs  # noqa: E402
from client import Target  # noqa: E402

ANSWER = (b'{"id":"chatcmpl-floor","object":"chat.completion","choices":[{"index":0,"message":'
          b'{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}')


def serve(kind: str, port: int) -> None:
    import uvloop
    from aiohttp import web

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "aiohttp":
            async def handler(request: web.BaseRequest) -> web.Response:
                await request.read()
                return web.Response(body=ANSWER, content_type="application/json")

            await loop.create_server(web.Server(handler, access_log=None), "127.0.0.1", port)
        else:
            reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(ANSWER)) + ANSWER

            class Raw(asyncio.Protocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    self.tr, self.buf = transport, b""

                def data_received(self, data: bytes) -> None:
                    self.buf += data
                    while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                        head = self.buf[:end].lower()
                        at = head.find(b"content-length:")
                        size = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
                        if len(self.buf) < end + 4 + size:
                            return
                        self.buf = self.buf[end + 4 + size:]
                        self.tr.write(reply)  # type: ignore[attr-defined]

            await loop.create_server(Raw, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


async def main(rounds: int = 3) -> None:
    ps, up = procs.harness("relayd-jsonfloor-")
    rp, np_, ap, wp = (procs.free_port() for _ in range(4))
    me = [sys.executable, str(Path(__file__).resolve())]
    targets = {
        "relayd": (Target("relayd", rp, "/v1"), ps.relayd("relayd", rp, up, access_log=False).pid),
        "nginx": (Target("nginx", np_, "/v1"), ps.nginx(procs.ensure_nginx(), np_, up).pid),
        "aiohttp server": (Target("aiohttp", ap, ""),
                           ps.spawn(procs.pin(1) + me + ["serve", "aiohttp", str(ap)], "aiohttp.log", ap).pid),
        "raw protocol": (Target("raw", wp, ""),
                         ps.spawn(procs.pin(1) + me + ["serve", "raw", str(wp)], "raw.log", wp).pid),
    }
    try:
        for t, _ in targets.values():
            await client.small_json(t, 8, 500, 5)
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (t, pid) in targets.items():
                c0 = procs.cpu_seconds(pid)
                n, _, _ = await client.small_json(t, 64, 10000, 6)
                cpu[name].append((procs.cpu_seconds(pid) - c0) / n * 1e6)
        print(f"CPU per request, 64 keep-alive clients, median of {rounds} rounds:")
        for name, values in cpu.items():
            print(f"  {name:15s} {statistics.median(values):7.1f} µs   ({', '.join(f'{v:.0f}' for v in values)})")
    finally:
        ps.stop_all()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        asyncio.run(main())

"""Benchmark upstream: an OpenAI-style SSE stream of N events, each its own write.

GET /stream?n=1000&size=200  -> N chat-completion chunks + [DONE], no pacing
GET /stream?n=200&delay_ms=10 -> the same, paced like a model generating ~100 tokens/s
GET /json                    -> a small JSON completion with usage
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


def event(i: int, size: int) -> bytes:
    pad = "x" * max(0, size - 120)
    return (f'data: {{"id":"chatcmpl-bench","object":"chat.completion.chunk","choices":[{{"index":0,'
            f'"delta":{{"content":"{pad}{i}"}},"finish_reason":null}}]}}\n\n').encode()


async def stream(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "1000"))
    size = int(request.query.get("size", "200"))
    delay = float(request.query.get("delay_ms", "0")) / 1000
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(n):
        if delay:
            await asyncio.sleep(delay)
        await resp.write(event(i, size))
    await resp.write(b'data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":%d}}\n\ndata: [DONE]\n\n' % n)
    return resp


async def small(request: web.Request) -> web.Response:
    return web.Response(body=b'{"id":"c","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}',
                        content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/json", small)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()

"""``python -m relayd.demo``: relayd in front of a fake provider, so anyone can watch a stream.

Trying a streaming proxy normally needs an account, a key and the network.  This module
bundles a stand-in provider on 127.0.0.1 that speaks the two wire formats most clients
use (OpenAI chat-completions SSE and Anthropic messages SSE), paces its tokens ~50 ms
apart so a person sees them arrive one by one, and accepts any key or none.  It then
runs a real ``relayd run`` on ``config/demo.yaml`` in front of it and prints commands to
try.  Ctrl-C drains relayd first (in-flight streams finish against the provider that is
still up), then stops the provider.

Ports come from the environment so tests and busy machines can move them:
``RELAYD_DEMO_PORT`` (relayd, 8080), ``RELAYD_DEMO_ADMIN_PORT`` (9090),
``RELAYD_DEMO_PROVIDER_PORT`` (8089); ``RELAYD_DEMO_DELAY`` is the token pacing in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

TEXT = ("relayd passes every token through the moment the provider sends it: "
        "no buffering, no waiting for the end of the answer.")
DEFAULTS = {"RELAYD_DEMO_PORT": "8080", "RELAYD_DEMO_ADMIN_PORT": "9090",
            "RELAYD_DEMO_PROVIDER_PORT": "8089", "RELAYD_DEMO_DELAY": "0.05"}


def tokens(text: str = TEXT) -> list[str]:
    """Words with their leading space, the way real tokenizers cut English text."""
    out: list[str] = []
    for i, word in enumerate(text.split(" ")):
        out.append(word if i == 0 else " " + word)
    return out


def _sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


def openai_events(model: str, usage: bool) -> list[bytes]:
    """A chat-completions stream as OpenAI sends it: role chunk, content chunks, finish, [DONE]."""
    head = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_relayd_demo"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}]})

    toks = tokens()
    out = [chunk({"role": "assistant", "content": "", "refusal": None})]
    out += [chunk({"content": t}) for t in toks]
    out.append(chunk({}, "stop"))
    if usage:
        out.append(_sse({**head, "choices": [], "usage": {
            "prompt_tokens": 9, "completion_tokens": len(toks), "total_tokens": 9 + len(toks)}}))
    out.append(_sse("[DONE]"))
    return out


def anthropic_events(model: str) -> list[bytes]:
    """A messages stream as Anthropic sends it: message_start ... message_stop."""
    toks = tokens()
    message = {"id": "msg_demo", "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 9, "output_tokens": 1}}
    out = [_sse({"type": "message_start", "message": message}, "message_start"),
           _sse({"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}}, "content_block_start"),
           _sse({"type": "ping"}, "ping")]
    out += [_sse({"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": t}}, "content_block_delta") for t in toks]
    out += [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                  "usage": {"output_tokens": len(toks)}}, "message_delta"),
            _sse({"type": "message_stop"}, "message_stop")]
    return out


def openai_json(model: str) -> dict[str, Any]:
    n = len(tokens())
    return {"id": "chatcmpl-demo", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                         "message": {"role": "assistant", "content": TEXT}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n}}


def anthropic_json(model: str) -> dict[str, Any]:
    return {"id": "msg_demo", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": len(tokens())}}


def provider_app(delay: float) -> web.Application:
    """The fake provider: any path ending in /chat/completions or /messages, any key or none."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "the demo provider wants a JSON object body",
                                                "type": "invalid_request_error"}}, status=400)
        model = str(body.get("model") or "demo")
        anthropic = request.path.endswith("/messages")
        if not body.get("stream"):
            return web.json_response(anthropic_json(model) if anthropic else openai_json(model))
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = anthropic_events(model) if anthropic else openai_events(model, usage)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for i, event in enumerate(events):
                if i:
                    await asyncio.sleep(delay)
                await resp.write(event)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client (relayd, on behalf of its client) left: nothing more to send
        return resp

    async def not_found(request: web.Request) -> web.Response:
        return web.json_response({"error": {
            "message": f"the demo provider serves POST .../chat/completions and POST .../messages, "
                       f"not {request.method} {request.path}", "type": "not_found_error"}}, status=404)

    app = web.Application()
    app.router.add_post(r"/{prefix:.*}chat/completions", handle)
    app.router.add_post(r"/{prefix:.*}messages", handle)
    app.router.add_route("*", r"/{tail:.*}", not_found)
    return app


def instructions(port: str) -> str:
    base = f"http://127.0.0.1:{port}"
    oai = ("curl -N " + base + "/openai/v1/chat/completions -H 'content-type: application/json' "
           "-d '{\"model\":\"demo\",\"stream\":true,\"stream_options\":{\"include_usage\":true},"
           "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'")
    ant = ("curl -N " + base + "/anthropic/v1/messages -H 'content-type: application/json' "
           "-H 'anthropic-version: 2023-06-01' -d '{\"model\":\"demo\",\"max_tokens\":100,"
           "\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'")
    sdk = ("python -c \"from openai import OpenAI; [print(c.choices[0].delta.content or '', end='', "
           f"flush=True) for c in OpenAI(base_url='{base}/openai/v1', api_key='any')"
           ".chat.completions.create(model='demo', stream=True, "
           "messages=[{'role': 'user', 'content': 'hi'}])]; print()\"")
    return (f"\nrelayd demo: relayd on {base} -> fake provider (no account, no network).\n"
            f"Watch a stream arrive event by event (OpenAI format):\n\n  {oai}\n\n"
            f"Anthropic format:\n\n  {ant}\n\n"
            f"With the OpenAI SDK (pip install openai):\n\n  {sdk}\n\n"
            f"Metrics: curl -s http://127.0.0.1:{os.environ['RELAYD_DEMO_ADMIN_PORT']}/metrics"
            " | grep ^relayd_\nCtrl-C stops relayd and the provider.\n")


def _die_with_parent() -> None:
    """In the child: SIGTERM when the demo dies, however it dies, so no relayd is left behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the signal handlers below still stop relayd on Ctrl-C


async def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 15) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return True
        except OSError:
            await asyncio.sleep(0.05)
    return False


async def _main(config: str) -> int:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    runner = web.AppRunner(provider_app(float(os.environ["RELAYD_DEMO_DELAY"])), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", int(os.environ["RELAYD_DEMO_PROVIDER_PORT"])).start()
    except OSError as exc:
        print(f"relayd demo: cannot listen on 127.0.0.1:{os.environ['RELAYD_DEMO_PROVIDER_PORT']}: "
              f"{exc.strerror or exc} (set RELAYD_DEMO_PROVIDER_PORT)", file=sys.stderr)
        await runner.cleanup()
        return 1
    # relayd's own JSON log lines (one access line per request) go to this terminal.  It
    # gets its own process group so Ctrl-C reaches it once, from here: a second signal
    # would make it exit at once instead of draining.
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", config], process_group=0,
                            preexec_fn=_die_with_parent)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set() and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # second Ctrl-C: relayd stops without draining
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        if await _wait_ready(proc, int(os.environ["RELAYD_DEMO_PORT"])):
            print(instructions(os.environ["RELAYD_DEMO_PORT"]), flush=True)
            exited = loop.run_in_executor(None, proc.wait)
            await asyncio.wait([exited, loop.create_task(stop.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
        return await _stop(proc)
    finally:
        await runner.cleanup()


async def _stop(proc: subprocess.Popen[bytes]) -> int:
    """Drain relayd: in-flight streams finish while the provider is still up."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + 40
    while proc.poll() is None and time.monotonic() < end:
        await asyncio.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    code = proc.returncode
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        print(f"relayd demo: relayd exited with status {code}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m relayd.demo", description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default=str(Path("config") / "demo.yaml"),
                   help="relayd config to run (default: config/demo.yaml)")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        print(f"relayd demo: {args.config}: no such file (run from the repository root, "
              "or pass --config)", file=sys.stderr)
        return 2
    return asyncio.run(_main(args.config))


if __name__ == "__main__":
    sys.exit(main())

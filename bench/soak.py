"""Soak: hostile clients against a real relayd for a while, normal requests measured
meanwhile.  Not part of `make test` (it runs for minutes); `make soak SOAK_SECONDS=60`.

Each wave opens HALF_OPEN connections that send part of a head (or nothing) and leave
them; relayd must close them after client_header, keep answering normal requests, and
end with as many file descriptors as it started with.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import basic_config, wait_port  # noqa: E402
from fakes import FakeProvider, free_port  # noqa: E402

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
HALF_OPEN = int(os.environ.get("SOAK_HALF_OPEN", "500"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wave(port: int) -> list[asyncio.StreamWriter]:
    out = []
    for i in range(HALF_OPEN):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        if i % 2:
            w.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        out.append(w)
    return out


async def soak(port: int, pid: int) -> int:
    latencies: list[float] = []
    held: list[asyncio.StreamWriter] = []
    base = fds(pid)
    end = time.monotonic() + SECONDS
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            held += await wave(port)
            for _ in range(20):
                t = time.monotonic()
                async with s.get(f"http://127.0.0.1:{port}/openai/v1/echo") as r:
                    await r.read()
                    assert r.status == 200, r.status
                latencies.append(time.monotonic() - t)
                await asyncio.sleep(0.05)
            for w in held[:-HALF_OPEN * 2]:
                w.close()
            held = held[-HALF_OPEN * 2:]
    for w in held:
        w.close()
    settle = time.monotonic() + 10
    while fds(pid) > base + 2 and time.monotonic() < settle:
        await asyncio.sleep(0.2)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"requests {len(latencies)}  p50 {statistics.median(latencies) * 1000:.1f} ms  "
          f"p99 {p99 * 1000:.1f} ms  max {latencies[-1] * 1000:.1f} ms  "
          f"fds start {base} end {fds(pid)}")
    return 0 if fds(pid) <= base + 2 and p99 < 0.1 else 1


def main() -> int:
    fake = FakeProvider().start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "soak.yaml"
        cfg.write_text(basic_config(fake.url, port) + "\nlimits: {client_header: 2}\n")
        check = subprocess.run([sys.executable, "-m", "relayd", "check", "-c", str(cfg)],
                               cwd=ROOT, capture_output=True)
        if check.returncode:  # remove once config limits land: relayd check knows the key
            print("config has no `limits` yet: client_header is the 60 s default")
            cfg.write_text(basic_config(fake.url, port))
        proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(cfg)],
                                cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            wait_port(port)
            return asyncio.run(soak(port, proc.pid))
        finally:
            proc.terminate()
            proc.wait(10)
            fake.stop()


if __name__ == "__main__":
    sys.exit(main())

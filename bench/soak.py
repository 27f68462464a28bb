"""Soak: a real relayd under streams and hostile clients for minutes; RSS must stay flat.

Not part of `make test` (it runs for minutes): `make soak` (SOAK_SECONDS=300 by default).

- STREAMS concurrent SSE streams, each restarted when it ends (a real transcript, paced
  by the fake provider), checked byte-exact;
- every few seconds a wave of HALF_OPEN slowloris connections that send part of a head
  (or nothing) and stay: relayd must close them after `client_header`;
- normal small requests meanwhile, their latency measured.

relayd's RSS (main process and workers together) is sampled every 10 s.  The run fails if RSS in the last third grew more
than 10 % over the first third (after warm-up), if any stream was not byte-exact, if the
normal-request p99 exceeded 100 ms, or if descriptors leaked.
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
sys.path.insert(0, str(ROOT / "bench"))
from procs import rss_kib, tree  # noqa: E402
from conftest import basic_config, wait_port  # noqa: E402
from fakes import FakeProvider, Scenario, fixture, free_port  # noqa: E402

SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))
STREAMS = int(os.environ.get("SOAK_STREAMS", "200"))
HALF_OPEN = int(os.environ.get("SOAK_HALF_OPEN", "300"))


def fds(pid: int) -> int:
    """Descriptors of relayd's whole process tree (the main process and its workers)."""
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in tree(pid) if os.path.isdir(f"/proc/{p}/fd"))


def rss_mib(pid: int) -> float:
    return rss_kib(pid) / 1024


async def wave(port: int) -> list[asyncio.StreamWriter]:
    out = []
    for i in range(HALF_OPEN):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        if i % 2:
            w.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        out.append(w)
    return out


class Tally:
    def __init__(self) -> None:
        self.streams = self.bad = 0
        self.latencies: list[float] = []
        self.rss: list[tuple[float, float]] = []


async def streamer(s: aiohttp.ClientSession, port: int, scenario: str, body: bytes,
                   end: float, t: Tally) -> None:
    while time.monotonic() < end:
        async with s.post(f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                          headers={"x-fake": scenario}) as r:
            got = await r.read()
        t.streams += 1
        if got != body:
            t.bad += 1


async def prober(s: aiohttp.ClientSession, port: int, end: float, t: Tally) -> None:
    held: list[asyncio.StreamWriter] = []
    while time.monotonic() < end:
        held += await wave(port)
        for _ in range(20):
            start = time.monotonic()
            async with s.get(f"http://127.0.0.1:{port}/openai/v1/echo") as r:
                await r.read()
                assert r.status == 200, r.status
            t.latencies.append(time.monotonic() - start)
            await asyncio.sleep(0.1)
        for w in held[:-HALF_OPEN * 2]:
            w.close()
        held = held[-HALF_OPEN * 2:]
    for w in held:
        w.close()


async def sampler(pid: int, end: float, t: Tally) -> None:
    start = time.monotonic()
    while time.monotonic() < end:
        t.rss.append((time.monotonic() - start, rss_mib(pid)))
        await asyncio.sleep(10)


async def soak(port: int, pid: int, scenario: str, body: bytes) -> int:
    t = Tally()
    base = fds(pid)
    end = time.monotonic() + SECONDS
    conn = aiohttp.TCPConnector(limit=STREAMS + 10)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        await asyncio.gather(sampler(pid, end, t), prober(s, port, end, t),
                             *(streamer(s, port, scenario, body, end, t) for _ in range(STREAMS)))
    # relayd keeps its warm upstream pool (up to one connection per concurrent stream)
    allowed = base + STREAMS + 10
    settle = time.monotonic() + 10
    while fds(pid) > allowed and time.monotonic() < settle:
        await asyncio.sleep(0.2)
    lat = sorted(t.latencies)
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)]
    third = max(1, len(t.rss) // 3)
    first = statistics.median(r for _, r in t.rss[1:third + 1] or t.rss[:1])
    last = statistics.median(r for _, r in t.rss[-third:])
    print("rss MiB over time: " + "  ".join(f"{s:.0f}s:{r:.1f}" for s, r in t.rss))
    print(f"{SECONDS:.0f} s, {STREAMS} concurrent streams: {t.streams} streams, {t.bad} not byte-exact; "
          f"RSS first third {first:.1f} MiB, last third {last:.1f} MiB ({(last / first - 1) * 100:+.1f} %)")
    print(f"normal requests {len(lat)}: p50 {statistics.median(lat) * 1000:.1f} ms  "
          f"p99 {p99 * 1000:.1f} ms  max {lat[-1] * 1000:.1f} ms; fds start {base} end {fds(pid)} "
          f"(pool allowance {allowed})")
    ok = t.bad == 0 and last <= first * 1.10 and p99 < 0.1 and fds(pid) <= allowed
    print("soak:", "ok" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    fake = FakeProvider().start()
    body = fixture("openai-chat-usage.sse")
    scenario = fake.add("soak", Scenario(body=body, chunking="lines", delay=0.02))
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "soak.yaml"
        cfg.write_text(basic_config(fake.url, port, top="limits: {client_header: 2}\naccess_log: false"))
        proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(cfg)],
                                cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            wait_port(port)
            return asyncio.run(soak(port, proc.pid, scenario, body))
        finally:
            proc.terminate()
            proc.wait(10)
            fake.stop()


if __name__ == "__main__":
    sys.exit(main())

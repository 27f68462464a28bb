"""config/examples/haproxy.cfg in front of two real relayd processes: a drain-aware rolling restart.

The shipped example is run as it is, with only addresses, ports and the health-check
interval (2 s -> 200 ms, to keep the test short) substituted.  The question it answers:
when one relayd gets SIGTERM, does its /readyz go 503, does HAProxy take it out of
rotation while the stream already on it runs to the end, and do new requests keep
succeeding through the other one?
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from conftest import Relayd, wait_port
from fakes import FakeProvider, Scenario, fixture, free_port
from test_demo import end_process
from test_operations import get_metrics, metric, wait_metric

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "examples" / "haproxy.cfg"

haproxy = shutil.which("haproxy")
if haproxy is None and not os.environ.get("CI"):
    pytest.skip("haproxy not installed (.ci/run installs it: apt-get install haproxy)", allow_module_level=True)

QUICK = fixture("openai-chat-usage.sse")
SLOW_EVENTS = 40
HOLD_AT = SLOW_EVENTS  # a line index, two lines an event: the long streams wait halfway for their gate
SLOW = b"".join(b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i
                for i in range(SLOW_EVENTS)) + b"data: [DONE]\n\n"


def relayd_config(fake: FakeProvider, port: int, admin: int) -> str:
    return f"""
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
shutdown_grace: 30
defaults:
  timeouts: {{connect: 2, first_byte: 10, idle: 10, total: 60}}
  heartbeat: 0
upstreams:
  openai: {{url: "{fake.url}", provider: openai, api_key: "sk-test-haproxy"}}
routes:
  - {{path: /openai, upstream: openai}}
"""


def render(front: int, servers: list[tuple[int, int]]) -> str:
    """The example with local ports; fails if the example no longer has the lines it replaces."""
    text = EXAMPLE.read_text()

    def sub(pattern: str, repl: Any, count: int) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, flags=re.M)
        assert n == count, f"{pattern!r} matched {n} times in {EXAMPLE}, expected {count}"

    sub(r"^(\s+bind) :8080$", rf"\1 127.0.0.1:{front}", 1)
    it = iter(servers)

    def server(m: re.Match[str]) -> str:
        port, admin = next(it)
        return f"{m.group(1)} 127.0.0.1:{port} check port {admin}"

    sub(r"^(\s+server relayd\d) 10\.0\.0\.\d+:8080 check port 9090$", server, 2)
    sub(r"\binter 2s\b", "inter 200ms", 1)
    return text


class HAProxy:
    def __init__(self, tmp: Path, config: str) -> None:
        self.cfg = tmp / "haproxy.cfg"
        self.cfg.write_text(config)
        self.log = tmp / "haproxy.log"
        self._f = open(self.log, "wb")
        assert haproxy is not None
        self.proc = subprocess.Popen([haproxy, "-db", "-f", str(self.cfg)], stdout=self._f, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        end = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text())
            if m:
                return m
            assert self.proc.poll() is None, f"haproxy exited {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < end, f"haproxy never logged {pattern!r}:\n{self.text()}"
            await asyncio.sleep(0.02)

    def request_lines(self, tag: str) -> list[str]:
        return [l for l in self.text().splitlines() if f"probe={tag}" in l]

    async def wait_requests(self, tag: str, n: int, timeout: float = 5) -> list[str]:
        """The log lines of the requests tagged tag* once there are n (exactly n, or fail).

        HAProxy logs a request when its stream ends, which can be after the client has
        read the last byte: a test that counts lines right after its requests returned
        can miss the last one.
        """
        end = time.monotonic() + timeout
        while len(lines := self.request_lines(tag)) < n and time.monotonic() < end:
            await asyncio.sleep(0.02)
        assert len(lines) == n, f"{len(lines)} of {n} {tag}* requests logged:\n{self.text()}"
        return lines

    def stop(self) -> None:
        end_process(self.proc, signal.SIGTERM, 10)
        self._f.close()


@pytest.fixture
def cluster(tmp_path: Path, fake: FakeProvider) -> Iterator[tuple[HAProxy, list[Relayd], int, threading.Event]]:
    """HAProxy, the two relayds behind it, its port, and the gate the long streams wait at."""
    gate = threading.Event()
    fake.add("haproxy-quick", Scenario(body=QUICK, chunking="lines"))
    fake.add("haproxy-slow", Scenario(body=SLOW, chunking="lines", delay=0.01, hold=gate, hold_at=HOLD_AT))
    relayds: list[Relayd] = []
    hap: HAProxy | None = None
    try:
        for i in (1, 2):
            port, admin = free_port(), free_port()
            r = Relayd(tmp_path, relayd_config(fake, port, admin), name=f"relayd{i}.yaml")
            r.port, r.admin = port, admin  # type: ignore[attr-defined]
            relayds.append(r.start())
        front = free_port()
        hap = HAProxy(tmp_path, render(front, [(r.port, r.admin) for r in relayds]))  # type: ignore[attr-defined]
        wait_port(front)
        yield hap, relayds, front, gate
    finally:
        gate.set()  # a failed test leaves no stream held in the shared fake
        if hap is not None:
            hap.stop()
        for r in relayds:
            r.stop()


async def post(s: aiohttp.ClientSession, front: int, scenario: str, tag: str) -> tuple[int, bytes]:
    async with s.post(f"http://127.0.0.1:{front}/openai/v1/chat/completions?probe={tag}",
                      json={"model": "m", "stream": True, "messages": []}, headers={"x-fake": scenario}) as r:
        return r.status, await r.read()


def retries(line: str) -> int:
    """The retries field of an HAProxy httplog line (%ac/%fc/%bc/%sc/%rc, '+' when redispatched)."""
    m = re.search(r" \d+/\d+/\d+/\d+/\+?(\d+) \d+/\d+ \"POST", line)
    assert m, line
    return int(m.group(1))


async def serving_stream(relayds: list[Relayd], timeout: float = 10) -> int:
    """Index of the relayd that has the one active stream."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for i, r in enumerate(relayds):
            if metric(await get_metrics(r.admin), "relayd_active_streams", route="/openai") == 1:  # type: ignore[attr-defined]
                return i
        await asyncio.sleep(0.02)
    raise AssertionError("no relayd reports the stream as active")


async def wait_refused(port: int, timeout: float = 5) -> None:
    """Until a connect to port is refused: every process that held the listener closed it.

    With workers (one per CPU by default) /readyz is the main process's: it answers 503
    as soon as that process takes SIGTERM, and each worker closes its copy of the
    listener when it takes the SIGTERM forwarded to it, a few ms later (more on a busy
    machine).  A request that arrives in between is accepted and served in full, as any
    request in flight at a drain; this waits for the state after it.
    """
    end = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        except ConnectionResetError:  # queued on a worker's socket as that worker closed it
            assert time.monotonic() < end, f"127.0.0.1:{port} still accepts connections"
            continue
        w.close()
        try:
            await w.wait_closed()
        except OSError:
            pass  # reset by the listener's close: still a connection that was accepted
        assert time.monotonic() < end, f"127.0.0.1:{port} still accepts connections"
        await asyncio.sleep(0.01)


async def test_rolling_restart_through_haproxy(
        cluster: tuple[HAProxy, list[Relayd], int, threading.Event]) -> None:
    hap, relayds, front, gate = cluster
    async with aiohttp.ClientSession() as s:
        # 1. streams go through, to both relayds; every one of them has its access line
        #    before the counts below start (relayd writes it after the last byte went out)
        for i in range(4):
            assert await post(s, front, "haproxy-quick", f"warm{i}") == (200, QUICK)
        warm = await hap.wait_requests("warm", 4)
        counts = [sum(f"relayd/relayd{i + 1} " in l for l in warm) for i in range(2)]
        assert all(c >= 1 for c in counts), f"requests per relayd: {counts}\n{hap.text()}"
        for r, c in zip(relayds, counts):
            assert len(r.wait_access(c)) == c

        # 2. a long stream on each relayd (leastconn puts the second on the other one),
        #    then SIGTERM the relayd that carries the first.  Both streams stop halfway,
        #    at the fake's gate, until step 5 opens it: they outlast steps 3 and 4 however
        #    slowly those run.
        arrivals: dict[str, list[tuple[float, bytes]]] = {"long0": [], "long1": []}

        async def long_stream(tag: str) -> tuple[int, bytes]:
            async with s.post(f"http://127.0.0.1:{front}/openai/v1/chat/completions?probe={tag}",
                              json={"model": "m", "stream": True, "messages": []},
                              headers={"x-fake": "haproxy-slow"}) as r:
                async for chunk in r.content.iter_any():
                    arrivals[tag].append((time.monotonic(), chunk))
                return r.status, b"".join(c for _, c in arrivals[tag])

        streams = [asyncio.create_task(long_stream("long0"))]
        a = await serving_stream(relayds)
        draining, other = relayds[a], relayds[1 - a]
        streams.append(asyncio.create_task(long_stream("long1")))
        assert await wait_metric(other.admin, "relayd_active_streams", 1, route="/openai") == 1  # type: ignore[attr-defined]
        before_other = len(other.access())
        draining.signal(signal.SIGTERM)

        # 3. relayd says it is draining at once
        async with s.get(f"http://127.0.0.1:{draining.admin}/readyz") as r:  # type: ignore[attr-defined]
            assert r.status == 503 and (await r.json())["status"] == "draining"
        await wait_refused(draining.port)  # type: ignore[attr-defined]
        # Until the next health check HAProxy still counts the draining relayd as UP and, the
        # two being tied at one stream each, picks it for every other request; its listener is
        # closed, so retry-on conn-failure + redispatch must carry those to the other relayd.
        for i in range(4):
            assert await post(s, front, "haproxy-quick", f"gap{i}") == (200, QUICK)
        name = f"relayd{a + 1}"
        down = await hap.wait_log(rf"Server relayd/{name} is DOWN, reason: Layer7 wrong status, code: 503")
        t_down = time.monotonic()
        gap = await hap.wait_requests("gap", 4)
        assert all(f"relayd/relayd{2 - a} " in l for l in gap), hap.text()
        before_down = [l for l in gap if hap.text().index(l) < down.start()]
        if len(before_down) >= 2:  # at least one of them was sent to the draining relayd first
            assert any(retries(l) > 0 for l in before_down), hap.text()

        # 4. HAProxy took it out on that 503: new requests all go to the other relayd, not even
        #    tried on the drained one, while the drained one is still alive finishing its stream
        for i in range(6):
            assert await post(s, front, "haproxy-quick", f"after{i}") == (200, QUICK)
        assert not any(t.done() for t in streams), "a long stream ended before the test could use it"
        assert draining.proc is not None and draining.proc.poll() is None  # still draining, not gone
        assert len(other.wait_access(before_other + 10)) == before_other + 10
        for line in await hap.wait_requests("after", 6):
            assert f"relayd/relayd{2 - a} " in line and retries(line) == 0, line

        # 5. both long streams run to their end, intact (the one on the drained relayd kept
        #    streaming while HAProxy had the server DOWN); then the drained relayd exits 0
        gate.set()
        for tag, task in zip(("long0", "long1"), streams):
            status, body = await asyncio.wait_for(task, 30)
            assert status == 200 and body == SLOW, tag
        assert arrivals["long0"][-1][0] > t_down
    assert draining.proc.wait(15) == 0
    long_lines = [l for l in draining.access() if l.get("end_reason") == "done" and l.get("events") == SLOW_EVENTS + 1]
    assert long_lines, draining.access()

"""Process-level behaviour on a real relayd subprocess: reload, drain, sd_notify, logs, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import basic_config, wait_port
from fakes import Scenario, fixture, free_port, sse_events

KEYS = ["sk-test-openai-KEY1", "sk-ant-test-KEY2", "gem-test-KEY3", "az-test-KEY4"]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def get_metrics(admin: int) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
            return await r.text()


async def wait_metric(admin: int, name: str, want: float, timeout: float = 5, **labels: str) -> float:
    """The metric's value once it equals want (or its last value at the timeout).

    Counters and gauges move when relayd gets to it, not when the client's read
    returns, so a test polls instead of sleeping a guessed amount.
    """
    end = time.monotonic() + timeout
    while True:
        got = metric(await get_metrics(admin), name, **labels)
        if got == want or time.monotonic() >= end:
            return got
        await asyncio.sleep(0.02)


async def route_status(port: int, path: str, timeout: float = 5) -> int:
    """GET path until it answers 200 (a reload made the route live) or timeout passes; the last status."""
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(f"http://127.0.0.1:{port}{path}") as resp:
                if resp.status == 200 or time.monotonic() >= end:
                    return resp.status
            await asyncio.sleep(0.05)


async def read_stream(port: int, path: str, scenario: str) -> tuple[bytes, list[float]]:
    """The body and the arrival time of each read."""
    times = []
    buf = bytearray()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async with s.post(f"http://127.0.0.1:{port}{path}", headers={"x-fake": scenario}) as r:
            async for chunk in r.content.iter_any():
                times.append(time.monotonic())
                buf += chunk
    return bytes(buf), times


def wait_for(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


# ------------------------------------------------------------------------------ reload


async def test_reload_storm_keeps_every_stream_byte_exact(fake, make_relayd, tmp_path):
    port, admin = free_port(), free_port()
    config_a = basic_config(fake.url, port, admin)
    config_b = config_a + "  - {path: /extra, upstream: generic}\n"
    r = make_relayd(config_a)
    events = [f'data: {{"i":{i},"pad":"{"x" * 40}"}}\n\n'.encode() for i in range(30)]
    body = b"".join(events) + b"data: [DONE]\n\n"
    sc = fake.add("storm", Scenario(body=body, chunking="lines", delay=0.05))  # ~3 s per stream

    async def storm():
        await asyncio.sleep(0.3)
        for i in range(30):  # SIGHUP every 100 ms for 3 s, alternating configs
            r.config.write_text(config_b if i % 2 == 0 else config_a)
            r.signal(signal.SIGHUP)
            await asyncio.sleep(0.1)
        r.config.write_text(config_b)
        r.signal(signal.SIGHUP)

    results = await asyncio.gather(storm(), *(read_stream(port, "/openai/v1/chat/completions", sc)
                                            for _ in range(200)))
    streams = results[1:]
    assert all(got == body for got, _ in streams)
    # the longest pause any stream saw beyond the upstream's own 50 ms pacing
    worst = max(max(b - a for a, b in zip(t, t[1:])) for _, t in streams if len(t) > 1)
    print(f"reload storm: 200 streams, 31 reloads, longest inter-chunk gap {worst * 1000:.0f} ms")
    assert wait_for(lambda: sum(1 for l in r.logs() if l.get("event") == "reload ok") >= 25)
    # the newest file (config_b) is applied: its new route is live
    assert await route_status(port, "/extra/echo", timeout=2.5) == 200
    m = await get_metrics(admin)
    assert metric(m, "relayd_reloads_total", result="ok") >= 25
    assert metric(m, "relayd_config_generation") >= 26


async def test_invalid_reload_keeps_old_config(fake, make_relayd):
    port, admin = free_port(), free_port()
    good = basic_config(fake.url, port, admin)
    r = make_relayd(good)
    r.config.write_text(good.replace("provider: anthropic", "provider: anthropik")
                        .replace('"sk-test-openai-KEY1"', '"${RELAYD_SURELY_UNSET_VAR}"'))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload failed" for l in r.logs()))
    failed = next(l for l in r.logs() if l.get("event") == "reload failed")
    assert failed["level"] == "error"
    assert any(re.search(r"relayd\.yaml:\d+: upstreams\.anthropic\.provider: unknown provider", e) for e in failed["errors"])
    assert any("RELAYD_SURELY_UNSET_VAR is not set" in e for e in failed["errors"])
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/anthropic/echo") as resp:
            assert resp.status == 200
            assert dict((await resp.json())["headers"])["x-api-key"] == "sk-ant-test-KEY2"
    m = await get_metrics(admin)
    assert metric(m, "relayd_reloads_total", result="failed") == 1
    assert metric(m, "relayd_config_generation") == 1
    assert r.proc.poll() is None


async def test_reload_keeps_warm_pool_and_retires_changed_after_stream(fake, make_relayd):
    port, admin = free_port(), free_port()
    cfg = basic_config(fake.url, port, admin)
    r = make_relayd(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/local/echo") as resp:
            await resp.read()
        fake.reset_stats()
        # a long stream on the openai upstream, whose pool the reload will change, and one
        # on the anthropic upstream, which the reload removes
        body = b"".join(f"data: {i}\n\n".encode() for i in range(20)) + b"data: [DONE]\n\n"
        sc = fake.add("retire", Scenario(body=body, chunking="lines", delay=0.05))
        long = asyncio.create_task(read_stream(port, "/openai/v1/chat/completions", sc))
        ant = fixture("anthropic-messages.sse")
        sc2 = fake.add("removed", Scenario(body=ant, chunking="lines", delay=0.04))
        gone = asyncio.create_task(read_stream(port, "/anthropic/v1/messages", sc2))
        await fake.has_requests(2)
        r.config.write_text(cfg.replace('provider: openai, api_key: "sk-test-openai-KEY1"',
                                        'provider: openai, api_key: "sk-test-openai-KEY1", keepalive: 7')
                            .replace("/local, upstream: generic", "/local, upstream: generic, heartbeat: 1")
                            .replace("  - {path: /anthropic, upstream: anthropic}\n", "")
                            .replace('  anthropic: {url: "' + fake.url + '", provider: anthropic, api_key: "sk-ant-test-KEY2"}\n', ""))
        lost_before = fake.connections_lost
        r.signal(signal.SIGHUP)
        assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
        # the streams on the retired pools are still in flight, and counted
        m = await get_metrics(admin)
        assert metric(m, "relayd_upstream_inflight", upstream="openai") == 1
        assert metric(m, "relayd_upstream_inflight", upstream="anthropic") == 1
        made = fake.connections_made
        for _ in range(5):
            async with s.get(f"http://127.0.0.1:{port}/local/echo") as resp:
                await resp.read()
        assert fake.connections_made == made  # the unchanged upstream kept its warm connection
        assert fake.connections_lost == lost_before  # nothing closed while the stream is live
        got, _ = await long
        assert got == body  # the retired pool was not closed under the live stream
        assert (await gone)[0] == ant
        # ... and once their last stream ended, the retired pools closed their connections
        for _ in range(100):
            if fake.connections_lost >= lost_before + 2:
                break
            await asyncio.sleep(0.02)
        assert fake.connections_lost == lost_before + 2
        # a removed upstream's gauges read 0 (they stayed at 1 for ever)
        assert await wait_metric(admin, "relayd_upstream_inflight", 0, upstream="anthropic") == 0
        assert await wait_metric(admin, "relayd_upstream_inflight", 0, upstream="openai") == 0


async def test_burst_of_sighups_applies_newest_file(fake, make_relayd):
    port = free_port()
    base = basic_config(fake.url, port)
    r = make_relayd(base)
    for i in range(10):
        r.config.write_text(base + f"  - {{path: /v{i}, upstream: generic}}\n")
        r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
    # the burst coalesces into few reloads; the last one reads the newest file
    assert await route_status(port, "/v9/echo") == 200


async def test_listen_change_needs_restart(fake, make_relayd):
    port = free_port()
    cfg = basic_config(fake.url, port)
    r = make_relayd(cfg)
    r.config.write_text(cfg.replace(f"127.0.0.1:{port}", f"0.0.0.0:{free_port()}"))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
    assert any("need a restart" in l.get("event", "") for l in r.logs())
    # the listener that serves is loopback: no warning about the file's 0.0.0.0 (review 41)
    assert not any(l.get("event") == "config warning" and "0.0.0.0" in str(l) for l in r.logs()), \
        [l for l in r.logs() if l.get("event") == "config warning"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/local/echo") as resp:
            assert resp.status == 200


# ------------------------------------------------------------------------------ drain


async def test_drain_finishes_short_streams_and_ends_long_ones(fake, make_relayd):
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin).replace("shutdown_grace: 5", "shutdown_grace: 1"))
    short_body = b"".join(f"data: {i}\n\n".encode() for i in range(5)) + b"data: [DONE]\n\n"
    long_body = b"".join(f"data: {i}\n\n".encode() for i in range(100)) + b"data: [DONE]\n\n"
    short = fake.add("drain-short", Scenario(body=short_body, chunking="lines", delay=0.05))
    long = fake.add("drain-long", Scenario(body=long_body, chunking="lines", delay=0.05))
    anth = fake.add("drain-anth", Scenario(body=fixture("anthropic-messages.sse"), chunking="cut:400", delay=10))
    fake.reset_stats()
    t_short = asyncio.create_task(read_stream(port, "/openai/v1/chat/completions", short))
    t_long = asyncio.create_task(read_stream(port, "/openai/v1/chat/completions", long))
    t_anth = asyncio.create_task(read_stream(port, "/anthropic/v1/messages", anth))
    await fake.has_requests(3)
    t0 = time.monotonic()
    r.signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    r.signal(signal.SIGHUP)  # a reload during the drain is dropped, and said so
    # new connections are refused and /readyz says draining (admin stays up during drain)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
            assert resp.status == 503
    got_short, _ = await t_short
    got_long, _ = await t_long
    got_anth, _ = await t_anth
    code = await asyncio.get_running_loop().run_in_executor(None, r.proc.wait, 10)
    elapsed = time.monotonic() - t0
    assert code == 0
    assert elapsed < 1 + 2, elapsed
    assert got_short == short_body
    ev = sse_events(got_long)
    assert long_body.startswith(got_long[: got_long.rindex(b"data: {")])
    assert json.loads(ev[-1][1])["error"]["code"] == "shutdown"
    assert ("message", "[DONE]") not in ev
    a = sse_events(got_anth)[-1]
    assert a[0] == "error" and json.loads(a[1])["error"]["type"] == "overloaded_error"
    lines = r.logs()
    assert any(l.get("event") == "drain" for l in lines) and lines[-1]["event"] == "exit"
    assert any(l.get("event") == "reload dropped: draining" for l in lines)
    assert not any(l.get("event") == "reload ok" for l in lines)
    assert {"shutdown"} <= {l["end_reason"] for l in lines if l.get("event") == "access"}


@pytest.mark.parametrize("workers", [1, 2])
async def test_drain_closes_idle_keepalive_connections_now_and_busy_ones_say_close(fake, make_relayd, workers):
    """SIGTERM: an idle keep-alive connection is closed at once (nginx, Envoy), not left
    open until the grace ends, where a request sent on it meanwhile got nothing; an
    answer that begins during the drain says ``Connection: close``."""
    port = free_port()
    r = make_relayd(basic_config(fake.url, port).replace("shutdown_grace: 5", "shutdown_grace: 4"),
                    args=["--workers", str(workers)])
    keep = fake.add("drain-keep", Scenario(body=b"data: 1\n\n" * 3, fault="stall", fault_at=9))
    late = fake.add("drain-late", Scenario(body=b'{"ok":true}', content_type="application/json",
                                           header_delay=1.0))
    head = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-fake: %s\r\nContent-Length: 2\r\n\r\n{}"
    idle = []
    for _ in range(4):  # (with two workers, likely some on each)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head % b"none")
        s.settimeout(5)
        got = b""
        while not got.endswith(b"\r\n0\r\n\r\n"):  # (the answer is chunked)
            got += s.recv(65536)
        idle.append(s)
    busy = socket.create_connection(("127.0.0.1", port))
    busy.sendall(head % late.encode())
    fake.reset_stats()
    held = asyncio.create_task(read_stream(port, "/openai/v1/chat/completions", keep))  # keeps the drain going
    await fake.has_requests(2)
    t0 = time.monotonic()
    r.signal(signal.SIGTERM)
    for s in idle:
        assert s.recv(100) == b""  # closed
        assert time.monotonic() - t0 < 1.5, time.monotonic() - t0
        s.close()
    busy.settimeout(5)
    answer = b""
    while b'{"ok":true}' not in answer:
        answer += busy.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close\r\n" in answer, answer
    busy.close()
    held.cancel()


def test_drain_ends_a_stream_whose_client_does_not_read_as_shutdown(fake, make_relayd):
    """A stream waiting for a client that reads nothing when the grace ends: nothing the
    upstream does wakes that wait, and the drain's final cancel logged it ``client_gone``
    — the client had not gone; relayd ended it."""
    port = free_port()
    r = make_relayd(basic_config(fake.url, port).replace("shutdown_grace: 5", "shutdown_grace: 1")
                    .replace("total: 60", "total: 60, send: 30"), args=["--workers", "1"])
    flood = fake.add("drain-flood", Scenario(body=b"data: " + b"x" * 4000 + b"\n\n", repeat=20000))
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", port))
    c.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-fake: %s\r\n"
              b"Content-Length: 2\r\n\r\n{}" % flood.encode())
    time.sleep(1.0)  # relayd's buffers fill: it waits for the client
    r.signal(signal.SIGTERM)
    assert r.proc.wait(10) == 0
    c.close()
    line = [l for l in r.logs() if l.get("event") == "access"][-1]
    assert line["end_reason"] == "shutdown", line


async def test_second_signal_exits_at_once(fake, make_relayd):
    port = free_port()
    r = make_relayd(basic_config(fake.url, port).replace("shutdown_grace: 5", "shutdown_grace: 30"))
    sc = fake.add("forever", Scenario(body=b"data: 1\n\n" * 3, fault="stall", fault_at=9))
    fake.reset_stats()
    task = asyncio.create_task(read_stream(port, "/local/x", sc))
    await fake.has_requests(1)
    r.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert r.proc.poll() is None  # still draining: the stream is inside its grace
    t0 = time.monotonic()
    r.signal(signal.SIGINT)
    await asyncio.get_running_loop().run_in_executor(None, r.proc.wait, 5)
    assert time.monotonic() - t0 < 1.5
    task.cancel()


# ------------------------------------------------------------------------------ systemd


def test_sd_notify_sequence(fake, make_relayd, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(5)
    port = free_port()
    r = make_relayd(basic_config(fake.url, port), env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"},
                    start=False)
    r.start()
    msgs = []

    def recv_until(pred, timeout=5):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                m = sock.recv(4096).decode()
            except socket.timeout:
                break
            msgs.append(m)
            if pred(m):
                return m
        raise AssertionError(f"not seen; got {msgs}")

    ready = recv_until(lambda m: "READY=1" in m)
    assert "STATUS=config generation 1" in ready
    recv_until(lambda m: "WATCHDOG=1" in m, timeout=2)
    r.signal(signal.SIGHUP)
    reloading = recv_until(lambda m: "RELOADING=1" in m)
    assert re.search(r"MONOTONIC_USEC=\d+", reloading)
    ready2 = recv_until(lambda m: "READY=1" in m)
    assert "generation 2" in ready2
    r.signal(signal.SIGTERM)
    recv_until(lambda m: "STOPPING=1" in m)
    assert r.proc.wait(10) == 0
    sock.close()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_log_lines_carry_syslog_priorities_on_the_journals_stream(fake, make_relayd, workers):
    """Review 72: every line reached journald at priority 6, so ``journalctl -p warning``
    found none of relayd's warnings or errors.  On the stream systemd names in
    JOURNAL_STREAM each line starts with its "<N>"; anywhere else lines stay plain JSON."""
    from relayd.logs import on_journal

    port, dead = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, extra_upstreams=f'  dead: {{url: "http://127.0.0.1:{dead}", '
                                 'provider: openai}', extra_routes="  - {path: /dead, upstream: dead}"),
                    args=["--workers", workers], start=False)
    r.log_path.write_bytes(b"")
    st = os.stat(r.log_path)
    r.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    r.start()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/dead/v1/x") as resp:
            assert resp.status == 502
    assert wait_for(lambda: any(l.get("event") == "upstream attempt failed" for l in r.logs()))
    lines = r.logs()
    assert all("_priority" in l for l in lines), [l for l in lines if "_priority" not in l][:3]
    want = {"info": 6, "warning": 4, "error": 3}
    assert all(l["_priority"] == want[l["level"]] for l in lines), lines
    assert {l["level"] for l in lines} >= {"info", "warning"}
    assert not on_journal(open(os.devnull))  # (this test process: no such variable for it)


def test_what_stops_relayd_reaches_the_journal_as_an_error(tmp_path):
    """Review 75: on the journal's stream the JSON lines carried priorities, but what
    relayd prints on stderr when it cannot start (a config that does not load) stayed at 6."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:1\nroutes: nope\n")
    err = tmp_path / "stderr.txt"
    err.write_bytes(b"")
    st = os.stat(err)
    with open(err, "ab") as f:
        p = subprocess.run([sys.executable, "-m", "relayd", "run", "-c", str(bad)], stderr=f,
                           stdout=subprocess.DEVNULL, timeout=30,
                           env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert p.returncode == 1
    lines = [l for l in err.read_text().splitlines() if l]
    assert lines and all(l.startswith("<3>") for l in lines), lines


def test_log_lines_lost_note_has_its_priority(monkeypatch):
    """The "log lines lost" note, written by the sink itself, is a warning on the journal."""
    from relayd import logs

    class Flaky:
        def __init__(self):
            self.fail, self.got = 1, ""

        def write(self, text):
            if self.fail:
                self.fail -= 1
                raise OSError("full")
            self.got += text

        def flush(self):
            pass

    monkeypatch.setattr(logs, "_warning", "<4>")
    stream = Flaky()
    sink = logs._Sink(stream)
    sink.fd = None
    sink.write('{"event":"a"}\n')
    sink.write('<6>{"event":"b"}\n')
    assert stream.got.startswith('<4>{"event": "log lines lost"'), stream.got


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_every_status_during_the_drain_says_draining(fake, make_relayd, tmp_path, workers):
    """Review 68: STOPPING=1 said "draining", the watchdog's next STATUS= did not, and
    ``systemctl status`` showed no drain in progress while streams were still running."""
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    port = free_port()
    r = make_relayd(basic_config(fake.url, port).replace("shutdown_grace: 5", "shutdown_grace: 2"),
                    env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}, args=["--workers", workers])
    sc = fake.add("drain-status", Scenario(body=b"data: 1\n\n" * 3, fault="stall", fault_at=9))
    fake.reset_stats()
    task = asyncio.create_task(read_stream(port, "/local/x", sc))
    await fake.has_requests(1)
    r.signal(signal.SIGTERM)
    after: list[str] = []
    stopping = False
    end = time.monotonic() + 1.6  # within the grace: the stream holds the drain open
    while time.monotonic() < end:
        try:
            m = (await asyncio.get_running_loop().run_in_executor(None, sock.recv, 4096)).decode()
        except socket.timeout:
            continue
        stopping = stopping or "STOPPING=1" in m
        if stopping and "STATUS=" in m:
            after.append(m)
    assert stopping and len(after) >= 2, after
    assert all("STATUS=draining; " in m for m in after), after
    assert r.proc.wait(10) == 0
    task.cancel()
    sock.close()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_notify_socket_nobody_reads_never_stops_relayd(fake, make_relayd, tmp_path, workers):
    """Review 41: sd_notify's send blocked once the socket's queue was full (10 datagrams
    here): the event loop stopped (no requests, no admin, SIGTERM not acted on)."""
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)  # and never read
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin), env={"NOTIFY_SOCKET": sock_path},
                    args=["--workers", workers])
    try:
        for i in range(15):  # each reload sends RELOADING=1 and READY=1
            r.signal(signal.SIGHUP)
            assert wait_for(lambda: sum(l.get("event") == "reload ok" for l in r.logs()) >= i + 1, 10)
        assert await route_status(port, "/local/echo") == 200
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin}/healthz") as resp:
                assert resp.status == 200
        r.signal(signal.SIGTERM)
        assert r.proc.wait(10) == 0
    finally:
        sock.close()


def test_sd_notify_abstract_socket(fake, make_relayd):
    name = f"relayd-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    make_relayd(basic_config(fake.url, free_port()), env={"NOTIFY_SOCKET": "@" + name})
    assert "READY=1" in sock.recv(4096).decode()
    sock.close()


# ------------------------------------------------------------------------------ logs, metrics, usage


USAGE_CASES = [
    ("/openai/v1/chat/completions", "openai-chat-usage.sse", "/openai"),
    ("/openai/v1/responses", "openai-responses.sse", "/openai"),
    ("/anthropic/v1/messages", "anthropic-messages.sse", "/anthropic"),
    ("/gemini/v1beta/models/m:streamGenerateContent?alt=sse", "gemini-stream.sse", "/gemini"),
]


def expected_usage(name: str) -> tuple[int, int]:
    body = fixture(name).decode()
    objs = [json.loads(d) for _, d in sse_events(fixture(name)) if d.startswith("{")]
    if name.startswith("openai-chat"):
        u = [o["usage"] for o in objs if o.get("usage")][-1]
        return u["prompt_tokens"], u["completion_tokens"]
    if name.startswith("openai-responses"):
        u = [o["response"]["usage"] for o in objs if o.get("type") == "response.completed"][0]
        return u["input_tokens"], u["output_tokens"]
    if name.startswith("anthropic"):
        start = [o for o in objs if o["type"] == "message_start"][0]["message"]["usage"]
        delta = [o for o in objs if o["type"] == "message_delta"][-1]["usage"]
        return start["input_tokens"], delta["output_tokens"]
    u = objs[-1]["usageMetadata"]
    return u["promptTokenCount"], u["candidatesTokenCount"] + u.get("thoughtsTokenCount", 0)


async def test_access_log_usage_metrics_and_redaction(fake, make_relayd):
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin))
    async with aiohttp.ClientSession() as s:
        for path, name, _ in USAGE_CASES:
            sc = fake.add(f"usage-{name}", Scenario(body=fixture(name), chunking="random", seed=9))
            async with s.post(aiohttp.client.URL(f"http://127.0.0.1:{port}{path}", encoded=True),
                              headers={"x-fake": sc, "Authorization": "Bearer client-secret-XYZ"}) as resp:
                assert await resp.read() == fixture(name)
        # a non-streaming JSON response with usage
        js = b'{"id":"c","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}'
        sc = fake.add("usage-json", Scenario(body=js, content_type="application/json"))
        async with s.post(f"http://127.0.0.1:{port}/openai/v1/chat/completions", headers={"x-fake": sc}) as resp:
            await resp.read()
        # a truncated stream: partial usage
        body = fixture("anthropic-messages.sse")
        sc = fake.add("usage-partial", Scenario(body=body, fault="reset", fault_at=body.index(b"event: content_block_stop")))
        async with s.post(f"http://127.0.0.1:{port}/anthropic/v1/messages", headers={"x-fake": sc}) as resp:
            await resp.read()
        # the provider's own error event after message_start: the stream ended as the
        # upstream ended it, but its output count is message_start's placeholder
        sc = fake.add("usage-provider-error", Scenario(body=fixture("anthropic-midstream-error.sse")))
        async with s.post(f"http://127.0.0.1:{port}/anthropic/v1/messages", headers={"x-fake": sc}) as resp:
            await resp.read()
        async with s.get(f"http://127.0.0.1:{port}/nowhere") as resp:
            await resp.read()
    access = r.wait_access(8)
    assert len(access) == 8
    for a, (path, name, route) in zip(access, USAGE_CASES):
        inp, out = expected_usage(name)
        assert a["usage"] == {"input_tokens": inp, "output_tokens": out, "partial": False}, (name, a)
        assert a["route"] == route and a["status"] == 200 and a["end_reason"] == "done"
        assert a["events"] >= 3 and a["bytes_out"] == len(fixture(name))
    assert access[4]["usage"] == {"input_tokens": 11, "output_tokens": 3, "partial": False}
    assert access[5]["usage"]["partial"] is True and access[5]["injected_error"] == "upstream_reset"
    assert access[6]["end_reason"] == "done" and access[6]["injected_error"] is None
    assert access[6]["usage"]["partial"] is True and access[6]["usage"]["output_tokens"] == 1
    fields = {"ts", "request_id", "method", "path", "route", "upstream", "attempts", "status", "end_reason",
              "ttfb_ms", "duration_ms", "bytes_in", "bytes_out", "events", "heartbeats", "injected_error",
              "client", "usage"}
    assert fields <= set(access[0])
    assert all(a["client"] == "127.0.0.1" for a in access)  # the peer's address
    assert access[7]["status"] == 404

    m = await get_metrics(admin)
    assert metric(m, "relayd_requests_total", route="/openai", status="200") == 3
    assert metric(m, "relayd_stream_end_total", route="/anthropic", reason="upstream_reset") == 1
    assert metric(m, "relayd_injected_errors_total", route="/anthropic", reason="upstream_reset") == 1
    assert metric(m, "relayd_tokens_total", route="/anthropic", kind="input") > 0
    total_in = sum(expected_usage(n)[0] for p, n, rt in USAGE_CASES if rt == "/openai") + 11
    assert metric(m, "relayd_tokens_total", route="/openai", kind="input") == total_in
    assert metric(m, "relayd_ttfb_seconds_count", route="/gemini") == 1
    assert metric(m, "relayd_bytes_total", route="/gemini", direction="out") == len(fixture("gemini-stream.sse"))
    assert metric(m, "relayd_upstream_attempts_total", upstream="openai", outcome="ok") == 3
    assert metric(m, "relayd_active_streams", route="/openai") == 0
    assert "relayd_breaker_open" in m and "relayd_heartbeats_total" in m and "relayd_stream_duration_seconds" in m

    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin}/healthz") as resp:
            assert resp.status == 200
        async with s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
            assert resp.status == 200

    r.stop()
    everything = Path(r.log_path).read_text() + r.stderr() + m
    for key in KEYS + ["client-secret-XYZ"]:
        assert key not in everything


async def test_active_streams_gauge_moves(fake, make_relayd):
    port, admin = free_port(), free_port()
    make_relayd(basic_config(fake.url, port, admin))
    sc = fake.add("gauge", Scenario(body=b"data: 1\n\n" * 20 + b"data: [DONE]\n\n", chunking="lines", delay=0.1))
    task = asyncio.create_task(read_stream(port, "/openai/v1/chat/completions", sc))
    assert await wait_metric(admin, "relayd_active_streams", 1, route="/openai") == 1
    await task
    assert await wait_metric(admin, "relayd_active_streams", 0, route="/openai") == 0


async def test_access_log_off_and_log_level(fake, make_relayd):
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top="workers: 1\naccess_log: false"))

    async def request(port: int, path: str) -> None:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}{path}") as resp:
                await resp.read()

    await request(port, "/local/off/echo")
    # access_log on again (a reload applies it): the next request's line is the only one,
    # so the first request, answered before, wrote none — no guessed wait needed.
    r.config.write_text(basic_config(fake.url, port, top="workers: 1\naccess_log: true"))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
    await request(port, "/local/on/echo")
    r.wait_access(1)
    assert [l["path"] for l in r.access()] == ["/local/on/echo"]

    # log_level filters relayd's own lines, not access lines (their switch is access_log)
    port2 = free_port()
    r2 = make_relayd(basic_config(fake.url, port2, top="workers: 1\nlog_level: warning"), name="warn.yaml",
                     start=False)
    r2.start(wait=False)  # (its "ready" line is an info line: not written)
    wait_port(port2)
    await request(port2, "/local/warn/echo")
    assert [l["path"] for l in r2.wait_access(1)] == ["/local/warn/echo"]
    assert not any(l.get("level") == "info" and l.get("event") != "access" for l in r2.logs())


async def test_pool_accounting_survives_client_disconnect_before_headers(fake, make_relayd):
    """A request cancelled while waiting for upstream headers must release its pool."""
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin))
    slow = fake.add("slow-headers", Scenario(body=b"{}", content_type="application/json", header_delay=30))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /local/x HTTP/1.1\r\nHost: x\r\nx-fake: {slow}\r\n\r\n".encode())
    await writer.drain()
    assert await wait_metric(admin, "relayd_upstream_inflight", 1, upstream="generic") == 1
    writer.transport.abort()  # client gone before the upstream answered
    # a leaked count would pin the pool open forever (a reload could never retire it)
    assert await wait_metric(admin, "relayd_upstream_inflight", 0, upstream="generic") == 0
    # its access line names the upstream it had reached (tokens may have been spent there)
    line = r.wait_access(1)[0]
    assert (line["end_reason"], line["upstream"], line["attempts"]) == ("client_gone", "generic", 1)
    # and the attempt is counted, under its own outcome
    assert await wait_metric(admin, "relayd_upstream_attempts_total", 1, upstream="generic",
                             outcome="cancelled") == 1


async def test_a_request_without_an_answer_at_the_end_of_grace_gets_503(fake, make_relayd):
    # The drain can stop a stream with an error event; a request still waiting for the
    # upstream's head has no stream yet: it gets a 503 in the provider's format, not an
    # unanswered close logged as the client's doing.
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top="workers: 1").replace(
        "shutdown_grace: 5", "shutdown_grace: 1").replace("first_byte: 5", "first_byte: 30"))
    slow = fake.add("no-head", Scenario(body=b"{}", content_type="application/json", header_delay=20))
    fake.reset_stats()
    async with aiohttp.ClientSession() as s:
        async def ask(route: str) -> tuple[int, dict[str, Any], str]:
            async with s.post(f"http://127.0.0.1:{port}{route}", json={}, headers={"x-fake": slow}) as resp:
                return resp.status, await resp.json(), resp.headers.get("Connection", "")

        tasks = [asyncio.create_task(ask(p)) for p in ("/openai/v1/chat/completions", "/anthropic/v1/messages")]
        await fake.has_requests(2)
        r.signal(signal.SIGTERM)
        (so, oai, conn), (sa, ant, _) = await asyncio.gather(*tasks)
    assert so == sa == 503 and conn.lower() == "close"
    assert oai["error"]["code"] == "shutdown" and "shutting down" in oai["error"]["message"]
    assert ant["type"] == "error" and ant["error"]["type"] == "overloaded_error"
    assert await asyncio.get_running_loop().run_in_executor(None, r.proc.wait, 10) == 0
    ends = [l["end_reason"] for l in r.logs() if l.get("event") == "access"]
    assert ends == ["shutdown", "shutdown"]


@pytest.mark.parametrize("workers", [1, 2])
def test_admin_connections_that_send_no_request_are_closed(fake, make_relayd, workers):
    """Review 80: the admin listener had no head deadline and an hour's keep-alive: idle
    connections, or half a head, stayed open for good, until the descriptors ran out and
    the proxy itself failed.  Each must complete a request within client_header."""
    port, admin = free_port(), free_port()
    make_relayd(basic_config(fake.url, port, admin, top="limits: {client_header: 1s, client_keepalive: 3s}"),
                args=["--workers", str(workers)])
    silent = socket.create_connection(("127.0.0.1", admin), 5)
    half = socket.create_connection(("127.0.0.1", admin), 5)
    half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    answered = socket.create_connection(("127.0.0.1", admin), 5)
    answered.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answered.settimeout(5)
    assert answered.recv(65536).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    for s in (silent, half, answered):
        s.settimeout(5)
        try:
            assert s.recv(65536) == b""  # closed
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 3.5, time.monotonic() - t0
        s.close()
    # a scraper that asks within the limit keeps its connection
    with socket.create_connection(("127.0.0.1", admin), 5) as s:
        s.settimeout(5)
        for _ in range(4):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(0.5)

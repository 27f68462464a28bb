"""Multi-core: a main process supervising 2 workers, as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import aiohttp
import pytest

from conftest import basic_config
from fakes import Scenario, free_port
from test_operations import get_metrics, metric, read_stream, wait_for

TWO = "workers: 2"


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def ready_line(r) -> dict:
    return next(l for l in r.logs() if l.get("event") == "ready")


async def get(port: int, path: str) -> int:
    """One request on its own connection, so the kernel may give it to either worker."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(f"http://127.0.0.1:{port}{path}") as resp:
            await resp.read()
            return resp.status


def stream_body(n: int) -> bytes:
    events = [f'data: {{"i":{i},"pad":"{"x" * 40}"}}\n\n'.encode() for i in range(n)]
    return b"".join(events) + b"data: [DONE]\n\n"


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def client_conns(pid: int, port: int) -> int:
    """Established connections to `port` that process `pid` holds (its accepted clients)."""
    inodes = socket_inodes(pid)
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[3] == "01" and int(cols[1].split(":")[1], 16) == port and cols[9] in inodes:
                n += 1
    return n


async def spread(port: int, pids: list[int], sc: str, fake, batch: int, batches: int = 5):
    """Stream tasks, started in batches until every worker holds some of them: which
    worker accepts a connection is the kernel's choice (one may take a burst alone)."""
    tasks: list[asyncio.Task] = []
    for _ in range(batches):
        for _ in range(batch):
            tasks.append(asyncio.create_task(read_stream(port, "/openai/v1/chat/completions", sc)))
            await asyncio.sleep(0.005)
        await fake.has_requests(len(tasks))
        if all(client_conns(pid, port) for pid in pids):
            break
    assert all(client_conns(pid, port) for pid in pids)
    return tasks


async def test_reload_storm_over_two_workers_drops_nothing(fake, make_relayd):
    port, admin = free_port(), free_port()
    config_a = basic_config(fake.url, port, admin, top=TWO)
    config_b = config_a + "  - {path: /extra, upstream: generic}\n"
    r = make_relayd(config_a)
    body = stream_body(20)
    sc = fake.add("wstorm", Scenario(body=body, chunking="lines", delay=0.05))  # ~1 s per stream

    async def storm():
        await asyncio.sleep(0.2)
        for i in range(15):
            r.config.write_text(config_b if i % 2 == 0 else config_a)
            r.signal(signal.SIGHUP)
            await asyncio.sleep(0.1)
        r.config.write_text(config_b)
        r.signal(signal.SIGHUP)

    fake.reset_stats()
    pids = ready_line(r)["worker_pids"]
    storming = asyncio.create_task(storm())
    tasks = await spread(port, pids, sc, fake, 25)
    results = await asyncio.gather(*tasks)
    await storming
    assert all(got == body for got, _ in results)
    n = len(tasks)
    access = r.wait_access(n)
    assert len(access) == n and all(a["status"] == 200 and a["end_reason"] == "done" for a in access)
    assert {a["worker"] for a in access} == {0, 1}
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
    streak, end = 0, time.monotonic() + 5
    while streak < 8 and time.monotonic() < end:  # the newest file reached both workers
        streak = streak + 1 if await get(port, "/extra/echo") == 200 else 0
    assert streak == 8
    assert not [l for l in r.logs() if "worker exited" in l.get("event", "")]


async def test_invalid_reload_is_rejected_once_and_never_reaches_a_worker(fake, make_relayd):
    port, admin = free_port(), free_port()
    good = basic_config(fake.url, port, admin, top=TWO)
    r = make_relayd(good)
    pids = set(ready_line(r)["worker_pids"])
    r.config.write_text(good.replace("provider: anthropic", "provider: anthropik"))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload failed" for l in r.logs()))
    for _ in range(10):
        assert await get(port, "/anthropic/echo") == 200
    failed = [l for l in r.logs() if l.get("event") == "reload failed"]
    assert len(failed) == 1 and "worker" not in failed[0]
    assert not [l for l in r.logs() if l.get("event") == "config swapped"]
    assert children(r.proc.pid) == pids
    m = await get_metrics(admin)
    assert metric(m, "relayd_reloads_total", result="failed") == 1
    assert metric(m, "relayd_config_generation") == 1


async def test_a_huge_invalid_reload_does_not_stall_the_main_process(fake, make_relayd):
    """3 MiB of bad lines: the main process parsed them on its loop (a minute, no
    watchdog ping, no /healthz) and logged every problem in one 300 MB line.  It parses
    beside its loop now, and lists a hundred problems."""
    port, admin = free_port(), free_port()
    good = basic_config(fake.url, port, admin, top=TWO)
    r = make_relayd(good)
    r.config.write_text(good + "".join(f"bogus{i}: 1\n" for i in range(150000)))
    r.signal(signal.SIGHUP)
    slowest = 0.0
    while not any(l.get("event") == "reload failed" for l in r.logs()):
        start = time.monotonic()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin}/healthz") as resp:
                assert resp.status == 200
        slowest = max(slowest, time.monotonic() - start)
        assert slowest < 0.5, slowest
        await asyncio.sleep(0.05)
    failed = [l for l in r.logs() if l.get("event") == "reload failed"][0]
    assert len(failed["errors"]) == 101 and failed["errors"][-1].endswith("more problems")
    assert await get(port, "/anthropic/echo") == 200


@pytest.mark.parametrize("workers", ["workers: 1", TWO])
def test_a_stop_during_a_long_reload_parse_exits_at_once(fake, make_relayd, workers):
    """SIGTERM while the main process parses a large reloaded file: the drain and exit
    do not wait for the parse (asyncio.run waited for its executor thread; then the
    interpreter's exit waited for the parser, which holds it), and its result is not
    logged after "exit"."""
    port = free_port()
    good = basic_config(fake.url, port, top=workers)
    r = make_relayd(good)
    r.config.write_text(good + "".join(f"  - {{path: /r{i}, upstream: generic}}\n" for i in range(80000))
                        + "bogus: 1\n")
    r.signal(signal.SIGHUP)
    time.sleep(0.3)
    start = time.monotonic()
    r.signal(signal.SIGTERM)
    r.proc.wait(10)
    # (the parse takes several seconds: the process, its port and its unit went with it)
    assert time.monotonic() - start < 1.5, time.monotonic() - start
    events = [l.get("event") for l in r.logs()]
    assert "exit" in events and "reload failed" not in events[events.index("exit"):]


async def test_killed_worker_is_restarted_while_the_other_serves(fake, make_relayd):
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin, top=TWO))
    victim, other = ready_line(r)["worker_pids"]
    os.kill(victim, signal.SIGKILL)
    for _ in range(20):  # the survivor serves while the victim is reaped and restarted
        assert await get(port, "/local/echo") == 200
    assert wait_for(lambda: any(l.get("event") == "worker exited unexpectedly; restarting"
                                for l in r.logs()))
    crash = next(l for l in r.logs() if l.get("event") == "worker exited unexpectedly; restarting")
    assert crash["pid"] == victim and crash["signal"] == "SIGKILL" and crash["level"] == "error"
    assert wait_for(lambda: len(children(r.proc.pid) - {other}) == 1 and victim not in children(r.proc.pid))
    new = (children(r.proc.pid) - {other}).pop()
    assert wait_for(lambda: any(l.get("event") == "worker serving" and l.get("pid") == new
                                for l in r.logs()))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["workers_serving"] == 2
    for _ in range(10):
        assert await get(port, "/local/echo") == 200


async def test_a_worker_killed_after_a_reload_comes_back_on_the_reloaded_config(fake, make_relayd):
    """A restarted worker applies the current generation before it listens (it crashed
    on that, restart after restart, once any reload had happened)."""
    port, admin = free_port(), free_port()
    config_a = basic_config(fake.url, port, admin, top=TWO)
    r = make_relayd(config_a)
    r.config.write_text(config_a + "  - {path: /extra, upstream: generic}\n")
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
    victim, other = ready_line(r)["worker_pids"]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(children(r.proc.pid) - {other}) == 1 and victim not in children(r.proc.pid))
    new = (children(r.proc.pid) - {other}).pop()
    assert wait_for(lambda: any(l.get("event") == "worker serving" and l.get("pid") == new
                                for l in r.logs()))
    assert not [l for l in r.logs() if l.get("event") == "worker could not start; retrying"
                or (l.get("event") == "worker exited unexpectedly; restarting" and l.get("pid") != victim)]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["workers_serving"] == 2
    for _ in range(20):  # both workers, the new one included, have the reloaded route
        assert await get(port, "/extra/echo") == 200
    m = await get_metrics(admin)
    assert metric(m, "relayd_config_generation") == 2


async def close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, w in conns:
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


async def test_a_burst_of_connections_is_spread_over_the_workers(fake, make_relayd):
    """One SO_REUSEPORT socket per worker: the kernel spreads new connections.  With one
    shared socket the first worker to wake accepted the whole queue (a burst of 60 went
    60 to 0), so a batch of streams landed on one core."""
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=TWO))
    pids = ready_line(r)["worker_pids"]
    for _ in range(3):
        conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(100)))
        try:
            assert wait_for(lambda: sum(client_conns(p, port) for p in pids) == 100)
            each = [client_conns(p, port) for p in pids]
            assert min(each) >= 25, f"accepted per worker: {each}"
        finally:
            await close_all(conns)
        assert wait_for(lambda: sum(client_conns(p, port) for p in pids) == 0)


async def test_a_restarted_worker_listens_again(fake, make_relayd):
    """A dead worker's socket is closed at once (connections would queue on it for nobody)
    and its restart joins the group with a new one: every connection is served, then and
    after, and the new worker takes its share."""
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=TWO))
    victim, other = ready_line(r)["worker_pids"]
    os.kill(victim, signal.SIGKILL)
    for _ in range(30):
        assert await get(port, "/local/echo") == 200
    assert wait_for(lambda: len(children(r.proc.pid) - {other}) == 1 and victim not in children(r.proc.pid))
    new = (children(r.proc.pid) - {other}).pop()
    assert wait_for(lambda: any(l.get("event") == "worker serving" and l.get("pid") == new
                                for l in r.logs()))
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(60)))
    try:
        assert wait_for(lambda: client_conns(new, port) + client_conns(other, port) == 60)
        assert client_conns(new, port) >= 10
    finally:
        await close_all(conns)


def test_a_second_relayd_on_the_same_port_is_refused(fake, make_relayd, tmp_path):
    """SO_REUSEPORT must not let a second instance join the first one's group and take
    half its connections: the address is bound once without it first."""
    port = free_port()
    make_relayd(basic_config(fake.url, port, top=TWO))
    cfg = tmp_path / "second.yaml"
    cfg.write_text(basic_config(fake.url, port, top=TWO))
    out = subprocess.run([sys.executable, "-m", "relayd", "run", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (listen)" in out.stderr and "in use" in out.stderr


async def streams_on_both(fake, make_relayd, events: int, batch: int):
    """Two workers, each holding some streams of `events` events 50 ms apart: (relayd,
    port, worker pids, the body each stream must get, the stream tasks)."""
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=TWO))
    pids = ready_line(r)["worker_pids"]
    body = stream_body(events)
    sc = fake.add(f"both{events}", Scenario(body=body, chunking="lines", delay=0.05))
    fake.reset_stats()
    return r, port, pids, body, await spread(port, pids, sc, fake, batch)


async def test_drain_completes_streams_on_both_workers(fake, make_relayd):
    r, port, pids, body, tasks = await streams_on_both(fake, make_relayd, 30, 6)  # ~1.5 s
    r.signal(signal.SIGTERM)
    results = await asyncio.gather(*tasks)
    assert all(got == body for got, _ in results)
    code = await asyncio.get_running_loop().run_in_executor(None, r.proc.wait, 10)
    assert code == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()
    access = r.access()
    assert len(access) == len(tasks) and {a["worker"] for a in access} == {0, 1}
    assert all(a["end_reason"] == "done" for a in access)
    assert r.logs()[-1]["event"] == "exit" and r.logs()[-1]["code"] == 0


async def test_metrics_are_summed_over_workers(fake, make_relayd):
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin, top=TWO))
    for _ in range(4):  # until the kernel has handed requests to both workers (bounded)
        for _ in range(10):
            assert await get(port, "/local/echo") == 200
        if len({a["worker"] for a in r.wait_access(10)}) == 2:
            break
    n = len(r.wait_access(1))
    assert {a["worker"] for a in r.access()} == {0, 1}
    m = await get_metrics(admin)
    assert metric(m, "relayd_requests_total", route="/local", status="200") == n
    assert metric(m, "relayd_upstream_attempts_total", upstream="generic", outcome="ok") == n
    assert metric(m, "relayd_upstream_inflight", upstream="generic") == 0
    assert metric(m, "relayd_config_generation") == 1


def test_sd_notify_comes_from_the_main_process_only(fake, make_relayd, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(5)
    r = make_relayd(basic_config(fake.url, free_port(), top=TWO), env={"NOTIFY_SOCKET": path},
                    start=False)
    r.start(wait=False)
    got: list[tuple[int, str]] = []

    def recv_until(word: str) -> str:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next(struct.unpack("3i", d)[0] for lvl, typ, d in anc
                       if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS)
            got.append((pid, data.decode()))
            if word in data.decode():
                return data.decode()
        raise AssertionError(got)

    assert "STATUS=config generation 1; 2/2 workers serving" in recv_until("READY=1")
    r.wait_ready()
    r.signal(signal.SIGHUP)
    recv_until("RELOADING=1")
    assert "config generation 2" in recv_until("READY=1")
    r.signal(signal.SIGTERM)
    recv_until("STOPPING=1")
    assert r.proc.wait(10) == 0
    assert {pid for pid, _ in got} == {r.proc.pid}, got
    sock.close()


async def test_workers_1_is_one_process(fake, make_relayd):
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=TWO), args=["--workers", "1", "--loop", "asyncio"])
    start = next(l for l in r.logs() if l.get("event") == "start")
    assert start["workers"] == 1 and start["loop"] == "asyncio"
    assert children(r.proc.pid) == set()
    assert await get(port, "/local/echo") == 200
    assert "worker" not in r.wait_access(1)[0]
    r.stop()
    assert r.proc.returncode == 0


def test_default_is_usable_cpus_on_uvloop(fake, make_relayd):
    r = make_relayd(basic_config(fake.url, free_port()))
    start = next(l for l in r.logs() if l.get("event") == "start")
    assert start["workers"] == len(os.sched_getaffinity(0)) and start["loop"] == "uvloop"


def test_workers_auto_on_the_command_line_overrides_the_config(fake, make_relayd):
    # "auto" was parsed to None, which read as "not given": the config's workers: 1 stayed.
    r = make_relayd(basic_config(fake.url, free_port(), top="workers: 1"), args=["--workers", "auto"])
    start = next(l for l in r.logs() if l.get("event") == "start")
    assert start["workers"] == len(os.sched_getaffinity(0)) > 1


def test_loop_uvloop_without_uvloop_says_so(monkeypatch, capsys, tmp_path):
    import importlib.util
    from relayd import cli
    cfg = tmp_path / "c.yaml"
    cfg.write_text(basic_config("http://127.0.0.1:9", free_port()))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "uvloop" else real(n, *a))
    assert cli.main(["run", "-c", str(cfg), "--loop", "uvloop"]) == 2
    assert "uvloop is not installed" in capsys.readouterr().err

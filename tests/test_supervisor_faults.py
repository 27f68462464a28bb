"""The main process with workers when something goes wrong: fork or socketpair failing,
a worker drained or hung on its own, fds a restarted worker must not inherit.

Faults the kernel gives only under real pressure (EAGAIN from fork under TasksMax,
EMFILE) are injected by a ``sitecustomize`` on the real ``relayd run`` process: while a
trigger file exists, the named call fails as the kernel would make it fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import socket
import signal
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from conftest import basic_config
from fakes import Scenario, free_port
from test_operations import get_metrics, metric, wait_for
from test_workers import TWO, children, get, ready_line, socket_inodes, spread, stream_body, streams_on_both

SITECUSTOMIZE = '''
import errno, os, socket
_trigger = os.environ["RELAYD_TEST_TRIGGER"]
_fork, _socketpair = os.fork, socket.socketpair

def fork():
    if os.path.exists(_trigger + ".fork"):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
    return _fork()

def socketpair(*args, **kwargs):
    if os.path.exists(_trigger + ".socketpair"):
        raise OSError(errno.EMFILE, "Too many open files")
    return _socketpair(*args, **kwargs)

os.fork, socket.socketpair = fork, socketpair

import ssl
_context = ssl.create_default_context

def create_default_context(*args, cafile=None, **kwargs):  # a pool's, not ca_file's validation
    if cafile is None and os.path.exists(_trigger + ".ssl"):
        raise ssl.SSLError("injected: pool cannot be built")
    return _context(*args, cafile=cafile, **kwargs)

ssl.create_default_context = create_default_context

import relayd.config as _config
_load = _config.load

def load(*args, **kwargs):  # a bug in the loader: an exception that is not a ConfigError
    if os.path.exists(_trigger + ".load"):
        raise RuntimeError("injected: loader bug")
    return _load(*args, **kwargs)

_config.load = load
'''


def faulty(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment that loads the fault injector, and the trigger's path prefix."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.environ.get("PYTHONPATH")
    trigger = tmp_path / "fail"
    return {"PYTHONPATH": f"{site}{os.pathsep}{path}" if path else str(site),
            "RELAYD_TEST_TRIGGER": str(trigger)}, trigger


def blocked_signals(pid: int) -> set[int]:
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(l for l in f if l.startswith("SigBlk:")).split()[1], 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


async def readyz(admin: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
            return resp.status, await resp.json()


def events(r, name: str) -> list[dict]:
    return [l for l in r.logs() if l.get("event") == name]


@pytest.mark.parametrize("call", ["fork", "socketpair"])
async def test_a_restart_whose_fork_or_socketpair_fails_is_logged_and_retried(
        fake, make_relayd, tmp_path, call):
    """fork() failing (EAGAIN under TasksMax) or socketpair() (EMFILE) on a restart escaped
    a timer callback unlogged: the slot was never restarted, its socket stayed in the
    group with nobody accepting, and after a failed fork SIGTERM/SIGHUP stayed blocked."""
    env, trigger = faulty(tmp_path)
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin, top=TWO), env=env)
    victim, other = ready_line(r)["worker_pids"]
    Path(f"{trigger}.{call}").touch()
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(events(r, "worker could not start; retrying")) >= 2)
    failed = events(r, "worker could not start; retrying")[0]
    assert failed["level"] == "error" and failed["worker"] is not None
    assert ("Resource temporarily" if call == "fork" else "Too many open files") in failed["error"]
    assert not {signal.SIGTERM, signal.SIGHUP, signal.SIGINT} & blocked_signals(r.proc.pid)
    for _ in range(20):  # the failed slot's socket left the group: nothing hangs
        assert await asyncio.wait_for(get(port, "/local/echo"), 2) == 200
    Path(f"{trigger}.{call}").unlink()
    assert wait_for(lambda: len(children(r.proc.pid) - {other}) == 1
                    and victim not in children(r.proc.pid))
    new = (children(r.proc.pid) - {other}).pop()
    assert wait_for(lambda: any(l.get("pid") == new for l in events(r, "worker serving")))
    status, body = await readyz(admin)
    assert status == 200 and body["workers_serving"] == 2
    started = time.monotonic()
    r.signal(signal.SIGTERM)
    assert r.proc.wait(10) == 0 and time.monotonic() - started < 5


def test_an_exception_escaping_a_loop_callback_is_logged_as_an_error(capsys):
    """asyncio's default handler writes to the "asyncio" logger, which relayd silences:
    an exception in a timer callback (a worker restart) used to vanish."""
    from relayd import logs

    def fail() -> None:
        raise ZeroDivisionError("in a callback")

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(logs.loop_exception)
        asyncio.get_running_loop().call_soon(fail)
        await asyncio.sleep(0.01)

    logs.configure("info")
    asyncio.run(main())
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["event"] == "unexpected error in the event loop" and line["level"] == "error"
    assert "fail" in line["where"] and "ZeroDivisionError: in a callback" in line["exception"]


async def test_restarts_that_keep_failing_back_off(fake, make_relayd, tmp_path):
    """A failed attempt counts as a start: "dying young" was measured from the last
    successful start, so a slot whose fork kept failing more than 5 s after it was
    retried every 0.1 s forever.  A crash of an old worker waits 0.1 s; the first
    attempt that dies young too, then 0.2, 0.4, 0.8 s (README)."""
    env, trigger = faulty(tmp_path)
    r = make_relayd(basic_config(fake.url, free_port(), top=TWO), env=env)
    victim, _ = ready_line(r)["worker_pids"]
    started = next(l for l in events(r, "worker serving") if l["pid"] == victim)
    assert wait_for(lambda: time.time() - datetime.fromisoformat(started["ts"]).timestamp() > 5.2, 10)
    Path(f"{trigger}.fork").touch()
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(events(r, "worker could not start; retrying")) >= 4, 10)
    Path(f"{trigger}.fork").unlink()
    crash = events(r, "worker exited unexpectedly; restarting")[0]
    assert crash["restart_in_s"] == 0.1 and crash["crash_loop"] == 0
    retries = events(r, "worker could not start; retrying")[:4]
    assert [l["restart_in_s"] for l in retries] == [0.1, 0.2, 0.4, 0.8]
    assert [l["crash_loop"] for l in retries] == [1, 2, 3, 4]


async def test_a_dead_workers_last_ready_message_does_not_mark_its_slot_ready(
        tmp_path, monkeypatch):
    """A worker that said "ready" and died at once: the message can be read after the
    worker was reaped (or its slot restarted with a new channel), and it marked the slot
    ready, /readyz 200 with nobody serving it."""
    from prometheus_client import values
    from relayd import config, logs, workers
    from relayd.supervisor import Supervisor

    logs.configure("info")  # on this test's stdout

    monkeypatch.setattr(values, "ValueClass", values.ValueClass)  # Supervisor switches it
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    path = tmp_path / "relayd.yaml"
    path.write_text(basic_config("http://127.0.0.1:9", free_port(), top=TWO))
    sup = Supervisor(str(path), config.load(str(path)), 2, "asyncio")
    try:
        for replaced in (True, False):
            slot = sup.slots[0]
            ours, theirs = socket.socketpair()
            chan = workers.Channel(ours)
            slot.chan, slot.pid, slot.ready = chan, 12345, False
            if replaced:  # reaped: restarted on a new channel, or not yet
                slot.chan, slot.pid = workers.Channel(spare := socket.socket()), None
                spare.close()
            data = pickle.dumps(("ready", 1))
            theirs.sendall(len(data).to_bytes(4, "big") + data)
            theirs.close()
            await asyncio.wait_for(sup._listen(slot, chan), 5)
            assert slot.ready is not replaced
    finally:
        shutil.rmtree(sup.dir, ignore_errors=True)


def listening_inodes(port: int) -> set[str]:
    with open("/proc/net/tcp") as f:
        return {cols[9] for cols in (l.split() for l in f.readlines()[1:])
                if cols[3] == "0A" and int(cols[1].split(":")[1], 16) == port}


def server_side_inode(port: int, peer_port: int) -> str:
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if (int(cols[1].split(":")[1], 16), int(cols[2].split(":")[1], 16)) == (port, peer_port):
                return cols[9]
    raise AssertionError(f"no connection 127.0.0.1:{port} <- {peer_port}")


async def test_a_restarted_worker_holds_none_of_the_main_process_fds(fake, make_relayd):
    """A worker forked while an admin connection was open inherited it: the main process
    answered `Connection: close` and closed its copy, and the client never saw EOF."""
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin, top=TWO))
    victim, other = ready_line(r)["worker_pids"]
    reader, writer = await asyncio.open_connection("127.0.0.1", admin)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b'{"status": "ok"}'), 5))
    inode = server_side_inode(admin, writer.get_extra_info("sockname")[1])
    assert inode in socket_inodes(r.proc.pid)
    os.kill(victim, signal.SIGKILL)

    def restarted() -> list[int]:
        return [l["pid"] for l in events(r, "worker serving") if l.get("pid") not in (victim, other)]

    assert wait_for(lambda: restarted(), 10), r.logs()[-10:]
    new = restarted()[0]
    crashed = [l for l in events(r, "worker exited unexpectedly; restarting") if l.get("pid") != victim]
    assert not crashed, crashed  # (the restart itself did not die)
    assert inode not in socket_inodes(new)
    # it shares nothing with the main process but its own listening socket
    assert socket_inodes(new) & socket_inodes(r.proc.pid) == listening_inodes(port) & socket_inodes(new)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 3)  # EOF once the main process closes it
    assert rest.startswith(b"HTTP/1.1 200")
    writer.close()


def test_ctrl_c_on_every_process_replaces_no_worker_and_says_none(fake, make_relayd):
    """Review 81: Ctrl-C in a terminal signals every process; the workers said they were
    draining before the main process took its own signal, and it logged "starting its
    replacement" for each (none was started: the drain cancelled the restarts)."""
    r = make_relayd(basic_config(fake.url, free_port(), top=TWO))
    workers = sorted(children(r.proc.pid))
    for pid in workers:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.03)  # their "draining" reaches the main process first
    os.kill(r.proc.pid, signal.SIGINT)
    assert r.proc.wait(20) == 0
    assert not events(r, "worker draining; starting its replacement")
    assert events(r, "drain")


async def test_a_worker_sent_sigterm_alone_is_replaced_while_it_drains(fake, make_relayd):
    """The main process kept its copy of the draining worker's socket in the group until
    the worker was reaped: a share of new connections hung for the whole drain, and the
    clean exit was logged as a crash ("worker exited unexpectedly", exit_code 0)."""
    r, port, pids, body, streams = await streams_on_both(fake, make_relayd, 40, 4)  # ~2 s
    victim = pids[0]
    os.kill(victim, signal.SIGTERM)
    assert wait_for(lambda: events(r, "worker draining; starting its replacement"))
    for _ in range(20):  # while it drains: every new connection is answered
        assert await asyncio.wait_for(get(port, "/local/echo"), 2) == 200
    assert all(got == body for got, _ in await asyncio.gather(*streams))
    assert wait_for(lambda: events(r, "worker drained"))
    assert events(r, "worker drained")[0]["pid"] == victim
    assert events(r, "worker drained")[0]["exit_code"] == 0
    assert not events(r, "worker exited unexpectedly; restarting")
    assert wait_for(lambda: victim not in children(r.proc.pid) and len(children(r.proc.pid)) == 2)
    assert r.stop() == 0


def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.1)
    return sock


def received(sock: socket.socket, into: list[str]) -> list[str]:
    while True:
        try:
            into.append(sock.recv(4096).decode())
        except (socket.timeout, BlockingIOError):
            return into


async def test_a_hung_worker_is_not_ready_withholds_the_watchdog_and_is_killed(
        fake, make_relayd, tmp_path):
    """A stopped worker (SIGSTOP; a stuck event loop alike) kept /readyz 200 and the
    WATCHDOG=1 pings going.  Now: not serving after 3 s of silence, no WATCHDOG=1 while it
    is silent, SIGKILLed after half of WatchdogSec (here 2 s, so after 3 s) and restarted."""
    port, admin = free_port(), free_port()
    sock = notify_socket(tmp_path)
    r = make_relayd(basic_config(fake.url, port, admin, top=TWO),
                    env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"})
    victim, other = ready_line(r)["worker_pids"]
    msgs: list[str] = []
    assert wait_for(lambda: any("WATCHDOG=1" in m for m in received(sock, msgs)))
    os.kill(victim, signal.SIGSTOP)
    try:
        assert wait_for(lambda: events(r, "worker not answering; killing it"), 8)
        assert events(r, "worker not answering; killing it")[0]["pid"] == victim
        status = [m for m in received(sock, msgs) if "1/2 workers serving" in m]
        assert status and not any("WATCHDOG=1" in m for m in status)
        assert wait_for(lambda: victim not in children(r.proc.pid) and len(children(r.proc.pid)) == 2)
        new = (children(r.proc.pid) - {other}).pop()
        assert wait_for(lambda: any(l.get("pid") == new for l in events(r, "worker serving")))
        n = len(received(sock, msgs))
        assert wait_for(lambda: any("WATCHDOG=1" in m and "2/2 workers serving" in m
                                    for m in received(sock, msgs)[n:]))
        assert (await readyz(admin))[0] == 200
    finally:
        if victim in children(r.proc.pid):
            os.kill(victim, signal.SIGCONT)
        sock.close()


def test_a_worker_building_a_large_reloaded_config_is_given_time(fake, make_relayd):
    """Review 77: a worker answers no ping while it builds a new config, and one that took
    longer than the kill delay was killed, and every restart killed again while building
    it: every worker down for good.  A worker building a config (taking a reload, or
    starting) now gets ten times the main process's own parse of it.  Here, after a reload
    to 16,000 upstreams (a parse of about half a second on this machine), a restarted worker is
    stopped at its start-up past the kill delay (3 s)."""
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=TWO), env={"WATCHDOG_USEC": "2000000"})
    victim, other = ready_line(r)["worker_pids"]
    many = "".join(f"  u{i}: {{url: \"{fake.url}\", provider: openai}}\n" for i in range(16000))
    r.config.write_text(basic_config(fake.url, port, top=TWO, extra_upstreams=many))
    r.signal(signal.SIGHUP)
    # ("reload incomplete" where the workers took more than 3 s to build it: they answer
    # no ping meanwhile, and the reload stops waiting for them; they swap all the same)
    assert wait_for(lambda: events(r, "reload ok") or events(r, "reload incomplete"), 60)
    assert wait_for(lambda: {l.get("worker") for l in events(r, "config swapped")
                             if l.get("generation") == 2} == {0, 1}, 60)
    assert not events(r, "worker not answering; killing it")  # (nor while they built it)
    parse = (events(r, "reload ok") or events(r, "reload incomplete"))[0]["parse_s"]  # allowance: 10x this
    if parse < 0.45:
        pytest.skip(f"the parse took {parse:.2f} s: too fast here to give the allowance room")
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(children(r.proc.pid) - {other, victim}) == 1, 10)
    fresh = (children(r.proc.pid) - {other, victim}).pop()
    os.kill(fresh, signal.SIGSTOP)  # a start-up building 16,000 pools, made slow
    try:
        time.sleep(3.6)  # past the kill delay (3 s), within the allowance (4.5 s or more)
        assert not events(r, "worker not answering; killing it")
    finally:
        os.kill(fresh, signal.SIGCONT)
    assert wait_for(lambda: any(l.get("pid") == fresh for l in events(r, "worker serving")), 60)
    assert not events(r, "worker not answering; killing it")


async def test_a_reload_with_a_hung_worker_is_logged_incomplete(fake, make_relayd):
    """With a stopped worker a reload waited 30 s and was logged "reload ok"."""
    port, admin = free_port(), free_port()
    config = basic_config(fake.url, port, admin, top=TWO)
    r = make_relayd(config)
    victim, other = ready_line(r)["worker_pids"]
    os.kill(victim, signal.SIGSTOP)
    try:
        assert wait_for(lambda: events(r, "worker not answering"), 6)
        status, body = await readyz(admin)
        assert status == 503 and body["workers_serving"] == 1
        r.config.write_text(config + "  - {path: /extra, upstream: generic}\n")
        r.signal(signal.SIGHUP)
        assert wait_for(lambda: events(r, "reload incomplete"), 5)
        line = events(r, "reload incomplete")[0]
        assert line["level"] == "warning" and line["workers_behind"] == [0]  # (worker_pids[0])
        assert not events(r, "reload ok")
    finally:
        os.kill(victim, signal.SIGCONT)
    assert wait_for(lambda: events(r, "worker answering again"), 5)  # and it catches up
    assert wait_for(lambda: any(l.get("generation") == 2 and l.get("worker") == 0
                                for l in events(r, "config swapped")), 5)
    assert (await readyz(admin))[0] == 200


def test_changing_workers_on_reload_warns_that_it_needs_a_restart(fake, make_relayd):
    """It was ignored without a word (as listener changes are, with a warning)."""
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=TWO))
    pids = children(r.proc.pid)
    r.config.write_text(basic_config(fake.url, port, top="workers: 3"))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: events(r, "reload ok"))
    warning = events(r, "workers changes need a restart; keeping the running workers")
    assert warning and warning[0]["level"] == "warning"
    assert (warning[0]["workers"], warning[0]["wanted"]) == (2, 3)
    assert children(r.proc.pid) == pids


def test_the_workers_warning_compares_the_running_count(fake, make_relayd):
    """Review 77: it compared the files, not what runs.  Started with ``workers: 2`` in
    the file and ``--workers 1``, a file saying ``workers: 1`` warned (2 wanted 1); a
    file saying ``auto`` where auto is the running count warned too."""
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=TWO), args=["--workers", "1"])
    r.config.write_text(basic_config(fake.url, port, top="workers: 1"))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: events(r, "reload ok"))
    cpus = len(os.sched_getaffinity(0))
    r.config.write_text(basic_config(fake.url, port, top="workers: auto"))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: len(events(r, "reload ok")) == 2)
    warned = events(r, "workers changes need a restart; keeping the running workers")
    if cpus == 1:
        assert not warned
    else:
        assert [(w["workers"], w["wanted"]) for w in warned] == [(1, f"auto ({cpus})")]


@pytest.mark.parametrize("workers", ["workers: 1", TWO])
@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"])
def test_a_stalled_tls_handshake_is_closed_after_client_header(
        fake, make_relayd, tmp_path, workers, sent):
    """The handshake was not covered by limits.client_header: a client that connected and
    sent nothing (or half a ClientHello) held its connection for asyncio's 60 s."""
    from test_tls import make_cert
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    cert, key = make_cert(tmp_path / "tls", "relayd", 1)
    port = free_port()
    make_relayd(basic_config(fake.url, port, top=f"tls: {{cert: '{cert}', key: '{key}'}}\n"
                             f"limits: {{client_header: 1s}}\n{workers}"))
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(sent)
        s.settimeout(4)
        started = time.monotonic()
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("workers", [TWO, "workers: 1"])
async def test_a_reload_the_workers_cannot_build_is_rolled_back(fake, make_relayd, tmp_path, workers):
    # Valid on paper (the main process validated it) but a worker's pools failed to build:
    # the worker's loop died silently, stopped answering pings and was killed, and every
    # restart forked with the config it could not build. Now the reload fails, loudly,
    # and every worker stays (or goes back) on the previous config.
    env, trigger = faulty(tmp_path)
    port, admin = free_port(), free_port()
    config = basic_config(fake.url, port, admin, top=workers)
    r = make_relayd(config, env=env)
    pids = set(ready_line(r).get("worker_pids", ()))
    Path(str(trigger) + ".ssl").touch()
    r.config.write_text(config.replace("upstreams:\n", "upstreams:\n  tls: {url: 'https://127.0.0.1:1', "
                                       "provider: openai}\n", 1) + "  - {path: /extra, upstream: tls}\n")
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: events(r, "reload failed"), 10)
    failed = events(r, "reload failed")[0]
    assert failed["level"] == "error" and "injected" in " ".join(failed["errors"])
    assert not events(r, "reload ok") and not events(r, "reload incomplete")
    for _ in range(6):  # both workers serve the previous routes
        assert await get(port, "/extra/x") == 404 and await get(port, "/local/echo") == 200
    status, body = await readyz(admin)
    assert status == 200 and body.get("workers_serving", 2) == 2
    assert set(children(r.proc.pid)) == pids  # nobody was killed or restarted
    os.unlink(str(trigger) + ".ssl")
    r.signal(signal.SIGHUP)  # the same file, buildable now
    assert wait_for(lambda: events(r, "reload ok"), 10)
    for _ in range(6):
        assert await get(port, "/local/echo") == 200


async def test_sigterm_to_every_process_at_once_starts_no_replacement(fake, make_relayd):
    # `systemctl kill` sends SIGTERM to every process of the unit: a worker's "draining"
    # could reach the main process before its own SIGTERM did, and a replacement worker
    # was forked into the shutdown (and took new connections while the service stopped).
    for _ in range(3):
        port = free_port()
        r = make_relayd(basic_config(fake.url, port, top=TWO))
        pids = ready_line(r)["worker_pids"]
        for pid in [*pids, r.proc.pid]:
            os.kill(pid, signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, r.proc.wait, 15) == 0
        # (a worker's "draining" may still come first: its replacement waits a moment for
        # the stop, which cancels it)
        assert len(events(r, "worker serving")) == 2  # no third worker
        assert not events(r, "worker exited unexpectedly; restarting")


def stop_a_restarting_worker(r) -> int:
    """Kill a worker, and stop its replacement the moment it is forked (before it can say
    "ready"); its pid."""
    old = set(ready_line(r)["worker_pids"])
    os.kill(next(iter(old)), signal.SIGKILL)
    end = time.monotonic() + 5
    while not (new := children(r.proc.pid) - old) and time.monotonic() < end:
        time.sleep(0.001)
    (pid,) = new
    os.kill(pid, signal.SIGSTOP)
    return pid


async def test_a_reload_while_a_worker_restarts_is_not_incomplete(fake, make_relayd):
    # A worker forked but not yet ready carried its predecessor's generation, and was
    # named behind by a reload that it then took as soon as it was ready.
    port = free_port()
    config = basic_config(fake.url, port, top=TWO)
    r = make_relayd(config)
    starting = stop_a_restarting_worker(r)
    try:
        assert not any(l.get("pid") == starting for l in events(r, "worker serving"))
        r.config.write_text(config + "  - {path: /extra, upstream: generic}\n")
        r.signal(signal.SIGHUP)
        assert wait_for(lambda: events(r, "reload ok") or events(r, "reload incomplete"), 10)
        assert not events(r, "reload incomplete")
    finally:
        os.kill(starting, signal.SIGCONT)
    assert wait_for(lambda: any(l.get("pid") == starting for l in events(r, "worker serving")), 5)
    for _ in range(6):  # and both workers serve the new route
        assert await get(port, "/extra/echo") == 200


async def test_a_worker_stuck_before_ready_is_killed_and_restarted(fake, make_relayd):
    # Pings go to serving workers only: one stuck in its start-up was never killed, and
    # its slot never served again.  (WatchdogSec 6 s: the kill comes after 3 s.)
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=TWO), env={"WATCHDOG_USEC": "6000000"})
    stuck = stop_a_restarting_worker(r)
    assert wait_for(lambda: any(l.get("pid") == stuck for l in events(r, "worker not answering; killing it")), 10)
    assert wait_for(lambda: len(events(r, "worker serving")) == 3, 5)  # its replacement serves
    for _ in range(6):
        assert await get(port, "/local/echo") == 200


async def test_a_worker_draining_alone_keeps_its_live_gauges_true(fake, make_relayd):
    """Retired alone, a worker was no longer asked for its gauges: /metrics summed its last
    answer (or none: 0 active requests while it drained its streams)."""
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin, top=TWO))
    pids = ready_line(r)["worker_pids"]
    body = stream_body(30)  # 62 lines 50 ms apart: 3 s (the drain's grace is 5 s)
    sc = fake.add("gauges", Scenario(body=body, chunking="lines", delay=0.05))
    fake.reset_stats()
    streams = await spread(port, pids, sc, fake, 4)
    os.kill(pids[0], signal.SIGTERM)
    assert wait_for(lambda: events(r, "worker draining; starting its replacement"))

    async def active() -> float:
        return metric(await get_metrics(admin), "relayd_requests_active")

    end = time.monotonic() + 2
    seen = await active()
    while seen != len(streams) and time.monotonic() < end:
        await asyncio.sleep(0.1)
        seen = await active()
    assert seen == len(streams)  # every stream still in flight, the draining worker's too
    assert all(got == body for got, _ in await asyncio.gather(*streams))
    assert wait_for(lambda: events(r, "worker drained"))
    end = time.monotonic() + 3
    while (seen := await active()) != 0 and time.monotonic() < end:
        await asyncio.sleep(0.1)
    assert seen == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_loader_bug_on_reload_is_a_failed_reload(fake, make_relayd, tmp_path, workers):
    """An exception other than a config error (an overflow in a duration, say) escaped
    the reload: no "reload failed", RELOADING=1 never followed by READY=1, and the
    traceback surfaced at the next SIGHUP."""
    env, trigger = faulty(tmp_path)
    port = free_port()
    sock = notify_socket(tmp_path)
    try:
        r = make_relayd(basic_config(fake.url, port), args=["--workers", workers],
                        env={**env, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        msgs: list[str] = []
        assert wait_for(lambda: any("READY=1" in m for m in received(sock, msgs)))
        Path(f"{trigger}.load").touch()
        n = len(msgs)
        r.signal(signal.SIGHUP)
        assert wait_for(lambda: events(r, "reload failed"))
        failed = events(r, "reload failed")
        assert len(failed) == 1 and "internal error" in failed[0]["errors"][0], failed
        assert wait_for(lambda: any("READY=1" in m for m in received(sock, msgs)[n:]))
        assert any("RELOADING=1" in m for m in msgs[n:])
        Path(f"{trigger}.load").unlink()
        r.signal(signal.SIGHUP)
        assert wait_for(lambda: events(r, "reload ok"))
        assert len(events(r, "reload failed")) == 1
        assert r.stop() == 0
    finally:
        sock.close()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("stdout", ["full", "broken-pipe"])
async def test_a_log_that_cannot_be_written_changes_no_answer_and_no_drain(fake, tmp_path, stdout, workers):
    """A log line that failed to write raised where it was logged: an upstream error
    became a 500, and SIGTERM (whose first act is a log line) never started the drain, so
    only SIGKILL stopped relayd.  Lines are dropped instead (stdout on a full disk, or a
    pipe whose reader is gone)."""
    import subprocess
    import sys as _sys

    from conftest import ROOT, wait_port

    port = free_port()
    dead = free_port()  # nothing listens here: the upstream's connect is refused
    cfg = tmp_path / "r.yaml"
    cfg.write_text(basic_config(fake.url, port, extra_upstreams=f'  dead: {{url: "http://127.0.0.1:{dead}", provider: openai}}\n',
                                extra_routes="  - {path: /dead, upstream: dead}\n"))
    if stdout == "full":
        out = open("/dev/full", "wb")
    else:
        r_fd, w_fd = os.pipe()
        os.close(r_fd)
        out = os.fdopen(w_fd, "wb")
    proc = subprocess.Popen([_sys.executable, "-m", "relayd", "run", "-c", str(cfg), "--workers", workers],
                            stdout=out, stderr=subprocess.PIPE, cwd=ROOT)
    out.close()
    try:
        wait_port(port)
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(f"http://127.0.0.1:{port}/dead/v1/chat/completions", data=b"{}") as r:
                    assert r.status == 502, await r.text()
                sc = fake.add("log-broken", Scenario(body=b'data: {"n":1}\n\ndata: [DONE]\n\n'))
                async with s.post(f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                                  headers={"x-fake": sc}) as r:
                    assert r.status == 200 and await r.read() == b'data: {"n":1}\n\ndata: [DONE]\n\n'
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def test_a_full_filesystem_under_the_metrics_files_costs_counts_not_processes(fake, make_relayd, tmp_path):
    """prometheus_client grows its mmap'ed files sparsely: on a full filesystem the next
    new series was a SIGBUS in the worker, in each replacement, then in the main process.
    Now the new series goes uncounted and every process stays up."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        port, admin = free_port(), free_port()
        r = make_relayd(basic_config(fake.url, port, admin, top=TWO), env={"TMPDIR": str(mnt)})
        workers = set(ready_line(r)["worker_pids"])
        with open(mnt / "filler", "wb") as f:  # the rest of the filesystem, taken
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        async with aiohttp.ClientSession() as s:
            for status in range(400, 460):  # a new series per status, in both workers
                sc = fake.add(f"st{status}", Scenario(body=b"{}", status=status, content_type="application/json"))
                for _ in range(2):
                    async with s.post(f"http://127.0.0.1:{port}/local/x", headers={"x-fake": sc}) as resp:
                        assert resp.status == status
        m = await get_metrics(admin)  # the main process still answers
        assert metric(m, "relayd_requests_total", route="/local", status="400") >= 0
        assert children(r.proc.pid) == workers and r.proc.poll() is None
        # a worker that starts while the filesystem is full serves, its counts unshared
        victim = next(iter(workers))
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: sum(l.get("event") == "worker serving" for l in r.logs()) >= 3, 15), \
            [l.get("event") for l in r.logs()][-20:]
        assert any(l.get("event", "").startswith("metrics not shared") for l in r.logs())
        workers = children(r.proc.pid)
        assert len(workers) == 2 and victim not in workers
        async with aiohttp.ClientSession() as s:
            for _ in range(10):
                async with s.get(f"http://127.0.0.1:{port}/local/echo") as resp:
                    assert resp.status == 200
        assert sum(l.get("event") == "worker exited unexpectedly; restarting" for l in r.logs()) == 1
        os.remove(mnt / "filler")
        for pid in workers:  # a worker that exits now: its counts are added in, or kept
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: len(children(r.proc.pid) - workers) == 2, 15)
        assert r.proc.poll() is None
    finally:
        try:
            r.stop()
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("workers", ["workers: 1", TWO])
def test_a_sighup_during_the_start_waits_for_ready(fake, make_relayd, workers):
    """A SIGHUP right after ``relayd run`` (a script reloading after a start) was fatal
    (SIGHUP's default action) before the loop took it, and with workers a reload racing
    the start said READY=1 and "reload ok" before any worker served.  It is remembered
    and carried out once the start is announced."""
    port = free_port()
    good = basic_config(fake.url, port, top=workers)
    r = make_relayd(good, start=False)
    r.start(wait=False)
    r.config.write_text(good.replace("shutdown_grace: 5", "shutdown_grace: 4"))
    # During the imports, the config load, the workers' start (not in the interpreter's
    # own start-up, some 50 ms, before any Python of relayd's runs).
    for delay in (0.25, 0.15, 0.15):
        time.sleep(delay)
        r.signal(signal.SIGHUP)
    r.wait_ready()
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()), 10)
    assert r.proc.poll() is None
    events = [l.get("event") for l in r.logs()]
    assert events.index("ready") < events.index("reload ok"), events
    if workers == TWO:
        assert events.count("worker serving") >= 2
        assert max(i for i, e in enumerate(events) if e == "worker serving") < events.index("reload ok")


def test_a_worker_stuck_in_its_first_start_is_killed(fake, make_relayd):
    """The first start-up was not watched (pings began after every worker served): a
    worker stuck there hung the service's start, unlogged, until systemd's start timeout.
    It is killed and restarted as a later one is."""
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin, top=TWO), start=False,
                    env={"WATCHDOG_USEC": "6000000"})  # kill after 3 s
    r.start(wait=False)
    end = time.monotonic() + 10
    while not children(r.proc.pid) and time.monotonic() < end:
        time.sleep(0.001)
    victim = min(children(r.proc.pid))
    os.kill(victim, signal.SIGSTOP)
    try:
        assert wait_for(lambda: any(l.get("event") == "worker not answering; killing it"
                                    and l.get("pid") == victim for l in r.logs()), 10), r.logs()
        r.wait_ready()
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert victim not in children(r.proc.pid)

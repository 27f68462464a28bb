"""Hostile and broken clients: slow heads, idle keep-alives, huge heads, garbage, fd
exhaustion, and what relayd says about itself (Server header, bind errors)."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import urllib.request
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import aiohttp
import pytest

from conftest import ROOT, basic_config
from fakes import Scenario, free_port
from relayd import config as config_mod
from test_operations import get_metrics, metric
from relayd.app import App
from relayd.server import ClientServer

# -- helpers


@asynccontextmanager
async def inproc(tmp_path: Path, fake_url: str, **limits: Any) -> AsyncIterator[int]:
    """relayd's App and ClientServer on a loopback port in this loop, with the given
    ``limits:`` keys: the deadlines under test fire in this process, where a test can
    watch a thousand sockets without a subprocess in between."""
    path = tmp_path / "inproc.yaml"
    keys = ", ".join(f"{k}: {v}" for k, v in limits.items())
    path.write_text(basic_config(fake_url, free_port(), top=f"limits: {{{keys}}}" if keys else ""))
    app = App(config_mod.load(str(path)))
    server = ClientServer(app.handle, lambda: app.config, app.reject)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0, backlog=2048)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await server.shutdown(0.1)
        await app.registry.close()


async def read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything until the peer closes (or the deadline, which the caller asserts on)."""
    out = b""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except asyncio.TimeoutError:
            break
        if not chunk:
            return out + b"<EOF>"
        out += chunk
    return out


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split Content-Length framed responses (relayd's own errors and echo replies)."""
    out = []
    while data.startswith(b"HTTP/1."):  # aiohttp answers unparsable requests as 1.0
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        n = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out


def exchange(port: int, payload: bytes, timeout: float = 5, then: bytes = b"",
             pause: float = 0.5) -> bytes:
    """Send `payload` (and `then`, in a segment of its own, `pause` seconds later); read
    until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(payload)
        if then:
            time.sleep(pause)
            s.sendall(then)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return data


# -- client_header / client_keepalive


async def test_slowloris_1000_half_open_connections(tmp_path, fake) -> None:
    """1,000 connections that send part of a head (or nothing): a real request still
    answers fast, and every one of them is closed shortly after client_header."""
    limit = 1.5
    async with inproc(tmp_path, fake.url, client_header=limit) as port:
        t0 = time.monotonic()
        conns = []
        for i in range(1000):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            if i % 3 == 1:
                w.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            elif i % 3 == 2:
                w.write(b"GET /openai/v1/mod")
            conns.append((r, w))
        opened = time.monotonic() - t0
        assert opened < limit, f"opening took {opened:.2f}s; the test needs it under {limit}s"
        # a byte now and then does not extend the deadline (one timer per head, not per byte)
        for r, w in conns[1::3][:100]:
            w.write(b"a")
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                t = time.monotonic()
                async with s.get(f"http://127.0.0.1:{port}/openai/v1/echo") as resp:
                    assert resp.status == 200
                    await resp.read()
                assert time.monotonic() - t < 0.1
        results = await asyncio.gather(*(read_all(r, limit + 3) for r, _ in conns))
        elapsed = time.monotonic() - t0
        assert all(res.endswith(b"<EOF>") for res in results), "some stayed open"
        assert all(res == b"<EOF>" for res in results)  # closed without a response
        assert elapsed < opened + limit + 2.5
        for _, w in conns:
            w.close()


async def test_head_deadline_counts_from_accept_not_from_last_byte(tmp_path, fake) -> None:
    async with inproc(tmp_path, fake.url, client_header=1.0) as port:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        w.write(b"GET /openai/v1/echo HTTP/1.1\r\n")
        while time.monotonic() - t0 < 0.7:  # a header line every 0.1 s
            await asyncio.sleep(0.1)
            w.write(b"X-Drip: 1\r\n")
        assert await read_all(r, 3) == b"<EOF>"
        assert 0.9 < time.monotonic() - t0 < 2.0
        w.close()


async def test_keepalive_idle_close_and_head_deadline_on_keepalive(tmp_path, fake) -> None:
    async with inproc(tmp_path, fake.url, client_header=1.0, client_keepalive=0.5) as port:
        req = b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\n\r\n"
        # idle after a response: closed after client_keepalive
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        t0 = time.monotonic()
        got = await read_all(r, 3)
        assert got.endswith(b"<EOF>") and responses(got[:-5])[0][0] == 200
        assert 0.4 < time.monotonic() - t0 < 1.5
        w.close()
    async with inproc(tmp_path, fake.url, client_header=0.6, client_keepalive=30) as port:
        # a keep-alive request whose head stalls: closed client_header after its first byte
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        first = await r.readuntil(b'"chunked": false}')
        assert first.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.8)  # idle longer than client_header: allowed (keep-alive)
        w.write(b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert await read_all(r, 3) == b"<EOF>"
        assert 0.5 < time.monotonic() - t0 < 1.5
        w.close()


def test_a_late_head_gets_an_access_line_and_no_answer(fake, make_relayd) -> None:
    """A head begun and not finished within client_header: no answer (as nginx), but an
    access line and a count (nginx logs its 408 too), or slowloris leaves no trace.  A
    connection that sent nothing is closed with no line, as nginx's."""
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin, top="limits: {client_header: 1}"),
                    args=["--workers", "1"])
    socks = []
    for head in (b"", b"GET /openai/v1/mod", b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        socks.append(s)
    t0 = time.monotonic()
    for s in socks:
        s.settimeout(5)
        assert s.recv(100) == b""  # closed, nothing sent
        s.close()
    assert time.monotonic() - t0 < 3
    time.sleep(0.3)
    lines = r.wait_access(2)
    assert len(lines) == 2, lines
    by_method = {l["method"]: l for l in lines}
    assert set(by_method) == {"-", "POST"}
    post = by_method["POST"]
    assert post["status"] == 408 and post["end_reason"] == "header_timeout"
    assert 900 <= post["duration_ms"] <= 2500, post  # from the head's first byte
    assert post["path"] == "/openai/v1/chat/completions" and post["route"] == "/openai", post
    assert by_method["-"]["status"] == 408 and by_method["-"]["end_reason"] == "header_timeout"
    assert urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode().count(
        'reason="header_timeout"') >= 1


async def test_a_head_begun_before_keepalive_ends_gets_client_header(tmp_path, fake) -> None:
    """client_keepalive is the idle time between requests; once a next head has begun,
    client_header runs from its first byte (nginx): the keep-alive expiry cut it off."""
    async with inproc(tmp_path, fake.url, client_header=3.0, client_keepalive=1.0) as port:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        req = b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\n\r\n"
        w.write(req)
        assert (await r.readuntil(b'"chunked": false}')).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.6)
        for b in req:  # the next head begins at 0.6 s and takes 1.5 s, past keep-alive's 1 s
            w.write(bytes([b]))
            await asyncio.sleep(1.5 / len(req))
        got = await read_all(r, 3)
        assert responses(got[:-5] if got.endswith(b"<EOF>") else got)[0][0] == 200, got[:200]
        w.close()


# -- head size


def test_100_headers_of_8k_get_431_in_the_route_format(shared, fake) -> None:
    before = len(fake.requests)
    head = b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += b"".join(b"X-Big-%d: %s\r\n" % (i, b"a" * 8000) for i in range(100))
    (status, headers, body), = responses(exchange(shared.port, head + b"\r\n"))
    assert status == 431 and headers["server"] == "relayd"
    err = json.loads(body)["error"]
    assert err["code"] == "request_header_too_large"
    assert len(fake.requests) == before
    line = shared.wait_access(1, lambda l: l["status"] == 431)[-1]
    assert line["route"] == "/openai" and line["path"] == "/openai/v1/echo"


def test_just_over_the_limit_in_one_write_is_431_and_just_under_passes(shared) -> None:
    def head(total: int) -> bytes:
        start = b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        n = (total - len(start) - 2) // 4004
        lines = [b"X-F%03d: %s\r\n" % (i, b"b" * 3993) for i in range(n)]
        return start + b"".join(lines) + b"\r\n"
    assert responses(exchange(shared.port, head(64000)))[0][0] == 200
    (status, _, body), = responses(exchange(shared.port, head(70000)))
    assert status == 431


def test_431_without_a_route_is_generic_json(shared) -> None:
    head = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        b"X-B%d: %s\r\n" % (i, b"c" * 8000) for i in range(10)) + b"\r\n"
    (status, headers, body), = responses(exchange(shared.port, head))
    assert status == 431 and headers["content-type"].startswith("application/json")
    assert "error" in json.loads(body)


# -- malformed requests


@pytest.mark.parametrize("payload", [
    b"GET /openai/v1/echo HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls hello\r\n\r\n",
    b"GET /openai/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /openai/v1/echo HTTP/1.1\r\nX-Long: " + b"d" * 9000 + b"\r\n\r\n",
    b"POST /openai/v1/echo HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
])
def test_malformed_request_gets_json_400_and_an_access_line(shared, payload: bytes) -> None:
    n = len(shared.access())
    (status, headers, body), = responses(exchange(shared.port, payload))
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert headers["server"] == "relayd"
    assert json.loads(body)["error"]["message"].startswith("malformed request")
    lines = shared.wait_access(n + 1)
    assert lines[-1]["status"] == 400


def test_valid_then_malformed_in_one_segment_both_answered(shared) -> None:
    n = len(shared.access())
    payload = (b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\nX-Request-Id: first-one\r\n\r\n"
               b"GET /openai/v1/echo HTTP/1.1\r\nBroken\r\n\r\n")
    got = responses(exchange(shared.port, payload))
    assert [g[0] for g in got] == [200, 400]
    assert json.loads(got[0][2])["raw_path"] == "/oai/v1/echo"
    assert got[1][1]["content-type"].startswith("application/json")
    lines = shared.wait_access(n + 2)[n:]
    assert sorted(l["status"] for l in lines) == [200, 400]
    assert any(l["request_id"] == "first-one" for l in lines)


def test_a_bad_head_after_an_unread_body_is_not_logged_as_that_request(shared) -> None:
    """relayd answered a request without reading its body; a malformed head that follows
    the body in the same read gets its own 400, not the first request's method and path
    (nor its route's error format and metrics)."""
    n = len(shared.access())
    got = responses(exchange(shared.port, b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
                             then=b"helloTOTALLY BOGUS\r\n\r\n"))
    assert [g[0] for g in got] == [404, 400]
    lines = shared.wait_access(n + 2)[n:]
    assert [(l["status"], l["path"]) for l in lines][0] == (404, "/nowhere")
    assert lines[1]["status"] == 400 and lines[1]["path"] != "/nowhere", lines[1]


def test_a_request_pipelined_behind_an_h2c_upgrade_is_not_left_hanging(shared) -> None:
    """``Upgrade: h2c`` (what curl --http2 sends on http://) makes aiohttp drop the rest of
    the read: the upgrade request is answered and the connection closes at once, so the
    client sends the second request again, instead of waiting for client_keepalive."""
    start = time.monotonic()
    data = exchange(shared.port, b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
                    b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\n\r\n", timeout=8)
    assert time.monotonic() - start < 4
    got = responses(data)
    assert [g[0] for g in got][:1] == [200]
    # and the answer says so (RFC 9112 §9.6): a client must not send its next request here
    assert got[0][1].get("connection") == "close", got[0][1]


# -- Server header


@pytest.fixture
def bare_upstream() -> Any:
    """A raw HTTP/1.1 upstream (no Server header, no header decoding): it answers every
    request with the request head it received, byte for byte, as the body."""
    heads: list[bytes] = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = False

    def serve() -> None:
        while not stop:
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            with c:
                c.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head = data.partition(b"\r\n\r\n")[0]
                heads.append(head)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(head), head))

    import threading
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{srv.getsockname()[1]}", heads=heads)
    stop = True
    t.join(2)
    srv.close()


def test_server_header(make_relayd, fake, bare_upstream) -> None:
    port = free_port()
    r = make_relayd(basic_config(fake.url, port,
                                 extra_upstreams=f'  bare: {{url: "{bare_upstream.url}", provider: generic}}',
                                 extra_routes="  - {path: /bare, upstream: bare}"))
    fake.add("named-server", Scenario(body=b"{}", content_type="application/json",
                                      headers={"Server": "fake-provider/1.0"}))
    (s1, h1, _), = responses(exchange(port, b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert s1 == 404 and h1["server"] == "relayd"
    got = exchange(port, b"GET /bare/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200") and b"\r\nserver:" not in got.lower()
    got = exchange(port, b"GET /openai/v1/x HTTP/1.1\r\nHost: x\r\nx-fake: named-server\r\n"
                         b"Connection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200") and b"\r\nServer: fake-provider/1.0\r\n" in got
    r.stop()


def test_obs_text_header_bytes_reach_the_upstream(make_relayd, fake, bare_upstream) -> None:
    port = free_port()
    make_relayd(basic_config(fake.url, port,
                             extra_upstreams=f'  bare: {{url: "{bare_upstream.url}", provider: generic}}',
                             extra_routes="  - {path: /bare, upstream: bare}"))
    exchange(port, b"GET /bare/x HTTP/1.1\r\nHost: x\r\nX-Note: caf\xe9\r\nX-Utf: caf\xc3\xa9\r\n"
                   b"Connection: close\r\n\r\n")
    head = bare_upstream.heads[-1]
    assert b"\r\nX-Utf: caf\xc3\xa9" in head
    assert b"\r\nX-Note: caf\xe9" in head


# -- listeners


def test_bind_error_names_the_admin_listener(make_relayd, fake) -> None:
    port, admin = free_port(), free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", admin))
        busy.listen(1)
        r = make_relayd(basic_config(fake.url, port, admin), start=False)
        r.start(wait=False)
        assert r.proc is not None and r.proc.wait(15) == 1
        err = r.stderr()
        assert f"127.0.0.1:{admin} (admin_listen)" in err, err
        assert "Traceback" not in err
        assert any(l.get("event") == "cannot listen" and l.get("admin_listen") == f"127.0.0.1:{admin}"
                   for l in r.logs())


class _LowFds:
    """`relayd run` with 64 file descriptors, and its log lines."""

    def __init__(self, tmp_path: Path, fake: Any, args: tuple[str, ...] = ()) -> None:
        self.port, self.admin = free_port(), free_port()
        cfg = tmp_path / "fd.yaml"
        cfg.write_text(basic_config(fake.url, self.port, self.admin))
        self.log = tmp_path / "fd.log"

        def low_fds() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(cfg), *args],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         preexec_fn=low_fds)
        end = time.monotonic() + 15
        while not any(l.get("event") == "ready" for l in self.lines()):
            assert time.monotonic() < end and self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for l in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(l))
            except ValueError:
                pass
        return out

    def exhaust(self, held: list[socket.socket]) -> None:
        for _ in range(80):  # more than relayd's 64 fds
            held.append(socket.create_connection(("127.0.0.1", self.port), 2))
        end = time.monotonic() + 10
        while not any(l.get("event", "").startswith("out of file descriptors") for l in self.lines()):
            assert time.monotonic() < end, self.log.read_text()[-2000:]
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_fd_exhaustion_in_the_main_process_is_one_warning_not_tracebacks(tmp_path, fake) -> None:
    """Review 80: with workers, the main process's admin listener out of descriptors was
    an error line with a traceback per failed accept (608 in 5 s); it is the client
    listener's rate-limited warning."""
    r = _LowFds(tmp_path, fake, ("--workers", "2"))
    held: list[socket.socket] = []
    try:
        for _ in range(80):  # more than the main process's 64 fds
            try:
                held.append(socket.create_connection(("127.0.0.1", r.admin), 2))
            except OSError:
                break
        end = time.monotonic() + 10
        while not any(l.get("event", "").startswith("out of file descriptors") for l in r.lines()):
            assert time.monotonic() < end, r.log.read_text()[-2000:]
            time.sleep(0.05)
        time.sleep(1.5)  # asyncio retries the accept every second
        assert not [l for l in r.lines() if l.get("event") == "unexpected error in the event loop"]
        warned = [l for l in r.lines() if l.get("event", "").startswith("out of file descriptors")]
        assert len(warned) == 1 and "worker" not in warned[0], warned
    finally:
        for s in held:
            s.close()
        r.stop()


def test_fd_exhaustion_is_logged_and_recovers(tmp_path, fake) -> None:
    r = _LowFds(tmp_path, fake)
    port, admin, lines = r.port, r.admin, r.lines
    held: list[socket.socket] = []
    try:
        r.exhaust(held)
        warn = next(l for l in lines() if l.get("event", "").startswith("out of file descriptors"))
        # asyncio counts failed accepts; uvloop (libuv) closes the excess connections itself
        # and relayd sees the fd table full instead (server.FdWatch)
        assert warn.get("failures", warn.get("full_checks", 0)) >= 1 and warn["level"] == "warning"
        # The admin listener lives in the main process, which holds no client connections:
        # /healthz keeps answering while a worker is out of descriptors.
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=3) as resp:
            assert resp.status == 200
        for s in held:
            s.close()
        held.clear()
        end = time.monotonic() + 10
        while True:  # asyncio retries accept after a second; relayd serves again
            try:
                with socket.create_connection(("127.0.0.1", port), 2) as s:
                    s.settimeout(3)
                    s.sendall(b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            assert time.monotonic() < end, "relayd did not recover"
            time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", admin), 2) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
        r.stop()


def test_out_of_fds_for_an_upstream_connection_is_relayds_failure_not_the_upstreams(tmp_path, fake) -> None:
    """EMFILE on the upstream's connect was logged as the upstream's "network error",
    counted as its connect_error, charged to its breaker and failed over to the next
    upstream (which fails the same way).  It is a 503 that says what ran out."""
    r = _LowFds(tmp_path, fake, ("--workers", "1"))
    held: list[socket.socket] = []
    try:
        a = socket.create_connection(("127.0.0.1", r.port), 2)  # opened while fds remain
        held.append(a)
        r.exhaust(held)
        a.settimeout(5)
        a.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        got = a.recv(4096)
        assert got.startswith(b"HTTP/1.1 503"), got
        assert b"out of file descriptors" in got
        failed = [l for l in r.lines() if l.get("event") == "upstream attempt failed"]
        assert failed and failed[-1]["reason"] == "local_error", failed
    finally:
        for s in held:
            s.close()
        r.stop()


def test_a_body_parsed_after_a_full_request_queue_is_never_read_as_requests(shared) -> None:
    """32 pipelined requests fill aiohttp's queue and pause its parser with a POST head
    in it; the POST's body arrives later with garbage after it.  The body is the POST's:
    it must never be re-parsed as requests of its own (here one to /SMUGGLED)."""
    gets = b"".join(b"GET /openai/v1/echo?g=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(32))
    smuggled = b"GET /openai/v1/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"
    post = b"POST /openai/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
    n = len(shared.access())
    got = responses(exchange(shared.port, gets + post, then=smuggled + b"\x01bad\r\n\r\n"))
    assert [g[0] for g in got[:33]] == [200] * 33
    assert json.loads(got[32][2])["length"] == len(smuggled)  # the POST got its body
    lines = shared.wait_access(n + 33)[n:]
    assert not any("SMUGGLED" in l["path"] for l in lines)


def test_pipelined_bodies_are_not_counted_as_head_bytes(shared) -> None:
    """Bodies parsed when aiohttp resumes its parser are bodies: two pipelined POSTs of
    400 and 200 kB are both answered, and no 431 follows."""
    big, small = b"x" * 400_000, b"y" * 200_000
    payload = (b"POST /openai/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big
               + b"POST /openai/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(small) + small
               + b"GET /openai/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got = responses(exchange(shared.port, payload))
    assert [g[0] for g in got] == [200, 200, 200]
    assert [json.loads(g[2])["length"] for g in got] == [len(big), len(small), 0]


def test_forty_pipelined_requests_then_garbage_all_forty_answered(shared) -> None:
    """Requests before a malformed one in the same segment are answered, past the 32 the
    parser queues at once."""
    gets = b"".join(b"GET /openai/v1/echo?g=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(40))
    got = responses(exchange(shared.port, gets + b"GET /openai/v1/echo HTTP/1.1\r\nBroken\r\n\r\n"))
    assert [g[0] for g in got] == [200] * 40 + [400]


def test_a_broken_pipelined_head_is_logged_under_its_own_request_line(shared) -> None:
    """Review 72: the 400 for a broken head behind a good one in the same segment was
    logged with the good request's method and path (the segment's first line); a broken
    body is logged under the request it belongs to."""
    n = len(shared.access())
    got = responses(exchange(shared.port, b"GET /openai/v1/echo?g=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"DELETE /openai/v1/broken HTTP/1.1\r\nBroken\r\n\r\n"))
    assert [g[0] for g in got] == [200, 400]
    lines = shared.wait_access(n + 2)[n:]
    assert sorted((l["status"], l["method"], l["path"]) for l in lines) == [
        (200, "GET", "/openai/v1/echo"), (400, "DELETE", "/openai/v1/broken")]
    got = responses(exchange(shared.port, b"GET /openai/v1/echo?g=2 HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"POST /openai/v1/chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"zz\r\nbad\r\n"))
    assert got[0][0] == 200
    time.sleep(0.3)  # (a line logged for the broken body outside its request would come now)
    assert sorted((l["status"], l["method"], l["path"]) for l in shared.access()[n + 2:]) == [
        (200, "GET", "/openai/v1/echo"), (400, "POST", "/openai/v1/chunks")]


def test_requests_before_garbage_are_answered_when_the_queue_was_already_partly_full(shared, fake) -> None:
    """A slow request and 19 queued ones, then 20 more and a broken one in a later segment:
    the parser pauses after 12 of the 20 (the queue is full), and the error behind the
    pause must still leave the 20 answered."""
    fake.add("slow-head", Scenario(body=b'{"a":1}', content_type="application/json", header_delay=1.0))
    slow = b"GET /openai/v1/x HTTP/1.1\r\nHost: x\r\nx-fake: slow-head\r\n\r\n"
    first = b"".join(b"GET /openai/v1/echo?g=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(19))
    second = b"".join(b"GET /openai/v1/echo?h=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(20))
    n = len(shared.access())
    exchange(shared.port, slow + first, then=second + b"GET /openai/v1/echo HTTP/1.1\r\nBroken\r\n\r\n",
             pause=0.3)
    lines = shared.wait_access(n + 41)[n:]
    assert sorted(l["status"] for l in lines) == [200] * 40 + [400]


def test_the_same_after_a_request_whose_body_came_late(shared, fake) -> None:
    """aiohttp's parser counts one request too many for good after a request is taken
    before its body has arrived: it then pauses at 31.  The requests before the garbage
    must still be answered (33 of 41 were)."""
    fake.add("slow-head2", Scenario(body=b'{"a":1}', content_type="application/json", header_delay=1.0))
    n = len(shared.access())
    with socket.create_connection(("127.0.0.1", shared.port), 8) as s:
        s.sendall(b"POST /openai/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        time.sleep(0.3)
        s.sendall(b"{}")
        shared.wait_access(n + 1)
        s.sendall(b"GET /openai/v1/x HTTP/1.1\r\nHost: x\r\nx-fake: slow-head2\r\n\r\n"
                  + b"".join(b"GET /openai/v1/echo?g=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(18)))
        time.sleep(0.3)
        s.sendall(b"".join(b"GET /openai/v1/echo?h=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(21))
                  + b"GET /openai/v1/echo HTTP/1.1\r\nBroken\r\n\r\n")
        try:
            while s.recv(65536):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
    lines = shared.wait_access(n + 42)[n:]
    assert sorted(l["status"] for l in lines) == [200] * 41 + [400]


@pytest.mark.parametrize("size", [5, 20_000, 150_000])
def test_a_malformed_chunk_in_the_same_write_as_the_head_is_a_400(shared, size) -> None:
    """Head, a chunk and a bad chunk size in one write (the usual single send): the bad
    size is found while the head is parsed, or when aiohttp resumes its parser past its
    buffer; either way the request gets its 400 at once, not a 408 after first_byte."""
    big = b"x" * size
    start = time.monotonic()
    got = responses(exchange(shared.port, b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\nzz\r\nbad\r\n0\r\n\r\n"
                             % (len(big), big)))
    assert time.monotonic() - start < 3
    assert got[0][0] == 400 and json.loads(got[0][2])["error"]["message"].startswith("malformed request body")


@pytest.mark.parametrize("route", ["/openai", "/both"])
async def test_a_malformed_chunked_body_is_a_json_400_at_once(fake, make_relayd, route) -> None:
    """A chunk size that is not hex: llhttp stops, and the request waiting for its body
    (streamed upstream, or buffered for failover) is answered 400 at once, in the route's
    format, with no breaker failure (it used to wait out first_byte and answer 408)."""
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin,
                                 extra_routes="  - {path: /both, upstream: [openai, generic]}\n"),
                    args=["--workers", "1"])
    start = time.monotonic()
    data = exchange(port, b"POST %s/v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                          b"\r\n\r\n5\r\nhello\r\n" % route.encode(), then=b"zz\r\nbad\r\n0\r\n\r\n", pause=0.3)
    assert time.monotonic() - start < 3
    (status, headers, body), = responses(data)
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["error"]["message"].startswith("malformed request body")
    line = r.wait_access(1)[-1]
    assert line["status"] == 400 and line["end_reason"] == "body_invalid"
    time.sleep(0.3)  # (aiohttp's read of the rest of the body, after the answer)
    assert not [l for l in r.logs() if l.get("event") == "upstream attempt failed"]
    # The client's broken framing, not a relayd bug: no error line, no traceback.
    assert not [l for l in r.logs() if l.get("level") == "error"], r.logs()
    # An attempt begun (the body streamed upstream) is counted, as the access line says.
    assert line["attempts"] == (1 if route == "/openai" else 0)
    m = await get_metrics(admin)
    assert metric(m, "relayd_upstream_attempts_total", upstream="openai", outcome="cancelled") \
        == line["attempts"]


# -- methods relayd never forwards


@pytest.mark.parametrize("line", [b"TRACE /openai/v1/models HTTP/1.1", b"CONNECT /openai/v1/x HTTP/1.1",
                                  b"CONNECT 127.0.0.1:443 HTTP/1.1"])
async def test_trace_and_connect_get_405_and_never_reach_the_upstream(tmp_path, fake, line) -> None:
    # A TRACE is echoed back by servers that honour it (Apache's default, some front
    # ends): forwarded with the operator's key, the echo would hand the key to the client.
    # A CONNECT would become a tunnel request to the upstream's host, key attached.
    fake.reset_stats()
    async with inproc(tmp_path, fake.url) as port:
        data = await asyncio.to_thread(exchange, port, line + b"\r\nHost: x\r\n\r\n" +
                                       b"GET /openai/echo HTTP/1.1\r\nHost: x\r\n\r\n")
    got = responses(data)
    assert got and got[0][0] == 405, data[:300]
    status, headers, body = got[0]
    assert "GET" in headers["allow"] and "TRACE" not in headers["allow"]
    error = json.loads(body)["error"]
    assert error["code"] == "method_not_allowed" and error["type"] == "invalid_request_error"
    assert len(got) == 1  # the connection closes: what follows a CONNECT is not HTTP
    assert fake.requests == []


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity, chunked", b"deflate,chunked"])
async def test_a_transfer_coding_other_than_chunked_gets_501(tmp_path, fake, coding) -> None:
    # relayd removes Transfer-Encoding (hop by hop) and reframes the body: with a coding
    # besides chunked, the upstream would read gzip bytes as a plain body.
    fake.reset_stats()
    async with inproc(tmp_path, fake.url) as port:
        data = await asyncio.to_thread(
            exchange, port, b"POST /openai/v1/x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: " + coding + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    got = responses(data)
    assert got and got[0][0] == 501, data[:300]
    error = json.loads(got[0][2])["error"]
    assert error["code"] == "unsupported_transfer_encoding" and error["type"] == "invalid_request_error"
    assert fake.requests == []


async def test_chunked_in_any_case_is_forwarded(tmp_path, fake) -> None:
    async with inproc(tmp_path, fake.url) as port:
        data = await asyncio.to_thread(
            exchange, port, b"POST /openai/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: Chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200"), data[:300]


# -- HTTP versions

def closed_after(port: int, payload: bytes, timeout: float = 10) -> bytes:
    """Send `payload`; everything until the server closes, which must come before
    `timeout` (a socket timeout fails the test)."""
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


async def test_transfer_encoding_in_http_1_0_is_a_400_and_the_connection_closes(tmp_path, fake) -> None:
    # RFC 9112 §6.1: an HTTP/1.0 front end may ignore Transfer-Encoding and read the
    # chunked body, and what follows it, as the next request (nginx: 400 and close).
    fake.reset_stats()
    async with inproc(tmp_path, fake.url) as port:
        data = await asyncio.to_thread(
            closed_after, port, b"POST /openai/echo HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
            b"GET /openai/echo HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    got = responses(data)
    assert [g[0] for g in got] == [400], data[:400]
    assert json.loads(got[0][2])["error"]["code"] == "invalid_request"
    assert fake.requests == []


@pytest.mark.parametrize("line", [b"GET /openai/echo HTTP/2.0", b"GET /openai/echo", b"TRACE /openai/echo HTTP/2.0"])
async def test_other_http_versions_get_505_in_http_1_1(tmp_path, fake, line) -> None:
    # aiohttp's parser takes HTTP/2.0 and 0.9 request lines, and aiohttp answered in
    # the request's version ("HTTP/2.0 200 OK" over HTTP/1.1 framing).
    fake.reset_stats()
    async with inproc(tmp_path, fake.url) as port:
        data = await asyncio.to_thread(closed_after, port, line + b"\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), data[:300]
    assert fake.requests == []


async def test_expect_100_continue_from_http_1_0_gets_no_interim_response(tmp_path, fake) -> None:
    # An HTTP/1.0 client may take any status line for its answer: it gets none but the
    # final one (RFC 9110 §10.1.1; nginx the same).
    async with inproc(tmp_path, fake.url) as port:
        data = await asyncio.to_thread(
            exchange, port, b"POST /openai/echo HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n", then=b"{}")
    assert data.startswith(b"HTTP/1.0 200 OK\r\n"), data[:300]
    assert b"100 Continue" not in data


async def test_an_http2_preface_gets_a_505_that_says_so(tmp_path, fake) -> None:
    # llhttp pauses on the preface's PRI method: aiohttp's 400 said "Pause on PRI/Upgrade".
    async with inproc(tmp_path, fake.url) as port:
        data = await asyncio.to_thread(closed_after, port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    got = responses(data)
    assert [g[0] for g in got] == [505], data[:300]
    error = json.loads(got[0][2])["error"]
    assert error["code"] == "http_version_not_supported" and "HTTP/2 is not supported" in error["message"]


def test_an_http2_preface_is_not_logged_as_a_relayd_bug(shared) -> None:
    """``end_reason: error`` means a relayd bug (README): an h2c client or a scanner's
    preface is the client's protocol, answered 505, not one."""
    n = len(shared.access())
    (status, _, _), = responses(closed_after(shared.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    assert status == 505
    line = shared.wait_access(n + 1)[-1]
    assert line["status"] == 505 and line["end_reason"] == "done", line


@pytest.mark.parametrize("started", [False, True])
async def test_a_relayd_bug_outside_the_handler_is_logged(tmp_path, fake, capsys, started) -> None:
    """A bug that escapes the request handler (aiohttp catches it) is an error line with
    its traceback — aiohttp's own loggers are silenced — and, before the answer began, a
    JSON 500 that says internal_error; after, the connection is dropped."""
    from relayd import logs
    path = tmp_path / "bug.yaml"
    path.write_text(basic_config(fake.url, free_port()))
    app = App(config_mod.load(str(path)))

    async def broken(request: Any) -> Any:
        if started:
            resp = aiohttp.web.StreamResponse()
            await resp.prepare(request)
            await resp.write(b"partial")
        raise KeyError("injected")

    logs.configure("info")
    server = ClientServer(broken, lambda: app.config, app.reject)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /openai/v1/x HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await read_all(reader, 5)
        writer.close()
    finally:
        listener.close()
        await server.shutdown(0.1)
        await app.registry.close()
    if started:
        assert b"partial" in got and got.endswith(b"<EOF>")
    else:
        (status, _, body), = responses(got)
        assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    bug = [l for l in lines if l["event"] == "request failed outside the handler"]
    assert bug and bug[0]["level"] == "error" and "KeyError" in bug[0]["exception"]


def test_a_malformed_absolute_form_request_logs_its_path_only(shared) -> None:
    """The access line of a request that failed to parse names its path, never the
    authority (userinfo can be credentials) or the query of an absolute-form target."""
    n = len(shared.access())
    (status, _, _), = responses(exchange(
        shared.port, b"GET http://user:pw-SECRET@host/openai/v1/x?key=k-SECRET HTTP/1.1\r\nBad Header\r\n\r\n"))
    assert status == 400
    line = shared.wait_access(n + 1)[-1]
    assert line["path"] == "/openai/v1/x" and line["route"] == "/openai"
    assert "SECRET" not in json.dumps(line)


async def test_a_relayd_bug_in_the_push_path_ends_the_stream_at_once(tmp_path, fake, capsys, monkeypatch) -> None:
    """A bug in the per-event path runs in the upstream connection's callback: the stream
    ends at once with relayd's own error (logged with its traceback), not at ``idle`` as
    the upstream's silence."""
    from relayd import logs, stream
    from fakes import fixture
    body = fixture("openai-chat-usage.sse")
    sc = fake.add("push-bug", Scenario(body=body, chunking="lines", delay=0.01))
    real, calls = stream.Stream._feed, []

    def feed(self: Any, pieces: Any, outs: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        real(self, pieces, outs)

    monkeypatch.setattr(stream.Stream, "_feed", feed)
    logs.configure("info")
    async with inproc(tmp_path, fake.url) as port:
        start = time.monotonic()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                              headers={"x-fake": sc}, json={}) as r:
                got = await r.read()
    assert time.monotonic() - start < 3
    error = json.loads(got.rstrip().rsplit(b"\n\n", 1)[-1].split(b"data: ", 1)[1])["error"]
    assert error["code"] == "error" and "internal error" in error["message"]
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert any(l["event"] == "internal error" and "RuntimeError" in l["exception"] for l in lines)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_admin_listener_answers_garbage_like_the_client_listener(make_relayd, fake, workers) -> None:
    """A malformed head on the admin listener: a short JSON 400 with ``Server: relayd``, not
    aiohttp's plain text quoting the request's bytes back with its name and version."""
    port, admin = free_port(), free_port()
    make_relayd(basic_config(fake.url, port, admin), args=["--workers", workers])
    (status, headers, body), = responses(exchange(admin, b"GET /metrics HTTP/1.1\r\nBad <script>Header\r\n\r\n"))
    assert status == 400 and headers["server"] == "relayd"
    assert headers["content-type"].startswith("application/json") and b"script" not in body
    (status, headers, _), = responses(exchange(admin, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 404 and headers["server"] == "relayd"


async def test_a_relayd_bug_on_the_last_event_is_not_a_clean_end(tmp_path, fake, capsys, monkeypatch) -> None:
    """The bug struck the read holding [DONE], after the end test had seen it: that read
    never went out, so the stream must end as relayd's error with its event, not as done."""
    from relayd import logs, usage
    from fakes import fixture
    body = fixture("openai-chat-usage.sse")
    sc = fake.add("push-bug-last", Scenario(body=body, chunking="lines", delay=0.01))
    real = usage.UsageMeter.observe_events

    def observe(self: Any, segment: bytes) -> None:
        if b"[DONE]" in segment:
            raise RuntimeError("injected")
        real(self, segment)

    monkeypatch.setattr(usage.UsageMeter, "observe_events", observe)
    logs.configure("info")
    async with inproc(tmp_path, fake.url) as port:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                              headers={"x-fake": sc}, json={}) as r:
                got = await r.read()
    assert b"[DONE]" not in got
    error = json.loads(got.rstrip().rsplit(b"\n\n", 1)[-1].split(b"data: ", 1)[1])["error"]
    assert error["code"] == "error"

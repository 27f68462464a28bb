"""TLS on the main listener: certificates made with the openssl CLI, renewed by SIGHUP."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import ROOT, basic_config
from fakes import Scenario, free_port
from relayd import config as config_mod
from relayd.config import ConfigError
from relayd.tls import ListenerCert
from test_operations import wait_for

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def make_cert(d: Path, cn: str, serial: int, rsa: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 with common name cn, written to d."""
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    kind = ["-newkey", "rsa:2048"] if rsa else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    subprocess.run(["openssl", "req", "-x509", *kind,
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "30", "-subj", f"/CN={cn}",
                    "-set_serial", str(serial), "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def trust(*certs: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata="".join(c.read_text() for c in certs))
    return ctx


async def https_site(pair: tuple[Path, Path], port: int, answer: Any) -> Any:
    """An aiohttp upstream on 127.0.0.1:port serving `pair`, every path answered by `answer`."""
    from aiohttp import web
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*pair)
    runner = web.AppRunner(web.Application(), access_log=None)
    runner.app.router.add_route("*", "/{tail:.*}", answer)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    return runner


def served_cn(port: int, ctx: ssl.SSLContext) -> tuple[str, str | None]:
    """(the common name of the certificate a new handshake gets, the TLS version)."""
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            subject = dict(x[0] for x in s.getpeercert()["subject"])
            return subject["commonName"], s.version()


def install(src: tuple[Path, Path], dst: tuple[Path, Path]) -> None:
    """Put a renewed pair in place the way certbot's deploy step would: copy over."""
    for a, b in zip(src, dst):
        shutil.copyfile(a, b)


def reloads(r, event: str) -> int:
    return sum(1 for l in r.logs() if l.get("event") == event)


async def test_tls_request_and_certificate_renewed_by_reload(make_relayd, fake, tmp_path):
    live = make_cert(tmp_path / "live", "relayd-one", 1)
    two = make_cert(tmp_path / "two", "relayd-two", 2)
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=f"tls: {{cert: '{live[0]}', key: '{live[1]}'}}"))
    sc = fake.add("tls-json", Scenario(body=b'{"ok":true}', content_type="application/json"))
    first = trust(live[0])
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://127.0.0.1:{port}/openai/v1/models", ssl=first,
                         headers={"x-fake": sc}) as resp:
            assert resp.status == 200 and await resp.json() == {"ok": True}
    cn, version = served_cn(port, first)
    assert cn == "relayd-one" and version in ("TLSv1.2", "TLSv1.3")

    # a keep-alive connection made before the renewal keeps working after it
    kept = first.wrap_socket(socket.create_connection(("127.0.0.1", port), 5),
                             server_hostname="127.0.0.1")
    install(two, live)
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: reloads(r, "reload ok") == 1)
    assert served_cn(port, trust(two[0]))[0] == "relayd-two"
    kept.sendall(f"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nx-fake: {sc}\r\n"
                 "Connection: close\r\n\r\n".encode())
    assert kept.recv(1024).startswith(b"HTTP/1.1 200")
    kept.close()

    # a broken renewal: the reload fails and the last good certificate keeps serving
    live[0].write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: reloads(r, "reload failed") == 1)
    assert served_cn(port, trust(two[0]))[0] == "relayd-two"
    three = make_cert(tmp_path / "three", "relayd-three", 3)
    install((three[0], two[1]), live)  # new certificate, old key: they do not match
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: reloads(r, "reload failed") == 2)
    assert served_cn(port, trust(two[0]))[0] == "relayd-two"
    assert r.proc.poll() is None


def test_a_renewal_to_another_key_type_replaces_the_old_certificate(make_relayd, fake, tmp_path):
    """Review 81: loading the renewed pair into the live context replaced the old one only
    for the same key type; after RSA → ECDSA (certbot's default since 2.0) the old RSA
    certificate still served every client that prefers RSA, until a restart."""
    live = make_cert(tmp_path / "live", "old-rsa", 21, rsa=True)
    ecdsa = make_cert(tmp_path / "ec", "new-ecdsa", 22)
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=f"tls: {{cert: '{live[0]}', key: '{live[1]}'}}"))
    rsa_only = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    rsa_only.check_hostname, rsa_only.verify_mode = False, ssl.CERT_NONE
    rsa_only.maximum_version = ssl.TLSVersion.TLSv1_2
    rsa_only.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")

    def cn_for(ctx: ssl.SSLContext) -> str:
        with socket.create_connection(("127.0.0.1", port), 5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                der = s.getpeercert(binary_form=True)
        text = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject"], input=der,
                              capture_output=True, check=True).stdout.decode()
        return text.strip().rpartition("=")[2].strip()

    assert cn_for(rsa_only) == "old-rsa"
    install(ecdsa, live)
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: reloads(r, "reload ok") == 1)
    assert served_cn(port, trust(ecdsa[0]))[0] == "new-ecdsa"
    with pytest.raises(ssl.SSLError):  # no RSA certificate is left to serve it
        cn_for(rsa_only)
    # and back: the RSA pair serves again, to every client
    rsa2 = make_cert(tmp_path / "rsa2", "rsa-again", 23, rsa=True)
    install(rsa2, live)
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: reloads(r, "reload ok") == 2)
    assert cn_for(rsa_only) == "rsa-again"
    assert served_cn(port, trust(rsa2[0]))[0] == "rsa-again"


async def _serve_cn(holder: ListenerCert, ca: Path) -> str:
    """The common name a new handshake with an asyncio server on holder.context gets."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=holder.context)
    port = server.sockets[0].getsockname()[1]
    try:
        return (await asyncio.to_thread(served_cn, port, trust(ca)))[0]
    finally:
        server.close()
        await server.wait_closed()


async def test_reload_checks_the_pair_before_touching_the_live_context(tmp_path, fake):
    """The files can change after the config was validated: ListenerCert.reload loads them
    into a scratch context first and fails the reload without touching the served pair."""
    one = make_cert(tmp_path / "one", "cert-one", 11)
    two = make_cert(tmp_path / "two", "cert-two", 12)
    cfg_path = tmp_path / "r.yaml"
    live = (tmp_path / "cert.pem", tmp_path / "key.pem")
    install(one, live)
    cfg_path.write_text(basic_config(fake.url, free_port(), top=f"tls: {{cert: '{live[0]}', key: '{live[1]}'}}"))
    cfg = config_mod.load(str(cfg_path))
    holder = ListenerCert(cfg.tls)
    assert holder.context is not None and holder.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert await _serve_cn(holder, one[0]) == "cert-one"
    install((two[0], one[1]), live)  # mismatched pair, after validation
    with pytest.raises(ConfigError) as exc:
        holder.reload(cfg, str(cfg_path))
    assert "tls" in str(exc.value) and "cannot load cert and key" in str(exc.value)
    assert await _serve_cn(holder, one[0]) == "cert-one"
    install(two, live)
    holder.reload(cfg, str(cfg_path))
    assert await _serve_cn(holder, two[0]) == "cert-two"


async def test_https_upstream_verified_against_ca_file_refused_without_it(make_relayd, tmp_path):
    """An HTTPS upstream with its own CA: trusted through `tls.ca_file`, a clean 502
    ("TLS handshake failed") without it, and reachable with `verify: false`."""
    from aiohttp import web

    cert, key = make_cert(tmp_path / "up", "upstream", 7)

    async def answer(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        if req.path.endswith("/stream"):
            r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await r.prepare(req)
            await r.write(b'data: {"n":1}\n\ndata: [DONE]\n\n')
            return r
        return web.json_response({"got": len(body), "host": req.headers["Host"]})

    up = free_port()
    runner = await https_site((cert, key), up, answer)
    port = free_port()
    try:
        relayd = make_relayd(f"""listen: 127.0.0.1:{port}
upstreams:
  trusted: {{url: "https://127.0.0.1:{up}", provider: openai, api_key: k, tls: {{ca_file: {cert}}}}}
  unknown: {{url: "https://127.0.0.1:{up}", provider: openai, api_key: k}}
  unverified: {{url: "https://127.0.0.1:{up}", provider: openai, api_key: k, tls: {{verify: false}}}}
routes:
  - {{path: /trusted, upstream: trusted}}
  - {{path: /unknown, upstream: unknown}}
  - {{path: /unverified, upstream: unverified}}
""")
        async with aiohttp.ClientSession() as s:
            for route in ("trusted", "unverified"):
                async with s.post(f"http://127.0.0.1:{port}/{route}/v1/x", data=b"12345") as r:
                    assert r.status == 200, await r.text()
                    assert await r.json() == {"got": 5, "host": f"127.0.0.1:{up}"}
                async with s.get(f"http://127.0.0.1:{port}/{route}/v1/stream") as r:
                    assert r.status == 200 and await r.read() == b'data: {"n":1}\n\ndata: [DONE]\n\n'
            async with s.post(f"http://127.0.0.1:{port}/unknown/v1/x", data=b"12345") as r:
                assert r.status == 502
                message = (await r.json())["error"]["message"]
                assert "TLS handshake failed" in message and "verify" not in message
        # the operator's log says why; the client is not told about the certificate
        failed = [l for l in relayd.logs() if l.get("event") == "upstream attempt failed"]
        assert "certificate verify failed: self-signed certificate" in failed[-1]["cause"], failed
    finally:
        await runner.cleanup()


async def test_a_ca_bundle_rotated_in_place_is_trusted_after_reload(make_relayd, tmp_path):
    """The pool was kept across the reload because its key named the bundle's path only:
    its context still held the old CA, and every request after the upstream's new
    certificate failed the handshake until a restart."""
    from aiohttp import web

    one, two = make_cert(tmp_path / "one", "upstream-one", 11), make_cert(tmp_path / "two", "upstream-two", 12)
    bundle = tmp_path / "bundle.pem"
    shutil.copyfile(one[0], bundle)

    async def answer(req: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    up, port = free_port(), free_port()
    runner = await https_site(one, up, answer)
    r = make_relayd(f"""listen: 127.0.0.1:{port}
upstreams:
  u: {{url: "https://127.0.0.1:{up}", provider: openai, api_key: k, tls: {{ca_file: {bundle}}}}}
routes:
  - {{path: /u, upstream: u}}
""")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/u/v1/models") as resp:
                assert resp.status == 200, await resp.text()
            await runner.cleanup()
            runner = await https_site(two, up, answer)  # a certificate from the new CA
            shutil.copyfile(two[0], bundle)
            r.signal(signal.SIGHUP)
            assert wait_for(lambda: reloads(r, "reload ok") == 1)
            async with s.get(f"http://127.0.0.1:{port}/u/v1/models") as resp:
                assert resp.status == 200, await resp.text()
    finally:
        await runner.cleanup()


async def test_a_restarted_worker_serves_the_pair_its_siblings_serve(make_relayd, fake, tmp_path):
    """A worker restarted after a crash read the files again: a half-written renewal on
    disk (no reload yet) made it crash at start, over and over, and a finished one made it
    serve a certificate its sibling did not.  It serves the last pair that passed."""
    import os
    from test_workers import children, ready_line
    live = make_cert(tmp_path / "live", "relayd-one", 1)
    two = make_cert(tmp_path / "two", "relayd-two", 2)
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=f"workers: 2\ntls: {{cert: '{live[0]}', key: '{live[1]}'}}"))
    first = trust(live[0])
    victim, other = ready_line(r)["worker_pids"]
    live[0].write_text("-----BEGIN CERTIFICATE-----\nhalf wri")  # a renewal being written
    os.kill(victim, 9)
    assert wait_for(lambda: len(children(r.proc.pid) - {other, victim}) == 1)
    new = (children(r.proc.pid) - {other}).pop()
    assert wait_for(lambda: any(l.get("event") == "worker serving" and l.get("pid") == new for l in r.logs()))
    install(two, live)  # the renewal is complete, still not reloaded
    os.kill(new, 9)
    assert wait_for(lambda: len(children(r.proc.pid) - {other, new}) == 1)
    newer = (children(r.proc.pid) - {other}).pop()
    assert wait_for(lambda: any(l.get("event") == "worker serving" and l.get("pid") == newer for l in r.logs()))
    assert {served_cn(port, first)[0] for _ in range(12)} == {"relayd-one"}  # both workers
    assert not [l for l in r.logs() if l.get("event") == "worker failed"]
    r.signal(signal.SIGHUP)  # the renewal, taken by every worker
    assert wait_for(lambda: reloads(r, "reload ok") == 1)
    assert {served_cn(port, trust(two[0]))[0] for _ in range(12)} == {"relayd-two"}


_READ_LOG = """
import os
import relayd.tls as _tls
_read = _tls._read

def _logged(cfg):
    with open(os.environ["RELAYD_TEST_READS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    return _read(cfg)

_tls._read = _logged
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_only_the_main_process_reads_the_certificate_on_reload(make_relayd, fake, tmp_path, workers):
    """Each worker read the files again after the main process had checked them: a renewal
    landing in between reached the workers unchecked, and a worker restarted later served
    the main process's pair while its siblings served the files'.  Workers load the bytes
    the main process checked."""
    import os
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_READ_LOG)
    reads = tmp_path / "reads"
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": f"{site}{os.pathsep}{path}" if path else str(site), "RELAYD_TEST_READS": str(reads)}
    live = make_cert(tmp_path / "live", "relayd-one", 1)
    two = make_cert(tmp_path / "two", "relayd-two", 2)
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=f"workers: {workers}\n"
                                 f"tls: {{cert: '{live[0]}', key: '{live[1]}'}}"), env=env)
    reads.write_text("")
    install(two, live)
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: reloads(r, "reload ok") == 1)
    assert {served_cn(port, trust(two[0]))[0] for _ in range(8)} == {"relayd-two"}
    assert set(reads.read_text().split()) == {str(r.proc.pid)}


async def test_tls_turned_on_by_a_reload_waits_for_a_restart_in_every_worker(make_relayd, fake, tmp_path):
    """Review 41: the running workers kept their plain listener, but a worker restarted
    after the reload built its listener from the file's config and spoke TLS: about half
    of new connections failed."""
    import os
    from test_workers import children, ready_line
    pair = make_cert(tmp_path / "c", "relayd-on", 3)
    port = free_port()
    cfg = basic_config(fake.url, port, top="workers: 2")
    r = make_relayd(cfg)
    victim = ready_line(r)["worker_pids"][0]
    r.config.write_text(cfg.replace("workers: 2", f"workers: 2\ntls: {{cert: '{pair[0]}', key: '{pair[1]}'}}"))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: reloads(r, "reload ok") == 1)
    assert any(l.get("event") == "turning tls on or off needs a restart; keeping the listener as it is"
               for l in r.logs())
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: sum(l.get("event") == "worker serving" for l in r.logs()) >= 3, 15)
    async with aiohttp.ClientSession() as s:
        for _ in range(16):  # new connections, spread over both workers
            async with s.get(f"http://127.0.0.1:{port}/local/echo", headers={"Connection": "close"}) as resp:
                assert resp.status == 200
    assert victim not in children(r.proc.pid)


async def test_a_client_leaving_closes_an_https_upstream_at_once(make_relayd, tmp_path):
    """Cancellation reaches a TLS upstream as it does a plain one: the connection is
    aborted, not closed gracefully (close_notify, then up to 30 s waiting for the
    upstream's while reading on) — a provider that does not answer close_notify went on
    generating for nobody.  The upstream here is such a server: blocking writes, one
    event per 50 ms, until a write fails."""
    import threading

    cert, key = make_cert(tmp_path / "up", "upstream", 11)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    gone: list[float] = []

    def serve() -> None:
        raw, _ = listener.accept()
        with ctx.wrap_socket(raw, server_side=True) as conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                for i in range(400):
                    event = b'data: {"n":%d}\n\n' % i
                    conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                    time.sleep(0.05)
            except (OSError, ssl.SSLError):
                gone.append(time.monotonic())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = free_port()
    try:
        make_relayd(f"""listen: 127.0.0.1:{port}
upstreams:
  u: {{url: "https://127.0.0.1:{listener.getsockname()[1]}", provider: openai, api_key: k, tls: {{ca_file: {cert}}}}}
routes:
  - {{path: /u, upstream: u}}
""")
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/u/v1/chat/completions", json={}) as r:
                assert (await r.content.readuntil(b"\n\n")).startswith(b"data:")
                left = time.monotonic()
        for _ in range(100):  # the upstream notices at its next writes (50 ms apart)
            if gone:
                break
            await asyncio.sleep(0.05)
        assert gone and gone[0] - left < 2, gone
    finally:
        listener.close()
        thread.join(25)


def test_an_empty_ca_file_is_an_error_not_the_system_store(tmp_path):
    """An empty bundle (a file truncated by a deploy) made the context load the system
    CAs: trust widened from one private CA to every public one, and check said ok."""
    empty = tmp_path / "empty.pem"
    empty.write_text("\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""listen: 127.0.0.1:{free_port()}
upstreams:
  u: {{url: "https://127.0.0.1:9", provider: openai, api_key: k, tls: {{ca_file: {empty}}}}}
routes:
  - {{path: /u, upstream: u}}
""")
    out = subprocess.run([sys.executable, "-m", "relayd", "check", "-c", str(cfg)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and f"{cfg}:3: upstreams.u.tls.ca_file: not a PEM certificate bundle" in out.stderr, out
    assert "no certificate" in out.stderr


def test_a_silent_tls_client_is_let_go_soon_after_its_deadline(make_relayd, fake, tmp_path):
    """A TLS client relayd closes (here: no request head within client_header) gets
    close_notify; relayd then waits for the client's own at most 3 s, as nginx, not
    asyncio's 30 s with the descriptor held."""
    live = make_cert(tmp_path / "live", "relayd-one", 1)
    port = free_port()
    make_relayd(basic_config(fake.url, port, top=f"tls: {{cert: '{live[0]}', key: '{live[1]}'}}\n"
                                                 "limits: {client_header: 1s}"))
    raw = socket.create_connection(("127.0.0.1", port), 5)
    try:
        tls = trust(live[0]).wrap_socket(raw, server_hostname="127.0.0.1")  # handshake, then silence
        start = time.monotonic()
        raw_fd = socket.socket(fileno=socket.dup(tls.fileno()))  # bytes below TLS: never answer close_notify
        raw_fd.settimeout(40)
        while raw_fd.recv(65536):  # close_notify arrives at ~1 s, then the TCP close
            pass
        assert time.monotonic() - start < 6
        raw_fd.close()
    finally:
        raw.close()


def test_an_expired_or_expiring_listener_certificate_is_a_config_warning(tmp_path):
    """It loads and serves, and every client that verifies it refuses the connection: check
    (and start, and reload) say so."""
    cert, _ = make_cert(tmp_path / "c", "relayd-one", 3)  # valid for 30 days from now
    now = time.time()
    assert config_mod.cert_warnings(str(cert), now) == []
    assert "expires on" in config_mod.cert_warnings(str(cert), now + 20 * 86400)[0]
    assert "expired on" in config_mod.cert_warnings(str(cert), now + 40 * 86400)[0]
    assert "not valid before" in config_mod.cert_warnings(str(cert), now - 86400)[0]
    text = (f"listen: 127.0.0.1:{free_port()}\ntls: {{cert: '{cert}', key: '{_}'}}\n"
            "upstreams: {u: {url: 'http://127.0.0.1:1', provider: generic}}\n"
            "routes: [{path: /u, upstream: u}]\n")
    os.chmod(_, 0o600)
    assert config_mod.parse(text).warnings == ()
    # review 81: a private key every local user can read is said too
    os.chmod(_, 0o644)
    warned = config_mod.parse(text).warnings
    assert len(warned) == 1 and "readable by every user" in warned[0] and "chmod 600" in warned[0]


def test_a_steady_slow_tls_reader_gets_every_answer_on_its_connection(make_relayd, fake, tmp_path):
    """The deadline for an answer's leftover bytes (``send``) must not outlive that answer:
    on TLS it went on judging progress while the next answers filled the buffers, and cut
    one of them mid-body for a client that read steadily all along."""
    pair = make_cert(tmp_path / "c", "relayd", 1)
    port = free_port()
    make_relayd(basic_config(fake.url, port, top=f"tls: {{cert: '{pair[0]}', key: '{pair[1]}'}}")
                .replace("total: 60", "total: 60, send: 2"), args=["--workers", "1"])
    sizes = [3_000_000, 1_000, 2_000_000, 5_000]
    names = [fake.add(f"tls-big{n}", Scenario(body=b"x" * n, content_type="application/json",
                                              content_length=True)) for n in sizes]
    raw = socket.create_connection(("127.0.0.1", port), 5)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s = trust(pair[0]).wrap_socket(raw, server_hostname="127.0.0.1")
    s.settimeout(5)
    head = "GET /openai/v1/x HTTP/1.1\r\nHost: x\r\nx-fake: {}\r\n\r\n"
    s.sendall("".join(head.format(n) for n in names).encode())  # pipelined
    buf = b""
    for i, n in enumerate(sizes):
        while b"\r\n\r\n" not in buf:
            buf += s.recv(16384)
        h, _, buf = buf.partition(b"\r\n\r\n")
        assert h.startswith(b"HTTP/1.1 200"), h
        while len(buf) < n:  # about 1.3 MB/s: steady, never a pause of `send`
            data = s.recv(65536)
            assert data, f"answer {i} cut after {len(buf)} of {n} bytes"
            buf += data
            time.sleep(0.05)
        buf = buf[n:]
    s.close()

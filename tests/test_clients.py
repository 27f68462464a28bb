"""Client keys, allow lists and credential files, through a real relayd subprocess.

Every provider is driven with its official SDK, sending the relayd client key where the
SDK sends the provider key; the fake provider records what reached it, so each test
can assert that the client key never went upstream and the upstream key did.
"""

from __future__ import annotations

import asyncio
import collections

import hashlib
import signal
import socket
import urllib.request
from typing import Any, Callable

import aiohttp
import anthropic
import openai
import pytest
from yarl import URL

from conftest import basic_config
from fakes import FakeProvider, Scenario, fixture, free_port
from test_operations import get_metrics, metric, wait_for

ALICE, BOB, CAROL = "rk-alice-0001-secret", "rk-bob-0002-secret", "rk-carol-0003-secret"
CLIENTS = f"""
clients:
  alice: {{key: "{ALICE}"}}
  bob: {{key: "{BOB}", routes: [/openai, /gemini, /local/]}}
  carol: {{key_sha256: "{hashlib.sha256(CAROL.encode()).hexdigest()}", routes: [/anthropic]}}
"""


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider) -> Any:
    from conftest import Relayd
    port, admin = free_port(), free_port()
    r = Relayd(tmp_path_factory.mktemp("clients"), basic_config(fake.url, port, admin, top=CLIENTS))
    r.port, r.admin = port, admin  # type: ignore[attr-defined]
    r.start()
    yield r
    r.stop()


def reached(fake: FakeProvider, sc: str) -> list[dict[str, Any]]:
    """What the fake received for requests of scenario sc."""
    return [q for q in fake.requests if dict((k.lower(), v) for k, v in q["headers"]).get("x-fake") == sc]


def no_client_key(records: list[dict[str, Any]]) -> None:
    assert records, "the request never reached the upstream"
    for q in records:
        text = repr(q["headers"]) + q["raw_path"]
        for key in (ALICE, BOB, CAROL):
            assert key not in text


def header(q: dict[str, Any], name: str) -> str | None:
    return next((v for k, v in q["headers"] if k.lower() == name.lower()), None)


def _openai(base: str, key: str, sc: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, default_headers={"x-fake": sc},
                         timeout=10)


def _chat(client: openai.OpenAI) -> str:
    out = []
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            out.append(chunk.choices[0].delta.content)
    return "".join(out)


def test_openai_sdk_accepted_refused_and_key_replaced(guarded, fake):
    sc = fake.add("cl-openai", Scenario(body=fixture("openai-chat-usage.sse")))
    base = f"http://127.0.0.1:{guarded.port}/openai/v1"
    assert _chat(_openai(base, ALICE, sc))
    assert _chat(_openai(base, BOB, sc))
    got = reached(fake, sc)
    no_client_key(got)
    assert {header(q, "Authorization") for q in got} == {"Bearer sk-test-openai-KEY1"}
    with pytest.raises(openai.AuthenticationError) as e401:
        _chat(_openai(base, "rk-nobody", sc))
    assert e401.value.code == "invalid_api_key"
    assert e401.value.response.headers["Server"] == "relayd"
    assert e401.value.response.headers["X-Request-Id"]
    with pytest.raises(openai.PermissionDeniedError):
        _chat(_openai(base, CAROL, sc))
    assert len(reached(fake, sc)) == 2  # refused requests never went upstream
    lines = guarded.wait_access(4, lambda l: l["route"] == "/openai" and l["client_name"] is not None
                                or l["status"] in (401, 403))
    names = [(l["client_name"], l["status"]) for l in lines if l["route"] == "/openai"]
    assert ("alice", 200) in names and ("bob", 200) in names
    assert (None, 401) in names and ("carol", 403) in names


def test_azure_sdk_api_key_header(guarded, fake):
    sc = fake.add("cl-azure", Scenario(body=fixture("openai-chat-basic.sse")))

    def client(key: str) -> openai.AzureOpenAI:
        return openai.AzureOpenAI(base_url=f"http://127.0.0.1:{guarded.port}/azure", api_key=key,
                                  api_version="2024-06-01", max_retries=0,
                                  default_headers={"x-fake": sc}, timeout=10)

    assert _chat(client(ALICE))
    with pytest.raises(openai.AuthenticationError):
        _chat(client(BOB[:-1]))
    with pytest.raises(openai.PermissionDeniedError):
        _chat(client(BOB))
    got = reached(fake, sc)
    no_client_key(got)
    assert len(got) == 1 and header(got[0], "api-key") == "az-test-KEY4"
    assert "api-version=2024-06-01" in got[0]["raw_path"]


def test_anthropic_sdk_bearer_or_x_api_key(guarded, fake):
    sc = fake.add("cl-anthropic", Scenario(body=fixture("anthropic-messages.sse")))

    def run(key: str) -> Any:
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{guarded.port}/anthropic",
                                     api_key=key, max_retries=0, default_headers={"x-fake": sc})
        with client.messages.stream(model="m", max_tokens=10,
                                    messages=[{"role": "user", "content": "x"}]) as s:
            return s.get_final_message()

    assert run(CAROL).stop_reason is not None  # a client configured by key_sha256 only
    assert run(ALICE).stop_reason is not None
    with pytest.raises(anthropic.AuthenticationError) as e401:
        run("sk-ant-guess")
    assert e401.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert e401.value.request_id  # the SDK reads relayd's request-id header
    with pytest.raises(anthropic.PermissionDeniedError) as e403:
        run(BOB)
    assert e403.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    # this SDK sends api_key as a bearer token; others send x-api-key: both are accepted
    req = urllib.request.Request(f"http://127.0.0.1:{guarded.port}/anthropic/v1/messages", b"{}",
                                 {"x-api-key": ALICE, "x-fake": sc})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    got = reached(fake, sc)
    no_client_key(got)
    assert len(got) == 3 and {header(q, "x-api-key") for q in got} == {"sk-ant-test-KEY2"}
    assert {header(q, "Authorization") for q in got} == {None}


def test_google_genai_sdk(guarded, fake):
    genai = pytest.importorskip("google.genai")
    from google.genai import errors, types

    sc = fake.add("cl-gemini", Scenario(body=fixture("gemini-stream.sse")))

    def run(key: str) -> str:
        client = genai.Client(api_key=key, http_options=types.HttpOptions(
            base_url=f"http://127.0.0.1:{guarded.port}/gemini/", headers={"x-fake": sc}))
        return "".join(c.text or "" for c in client.models.generate_content_stream(
            model="gemini-2.0-flash", contents="hi"))

    assert run(ALICE) and run(BOB)
    with pytest.raises(errors.ClientError) as e401:
        run("AIza-not-a-relayd-key")
    assert e401.value.code == 401 and e401.value.status == "UNAUTHENTICATED"
    with pytest.raises(errors.ClientError) as e403:
        run(CAROL)
    assert e403.value.code == 403 and e403.value.status == "PERMISSION_DENIED"
    got = reached(fake, sc)
    no_client_key(got)
    assert len(got) == 2 and {header(q, "x-goog-api-key") for q in got} == {"gem-test-KEY3"}


async def test_a_client_key_in_the_query_of_another_provider_never_reaches_the_upstream(guarded, fake):
    # Only Gemini reads its key from the query; a client that also puts it there on an
    # OpenAI route (?key=, ?api_key=) must not hand it to the upstream.
    sc = fake.add("cl-openai-q", Scenario(body=b'{"ok":true}', content_type="application/json"))
    base = f"http://127.0.0.1:{guarded.port}/openai/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        for query in (f"key={ALICE}&alt=sse", f"alt=sse&api_key={ALICE.replace('-', '%2D')}", f"k={ALICE}"):
            async with s.post(URL(f"{base}?{query}", encoded=True), json={},
                              headers={"x-fake": sc, "Authorization": f"Bearer {ALICE}"}) as resp:
                assert resp.status == 200
    got = reached(fake, sc)
    no_client_key(got)
    assert [q["raw_path"] for q in got] == ["/oai/v1/chat/completions?alt=sse"] * 2 + ["/oai/v1/chat/completions"]


async def test_gemini_key_query_parameter_removed_rest_of_query_kept(guarded, fake):
    sc = fake.add("cl-gemini-q", Scenario(body=fixture("gemini-stream.sse")))
    base = f"http://127.0.0.1:{guarded.port}/gemini/v1beta/models/g:streamGenerateContent"
    async with aiohttp.ClientSession() as s:
        async with s.post(URL(f"{base}?alt=sse&key={ALICE}&x=%2F%20+y", encoded=True),
                          headers={"x-fake": sc}, json={}) as resp:
            assert resp.status == 200
            await resp.read()
        async with s.post(f"{base}?key=wrong&alt=sse", headers={"x-fake": sc}, json={}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["status"] == "UNAUTHENTICATED"
        async with s.post(f"{base}?key={BOB}", headers={"x-fake": sc}, json={}) as resp:
            assert resp.status == 200
            await resp.read()
    got = reached(fake, sc)
    no_client_key(got)
    assert [q["raw_path"] for q in got] == ["/v1beta/models/g:streamGenerateContent?alt=sse&x=%2F%20+y",
                                            "/v1beta/models/g:streamGenerateContent"]
    assert {header(q, "x-goog-api-key") for q in got} == {"gem-test-KEY3"}


async def test_missing_key_and_passthrough_upstream_gets_no_credential(guarded, fake):
    sc = fake.add("cl-raw", Scenario(body=b'{"ok":true}', content_type="application/json"))
    url = f"http://127.0.0.1:{guarded.port}"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/openai/v1/chat/completions", json={}, headers={"x-fake": sc}) as r:
            assert r.status == 401 and r.headers["Server"] == "relayd"
            body = await r.json()
            assert body["error"]["code"] == "invalid_api_key" and "missing" in body["error"]["message"]
        # openai route: the key belongs in Authorization, not x-api-key
        async with s.post(f"{url}/openai/v1/chat/completions", json={},
                          headers={"x-fake": sc, "x-api-key": ALICE}) as r:
            assert r.status == 401
        # /nokey: an upstream without api_key gets no credential at all, not the client's key
        async with s.post(f"{url}/nokey/v1/chat/completions", json={},
                          headers={"x-fake": sc, "Authorization": f"bearer {ALICE}",
                                   "x-api-key": ALICE, "api-key": ALICE}) as r:
            assert r.status == 200
        async with s.get(f"{url}/nowhere") as r:
            assert r.status == 404  # no route: nothing to check a key against
    got = reached(fake, sc)
    no_client_key(got)
    assert len(got) == 1
    assert not [k for k, _ in got[0]["headers"]
                if k.lower() in ("authorization", "x-api-key", "api-key", "x-goog-api-key")]


async def test_a_failover_route_strips_every_targets_credential_params(make_relayd, fake):
    """Review 78: the client's own Google credentials (``?key=``, ``access_token``) were
    stripped only for the route's first provider: on ``[openai, gemini]`` failing over,
    they reached the Gemini upstream, which README says gets no provider credential."""
    port = free_port()
    r = make_relayd(basic_config(
        fake.url, port, top=CLIENTS,
        extra_upstreams=f'  dead: {{url: "http://127.0.0.1:{free_port()}/oai", provider: openai, '
                        f'api_key: "sk-dead-KEY9"}}\n  gpass: {{url: "{fake.url}/", provider: gemini}}',
        extra_routes="  - {path: /mix, upstream: [dead, gpass]}"))
    sc = fake.add("cl-mix", Scenario(body=b'{"ok":true}', content_type="application/json"))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/mix/v1beta/models?key=CLIENTS-OWN-KEY&alt=sse"
                         f"&access_token=TOKEN#x?key=FRAGMENT",
                         headers={"x-fake": sc, "Authorization": f"Bearer {ALICE}"}) as resp:
            assert resp.status == 200, await resp.text()
    got = reached(fake, sc)
    no_client_key(got)
    assert [q["raw_path"] for q in got] == ["/v1beta/models?alt=sse"]
    assert r.logs()  # (relayd ran: its lines are there)


async def test_metrics_per_client_and_keys_never_logged(guarded, fake):
    sc = fake.add("cl-usage", Scenario(body=fixture("openai-chat-usage.sse")))
    _chat(_openai(f"http://127.0.0.1:{guarded.port}/openai/v1", BOB, sc))
    guarded.wait_access(1, lambda l: l.get("client_name") == "bob" and l["usage"])
    m = await get_metrics(guarded.admin)
    assert metric(m, "relayd_client_tokens_total", client="bob", kind="input") > 0
    assert metric(m, "relayd_client_tokens_total", client="bob", kind="output") > 0
    assert metric(m, "relayd_requests_total", route="/openai", client="bob", status="200") >= 1
    assert metric(m, "relayd_requests_total", client="none", status="401") >= 1
    clients = {l.split('client="')[1].split('"')[0] for l in m.splitlines()
               if l.startswith("relayd_requests_total{")}
    assert clients <= {"alice", "bob", "carol", "none"}
    text = guarded.log_path.read_text() + m
    for key in (ALICE, BOB, CAROL):
        assert key not in text


async def test_reload_swaps_clients(make_relayd, fake):
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=CLIENTS))
    sc = fake.add("cl-reload", Scenario(body=b'{"ok":true}', content_type="application/json"))

    async def status(key: str) -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/anthropic/v1/messages", json={},
                              headers={"x-api-key": key, "x-fake": sc}) as resp:
                return resp.status

    assert await status(ALICE) == 200 and await status(BOB) == 403
    r.config.write_text(basic_config(fake.url, port, top=f"""
clients:
  bob: {{key: "{BOB}", routes: [/anthropic]}}
  dave: {{key: "rk-dave-0004"}}
"""))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
    assert await status(ALICE) == 401 and await status(BOB) == 200
    assert await status("rk-dave-0004") == 200


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_revoking_the_last_client_refuses_everyone(make_relayd, fake, workers):
    """README: to revoke a key, remove its entry and reload.  Removing the last one leaves
    an empty clients: section, which refuses every request (as an empty htpasswd file
    does nginx), with a warning; it must not turn the key check off."""
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top=f'clients:\n  alice: {{key: "{ALICE}"}}\n'),
                    args=["--workers", workers])
    sc = fake.add("cl-last", Scenario(body=b'{"ok":true}', content_type="application/json"))

    async def status(key: str | None) -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/openai/v1/chat/completions", json={},
                              headers={"x-fake": sc, **({"Authorization": f"Bearer {key}"} if key else {})}) as resp:
                return resp.status

    assert await status(ALICE) == 200 and await status(None) == 401
    fake.reset_stats()
    r.config.write_text(basic_config(fake.url, port, top="clients:\n  # alice: revoked\n"))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
    assert wait_for(lambda: any("lists no client" in (l.get("warning") or "") for l in r.logs()))
    assert [await status(k) for k in (ALICE, None, "anything")] == [401, 401, 401]
    assert not fake.requests  # nothing reached the upstream on the operator's key


async def test_api_key_file_reread_on_reload(make_relayd, fake, tmp_path):
    port = free_port()
    keyfile = tmp_path / "openai.key"
    keyfile.write_text("sk-from-file-ONE\n")
    extra = f'  filed: {{url: "{fake.url}", provider: openai, api_key_file: "{keyfile}"}}'
    cfg = basic_config(fake.url, port, extra_upstreams=extra, extra_routes="  - {path: /filed, upstream: filed}")
    r = make_relayd(cfg)
    sc = fake.add("cl-keyfile", Scenario(body=b'{"ok":true}', content_type="application/json"))

    async def send() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/filed/v1/models", headers={"x-fake": sc}) as resp:
                assert resp.status == 200

    await send()
    keyfile.write_text("sk-from-file-TWO\n")
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
    await send()
    assert [header(q, "Authorization") for q in reached(fake, sc)] == [
        "Bearer sk-from-file-ONE", "Bearer sk-from-file-TWO"]
    assert "sk-from-file" not in r.log_path.read_text()


def _closed_at_once(port: int) -> bool:
    """True if relayd closes a connection without a byte of answer; False if it answers."""
    with socket.create_connection(("127.0.0.1", port), 2) as s:
        s.settimeout(5)
        try:
            s.sendall(b"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(1024) == b""
        except ConnectionResetError:
            return True


def _closed_silently(port: int) -> bool:
    """True if relayd closes a connection that has sent nothing (refused at accept)."""
    with socket.create_connection(("127.0.0.1", port), 2) as s:
        s.settimeout(3)
        try:
            return s.recv(1024) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def test_allow_lists_close_outsiders_at_accept(make_relayd, fake):
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin, top="allow: [10.0.0.0/8, '::1']\n"
                                                              "admin_allow: [192.168.0.0/16]"))
    for _ in range(3):
        assert _closed_at_once(port)
    assert _closed_at_once(admin)
    assert _closed_silently(admin)  # at accept, before a request head (it sends none)
    assert wait_for(lambda: any(l.get("event") == "connection refused: peer not in the allow list"
                                and l.get("listener") == "listen" for l in r.logs()))
    refusals = [l for l in r.logs() if l.get("event", "").startswith("connection refused")]
    per_worker = collections.Counter(l.get("worker") for l in refusals if l["listener"] == "listen")
    assert per_worker and max(per_worker.values()) == 1  # rate-limited (each worker logs its own)
    assert refusals[0]["peer"] == "127.0.0.1" and refusals[0]["refused"] == 1
    assert not r.access()  # nothing was read, nothing answered

    open_port, open_admin = free_port(), free_port()
    r2 = make_relayd(basic_config(fake.url, open_port, open_admin, top="allow: [127.0.0.0/8]\n"
                                                                        "admin_allow: [127.0.0.1]"),
                     name="open.yaml")
    assert not _closed_at_once(open_port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{open_admin}/metrics", timeout=5).read().decode()
    assert metric(body, "relayd_refused_connections_total", listener="listen") == 0
    r.config.write_text(basic_config(fake.url, port, admin, top="allow: [127.0.0.1/32]"))
    r.signal(signal.SIGHUP)  # the allow list follows the config: a reload opens the door
    assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
    assert not _closed_at_once(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    assert metric(body, "relayd_refused_connections_total", listener="listen") == 3
    assert metric(body, "relayd_refused_connections_total", listener="admin_listen") == 2


def test_admin_allow_at_accept_in_one_process(make_relayd, fake):
    """The single-process daemon runs its own admin listener: the same check at accept."""
    port, admin = free_port(), free_port()
    make_relayd(basic_config(fake.url, port, admin, top="workers: 1\nadmin_allow: [192.168.0.0/16]"))
    assert _closed_silently(admin) and _closed_at_once(admin)
    assert not _closed_at_once(port)


# -- units: where keys sit, the query edit, the gate's arithmetic

def test_presented_key_spots_and_query_edit():
    from relayd import providers
    from multidict import CIMultiDict
    oa, gem, ant = providers.get("openai"), providers.get("gemini"), providers.get("anthropic")
    assert oa.presented_key(CIMultiDict({"authorization": "bearer  k1 "}), "") == "k1"
    assert oa.presented_key(CIMultiDict({"Authorization": "Basic k1"}), "") is None
    assert oa.presented_key(CIMultiDict(), "key=k1") is None  # only gemini reads the query
    assert ant.presented_key(CIMultiDict({"x-api-key": "k2", "Authorization": "Bearer k3"}), "") == "k2"
    assert gem.presented_key(CIMultiDict(), "alt=sse&key=a%2Bb") == "a+b"
    assert gem.presented_key(CIMultiDict({"x-goog-api-key": "h"}), "key=q") == "h"
    assert gem.without_key_param("key=1&alt=sse&keys=2&key=3&x=%2F") == "alt=sse&keys=2&x=%2F"
    assert gem.without_key_param("key=1") == ""
    # the name as the upstream decodes it: %6Bey (or k%65y) is key
    assert gem.without_key_param("alt=sse&%6Bey=CLIENT&k%65y=2&%6bey") == "alt=sse"
    assert gem.presented_key(CIMultiDict(), "%6Bey=k9") == "k9"
    # ";" separates too (some servers split on it): the credential is gone either way
    assert gem.without_key_param("alt=sse;key=K&x=1") == "alt=sse&x=1"
    assert gem.without_key_param("key=K;alt=sse") == "alt=sse"
    # review 74: Google reads a key from $key too, and an OAuth token from access_token or
    # oauth_token: a client's rode along next to relayd's key
    assert gem.without_key_param("alt=sse&$key=A&%24key=B&access_token=T&oauth_token=O&x=1") == "alt=sse&x=1"
    assert gem.without_key_param("api_key=1&token=2") == "api_key=1&token=2"  # not Google's
    from relayd.clients import _without_value
    assert _without_value("k=rk-1;x=1", "rk-1") == "x=1"
    assert _without_value("a=1;b=2&k=rk-1", "rk-1") == "a=1;b=2"
    assert _without_value("a=1;b=2", "rk-1") == "a=1;b=2"


async def test_gate_counts_and_rate_limits(monkeypatch):
    import ipaddress
    from relayd import allow as allow_lists

    class Transport:
        def __init__(self, peer):
            self.peer, self.closed = peer, False

        def get_extra_info(self, name):
            return self.peer

        def close(self):
            self.closed = True

    logged = []

    class Log:
        def warning(self, event, **kw):
            logged.append(kw)

    monkeypatch.setattr(allow_lists.logs, "get", lambda: Log())
    gate = allow_lists.Gate("listen", every=3600)
    allow = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert gate.admits(Transport(("::ffff:10.1.2.3", 1, 0, 0)), allow)  # dual-stack peer
    assert gate.admits(Transport(("fd00::1", 1, 0, 0)), allow)
    assert gate.admits(Transport(("192.0.2.1", 1)), ())  # no list: everyone
    refused = [Transport(("192.0.2.1", 1)), Transport(None), Transport(("fe80::1%eth0", 1, 0, 2))]
    assert not any(gate.admits(t, allow) for t in refused)
    assert all(t.closed for t in refused) and gate.total == 3
    assert logged == [{"listener": "listen", "peer": "192.0.2.1", "refused": 1, "refused_total": 1}]

    # review 72: the refusals after a line were told only by a refusal after the interval,
    # so the end of a scan was never logged; now they are when the interval ends.
    logged.clear()
    gate = allow_lists.Gate("listen", every=0.2)
    assert not gate.admits(Transport(("192.0.2.1", 1)), allow)
    for i in range(4):
        assert not gate.admits(Transport((f"192.0.2.{i + 2}", 1)), allow)
    assert logged == [{"listener": "listen", "peer": "192.0.2.1", "refused": 1, "refused_total": 1}]
    await asyncio.sleep(0.4)
    assert logged[1:] == [{"listener": "listen", "peer": "192.0.2.5", "refused": 4, "refused_total": 5}]
    await asyncio.sleep(0.3)
    assert len(logged) == 2  # nothing refused since: no line
    assert not gate.admits(Transport(("192.0.2.9", 1)), allow)  # past the interval: at once
    assert logged[2:] == [{"listener": "listen", "peer": "192.0.2.9", "refused": 1, "refused_total": 6}]


def test_log_warnings_logs_each_config_warning():
    from relayd import server
    from relayd.config import parse
    cfg = parse(basic_config("http://127.0.0.1:9", 8080).replace("listen: 127.0.0.1:8080",
                                                                    "listen: 0.0.0.0:8080"))
    got = []

    class Log:
        def warning(self, event, **kw):
            got.append((event, kw["warning"]))

    server.log_warnings(Log(), cfg)
    assert got and got[0][0] == "config warning" and "no clients: section" in got[0][1]


def test_a_reload_that_narrows_allow_shuts_out_open_keepalive_connections(make_relayd, fake):
    # nginx checks its list per request; a list checked only at accept would let a network
    # the operator just shut out keep spending the key on a connection it keeps busy.
    port = free_port()
    r = make_relayd(basic_config(fake.url, port, top="workers: 1\nallow: [127.0.0.0/8]"))
    request = b"GET /openai/echo HTTP/1.1\r\nHost: x\r\n\r\n"
    got = _answer_after_reload(r, port, request, basic_config(
        fake.url, port, top="workers: 1\nallow: [10.0.0.0/8]"), before=fake.reset_stats)
    assert got == b""  # closed, unanswered, like a refusal at accept
    assert fake.requests == []
    r.config.write_text(basic_config(fake.url, port, top="workers: 1\nallow: [127.0.0.0/8]"))
    r.signal(signal.SIGHUP)  # and a list that admits the peer again lets it back in
    assert wait_for(lambda: sum(l.get("event") == "reload ok" for l in r.logs()) == 2)
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(request)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("workers", ["workers: 1", "workers: 2"])
def test_a_reload_that_narrows_admin_allow_shuts_out_open_admin_connections(make_relayd, fake, workers):
    port, admin = free_port(), free_port()
    r = make_relayd(basic_config(fake.url, port, admin, top=f"{workers}\nadmin_allow: [127.0.0.0/8]"))
    got = _answer_after_reload(r, admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", basic_config(
        fake.url, port, admin, top=f"{workers}\nadmin_allow: [10.0.0.0/8]"))
    assert got == b""  # closed, unanswered, like a refusal at accept


def _answer_after_reload(r: Any, port: int, request: bytes, config: str,
                         before: Callable[[], None] = lambda: None) -> bytes:
    """On one keep-alive connection: a request answered 200, a reload to ``config``, the
    same request again; what that second one got (b"" if the connection was closed)."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(request)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        before()
        r.config.write_text(config)
        r.signal(signal.SIGHUP)
        assert wait_for(lambda: any(l.get("event") == "reload ok" for l in r.logs()))
        s.sendall(request)
        try:
            return s.recv(65536)
        except ConnectionResetError:
            return b""

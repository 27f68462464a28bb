"""Official SDKs through relayd parse to the same result as talking to the provider directly."""

from __future__ import annotations

import json
import socket
from typing import Any

import anthropic
import openai
import pytest
from aiohttp_sse_client import client as sse_client

from conftest import basic_config
from fakes import Scenario, fixture, free_port


def _openai(base: str, sc: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="client-key", max_retries=0,
                         default_headers={"x-fake": sc}, timeout=10)


def _chat_text(client: openai.OpenAI) -> tuple[str, object]:
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage.model_dump()
    return "".join(parts), usage


@pytest.mark.parametrize("name", ["openai-chat-basic.sse", "openai-chat-usage.sse",
                                  "openai-chat-usage-obfuscation.sse"])
def test_openai_chat_stream_same_as_direct(shared, fake, name):
    sc = fake.add(f"sdk-{name}", Scenario(body=fixture(name), chunking="random", seed=7))
    via = _chat_text(_openai(f"http://127.0.0.1:{shared.port}/openai/v1", sc))
    direct = _chat_text(_openai(f"{fake.url}/v1", sc))
    assert via == direct
    assert len(via[0]) > 5


def test_openai_chat_tool_calls_same_as_direct(shared, fake):
    sc = fake.add("sdk-tools", Scenario(body=fixture("openai-chat-tools.sse"), chunking="lines"))

    def run(base: str) -> list:
        out = []
        for chunk in _openai(base, sc).chat.completions.create(model="m", messages=[], stream=True):
            out.append(chunk.model_dump())
        return out

    assert run(f"http://127.0.0.1:{shared.port}/openai/v1") == run(f"{fake.url}/v1")


@pytest.mark.parametrize("name", ["openai-responses.sse", "openai-responses-minimal.sse"])
def test_openai_responses_stream_same_as_direct(shared, fake, name):
    sc = fake.add(f"sdk-{name}", Scenario(body=fixture(name), chunking="utf8"))

    def run(base: str) -> tuple[list[str], str]:
        client = _openai(base, sc)
        types, text = [], ""
        with client.responses.stream(model="gpt-4o-mini", input="hi") as stream:
            for ev in stream:
                types.append(ev.type)
            text = stream.get_final_response().output_text
        return types, text

    via = run(f"http://127.0.0.1:{shared.port}/openai/v1")
    assert via == run(f"{fake.url}/v1")
    assert via[0][-1] == "response.completed" and via[1]


@pytest.mark.parametrize("name", ["anthropic-messages.sse", "anthropic-messages-tools.sse"])
def test_anthropic_messages_stream_same_as_direct(shared, fake, name):
    sc = fake.add(f"sdk-{name}", Scenario(body=fixture(name), chunking="random", seed=11))

    def run(base: str) -> dict:
        client = anthropic.Anthropic(base_url=base, api_key="client-key", max_retries=0,
                                     default_headers={"x-fake": sc})
        with client.messages.stream(model="claude-haiku-4-5", max_tokens=100,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            for _ in stream:
                pass
            return stream.get_final_message().model_dump()

    via = run(f"http://127.0.0.1:{shared.port}/anthropic")
    assert via == run(fake.url)
    assert via["stop_reason"] is not None


def test_anthropic_gzip_stream_through_sdk(shared, fake):
    sc = fake.add("sdk-gz", Scenario(gzip_body=fixture("anthropic-messages-tools.sse.gz"), chunking="random"))
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{shared.port}/anthropic", api_key="k",
                                 max_retries=0, default_headers={"x-fake": sc})
    with client.messages.stream(model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as s:
        msg = s.get_final_message()
    assert any(block.type == "tool_use" for block in msg.content)


def test_anthropic_sdk_stream_cut_mid_way_raises_though_it_accepts_gzip(shared, fake):
    """Review 76: the Anthropic SDK sends ``Accept-Encoding: gzip, deflate`` and Anthropic
    then compresses the stream; a compressed stream cannot be tracked, so a reset reached
    the SDK as a transport error with no error event, heartbeat or usage.  relayd asks its
    upstreams for identity."""
    body = fixture("anthropic-messages.sse")
    sc = fake.add("sdk-gz-cut", Scenario(body=body, chunking="events", gzip_if_asked=True,
                                         fault="reset", fault_at=len(body) // 2))
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{shared.port}/anthropic", api_key="k",
                                 max_retries=0, default_headers={"x-fake": sc})
    with pytest.raises(anthropic.APIStatusError) as err:
        with client.messages.stream(model="m", max_tokens=10,
                                    messages=[{"role": "user", "content": "x"}]) as s:
            s.get_final_message()
    assert "relayd" in str(err.value)
    got = [q for q in fake.requests if dict(q["headers"]).get("x-fake") == sc]
    assert got and dict((k.lower(), v) for k, v in got[-1]["headers"])["accept-encoding"] == "identity"


def test_google_genai_stream_same_as_direct(shared, fake):
    genai = pytest.importorskip("google.genai")
    from google.genai import types

    sc = fake.add("sdk-gemini", Scenario(body=fixture("gemini-stream.sse"), chunking="utf8"))

    def run(base: str) -> list[str]:
        client = genai.Client(api_key="client-key", http_options=types.HttpOptions(
            base_url=base, headers={"x-fake": sc}))
        return [c.text or "" for c in client.models.generate_content_stream(model="gemini-2.0-flash",
                                                                           contents="hi")]

    via = run(f"http://127.0.0.1:{shared.port}/gemini/")
    assert via == run(fake.url + "/")
    assert "".join(via)


def test_google_genai_stream_survives_heartbeats(make_relayd, fake):
    """google-genai reads every line that does not start with "data: " as JSON: an SSE
    comment heartbeat failed the stream (UnknownApiResponseError).  Gemini routes beat
    with a blank line."""
    genai = pytest.importorskip("google.genai")
    from google.genai import types
    port = free_port()
    r = make_relayd(basic_config(fake.url, port).replace("heartbeat: 0", "heartbeat: 200ms"))
    sc = fake.add("sdk-gemini-beat", Scenario(body=fixture("gemini-stream.sse"), chunking="lines",
                                              first_delay=0.7, delay=0.05))
    client = genai.Client(api_key="client-key", http_options=types.HttpOptions(
        base_url=f"http://127.0.0.1:{port}/gemini/", headers={"x-fake": sc}))
    got = [c.text or "" for c in client.models.generate_content_stream(model="gemini-2.0-flash",
                                                                       contents="hi")]
    assert "".join(got)
    assert r.wait_access(1)[-1]["heartbeats"] >= 2


def test_sdks_do_not_resend_a_request_the_upstream_thought_about_too_long(make_relayd, fake):
    """relayd's 504 after first_byte (the upstream had the whole request): the official
    SDKs retried it twice, each attempt billed; x-should-retry: false stops them."""
    port = free_port()
    make_relayd(basic_config(fake.url, port).replace("first_byte: 5", "first_byte: 300ms"))
    sc = fake.add("sdk-slow-head", Scenario(body=b'{"ok":true}', content_type="application/json",
                                            header_delay=0.8))
    fake.reset_stats()
    client = openai.OpenAI(api_key="k", base_url=f"http://127.0.0.1:{port}/openai/v1",
                           default_headers={"x-fake": sc})
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 504
    assert len(fake.requests) == 1


def _slow_busy_and(make_relayd: Any, fake: Any, port: int, tag: str, third: str, routes: str) -> Any:
    """relayd (first_byte 300 ms) with upstreams ``slow`` (no head for 0.8 s), ``busy``
    (a 503) and ``third`` at ``third``, and the failover ``routes`` over them."""
    slow = fake.add(f"{tag}-slow", Scenario(body=b'{"ok":true}', content_type="application/json",
                                            header_delay=0.8))
    busy = fake.add(f"{tag}-busy", Scenario(body=b'{"error":{"message":"busy","type":"server_error"}}',
                                            status=503, content_type="application/json"))
    return make_relayd(basic_config(fake.url, port, extra_upstreams=(
        f'  slow: {{url: "{fake.url}", provider: openai, headers: {{x-fake: {slow}}}}}\n'
        f'  busy: {{url: "{fake.url}", provider: openai, headers: {{x-fake: {busy}}}}}\n'
        f'  third: {{url: "{third}", provider: openai}}'), extra_routes=routes)
        .replace("first_byte: 5", "first_byte: 300ms"), args=["--workers", "1"])


def test_sdks_do_not_resend_when_a_failover_route_ends_in_a_refusal_after_a_timeout(make_relayd, fake):
    """Review 69: route [slow, dead]: the first upstream held the request past first_byte,
    the second refused the connection.  The client got the refusal's retryable 502 and the
    SDK sent the prompt to the first upstream twice more; the timeout's 504 (no retry)
    is the answer, whatever came after it."""
    port = free_port()
    r = _slow_busy_and(make_relayd, fake, port, "sdk", f"http://127.0.0.1:{free_port()}",
                       "  - {path: /fo/v1, upstream: [slow, third]}\n"
                       "  - {path: /fo3/v1, upstream: [slow, busy, third]}")
    fake.reset_stats()
    client = openai.OpenAI(api_key="k", base_url=f"http://127.0.0.1:{port}/fo/v1", max_retries=2)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 504
    assert "upstream 'slow' sent no response headers" in str(err.value)
    assert err.value.response.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 1
    # review 75: the access line names the upstream whose failure the client got
    assert r.wait_access(1)[-1]["upstream"] == "slow"
    # and an upstream's own 503 relayed after such a timeout says "no retry" too
    fake.reset_stats()
    client = openai.OpenAI(api_key="k", base_url=f"http://127.0.0.1:{port}/fo3/v1", max_retries=2)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503
    assert err.value.response.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 2  # slow once, busy once: no SDK retry


async def test_sdks_do_not_resend_an_error_relayed_after_a_timeout_or_an_unrelayable_answer(make_relayd, fake):
    """Review 83: on ``[slow, busy]`` the last upstream's 503 went out as relayed, without
    ``x-should-retry: false`` (only a kept one got it), and the SDK sent the prompt to the
    slow upstream twice more; on ``[busy, broken]``, where broken answered what relayd
    cannot relay (the upstream acted on it), the kept 503 of busy was retryable too."""
    from test_upstream_hygiene import RawUpstream

    async def broken_answer(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    port = free_port()
    async with RawUpstream(broken_answer) as broken:
        _slow_busy_and(make_relayd, fake, port, "sdk2", broken.url,
                       "  - {path: /fo2/v1, upstream: [slow, busy]}\n"
                       "  - {path: /fo5/v1, upstream: [busy, third]}")
        for route, status in (("/fo2/v1", 503), ("/fo5/v1", 503)):
            fake.reset_stats()
            client = openai.AsyncOpenAI(api_key="k", base_url=f"http://127.0.0.1:{port}{route}", max_retries=2)
            with pytest.raises(openai.InternalServerError) as err:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert err.value.status_code == status
            assert err.value.response.headers.get("x-should-retry") == "false", route
            assert len(fake.requests) == (2 if route == "/fo2/v1" else 1), route  # no SDK retry
        assert broken.requests == 1


async def test_aiohttp_sse_client_events(shared, fake):
    body = fixture("openai-chat-usage.sse")
    sc = fake.add("sse-client", Scenario(body=body, chunking="random", seed=5))
    got = []
    async with sse_client.EventSource(f"http://127.0.0.1:{shared.port}/openai/v1/chat/completions",
                                      headers={"x-fake": sc}, reconnection_time=0) as es:
        async for ev in es:
            if ev.data == "[DONE]":
                break
            got.append(json.loads(ev.data))
    expected = [json.loads(l[6:]) for l in body.decode().split("\n\n") if l.startswith("data: {")]
    assert got == expected


async def test_upstream_urls_in_answer_headers_point_back_through_relayd(shared, fake):
    """google-genai's files.upload follows the resumable-upload URL in x-goog-upload-url,
    and clients follow Location: pointing at the provider itself, they bypassed relayd
    (no key: the upload failed; or relayd's client key sent to the provider).  As nginx's
    proxy_redirect default, the upstream's URL prefix becomes the route's."""
    import aiohttp
    up = fake.url  # the gemini upstream's URL (base path "/")
    sc = fake.add("moved", Scenario(body=b"{}", content_type="application/json", headers={
        "X-Goog-Upload-URL": f"{up}/upload/v1beta/files?upload_id=abc&upload_protocol=resumable",
        "Location": f"{up}/v1beta/files/f1", "Content-Location": "https://elsewhere.example/x"}))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{shared.port}/gemini/upload/v1beta/files",
                          headers={"x-fake": sc}, json={}) as r:
            here = f"http://127.0.0.1:{shared.port}/gemini"
            assert r.headers["X-Goog-Upload-URL"] == f"{here}/upload/v1beta/files?upload_id=abc&upload_protocol=resumable"
            assert r.headers["Location"] == f"{here}/v1beta/files/f1"
            assert r.headers["Content-Location"] == "https://elsewhere.example/x"  # not the upstream's
    # review 86: the port the client reached relayd at stays in the URL (aiohttp's
    # request.host drops it for an absolute-form target and without a Host header)
    for head, where in ((f"POST http://front.example:81/gemini/upload/v1beta/files HTTP/1.1\r\nHost: other\r\n",
                         "http://front.example:81/gemini"),
                        ("POST /gemini/upload/v1beta/files HTTP/1.0\r\n", f"http://127.0.0.1:{shared.port}/gemini")):
        with socket.create_connection(("127.0.0.1", shared.port), 5) as sock:
            sock.sendall(f"{head}x-fake: {sc}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        heads = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in
                                                      data.partition(b"\r\n\r\n")[0].decode().split("\r\n")[1:])}
        assert heads["location"] == f"{where}/v1beta/files/f1", (head, heads)

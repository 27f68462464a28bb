"""Failures after the response headers: block-aligned prefix + exactly one provider-format error."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import anthropic
import openai
import pytest

from conftest import basic_config
from fakes import Scenario, block_ends, fixture, free_port, sse_events, split_prefix_and_last_block

PROVIDERS = {
    # kind: (route, fixture)
    "chat": ("/openai/v1/chat/completions", "openai-chat-usage.sse"),
    "responses": ("/openai/v1/responses", "openai-responses.sse"),
    "anthropic": ("/anthropic/v1/messages", "anthropic-messages.sse"),
    "gemini": ("/gemini/v1beta/models/m:streamGenerateContent?alt=sse", "gemini-stream.sse"),
}
FAULTS = ["reset_mid_event", "reset_at_boundary", "eof_no_marker", "idle_timeout", "total_timeout"]
CHUNKINGS = ["whole", "lines", "random"]
REASON = {"reset_mid_event": "upstream_reset", "reset_at_boundary": "upstream_reset",
          "eof_no_marker": "upstream_eof", "idle_timeout": "idle_timeout", "total_timeout": "total_timeout"}


@pytest.fixture(scope="module")
def relay(tmp_path_factory, fake):
    from conftest import Relayd
    port = free_port()
    text = basic_config(fake.url, port).replace("idle: 5", "idle: 400ms")
    text += """  - {path: /total/openai, upstream: openai, timeouts: {total: 1s, idle: 30s}}
  - {path: /total/anthropic, upstream: anthropic, timeouts: {total: 1s, idle: 30s}}
  - {path: /total/gemini, upstream: gemini, timeouts: {total: 1s, idle: 30s}}
  - {path: /beat/local, upstream: generic, heartbeat: 100ms}
  - {path: /beat/openai, upstream: openai, heartbeat: 100ms}
"""
    r = Relayd(tmp_path_factory.mktemp("faults"), text)
    r.port = port  # type: ignore[attr-defined]
    r.start()
    yield r
    r.stop()


def scenario_for(kind: str, fault: str, chunking: str) -> tuple[Scenario, bytes, int | None, str]:
    route, name = PROVIDERS[kind]
    body = fixture(name)
    ends = block_ends(body)
    # cut well inside the stream: before the provider's end marker
    mid_block = ends[(len(ends) - 1) // 2]
    if fault == "reset_mid_event":
        at = mid_block + 9
        sc = Scenario(body=body, chunking=chunking, seed=3, fault="reset", fault_at=at)
    elif fault == "reset_at_boundary":
        at = mid_block
        sc = Scenario(body=body, chunking=chunking, seed=3, fault="reset", fault_at=at)
    elif fault == "eof_no_marker":
        at = ends[-2] if kind != "gemini" else ends[-2] + 5  # gemini: torn last event
        sc = Scenario(body=body, chunking=chunking, seed=3, fault="eof", fault_at=at)
    elif fault == "idle_timeout":
        at = mid_block + 3
        sc = Scenario(body=body, chunking=chunking, seed=3, fault="stall", fault_at=at)
    else:
        at = None
        route = "/total" + route
        sc = Scenario(body=body, chunking="lines", delay=0.3)  # 1 s total cannot be enough
    return sc, body, at, route


def expected_prefix(body: bytes, at: int) -> bytes:
    return body[:max([0] + [e for e in block_ends(body) if e <= at])]


def check_error_event(kind: str, block: bytes, reason: str) -> None:
    events = sse_events(block)
    assert len(events) == 1, block
    etype, data = events[0]
    obj = json.loads(data)
    if kind == "anthropic":
        assert etype == "error"
        assert obj["type"] == "error"
        assert obj["error"]["type"] == ("timeout_error" if "timeout" in reason else "api_error")
        msg = obj["error"]["message"]
    elif kind == "gemini":
        assert block.endswith(b"\r\n\r\n")  # same framing as the upstream
        assert obj["error"]["status"] == ("DEADLINE_EXCEEDED" if "timeout" in reason else "UNAVAILABLE")
        msg = obj["error"]["message"]
    elif kind == "responses":
        assert etype == "error"
        assert obj["type"] == "error" and obj["code"] == reason and obj["error"]["code"] == reason
        msg = obj["message"]
    else:
        assert etype == "message"
        assert set(obj["error"]) == {"message", "type", "param", "code"}
        assert obj["error"]["code"] == reason
        msg = obj["error"]["message"]
    assert "request id" in msg and "relayd" in msg
    assert b"[DONE]" not in block


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", sorted(PROVIDERS))
async def test_fault_matrix(relay, fake, kind, fault, chunking):
    sc, body, at, route = scenario_for(kind, fault, chunking)
    name = fake.add(f"f-{kind}-{fault}-{chunking}", sc)
    async with aiohttp.ClientSession() as s:
        async with s.post(aiohttp.client.URL(f"http://127.0.0.1:{relay.port}{route}", encoded=True),
                          headers={"x-fake": name}, json={}) as r:
            assert r.status == 200
            got = await r.read()   # ends cleanly: the error is in-band
    prefix, last = split_prefix_and_last_block(got)
    assert body.startswith(prefix)
    assert len(prefix) in [0] + block_ends(body)
    if at is not None:
        assert prefix == expected_prefix(body, at)
    else:
        assert 0 < len(prefix) < len(body)
    check_error_event(kind, last, REASON[fault])
    # sequence numbers stay monotonic on Responses streams
    if kind == "responses":
        seqs = [json.loads(d)["sequence_number"] for _, d in sse_events(got)]
        assert seqs == list(range(len(seqs)))


@pytest.mark.parametrize("keepalive", [b": keep-alive\n\n", b"event: keepalive\n\n"])
async def test_responses_error_continues_the_numbering_after_a_keepalive(relay, fake, keepalive):
    """A gateway's keep-alive (a comment, an event without data) between the last numbered
    event and a reset: the error event still continues the stream's sequence_number."""
    body = fixture("openai-responses.sse")
    cut = block_ends(body)[4]
    sc = fake.add(f"seq-{len(keepalive)}", Scenario(body=body[:cut] + keepalive, fault="reset",
                                                    fault_at=cut + len(keepalive),
                                                    chunking="lines", delay=0.005))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{relay.port}/openai/v1/responses",
                          headers={"x-fake": sc}, json={}) as r:
            got = await r.read()
    assert got.startswith(body[:cut] + keepalive)
    seqs = [json.loads(d)["sequence_number"] for _, d in sse_events(got) if d]
    assert len(seqs) > 3 and seqs == list(range(len(seqs)))


def sdk_target(relay, kind: str, fault: str, api_path: str, fake) -> tuple[str, str]:
    """(base URL for an SDK, scenario name) for one fault on one provider's route."""
    sc, _, _, route = scenario_for(kind, fault, "random")
    name = fake.add(f"sdk-{kind}-{fault}", sc)
    return f"http://127.0.0.1:{relay.port}{route.split(api_path, 1)[0]}", name


@pytest.mark.parametrize("fault", FAULTS)
def test_openai_sdk_raises_on_chat_failure(relay, fake, fault):
    base, name = sdk_target(relay, "chat", fault, "/chat/completions", fake)
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0, default_headers={"x-fake": name})
    with pytest.raises(openai.APIError) as ei:
        for _ in client.chat.completions.create(model="m", messages=[], stream=True):
            pass
    assert not isinstance(ei.value, openai.APIConnectionError)
    assert ei.value.body["code"] == REASON[fault] and "relayd" in ei.value.message


@pytest.mark.parametrize("fault", FAULTS)
def test_openai_sdk_raises_on_responses_failure(relay, fake, fault):
    base, name = sdk_target(relay, "responses", fault, "/responses", fake)
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0, default_headers={"x-fake": name})
    with pytest.raises(openai.APIError) as ei:
        with client.responses.stream(model="m", input="x") as stream:
            for _ in stream:
                pass
    assert not isinstance(ei.value, openai.APIConnectionError)
    assert "relayd" in ei.value.message


@pytest.mark.parametrize("fault", FAULTS)
def test_anthropic_sdk_raises(relay, fake, fault):
    base, name = sdk_target(relay, "anthropic", fault, "/v1/messages", fake)
    client = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, default_headers={"x-fake": name})
    with pytest.raises(anthropic.APIStatusError) as ei:
        with client.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
            for _ in s:
                pass
    assert ei.value.type in ("api_error", "timeout_error")  # type: ignore[attr-defined]


@pytest.mark.parametrize("fault", FAULTS)
def test_google_genai_raises(relay, fake, fault):
    genai = pytest.importorskip("google.genai")
    from google.genai import errors, types
    base, name = sdk_target(relay, "gemini", fault, "/v1beta", fake)
    client = genai.Client(api_key="x", http_options=types.HttpOptions(base_url=base + "/", headers={"x-fake": name}))
    with pytest.raises(errors.APIError) as ei:
        for _ in client.models.generate_content_stream(model="m", contents="x"):
            pass
    assert ei.value.code in (503, 504)


@pytest.mark.parametrize("kind", sorted(PROVIDERS))
async def test_natural_end_is_never_followed_by_injection(relay, fake, kind):
    route, name = PROVIDERS[kind]
    body = fixture(name)
    # the connection resets right after the last byte: the stream had already ended naturally
    sc = fake.add(f"nat-{kind}", Scenario(body=body, fault="reset", fault_at=len(body), chunking="lines"))
    async with aiohttp.ClientSession() as s:
        async with s.post(aiohttp.client.URL(f"http://127.0.0.1:{relay.port}{route}", encoded=True),
                          headers={"x-fake": sc}) as r:
            assert await r.read() == body


async def test_upstream_error_event_passes_through_without_second_error(relay, fake):
    for route, name in [("/openai/v1/chat/completions", "openai-chat-midstream-error.sse"),
                        ("/anthropic/v1/messages", "anthropic-midstream-error.sse"),
                        ("/openai/v1/responses", "openai-responses-error-event.sse"),
                        ("/openai/v1/responses", "openai-responses-failed.sse"),
                        ("/gemini/v1beta/x", "gemini-midstream-error.sse")]:
        body = fixture(name)
        sc = fake.add(f"up-err-{name}", Scenario(body=body, chunking="random", seed=1))
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{relay.port}{route}", headers={"x-fake": sc}) as r:
                assert await r.read() == body, name


async def test_generic_route_treats_clean_end_as_natural(relay, fake):
    body = fixture("openai-chat-usage.sse")
    cut = block_ends(body)[5]
    sc = fake.add("gen-eof", Scenario(body=body, fault="eof", fault_at=cut))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{relay.port}/local/v1/chat/completions", headers={"x-fake": sc}) as r:
            assert await r.read() == body[:cut]


@pytest.mark.parametrize("route", ["/beat/local", "/beat/openai"])
@pytest.mark.parametrize("fault", ["reset", "stall"])
async def test_nothing_is_added_after_done(relay, fake, route, fault):
    """After ``data: [DONE]`` the provider has said its last word, on a generic route (vLLM,
    llama.cpp) as on OpenAI's: a reset or a stall before the body's end adds no
    heartbeat and no error event, and the stream is logged done."""
    body = fixture("openai-chat-usage.sse")
    assert body.endswith(b"data: [DONE]\n\n")
    sc = fake.add(f"done-{fault}", Scenario(body=body, fault=fault, fault_at=len(body)))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{relay.port}{route}/v1/chat/completions",
                          headers={"x-fake": sc}) as r:
            got = b""
            try:
                async for part in r.content.iter_any():  # (the stall ends at idle: 400 ms)
                    got += part
            except aiohttp.ClientPayloadError:
                pass
    assert got == body
    line = relay.wait_access(1, lambda a: a["path"].startswith(route) and a["request_id"] == r.headers["x-request-id"])[-1]
    assert line["end_reason"] == "done" and line["heartbeats"] == 0


@pytest.mark.parametrize("fault", ["reset", "stall"])
async def test_geminis_own_error_after_its_last_chunk_survives_a_broken_close(relay, fake, fault):
    """Review 76: Gemini's bare JSON error after a chunk with ``finishReason`` reached the
    client at a clean close, but was dropped, as an unfinished tail, when the connection
    then reset or stalled: google-genai saw a successful empty answer."""
    body = fixture("gemini-midstream-error.sse")
    sc = fake.add(f"gem-own-{fault}", Scenario(body=body, chunking="lines", fault=fault, fault_at=len(body)))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{relay.port}/gemini/v1beta/models/g:streamGenerateContent?alt=sse",
                          headers={"x-fake": sc}) as r:
            got = await r.read()  # (a clean end: the error is the provider's own, relayed)
    assert got == body
    line = relay.wait_access(1, lambda a: a["request_id"] == r.headers["x-request-id"])[-1]
    assert line["end_reason"] == "done" and line["injected_error"] is None


async def test_geminis_count_is_partial_when_the_client_leaves_before_the_usage_chunk(relay, fake):
    """Review 82: Gemini may send a usage-only chunk after the one with finishReason; a
    client that left at finishReason got an access line with the count as final."""
    body = fixture("endpoints/gemini-stream-usage-tail.sse")
    at = body.index(b'"finishReason"')
    at = next(e for e in block_ends(body) if e > at)  # after the finishing chunk, before usage
    sc = fake.add("gem-usage-tail-left", Scenario(body=body, fault="stall", fault_at=at))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{relay.port}/gemini/v1beta/models/g:streamGenerateContent?alt=sse",
                          headers={"x-fake": sc}) as r:
            got = b""
            while b'"finishReason"' not in got or not got.endswith((b"\n\n", b"\r\n\r\n")):
                got += await r.content.readany()
            rid = r.headers["x-request-id"]
    line = relay.wait_access(1, lambda a: a["request_id"] == rid)[-1]
    assert line["end_reason"] == "done" and line["usage"]["partial"] is True, line


async def test_a_resumed_responses_stream_cut_before_its_first_event_continues_the_cursor(relay, fake):
    """GET /responses/{id}?stream=true&starting_after=5 cut before any event: the error
    event's sequence_number is 6, not 0 (a client's resume cursor must not go back)."""
    sc = fake.add("resume-empty", Scenario(body=b""))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{relay.port}/openai/v1/responses/resp_1?stream=true&starting_after=5",
                         headers={"x-fake": sc}) as r:
            got = await r.read()
    (_, data), = sse_events(got)
    assert json.loads(data)["sequence_number"] == 6


async def test_usage_in_an_unterminated_last_event_is_counted(relay, fake):
    """A generic stream whose last event has no blank line: the client gets it (a clean
    close is its natural end), so its usage counts too."""
    body = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}\n')
    sc = fake.add("tail-usage", Scenario(body=body))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{relay.port}/local/v1/chat/completions",
                          headers={"x-fake": sc}) as r:
            assert await r.read() == body
            rid = r.headers["x-request-id"]
    line = relay.wait_access(1, lambda a: a["request_id"] == rid)[-1]
    assert line["end_reason"] == "done"
    assert line["usage"] == {"input_tokens": 9, "output_tokens": 2, "partial": False}


async def test_a_vllm_error_event_gets_no_second_one(relay, fake):
    """vLLM's own mid-stream error (``"object":"error"``) is the stream's last word: a
    reset after it adds no error event of relayd's."""
    body = (b'data: {"id":"1","object":"chat.completion.chunk","choices":[{"delta":{"content":"a"}}]}\n\n'
            b'data: {"object":"error","message":"CUDA out of memory","type":"InternalServerError","code":500}\n\n')
    sc = fake.add("vllm-err", Scenario(body=body, fault="reset", fault_at=len(body)))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{relay.port}/local/v1/chat/completions",
                          headers={"x-fake": sc}) as r:
            got = await r.read()
    assert got == body


async def test_non_sse_failure_closes_connection(relay, fake):
    body = b'{"id":"x","choices":[' + b'{"text":"aaaaaaaaaa"},' * 1000 + b'{}]}'
    sc = fake.add("json-reset", Scenario(body=body, content_type="application/json", fault="reset",
                                         fault_at=5000, chunking="random", seed=2))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{relay.port}/openai/v1/chat/completions", headers={"x-fake": sc}) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()


async def test_access_log_end_reasons(relay, fake):
    want = {"done", "upstream_reset", "upstream_eof", "idle_timeout", "total_timeout"}
    # the earlier tests' last lines may still be on their way to the log
    for _ in range(100):
        access = relay.access()
        reasons = {a["end_reason"] for a in access}
        if want <= reasons:
            break
        await asyncio.sleep(0.05)
    assert want <= reasons
    injected = [a for a in access if a["injected_error"]]
    assert injected and all(a["injected_error"] == a["end_reason"] for a in injected)


async def test_chaos_streams_are_exact_or_prefix_plus_one_error(relay, fake):
    """A few hundred concurrent streams with random faults, chunkings and providers."""
    import random
    rnd = random.Random(20261129)
    kinds = sorted(PROVIDERS)
    cases = []
    for i in range(300):
        kind = rnd.choice(kinds)
        route, name = PROVIDERS[kind]
        body = fixture(name)
        fault = rnd.choice([None, None, "reset", "eof", "stall"])
        at = rnd.randrange(0, len(body)) if fault else None
        sc = Scenario(body=body, chunking=rnd.choice(["whole", "lines", "random", "utf8"]), seed=i,
                      fault=fault, fault_at=at)
        cases.append((kind, route, body, fault, at, fake.add(f"chaos-{i}", sc)))
    sem = asyncio.Semaphore(30)
    tally = {"exact": 0, "error": 0}

    async def one(s, kind, route, body, fault, at, name):
        async with sem:
            async with s.post(aiohttp.client.URL(f"http://127.0.0.1:{relay.port}{route}", encoded=True),
                              headers={"x-fake": name}) as r:
                got = await r.read()
        if got == body:
            tally["exact"] += 1
            return
        prefix, last = split_prefix_and_last_block(got)
        assert body.startswith(prefix) and len(prefix) in [0] + block_ends(body), (kind, fault, at)
        assert at is not None and len(prefix) <= at
        events = sse_events(last)
        assert len(events) == 1
        assert "relayd" in last.decode()
        tally["error"] += 1

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(s, *c) for c in cases))
    n_clean = sum(1 for c in cases if c[3] is None)
    assert tally["exact"] + tally["error"] == 300
    assert tally["exact"] >= n_clean            # every fault-free stream was byte-exact
    assert tally["error"] >= (300 - n_clean) // 2  # most faults hit before the end marker
    print(f"chaos: 300 streams, {n_clean} without fault, {tally}")


async def test_sse_content_length_shortfall_counts_as_failure(relay, fake):
    body = fixture("anthropic-messages.sse")
    cut = block_ends(body)[4] + 7
    sc = fake.add("cl-short", Scenario(body=body, content_length=True, fault="reset", fault_at=cut))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{relay.port}/anthropic/v1/messages", headers={"x-fake": sc}) as r:
            assert "Content-Length" not in r.headers  # relayd re-frames SSE so it can add its event
            got = await r.read()
    prefix, last = split_prefix_and_last_block(got)
    assert prefix == body[:block_ends(body)[4]]
    check_error_event("anthropic", last, "upstream_reset")


async def test_compressed_sse_failure_closes_connection(relay, fake):
    import gzip
    raw = gzip.compress(fixture("anthropic-messages.sse"))
    sc = fake.add("gz-reset", Scenario(gzip_body=raw, fault="reset", fault_at=len(raw) // 2))
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(f"http://127.0.0.1:{relay.port}/anthropic/v1/messages", headers={"x-fake": sc}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()

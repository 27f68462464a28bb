"""Endpoint table (issue 8): every streaming endpoint ends the way its provider ends it.

A clean upstream close is only a truncation when it comes before the endpoint's own
natural end, and that end differs per endpoint: `[DONE]`, a terminal Responses event,
`speech.audio.done`, an Anthropic legacy `completion` with a stop reason, a Gemini chunk
with `finishReason` or a blocked prompt, `interaction.completed`...  Each transcript in
fixtures/endpoints/ (see SOURCES.md there) is relayed through a real relayd subprocess:
whole, cut by a clean close or a reset before its end, and cut after its end.  The
official SDKs then check that what relayd adds on a cut is an error they raise on.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import pytest

from fakes import Scenario, block_ends, fixture, split_prefix_and_last_block, sse_events

Event = tuple[str, str]  # (event type, data) as a WHATWG parser dispatches it


def _json(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def done(ev: Event) -> bool:
    return ev[1] == "[DONE]"


def named(*types: str) -> Callable[[Event], bool]:
    """An event whose `event:` name or JSON "type"/"event_type" is one of types."""
    def end(ev: Event) -> bool:
        obj = _json(ev[1])
        typ = obj.get("type", obj.get("event_type")) if isinstance(obj, dict) else None
        return ev[0] in types or typ in types
    return end


def anthropic_complete_stop(ev: Event) -> bool:
    obj = _json(ev[1])
    return ev[0] == "completion" and isinstance(obj, dict) and obj.get("stop_reason") is not None


def gemini_end(ev: Event) -> bool:
    obj = _json(ev[1])
    if not isinstance(obj, dict):
        return False
    blocked = "blockReason" in obj.get("promptFeedback", {}) and not obj.get("candidates")
    return blocked or any("finishReason" in c for c in obj.get("candidates", []))


AZURE_Q = "?api-version=2025-04-01-preview"
RESPONSES_END = named("response.completed", "response.incomplete", "response.failed")


@dataclass(frozen=True)
class Endpoint:
    id: str
    method: str
    route: str          # relayd path (route prefix + upstream path + query)
    transcript: str     # in fixtures/endpoints/
    is_end: Callable[[Event], bool]  # the event that is this endpoint's natural end


ENDPOINTS = [
    Endpoint("openai-chat", "POST", "/openai/v1/chat/completions", "openai-chat-completions.sse", done),
    Endpoint("azure-chat", "POST", "/azure/chat/completions" + AZURE_Q, "openai-chat-completions.sse", done),
    Endpoint("openai-completions", "POST", "/openai/v1/completions", "openai-completions-legacy.sse", done),
    Endpoint("azure-completions", "POST", "/azure/completions" + AZURE_Q, "openai-completions-legacy.sse", done),
    Endpoint("openai-responses", "POST", "/openai/v1/responses", "openai-responses-create.sse", RESPONSES_END),
    Endpoint("openai-responses-incomplete", "POST", "/openai/v1/responses", "openai-responses-incomplete.sse",
             RESPONSES_END),
    Endpoint("openai-responses-resume", "GET",
             "/openai/v1/responses/resp_0ecff685e411ca7b0069e063569c7c819bbc74c80d853802e6?stream=true&starting_after=5",
             "openai-responses-resume.sse", RESPONSES_END),
    Endpoint("openai-threads-runs", "POST", "/openai/v1/threads/runs", "openai-assistants-thread-run.sse", done),
    Endpoint("openai-thread-runs", "POST", "/openai/v1/threads/thread_uF4bS6cJ4vK2n0Q8Rz1HpL5e/runs",
             "openai-assistants-run.sse", done),
    Endpoint("openai-speech", "POST", "/openai/v1/audio/speech", "openai-audio-speech.sse",
             named("speech.audio.done")),
    Endpoint("azure-speech", "POST", "/azure/audio/speech" + AZURE_Q, "openai-audio-speech.sse",
             named("speech.audio.done")),
    Endpoint("openai-transcriptions", "POST", "/openai/v1/audio/transcriptions", "openai-audio-transcription.sse",
             named("transcript.text.done")),
    Endpoint("azure-transcriptions", "POST", "/azure/audio/transcriptions" + AZURE_Q,
             "openai-audio-transcription.sse", named("transcript.text.done")),
    Endpoint("openai-images-generations", "POST", "/openai/v1/images/generations", "openai-images-generation.sse",
             named("image_generation.completed")),
    Endpoint("azure-images-generations", "POST", "/azure/images/generations" + AZURE_Q,
             "openai-images-generation.sse", named("image_generation.completed")),
    Endpoint("openai-images-edits", "POST", "/openai/v1/images/edits", "openai-images-edit.sse",
             named("image_edit.completed")),
    Endpoint("anthropic-messages", "POST", "/anthropic/v1/messages", "anthropic-messages.sse",
             named("message_stop")),
    Endpoint("anthropic-complete", "POST", "/anthropic/v1/complete", "anthropic-complete-legacy.sse",
             anthropic_complete_stop),
    Endpoint("gemini-stream", "POST", "/gemini/v1beta/models/gemini-2.0-flash-exp:streamGenerateContent?alt=sse",
             "gemini-stream-generate.sse", gemini_end),
    Endpoint("gemini-stream-usage-tail", "POST",
             "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
             "gemini-stream-usage-tail.sse", gemini_end),
    Endpoint("gemini-stream-blocked", "POST", "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
             "gemini-stream-blocked.sse", gemini_end),
    Endpoint("gemini-interactions", "POST", "/gemini/v1beta/interactions", "gemini-interactions.sse",
             named("interaction.completed")),
    Endpoint("gemini-interactions-legacy", "POST", "/gemini/v1beta/interactions", "gemini-interactions-legacy.sse",
             named("interaction.complete")),
]
IDS = [e.id for e in ENDPOINTS]


def body_of(ep: Endpoint) -> bytes:
    return fixture("endpoints/" + ep.transcript)


def end_block(ep: Endpoint) -> tuple[int, int]:
    """(start, end) byte offsets of the block that carries the endpoint's natural end."""
    body = body_of(ep)
    start = 0
    for end in block_ends(body):
        if any(ep.is_end(ev) for ev in sse_events(body[start:end])):
            return start, end
        start = end
    raise AssertionError(f"{ep.transcript}: no natural end found")


async def relay(port: int, method: str, route: str, scenario: str,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    """(status, body, request id) of one request through relayd; the body must end cleanly."""
    rid = "ep-" + uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        async with s.request(method, aiohttp.client.URL(f"http://127.0.0.1:{port}{route}", encoded=True),
                             headers={"x-fake": scenario, "X-Request-Id": rid, **(headers or {})},
                             data=b'{"stream":true}' if method == "POST" else None) as r:
            return r.status, await r.read(), rid


def access_line(relayd: Any, rid: str) -> dict[str, Any]:
    lines = relayd.wait_access(1, where=lambda a: a.get("request_id") == rid)
    assert lines, f"no access line for {rid}"
    return lines[0]


def check_injected(body: bytes, got: bytes, cut: int, anthropic: bool) -> None:
    """got = the body's complete blocks before `cut`, then exactly one parseable error event."""
    prefix, last = split_prefix_and_last_block(got)
    assert prefix == body[:max([0] + [e for e in block_ends(body) if e <= cut])], (len(prefix), cut)
    events = sse_events(last)
    assert len(events) == 1, last
    etype, data = events[0]
    obj = json.loads(data)
    # Every provider format an official SDK raises on names the failure in an "error" object.
    assert isinstance(obj, dict) and isinstance(obj.get("error"), dict), obj
    assert "relayd" in json.dumps(obj)
    assert b"[DONE]" not in last
    if anthropic:
        assert etype == "error"   # anthropic-sdk raises on `event: error`, nothing else
    if b"\r\n" in body:
        assert last.endswith(b"\r\n\r\n")  # same line ends as the upstream


# ----------------------------------------------------------------------- (a) whole streams

@pytest.mark.parametrize("ep", ENDPOINTS, ids=IDS)
async def test_natural_end_relayed_exactly(shared, fake, ep):
    body = body_of(ep)
    sc = fake.add(f"ep-whole-{ep.id}", Scenario(body=body, chunking="random", seed=len(body)))
    status, got, rid = await relay(shared.port, ep.method, ep.route, sc)
    assert status == 200
    assert got == body
    line = access_line(shared, rid)
    assert line["end_reason"] == "done" and line["injected_error"] is None, line


# ----------------------------------------------------------------------- (b) cut streams

CUTS = ["eof_inside_end_event", "eof_before_end_event", "reset_mid_stream", "eof_after_end", "reset_after_end"]


def cut_scenario(ep: Endpoint, cut: str) -> tuple[Scenario, int] | None:
    body = body_of(ep)
    start, end = end_block(ep)
    if cut == "eof_inside_end_event":
        at, fault = start + (end - start) // 2, "eof"
    elif cut == "eof_before_end_event":
        if start == 0:
            return None  # the natural end is the first event (a blocked Gemini prompt)
        at, fault = start, "eof"
    elif cut == "reset_mid_stream":
        ends = [0] + block_ends(body)
        k = ends.index(start) // 2
        at, fault = ends[k] + min(9, (ends[k + 1] - ends[k]) // 2), "reset"
    elif cut == "eof_after_end":
        at, fault = end, "eof"
    else:
        at, fault = end, "reset"
    return Scenario(body=body, chunking="lines", fault=fault, fault_at=at), at


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("ep", ENDPOINTS, ids=IDS)
async def test_cut_stream(shared, fake, ep, cut):
    made = cut_scenario(ep, cut)
    if made is None:
        pytest.skip("no event before the natural end")
    sc, at = made
    body = body_of(ep)
    name = fake.add(f"ep-{cut}-{ep.id}", sc)
    status, got, rid = await relay(shared.port, ep.method, ep.route, name)
    assert status == 200
    line = access_line(shared, rid)
    if cut.endswith("after_end"):
        # the provider had already said its last word: nothing is added, the cut is no failure
        assert got == body[:at]
        assert line["end_reason"] == "done" and line["injected_error"] is None, line
        return
    check_injected(body, got, at, anthropic=ep.route.startswith("/anthropic"))
    want = "upstream_reset" if cut.startswith("reset") else "upstream_eof"
    assert line["end_reason"] == want and line["injected_error"] == want, line


@pytest.mark.parametrize("args", ['{"type":"error"}', '{"type": "error", "finishReason": "STOP"}',
                                  '{"promptFeedback": {"blockReason": "OTHER"}}'])
@pytest.mark.parametrize("fault", ["reset", "eof"])
async def test_gemini_function_call_arguments_do_not_end_the_stream(shared, fake, args, fault):
    """Review 76: Gemini sends a function call's arguments as a JSON object, and an end
    test that looked anywhere in an event took ``{"type":"error"}`` or ``"finishReason"``
    in them for the stream's end: a failure after that chunk reached google-genai as a
    clean, finished answer."""
    body = fixture("gemini-stream-functioncall.sse").replace(b'"args": {}', b'"args": ' + args.encode())
    assert args.encode() in body
    at = block_ends(body)[0]  # after the function call's chunk, before the one that finishes
    name = fake.add(f"ep-gem-args-{fault}-{args}", Scenario(body=body, chunking="lines", fault=fault,
                                                            fault_at=at))
    status, got, rid = await relay(shared.port, "POST", "/gemini/v1beta/models/g:streamGenerateContent?alt=sse",
                                   name)
    assert status == 200
    check_injected(body, got, at, anthropic=False)
    want = "upstream_reset" if fault == "reset" else "upstream_eof"
    assert access_line(shared, rid)["injected_error"] == want


# Provider error events that end a stream on their own: relayd must not add a second one,
# whether the upstream then closes cleanly or resets.
OWN_ERRORS = [
    ("/openai/v1/images/generations", "openai-images-generation-own-error.sse"),
    ("/openai/v1/audio/transcriptions", "openai-audio-transcription-own-error.sse"),
    ("/openai/v1/threads/thread_uF4bS6cJ4vK2n0Q8Rz1HpL5e/runs", "openai-assistants-run-own-error.sse"),
    ("/anthropic/v1/complete", "anthropic-complete-legacy-own-error.sse"),
    ("/gemini/v1beta/interactions", "gemini-interactions-own-error.sse"),
]


@pytest.mark.parametrize("fault", ["eof", "reset"])
@pytest.mark.parametrize("route,name", OWN_ERRORS, ids=[n for _, n in OWN_ERRORS])
async def test_provider_error_event_is_not_doubled(shared, fake, route, name, fault):
    body = fixture("endpoints/" + name)
    sc = fake.add(f"ep-own-{fault}-{name}", Scenario(body=body, chunking="random", seed=3, fault=fault,
                                                     fault_at=len(body)))
    status, got, rid = await relay(shared.port, "POST", route, sc)
    assert status == 200 and got == body
    assert access_line(shared, rid)["injected_error"] is None


UNKNOWN = "/openai/v1/some/new/thing"


async def test_unknown_sse_path_clean_close_is_its_natural_end(shared, fake):
    """An SSE endpoint the table does not know is judged like a generic route."""
    body = fixture("endpoints/openai-audio-transcription.sse")
    cut = block_ends(body)[4]
    for at in (cut, cut + 7):  # at a boundary, and with a torn last event passed on as sent
        sc = fake.add(f"ep-unknown-eof-{at}", Scenario(body=body, chunking="lines", fault="eof", fault_at=at))
        status, got, rid = await relay(shared.port, "POST", UNKNOWN, sc)
        assert status == 200 and got == body[:at]
        line = access_line(shared, rid)
        assert line["end_reason"] == "done" and line["injected_error"] is None, line


async def test_unknown_sse_path_transport_failure_still_injects(shared, fake):
    body = fixture("endpoints/openai-audio-transcription.sse")
    at = block_ends(body)[4] + 7
    sc = fake.add("ep-unknown-reset", Scenario(body=body, chunking="lines", fault="reset", fault_at=at))
    status, got, rid = await relay(shared.port, "POST", UNKNOWN, sc)
    assert status == 200
    check_injected(body, got, at, anthropic=False)
    line = access_line(shared, rid)
    assert line["end_reason"] == line["injected_error"] == "upstream_reset", line


async def test_unknown_sse_path_content_length_shortfall_injects(shared, fake):
    body = fixture("endpoints/openai-audio-transcription.sse")
    at = block_ends(body)[3] + 5
    sc = fake.add("ep-unknown-cl", Scenario(body=body, content_length=True, fault="reset", fault_at=at))
    status, got, rid = await relay(shared.port, "POST", UNKNOWN, sc)
    assert status == 200
    check_injected(body, got, at, anthropic=False)
    assert access_line(shared, rid)["injected_error"] is not None


async def test_unknown_sse_path_idle_timeout_injects(make_relayd, fake):
    from conftest import basic_config
    from fakes import free_port
    port = free_port()
    r = make_relayd(basic_config(fake.url, port).replace("idle: 5", "idle: 300ms"))
    body = fixture("endpoints/openai-audio-transcription.sse")
    at = block_ends(body)[3] + 5
    sc = fake.add("ep-unknown-stall", Scenario(body=body, chunking="lines", fault="stall", fault_at=at))
    status, got, rid = await relay(port, "POST", UNKNOWN, sc)
    assert status == 200
    check_injected(body, got, at, anthropic=False)
    assert access_line(r, rid)["injected_error"] == "idle_timeout"


@pytest.mark.parametrize("ctype", ["Text/Event-Stream; charset=utf-8", "text/event-stream;charset=UTF-8",
                                   "TEXT/EVENT-STREAM"])
async def test_media_type_is_parsed(shared, fake, ctype):
    body = fixture("endpoints/openai-images-generation.sse")
    at = block_ends(body)[1] + 11
    sc = fake.add(f"ep-ctype-{ctype}", Scenario(body=body, content_type=ctype, chunking="lines",
                                                fault="reset", fault_at=at))
    status, got, rid = await relay(shared.port, "POST", "/openai/v1/images/generations", sc)
    assert status == 200
    check_injected(body, got, at, anthropic=False)


# ----------------------------------------------------------------------- (c) official SDKs

PNG_1X1 = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf"
                        "c0f01f0005000200aa2c8b1d0000000049454e44ae426082")
WAV_EMPTY = b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80>\x00\x00\x00}\x00\x00\x02\x00\x10\x00data\x00\x00\x00\x00"
BY_ID = {e.id: e for e in ENDPOINTS}

# endpoint id -> (the SDK call, the upstream path it must have used)
OPENAI_SDK: dict[str, tuple[Callable[[Any], Any], str]] = {
    "openai-completions": (lambda c: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Why is the sky blue?",
                                                          stream=True), "/oai/v1/completions"),
    "openai-images-generations": (lambda c: c.images.generate(model="gpt-image-1", prompt="an otter", stream=True,
                                                              partial_images=2), "/oai/v1/images/generations"),
    "openai-images-edits": (lambda c: c.images.edit(model="gpt-image-1", image=("in.png", PNG_1X1, "image/png"),
                                                    prompt="add a hat", stream=True, partial_images=2),
                            "/oai/v1/images/edits"),
    "openai-transcriptions": (lambda c: c.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("a.wav", WAV_EMPTY, "audio/wav"), stream=True),
        "/oai/v1/audio/transcriptions"),
    "openai-responses-resume": (lambda c: c.responses.retrieve(
        "resp_0ecff685e411ca7b0069e063569c7c819bbc74c80d853802e6", stream=True, starting_after=5),
        "/oai/v1/responses/resp_0ecff685e411ca7b0069e063569c7c819bbc74c80d853802e6?"),
    "openai-threads-runs": (lambda c: c.beta.threads.create_and_run(assistant_id="asst_9Lw2qvH3kLzY3w2o8vQmTxJc",
                                                                    stream=True), "/oai/v1/threads/runs"),
    "openai-thread-runs": (lambda c: c.beta.threads.runs.create("thread_uF4bS6cJ4vK2n0Q8Rz1HpL5e",
                                                                assistant_id="asst_9Lw2qvH3kLzY3w2o8vQmTxJc",
                                                                stream=True),
                           "/oai/v1/threads/thread_uF4bS6cJ4vK2n0Q8Rz1HpL5e/runs"),
}
SDK_CUTS = ["whole", "eof_inside_end_event", "reset_mid_stream"]


def sdk_scenario(fake: Any, ep: Endpoint, cut: str, tag: str) -> str:
    if cut == "whole":
        sc = Scenario(body=body_of(ep), chunking="random", seed=5)
    else:
        made = cut_scenario(ep, cut)
        assert made is not None
        sc = made[0]
    return fake.add(f"ep-sdk-{tag}-{cut}-{ep.id}", sc)


@pytest.mark.parametrize("cut", SDK_CUTS)
@pytest.mark.parametrize("ep_id", sorted(OPENAI_SDK))
def test_openai_sdk_raises_on_cut_stream(shared, fake, ep_id, cut):
    import openai
    call, upstream_path = OPENAI_SDK[ep_id]
    ep = BY_ID[ep_id]
    sc = sdk_scenario(fake, ep, cut, "openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{shared.port}/openai/v1", api_key="client-key",
                           max_retries=0, default_headers={"x-fake": sc}, timeout=10)
    fake.reset_stats()
    if cut == "whole":
        n = sum(1 for _ in call(client))
        assert n == len([ev for ev in sse_events(body_of(ep)) if not done(ev)])
    else:
        with pytest.raises(openai.APIError) as ei:
            for _ in call(client):
                pass
        assert not isinstance(ei.value, openai.APIConnectionError), ei.value
        assert "relayd" in ei.value.message
    assert fake.requests[-1]["raw_path"].startswith(upstream_path), fake.requests[-1]["raw_path"]


@pytest.mark.parametrize("cut", SDK_CUTS)
def test_google_genai_interactions_sees_error_event_on_cut_stream(shared, fake, cut):
    """google-genai yields an ErrorEvent for `event: error` on Interactions streams (it does not raise)."""
    genai = pytest.importorskip("google.genai")
    from google.genai import types
    ep = BY_ID["gemini-interactions"]
    sc = sdk_scenario(fake, ep, cut, "genai")
    client = genai.Client(api_key="client-key", http_options=types.HttpOptions(
        base_url=f"http://127.0.0.1:{shared.port}/gemini/", headers={"x-fake": sc}))
    fake.reset_stats()
    events = list(client.interactions.create(model="gemini-3-flash-preview", input="capital of France?",
                                             stream=True))
    assert fake.requests[-1]["raw_path"].endswith("/interactions"), fake.requests[-1]["raw_path"]
    kinds = [getattr(e, "event_type", None) for e in events]
    if cut == "whole":
        assert "error" not in kinds and kinds[-1] == "interaction.completed", kinds
        return
    assert kinds[-1] == "error" and kinds.count("error") == 1, kinds
    assert "relayd" in (events[-1].error.message or "")

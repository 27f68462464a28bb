"""Small in-process checks of pieces whose effect is hard to see from outside."""

from __future__ import annotations

import asyncio
import math
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fakes import free_port
from relayd import config as cfg
from relayd import providers, sse, stream
from relayd.clock import StreamClock
from relayd.app import App, request_id
from relayd.exchange import End
from relayd.routes import upstream_url
from relayd.upstreams import Pool
from relayd.usage import UsageMeter


@pytest.mark.parametrize("base,rest,query,want", [
    ("", "/v1/chat", "", "/v1/chat"),
    ("/", "/v1/chat", "", "/v1/chat"),
    ("/openai/v1", "/chat", "a=1", "/openai/v1/chat?a=1"),
    ("/openai/v1/", "/chat", "", "/openai/v1/chat"),
    ("/base", "", "", "/base"),
    ("", "", "x=%2F", "/?x=%2F"),
])
def test_upstream_url_join(base, rest, query, want):
    assert upstream_url(base, rest, query) == want


async def test_no_hidden_client_timeouts():
    up = cfg.parse('upstreams: {a: {url: "http://127.0.0.1:1", provider: openai, keepalive: 7, max_connections: 3}}\n'
                   'routes: [{path: /a, upstream: a}]', "t.yaml", {}).upstreams["a"]
    pool = Pool(up, True)  # (plain http: no TLS context)
    try:
        t = pool.session.timeout
        assert t.total is None and t.sock_read is None and t.connect is None
        assert pool.connector.limit == 3
        assert pool.session.auto_decompress is False
    finally:
        await pool.close()


def test_request_id_rules():
    assert request_id("abc-1.2:3_4") == "abc-1.2:3_4"
    for bad in (None, "", "a b", "x" * 129, "ü", "a\r\nb"):
        rid = request_id(bad)
        assert rid != bad and len(rid) == 32


def test_error_bodies_per_provider():
    import json
    o = json.loads(providers.get("openai").error_body(502, "m", "connect_error"))
    assert o == {"error": {"message": "m", "type": "server_error", "param": None, "code": "connect_error"}}
    a = json.loads(providers.get("anthropic").error_body(504, "m", "x"))
    assert a == {"type": "error", "error": {"type": "timeout_error", "message": "m"}}
    g = json.loads(providers.get("gemini").error_body(504, "m", "x"))
    assert g == {"error": {"code": 504, "message": "m", "status": "DEADLINE_EXCEEDED"}}
    az = json.loads(providers.get("azure").error_body(502, "m", "c"))
    assert set(az["error"]) == {"message", "type", "param", "code"}


def test_usage_meter_ignores_null_usage_and_reads_last():
    m = UsageMeter()
    m.observe_events(b'data: {"usage":null}\n\n')
    assert m.result(False) is None
    m.observe_events(b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\n')
    assert m.result(True).as_log() == {"input_tokens": 5, "output_tokens": 7, "partial": True}


def test_usage_values_an_upstream_gets_wrong_are_not_counted():
    # A negative or absurd count made the Prometheus counter raise, losing every pending
    # count of the batch (and a scrape answered 500); an object nested 1,000 deep raised
    # RecursionError inside the handler's finally: no access line, the request never left
    # the active set.
    for body in (b'{"usage":{"prompt_tokens":-1000000,"completion_tokens":3}}',
                 b'{"usage":{"prompt_tokens":%d,"completion_tokens":3}}' % 10**400,
                 b'{"usage":{"prompt_tokens":1e30,"completion_tokens":3}}'):
        m = UsageMeter()
        m.observe_body(body)
        assert m.result(False).as_log() == {"input_tokens": None, "output_tokens": 3, "partial": False}
    m = UsageMeter()
    m.observe_body(b'{"usage":{"x":' + b"[" * 1200 + b"]" * 1200 + b',"prompt_tokens":7}}')
    assert m.result(False) is None


def test_usage_is_found_with_any_spacing_and_counts_anthropics_cache():
    m = UsageMeter()
    m.observe_events(b'data: {"choices":[],"usage" :\t{"prompt_tokens":5,"completion_tokens":7}}\n\n')
    assert m.result(False).as_log() == {"input_tokens": 5, "output_tokens": 7, "partial": False}
    # OpenAI's prompt_tokens include cached tokens; Anthropic counts them apart
    m = UsageMeter()
    m.observe_events(b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
                     b'{"input_tokens":3,"cache_creation_input_tokens":20,"cache_read_input_tokens":50000,'
                     b'"output_tokens":1}}}\n\n')
    assert m.result(False).input == 50023


def test_usage_counts_geminis_tool_use_prompt_and_whole_float_counts():
    """Gemini counts tool-use prompt tokens (search grounding) apart from promptTokenCount
    (they are in its totalTokenCount); a count written 12.0 is a count."""
    m = UsageMeter()
    m.observe_events(b'data: {"usageMetadata":{"promptTokenCount":50,"toolUsePromptTokenCount":900,'
                     b'"candidatesTokenCount":10,"totalTokenCount":960}}\r\n\r\n')
    assert m.result(False).as_log() == {"input_tokens": 950, "output_tokens": 10, "partial": False}
    m = UsageMeter()
    m.observe_body(b'{"usage":{"prompt_tokens":12.0,"completion_tokens":7}}')
    assert (m.result(False).input, m.result(False).output) == (12, 7)
    m = UsageMeter()
    m.observe_body(b'{"usage":{"prompt_tokens":12.5,"completion_tokens":7}}')
    assert m.result(False).input is None


def test_usage_before_a_long_json_tail_is_counted():
    """vLLM writes prompt_logprobs (megabytes) after usage: the usage object left the kept
    tail of the body before the end."""
    m = UsageMeter()
    m.observe_body(b'{"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22},"prompt_logprobs":[')
    for _ in range(200):
        m.observe_body(b'{"1":{"logprob":-0.1}},' * 400)
    m.observe_body(b'null]}')
    assert (m.result(False).input, m.result(False).output) == (11, 22)
    # The whole body in one read (how large a read is depends on the socket): the same.
    body = (b'{"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22},"prompt_logprobs":['
            + b'{"1":{"logprob":-0.1}},' * 20_000 + b'null]}')
    for pieces in ([body], [body[:300_000], body[300_000:]]):
        m = UsageMeter()
        for piece in pieces:
            m.observe_body(piece)
        assert (m.result(False).input, m.result(False).output) == (11, 22)


def test_nested_usage_objects_are_decoded_once_and_bounded():
    """Review 82: every usage key was decoded from, so usage objects nested 800 deep in a
    2 MB event were each decoded again whole: 1.5 GB and seconds of a stalled loop."""
    import time
    import tracemalloc

    payload = b'"' + b"x" * 2_000_000 + b'"'
    nested = b"data: " + b'{"usage":{"a":' * 800 + payload + b"}" * 1600 + b"\n\n"
    tracemalloc.start()
    began = time.perf_counter()
    m = UsageMeter()
    m.observe_events(nested)
    m.observe_events(nested)
    assert m.result(False) is None
    took = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50_000_000, peak  # (the event itself is 2 MB; it was 1.5 GB)
    assert took < 1.0, took
    # a usage key inside a usage object is not one of its own; a later object still wins
    m = UsageMeter()
    m.observe_body(b'{"usage":{"prompt_tokens":1,"x":{"usage":{"prompt_tokens":99}},"completion_tokens":2},'
                   b'"more":{"usage":{"prompt_tokens":3,"completion_tokens":4}}}')
    assert (m.result(False).input, m.result(False).output) == (3, 4)


def test_usage_of_geminis_interactions_api_is_counted():
    """Review 82: its usage names (``total_input_tokens``, ``total_output_tokens``,
    ``total_thought_tokens``, ``total_tool_use_tokens``) were none of the known ones."""
    m = UsageMeter()
    m.observe_events(b'event: interaction.completed\ndata: {"interaction":{"usage":{"total_tokens":118,'
                     b'"total_input_tokens":9,"total_output_tokens":7,"total_thought_tokens":102,'
                     b'"total_tool_use_tokens":5}}}\n\n')
    assert m.result(False).as_log() == {"input_tokens": 14, "output_tokens": 109, "partial": False}
    m = UsageMeter()
    m.observe_body(b'{"usage":{"totalInputTokens":9,"totalOutputTokens":7}}')
    assert (m.result(False).input, m.result(False).output) == (9, 7)


def test_usage_whose_key_straddles_the_json_windows_cut_is_counted():
    """Review 82: the kept tail of a long JSON body was cut inside the ``"usage"`` key:
    searched only before the cut, the key was found neither then nor after."""
    from relayd.usage import _JSON_TAIL

    head = b'{"pad":"' + b"a" * 100_000 + b'",'
    body = (head + b'"usage":{"prompt_tokens":13,"completion_tokens":444},"prompt_logprobs":['
            + b"0," * 100_000 + b"0]}")
    for into in range(0, 12):
        m = UsageMeter()
        # the first read is long enough that the window's cut falls ``into`` bytes into the key
        first = len(head) + into + _JSON_TAIL
        m.observe_body(body[:first])
        m.observe_body(body[first:])
        got = m.result(False)
        assert got is not None and (got.input, got.output) == (13, 444), into


async def test_tcp_nodelay_on_both_sides():
    """Both the client-facing and the upstream-facing sockets run without Nagle delays."""
    seen: dict[str, int] = {}

    async def upstream(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await asyncio.sleep(0.2)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    up_server = web.Server(upstream)
    loop = asyncio.get_running_loop()
    up = await loop.create_server(up_server, "127.0.0.1", 0)
    port = free_port()
    c = cfg.parse(f'listen: 127.0.0.1:{port}\nupstreams: {{u: {{url: "http://127.0.0.1:{up.sockets[0].getsockname()[1]}", provider: generic}}}}\n'
                  'routes: [{path: /u, upstream: u}]', "t.yaml", {})
    app = App(c)
    server = web.Server(app.handle, handler_cancellation=True)
    srv = await loop.create_server(server, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/u/x") as r:
                await r.content.readuntil(b"\n\n")
                front = [p.transport.get_extra_info("socket") for p in server.connections]
                seen["client_side"] = front[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                pool = app.registry.pools()[0]
                await r.read()
        conns = [proto for q in pool.connector._conns.values() for proto, _ in q]
        seen["upstream_side"] = conns[0].transport.get_extra_info("socket").getsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        srv.close()
        up.close()
        await server.shutdown(0.1)
        await up_server.shutdown(0.1)
        await app.registry.close()
    assert seen == {"client_side": 1, "upstream_side": 1}


async def test_turns_let_a_few_set_ups_through_per_loop_turn() -> None:
    """Request set-ups are spread over loop turns (so established streams are pumped in
    between), answers before new requests, first come first served, and a waiter that
    left takes no turn."""
    from relayd.app import Turns

    turns = Turns(3)
    order: list[str] = []
    turn_of: dict[str, int] = {}
    turn = 0

    async def setup(name: str, answer: bool) -> None:
        wait = turns.take(answer)
        if wait is not None:
            await wait
        order.append(name)
        turn_of[name] = turn

    async def count_turns() -> None:
        nonlocal turn
        while len(order) < 10:
            await asyncio.sleep(0)
            turn += 1

    counter = asyncio.create_task(count_turns())
    # all started in one turn, as aiohttp starts the handlers of one read's requests: six
    # new requests, then three answers whose set-up is due, then two more requests
    tasks = [asyncio.create_task(setup(f"r{i}", False)) for i in range(6)]
    tasks += [asyncio.create_task(setup(f"a{i}", True)) for i in range(3)]
    tasks += [asyncio.create_task(setup(name, False)) for name in ("gone", "late")]
    await asyncio.sleep(0)  # every task has taken its turn or queued for one
    assert order == ["r0", "r1", "r2"]
    tasks[-2].cancel()  # this client leaves while it waits
    await asyncio.gather(*tasks, return_exceptions=True)
    await counter
    # answers first, then the waiting requests in arrival order; "gone" never ran
    assert order == ["r0", "r1", "r2", "a0", "a1", "a2", "r3", "r4", "r5", "late"]
    # never more than three set-ups in one turn
    per_turn: dict[int, int] = {}
    for name in order:
        per_turn[turn_of[name]] = per_turn.get(turn_of[name], 0) + 1
    assert max(per_turn.values()) <= 3, per_turn
    # and with nothing queued, a set-up goes on at once, in the same turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert turns.take(False) is None


def test_scrub_redacts_configured_keys_wherever_they_are() -> None:
    """The log's second line of defence: a configured key in any string value, nested or
    not, is replaced before the line is rendered; other values pass untouched."""
    from relayd import logs

    logs.hold_secrets("unit-test", ["sk-unit-secret-1234"])
    event = {"event": "x", "path": "/v1/sk-unit-secret-1234/y", "n": 3, "none": None,
             "usage": {"note": "key sk-unit-secret-1234", "input": 5},
             "list": ["a", "sk-unit-secret-1234"], "tuple": ("sk-unit-secret-1234",),
             "plain": "nothing here", "ratio": 0.5}
    out = logs.scrub(None, "info", dict(event))
    assert out["path"] == "/v1/[redacted]/y"
    assert out["usage"] == {"note": "key [redacted]", "input": 5}
    assert out["list"] == ["a", "[redacted]"] and out["tuple"] == ["[redacted]"]
    assert {k: out[k] for k in ("event", "n", "none", "plain", "ratio")} == \
        {k: event[k] for k in ("event", "n", "none", "plain", "ratio")}
    assert "sk-unit-secret-1234" not in repr(out)


def test_access_lines_are_the_json_structlog_writes(capsys) -> None:
    """Access lines skip structlog's per-call chain (``logs.write_lines``) but must read the
    same: the same fields, ``level``, ``event``, a ``ts`` in structlog's format, the secret
    scrub."""
    import json
    import re

    from relayd import logs

    try:
        logs.configure("info")  # both writers now write to the captured stdout
        logs.hold_secrets("unit-test-lines", ["sk-unit-line-secret"])
        fields = {"request_id": "r1", "path": "/x/sk-unit-line-secret", "status": 200,
                  "ttfb_ms": 1.5, "injected_error": None, "usage": {"input_tokens": 3}}
        logs.get().info("access", **dict(fields))
        logs.write_lines("access", [dict(fields), dict(fields, request_id="r2")])
        out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(out) == 3
        by_structlog, ours, second = out
        ts = [line.pop("ts") for line in out]
        assert ours == by_structlog and second == dict(ours, request_id="r2")
        assert ours["path"] == "/x/[redacted]" and ours["event"] == "access" and ours["level"] == "info"
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", t) for t in ts)
        logs.configure("warning")  # access lines follow access_log, not log_level
        logs.write_lines("access", [dict(fields)])
        assert json.loads(capsys.readouterr().out)["request_id"] == "r1"
    finally:
        with capsys.disabled():
            logs.configure("info")


@pytest.mark.parametrize("reading,idle,send,beat", [
    (True, 3.0, 0.2, math.inf),     # reading: a send deadline long past does not apply
    (False, 0.2, math.inf, math.inf),  # waiting for the client: idle does not apply
    (False, 3.0, 1.0, 0.1),        # waiting for the client: heartbeats do not apply
])
async def test_stream_clock_never_fires_for_a_deadline_that_does_not_apply(reading, idle, send, beat):
    """A deadline that does not apply in the stream's state is not a reason to wake: the
    clock used to re-arm at it, already past, and fire every loop turn (100 % CPU)."""
    clock, fired = await _count_fires(idle, send, beat, reading, 0.8)
    assert clock.reason is None
    assert fired <= 3, fired


async def _count_fires(idle: float, send: float, beat: float, reading: bool,
                       seconds: float) -> tuple[StreamClock, int]:
    """A stream clock left alone for `seconds`: how often its timer fired."""
    fired = 0

    class Counted(StreamClock):
        __slots__ = ()

        def _fire(self) -> None:
            nonlocal fired
            fired += 1
            super()._fire()

    clock = Counted(asyncio.get_running_loop(), idle, send, math.inf, beat, lambda: None)
    clock.wait_for_upstream() if reading else clock.wait_for_client()
    try:
        await asyncio.sleep(seconds)
    finally:
        clock.stop()
    return clock, fired


async def test_stream_clock_wakes_for_the_deadline_a_change_of_state_brings() -> None:
    """Armed for a far idle deadline while reading, a stream that starts waiting for its
    client must still end at its (nearer) send deadline."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    clock = StreamClock(loop, 30.0, 0.3, math.inf, math.inf, lambda: None)
    clock.wait_for_upstream()
    await asyncio.sleep(0.5)  # fires at the start's send deadline, re-arms for idle (30 s)
    clock.last = loop.time()  # an event arrived, its write now waits for the client
    clock.wait_for_client()
    start = loop.time()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 5)
    assert clock.woke() is End.SEND_TIMEOUT
    assert 0.25 < loop.time() - start < 1.0
    clock.stop()


async def test_a_heartbeat_that_fills_the_client_buffer_wakes_the_handler() -> None:
    """The beat is the write that crosses the high-water mark: the handler must wake to
    wait for the drain, or the paused upstream is never resumed."""
    client_side, reader_side = socket.socketpair()
    up_side, up_peer = socket.socketpair()
    loop = asyncio.get_running_loop()
    try:
        tr, _ = await loop.create_connection(asyncio.Protocol, sock=client_side)
        up_tr, _ = await loop.create_connection(asyncio.Protocol, sock=up_side)

        class Proto:
            transport = up_tr
        st = stream.Stream.__new__(stream.Stream)
        st.tracker, st._result, st._blocked, st._chunked = sse.BoundaryTracker(), None, False, False
        st.ended, st.provider = False, providers.get("openai")
        while tr.get_write_buffer_size() == 0:  # the kernel's buffers full: nobody reads
            tr.write(b"x" * 65536)
        # Just under the mark: the next bytes, the heartbeat's, cross it.
        st.heartbeats, st._transport, st._high, st._proto = 0, tr, tr.get_write_buffer_size(), Proto()
        st._waiter = loop.create_future()
        st._beat()
        assert st.heartbeats == 1 and st._blocked
        assert st._waiter.done()
        tr.close()
        up_tr.close()
    finally:
        for s in (reader_side, up_peer):
            s.close()


async def test_a_waiter_dropped_by_release_in_the_same_turn_is_no_error() -> None:
    """The pool-slot wait timing out (or its client leaving) in the same loop turn as
    another request's release: the waiter gets its own exception, not a ValueError."""
    up = cfg.parse('upstreams: {a: {url: "http://127.0.0.1:1", provider: openai, max_connections: 1}}\n'
                   'routes: [{path: /a, upstream: a}]', "t.yaml", {}).upstreams["a"]
    pool = Pool(up, True)  # (plain http: no TLS context)
    try:
        assert await pool.take(None) == 0.0
        loop = asyncio.get_running_loop()
        task = loop.create_task(pool.take(5))
        await asyncio.sleep(0)  # queued as a waiter

        def same_turn() -> None:
            task.cancel()   # the wait's timeout, or the client gone
            pool.release()  # a stream ending in the same turn
        loop.call_soon(same_turn)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.inflight == 0 and pool.waiting == 0
    finally:
        await pool.close()


async def test_access_lines_survive_a_failed_write_and_a_backlog(monkeypatch) -> None:
    """A write that fails (a full disk) loses its own lines, not the queue's future: the
    lines after it are still written.  A backlog past ``LINES_BACKLOG`` goes in one turn."""
    import io

    from relayd import app as app_mod
    from relayd import logs
    from relayd.exchange import Exchange

    class Disk(io.StringIO):
        fail = 1

        def write(self, text: str) -> int:
            if self.fail:
                self.fail -= 1
                raise OSError(28, "No space left on device")
            return super().write(text)

    disk = Disk()
    monkeypatch.setattr(logs, "_out", disk)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        c = cfg.parse("access_log: true\nupstreams: {a: {url: \"http://127.0.0.1:1\", provider: openai}}\n"
                      "routes: [{path: /a, upstream: a}]", "t.yaml", {})
        a = App(c)

        def queue(n: int, tag: str) -> None:
            for i in range(n):
                ex = Exchange(f"{tag}{i}", "GET", "/a", None)
                ex.end = End.DONE
                a._access(ex)

        queue(3, "lost")       # the first turn's write fails: these three are gone
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert errors and isinstance(errors[0].get("exception"), OSError)
        queue(2, "kept")
        for _ in range(3):
            await asyncio.sleep(0)
        assert [l for l in disk.getvalue().splitlines() if '"kept' in l] and "lost" not in disk.getvalue()
        before = len(disk.getvalue().splitlines())
        queue(app_mod.LINES_BACKLOG + 10, "burst")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(disk.getvalue().splitlines()) - before == app_mod.LINES_BACKLOG + 10
        await a.registry.close()
    finally:
        loop.set_exception_handler(None)


def test_stream_clock_with_a_deadline_within_half_a_millisecond_under_uvloop() -> None:
    """uvloop answers call_at for a time within 0.5 ms of now with a plain Handle, which
    has no when(): a sub-millisecond heartbeat or idle deadline crashed every stream."""
    import uvloop

    async def run() -> End | None:
        loop = asyncio.get_running_loop()
        clock = StreamClock(loop, 0.0004, 0.0004, math.inf, 0.0004, lambda: None)
        clock.wait_for_upstream()
        clock.wait_for_client()
        clock.wait_for_upstream()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            return clock.woke()
        finally:
            clock.stop()
        return None

    assert uvloop.run(run()) is End.IDLE_TIMEOUT


def test_stream_clock_does_not_spin_on_deadlines_closer_than_uvloops_tick() -> None:
    """uvloop's clock ticks in milliseconds: a heartbeat of 0.4 ms fired 65,000 times in
    0.2 s (each fire found it not yet due and re-armed at once).  At most one per tick."""
    import uvloop

    _, fired = uvloop.run(_count_fires(60.0, 60.0, 0.0004, True, 0.2))
    assert fired < 400, fired


async def test_a_new_request_on_a_pooled_connection_drops_the_last_streams_sink() -> None:
    """A taken-over body can end (and its connection return to the pool) while its stream's
    handler is still waiting for a slow client; the next request on that connection must
    not find the old stream's sink set — its own response would be pushed to the old
    stream's path and taken for an out-of-turn answer (a 502)."""
    from relayd.upstream_conn import Guarded

    proto = Guarded(loop=asyncio.get_running_loop())
    proto.sink, proto.pushed = (lambda: None), []
    proto.set_response_params(read_until_eof=True, auto_decompress=False)
    assert proto.sink is None


def test_worker_silence_counts_from_the_oldest_unanswered_ping() -> None:
    """A main process that could not ping (its loop busy parsing a big config) must not
    take its own stall for the workers' silence: only an unanswered ping counts."""
    from relayd import heartbeat
    from relayd.supervisor import Slot

    slot = Slot(0)
    slot.heard = 100.0  # its last message, long ago
    assert heartbeat.silence(slot, 200.0) == 0.0  # no ping left unanswered
    slot.waiting = 195.0
    assert heartbeat.silence(slot, 200.0) == 5.0


def test_a_ca_bundle_is_known_by_its_bytes(tmp_path) -> None:
    """Pools share one TLS context per CA bundle; a bundle rotated in place (same size,
    mtime kept by ``cp -p``) must not keep the old one."""
    import os
    import shutil
    import ssl

    from relayd.upstreams import tls_context

    system = "/etc/ssl/certs/ca-certificates.crt"
    if not os.path.exists(system):
        pytest.skip("no system CA bundle to take certificates from")
    pem = open(system).read().split("-----END CERTIFICATE-----\n")
    first, second = pem[0] + "-----END CERTIFICATE-----\n", pem[1] + "-----END CERTIFICATE-----\n"
    bundle = tmp_path / "ca.pem"
    bundle.write_text(first)
    a = tls_context(str(bundle))
    assert tls_context(str(bundle)) is a  # shared
    stat = os.stat(bundle)
    bundle.write_text(second)
    os.utime(bundle, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    b = tls_context(str(bundle))
    assert b is not a and b.get_ca_certs() != a.get_ca_certs()
    bundle.write_text("not a certificate\n")
    with pytest.raises(ssl.SSLError):
        tls_context(str(bundle))
    shutil.rmtree(tmp_path, ignore_errors=True)


async def test_a_pool_that_cannot_be_built_changes_no_pool() -> None:
    """A reload whose new pool fails to build (a CA bundle gone since the check) leaves
    the running pools as they were: not retired, not given the new config's settings."""
    import dataclasses

    from relayd import config as cfg
    from relayd.upstreams import PoolRegistry

    text = ("upstreams:\n  a: {url: 'http://127.0.0.1:1', provider: openai, max_connections: 5}\n"
            "routes:\n  - {path: /a, upstream: a}\n")
    first = cfg.parse(text, "t.yaml", {})
    reg = PoolRegistry()
    pools = reg.build(first.upstreams.values())
    a = pools["a"]
    changed = dataclasses.replace(first.upstreams["a"], breaker=dataclasses.replace(
        first.upstreams["a"].breaker, failures=99))
    broken = dataclasses.replace(changed, name="b", url=cfg.URL("https://127.0.0.1:2"),
                                 tls=dataclasses.replace(changed.tls, ca_file="/nonexistent/ca.pem"))
    with pytest.raises(OSError):
        reg.build([changed, broken])
    assert reg.pools() == [a] and not a.retired and a.upstream is first.upstreams["a"]
    await reg.close()


async def test_a_retired_tables_keys_leave_the_log_scrub(monkeypatch):
    """Keys were scrubbed for ever: a service rotating its key file hourly checked every
    log line against every key it ever had.  A table's keys go once it is retired (and a
    little later, for its last access lines); a table still in use keeps them."""
    from relayd import logs, routes
    from relayd.clients import ClientTable
    from relayd.upstreams import PoolRegistry

    monkeypatch.setattr(routes, "_SECRETS_LINGER", 0.05)
    reg = PoolRegistry()
    tables = []
    for key in ("sk-rotated-key-ONE", "sk-rotated-key-TWO", "sk-rotated-key-THREE"):
        c = cfg.parse(f"upstreams: {{a: {{url: 'http://127.0.0.1:1', provider: openai, api_key: {key}}}}}\n"
                      "routes: [{path: /a, upstream: a}]", "t.yaml", {})
        tables.append(routes.RouteTable(c, reg.build(c.upstreams.values()), len(tables) + 1,
                                        ClientTable(c.clients)))
        if len(tables) > 1:
            tables[-2].supersede()
        if len(tables) == 1:
            tables[0].enter()  # a request still on the first table
    scrubbed = lambda: logs.scrub(None, "info", {"m": "sk-rotated-key-ONE sk-rotated-key-TWO"})["m"]
    await asyncio.sleep(0.2)
    assert scrubbed() == "[redacted] sk-rotated-key-TWO"  # the second table is gone; the first is in use
    tables[0].leave()
    assert scrubbed() == "[redacted] sk-rotated-key-TWO"  # its last access line is still to come
    await asyncio.sleep(0.2)
    assert scrubbed() == "sk-rotated-key-ONE sk-rotated-key-TWO"
    assert "sk-rotated-key-THREE" in logs._secrets
    tables[-1].supersede()
    await reg.close()


def test_exited_workers_counts_are_kept_in_one_file(tmp_path):
    """Each exited worker left its counter and histogram files for good, every one read at
    every scrape (a crash loop: thousands a day).  Their counts are added into one file."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from relayd import metrics

    key = mmap_key("relayd_requests_total", "relayd_requests_total", ["route"], ["/a"], "Requests")
    for pid, n in ((101, 3.0), (102, 4.0), (103, 5.0)):
        d = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        d.write_value(key, n, 0.0)
        d.close()
        MmapedDict(str(tmp_path / f"gauge_livesum_{pid}.db")).close()
    for pid in (101, 102):
        metrics.process_gone(pid, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_103.db", "counter_exited.db",
                                                          "gauge_livesum_103.db"]
    assert 'relayd_requests_total{route="/a"} 12.0' in metrics.render_all(str(tmp_path)).decode()


def test_a_streams_first_usage_read_is_not_held_for_the_stream():
    """The first read that mentions usage (Anthropic's message_start, often with more
    events in it) was kept for the whole stream: minutes of memory per stream."""
    import sys

    seg = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
           b'{"input_tokens":3,"output_tokens":1}}}\n\n' + b'event: ping\ndata: {"type":"ping"}\n\n' * 50)
    before = sys.getrefcount(seg)
    m = UsageMeter()
    m.observe_events(seg)
    assert sys.getrefcount(seg) == before
    m.observe_events(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n')
    assert m.result(False).as_log() == {"input_tokens": 3, "output_tokens": 9, "partial": False}


def test_log_lines_that_cannot_be_written_are_counted_then_reported():
    import io
    import json

    from relayd import logs

    class Disk(io.StringIO):
        full = True

        def write(self, s: str) -> int:
            if self.full:
                raise OSError(28, "No space left on device")
            return super().write(s)

    disk = Disk()
    sink = logs._Sink(disk)
    sink.write('{"event":"a"}\n')
    sink.write('{"event":"b"}\n{"event":"c"}\n')  # (no exception reaches the caller)
    disk.full = False
    sink.write('{"event":"d"}\n')
    lines = [json.loads(l) for l in disk.getvalue().splitlines()]
    assert [l["event"] for l in lines] == ["log lines lost", "d"] and lines[0]["lines"] == 3
    logs._Sink(None).write("x\n")  # stdout closed at start: nothing to write to, no error


def test_a_merge_that_fails_counts_nothing_twice_and_never_raises(tmp_path, monkeypatch):
    """Review 40: keys added one by one into the merged file before a failure stayed
    there while the worker's own file stayed too (counted twice); an unreadable file
    escaped the SIGCHLD handler and its worker was never restarted."""
    import errno
    import os

    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from relayd import metrics

    key = mmap_key("relayd_requests_total", "relayd_requests_total", ["route"], ["/a"], "Requests")
    for pid, n in ((201, 3.0), (202, 4.0)):
        d = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        d.write_value(key, n, 0.0)
        d.close()
    metrics.process_gone(201, str(tmp_path))  # merged: counter_exited.db holds 3

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    metrics.process_gone(202, str(tmp_path))  # cannot merge: its own file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_202.db", "counter_exited.db"]
    assert 'relayd_requests_total{route="/a"} 7.0' in metrics.render_all(str(tmp_path)).decode()
    (tmp_path / "counter_203.db").write_bytes(b"")  # a worker killed while making its file
    metrics.process_gone(203, str(tmp_path))
    assert not (tmp_path / "counter_203.db").exists()
    assert 'relayd_requests_total{route="/a"} 7.0' in metrics.render_all(str(tmp_path)).decode()


async def _recording_server(ssl_ctx: object = None) -> tuple[asyncio.AbstractServer, dict[str, object]]:
    """A loopback server whose protocol does nothing but record its transport and when
    it was lost (``got["transport"]``, ``got["lost"]``)."""
    import time
    got: dict[str, object] = {}

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            got["transport"] = transport

        def connection_lost(self, exc: BaseException | None) -> None:
            got["lost"] = time.monotonic()

    server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", 0, ssl=ssl_ctx)
    return server, got


async def _accepted(got: dict[str, object], tries: int) -> Any:
    """The recording server's transport, once its connection was accepted."""
    for _ in range(tries):
        if "transport" in got:
            break
        await asyncio.sleep(0.01)
    return got["transport"]


@pytest.mark.parametrize("reads", [False, True])
async def test_bytes_left_unsent_after_an_answer_have_the_send_deadline(reads) -> None:
    """The last bytes of an answer wait in the client transport's buffer after the
    stream's clock stopped; a client that never reads held the connection (a graceful or
    keep-alive close waits to flush them) with no deadline.  ``flush_deadline`` aborts it
    after ``send`` without progress — and leaves a client that reads alone.  Real sockets:
    a client with a small receive buffer that reads nothing (or slowly)."""
    import time
    server, got = await _recording_server()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(server.sockets[0].getsockname())
    client.setblocking(False)
    try:
        transport = await _accepted(got, 100)
        sent = received = 0
        while not transport.get_write_buffer_size():  # kernel buffers full: relayd holds the rest
            transport.write(b"x" * 65536)
            sent += 65536
            await asyncio.sleep(0)
        transport.close()  # graceful: it would wait for the client forever
        start = time.monotonic()
        stream.flush_deadline(transport, 0.4)
        while "lost" not in got and time.monotonic() - start < 3:
            if reads:
                try:
                    received += len(client.recv(16384))
                except BlockingIOError:
                    pass
            await asyncio.sleep(0.005)
        if reads:  # slow, but reading: all of it, then the close
            client.setblocking(True)
            client.settimeout(3)
            while data := await asyncio.to_thread(client.recv, 65536):  # the rest, to the FIN
                received += len(data)
            assert "lost" in got and received == sent
        else:
            assert "lost" in got and 0.3 < got["lost"] - start < 1.0
            assert transport.get_write_buffer_size() == 0
    finally:
        client.close()
        server.close()


async def test_stream_clocks_share_one_timer_and_its_heap_stays_small() -> None:
    """Every stream clock's wake is an entry in one heap under one loop timer (a timer per
    held stream cost about 700 B).  Each clock still fires at its own deadline, and a
    clock that changes state again and again (a client reading in bursts) leaves entries
    behind that are skipped and compacted, not kept for minutes."""
    import time
    from relayd import clock as clock_mod

    loop = asyncio.get_running_loop()
    fired: list[tuple[int, float]] = []

    class Clock(StreamClock):
        __slots__ = ("i",)

        def _fire(self) -> None:
            if self.reading and self.loop.time() >= self.last + self.idle:
                fired.append((self.i, time.monotonic()))
            super()._fire()

    start = time.monotonic()
    clocks = []
    for i, idle in enumerate([0.3, 0.1, 0.2, 0.05]):
        c = Clock(loop, idle, 60.0, math.inf, math.inf, lambda: None)
        c.i, c.task = i, None
        c.wait_for_upstream()
        clocks.append(c)
    wakes = clocks[0].wakes
    assert all(c.wakes is wakes for c in clocks) and wakes.live == 4
    churn = Clock(loop, 30.0, 20.0, math.inf, math.inf, lambda: None)
    churn.i, churn.task = 99, None
    for _ in range(5000):  # each switch to a nearer deadline leaves an entry behind
        churn.wait_for_client()
        churn.last += 0.0001
        churn.wait_for_upstream()
    assert len(wakes.heap) < 2 * wakes.live + 70, len(wakes.heap)
    await asyncio.sleep(0.45)
    order = [i for i, _ in fired]
    assert order[:4] == [3, 1, 2, 0], fired
    for i, at in fired[:4]:
        assert [0.3, 0.1, 0.2, 0.05][i] - 0.01 <= at - start <= [0.3, 0.1, 0.2, 0.05][i] + 0.1, fired
    for c in clocks + [churn]:
        c.stop()
    assert wakes.live == 0


async def test_retired_pools_are_let_go_by_reloads_without_scrapes() -> None:
    """A reload that changes an upstream's pool retires the old one; closed, it was only
    forgotten when ``/metrics`` was scraped: reloads without scrapes grew the worker by
    about 20 KB each."""
    from relayd.upstreams import PoolRegistry

    reg = PoolRegistry()
    configs = [cfg.parse(f"upstreams: {{a: {{url: \"http://127.0.0.1:1\", provider: openai, keepalive: {k}}}}}\n"
                         "routes: [{path: /a, upstream: a}]", "t.yaml", {}) for k in (5, 6)]
    for i in range(60):
        reg.build(configs[i % 2].upstreams.values())
        for _ in range(3):
            await asyncio.sleep(0)  # the retired pool's close runs
    assert len(reg._retired) <= 2, len(reg._retired)
    await reg.close()


async def test_a_stopped_clock_lets_its_stream_go_before_its_heap_entry_comes_up() -> None:
    """A stopped clock's entry stays in the shared heap until its time (idle: minutes); the
    clock must not keep its stream (``on_beat``) or task alive meanwhile — ended streams
    stayed in memory until then."""
    import gc
    import weakref

    class Owner:
        def beat(self) -> None:
            pass

    owner = Owner()
    gone = weakref.ref(owner)
    c = StreamClock(asyncio.get_running_loop(), 120.0, 60.0, math.inf, 15.0, owner.beat)
    c.wait_for_upstream()
    assert any(entry[1] is c for entry in c.wakes.heap)
    c.stop()
    del owner
    gc.collect()
    assert gone() is None
    assert c.task is None and any(entry[1] is c for entry in c.wakes.heap)  # (the entry: still there)


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="needs the openssl CLI")
async def test_bytes_left_unsent_on_a_tls_connection_have_the_send_deadline(tmp_path) -> None:
    """On TLS the transport's own buffer does not count what it handed to the connection
    under it (uvloop hides that one): the deadline never armed, and a client that read
    nothing held a keep-alive TLS connection.  The kernel's unsent bytes tell instead."""
    import ssl
    import time

    from test_tls import make_cert

    cert, key = make_cert(tmp_path, "localhost", 1)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    server, got = await _recording_server(sctx)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(server.sockets[0].getsockname())
    cctx = ssl.create_default_context()
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    client = await asyncio.to_thread(cctx.wrap_socket, raw)  # (the handshake, then no reads)
    try:
        transport = await _accepted(got, 200)
        for _ in range(160):  # 10 MB: more than the kernel's buffers take
            transport.write(b"x" * 65536)
        await asyncio.sleep(0.3)
        assert stream._waiting(transport)
        start = time.monotonic()
        stream.flush_deadline(transport, 0.4)
        while "lost" not in got and time.monotonic() - start < 3:
            await asyncio.sleep(0.01)
        assert "lost" in got and got["lost"] - start < 1.5
    finally:
        client.close()
        server.close()


def test_open_fd_count_matches_the_fd_table():
    """FdWatch's count (one stat of /proc/self/fd on Linux 6.2+, a listing before) is the
    number of open descriptors: a wrong count would warn of a full table, or never."""
    import os

    from relayd.server import _open_fds
    held = [socket.socket() for _ in range(40)]
    try:
        assert _open_fds(10**6) == len(os.listdir("/proc/self/fd")) - 1
    finally:
        for s in held:
            s.close()


def test_usage_found_after_a_lookalike_mention():
    """The scan starts at the first ``"usage`` but a real usage object after a lookalike
    key in the same segment is still found."""
    meter = UsageMeter()
    meter.observe_events(b'data: {"usage_note":"x","choices":[]}\n\n'
                         b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n')
    got = meter.result(partial=False)
    assert (got.input, got.output) == (7, 3)


async def test_the_breakers_turns_are_logged() -> None:
    """Review 72: an upstream ejected by its breaker and one back in service looked the same
    in the log (nginx: "upstream server temporarily disabled")."""
    from structlog.testing import capture_logs

    up = cfg.parse('upstreams: {a: {url: "http://127.0.0.1:1", provider: openai,\n'
                   '  breaker: {failures: 2, cooldown: 50ms}}}\n'
                   'routes: [{path: /a, upstream: a}]', "t.yaml", {}).upstreams["a"]
    pool = Pool(up, True)
    try:
        with capture_logs() as logs:
            pool.record(False)
            pool.record(False)
            pool.record(False)  # (still open: no second line)
            await asyncio.sleep(0.08)
            pool.record(True)
            pool.record(True)
        assert [(l["event"], l["log_level"], l["upstream"]) for l in logs] == [
            ("circuit breaker opened", "warning", "a"), ("circuit breaker closed", "info", "a")]
        assert logs[0]["failures"] == 2 and logs[0]["cooldown_s"] == 0.05
    finally:
        await pool.close()

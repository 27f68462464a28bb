"""The sans-I/O boundary tracker against the WHATWG edge cases and a reference parser."""

from __future__ import annotations

import ast
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import FIXTURES, block_ends, sse_events
from relayd.sse import BoundaryTracker

_TEXT = (FIXTURES / "sse-edge-cases.md").read_text()
VECTORS = {name: body for name, body in re.findall(r"### `([^`]+)`.*?```python\n(.*?)```", _TEXT, re.S)}


def load(name: str) -> dict:
    ns: dict = {}
    exec(VECTORS[name], ns)  # the vectors are plain Python literals
    return ns


def feed_all(reads: list[bytes], tracker: BoundaryTracker | None = None) -> tuple[list[bytes], BoundaryTracker]:
    t = tracker or BoundaryTracker()
    return [t.feed(r) for r in reads], t


def test_all_vectors_present():
    assert len(VECTORS) >= 45


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_edge_case_vector(name):
    v = load(name)
    outs, t = feed_all(v["reads"])
    released = b"".join(outs)
    whole = b"".join(v["reads"])
    assert released + t.tail == whole                     # bytes are never changed or lost
    expected_end = v["block_ends"][-1] if v["block_ends"] else 0
    assert len(released) == expected_end                  # everything up to the last boundary is out
    assert t.tail == v["tail"]                            # only the torn block is held
    # every release ends on a boundary the vector lists
    pos = 0
    for o in outs:
        pos += len(o)
        if o:
            assert pos in v["block_ends"], (name, pos)
    # a conforming parser on the released bytes fires exactly the vector's events
    assert [(e, d) for e, d, *_ in v["events"]] == sse_events(released)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_edge_case_vector_one_byte_reads(name):
    v = load(name)
    whole = b"".join(v["reads"])
    outs, t = feed_all([whole[i:i + 1] for i in range(len(whole))])
    assert b"".join(outs) + t.tail == whole
    assert len(b"".join(outs)) == (v["block_ends"][-1] if v["block_ends"] else 0)


def test_fast_path_returns_the_same_object_when_all_complete():
    data = b"data: a\n\ndata: b\n\n"
    t = BoundaryTracker()
    assert t.feed(data) is data
    assert t.at_boundary


def test_huge_event_gives_up_alignment_and_bounds_memory():
    t = BoundaryTracker(max_event=1024)
    out = t.feed(b"data: " + b"x" * 600)
    assert out == b"" and not t.at_boundary
    out = t.feed(b"y" * 600)
    assert not t.aligned
    assert len(out) == 1206 and t.tail == b""
    assert not t.at_boundary  # inside the oversized event: no heartbeat may go in
    assert t.feed(b"more") == b"more"  # straight through while it lasts
    assert t.feed(b"z\n\ndata: n") == b"z\n\n"  # its end: aligned again, a torn tail held
    assert t.aligned and t.tail == b"data: n" and not t.at_boundary
    assert t.feed(b"ext\n\n") == b"data: next\n\n" and t.at_boundary


def test_an_empty_read_keeps_a_pending_cr():
    # aiohttp's pure-Python parser hands the body reader b"" for a chunk-size line read
    # on its own: the CR before it must still pair with the LF after it.
    t = BoundaryTracker()
    assert t.feed(b"data: x\r") == b""
    assert t.feed(b"") == b""
    assert t.feed(b"\n") == b""  # "data: x\r\n" is one line, not a block
    assert t.feed(b"\r\n") == b"data: x\r\n\r\n"


@pytest.mark.parametrize("reads", [[b"\xef\xbb\xbfdata: 1\n\n"], [b"\xef\xbb", b"\xbfdata: 1\n\n"]])
def test_a_bom_after_relayds_own_bytes_is_dropped(reads):
    # A heartbeat before the upstream's first byte: the BOM would no longer lead the
    # stream, and a client would take it into the first field's name.
    t = BoundaryTracker()
    assert t.at_boundary
    t.interject()
    assert b"".join(t.feed(r) for r in reads) == b"data: 1\n\n"
    kept = BoundaryTracker()
    assert b"".join(kept.feed(r) for r in reads) == b"\xef\xbb\xbfdata: 1\n\n"


def test_16mib_line_is_still_aligned_and_linear():
    t = BoundaryTracker()
    chunk = b"x" * 65536
    assert t.feed(b"data: ") == b""
    for _ in range(240):  # 15 MiB in 64 KiB reads: must not rescan the held bytes
        assert t.feed(chunk) == b""
    out = t.feed(b"\n\n")
    assert t.aligned and len(out) == 6 + 240 * 65536 + 2


def test_lone_cr_at_end_is_a_complete_boundary_for_injection():
    t = BoundaryTracker()
    assert t.feed(b"data: x\r\r") == b"data: x\r\r"
    # A heartbeat may go here: it comes only after a whole period of silence (a CR-only
    # upstream would otherwise never get one); a late LF is one more blank line.
    assert t.at_boundary
    assert t.feed(b"\n") == b"\n"   # the LF that completes the CRLF blank line
    assert t.at_boundary


def test_block_counting():
    t = BoundaryTracker()
    t.feed(b"data: 1\n\ndata: 2\n\n: c\n\n")
    assert t.blocks == 3
    t2 = BoundaryTracker()
    t2.feed(b"data: 1\r\n\r\ndata: 2\r\rdata: 3\r\n\r\n")
    assert t2.blocks == 3


# ---------------------------------------------------------------- property: any chunking

_line = st.one_of(
    st.builds(lambda v: b"data: " + v, st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
    st.sampled_from([b"event: error", b"id: 7", b"retry: 100", b": comment", b"data", b"data:", b"\xef\xbb\xbfdata: x",
                     b"", b"data: \xe2\x80\xa8 \xd0\xb8", b"field-without-colon"]),
)
_eol = st.sampled_from([b"\n", b"\r\n", b"\r"])
_stream = st.lists(st.tuples(_line, _eol), max_size=30).map(lambda ls: b"".join(a + b for a, b in ls))


@settings(max_examples=400, deadline=None)
@given(body=_stream, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       bom=st.booleans(), torn=st.binary(max_size=8))
def test_any_chunking_gives_reference_boundaries(body, cuts, bom, torn):
    data = (b"\xef\xbb\xbf" if bom else b"") + body + torn
    points = sorted({c % (len(data) + 1) for c in cuts})
    reads, prev = [], 0
    for p in points + [len(data)]:
        reads.append(data[prev:p])
        prev = p
    outs, t = feed_all(reads)
    released = b"".join(outs)
    assert released + t.tail == data
    ends = block_ends(data)
    assert len(released) == (ends[-1] if ends else 0)
    # and at every step, what was released so far ended on a reference boundary, or on
    # the CR of a blank line's CRLF whose LF had not arrived yet (the block is complete)
    pos = 0
    for o in outs:
        pos += len(o)
        assert pos == 0 or pos in ends or (data[pos - 1] == 0x0D and data[pos:pos + 1] == b"\n"
                                           and pos + 1 in ends)
    # a conforming client sees the same events from the released bytes as from the input,
    # except for events of the torn tail, which it could never have dispatched either
    assert sse_events(released) == sse_events(data[: len(released)])


@settings(max_examples=300, deadline=None)
@given(body=_stream, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       cap=st.integers(min_value=1, max_value=24), empty=st.booleans())
def test_a_tiny_cap_loses_alignment_only_while_an_event_outgrows_it(body, cuts, cap, empty):
    """Any chunking, empty reads included, with an event cap the stream's events exceed:
    every byte comes out once, in order; whenever the tracker says it is aligned, what it
    released so far ends on a reference boundary, and it says so at every boundary that
    ends a read after an oversized event."""
    data = body
    points = sorted({c % (len(data) + 1) for c in cuts})
    reads, prev = [], 0
    for p in points + [len(data)]:
        reads.extend([data[prev:p], b""] if empty else [data[prev:p]])
        prev = p
    t = BoundaryTracker(max_event=cap)
    ends = set(block_ends(data))
    pos = 0
    for r in reads:
        pos += len(t.feed(r))
        if t.aligned:
            assert pos == 0 or pos in ends or (data[pos - 1] == 0x0D and pos + 1 in ends
                                               and data[pos:pos + 1] == b"\n"), (pos, data)
        if t.at_boundary:
            assert pos == 0 or pos in ends or data[pos - 1] == 0x0D
    assert data[:pos] + t.tail == data


@pytest.mark.parametrize("reads", [[b"\xef", b"\ndata: x"], [b"\xef\xbb", b"\r\ndata: x"],
                                   [b"\xef", b"\rdata: x"]])
def test_bytes_held_as_a_would_be_bom_are_scanned_when_it_is_not_one(reads):
    """A stream that begins like a BOM (0xEF) and is not one: the held bytes start a line,
    so a line end in the next read ends that line — it is no blank line, and nothing is
    released there (as when the same bytes come in one read)."""
    t, whole = BoundaryTracker(), BoundaryTracker()
    assert b"".join(t.feed(r) for r in reads) == whole.feed(b"".join(reads)) == b""
    assert t.blocks == whole.blocks == 0 and t.tail == b"".join(reads)


def test_lone_cr_line_ends_cost_about_what_lf_ones_do():
    """A stream of tiny events with lone-CR line ends (legal SSE) took a Python step per
    line end: 150x the LF stream's time, 9 MB held a worker's loop for seconds (its pings
    unanswered).  Now the same C scans: compared with the LF stream, not a clock."""
    import time

    def cost(stream: bytes) -> float:
        t = BoundaryTracker()
        start = time.perf_counter()
        for i in range(0, len(stream), 262144):
            t.feed(stream[i:i + 262144])
        assert t.blocks == 300_000
        return time.perf_counter() - start

    lf, cr = min(cost(b"x\n\n" * 300_000) for _ in range(3)), min(cost(b"x\r\r" * 300_000) for _ in range(3))
    assert cr < 20 * lf + 0.01, (cr, lf)

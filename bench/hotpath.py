"""Per-event cost of relayd's own work on the relay path, in isolation (ns/event).

Measures the pieces the pipe runs on every released SSE segment: the boundary tracker,
the endpoint's end-marker check, and passive usage accounting. Usage: python bench/hotpath.py
"""

from __future__ import annotations

import timeit
from pathlib import Path

from relayd import providers
from relayd.sse import BoundaryTracker
from relayd.usage import UsageMeter

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def events(name: str) -> list[bytes]:
    body = (FIX / name).read_bytes()
    sep = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n"
    return [e + sep for e in body.split(sep) if e]


def per_event(fn, evs: list[bytes], rounds: int = 200) -> float:
    t = timeit.timeit(lambda: [fn(e) for e in evs], number=rounds)
    return t / (rounds * len(evs)) * 1e9


def main() -> None:
    base = timeit.timeit(lambda: [None for _ in range(1000)], number=200) / 200_000 * 1e9
    for name, provider, path in [
            ("openai-chat-usage-obfuscation.sse", "openai", "/v1/chat/completions"),
            ("openai-responses.sse", "openai", "/v1/responses"),
            ("anthropic-messages.sse", "anthropic", "/v1/messages"),
            ("gemini-stream.sse", "gemini", "/v1beta/models/m:streamGenerateContent")]:
        evs = events(name)
        t = BoundaryTracker()
        marker = providers.get(provider).endpoint(path).ends
        meter = UsageMeter()
        feed = per_event(t.feed, evs) - base
        mark = per_event(marker, evs) - base
        use = per_event(meter.observe_events, evs) - base
        print(f"{name:40s} tracker {feed:6.0f} ns  end-marker {mark:5.0f} ns  usage {use:5.0f} ns  per event")


if __name__ == "__main__":
    main()

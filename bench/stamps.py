"""Where one request's time goes before its first byte: relayd with time stamps.

Runs relayd (pinned to core 1, like ``make bench``) with ``time.perf_counter_ns`` stamps
around the steps of the request path, against the bench upstream, and prints the median
time of each step from the request's bytes reaching relayd, for scenario 2 (100 one-event
streams back to back: "warm") and scenario 3 (streams of 64 chunks 20 ms apart, one at a
time: "idle").  The stamps cost about a microsecond each; read differences, not totals.

Usage: python bench/stamps.py (about 30 seconds).
"""

from __future__ import annotations

import asyncio
import functools
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def serve(argv: list[str], out: str) -> None:
    """relayd's CLI with the stamps in; SIGUSR2 writes the medians so far to `out`."""
    from aiohttp import client_proto, http_writer

    from relayd import app, server, stream, upstream_conn, upstream_http, upstreams
    from relayd.cli import main

    now = time.perf_counter_ns
    marks: dict[str, int] = {}
    rows: list[dict[str, float]] = []

    def before(cls: Any, name: str, label: str, first: Any = None) -> None:
        """Stamp `label` when cls.name is called (when `first(args)` says so, if given)."""
        f = getattr(cls, name)
        if asyncio.iscoroutinefunction(f):
            @functools.wraps(f)
            async def w(*a: Any, **k: Any) -> Any:
                marks[label] = now()
                return await f(*a, **k)
        else:
            @functools.wraps(f)
            def w(*a: Any, **k: Any) -> Any:
                if first is None or first(a):
                    if label == "0 request bytes in":
                        marks.clear()
                    marks.setdefault(label, now())
                return f(*a, **k)
        setattr(cls, name, w)

    def written(a: Any) -> bool:
        if "0 request bytes in" in marks and "8 first byte to the client" not in marks:
            marks["8 first byte to the client"] = now()
            base = marks["0 request bytes in"]
            rows.append({k: (v - base) / 1000 for k, v in marks.items()})
        return False

    before(server._Parser, "feed_data", "0 request bytes in", lambda a: a[1][:4] in (b"POST", b"GET "))
    before(app.App, "handle", "1 App.handle")
    before(upstream_http.Sender, "send", "2 Sender.send")
    before(client_proto.ResponseHandler, "set_response_params", "3 upstream connection ready")
    before(upstream_conn.Guarded, "data_received", "4 upstream answer read", lambda a: a[1][:5] == b"HTTP/")
    before(stream.Stream, "__init__", "5 Stream made")
    before(stream.Stream, "_copy", "6 head prepared")
    before(http_writer.StreamWriter, "_write", "-", written)
    before(http_writer.StreamWriter, "_writelines", "-", written)

    def dump(*_: Any) -> None:
        keys = sorted({k for r in rows for k in r})
        with open(out, "w") as f:
            for k in keys:
                vals = [r[k] for r in rows if k in r]
                f.write(f"  {k:30s} {statistics.median(vals):7.0f} µs  (n={len(vals)})\n")
        rows.clear()

    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["relayd"] + argv
    sys.exit(main())


async def drive() -> None:
    sys.path.insert(0, str(HERE))
    import client
    import procs
    import report

    ps, up = procs.harness("relayd-stamps-")
    tmp = ps.tmp
    port = procs.free_port()
    cfg = tmp / "relayd.yaml"
    cfg.write_text("workers: 1\n" + procs.relayd_config(port, up, False))
    out = tmp / "stamps.txt"
    p = ps.spawn(procs.pin(1) + [sys.executable, __file__, "serve", str(out), "run", "-c", str(cfg)],
                 "relayd.log", port)
    t = client.Target("relayd", port, "/v1")
    try:
        await client.streams(t, 20, 5, 1)
        await client.small_json(t, 8, 400, 5)
        for label, args in (("warm: 100 one-event streams back to back", (100, 1, 0, False)),
                            ("idle: 8 streams of 64 chunks 20 ms apart", (8, 64, 20, True))):
            p.send_signal(signal.SIGUSR2)  # forget the warm-up
            await asyncio.sleep(0.3)
            run = await client.sequential(t, *args)
            p.send_signal(signal.SIGUSR2)
            await asyncio.sleep(0.5)
            print(f"{label} (client TTFB p50 {report.pct(run.ttfb, 50) / 1e6:.2f} ms):")
            print(out.read_text())
    finally:
        ps.stop_all()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "serve":
        serve(sys.argv[3:], sys.argv[2])
    else:
        asyncio.run(drive())

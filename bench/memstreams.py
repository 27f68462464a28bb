"""Memory per held SSE stream (issue 10, scenario 5), measured and attributed.

``rss``: a fresh fake upstream (bench/upstream.py, ``/hold``: headers + one event, then
silence) and a fresh relayd (``relayd run FILE --workers 1 --loop uvloop``); open 2,000
held streams, read the relay's RSS, open up to 5,000, read it again; the marginal cost is
the difference over the 3,000 extra streams.  ``--patch NAME`` runs relayd through
``serve`` with an experiment from ``mempatches`` applied first; ``--env K=V`` sets relayd's
environment (``MALLOC_ARENA_MAX``, ``PYTHONMALLOC`` ...).  Each round is fresh processes;
``--rounds`` gives the median.

``trace``: the same, with relayd run under ``tracemalloc`` (25 frames): at 2,000 and
5,000 streams the harness sends SIGUSR1 and relayd dumps a snapshot plus a count of live
objects by type.  The snapshot difference divided by 3,000 is the Python-heap cost per
stream by allocation site; an untraced ``rss`` figure minus it is what is not Python
heap (pymalloc pool slack, glibc malloc overhead, libuv, the kernel's share of RSS).
Tracing is in relayd's own process (not the harness's) so that no client or upstream
object is ever counted.

Usage: python bench/memstreams.py rss [--rounds 3] [--patch NAME ...] [--env K=V ...]
       python bench/memstreams.py trace [--patch NAME ...] [--top 40]
Loads are bounded (5,000 streams, 127.0.0.1 only); every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import inspect
import linecache
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import client  # noqa: E402
import procs  # noqa: E402

LOW, HIGH = 2000, 5000


# -- the relay side (`serve`): runs inside relayd's process


def serve(cfg: str, patches: list[str], trace_dir: str | None, frames: int) -> int:
    if trace_dir:
        tracemalloc.start(frames)
        _install_dump(Path(trace_dir), full=frames > 1)
    import mempatches
    for name in patches:
        mempatches.apply(name)
    from relayd import cli
    return cli.main(["run", cfg, "--workers", "1", "--loop", "uvloop"])


def _install_dump(out: Path, full: bool) -> None:
    """SIGUSR1: gc, then dump a tracemalloc snapshot and live object counts by type
    (or, not ``full``, only the traced total: fast, for comparing patches)."""
    seen = [0]

    def dump(_sig: int, _frame: Any) -> None:
        import gc
        seen[0] += 1
        n = seen[0]
        before = tracemalloc.get_traced_memory()[0]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        if not full:
            (out / f"types{n}.json").write_text(json.dumps(
                {"traced_before_gc": before, "traced_after_gc": after}))
            (out / f"done{n}").write_text("1")
            return
        snap = tracemalloc.take_snapshot()
        snap.dump(str(out / f"snap{n}.bin"))
        del snap  # its trace tuples are not relayd's objects
        types: collections.Counter[str] = collections.Counter()
        sizes: collections.Counter[str] = collections.Counter()
        for o in gc.get_objects():
            key = type(o).__qualname__ + " " + type(o).__module__
            types[key] += 1
            d = getattr(o, "__dict__", None) if not isinstance(o, type) else None
            sizes[key] += sys.getsizeof(o) + (sys.getsizeof(d) if type(d) is dict else 0)
        (out / f"types{n}.json").write_text(json.dumps(
            {"traced_before_gc": before, "traced_after_gc": after, "types": types, "sizes": sizes}))
        (out / f"done{n}").write_text("1")

    signal.signal(signal.SIGUSR1, dump)


# -- the harness side


def start(tmp: Path, ps: procs.Procs, patches: list[str], env: dict[str, str],
          trace: int, pipe: bool = False, heartbeat: float | None = None) -> tuple[int, int]:
    up = procs.free_port()
    ps.upstream(up)
    port = procs.free_port()
    if pipe:  # the floor: bench/tcppipe.py, two uvloop transports and two tiny protocols
        p = ps.spawn([sys.executable, str(procs.HERE / "tcppipe.py"), str(port), str(up)],
                     "pipe.log", port)
        return p.pid, port
    cfg = tmp / "relayd.yaml"
    text = procs.relayd_config(port, up, access_log=False)
    if heartbeat is not None:  # the default 15 s fires mid-measurement: figures move ±1 KiB
        text = text.replace("defaults:\n", f"defaults:\n  heartbeat: {heartbeat}\n", 1)
    cfg.write_text("workers: 1\n" + text)
    if patches or trace:
        argv = [sys.executable, __file__, "serve", str(cfg)]
        argv += [a for p in patches for a in ("--patch", p)]
        argv += ["--trace-dir", str(tmp), "--frames", str(trace)] if trace else []
    else:  # exactly how relayd is deployed
        argv = [sys.executable, "-m", "relayd", "run", str(cfg), "--workers", "1", "--loop", "uvloop"]
    with open(tmp / "relayd.log", "wb") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=procs.ROOT,
                             env={**os.environ, **env})
    ps.started.append(p)
    procs.wait_port(port, p, timeout=60)
    return p.pid, port


def settled_rss(pid: int, limit_s: float = 8.0) -> int:
    """RSS (KiB) once two reads half a second apart agree within 64 KiB."""
    end = time.monotonic() + limit_s
    last = procs.rss_kib(pid)
    while time.monotonic() < end:
        time.sleep(0.5)
        now = procs.rss_kib(pid)
        if abs(now - last) < 64:
            return now
        last = now
    return last


def snapshot(tmp: Path, pid: int, n: int) -> None:
    os.kill(pid, signal.SIGUSR1)
    end = time.monotonic() + 600
    while not (tmp / f"done{n}").exists():
        if time.monotonic() > end:
            raise RuntimeError("relayd wrote no snapshot within 600 s")
        time.sleep(0.2)


async def one_round(patches: list[str], env: dict[str, str], trace: int,
                    keep: Path | None = None, pipe: bool = False,
                    heartbeat: float | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="memstreams-") as d:
        tmp = keep or Path(d)
        ps = procs.Procs(tmp)
        conns: list[client.Conn] = []
        try:
            pid, port = start(tmp, ps, patches, env, trace, pipe, heartbeat)
            t = client.Target("relayd", port, "/v1")
            batch, wait = (100, 300.0) if trace > 1 else (250, 30.0)  # tracing slows relayd 5x
            await client.open_held(t, conns, 50, timeout=wait)  # warm: the first streams pay one-off costs
            rss0 = settled_rss(pid)
            await client.open_held(t, conns, LOW, batch, wait)
            rss_lo = settled_rss(pid)
            if trace:
                snapshot(tmp, pid, 1)
            await client.open_held(t, conns, HIGH, batch, wait)
            rss_hi = settled_rss(pid)
            if trace:
                snapshot(tmp, pid, 2)
            still = sum(1 for c in conns if not c.lost.done())
            out = dict(open=still, rss_50_kib=rss0, rss_lo_kib=rss_lo, rss_hi_kib=rss_hi,
                       kib_per_stream=(rss_hi - rss_lo) / (HIGH - LOW))
            if trace > 1:
                out["attribution"] = attribute(tmp)
            elif trace:
                ta, tb = (json.loads((tmp / f"types{i}.json").read_text()) for i in (1, 2))
                out["heap_per_stream"] = (tb["traced_after_gc"] - ta["traced_after_gc"]) / (HIGH - LOW)
            return out
        finally:
            for c in conns:
                c.close()
            ps.stop_all()


def _site(frames: tracemalloc.Traceback) -> str:
    """The innermost frame outside the stdlib's own plumbing, as file:line: code."""
    for f in reversed(frames):  # most recent last
        name = f.filename
        if "tracemalloc" in name or "memstreams" in name:
            continue
        short = name.split("site-packages/")[-1].split("/lib/python3.11/")[-1]
        if "relayd/" in name:
            short = "relayd/" + name.split("relayd/")[-1]
        return f"{short}:{f.lineno}: {linecache.getline(name, f.lineno).strip()[:70]}"
    return "?"


def _owner(frames: tracemalloc.Traceback) -> str:
    """The outermost relayd (or aiohttp) frame: which phase of a stream allocated it."""
    for f in frames:  # oldest first
        if "/relayd/" in f.filename and "lifecycle" not in f.filename and "cli" not in f.filename:
            return "relayd/" + f.filename.split("relayd/")[-1] + f":{f.lineno}"
    for f in frames:
        if "site-packages/" in f.filename:
            return f.filename.split("site-packages/")[-1] + f":{f.lineno}"
    return "?"


# Allocation sites (innermost frame, "file:line" substrings) by what they belong to; the
# first match wins.  The body StreamReader's deque (streams.py:130) is one per side.
COMPONENTS = (
    ("client socket: uvloop TCPTransport + libuv handle (made at accept)", ("runners.py:118",)),
    ("client connection: RequestHandler (relayd Connection), llhttp parser, message deque",
     ("server.py:364", "server.py:266", "web_protocol.py:234", "web_protocol.py:264",
      "web_protocol.py:289", "web_protocol.py:300", "server.py:210", "web_server.py",
      "web_protocol.py:245", "web_protocol.py:371")),
    ("client request: parsed head (message, headers, URL), Request, body StreamReader",
     ("server.py:213", "server.py:360", "web_request.py", "streams.py:11", "streams.py:12",
      "streams.py:13", "streams.py:21")),
    ("2 tasks + 7 coroutine frames + waiter future (the await chain down to readany)",
     ("web_protocol.py:383", "web_protocol.py:684", "web_protocol.py:675", "web_protocol.py:577",
      "web_protocol.py:686", "app.py:133", "stream.py:167", "stream.py:202", "streams.py:36",
      "streams.py:47", "_weakrefset.py", "weakref.py:348", "stream.py:197")),
    ("response to the client: StreamResponse, StreamWriter, headers",
     ("stream.py:130", "web_response.py", "http_writer.py", "web_protocol.py:655", "headers.py")),
    ("upstream socket: uvloop TCPTransport, socket", ("connector.py:1337", "aiohappyeyeballs",
                                                      "tcp_helpers.py")),
    ("upstream connection: ResponseHandler (Guarded), llhttp parser, DataQueue deque",
     ("client_proto.py:266", "streams.py:674", "connector.py:6", "connector.py:145",
      "weakref.py:167", "upstreams.py")),
    ("upstream response: parsed head, headers, body StreamReader, chunk-split deque",
     ("client_proto.py:359", "streams.py:310", "client_proto.py:400", "client_reqrep.py:763")),
    ("ClientResponse and what it keeps of the sent request (RequestInfo, headers, payload)",
     ("client_reqrep.py", "client.py", "payload.py", "helpers.py:671")),
    ("the stream's deadline timer (uvloop TimerHandle + uv_timer_t)", ("stream.py:67", "stream.py:69")),
    ("relayd's own per-request objects (Exchange, Stream, Forwarded, RequestBody, ...)",
     ("relayd/", "secrets.py")),
)


def component(site: str) -> str:
    where = site.split(": ", 1)[0]
    for name, patterns in COMPONENTS:
        if any(p in where for p in patterns):
            return name
    return "other"


def attribute(tmp: Path) -> dict[str, Any]:
    a = tracemalloc.Snapshot.load(str(tmp / "snap1.bin"))
    b = tracemalloc.Snapshot.load(str(tmp / "snap2.bin"))
    per = HIGH - LOW
    sites: collections.Counter[str] = collections.Counter()
    owners: collections.Counter[str] = collections.Counter()
    lines, first = inspect.getsourcelines(_install_dump)
    dump_lines = range(first, first + len(lines))
    for stat in b.compare_to(a, "traceback"):
        if any(f.filename == __file__ and f.lineno in dump_lines for f in stat.traceback):
            continue  # the dump's own allocations (it runs inside whatever frame it interrupted)
        sites[_site(stat.traceback)] += stat.size_diff
        owners[_owner(stat.traceback)] += stat.size_diff
    ta = json.loads((tmp / "types1.json").read_text())
    tb = json.loads((tmp / "types2.json").read_text())
    types = {k: ((tb["types"].get(k, 0) - ta["types"].get(k, 0)) / per,
                 (tb["sizes"].get(k, 0) - ta["sizes"].get(k, 0)) / per) for k in tb["types"]}
    return dict(
        traced_per_stream=sum(sites.values()) / per,
        garbage_per_stream=((tb["traced_before_gc"] - tb["traced_after_gc"])
                            - (ta["traced_before_gc"] - ta["traced_after_gc"])) / per,
        sites={k: v / per for k, v in sites.most_common()},
        components=_components(sites, per),
        owners={k: v / per for k, v in owners.most_common()},
        types={k: v for k, v in sorted(types.items(), key=lambda kv: -kv[1][1]) if abs(v[0]) >= 0.5})


def _components(sites: collections.Counter[str], per: int) -> dict[str, float]:
    out: collections.Counter[str] = collections.Counter()
    for site, size in sites.items():
        if site.split(": ", 1)[0].endswith("streams.py:130"):
            out[COMPONENTS[2][0]] += size / 2  # the request body's reader
            out[COMPONENTS[7][0]] += size / 2  # the upstream body's reader
        else:
            out[component(site)] += size
    return {k: v / per for k, v in out.most_common()}


def report(results: list[dict[str, Any]], top: int) -> None:
    per = [r["kib_per_stream"] for r in results]
    for r in results:
        print(f"round: {r['open']}/{HIGH} open; RSS {r['rss_50_kib'] / 1024:.1f} (50) "
              f"{r['rss_lo_kib'] / 1024:.1f} ({LOW}) {r['rss_hi_kib'] / 1024:.1f} MiB ({HIGH}); "
              f"{r['kib_per_stream']:.2f} KiB/stream")
    print(f"marginal RSS per held stream, median of {len(per)}: {statistics.median(per):.2f} KiB")
    heap = [r["heap_per_stream"] for r in results if "heap_per_stream" in r]
    if heap:
        print(f"Python heap per held stream (tracemalloc, after gc): "
              + ", ".join(f"{h:.0f}" for h in heap) + " B")
    for r in results:
        at = r.get("attribution")
        if not at:
            continue
        print(f"\ntracemalloc: {at['traced_per_stream']:.0f} B/stream live Python heap "
              f"(+{at['garbage_per_stream']:.0f} B/stream cyclic garbage before gc)")
        print("\nby component (B/stream):")
        for k, v in at["components"].items():
            print(f"  {v:8.0f}  {k}")
        print("\nby allocation site (B/stream):")
        for k, v in list(at["sites"].items())[:top]:
            print(f"  {v:8.0f}  {k}")
        print("\nby outermost relayd/aiohttp frame (B/stream):")
        for k, v in list(at["owners"].items())[:top]:
            print(f"  {v:8.0f}  {k}")
        print("\nlive gc-tracked objects per stream by type (count, sys.getsizeof incl. __dict__):")
        for k, (count, size) in list(at["types"].items())[:top]:
            print(f"  {count:6.2f} {size:7.0f} B  {k}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("rss", "trace", "heap"):
        s = sub.add_parser(name)
        s.add_argument("--rounds", type=int, default=1)
        s.add_argument("--patch", action="append", default=[])
        s.add_argument("--env", action="append", default=[])
        s.add_argument("--top", type=int, default=40)
        s.add_argument("--json", help="also write the results here")
        s.add_argument("--keep", type=Path, help="keep logs and snapshots in this directory")
        s.add_argument("--heartbeat", type=float, default=600,
                       help="the routes' heartbeat [s]; 600 keeps it from firing while measuring "
                            "(0 = off; bench/run.py uses relayd's default, 15)")
        s.add_argument("--pipe", action="store_true",
                       help="measure bench/tcppipe.py (a raw byte pipe) instead of relayd")
    s = sub.add_parser("serve")
    s.add_argument("config")
    s.add_argument("--patch", action="append", default=[])
    s.add_argument("--trace-dir")
    s.add_argument("--frames", type=int, default=25)
    args = p.parse_args()
    if args.cmd == "serve":
        return serve(args.config, args.patch, args.trace_dir, args.frames)
    procs.raise_nofile()
    env = dict(kv.split("=", 1) for kv in args.env)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    results = [asyncio.run(one_round(args.patch, env, {"trace": 25, "heap": 1}.get(args.cmd, 0), args.keep,
                                     args.pipe, args.heartbeat))
               for _ in range(min(args.rounds, 5))]
    report(results, args.top)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

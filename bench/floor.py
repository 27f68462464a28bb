"""The floor for a Python relay: CPU per event of a raw uvloop TCP byte pipe, beside relayd
and nginx, on scenario 1 (500 streams x 100 events, 20 ms apart), in one run.

`bench/tcppipe.py` parses nothing and copies each read to the other side from
`data_received`: no HTTP, no SSE tracking, no task switch.  What it costs per event is what
the event loop and the two syscalls cost in Python; the difference to relayd is what
relayd's own layers (aiohttp's client reader and task wake-up, its chunked writer,
relayd's tracker and checks) add on top.  Usage: python bench/floor.py (about 1 minute).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import client  # noqa: E402
import procs  # noqa: E402
from client import Target  # noqa: E402


async def main() -> None:
    ps, up = procs.harness("relayd-floor-")
    rp, tp, np_ = procs.free_port(), procs.free_port(), procs.free_port()
    targets = {
        "relayd": (Target("relayd", rp, "/v1"), ps.relayd("relayd", rp, up, access_log=False).pid),
        "tcp pipe": (Target("tcp", tp, ""), ps.spawn(procs.pin(1) + [sys.executable, str(HERE / "tcppipe.py"),
                                                                     str(tp), str(up)], "tcp.log", tp).pid),
        "nginx": (Target("nginx", np_, "/v1"), ps.nginx(procs.ensure_nginx(), np_, up).pid),
    }
    try:
        for t, _ in targets.values():
            await client.streams(t, 50, 10, 20)  # warm up
        cpu: dict[str, list[float]] = {k: [] for k in targets}
        for _ in range(3):
            for name, (t, pid) in targets.items():
                c0 = procs.cpu_seconds(pid)
                run = await client.streams(t, 500, 100, 20)
                cpu[name].append((procs.cpu_seconds(pid) - c0) / run.events * 1e6)
        for name, v in cpu.items():
            print(f"{name:9s} relay CPU per event: median {sorted(v)[1]:.1f} us "
                  f"(runs {', '.join(f'{x:.1f}' for x in v)})")
    finally:
        ps.stop_all()


if __name__ == "__main__":
    asyncio.run(main())

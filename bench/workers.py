"""relayd with 1 worker vs N workers, nothing pinned: what more cores buy.

Unlike bench/run.py (relayd pinned to one core), here relayd, the load generator (this
process) and the fake upstream share every core of the machine, so on a 2-core box the
figures show what 2 workers gain *while competing with their own load*.  Each round runs
both setups, the order alternating; the median of the rounds is printed.  Every loop is
bounded by counts and timeouts.

Usage: python bench/workers.py [--rounds 3] [--workers 2] [--loop auto|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import client  # noqa: E402
import procs  # noqa: E402
from client import Target  # noqa: E402


def start_relayd(p: procs.Procs, tmp: Path, n: int, up: int, loop: str) -> tuple[Target, int]:
    port = procs.free_port()
    path = tmp / f"w{n}.yaml"
    path.write_text(procs.relayd_config(port, up, access_log=True))
    proc = p.spawn([sys.executable, "-m", "relayd", "run", "-c", str(path), "--workers", str(n),
                    "--loop", loop], f"w{n}.log", port)
    time.sleep(1.0)  # wait_port saw one worker listen; let the others finish start-up too
    return Target(f"workers={n}", port, "/v1"), proc.pid


async def measure(t: Target, pid: int) -> dict[str, float]:
    cpu0 = procs.cpu_seconds(pid)
    count, secs, lat = await client.small_json(t, 64, 20000, 4.0)
    cpu1 = procs.cpu_seconds(pid)
    run = await client.streams(t, 400, 50, 20)
    cpu2 = procs.cpu_seconds(pid)
    lat.sort()
    return {"json_rps": count / secs, "json_p99_ms": lat[int(len(lat) * 0.99)] / 1e6,
            "json_cpu_s": cpu1 - cpu0, "streams400_wall_s": run.wall,
            "streams400_cpu_s": cpu2 - cpu1}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    a = ap.parse_args()
    procs.raise_nofile()
    with tempfile.TemporaryDirectory(prefix="relayd-wbench-") as d:
        tmp = Path(d)
        p = procs.Procs(tmp)
        try:
            up = procs.free_port()
            p.spawn([sys.executable, str(procs.HERE / "upstream.py"), str(up)], "upstream.log", up)
            setups = {n: start_relayd(p, tmp, n, up, a.loop) for n in (1, a.workers)}
            for t, _ in setups.values():
                await client.streams(t, 20, 5, 1)
                await client.small_json(t, 8, 400, 5)
            rows: dict[int, list[dict[str, float]]] = {n: [] for n in setups}
            for r in range(a.rounds):
                for n in (list(setups) if r % 2 == 0 else list(setups)[::-1]):
                    rows[n].append(await measure(*setups[n]))
        finally:
            p.stop_all()
    keys = list(next(iter(rows.values()))[0])
    print(f"{'':14}" + "".join(f"{k:>20}" for k in keys))
    for n, rs in rows.items():
        print(f"workers={n:<6}" + "".join(f"{statistics.median(x[k] for x in rs):>20.2f}" for k in keys))
    print(f"(median of {a.rounds} rounds; load generator, upstream and relayd share all cores; "
          f"cpu_s = relayd's processes, main and workers)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""Where each relay's CPU goes per event: kernel vs its own code vs libraries (``perf``).

py-spy charges a system call's kernel time to the Python line that made it; ``perf record``
samples the kernel and every native library apart.  Scenario 1 (500 streams x 100 events,
20 ms apart) runs once against relayd and once against nginx (its worker process), each
recorded with ``perf record -F 999 -p PID``; the split is printed per shared object.
Needs ``perf`` (Debian: linux-perf) and root or ``kernel.perf_event_paranoid`` <= 1.
``--bulk`` records scenario 6 instead (4 connections, 200 MB, per GB), ``--symbols`` adds the
top symbols across all objects.
Usage: python bench/perfsplit.py [--bulk] [--symbols]  (about 1 minute)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import client  # noqa: E402
import procs  # noqa: E402
import run  # noqa: E402


def split(data: Path, sort: str = "dso") -> tuple[float, list[tuple[float, str]]]:
    """CPU seconds sampled and the share per shared object (or per ``sort`` key)."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort,
                          "--stdio"], capture_output=True, text=True, check=True).stdout
    seconds, rows = 0.0, []
    for line in out.splitlines():
        if line.startswith("# Event count"):
            seconds = int(line.rsplit(":", 1)[1]) / 1e9  # cpu-clock: nanoseconds
        elif line.strip() and not line.startswith("#"):
            pct, _, dso = line.strip().partition("%")
            rows.append((float(pct), dso.strip()))
    return seconds, rows


async def main(bulk: bool, symbols: bool) -> int:
    if shutil.which("perf") is None:
        print("perf is not installed (Debian: apt install linux-perf)")
        return 1
    procs.raise_nofile()
    run.pin_self()
    tmp = Path(tempfile.mkdtemp(prefix="relayd-perf-"))
    names = ("relayd", "nginx")
    ps, targets, pids = run.start(tmp, names)
    try:
        await run.Bench(run.FULL, targets, pids).warm()
        for name in names:
            pid = pids[name]
            if name == "nginx":  # the worker, not the master
                pid = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
            data = tmp / f"{name}.data"
            rec = subprocess.Popen(["perf", "record", "-q", *(["-g"] if os.environ.get("PERF_KEEP") else []), "-F", "4999" if bulk else "999", "-p", str(pid), "-o", str(data)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(0.5)
            if bulk:
                got, _secs = await client.bulk(targets[name], 4, 1_000_000_000)
                count, unit, scale = got / 1e9, "GB", 1.0
            else:
                res = await client.streams(targets[name], 500, 100, 20)
                count, unit, scale = res.events, "event", 1e6
            rec.send_signal(2)
            rec.wait(60)
            seconds, rows = split(data)
            per = seconds / count * scale
            label = "us" if scale == 1e6 else "s"
            print(f"{name}: {seconds:.2f} s sampled for {count:g} {unit}s = {per:.3f} {label}/{unit}")
            for pct, dso in rows[:6]:
                print(f"  {pct:5.1f} %  {pct * per / 100:7.3f} {label}  {dso}")
            if symbols:
                for pct, sym in split(data, "dso,sym")[1][:25]:
                    print(f"    {pct:5.1f} %  {sym}")
        return 0
    finally:
        ps.stop_all()
        if os.environ.get("PERF_KEEP"):  # the recordings (with call graphs) stay for perf report
            print(f"perf data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main("--bulk" in sys.argv, "--symbols" in sys.argv)))

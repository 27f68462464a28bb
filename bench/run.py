"""relayd vs nginx vs direct, side by side in one run. Reports medians and ratios.

Every target is measured by the same client in the same run, alternating targets per
round so that machine noise hits all of them alike. Bounded: fixed counts, and every
load loop stops by itself.  Usage: python bench/run.py [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICK = "--quick" in sys.argv
SEQ_RUNS = 10 if QUICK else 30
CONC_STREAMS, CONC_ROUNDS = (50, 2) if QUICK else (100, 3)
SMALL_REQS = 200 if QUICK else 1000
PACED_STREAMS = 100 if QUICK else 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_stream(s: aiohttp.ClientSession, url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    async with s.get(url) as r:
        async for chunk in r.content.iter_any():
            n += len(chunk)
    return time.perf_counter() - t0, n


async def main() -> int:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not nginx:
        print("nginx not found: apt-get install nginx-light (the benchmark compares against it)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="relayd-bench-"))
    up_port, ng_port, rd_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen([sys.executable, str(HERE / "upstream.py"), str(up_port)]))
        conf = (HERE / "nginx.conf.in").read_text().replace("@TMP@", str(tmp)).replace(
            "@UPSTREAM@", str(up_port)).replace("@PORT@", str(ng_port))
        (tmp / "nginx.conf").write_text(conf)
        procs.append(subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]))
        (tmp / "relayd.yaml").write_text(f"""
listen: 127.0.0.1:{rd_port}
access_log: false
upstreams:
  bench: {{url: "http://127.0.0.1:{up_port}", provider: openai, api_key: "sk-bench"}}
routes:
  - {{path: /v1, upstream: bench}}
""")
        rd = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(tmp / "relayd.yaml")],
                              stdout=subprocess.DEVNULL, cwd=ROOT)
        procs.append(rd)
        for p in (up_port, ng_port, rd_port):
            wait_port(p)
        ng_pid = int((tmp / "nginx.pid").read_text()) if (tmp / "nginx.pid").exists() else None
        ng_worker = None
        if ng_pid:
            kids = subprocess.run(["pgrep", "-P", str(ng_pid)], capture_output=True, text=True).stdout.split()
            ng_worker = int(kids[0]) if kids else None
        targets = {"direct": f"http://127.0.0.1:{up_port}", "nginx": f"http://127.0.0.1:{ng_port}/v1",
                   "relayd": f"http://127.0.0.1:{rd_port}/v1"}
        results: dict[str, dict[str, float]] = {k: {} for k in targets}
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
            # warm up every path and pool
            for base in targets.values():
                for _ in range(5):
                    await one_stream(s, base + "/stream?n=100")

            # 1. one 1,000-event stream at a time: end-to-end time
            seq: dict[str, list[float]] = {k: [] for k in targets}
            for _ in range(SEQ_RUNS):
                for name, base in targets.items():
                    dt, _ = await one_stream(s, base + "/stream?n=1000&size=200")
                    seq[name].append(dt)
            for name in targets:
                results[name]["stream_1000_median_ms"] = statistics.median(seq[name]) * 1000

            # 2. small JSON requests, one at a time: per-request latency
            lat: dict[str, list[float]] = {k: [] for k in targets}
            for _ in range(SMALL_REQS // 10):
                for name, base in targets.items():
                    for _ in range(10):
                        t0 = time.perf_counter()
                        async with s.get(base + "/json") as r:
                            await r.read()
                        lat[name].append(time.perf_counter() - t0)
            for name in targets:
                results[name]["small_json_median_us"] = statistics.median(lat[name]) * 1e6

            # 3. concurrent streams: throughput and proxy CPU per event
            for name, base in targets.items():
                pid = rd.pid if name == "relayd" else ng_worker if name == "nginx" else None
                cpu0 = cpu_seconds(pid) if pid else 0.0
                rounds = []
                for _ in range(CONC_ROUNDS):
                    t0 = time.perf_counter()
                    await asyncio.gather(*(one_stream(s, base + "/stream?n=1000&size=200")
                                           for _ in range(CONC_STREAMS)))
                    rounds.append(time.perf_counter() - t0)
                events = CONC_STREAMS * 1000
                results[name]["concurrent_events_per_s"] = events / statistics.median(rounds)
                if pid:
                    results[name]["cpu_us_per_event"] = (cpu_seconds(pid) - cpu0) / (events * CONC_ROUNDS) * 1e6
                    results[name]["rss_mb_after"] = rss_mb(pid)

            # 4. paced streams, like real generation: every event arrives in its own read,
            #    the worst case for per-event proxy cost
            for name, base in targets.items():
                pid = rd.pid if name == "relayd" else ng_worker if name == "nginx" else None
                if not pid:
                    continue
                cpu0 = cpu_seconds(pid)
                await asyncio.gather(*(one_stream(s, base + "/stream?n=200&delay_ms=10")
                                       for _ in range(PACED_STREAMS)))
                results[name]["paced_cpu_us_per_event"] = (cpu_seconds(pid) - cpu0) / (PACED_STREAMS * 200) * 1e6

        r, n, d = results["relayd"], results["nginx"], results["direct"]
        report = {
            "results": results,
            "ratios_relayd_vs_nginx": {
                "stream_1000_time": r["stream_1000_median_ms"] / n["stream_1000_median_ms"],
                "small_json_latency": r["small_json_median_us"] / n["small_json_median_us"],
                "concurrent_throughput": r["concurrent_events_per_s"] / n["concurrent_events_per_s"],
                "cpu_per_event": r["cpu_us_per_event"] / n["cpu_us_per_event"],
                "paced_cpu_per_event": r["paced_cpu_us_per_event"] / n["paced_cpu_us_per_event"],
            },
            "relayd_overhead_vs_direct_1000_event_stream_ms": r["stream_1000_median_ms"] - d["stream_1000_median_ms"],
            "nginx_overhead_vs_direct_1000_event_stream_ms": n["stream_1000_median_ms"] - d["stream_1000_median_ms"],
            "settings": {"seq_runs": SEQ_RUNS, "concurrent_streams": CONC_STREAMS, "rounds": CONC_ROUNDS,
                         "small_requests": SMALL_REQS, "paced_streams": PACED_STREAMS, "nginx_workers": 1, "relayd_processes": 1},
        }
        print(json.dumps(report, indent=2))
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

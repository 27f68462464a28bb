"""relayd vs nginx vs direct, every scenario of issue 10 in one run, one table of medians.

Relays (relayd, relayd with its access log, nginx: one process/worker each) are pinned to
core 1; this client and the fake upstream to core 0.  Each round runs every scenario on
every target, the target order rotating per round so machine noise hits all alike; the
table shows the median of the rounds.  Held-stream memory is measured once, first, on
fresh processes: a second pass would mostly reuse memory the allocator kept from the
first and read near zero.  Every loop is bounded by counts and timeouts.

Usage: python bench/run.py [--quick] [--profile streams500|json|bulk]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
import shutil
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import client  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
from client import Target  # noqa: E402

RESULTS = procs.HERE / "results"
FULL = dict(rounds=4, streams=(500, 1000), events=100, gap_ms=20, ttfb=100, lat_streams=12,
            lat_chunks=64, json_total=20000, json_s=6.0, hold=(2000, 5000), bulk_mb=200, gone=10)
QUICK = dict(rounds=4, streams=(100, 200), events=50, gap_ms=20, ttfb=30, lat_streams=2,
             lat_chunks=64, json_total=3000, json_s=2.0, hold=(500, 1000), bulk_mb=50, gone=3)
MS = 1e6  # ns per ms


class Bench:
    def __init__(self, cfg: dict[str, Any], targets: dict[str, Target], pids: dict[str, int]) -> None:
        self.cfg, self.targets, self.pids = cfg, targets, pids
        self.direct = targets["direct"]

    def cpu(self, name: str) -> float:
        return procs.cpu_seconds(self.pids[name]) if name in self.pids else 0.0

    async def warm(self) -> None:
        for t in self.targets.values():
            await client.streams(t, 20, 5, 1)
            await client.small_json(t, 8, 400, 5)

    async def hold(self, out: dict[str, dict[str, float]]) -> None:
        lo, hi = self.cfg["hold"]
        for name in ("relayd", "nginx"):
            t, pid = self.targets[name], self.pids[name]
            conns: list[client.Conn] = []
            try:
                await client.open_held(t, conns, lo)
                await asyncio.sleep(1)  # let the relay finish the work of the last batch
                rss_lo = procs.rss_kib(pid)
                await client.open_held(t, conns, hi)
                await asyncio.sleep(1)
                rss_hi = procs.rss_kib(pid)
                still = sum(1 for c in conns if not c.lost.done())
            finally:
                for c in conns:
                    c.close()
            out[name].update(s5_open=still, s5_rss_at_2000_mib=rss_lo / 1024, s5_rss_at_5000_mib=rss_hi / 1024,
                             s5_kib_per_stream=(rss_hi - rss_lo) / (hi - lo))
            print(f"  held {name}: {still}/{hi} open, RSS {rss_lo / 1024:.0f} -> {rss_hi / 1024:.0f} MiB", flush=True)
            await asyncio.sleep(2)  # the relay tears 5,000 streams down before the next one starts

    async def round(self, order: list[str]) -> dict[str, dict[str, float]]:
        c = self.cfg
        res: dict[str, dict[str, float]] = {n: {} for n in order}
        for size in c["streams"]:
            key = f"s1_{500 if size == c['streams'][0] else 1000}"
            for name in order:
                if name == "relayd+log" and size != c["streams"][0]:
                    continue
                cpu0 = self.cpu(name)
                run = await client.streams(self.targets[name], size, c["events"], c["gap_ms"])
                r = res[name]
                r[f"{key}_delay_p99_ms"] = report.pct(run.delays, 99) / MS
                r[f"{key}_ttfb_p99_ms"] = report.pct(run.ttfb, 99) / MS  # the burst's set-up
                r[f"{key}_events_per_s"] = run.events / run.wall
                if name in self.pids:
                    r[f"{key}_cpu_us_per_event"] = (self.cpu(name) - cpu0) / run.events * 1e6
        for name in order:
            if name == "relayd+log":
                continue
            run = await client.sequential(self.targets[name], c["ttfb"], 1, 0, False)
            res[name]["s2_ttfb_p50_ms"] = report.pct(run.ttfb, 50) / MS
            run = await client.sequential(self.targets[name], c["lat_streams"], c["lat_chunks"], c["gap_ms"], True)
            res[name]["s3_ttfb_p50_ms"] = report.pct(run.ttfb, 50) / MS
            res[name]["s3_gap_p99_ms"] = report.pct(run.gaps, 99) / MS
        for name in order:
            cpu0 = self.cpu(name)
            n, secs, lat = await client.small_json(self.targets[name], 64, c["json_total"], c["json_s"])
            res[name]["s4_rps"] = n / secs
            res[name]["s4_p99_ms"] = report.pct(lat, 99) / MS
            if name in self.pids:
                res[name]["s4_cpu_us_per_req"] = (self.cpu(name) - cpu0) / n * 1e6
        for name in order:
            if name == "relayd+log":
                continue
            cpu0 = self.cpu(name)
            got, secs = await client.bulk(self.targets[name], 4, c["bulk_mb"] * 1_000_000)
            res[name]["s6_mb_per_s"] = got / secs / 1e6
            if name in self.pids:
                res[name]["s6_cpu_s_per_gb"] = (self.cpu(name) - cpu0) / (got / 1e9)
            gone = await client.client_gone(self.targets[name], self.direct, c["gone"], f"{name}-{time.time_ns()}")
            res[name]["s7_gone_p50_ms"] = report.pct(gone, 50) / MS
            res[name]["s7_gone_max_ms"] = max(gone) / MS
        d = res["direct"]
        for name, r in res.items():
            for k in ("s1_500_delay_p99_ms", "s1_1000_delay_p99_ms", "s3_gap_p99_ms"):
                if k in r and k in d:
                    r[k.replace("_delay", "_added_delay").replace("s3_gap", "s3_added_gap")] = r[k] - d[k]
            for k, added in (("s2_ttfb_p50_ms", "s2_added_ttfb_p50_ms"), ("s3_ttfb_p50_ms", "s3_added_ttfb_p50_ms")):
                if k in r:
                    r[added] = r[k] - d[k]
        return res


def start(tmp: Path, names: tuple[str, ...]) -> tuple[procs.Procs, dict[str, Target], dict[str, int]]:
    ps = procs.Procs(tmp)
    up = procs.free_port()
    ps.upstream(up)
    targets = {"direct": Target("direct", up, "")}
    pids: dict[str, int] = {}
    for name in names:
        port = procs.free_port()
        if name == "nginx":
            p = ps.nginx(procs.ensure_nginx(), port, up)
        else:
            p = ps.relayd(name.replace("+", "-"), port, up, access_log=name.endswith("+log"))
        targets[name], pids[name] = Target(name, port, "/v1"), p.pid
    return ps, targets, pids


def pin_self() -> None:
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})


async def bench(cfg: dict[str, Any], quick: bool) -> int:
    t_start = time.monotonic()
    nofile = procs.raise_nofile()
    pin_self()
    tmp = Path(tempfile.mkdtemp(prefix="relayd-bench-"))
    ps, targets, pids = start(tmp, ("relayd", "relayd+log", "nginx"))
    try:
        b = Bench(cfg, targets, pids)
        await b.warm()
        held: dict[str, dict[str, float]] = {n: {} for n in report.TARGETS}
        print(f"bench: held streams ({cfg['hold'][1]}) on relayd and nginx", flush=True)
        await b.hold(held)
        rounds = []
        names = list(report.TARGETS)
        for i in range(cfg["rounds"]):
            order = names[i % len(names):] + names[:i % len(names)]
            print(f"bench: round {i + 1}/{cfg['rounds']} ({', '.join(order)})", flush=True)
            rounds.append(await b.round(order))
        med = report.median_of_rounds(rounds)
        for name, figures in held.items():
            med[name].update(figures)
        report.add_log_cost(med)
        rows = report.table(med, rounds)
        elapsed = time.monotonic() - t_start
        notes = notes_for(cfg, quick, nofile, elapsed)
        meta = {"settings": cfg, "quick": quick, "elapsed_s": elapsed, "python": platform.python_version(),
                "nginx": subprocess.run([procs.ensure_nginx(), "-v"], capture_output=True, text=True).stderr.strip(),
                "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=procs.ROOT,
                                         capture_output=True, text=True).stdout.strip(),
                "cpus": os.cpu_count(), "kernel": platform.release()}
        stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if quick else "")
        js, md = report.write(RESULTS, stamp, med, rounds, meta, rows, notes)
        print()
        print(report.text_table(rows))
        print()
        for n in notes:
            print(f"- {n}")
        print(f"\nwrote {js.relative_to(procs.ROOT)} and {md.relative_to(procs.ROOT)} ({elapsed:.0f} s)")
        return 0
    finally:
        ps.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def notes_for(cfg: dict[str, Any], quick: bool, nofile: int, elapsed: float) -> list[str]:
    s = cfg["streams"]
    return [
        f"{'QUICK smoke run (counts shrunk); ' if quick else ''}median of {cfg['rounds']} rounds, target order "
        f"rotating per round; run took {elapsed:.0f} s",
        "relays pinned to core 1 (taskset -c 1), client and fake upstream to core 0; relayd 1 process"
        " (workers: 1), nginx 1 worker; access log off except relayd+log",
        f"1: {s[0]} and {s[1]} concurrent streams x {cfg['events']} events {cfg['gap_ms']} ms apart; delay = "
        "client receive time - upstream send stamp (same CLOCK_MONOTONIC); each stream ticks at a random phase "
        "within the gap; first byte p99 = the burst's set-up; CPU from the processes' CPU clocks (ns)",
        f"2: {cfg['ttfb']} sequential 1-event streams on one keep-alive connection; TTFB = request write to "
        "first body byte",
        f"3: {cfg['lat_streams']} sequential streams per round x {cfg['lat_chunks']} chunks {cfg['gap_ms']} ms apart",
        f"4: 64 keep-alive clients, POST JSON, {cfg['json_total']} requests or {cfg['json_s']} s per run",
        f"5: {cfg['hold'][0]} then {cfg['hold'][1]} held streams, measured once on fresh processes "
        f"(not a median); memory = the relay's RSS plus its child processes' private pages; RLIMIT_NOFILE {nofile}",
        f"6: 4 connections x {cfg['bulk_mb'] // 4} MB, application/octet-stream, 256 KiB chunks; nginx "
        "proxy_buffer_size 64k (the issue's '64 KiB buffers')",
        f"7: {cfg['gone']} samples per round: client closes after the first event; time until the upstream's "
        "connection_lost",
        f"ratio relayd/nginx left out ('-') where nginx's added figure is under {report.ADDED_FLOOR_MS} ms "
        "(within noise of direct)",
        "8: relayd+log = relayd with access_log: true, log to a file; cost = CPU relayd+log / relayd - 1",
    ]


async def profile(cfg: dict[str, Any], scenario: str) -> int:
    """One scenario against relayd under py-spy; writes the top frames to results/."""
    procs.raise_nofile()
    pin_self()
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True, timeout=300)
    tmp = Path(tempfile.mkdtemp(prefix="relayd-profile-"))
    ps, targets, pids = start(tmp, ("relayd",))
    raw = tmp / "raw.txt"
    try:
        b = Bench(cfg, targets, pids)
        await b.warm()
        rec = subprocess.Popen(procs.pin(0) + [str(spy), "record", "--pid", str(pids["relayd"]), "--format", "raw",
                                               "--rate", "250", "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await asyncio.sleep(1)
        t = targets["relayd"]
        for _ in range(2):
            if scenario == "streams500":
                await client.streams(t, cfg["streams"][0], cfg["events"], cfg["gap_ms"])
            elif scenario == "bulk":
                await client.bulk(t, 4, 5 * cfg["bulk_mb"] * 1_000_000)
            else:
                await client.small_json(t, 64, cfg["json_total"], cfg["json_s"])
        rec.send_signal(2)
        _, err = rec.communicate(timeout=60)
        if not raw.exists():
            print(err.decode(errors="replace"))
            return 1
        import pyspy_top
        out = RESULTS / f"profile-{scenario}.txt"
        RESULTS.mkdir(exist_ok=True)
        out.write_text(f"py-spy record --rate 250 on relayd, scenario {scenario}\n\n" + pyspy_top.summary(raw.read_text(), 25))
        print(out.read_text())
        return 0
    finally:
        ps.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shrunk counts: a smoke run of a minute or two")
    ap.add_argument("--profile", choices=("streams500", "json", "bulk"), help="py-spy one scenario on relayd instead")
    a = ap.parse_args()
    cfg = QUICK if a.quick else FULL
    if a.profile:
        return asyncio.run(profile(cfg, a.profile))
    try:  # the load generator on uvloop too: at 1,000 streams it must keep its schedule
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(bench(cfg, a.quick))


if __name__ == "__main__":
    sys.exit(main())

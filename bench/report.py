"""Turn per-round figures into the one table: medians of the rounds, ratio relayd/nginx.

Kept apart from the runner so the table format (terminal, Markdown, JSON) is one thing.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

ADDED_FLOOR_MS = 0.1
TARGETS = ("relayd", "relayd+log", "nginx", "direct")

# (key, label, unit) in table order; a figure missing for a target prints as "-".
ROWS: list[tuple[str, str, str]] = [
    ("s1_500_cpu_us_per_event", "1. 500 streams: relay CPU per event", "us"),
    ("s1_500_delay_p99_ms", "1. 500 streams: per-event delay p99", "ms"),
    ("s1_500_added_delay_p99_ms", "1. 500 streams: added per-event delay p99 vs direct", "ms"),
    ("s1_500_events_per_s", "1. 500 streams: events delivered per second", "ev/s"),
    ("s1_500_ttfb_p99_ms", "1. 500 streams: first byte p99 (500 set-ups at once)", "ms"),
    ("s1_1000_cpu_us_per_event", "1. 1000 streams: relay CPU per event", "us"),
    ("s1_1000_delay_p99_ms", "1. 1000 streams: per-event delay p99", "ms"),
    ("s1_1000_added_delay_p99_ms", "1. 1000 streams: added per-event delay p99 vs direct", "ms"),
    ("s1_1000_events_per_s", "1. 1000 streams: events delivered per second", "ev/s"),
    ("s1_1000_ttfb_p99_ms", "1. 1000 streams: first byte p99", "ms"),
    ("s2_ttfb_p50_ms", "2. TTFB p50 (first body byte)", "ms"),
    ("s2_added_ttfb_p50_ms", "2. added TTFB p50 vs direct", "ms"),
    ("s3_added_ttfb_p50_ms", "3. latency-only: added TTFB p50 vs direct", "ms"),
    ("s3_gap_p99_ms", "3. latency-only: inter-chunk gap p99 (nominal 20)", "ms"),
    ("s3_added_gap_p99_ms", "3. latency-only: added inter-chunk gap p99 vs direct", "ms"),
    ("s4_rps", "4. small JSON, 64 keep-alive clients: requests/s", "req/s"),
    ("s4_cpu_us_per_req", "4. small JSON: relay CPU per request", "us"),
    ("s4_p99_ms", "4. small JSON: latency p99", "ms"),
    ("s5_open", "5. held streams open at the end (of target)", "streams"),
    ("s5_rss_at_2000_mib", "5. relay memory with 2,000 held streams", "MiB"),
    ("s5_rss_at_5000_mib", "5. relay memory with 5,000 held streams", "MiB"),
    ("s5_kib_per_stream", "5. marginal memory per held stream (2,000->5,000)", "KiB"),
    ("s6_mb_per_s", "6. bulk 4 conns: throughput", "MB/s"),
    ("s6_cpu_s_per_gb", "6. bulk: relay CPU per GB", "s/GB"),
    ("s7_gone_p50_ms", "7. client gone -> upstream closed, p50", "ms"),
    ("s7_gone_max_ms", "7. client gone -> upstream closed, max", "ms"),
    ("s8_log_cost_per_event_pct", "8. access log on: CPU per event vs off (500 streams)", "%"),
    ("s8_log_cost_per_req_pct", "8. access log on: CPU per request vs off (small JSON)", "%"),
]


def pct(values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def median_of_rounds(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{target: {key: median over the rounds that measured it}}."""
    out: dict[str, dict[str, float]] = {}
    for t in TARGETS:
        keys = {k for r in rounds for k in r.get(t, {})}
        out[t] = {k: statistics.median([r[t][k] for r in rounds if k in r.get(t, {})]) for k in keys}
    return out


def add_log_cost(med: dict[str, dict[str, float]]) -> None:
    """Scenario 8: relayd+log against relayd on the same figures."""
    on, off = med.get("relayd+log", {}), med.get("relayd", {})
    for key, src in (("s8_log_cost_per_event_pct", "s1_500_cpu_us_per_event"),
                     ("s8_log_cost_per_req_pct", "s4_cpu_us_per_req")):
        if src in on and off.get(src):
            on[key] = (on[src] / off[src] - 1) * 100


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(med: dict[str, dict[str, float]],
          rounds: list[dict[str, dict[str, float]]] | None = None) -> list[list[str]]:
    rows = []
    for key, label, unit in ROWS:
        vals = [med.get(t, {}).get(key) for t in TARGETS]
        r, n = med.get("relayd", {}).get(key), med.get("nginx", {}).get(key)
        # An "added" figure of nginx within noise of zero makes a ratio meaningless.
        floor = ADDED_FLOOR_MS if "added" in key else 0.0
        ratio = f"{r / n:.2f}" if r is not None and n is not None and n > floor else "-"
        rows.append([f"{label} [{unit}]"] + [fmt(v) for v in vals] + [ratio, spread(rounds or [], key, floor)])
    return rows


def spread(rounds: list[dict[str, dict[str, float]]], key: str, floor: float) -> str:
    """The relayd/nginx ratio of each round (the two measured minutes apart in one round),
    lowest to highest: how far one round's verdict can move (review 73)."""
    ratios = [r["relayd"][key] / r["nginx"][key] for r in rounds
              if key in r.get("relayd", {}) and r.get("nginx", {}).get(key, 0.0) > floor]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "-"


HEAD = ["metric", *TARGETS, "relayd/nginx", "per round"]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEAD] + rows) for i in range(len(HEAD))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(HEAD), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown(rows: list[list[str]], notes: list[str]) -> str:
    out = ["| " + " | ".join(HEAD) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEAD) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out + [""] + [f"- {n}" for n in notes]) + "\n"


def write(results: Path, stamp: str, med: dict[str, Any], rounds: list[Any], meta: dict[str, Any],
          rows: list[list[str]], notes: list[str]) -> tuple[Path, Path]:
    results.mkdir(exist_ok=True)
    js, md = results / f"bench-{stamp}.json", results / f"bench-{stamp}.md"
    js.write_text(json.dumps({"meta": meta, "median": med, "rounds": rounds,
                              "table": {"head": HEAD, "rows": rows}, "notes": notes}, indent=2))
    md.write_text(f"# relayd bench {stamp}\n\n" + markdown(rows, notes))
    for name, path in (("latest.json", js), ("latest.md", md)):
        (results / name).write_text(path.read_text())
    return js, md

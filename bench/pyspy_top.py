"""Summarise `py-spy record --format raw` output: the top functions by self and total samples.

Raw lines are ``frame;frame;...;leaf COUNT`` (root first).  Frames are grouped by
function (line numbers dropped) so one hot function is one row, not one row per line.
Usage: python bench/pyspy_top.py RAW.txt [N]
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_LINE = re.compile(r":\d+\)$")


def summary(raw: str, n: int = 25) -> str:
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        samples += k
        self_c[frames[-1]] += k
        for f in set(frames):
            total_c[f] += k
    out = [f"{samples} samples\n", f"top {n} by self (the function itself was on CPU)"]
    out += [f"{c / samples * 100:6.1f}%  {f}" for f, c in self_c.most_common(n)]
    out += ["", f"top {n} by total (the function or what it called)"]
    out += [f"{c / samples * 100:6.1f}%  {f}" for f, c in total_c.most_common(n)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(summary(fh.read(), int(sys.argv[2]) if len(sys.argv) > 2 else 25))

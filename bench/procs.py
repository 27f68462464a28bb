"""The processes under test: start, pin, measure (CPU, RSS) and stop them.

Only processes started here are ever signalled, by the PID Popen gave us.  CPU and RSS
are summed over the process tree so a relay that forks workers (nginx's master/worker,
relayd's supervisor/workers) is charged for all of them.  relayd runs ``workers: 1`` here,
like nginx's one worker, both pinned to one core.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOFILE = 65536


def pin(core: int) -> list[str]:
    """`taskset -c CORE` when the machine has the cores and the tool, else nothing."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(core)]
    return []


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE for us and every child (5,000 held streams need ~10,000 fds in a relay)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def ensure_nginx() -> str:
    """nginx is the reference; install it (Debian package) when it is missing."""
    found = find_nginx()
    if found:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update"], env=env, timeout=300, capture_output=True)
        for pkg in ("nginx-light", "nginx"):
            print(f"bench: installing {pkg} (apt-get)", flush=True)
            r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", pkg], env=env,
                               timeout=300, capture_output=True, text=True)
            if r.returncode == 0 and find_nginx():
                return find_nginx()  # type: ignore[return-value]
    raise SystemExit("bench: nginx is not installed and apt-get could not install it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def tree(pid: int) -> list[int]:
    """pid and its descendants (via /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of the tree (every thread of every process), in nanoseconds' resolution.

    Each process's CPU clock (``clock_gettime`` on ``MAKE_PROCESS_CPUCLOCK(pid,
    CPUCLOCK_SCHED)``); /proc/PID/stat counts in 10 ms ticks, which made a bulk run's CPU
    per GB a multiple of 0.05 s (review 73).  /proc/PID/stat where the clock is refused."""
    total = 0.0
    for p in tree(pid):
        try:
            total += time.clock_gettime(((~p) << 3) | 2)
            continue
        except OSError:
            pass
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_kib(pid: int) -> int:
    """Memory of the tree, each page once: the root's RSS plus its descendants' private
    pages (nginx's worker shares most of its pages with its master).  Not PSS: that also
    splits pages the relay shares with processes outside its tree (the bench's other Python
    processes), which understated relayd by about 10 MB and moved with them (review 75)."""
    total = 0
    for i, p in enumerate(tree(pid)):
        fields = ("Rss:",) if i == 0 else ("Private_Clean:", "Private_Dirty:")
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith(fields):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Procs:
    """Every process the bench started, stopped in reverse order on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], log: str, port: int) -> subprocess.Popen:
        with open(self.tmp / log, "wb") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started.append(p)
        wait_port(port, p)
        return p

    def upstream(self, port: int) -> subprocess.Popen:
        return self.spawn(pin(0) + [sys.executable, str(HERE / "upstream.py"), str(port)],
                          "upstream.log", port)

    def nginx(self, binary: str, port: int, up_port: int) -> subprocess.Popen:
        conf = (HERE / "nginx.conf.in").read_text()
        for k, v in {"@TMP@": str(self.tmp), "@UPSTREAM@": str(up_port), "@PORT@": str(port)}.items():
            conf = conf.replace(k, v)
        (self.tmp / "nginx.conf").write_text(conf)
        return self.spawn(pin(1) + [binary, "-c", str(self.tmp / "nginx.conf"), "-p", str(self.tmp)],
                          "nginx.log", port)

    def relayd(self, name: str, port: int, up_port: int, access_log: bool) -> subprocess.Popen:
        path = self.tmp / f"{name}.yaml"
        path.write_text("workers: 1\n" + relayd_config(port, up_port, access_log))
        return self.spawn(pin(1) + [sys.executable, "-m", "relayd", "run", "-c", str(path)],
                          f"{name}.log", port)

    def stop_all(self) -> None:
        for p in reversed(self.started):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.started):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def relayd_config(port: int, up_port: int, access_log: bool) -> str:
    """A config that caps nothing: pool 100,000, no idle/total limits, short drain."""
    return f"""listen: 127.0.0.1:{port}
access_log: {str(access_log).lower()}
log_level: info
shutdown_grace: 2
defaults:
  timeouts: {{connect: 10, first_byte: 600, idle: 0, total: 0}}
upstreams:
  bench:
    url: http://127.0.0.1:{up_port}
    provider: openai
    api_key: sk-bench-not-a-secret
    max_connections: 100000
    keepalive: 600  # nginx's keepalive_timeout for the upstream (review 73: 60 s emptied the pool between rounds)
routes:
  - {{path: /v1, upstream: bench}}
"""


def harness(prefix: str) -> tuple["Procs", int]:
    """A side harness's start, as ``run.py`` does it: descriptors raised, this process (the
    load) on core 0, a fresh fake upstream.  Returns the process set and the upstream's port."""
    raise_nofile()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})
    ps = Procs(Path(tempfile.mkdtemp(prefix=prefix)))
    up = free_port()
    ps.upstream(up)
    return ps, up

"""Shared fixtures: a fake provider in a thread, relayd as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from fakes import FakeProvider, free_port

ROOT = Path(__file__).resolve().parent.parent


class Relayd:
    """A running `relayd run` subprocess and what it printed."""

    def __init__(self, tmp: Path, config_text: str, env: dict[str, str] | None = None,
                 name: str = "relayd.yaml", args: list[str] | None = None) -> None:
        self.tmp = tmp
        self.args = list(args or [])
        self.config = tmp / name
        self.config.write_text(config_text)
        self.log_path = tmp / f"{name}.log"
        self.err_path = tmp / f"{name}.err"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> "Relayd":
        self._out = open(self.log_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(self.config),
                                      *self.args],
                                     stdout=self._out, stderr=self._err, env=self.env, cwd=ROOT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(l.get("event") == "ready" for l in self.logs()):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"relayd exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        raise RuntimeError("relayd did not become ready: " + self.stderr())

    def logs(self) -> list[dict[str, Any]]:
        out = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            priority = None
            if line[:1] == "<" and line[2:4] == ">{":  # journald's "<N>" (JOURNAL_STREAM set)
                priority, line = int(line[1]), line[3:]
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
            if priority is not None:
                out[-1]["_priority"] = priority
        return out

    def access(self) -> list[dict[str, Any]]:
        return [l for l in self.logs() if l.get("event") == "access"]

    def wait_access(self, n: int = 1, where: Callable[[dict[str, Any]], bool] | None = None,
                    timeout: float = 5) -> list[dict[str, Any]]:
        """Access lines (those matching `where`, if given), once there are n of them.

        relayd writes the access line after the last byte went out, so a client can
        finish reading before the line exists: tests wait for the line they mean
        instead of taking whatever line happens to be last.
        """
        end = time.monotonic() + timeout
        while True:
            a = [l for l in self.access() if where is None or where(l)]
            if len(a) >= n or time.monotonic() >= end:
                return a
            time.sleep(0.02)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self._err.close()
        return self.proc.returncode


def wait_port(port: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening")


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    f = FakeProvider().start()
    yield f
    f.stop()


@pytest.fixture
def make_relayd(tmp_path: Path) -> Iterator[Any]:
    started: list[Relayd] = []

    def make(config_text: str, env: dict[str, str] | None = None, start: bool = True,
             name: str = "relayd.yaml", args: list[str] | None = None) -> Relayd:
        r = Relayd(tmp_path, config_text, env, name, args)
        started.append(r)
        return r.start() if start else r

    yield make
    for r in started:
        r.stop()


def basic_config(fake_url: str, port: int, admin: int | None = None, extra_upstreams: str = "",
                 extra_routes: str = "", defaults: str = "", top: str = "") -> str:
    """Routes for every provider against the fake, with keys set, plus /nokey routes."""
    return f"""
listen: 127.0.0.1:{port}
{f'admin_listen: 127.0.0.1:{admin}' if admin else ''}
shutdown_grace: 5
{top}
defaults:
  timeouts: {{connect: 2, first_byte: 5, idle: 5, total: 60}}
  heartbeat: 0
{defaults}
upstreams:
  openai: {{url: "{fake_url}/oai", provider: openai, api_key: "sk-test-openai-KEY1"}}
  anthropic: {{url: "{fake_url}", provider: anthropic, api_key: "sk-ant-test-KEY2"}}
  gemini: {{url: "{fake_url}/", provider: gemini, api_key: "gem-test-KEY3"}}
  azure: {{url: "{fake_url}/openai/deployments/d1", provider: azure, api_key: "az-test-KEY4"}}
  generic: {{url: "{fake_url}", provider: generic}}
  nokey: {{url: "{fake_url}", provider: openai}}
{extra_upstreams}
routes:
  - {{path: /openai, upstream: openai}}
  - {{path: /anthropic, upstream: anthropic}}
  - {{path: /gemini, upstream: gemini}}
  - {{path: /azure, upstream: azure}}
  - {{path: /local, upstream: generic}}
  - {{path: /nokey, upstream: nokey}}
  - {{path: /keep, upstream: generic, strip_prefix: false}}
{extra_routes}
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider) -> Iterator[Relayd]:
    """One relayd for a whole module, for tests that need no special config."""
    tmp = tmp_path_factory.mktemp("relayd")
    port, admin = free_port(), free_port()
    r = Relayd(tmp, basic_config(fake.url, port, admin))
    r.port, r.admin = port, admin  # type: ignore[attr-defined]
    r.start()
    yield r
    r.stop()

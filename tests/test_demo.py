"""`make demo`: the bundled fake provider behind a real relayd, read with the official SDKs.

The demo is started the way the Makefile starts it (``python -m relayd.demo --config
config/demo.yaml`` from the repository root), on free ports passed through the
environment.  What matters to a person watching: the tokens arrive one by one (the
timestamps are spread, not bunched at the end), the text is what the provider sent, and
Ctrl-C stops relayd and the provider, letting a stream in flight finish first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import anthropic
import openai
import pytest

from fakes import free_port
from relayd import demo

ROOT = Path(__file__).resolve().parent.parent
DELAY = float(demo.DEFAULTS["RELAYD_DEMO_DELAY"])


def end_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Ask a process this test started to stop with sig; kill it if it has not within timeout."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.port, self.admin, self.provider = free_port(), free_port(), free_port()
        env = {**os.environ, "RELAYD_DEMO_PORT": str(self.port), "RELAYD_DEMO_ADMIN_PORT": str(self.admin),
               "RELAYD_DEMO_PROVIDER_PORT": str(self.provider)}
        env.pop("RELAYD_DEMO_DELAY", None)  # the pacing a person would see
        self.out = tmp / "demo.out"
        self._f = open(self.out, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "relayd.demo", "--config", "config/demo.yaml"],
                                     cwd=ROOT, env=env, stdout=self._f, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"demo exited {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < end, f"demo never printed {needle!r}:\n{self.text()}"
            time.sleep(0.05)

    def relayd_pid(self, timeout: float = 20) -> int:
        # The demo announces itself once relayd's port accepts; relayd logs "ready" once
        # its workers serve, which under load can come a little later.
        end = time.monotonic() + timeout
        while True:
            for line in self.text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "ready":
                    return int(json.loads(line)["pid"])
            assert time.monotonic() < end, "no ready line from relayd:\n" + self.text()
            time.sleep(0.05)

    def close(self) -> None:
        end_process(self.proc, signal.SIGINT, 20)
        self._f.close()


def started(tmp: Path) -> Iterator[Demo]:
    d = Demo(tmp)
    try:
        d.wait_for("Ctrl-C stops relayd and the provider.")
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One demo for the tests that only read streams from it."""
    yield from started(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def own(tmp_path: Path) -> Iterator[Demo]:
    """A demo of the test's own, for the test that stops it."""
    yield from started(tmp_path)


def assert_paced(stamps: list[float], n: int) -> None:
    """Arrived one by one: spread over most of the provider's pacing, few bunched together."""
    assert len(stamps) == n
    span = stamps[-1] - stamps[0]
    assert span >= 0.6 * (n - 1) * DELAY, f"{n} tokens arrived within {span:.3f}s: buffered somewhere"
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    spaced = sum(1 for g in gaps if g >= DELAY / 2)
    assert spaced >= len(gaps) * 0.7, f"gaps {[round(g, 3) for g in gaps]}"


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def test_openai_sdk_stream_arrives_token_by_token(running: Demo) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{running.port}/openai/v1", api_key="anything",
                           max_retries=0)
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True})
    parts: list[str] = []
    stamps: list[float] = []
    usage: Any = None
    finish = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            if choice.delta.content:
                parts.append(choice.delta.content)
                stamps.append(time.monotonic())
    assert "".join(parts) == demo.TEXT
    assert parts == demo.tokens()
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == len(demo.tokens())
    assert_paced(stamps, len(demo.tokens()))


def test_anthropic_sdk_stream_arrives_token_by_token(running: Demo) -> None:
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{running.port}/anthropic", api_key="anything",
                                 max_retries=0)
    types: list[str] = []
    parts: list[str] = []
    stamps: list[float] = []
    with client.messages.stream(model="demo", max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "content_block_delta":
                parts.append(event.delta.text)
                stamps.append(time.monotonic())
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "".join(parts) == demo.TEXT
    assert final.content[0].text == demo.TEXT and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(demo.tokens())
    assert_paced(stamps, len(demo.tokens()))


def printed(d: Demo, start: str) -> list[str]:
    return [l.strip() for l in d.text().splitlines() if l.startswith("  " + start)]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_printed_curl_commands_stream(running: Demo) -> None:
    commands = printed(running, "curl -N ")
    assert len(commands) == 2, running.text()
    for command, end in zip(commands, ("data: [DONE]", "event: message_stop")):
        r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert end in r.stdout, r.stdout
        assert r.stdout.count('"relayd"') == 1 and '"usage"' in r.stdout  # first token; usage at the end


def test_printed_sdk_one_liner_prints_the_answer(running: Demo) -> None:
    [command] = printed(running, "python -c ")
    code = command.removeprefix("python -c ").strip('"')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == demo.TEXT + "\n"


def test_ctrl_c_lets_the_stream_in_flight_finish_then_stops_both(own: Demo) -> None:
    running = own
    pid = running.relayd_pid()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{running.port}/openai/v1", api_key="x", max_retries=0)
    first = threading.Event()
    got: list[str] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for chunk in client.chat.completions.create(model="demo", stream=True,
                                                        messages=[{"role": "user", "content": "hi"}]):
                for choice in chunk.choices:
                    if choice.delta.content:
                        got.append(choice.delta.content)
                        first.set()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(10), "no token arrived"
    running.proc.send_signal(signal.SIGINT)  # what Ctrl-C in `make demo` sends
    reader.join(20)
    assert not reader.is_alive() and not errors, errors
    assert "".join(got) == demo.TEXT  # drained: the provider stayed up until relayd was done
    assert running.proc.wait(20) == 0, running.text()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not listening(running.port) and not listening(running.provider)


def test_demo_without_config_says_so(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "relayd.demo", "--config", str(tmp_path / "nope.yaml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "nope.yaml: no such file" in r.stderr and "Traceback" not in r.stderr


def test_relayd_does_not_outlive_a_killed_demo(own: Demo) -> None:
    pid = own.relayd_pid()
    own.proc.kill()
    own.proc.wait(10)
    end = time.monotonic() + 15
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"relayd {pid} still ran after its demo was killed")

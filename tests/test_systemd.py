"""The shipped unit files: systemd-analyze verify, offline security exposure, required directives."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["relayd.service", "relayd-reload.path", "relayd-reload.service"]

analyze = shutil.which("systemd-analyze")
if analyze is None and not os.environ.get("CI"):
    pytest.skip("systemd-analyze not installed (.ci/run installs it)", allow_module_level=True)


@pytest.fixture
def units(tmp_path: Path) -> Path:
    relayd_bin = Path(sys.executable).parent / "relayd"
    assert relayd_bin.exists(), "relayd console script not installed"
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text().replace("/opt/relayd/venv/bin/relayd", str(relayd_bin))
        (tmp_path / name).write_text(text)
    return tmp_path


def test_units_verify(units):
    r = subprocess.run([analyze, "verify", *UNITS], cwd=units, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "relayd" not in r.stderr, r.stderr  # no warnings about our units


def test_security_exposure_at_most_2(units):
    r = subprocess.run([analyze, "security", "--offline=true", "relayd.service"], cwd=units,
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for relayd\.service: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_required_directives():
    text = (ROOT / "systemd" / "relayd.service").read_text()
    for directive in ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "ExecStartPre=/opt/relayd/venv/bin/relayd check",
                      "EnvironmentFile=-/etc/relayd/relayd.env", "DynamicUser=yes", "LimitNOFILE=65536",
                      "Restart=on-failure", "WatchdogSec=", "ProtectSystem=strict", "ProtectHome=yes",
                      "PrivateTmp=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                      "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service"]:
        assert directive in text, directive
    stop = int(re.search(r"TimeoutStopSec=(\d+)", text).group(1))
    assert stop > 30  # above the default shutdown_grace
    # the credentials example: commented out (no credential files exist until the operator makes them)
    assert "#LoadCredential=openai_api_key:/etc/relayd/credentials/openai_api_key" in text
    assert "api_key_credential: openai_api_key" in text
    path = (ROOT / "systemd" / "relayd-reload.path").read_text()
    assert "PathChanged=/etc/relayd/relayd.yaml" in path

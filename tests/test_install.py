"""`make install` / `make uninstall` into a staged root (DESTDIR), as an operator would run them.

One install and one re-install per session (a venv plus dependencies takes ~20-40 s): the
module fixture installs, the tests look at what it left, the re-install test checks that
an upgrade replaces the package in place and never touches the operator's files under
/etc/relayd, and the last test uninstalls.  A PREFIX other than the default proves the
unit's paths follow PREFIX.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import relayd

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/srv/relayd"
UNITS = ["relayd.service", "relayd-reload.path", "relayd-reload.service"]

pytestmark = pytest.mark.timeout(600)
analyze = shutil.which("systemd-analyze")


@dataclass
class Staged:
    destdir: Path
    output: str
    seconds: float

    @property
    def prefix(self) -> Path:
        return self.destdir / PREFIX.lstrip("/")

    @property
    def etc(self) -> Path:
        return self.destdir / "etc" / "relayd"

    @property
    def unitdir(self) -> Path:
        return self.destdir / "etc" / "systemd" / "system"

    @property
    def relayd(self) -> Path:
        return self.prefix / "venv" / "bin" / "relayd"


def make(target: str, destdir: Path) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    start = time.monotonic()
    r = subprocess.run(["make", "-C", str(ROOT), target, f"PREFIX={PREFIX}", f"DESTDIR={destdir}"],
                       capture_output=True, text=True, env=env, timeout=500)
    assert r.returncode == 0, f"make {target} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr, time.monotonic() - start


def relayd_user() -> bool:
    try:
        pwd.getpwnam("relayd")
        return True
    except KeyError:
        return False


USER_BEFORE = relayd_user()


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Staged:
    destdir = tmp_path_factory.mktemp("install") / "root"
    out, seconds = make("install", destdir)
    print(f"make install took {seconds:.1f}s")
    return Staged(destdir, out, seconds)


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd outside the checkout, so the venv's own copy of relayd is the one imported
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=60)


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_files_and_modes(staged: Staged) -> None:
    assert staged.relayd.is_file() and os.access(staged.relayd, os.X_OK)
    assert (staged.prefix / "README.md").read_text() == (ROOT / "README.md").read_text()
    assert staged.etc.is_dir() and mode(staged.etc) == 0o755
    assert (staged.etc / "relayd.yaml").read_text() == (ROOT / "config" / "relayd.yaml").read_text()
    assert mode(staged.etc / "relayd.yaml") == 0o644  # no secrets in it; the service user reads it
    assert (staged.etc / "relayd.env").read_text() == (ROOT / "systemd" / "relayd.env").read_text()
    assert mode(staged.etc / "relayd.env") == 0o600
    assert (staged.etc / "credentials").is_dir() and mode(staged.etc / "credentials") == 0o700
    assert list((staged.etc / "credentials").iterdir()) == []
    for name in UNITS:
        unit = staged.unitdir / name
        assert mode(unit) == 0o644
        assert "/opt/relayd" not in unit.read_text(), name  # every path follows PREFIX
    service = (staged.unitdir / "relayd.service").read_text()
    assert f"ExecStart={PREFIX}/venv/bin/relayd run -c /etc/relayd/relayd.yaml\n" in service
    assert f"ExecStartPre={PREFIX}/venv/bin/relayd check -c /etc/relayd/relayd.yaml\n" in service
    assert f"file:{PREFIX}/README.md" in service
    assert relayd_user() == USER_BEFORE  # DESTDIR set: no system user created
    assert f"installed relayd {relayd.__version__}" in staged.output


def test_installed_relayd_runs_version_and_check(staged: Staged, tmp_path: Path) -> None:
    r = run(staged.relayd, "--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"relayd {relayd.__version__}", r
    r = run(staged.prefix / "venv" / "bin" / "python", "-c", "import relayd; print(relayd.__file__)", cwd=tmp_path)
    assert r.stdout.startswith(str(staged.prefix / "venv")), r  # the installed copy, not the checkout
    r = run(staged.relayd, "check", "-c", staged.etc / "relayd.yaml", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("ok: 4 routes, 4 upstreams"), r


def rebased_units(staged: Staged, into: Path) -> Path:
    """The installed units with PREFIX moved under DESTDIR, where the venv really is.

    systemd-analyze verify checks that ExecStart= is executable; --root would also look
    for systemd's own units (sysinit.target) and /bin/kill under the staged root.
    """
    for name in UNITS:
        text = (staged.unitdir / name).read_text().replace(f"{PREFIX}/", f"{staged.prefix}/")
        (into / name).write_text(text)
    return into


@pytest.mark.skipif(analyze is None and not os.environ.get("CI"),
                    reason="systemd-analyze not installed (.ci/run installs it)")
def test_installed_units_verify(staged: Staged, tmp_path: Path) -> None:
    assert analyze is not None
    units = rebased_units(staged, tmp_path)
    r = subprocess.run([analyze, "verify", *UNITS], cwd=units, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "relayd" not in r.stderr, r.stderr
    r = subprocess.run([analyze, "security", "--offline=true", "relayd.service"], cwd=units,
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for relayd\.service: ([\d.]+)", r.stdout + r.stderr)
    assert m and float(m.group(1)) <= 2.0, r.stdout + r.stderr


def test_second_install_upgrades_in_place_and_keeps_operator_files(staged: Staged, tmp_path: Path) -> None:
    config = staged.etc / "relayd.yaml"
    edited = config.read_text().replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:8181") + "# mine\n"
    config.write_text(edited)
    env = staged.etc / "relayd.env"
    env.write_text("OPENAI_API_KEY=sk-operator\n")
    cred = staged.etc / "credentials" / "openai_api_key"
    cred.write_text("sk-cred\n")
    cred.chmod(0o600)
    # an installed module gone missing and a file in the venv: the upgrade must bring the
    # first back (package replaced) and keep the second (venv kept, not recreated)
    site = Path(run(staged.prefix / "venv" / "bin" / "python", "-c",
                    "import relayd, os; print(os.path.dirname(relayd.__file__))", cwd=tmp_path).stdout.strip())
    (site / "demo.py").unlink()
    marker = staged.prefix / "venv" / "kept-by-upgrade"
    marker.write_text("x")

    out, seconds = make("install", staged.destdir)
    print(f"make install (upgrade) took {seconds:.1f}s")

    assert config.read_text() == edited
    assert env.read_text() == "OPENAI_API_KEY=sk-operator\n" and mode(env) == 0o600
    assert cred.read_text() == "sk-cred\n"
    assert (site / "demo.py").read_text() == (ROOT / "relayd" / "demo.py").read_text()
    assert marker.exists()
    r = run(staged.relayd, "check", "-c", config, cwd=tmp_path)
    assert r.returncode == 0, r
    assert "sk-operator" not in out and "sk-cred" not in out


def test_uninstall_removes_venv_and_units_keeps_etc(staged: Staged) -> None:
    before = {p: p.read_bytes() for p in staged.etc.rglob("*") if p.is_file()}
    out, _ = make("uninstall", staged.destdir)
    assert not (staged.prefix / "venv").exists()
    assert not staged.prefix.exists()  # empty after the venv and README went
    for name in UNITS:
        assert not (staged.unitdir / name).exists(), name
    assert {p: p.read_bytes() for p in staged.etc.rglob("*") if p.is_file()} == before
    assert f"kept {staged.etc}" in out

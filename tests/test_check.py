"""`relayd check` and config validation: every error with FILE:LINE: field.path: why, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd import config as cfg

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
listen: 127.0.0.1:8080
upstreams:
  openai:
    url: https://api.openai.com
    provider: openai
    api_key: ${OPENAI_API_KEY:-}
routes:
  - path: /openai
    upstream: openai
"""


def run_check(tmp_path: Path, text: str | bytes, env: dict[str, str] | None = None,
              name: str = "relayd.yaml") -> tuple[int, str, str]:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    r = subprocess.run([sys.executable, "-m", "relayd", "check", "-c", str(p)], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, **(env or {})}, timeout=30)
    assert "Traceback" not in r.stdout + r.stderr
    return r.returncode, r.stdout, r.stderr


def test_check_ok(tmp_path):
    code, out, err = run_check(tmp_path, GOOD)
    assert code == 0, err
    assert out.strip() == "ok: 1 route, 1 upstream"


# (config text, expected line, expected field path, words in the reason)
CASES = {
    "unknown key": (GOOD.replace("    provider: openai\n", "    provider: openai\n    retries: 3\n"),
                    6, "upstreams.openai.retries", "unknown key"),
    "unknown top key": ("lisen: 1\n" + GOOD, 1, "lisen", "unknown key; did you mean 'listen'?"),
    "wrong type": (GOOD.replace("url: https://api.openai.com", "url: https://api.openai.com\n    max_connections: lots"),
                   5, "upstreams.openai.max_connections", "expected an integer"),
    "wrong type bool": (GOOD + "    strip_prefix: maybe\n", 10, "routes[0].strip_prefix", "expected true or false"),
    "bad url": (GOOD.replace("https://api.openai.com", "ftp://api.openai.com"), 4, "upstreams.openai.url", "scheme"),
    "bad url no host": (GOOD.replace("https://api.openai.com", "https://"), 4, "upstreams.openai.url", "bad URL"),
    "bad duration": ("shutdown_grace: 10 parsecs\n" + GOOD, 1, "shutdown_grace", "bad duration"),
    "bad timeout": (GOOD + "    timeouts: {idle: -5}\n", 10, "routes[0].timeouts.idle", "duration"),
    "bad listen": (GOOD.replace("127.0.0.1:8080", "localhost"), 1, "listen", "bad listen address"),
    "bad listen port": (GOOD.replace("127.0.0.1:8080", "127.0.0.1:99999"), 1, "listen", "port"),
    "unknown provider": (GOOD.replace("provider: openai", "provider: openia"), 5, "upstreams.openai.provider",
                         "unknown provider 'openia'; did you mean 'openai'?"),
    "bad size": ("limits: {replay_body: 8MB}\n" + GOOD, 1, "limits.replay_body", "KB/MB/GB are not accepted"),
    "bad workers": ("workers: 0\n" + GOOD, 1, "workers", "expected auto or an integer between 1 and 256"),
    "client route": (GOOD + "clients: {a: {key: k, routes: [/nope]}}\n", 10, "clients.a.routes",
                     "no route with path '/nope'"),
    "api key control char": (GOOD.replace("${OPENAI_API_KEY:-}", '"a\\tb\\x1bc"'), 6, "upstreams.openai.api_key",
                             "control character 0x1b"),
    "unknown upstream": (GOOD.replace("upstream: openai", "upstream: opena"), 9, "routes[0].upstream",
                         "unknown upstream 'opena'"),
    "unknown upstream in list": (GOOD.replace("upstream: openai", "upstream: [openai, nope]"), 9,
                                 "routes[0].upstream[1]", "unknown upstream 'nope'"),
    "duplicate route": (GOOD + "  - path: /openai/\n    upstream: openai\n", 10, "routes[1].path",
                        "duplicate route path '/openai'"),
    "path without slash": (GOOD.replace("path: /openai", "path: openai"), 8, "routes[0].path", "must start with '/'"),
    "missing env var": (GOOD.replace("${OPENAI_API_KEY:-}", "${RELAYD_TEST_SURELY_UNSET}"), 6,
                        "upstreams.openai.api_key", "RELAYD_TEST_SURELY_UNSET is not set"),
    "yaml syntax": (GOOD.replace("  - path: /openai\n", "  - path: [/openai\n"), 9, "", "YAML syntax error"),
    "yaml tab": (GOOD.replace("    provider: openai", "\tprovider: openai"), 5, "", "YAML syntax error"),
    "missing url": (GOOD.replace("    url: https://api.openai.com\n", ""), 3, "upstreams.openai", "missing required key 'url'"),
    "routes not a list": (GOOD.split("routes:")[0] + "routes: {path: /x}\n", 7, "routes", "expected a list"),
    "unsafe yaml tag": (GOOD.replace("127.0.0.1:8080", "!!python/object:os.system x"), 1, "listen",
                        "cannot read value"),
    "bad timestamp": (GOOD.replace("provider: openai", "provider: !!timestamp nope"), 5,
                      "upstreams.openai.provider", "cannot read value: not a valid !!timestamp"),
    "binary value": ("shutdown_grace: !!binary '%%'\n" + GOOD, 1, "shutdown_grace", "expected a duration"),
    "duplicate key": (GOOD.replace("    provider: openai\n", "    provider: openai\n    provider: anthropic\n"),
                      6, "upstreams.openai.provider", "duplicate key"),
    "framing header": (GOOD.replace("    provider: openai\n", "    provider: openai\n    headers: {Content-Length: '0'}\n"),
                       6, "upstreams.openai.headers.Content-Length", "relayd sets this header itself"),
    "hop-by-hop header": (GOOD.replace("    provider: openai\n", "    provider: openai\n    headers: {transfer-encoding: chunked}\n"),
                          6, "upstreams.openai.headers.transfer-encoding", "cannot be configured"),
    "unterminated variable": (GOOD.replace("${OPENAI_API_KEY:-}", "${OPENAI_API_KEY"), 6, "",
                              "malformed variable reference"),
    "variable, wrong default syntax": (GOOD.replace("${OPENAI_API_KEY:-}", "${OPENAI_API_KEY:x}"), 6, "",
                                       "malformed variable reference"),
    "nested variable default": (GOOD.replace("${OPENAI_API_KEY:-}", "${NOPE:-${OPENAI_API_KEY}}"), 6, "",
                                "no variable inside a default"),
    "route path with dot segments": (GOOD.replace("path: /openai", "path: /a/../openai"), 8, "routes[0].path",
                                     "must not contain '.' or '..' segments"),
    # review 74: requests are resolved with %2e as a dot, so no request reached these either
    "route path with encoded dot segments": (GOOD.replace("path: /openai", "path: /a/%2E%2e/openai"), 8,
                                             "routes[0].path", "must not contain '.' or '..' segments"),
    # review 75: a request under such a route reads as another path once its encoded
    # slashes are read as slashes, and was refused (400 invalid_path): every request was
    "route path with an encoded slash": (GOOD.replace("path: /openai", "path: /a%2Fb"), 8, "routes[0].path",
                                         "must not contain an encoded slash"),
    "route path with an encoded backslash": (GOOD.replace("path: /openai", "path: /a%5cb"), 8, "routes[0].path",
                                             "no request could reach it"),
    "route path with a backslash": (GOOD.replace("path: /openai", "path: '/a\\\\b'"), 8, "routes[0].path",
                                    "must not contain an encoded slash"),
    "raw control character": (GOOD.replace("    provider: openai\n", "    provider: open\x07ai\n"), 5, "",
                              "character #x0007 is not allowed"),
    "huge integer duration": ("shutdown_grace: 1" + "0" * 320 + "\n" + GOOD, 1, "shutdown_grace",
                              "duration too large"),
    "huge integer timeout": (GOOD + "    timeouts: {idle: 1" + "0" * 400 + "}\n", 10, "routes[0].timeouts.idle",
                             "too large"),
    "integer over python's digit limit": ("workers: 1" + "0" * 5000 + "\n" + GOOD, 1, "workers",
                                          "number too large"),
    "listen port over python's digit limit": ("listen: 127.0.0.1:1" + "0" * 5000 + "\n" + GOOD.split("\n", 1)[1], 1,
                                              "listen", "port must be between 1 and 65535, got a number too large"),
    "size over python's digit limit": ('limits: {replay_body: "1' + "0" * 5000 + 'KiB"}\n' + GOOD, 1,
                                       "limits.replay_body", "size too large"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_errors(tmp_path, case):
    text, line, path, words = CASES[case]
    code, out, err = run_check(tmp_path, text, env={"OPENAI_API_KEY": "x"})
    assert code == 1
    first = err.splitlines()[0]
    prefix = f"{tmp_path / 'relayd.yaml'}:{line}: " + (f"{path}: " if path else "")
    assert first.startswith(prefix), (first, prefix)
    assert words in first


def test_check_reports_every_error_of_a_file(tmp_path):
    text = """\
listen: nowhere
upstreams:
  a: {url: "ftp://x", provider: nope}
  b: {url: "http://ok", provider: openai, api_key: "${UNSET_RELAYD_VAR}"}
routes:
  - {path: x, upstream: a}
  - {path: /y, upstream: zz}
  - {path: /y, upstream: b, timeouts: {idle: soon}}
"""
    code, _, err = run_check(tmp_path, text)
    lines = err.strip().splitlines()
    assert code == 1
    wanted = ["1: listen:", "3: upstreams.a.url:", "3: upstreams.a.provider:", "4: upstreams.b.api_key:",
              "6: routes[0].path:", "7: routes[1].upstream:", "8: routes[2].path: duplicate",
              "8: routes[2].timeouts.idle:"]
    for w in wanted:
        assert any(f"relayd.yaml:{w}" in l for l in lines), (w, lines)
    assert len(lines) == len(wanted)  # every line is one error in FILE:LINE: path: why form


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01\x02", b"\xff\xfe binary", b"- a\n- b\n", b"[", b"a: b: c",
                                     b"---\na: 1\n---\nb: 2\n", b"listen: *anchor\n", b"!!python/object:os.system x"])
def test_check_never_tracebacks_on_garbage(tmp_path, garbage):
    code, out, err = run_check(tmp_path, garbage)
    assert code == 1
    assert err.strip() and "relayd.yaml:" in err


def relayd(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "relayd", *args], capture_output=True, text=True, timeout=30,
                       env={**os.environ, **(env or {})}, cwd=cwd)
    assert "Traceback" not in r.stdout + r.stderr
    return r


ORDER = "looked at: -c/positional argument, $RELAYD_CONFIG, /etc/relayd/relayd.yaml)"


def test_check_missing_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    for args, env, source in ((["-c", missing], {}, "-c/positional argument"),
                              ([missing], {}, "-c/positional argument"),
                              ([], {"RELAYD_CONFIG": missing}, "$RELAYD_CONFIG")):
        r = relayd("check", *args, env=env)
        assert r.returncode == 1
        assert r.stderr.strip() == f"relayd: config file not found: {missing} (from {source}; {ORDER}", r.stderr
        assert ":0:" not in r.stderr


def test_unreadable_config_has_no_line_zero(tmp_path):
    r = relayd("check", str(tmp_path))  # a directory
    assert r.returncode == 1 and ":0:" not in r.stderr and "cannot read config" in r.stderr


def test_check_positional_and_c_agree(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(GOOD)
    assert relayd("check", str(p)).stdout.strip() == "ok: 1 route, 1 upstream"
    assert relayd("check", str(p), "-c", str(p)).returncode == 0
    r = relayd("check", str(p), "-c", str(tmp_path / "y.yaml"))
    assert r.returncode == 1 and "two config files given" in r.stderr


def test_help_points_at_the_docs():
    for args in ([], ["run"], ["check"]):
        r = relayd(*args, "--help")
        assert r.returncode == 0 and "README.md" in r.stdout and "config/examples/" in r.stdout, r.stdout
    assert "--workers" in relayd("run", "--help").stdout and "--loop" in relayd("run", "--help").stdout


@pytest.mark.parametrize("args,words", [
    (["--workers", "0"], "argument --workers: expected auto or an integer between 1 and 256, got '0'"),
    (["--workers", "many"], "argument --workers"),
    (["--loop", "trio"], "argument --loop: invalid choice: 'trio'"),
])
def test_run_options_are_validated(tmp_path, args, words):
    r = relayd("run", *args, str(tmp_path / "x.yaml"))
    assert r.returncode == 2 and words in r.stderr, r.stderr


def test_check_warnings_exit_zero(tmp_path):
    text = GOOD.replace("127.0.0.1:8080", "0.0.0.0:8080") + "admin_listen: 0.0.0.0:9090\n"
    code, out, err = run_check(tmp_path, text, env={"OPENAI_API_KEY": "sk-test-warn"})
    assert code == 0 and out.strip() == "ok: 1 route, 1 upstream"
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith("warning: ") for l in lines), lines
    assert "admin_listen 0.0.0.0:9090 is not a loopback address" in err
    assert "anyone who can reach 0.0.0.0:8080 spends your keys" in err
    assert "sk-test-warn" not in err
    code, _, err = run_check(tmp_path, GOOD + "admin_listen: 127.0.0.1:8080\n")
    assert code == 1 and ":10: admin_listen: 127.0.0.1:8080 overlaps listen" in err


@pytest.mark.parametrize("url", ["https://user:hunter2@api.openai.com:bad/", "https://user:hunter2@h/?q=1",
                                 "ftp://user:hunter2@h/", "https://user:hunter2@h:70000/"])
def test_check_never_prints_url_credentials(tmp_path, url):
    code, _, err = run_check(tmp_path, GOOD.replace("https://api.openai.com", url))
    assert code == 1 and "upstreams.openai.url: bad URL" in err and "hunter2" not in err, err


def test_check_never_prints_secret_variables(tmp_path):
    text = "shutdown_grace: ${OPENAI_API_KEY}\n" + GOOD
    code, _, err = run_check(tmp_path, text, env={"OPENAI_API_KEY": "sk-live-abc123"})
    assert code == 1 and "sk-live-abc123" not in err
    assert "shutdown_grace: bad duration (value from ${OPENAI_API_KEY} hidden)" in err, err


def test_config_env_default_path(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(GOOD)
    r = subprocess.run([sys.executable, "-m", "relayd", "check"], capture_output=True, text=True,
                       env={**os.environ, "RELAYD_CONFIG": str(p)}, timeout=30)
    assert r.returncode == 0 and "ok: 1 route," in r.stdout


def test_version():
    r = subprocess.run([sys.executable, "-m", "relayd", "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("relayd ")


def test_shipped_configs_pass_check(tmp_path):
    files = [ROOT / "config" / "relayd.yaml", *sorted((ROOT / "config" / "examples").glob("*.yaml"))]
    assert len(files) >= 7
    for f in files:
        r = subprocess.run([sys.executable, "-m", "relayd", "check", "-c", str(f)], capture_output=True,
                           text=True, timeout=30, env={k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")})
        assert r.returncode == 0, (f, r.stderr)


def test_interpolation_in_flow_mapping_and_types():
    text = """
listen: ${LISTEN:-127.0.0.1:9000}
upstreams:
  a: {url: "${URL}", provider: openai, max_connections: ${POOL:-7}, headers: {X-A: ${XA:-}, X-B: "${XB}"}}
routes: [{path: /a, upstream: a}]
"""
    c = cfg.parse(text, "t.yaml", {"URL": "http://h:1/base", "XB": "b$$"})
    up = c.upstreams["a"]
    assert str(c.listen) == "127.0.0.1:9000"
    assert up.max_connections == 7 and up.headers == (("X-B", "b$$"),)
    assert str(up.url) == "http://h:1/base"


def test_config_objects_are_immutable():
    c = cfg.parse(GOOD, "t.yaml", {})
    with pytest.raises(Exception):
        c.listen = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.upstreams["x"] = None  # type: ignore[index]
    assert "api_key" not in repr(c.upstreams["openai"])


def test_durations():
    assert cfg.parse_duration("500ms") == 0.5
    assert cfg.parse_duration("5m") == 300
    assert cfg.parse_duration("1h") == 3600
    assert cfg.parse_duration(2.5) == 2.5
    for bad in ("5 minutes", "-1s", True, "1d", None):
        with pytest.raises(ValueError):
            cfg.parse_duration(bad)


def test_ipv6_listen():
    c = cfg.parse(GOOD.replace("127.0.0.1:8080", '"[::1]:8080"'), "t.yaml", {})
    assert c.listen.host == "::1" and c.listen.port == 8080


_fragments = st.sampled_from([
    "listen: ", "upstreams:", "routes:", "  - ", "  a: ", "{", "}", "[", "]", ": ", "\n", "  ", "- path: /x",
    "url: http://h", "provider: openai", "upstream: a", "!!python/object:x ", "!!binary ", "!!timestamp ",
    "&a ", "*a", "${X}", "${Y:-1}", "$$", "'", '"', "#", "\t", "1h", "-5", "0x1F", "~", "null", "yes", "\xff",
    "timeouts: {idle: ", "headers: {A: ", "tls: {verify: ", "breaker: {failures: ", "? ", "|", ">", "---",
    "workers: ", "limits: {replay_body: ", "8MiB", "clients:", "key: ", "key_sha256: ", "allow: [", "10.0.0.0/8",
    "api_key_file: ", "api_key_credential: ", "routes: [", "admin_listen: ", "127.0.0.1:1", "0x", "\x01",
])


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_fragments, max_size=40).map("".join)))
def test_parse_never_raises_anything_but_config_error(text):
    try:
        cfg.parse(text, "fuzz.yaml", {"X": "v"})
    except cfg.ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            assert str(p).startswith("fuzz.yaml:")


@pytest.mark.parametrize("value", ["!!binary c2stbGl2ZS1CSU5BUllTRUNSRVQ=", "!!map {sk-live-BINARYSECRET: 1}"])
def test_a_mistyped_key_is_not_printed(tmp_path, value):
    """A key given the wrong YAML type is reported without its value (it was printed
    decoded: "got b'sk-live-BINARYSECRET'")."""
    code, out, err = run_check(tmp_path, GOOD.replace("${OPENAI_API_KEY:-}", value))
    assert code == 1 and "upstreams.openai.api_key: expected a" in err
    assert "BINARYSECRET" not in out + err


def test_a_secret_variable_is_hidden_in_every_message(tmp_path):
    """A variable used in a secret field is never printed, also where another field's
    message quotes a part of its value (a bracketed listen address)."""
    text = GOOD.replace("127.0.0.1:8080", "'[${RELAYD_TEST_SECRET}]:80'").replace(
        "${OPENAI_API_KEY:-}", "${RELAYD_TEST_SECRET}")
    code, out, err = run_check(tmp_path, text, env={"RELAYD_TEST_SECRET": "sk-live-SECRET123"})
    assert code == 1 and "listen:" in err
    assert "SECRET123" not in out + err


def test_line_numbers_after_a_character_yaml_reads_as_a_line_break(tmp_path):
    """Review 80: YAML 1.1 breaks lines at U+2028, U+2029 and U+0085 too; every line
    number after one was too high, and a syntax error it caused pointed elsewhere."""
    text = GOOD.replace("    provider: openai\n", '    headers: {X-Note: "a\u2028b"}\n    provider: opnai\n', 1)
    line = text.split("\n").index("    provider: opnai") + 1  # (not splitlines: it breaks at U+2028 too)
    code, out, err = run_check(tmp_path, text)
    assert code == 1 and f":{line}: upstreams.openai.provider: unknown provider" in err, err
    code, out, err = run_check(tmp_path, "# a note\u2028 pasted\n" + GOOD)
    assert code == 1 and ":2: YAML syntax error" in err and "line 1 holds U+2028" in err, err


def test_a_secret_variable_in_a_key_that_does_not_read_is_still_hidden(tmp_path):
    """Review 80: ``api_key: !!int ${KEY}`` failed to read, so ``KEY`` was not marked
    secret, and another field quoting the same variable printed its value."""
    text = GOOD.replace("${OPENAI_API_KEY:-}", "!!int ${RELAYD_TEST_SECRET}") \
        + "log_level: ${RELAYD_TEST_SECRET}\n"
    code, out, err = run_check(tmp_path, text, env={"RELAYD_TEST_SECRET": "sk-TOPSECRET123"})
    assert code == 1 and "log_level" in err and "api_key" in err, err
    assert "TOPSECRET" not in out + err


def test_allow_entries_in_ipv4_mapped_form_mean_their_ipv4_network():
    """Peers are matched as IPv4 (a dual-stack socket's ::ffff:a.b.c.d is a.b.c.d): an
    entry written in the mapped form never matched, and refused its own address."""
    import ipaddress
    c = cfg.parse("allow: ['::ffff:127.0.0.1/128', '::ffff:10.0.0.0/104', '::1']\n" + GOOD, "t.yaml", {})
    assert c.allow == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
                       ipaddress.ip_network("::1/128"))


def test_a_configured_host_header_and_variables_in_comments_are_fine(tmp_path):
    """Host set per upstream (a virtual host reached by address) is not framing; a `${`
    in a comment is not a value."""
    text = GOOD.replace("    provider: openai\n", "    provider: openai\n    headers: {Host: api.internal.example}\n"
                        ) + "# set api_key: ${ OPENAI_API_KEY } or ${OPENAI_API_KEY:?missing}\n"
    code, out, err = run_check(tmp_path, text)
    assert code == 0, err


def test_a_header_value_is_not_hidden_in_other_messages(tmp_path):
    """Header values are secret fields, but only a secret variable's value is hidden in
    other fields' messages: an upstream named like a header value keeps its name."""
    text = GOOD.replace("    provider: openai\n", "    provider: openai\n    headers: {X-Team: openai}\n").replace(
        "url: https://api.openai.com", "url: ftp://x")
    code, _, err = run_check(tmp_path, text)
    assert code == 1 and "upstreams.openai.url:" in err


def test_a_key_read_from_a_file_is_hidden_in_other_messages(tmp_path):
    """A key from api_key_file is not in the config: a message that quotes it elsewhere
    hides it (a bracketed listen address here)."""
    (tmp_path / "key").write_text("sk-file-SECRET-9\n")
    text = GOOD.replace("127.0.0.1:8080", "'[sk-file-SECRET-9]:80'").replace(
        "    api_key: ${OPENAI_API_KEY:-}\n", f"    api_key_file: {tmp_path / 'key'}\n")
    code, out, err = run_check(tmp_path, text)
    assert code == 1 and "listen:" in err
    assert "SECRET-9" not in out + err


def test_a_config_or_key_file_that_is_not_a_regular_file_is_refused(tmp_path):
    # A FIFO hung `relayd check` forever (open blocked); /dev/zero grew memory without bound.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = relayd("check", str(fifo))
    assert r.returncode == 1 and r.stderr.strip() == f"{fifo}: cannot read config: not a regular file", r.stderr
    for where, text in (("upstreams.openai.api_key_file", GOOD.replace("api_key: ${OPENAI_API_KEY:-}",
                                                                        "api_key_file: {}")),
                        ("clients.a.key_file", GOOD + "clients: {a: {key_file: {}}}\n"),
                        ("tls.cert", f"tls: {{cert: '{{}}', key: '{tmp_path / 'relayd.yaml'}'}}\n" + GOOD)):
        for bad in (fifo, "/dev/zero"):
            code, _, err = run_check(tmp_path, text.replace("{}", str(bad)))
            assert code == 1 and f": {where}: " in err and "not a regular file" in err, (where, bad, err)


def test_a_config_over_4_mib_is_refused(tmp_path):
    big = GOOD + ("#" * 1023 + "\n") * (4 << 10)
    code, _, err = run_check(tmp_path, big)
    assert code == 1 and err.strip() == f"{tmp_path / 'relayd.yaml'}: cannot read config: larger than 4 MiB (the limit)"
    code, _, err = run_check(tmp_path, big[: 4 << 20])  # at the limit: fine
    assert code == 0, err


def test_a_config_path_that_cannot_be_looked_at_says_why_not_not_found(tmp_path):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    r = relayd("check", str(tmp_path / "a.yaml"))
    assert r.returncode == 1 and "not found" not in r.stderr
    assert r.stderr.strip() == (f"relayd: cannot read config file {tmp_path / 'a.yaml'}: Too many levels of "
                                f"symbolic links (from -c/positional argument)")


def test_names_with_control_characters_cannot_forge_error_lines(tmp_path):
    text = GOOD + '"evil\\nsk-fake.yaml:1: injected line": 1\nclients:\n  "c\\e[2Jd": {key: 0123456789abcdef0123}\n'
    text = text.replace("  openai:\n", '  "o\\nx":\n    url: http://x\n    provider: openai\n  openai:\n')
    code, _, err = run_check(tmp_path, text)
    lines = err.splitlines()
    f = tmp_path / "relayd.yaml"
    assert code == 1 and lines == [
        f"{f}:3: upstreams.o\\x0ax: a key or name must not contain control characters",
        f"{f}:13: evil\\x0ask-fake.yaml:1: injected line: a key or name must not contain control characters",
        f"{f}:15: clients.c\\x1b[2Jd: a key or name must not contain control characters"], lines


def test_values_in_messages_are_cut_short(tmp_path):
    code, _, err = run_check(tmp_path, f"log_level: {'x' * 3_000_000}\n? '{'y' * 3000}'\n: 1\n" + GOOD)
    lines = err.splitlines()
    assert code == 1 and len(lines) == 2 and all(len(l) < 600 for l in lines), [len(l) for l in lines]
    assert lines[0].endswith(f"log_level: unknown log level '{'x' * 78}\u2026 (use debug | info | warning | error)")
    assert f": {'y' * 199}\u2026: unknown key (allowed: " in lines[1]


def test_a_value_cut_short_does_not_show_the_start_of_a_secret(tmp_path):
    key = "sk-" + "s3cr3t" * 20
    (tmp_path / "key").write_text(key)
    text = GOOD.replace("api_key: ${OPENAI_API_KEY:-}", f"api_key_file: {tmp_path / 'key'}")
    code, _, err = run_check(tmp_path, f"log_level: a{key}\n" + text)
    assert code == 1 and "s3cr3t" not in err and "(secret hidden)\u2026" in err, err

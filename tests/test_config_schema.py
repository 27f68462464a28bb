"""The config schema via config.parse: new keys, defaults, credentials, secrets, hardening."""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from relayd import config as cfg
from relayd import yamlconf
from test_check import GOOD

BASE = GOOD.replace("OPENAI_API_KEY", "K")  # the check tests' config, key from ${K:-}


def parse(text: str, env: dict[str, str] | None = None) -> cfg.Config:
    return cfg.parse(text, "t.yaml", env or {})


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(cfg.ConfigError) as info:
        parse(text, env)
    return [str(p) for p in info.value.problems]


def test_defaults_of_new_keys():
    c = parse(BASE)
    assert c.workers is None
    assert c.timeouts.send == 60.0 and c.routes[0].timeouts.send == 60.0
    assert c.limits == cfg.Limits(client_header=60.0, client_keepalive=75.0, max_request_headers=64 * 1024,
                                  replay_body=8 * 1024 * 1024, replay_memory=256 * 1024 * 1024)
    up = c.upstreams["openai"]
    assert up.max_connections == 1000 and up.pool_wait is None and up.api_key is None
    assert c.clients == () and c.tls is None and c.allow == () and c.admin_allow == ()
    assert c.secrets == frozenset() and c.warnings == ()


def test_new_keys_parsed():
    c = parse("workers: 4\ndefaults: {timeouts: {send: 5s}}\n"
              "limits: {client_header: 10s, client_keepalive: 1m, max_request_headers: 16KiB,"
              " replay_body: 1MiB, replay_memory: 1GiB}\n"
              "allow: [10.0.0.0/8, '::1']\nadmin_allow: 127.0.0.1\n"
              + BASE.replace("    api_key: ${K:-}\n", "    pool_wait: 250ms\n    max_connections: 7\n")
              + "    timeouts: {send: 2}\n")
    assert c.workers == 4 and c.timeouts.send == 5.0 and c.routes[0].timeouts.send == 2.0
    assert c.routes[0].timeouts.first_byte == 600.0  # other keys still inherited
    assert (c.limits.client_header, c.limits.client_keepalive) == (10.0, 60.0)
    assert (c.limits.max_request_headers, c.limits.replay_body, c.limits.replay_memory) == (16384, 1 << 20, 1 << 30)
    assert c.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert c.admin_allow == (ipaddress.ip_network("127.0.0.1/32"),)
    assert c.upstreams["openai"].pool_wait == 0.25 and c.upstreams["openai"].max_connections == 7
    assert parse("workers: auto\n" + BASE).workers is None


@pytest.mark.parametrize("line,words", [
    ("workers: 0", "workers: expected auto or an integer between 1 and 256, got 0"),
    ("workers: 257", "between 1 and 256"),
    ("workers: lots", "expected auto or an integer"),
    ("limits: {replay_body: 10MB}", "KB/MB/GB are not accepted"),
    ("limits: {replay_body: -1}", "bad size"),
    ("limits: {max_request_headers: 10}", "must be between 1024"),
    ("limits: {replay_body: 1GiB, replay_memory: 1MiB}", "must not be larger than replay_memory"),
    ("limits: {client_header: soon}", "bad duration"),
    ("allow: [10.0.0.1/8]", "host bits set; did you mean '10.0.0.0/8'"),
    ("allow: [nowhere]", "bad address or CIDR"),
    ("admin_allow: {a: 1}", "expected a list"),
    ("tls: {cert: /nonexistent/c.pem, key: /nonexistent/k.pem}", "file not found"),
    ("tls: {cert: /etc/hostname}", "missing required key 'key'"),
])
def test_new_key_errors(line, words):
    errs = errors(line + "\n" + BASE)
    assert any(e.startswith("t.yaml:1: ") and words in e for e in errs), errs


def test_string_fields_keep_the_text_as_written():
    for raw in ("012345", "0x1F2E3D", "1:20", "yes", "true", "1e3", "0o17", "2001-01-01"):
        c = parse(BASE.replace("${K:-}", raw))
        assert c.upstreams["openai"].api_key == raw, raw
    c = parse(BASE.replace("    api_key: ${K:-}\n", "    headers: {X-A: 007, X-B: no}\n"))
    assert c.upstreams["openai"].headers == (("X-A", "007"), ("X-B", "no"))
    # numbers and booleans stay typed for numeric and boolean fields
    c = parse(BASE.replace("api_key: ${K:-}", "max_connections: 0x10") + "    strip_prefix: no\n")
    assert c.upstreams["openai"].max_connections == 16 and c.routes[0].strip_prefix is False


def test_control_characters_rejected_without_printing_them():
    errs = errors(BASE.replace("${K:-}", '"sk-\\x01secret"'))
    assert errs == ["t.yaml:6: upstreams.openai.api_key: contains control character 0x01 "
                    "(not allowed; value not shown)"]
    errs = errors(BASE.replace("${K:-}", '"sk-\\x7fsecret"'))
    assert "0x7f" in errs[0] and "secret" not in errs[0]
    errs = errors(BASE.replace("api_key: ${K:-}", "headers: {X-A: ${H}}"), {"H": "a\rb"})
    assert errs == ["t.yaml:6: upstreams.openai.headers.X-A: contains control character 0x0d "
                    "(not allowed; value not shown)"]
    c = parse(BASE.replace("api_key: ${K:-}", 'headers: {X-A: "caf\u00e9\tx\u00ff"}'))
    assert c.upstreams["openai"].headers == (("X-A", "caf\u00e9\tx\u00ff"),)  # tab and obs-text are fine


def test_values_of_secret_variables_are_never_printed():
    env = {"K": "sk-verysecret-1", "P": "sk-verysecret-1"}
    text = "workers: ${K}\nshutdown_grace: ${K}\n" + BASE.replace("provider: openai", "provider: ${K}")
    errs = errors(text, env)
    assert len(errs) == 3 and all("(value from ${K} hidden)" in e for e in errs), errs
    assert not any("verysecret" in e for e in errs)
    # a variable that feeds no credential field is shown, it helps find the mistake
    errs = errors("workers: ${W}\n" + BASE, {"W": "many"})
    assert errs == ["t.yaml:1: workers: expected auto or an integer between 1 and 256, got 'many'"]


@pytest.mark.parametrize("url", [
    "https://user:hunter2@host:bad/", "https://user:hunter2@host/?q=1", "ftp://user:hunter2@host/",
    "https://user:hunter2@host:99999/", "https://user:hunter2@/", "https://user:hunter2@host/#frag",
    "user:hunter2@host:1", "https://user:hunter2@host/?key=hunter2",
])
def test_url_userinfo_never_printed(url):
    for key in ("url", "proxy"):
        text = BASE.replace("    api_key: ${K:-}\n", f"    proxy: null\n") if key == "url" else BASE
        text = text.replace("https://api.openai.com", url) if key == "url" else \
            text.replace("    api_key: ${K:-}\n", f"    proxy: '{url}'\n")
        errs = errors(text)
        assert errs and not any("hunter2" in e for e in errs), errs
        assert any(f"upstreams.openai.{key}: bad URL" in e for e in errs), errs
    # the hint for a proxy is not the upstream's (api_key and headers are the upstream's)
    errs = errors(BASE.replace("    api_key: ${K:-}\n", "    proxy: 'http://u:hunter2@proxy:3128'\n"))
    assert errs and errs[0].endswith("credentials in the URL are not allowed (relayd does not "
                                     "authenticate to a proxy)"), errs


def test_did_you_mean():
    assert "unknown key; did you mean 'listen'?" in errors("lisen: 1\n" + BASE)[0]
    assert "did you mean 'max_connections'?" in errors(BASE.replace("api_key:", "max_conections:"))[0]
    assert "unknown provider 'openia'; did you mean 'openai'?" in errors(BASE.replace("provider: openai",
                                                                                  "provider: openia"))[0]
    assert "unknown upstream 'opena'; did you mean 'openai'?" in errors(BASE.replace("upstream: openai",
                                                                                 "upstream: opena"))[0]


def test_api_key_file_and_credential(tmp_path):
    (tmp_path / "key").write_text("sk-from-file\n")
    c = parse(BASE.replace("api_key: ${K:-}", f"api_key_file: {tmp_path / 'key'}"))
    assert c.upstreams["openai"].api_key == "sk-from-file" and "sk-from-file" in c.secrets
    (tmp_path / "key").write_text("sk-rotated")  # read at load time: a reload sees the new key
    assert parse(BASE.replace("api_key: ${K:-}", f"api_key_file: {tmp_path / 'key'}")
                 ).upstreams["openai"].api_key == "sk-rotated"
    (tmp_path / "openai").write_text("sk-cred\r\n")
    text = BASE.replace("api_key: ${K:-}", "api_key_credential: openai")
    assert parse(text, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).upstreams["openai"].api_key == "sk-cred"
    assert errors(text) == ["t.yaml:6: upstreams.openai.api_key_credential: $CREDENTIALS_DIRECTORY is not set "
                            "(systemd sets it for LoadCredential=; set it yourself to run by hand)"]
    errs = errors(BASE.replace("api_key: ${K:-}", f"api_key_file: {tmp_path / 'missing'}"))
    assert errs[0].startswith("t.yaml:6: upstreams.openai.api_key_file: cannot read ") and "No such file" in errs[0]
    (tmp_path / "bad").write_text("sk-a\nsk-b\n")
    errs = errors(BASE.replace("api_key: ${K:-}", f"api_key_file: {tmp_path / 'bad'}"))
    assert "control character 0x0a" in errs[0] and "sk-a" not in errs[0]
    errs = errors(BASE.replace("api_key: ${K:-}", f"api_key: x\n    api_key_file: {tmp_path / 'key'}"))
    assert errs == ["t.yaml:7: upstreams.openai.api_key_file: set at most one of api_key, api_key_file, "
                    "api_key_credential (also set: api_key)"]
    assert "bad credential name" in errors(BASE.replace("api_key: ${K:-}", "api_key_credential: ../x"))[0]


def test_clients(tmp_path):
    (tmp_path / "bob").write_text("bob-key\n")
    digest = hashlib.sha256(b"carol-key").hexdigest()
    c = parse(BASE + f"clients:\n  alice: {{key: alice-key, routes: [/openai/]}}\n"
                     f"  bob: {{key_file: {tmp_path / 'bob'}}}\n  carol: {{key_sha256: {digest.upper()}}}\n")
    alice, bob, carol = c.clients
    assert (alice.name, alice.key, alice.routes) == ("alice", "alice-key", ("/openai",))
    assert alice.key_sha256 == hashlib.sha256(b"alice-key").digest()
    assert (bob.key, bob.routes) == ("bob-key", None)
    assert (carol.key, carol.key_sha256) == (None, bytes.fromhex(digest))
    assert {"alice-key", "bob-key"} <= c.secrets and "alice-key" not in repr(c)
    assert errors(BASE + "clients:\n  a: {routes: [/openai]}\n") == [
        "t.yaml:11: clients.a: needs one of key, key_file, key_credential, key_sha256"]
    assert errors(BASE + "clients:\n  a: {key: k, routes: [/opena]}\n") == [
        "t.yaml:11: clients.a.routes: no route with path '/opena'; did you mean '/openai'?"]
    errs = errors(BASE + f"clients:\n  a: {{key: carol-key}}\n  b: {{key_sha256: {digest}}}\n")
    assert errs == ["t.yaml:12: clients.b: same key as client 'a'"] and "carol-key" not in errs[0]
    assert "64 hex digits" in errors(BASE + "clients:\n  a: {key_sha256: abc}\n")[0]
    assert "set at most one" in errors(BASE + "clients:\n  a: {key: a, key_credential: b}\n")[0]
    assert "the key is empty" in errors(BASE + "clients:\n  a: {key: '${CK:-}'}\n")[0]
    # a key file that cannot be read is one problem, not also "the key is empty"
    errs = errors(BASE + "clients:\n  a: {key_file: /nonexistent/relayd-key}\n")
    assert len(errs) == 1 and "cannot read /nonexistent/relayd-key" in errs[0], errs


def test_secrets_cover_every_credential(tmp_path):
    env = {"K": "sk-upstream-key", "TOKEN": "tok-123456", "ORG": "org-1"}
    c = parse(BASE.replace("    api_key: ${K:-}\n", "    api_key: ${K:-}\n    headers: {X-Auth: 'Bearer ${TOKEN}'}\n")
              + "clients:\n  a: {key: client-key-1}\n", env)
    assert {"sk-upstream-key", "tok-123456", "Bearer tok-123456", "client-key-1"} <= c.secrets


def test_admin_listen_checks_and_warnings():
    assert errors("admin_listen: 127.0.0.1:8080\n" + BASE)[0].startswith(
        "t.yaml:1: admin_listen: 127.0.0.1:8080 overlaps listen (127.0.0.1:8080)")
    assert "overlaps listen" in errors("admin_listen: 0.0.0.0:8080\n" + BASE)[0]
    assert parse("admin_listen: 127.0.0.1:9090\n" + BASE).warnings == ()
    c = parse("admin_listen: 0.0.0.0:9090\n" + BASE)
    assert len(c.warnings) == 1 and "admin_listen 0.0.0.0:9090 is not a loopback address" in c.warnings[0]
    public = BASE.replace("127.0.0.1:8080", "0.0.0.0:8080")
    assert parse(public).warnings == ()  # no keys to spend
    c = parse(public, {"K": "sk-x"})
    assert c.warnings == ("listen 0.0.0.0:8080 is not a loopback address, upstreams have API keys and there "
                          "is no clients: section: anyone who can reach 0.0.0.0:8080 spends your keys",)
    assert parse(public + "clients:\n  a: {key: k-0123456789abcdef}\n", {"K": "sk-x"}).warnings == ()
    assert parse(BASE.replace("127.0.0.1:8080", '"[::1]:8080"'), {"K": "sk-x"}).warnings == ()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available")
    d = tmp_path_factory.mktemp("certs")
    for name in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-subj", f"/CN={name}", "-days", "1", "-keyout", str(d / f"{name}.key"),
                        "-out", str(d / f"{name}.crt")], check=True, capture_output=True, timeout=30)
    subprocess.run(["openssl", "ec", "-in", str(d / "a.key"), "-aes256", "-passout", "pass:x",
                    "-out", str(d / "enc.key")], check=True, capture_output=True, timeout=30)
    return d


def test_listener_tls(certs):
    c = parse(f"tls: {{cert: {certs / 'a.crt'}, key: {certs / 'a.key'}}}\n" + BASE)
    assert c.tls == cfg.ListenerTLS(cert=str(certs / "a.crt"), key=str(certs / "a.key"))
    for cert, key, words in (("a.crt", "b.key", "the key does not belong to the certificate"),
                             ("a.crt", "enc.key", "the key is encrypted"),
                             ("a.key", "a.crt", "not a PEM certificate chain")):
        errs = errors(f"tls:\n  cert: {certs / cert}\n  key: {certs / key}\n" + BASE)
        assert len(errs) == 1 and errs[0].startswith("t.yaml:2: tls: cannot load cert and key: "), errs
        assert words in errs[0]


def test_each_key_declared_once_with_its_default():
    """The schema is the dataclasses: defaults seen by Python and by the YAML reader agree."""
    for cls in (cfg.Timeouts, cfg.TLS, cfg.Breaker, cfg.Limits, cfg.Defaults):
        cls()  # every key has a default
        assert set(yamlconf.keys_of(cls)) == {f for f in cls.__dataclass_fields__}
    assert parse(BASE).upstreams["openai"].tls == cfg.TLS() and parse(BASE).limits == cfg.Limits()
    assert "upstream" in yamlconf.keys_of(cfg.Route)  # the YAML name, for the field 'upstreams'


def test_a_ca_file_that_is_not_a_pem_bundle_is_a_config_error(tmp_path):
    # Found only when each worker built its pools, a bad bundle failed a reload that
    # `check` had passed; it is loaded at parse time now, like the pools will load it.
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    text = ("listen: 127.0.0.1:8080\nupstreams:\n"
            f"  a: {{url: 'https://127.0.0.1:1', provider: openai, tls: {{ca_file: {bad}}}}}\n"
            "routes:\n  - {path: /a, upstream: a}\n")
    errs = errors(text)
    assert len(errs) == 1 and errs[0].startswith("t.yaml:3: upstreams.a.tls.ca_file: not a PEM certificate bundle"), errs
    assert "file not found" in errors(text.replace(str(bad), str(tmp_path / "missing.pem")))[0]
    parse(text.replace("tls: {", "tls: {verify: false, "))  # verify off ignores ca_file, as before


def test_a_short_client_key_gets_a_warning_without_the_key():
    c = parse(BASE + "clients:\n  a: {key: abc123}\n  b: {key: 0123456789abcdef0123}\n")
    assert len(c.warnings) == 1, c.warnings
    assert c.warnings[0].startswith("clients.a: the key is 6 characters long") and "abc123" not in c.warnings[0]


def test_text_that_looks_like_a_variable_placeholder_stays_text():
    # Variables were swapped for "__yamlconf_var_N__" before composing: the same text
    # written in the file took a variable's value, or (no variable) raised IndexError.
    literal = BASE.replace("${K:-}", "__yamlconf_var_0__")
    assert parse(literal).upstreams["openai"].api_key == "__yamlconf_var_0__"
    c = parse(literal.replace("path: /openai", "path: /__yamlconf_var_1__")
              + "  - {path: /x, upstream: openai, heartbeat: '${H}'}\n", {"H": "5s"})
    assert c.upstreams["openai"].api_key == "__yamlconf_var_0__"
    assert [r.path for r in c.routes] == ["/__yamlconf_var_1__", "/x"] and c.routes[1].heartbeat == 5.0
    errs = errors("log_level: __yamlconf_var_0__\nworkers: ${W}\n" + BASE, {"W": "many"})
    assert errs[0] == ("t.yaml:1: log_level: unknown log level '__yamlconf_var_0__' "
                       "(use debug | info | warning | error)"), errs


def test_key_files_over_64_kib_are_refused(tmp_path):
    (tmp_path / "key").write_text("k" * (64 << 10) + "\n")
    for text in (BASE.replace("api_key: ${K:-}", f"api_key_file: {tmp_path / 'key'}"),
                 BASE + f"clients: {{a: {{key_file: {tmp_path / 'key'}}}}}\n"):
        errs = errors(text)
        assert len(errs) == 1 and errs[0].endswith(f"cannot read {tmp_path / 'key'}: larger than 64 KiB (the limit)"), errs
    (tmp_path / "key").write_text("k" * (64 << 10))  # at the limit: fine
    assert parse(BASE + f"clients: {{a: {{key_file: {tmp_path / 'key'}}}}}\n").clients[0].key == "k" * (64 << 10)


def test_a_tag_on_a_quoted_value_is_not_ignored():
    # Quoted values took their text whatever their tag said: the key below was
    # "c2stU0VDUkVU" itself, not the bytes it encodes; !whatever "openai" was openai.
    for value, env, words in (('!!binary "c2stU0VDUkVU"', {}, "expected a string, got a bytes (value not shown)"),
                              ("!!binary '${B}'", {"B": "c2stU0VDUkVU"}, "expected a string, got a bytes"),
                              ('!!int "12"', {}, "expected a string, got a int (value not shown)"),
                              ('!whatever "sk-x"', {}, "could not determine a constructor for the tag '!whatever'")):
        errs = errors(BASE.replace("${K:-}", value), env)
        assert len(errs) == 1 and errs[0].startswith("t.yaml:6: upstreams.openai.api_key: ") and words in errs[0], errs
    errs = errors(BASE.replace("provider: openai", 'provider: !whatever "openai"'))
    assert len(errs) == 1 and errs[0].startswith("t.yaml:5: upstreams.openai.provider: cannot read value"), errs
    errs = errors(BASE.replace("path: /openai", "path: !!null '/openai'"))
    assert errs == ["t.yaml:8: routes[0].path: expected a string, got nothing (null)"], errs
    c = parse(BASE.replace("${K:-}", '!!str "012"').replace("provider: openai", "provider: !!str 'openai'"))
    assert c.upstreams["openai"].api_key == "012"  # the default tag, written out, is fine


@pytest.mark.parametrize("url,words", [
    ("http://127.0.0.1\\0:9", "bad URL 'http://127.0.0.1\\x00:9': contains control character 0x00"),
    ("http://127.0.0.1:9/a\\tb", "contains control character 0x09"),  # was dropped without a word
    ("http://127.0.0.1:9/a\\nb", "contains control character 0x0a"),
    ("http://a b:9", "bad URL 'http://a b:9': invalid host"),
    ("http://%zz:9", "invalid host"),
    ("http://[zz::1]:9", "invalid host"),
    ("http://127.0.0.1:0", "bad URL 'http://127.0.0.1:0': port must be between 1 and 65535"),
    ("http://127.0.0.1:", "port must be between 1 and 65535"),
    ("http://[::1]:/v1", "port must be between 1 and 65535"),
])
def test_bad_upstream_urls(url, words):
    errs = errors(BASE.replace("https://api.openai.com", f'"{url}"'))
    assert len(errs) == 1 and errs[0].startswith("t.yaml:4: upstreams.openai.url: ") and words in errs[0], errs


def test_good_upstream_urls_still_pass():
    for url in ("http://localhost:8000/v1", "http://[::1]:9", "http://my_host.internal:80/", "http://b\u00fccher.example",
                "http://127.0.0.1:9/a%20b", "HTTP://Example.COM."):
        parse(BASE.replace("https://api.openai.com", f'"{url}"'))


def test_a_proxy_url_in_a_message_shows_only_its_origin():
    errs = errors(BASE.replace("api_key: ${K:-}", "proxy: 'http://proxy:3128/tok-hunter2#frag-hunter2'"))
    assert errs == ["t.yaml:6: upstreams.openai.proxy: bad URL 'http://proxy:3128/***': must not carry a query "
                    "or fragment"], errs
    errs = errors(BASE.replace("api_key: ${K:-}", "proxy: 'http://proxy:0/tok-hunter2'"))
    assert len(errs) == 1 and "hunter2" not in errs[0] and "'http://proxy:0/***'" in errs[0], errs
    # an upstream URL keeps its path (it helps find the mistake), never its fragment
    errs = errors(BASE.replace("https://api.openai.com", "'http://h:0/v1#frag-hunter2'"))
    assert len(errs) == 1 and "hunter2" not in errs[0] and "'http://h:0/v1#***'" in errs[0], errs


def test_route_paths_must_be_printable_ascii():
    # Matching uses the raw percent-encoded path: '/ü' was accepted and could never match.
    errs = errors(BASE.replace("path: /openai", "path: /\u00fc"))
    assert errs == ["t.yaml:8: routes[0].path: route path must be printable ASCII: percent-encode it ('/%C3%BC')"]
    for raw in ('"/a\\x01b"', '"/a\\tb"', '"/a\\x7f"', '"/a\\u0085"'):
        errs = errors(BASE.replace("path: /openai", f"path: {raw}"))
        assert errs == ["t.yaml:8: routes[0].path: route path must be printable ASCII: percent-encode it"], errs
    assert parse(BASE.replace("path: /openai", "path: /%C3%BC/v1")).routes[0].path == "/%C3%BC/v1"


def test_a_header_that_api_key_sets_conflicts_with_it(tmp_path):
    # The configured header silently won over the key (or the key over it, whichever came last).
    for provider, header in (("openai", "Authorization"), ("anthropic", "x-api-key"), ("azure", "Api-Key"),
                             ("gemini", "X-Goog-Api-Key")):
        text = BASE.replace("provider: openai", f"provider: {provider}").replace(
            "api_key: ${K:-}", f"api_key: sk-x\n    headers:\n      X-Other: 1\n      {header}: v")
        assert errors(text) == [f"t.yaml:9: upstreams.openai.headers.{header}: conflicts with api_key (the key "
                                f"is sent in {header}): set one of them"], provider
    (tmp_path / "key").write_text("sk-file")
    errs = errors(BASE.replace("api_key: ${K:-}", f"api_key_file: {tmp_path / 'key'}\n    headers: {{authorization: b}}"))
    assert len(errs) == 1 and "headers.authorization: conflicts with api_key" in errs[0], errs
    # without a key the header is how auth is done; another provider's header is no conflict
    assert parse(BASE.replace("api_key: ${K:-}", "headers: {Authorization: Bearer x}")).upstreams["openai"].headers
    parse(BASE.replace("provider: openai", "provider: anthropic").replace(
        "api_key: ${K:-}", "api_key: k\n    headers: {Authorization: Bearer x}"))


def test_header_names_differing_only_in_case_are_one_header():
    errs = errors(BASE.replace("api_key: ${K:-}", "headers: {X-A: '1', x-a: '2'}"))
    assert errs == ["t.yaml:6: upstreams.openai.headers.x-a: same header as 'X-A' (header names are "
                    "case-insensitive)"], errs


def test_admin_listen_overlap_compares_addresses_not_text():
    # Host strings were compared: these all bind what listen binds, and each passed.
    for listen, admin in (("127.0.0.1:8080", '"[::ffff:127.0.0.1]:8080"'), ('"[::1]:8080"', '"[0:0::1]:8080"'),
                          ("127.0.0.1:8080", "localhost:8080"), ('"[::1]:8080"', "LOCALHOST:8080"),
                          ("localhost:8080", "127.0.0.1:8080"), ("127.0.0.1:8080", '"[::]:8080"'),
                          ('"[::ffff:0.0.0.0]:8080"', "127.0.0.1:8080")):
        errs = errors(f"admin_listen: {admin}\n" + BASE.replace("127.0.0.1:8080", listen))
        assert len(errs) == 1 and errs[0].startswith("t.yaml:1: admin_listen: ") and "overlaps listen" in errs[0], errs
    for listen, admin in (("127.0.0.1:8080", "127.0.0.2:8080"), ("localhost:8080", "127.0.0.1:9090"),
                          ("127.0.0.1:8080", '"[::2]:8080"'), ("example.com:8080", "127.0.0.1:8080")):
        parse(f"admin_listen: {admin}\n" + BASE.replace("127.0.0.1:8080", listen))


def test_a_client_key_with_outer_whitespace_is_refused(tmp_path):
    # A presented key is stripped (SDKs and proxies trim header values): a key stored
    # with spaces around it passed check and then refused every request.
    (tmp_path / "key").write_text("  rk-spaced-key-0123456789  \n")
    for client in ('{key: " rk-spaced-key-0123456789"}', f"{{key_file: {tmp_path / 'key'}}}"):
        errs = errors(BASE + f"clients: {{a: {client}}}\n")
        assert len(errs) == 1 and errs[0].endswith("clients.a: the key starts or ends with whitespace: "
                                                   "no request can carry it"), errs
    assert parse(BASE + 'clients: {a: {key: "rk inner space 0123456789"}}\n').clients[0].key


def test_a_file_of_many_problems_lists_a_hundred_and_counts_the_rest():
    """A large file of bad lines (a deploy gone wrong) took a minute and GBs to list every
    problem, with a difflib suggestion each: the first hundred are listed, the rest counted."""
    import time
    text = GOOD + "".join(f"bogus{i}: 1\n" for i in range(20000))
    start = time.monotonic()
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(text, "big.yaml")
    assert time.monotonic() - start < 5
    problems = err.value.problems
    assert len(problems) == yamlconf.walker.MAX_PROBLEMS + 1
    assert all(p.why.startswith("unknown key") for p in problems[:-1])
    assert str(problems[-1]) == f"big.yaml: ... and {20000 - yamlconf.walker.MAX_PROBLEMS} more problems"


@pytest.mark.parametrize("host", ["256.1.1.1", "host name", "1.2.3.4.5", "a/b"])
def test_a_listen_host_that_cannot_be_bound_is_an_error_in_check(host):
    """check said ok to addresses run then failed to bind (Name or service not known)."""
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(GOOD.replace("127.0.0.1:8080", f"'{host}:8080'"), "c.yaml")
    assert "c.yaml:1: listen: bad listen host" in str(err.value)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "localhost.", "ip6-localhost", "a_b",
                                  "127.1", "0.0.0.0", "my-host.example.com"])
def test_listen_hosts_the_resolver_takes_still_parse(host):
    assert cfg.parse(GOOD.replace("127.0.0.1:8080", f"'{host}:8080'")).listen.host == host


def test_an_ipv4_mapped_loopback_listener_is_loopback():
    c = cfg.parse(GOOD.replace("listen: 127.0.0.1:8080", "listen: '[::ffff:127.0.0.1]:8080'"),
                  env={"OPENAI_API_KEY": "sk-test-0123456789"})
    assert not c.warnings


def test_a_null_client_routes_is_every_route_not_none():
    """Null means the default everywhere in the file: for a client's routes, all of them."""
    c = cfg.parse(GOOD + "clients:\n  a: {key: rk-0123456789abcdef, routes: }\n")
    assert c.clients[0].routes is None


@pytest.mark.parametrize("key", ['"\\tsk-0123456789"', '"sk-0123456789 "', '" sk-0123456789"'])
def test_an_api_key_with_a_tab_or_surrounding_space_is_an_error(key):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(GOOD.replace("${OPENAI_API_KEY:-}", key), "c.yaml")
    text = str(err.value)
    assert "c.yaml:6: upstreams.openai.api_key: the key starts or ends with whitespace" in text
    assert "sk-0123456789" not in text


def test_check_with_an_empty_config_path_is_an_error(tmp_path):
    """An empty variable in `relayd check -c "$NEW"` validated $RELAYD_CONFIG instead."""
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    import os
    import sys
    out = subprocess.run([sys.executable, "-m", "relayd", "check", "-c", ""], capture_output=True,
                         text=True, env={**os.environ, "RELAYD_CONFIG": str(good)})
    assert out.returncode != 0 and "config file path is empty" in out.stderr, out


@pytest.mark.parametrize("url,why", [
    ("http://h/a/../b", "dot segments"), ("http://h/a b", "spaces"), ("http://h/%zz", "escape")])
def test_an_upstream_url_path_yarl_would_rewrite_is_an_error(url, why):
    """/a/../b went upstream as /b, a space as %20, /%zz as /%25zz: another path than written."""
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(GOOD.replace("https://api.openai.com", url), "c.yaml")
    assert "c.yaml:4: upstreams.openai.url: bad URL" in str(err.value) and why in str(err.value)


def test_a_proxy_url_with_a_path_is_an_error():
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(GOOD.replace("provider: openai", "provider: openai\n    proxy: http://p:3128/x"), "c.yaml")
    assert "a proxy URL has no path" in str(err.value)

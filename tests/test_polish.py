"""What an operator and an SDK user see when relayd itself answers or logs a failure."""

from __future__ import annotations

import anthropic
import pytest

from fakes import free_port


def test_anthropic_sdk_sees_request_id_on_relayds_own_error(make_relayd):
    """The Anthropic SDK reads `request-id`; relayd's own errors carry it on Anthropic routes."""
    port, dead = free_port(), free_port()
    r = make_relayd(f"""
listen: 127.0.0.1:{port}
defaults: {{timeouts: {{connect: 1, first_byte: 2, idle: 2, total: 5}}}}
upstreams:
  a: {{url: "http://127.0.0.1:{dead}", provider: anthropic, api_key: "sk-ant-polish-KEY"}}
routes:
  - {{path: /anthropic, upstream: a}}
""")
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}/anthropic", api_key="x",
                                 max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as ei:
        client.messages.create(model="claude-x", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    err = ei.value
    assert err.status_code == 502 and err.request_id
    assert err.response.headers["x-request-id"] == err.request_id
    assert err.response.headers["server"] == "relayd"
    assert err.body["error"]["type"] == "api_error"
    assert "cannot connect to upstream 'a': connection refused" in err.message
    # the operator's log says why the attempt failed, not only that it did
    line = r.wait_access(1)[-1]
    failed = [l for l in r.logs() if l.get("event") == "upstream attempt failed"]
    assert failed and failed[-1]["cause"] == "cannot connect to upstream 'a': connection refused"
    assert failed[-1]["request_id"] == line["request_id"] == err.request_id


def test_daemon_logs_config_warnings_and_env_hint_on_reload(make_relayd, fake):
    """What `check` warns about reaches the journal too, at start and after a reload; a
    reload that fails on a missing variable says that the environment needs a restart."""
    import signal

    from conftest import basic_config
    from test_operations import wait_for

    port = free_port()
    exposed = basic_config(fake.url, port).replace("listen: 127.0.0.1:", "listen: 0.0.0.0:", 1)
    r = make_relayd(exposed)
    warned = lambda: [l for l in r.logs() if l.get("event") == "config warning"]  # noqa: E731
    assert wait_for(lambda: len(warned()) >= 1)
    assert f"anyone who can reach 0.0.0.0:{port} spends your keys" in warned()[0]["warning"]
    r.config.write_text(exposed + "\n# reload\n")
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: len(warned()) >= 2)  # again after the reload
    r.config.write_text(exposed.replace('"sk-test-openai-KEY1"', "${RELAYD_TEST_UNSET_KEY}"))
    r.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("event") == "reload failed" for l in r.logs()))
    failed = [l for l in r.logs() if l.get("event") == "reload failed"][-1]
    assert "RELAYD_TEST_UNSET_KEY" in failed["errors"][0]
    assert "restart" in failed["hint"]

"""Dot segments are resolved before routing (RFC 3986 §5.2.4), percent-encoded ones too;
nothing forwarded can leave the upstream's base path; other bytes pass as they came."""

from __future__ import annotations

import json
import socket

import pytest

from relayd.routes import resolve


def raw_get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    """One GET with the target exactly as given (clients would normalise it)."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("path, want", [
    ("/a/./b", "/a/b"), ("/a/b/..", "/a/"), ("/a/b/../c", "/a/c"), ("/a/%2e%2E/c", "/c"),
    ("/a/%2E/c", "/a/c"), ("/a/.%2e/c", "/c"), ("//", "//"), ("/a/b%2F..%2Fc", "/a/b%2F..%2Fc"),
    ("/a/.../b", "/a/.../b"), ("/a/..b/c", "/a/..b/c"), ("/a%20b/./c", "/a%20b/c"),
    ("/..", None), ("/a/../..", None), ("/a/%2e%2e/%2e%2e/x", None),
])
def test_resolve(path: str, want: str | None) -> None:
    assert resolve(path) == want


@pytest.mark.parametrize("target", [
    "/openai/../x", "/openai/v1/../../x", "/openai/%2e%2e/x",
    "/openai/v1/%2E%2E/%2e%2e/secret", "/openai/..", "/openai/%2E%2e",
])
def test_climbing_above_the_route_is_400_in_its_format(shared, fake, target: str) -> None:
    before = len(fake.requests)
    status, headers, body = raw_get(shared.port, target)
    assert status == 400, body
    err = json.loads(body)["error"]  # OpenAI's error shape: the /openai route's provider
    assert "climbs above its route" in err["message"] and err["code"] == "invalid_path"
    assert headers["server"] == "relayd"
    assert len(fake.requests) == before  # nothing reached the upstream
    line = shared.wait_access(1, lambda l: l["path"] == target.split("?")[0])[-1]
    assert line["status"] == 400 and line["route"] == "/openai"


def test_climbing_above_root_without_a_route_is_generic_400(shared) -> None:
    status, headers, body = raw_get(shared.port, "/../etc/passwd")
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert "error" in json.loads(body)


def test_anthropic_route_answers_in_anthropic_format(shared, fake) -> None:
    status, _, body = raw_get(shared.port, "/anthropic/v1/../../../x")
    assert status == 400
    assert json.loads(body)["type"] == "error"  # Anthropic's envelope


@pytest.mark.parametrize("target, upstream_path", [
    ("/openai/./v1/chat/echo", "/oai/v1/chat/echo"),
    ("/openai/v1/x/../echo", "/oai/v1/echo"),
    ("/openai/v1/%2e/echo?a=%2e%2e/..&b=./", "/oai/v1/echo?a=%2e%2e/..&b=./"),
    ("/openai/v1/caf%C3%A9%2Fx/../echo", "/oai/v1/echo"),
    ("/openai/v1/a%2Fb/echo", "/oai/v1/a%2Fb/echo"),
    ("/keep/./x/../echo", "/keep/echo"),
])
def test_resolved_path_is_what_the_upstream_gets(shared, target: str, upstream_path: str) -> None:
    status, _, body = raw_get(shared.port, target)
    assert status == 200, body
    assert json.loads(body)["raw_path"] == upstream_path


def test_double_slash_is_not_a_route(shared, fake) -> None:
    before = len(fake.requests)
    status, headers, body = raw_get(shared.port, "//")
    assert status == 404 and headers["server"] == "relayd"
    assert len(fake.requests) == before


@pytest.mark.parametrize("target", [
    "/openai/a%2F..%2F..%2Fz", "/openai/..%2Fx", "/openai/%2e%2e%2fx", "/openai/v1/x%2f..%2f..%2f..%2fsecret",
    "/openai/v1/x%5C..%5C..%5C..%5Csecret", "/openai/v1/x\\..\\..\\..\\secret",
    # review 75: back onto its own route, but out of the upstream's base path below it
    "/openai/..%2Fopenai/x", "/openai/v1/..%2F..%2Fopenai/x",
])
def test_encoded_slashes_that_leave_the_route_are_400(shared, fake, target: str) -> None:
    """Review 74: relayd forwards a path's bytes; an upstream that decodes %2F (or %5C, or
    reads \\ as /) before resolving dot segments — nginx does, in front of vLLM — served
    another route's paths under this route's key, past a client key scoped to this one."""
    before = len(fake.requests)
    status, _, body = raw_get(shared.port, target)
    assert status == 400, body
    err = json.loads(body)["error"]
    assert "leaves its route" in err["message"] and err["code"] == "invalid_path"
    assert len(fake.requests) == before


def test_asterisk_form_and_fragments(shared, fake) -> None:
    """``OPTIONS *`` asks about relayd itself: 400, as nginx (it went upstream as ``/*``
    with relayd's key where a ``/`` route exists).  A fragment takes no part in routing."""
    before = len(fake.requests)
    with socket.create_connection(("127.0.0.1", shared.port), 5) as s:
        s.sendall(b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert len(fake.requests) == before
    status, _, body = raw_get(shared.port, "/openai/v1/echo#/../../../x")
    assert status == 200, body
    assert json.loads(body)["raw_path"] == "/oai/v1/echo"
    # review 78: a "?" inside the fragment made the fragment's text the forwarded query
    status, _, body = raw_get(shared.port, "/openai/v1/echo#x?foo=1")
    assert status == 200, body
    assert json.loads(body)["raw_path"] == "/oai/v1/echo"
    status, _, body = raw_get(shared.port, "/openai/v1/echo?a=1#x?foo=1")
    assert json.loads(body)["raw_path"] == "/oai/v1/echo?a=1"


def test_relayds_own_answers_say_why_in_the_access_line(shared, fake) -> None:
    """Review 72: a request relayd answered itself (404, 400, 431) said only its status in
    the access line; the operator now reads why, as nginx's error log says it."""
    n = len(shared.access())
    assert raw_get(shared.port, "/nowhere/x")[0] == 404
    assert raw_get(shared.port, "/openai/v1/%2e%2e/%2e%2e/%2e%2e/x")[0] == 400
    with socket.create_connection(("127.0.0.1", shared.port), 5) as s:
        s.sendall(b"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
        while s.recv(65536):
            pass
    assert raw_get(shared.port, "/openai/v1/echo")[0] == 200
    lines = shared.wait_access(n + 4)[n:]
    got = {(l["status"], l["path"]): l["error"] for l in lines}
    assert got[(404, "/nowhere/x")] == "no route"
    assert "climbs above its route" in got[(400, "/openai/v1/%2e%2e/%2e%2e/%2e%2e/x")]
    assert got[(400, "/openai/v1/models")].startswith("malformed request")
    assert got[(200, "/openai/v1/echo")] is None

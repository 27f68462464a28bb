"""relayd's config schema: every key declared once, on its dataclass field, with its default.

The generic work (line numbers, ``${VAR}``, typed readers, unknown keys) is in
``yamlconf``; this module says which keys exist and how they relate.  The result is a tree
of frozen dataclasses: a reload builds a new tree and swaps one reference, so nothing may
mutate a config another request is still using.  Credential files are read here, at load
time, so every reload re-reads them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import quote

import yaml
from yarl import URL

from . import providers
from .headers import HOP_BY_HOP
from . import yamlconf as Y
from .yamlconf import key as setting
from .yamlconf import (REQUIRED, ConfigError, Items, Listen, Problem, Walker, parse_duration,
                       parse_listen, parse_size, parse_url, redact_url)

__all__ = ["Config", "Upstream", "Route", "Timeouts", "TLS", "Breaker", "Listen", "Limits", "Client",
           "ListenerTLS", "Defaults", "ConfigError", "Problem", "parse", "load", "parse_duration",
           "parse_size", "parse_listen", "parse_url", "redact_url"]

PROVIDERS = providers.NAMES
LOG_LEVELS = ("debug", "info", "warning", "error")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NETWORK = ipaddress.IPv4Network | ipaddress.IPv6Network
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"  # RFC 3986 pchar and '/': kept as they are


def _proxy(v: str) -> None:
    parse_url(v, origin_only=True)


@dataclass(frozen=True)
class Timeouts:
    """Seconds; 0 disables a timeout."""

    connect: float = setting(10.0, Y.duration, "connecting to the upstream (TCP, TLS, a proxy's CONNECT)")
    # 600: the official SDKs' own timeout; relayd does not give up before the client would.
    first_byte: float = setting(600.0, Y.duration, "request sent until response headers")
    idle: float = setting(120.0, Y.duration, "longest silence between upstream body chunks")
    total: float = setting(3600.0, Y.duration, "the whole response body")
    send: float = setting(60.0, Y.duration, "longest stall writing to the client")


def _finish_tls(w: Walker, node: yaml.Node, path: str, v: dict[str, Any], items: Items) -> None:
    """``ca_file`` is loaded now, as the pools will load it (and into the same cache):
    found only by the workers' pools, a bad bundle failed a reload in every worker after
    ``check`` said ok.  Not with ``verify: false``, which ignores it."""
    if v["verify"] and v["ca_file"] and "ca_file" in items:
        from .upstreams import tls_context  # (upstreams imports this module)
        try:
            tls_context(v["ca_file"])
        except (ssl.SSLError, OSError, ValueError) as exc:
            why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            w.error(items["ca_file"][1], Y.join(path, "ca_file"),
                    f"not a PEM certificate bundle: {Y.show(v['ca_file'])} ({why})")


@dataclass(frozen=True)
class TLS:
    verify: bool = setting(True, Y.boolean, "verify HTTPS upstreams")
    ca_file: str | None = setting(None, Y.string(empty_is_none=True, check=Y.existing_file), "PEM bundle")


@dataclass(frozen=True)
class Breaker:
    failures: int = setting(5, Y.integer(1, 1_000_000), "consecutive failures that open it")
    cooldown: float = setting(30.0, Y.duration, "how long it stays open")


_FRAMING = HOP_BY_HOP | {"content-length", "expect"}


def _headers(w: Walker, node: yaml.Node, path: str, default: Any) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    read = Y.string(nullable=True, secret=True)
    seen: dict[str, str] = {}  # header names are case-insensitive: X-A and x-a are one header
    for name, (k, v) in (w.mapping(node, path, None) or {}).items():
        if not _HEADER_NAME.match(name) or name.lower() in seen:
            w.error(k, Y.join(path, name), f"same header as {seen[name.lower()]!r} (header names are "
                    "case-insensitive)" if name.lower() in seen else "not a valid HTTP header name")
            continue
        seen[name.lower()] = name
        if name.lower() in _FRAMING:
            # These say how the request is framed: one set here would be wrong for every
            # body but the one it fits, and the upstream would read the rest of a body as a
            # request of its own.
            w.error(k, Y.join(path, name), "relayd sets this header itself (framing or "
                                           "hop-by-hop); it cannot be configured")
            continue
        value = read(w, v, Y.join(path, name), None)
        if value:  # a header that interpolates to empty is simply not set
            out.append((name, value))
    return tuple(out)


@dataclass(frozen=True)
class Upstream:
    name: str
    url: URL = setting(REQUIRED, Y.url, "http or https")
    provider: str = setting(REQUIRED, Y.choice(PROVIDERS, "provider"), " | ".join(PROVIDERS))
    api_key: str | None = setting(None, Y.string(empty_is_none=True, secret=True), "never logged", repr=False)
    api_key_file: str | None = setting(None, Y.string(empty_is_none=True), "file holding the key", repr=False)
    api_key_credential: str | None = setting(None, Y.string(empty_is_none=True, check=Y.file_name),
                                         "systemd LoadCredential= name", repr=False)
    max_connections: int = setting(1000, Y.integer(1, 100_000), "pool size")
    pool_wait: float | None = setting(None, Y.typed(parse_duration, nullable=True),
                                  "wait for a pooled connection; null: the route's first_byte")
    keepalive: float = setting(60.0, Y.duration, "idle pooled connection lifetime")
    headers: tuple[tuple[str, str], ...] = setting((), _headers, "static upstream headers", repr=False)
    tls: TLS = setting(TLS(), Y.nested(TLS, finish=_finish_tls), "verify, ca_file")
    proxy: str | None = setting(None, Y.string(empty_is_none=True, check=_proxy), "egress HTTP proxy")
    breaker: Breaker = setting(Breaker(), Y.nested(Breaker), "passive circuit breaker")

    @cached_property
    def base_url(self) -> str:
        """scheme://host[:port]/base, no trailing slash: where the route's paths go."""
        return str(self.url.origin()) + self.url.raw_path.rstrip("/")

    @cached_property
    def origin(self) -> str:
        """scheme://host[:port], computed once: every request joins its path onto it."""
        return str(self.url.origin())

    @property
    def pool_key(self) -> tuple[Any, ...]:
        """What decides whether a warm pool can be kept across a reload (``max_connections``
        does not: the pool kept takes the new limit, ``upstreams.Pool.resize``)."""
        return (self.name, str(self.url.origin()), self.keepalive, self.tls, self.proxy)


def _finish_upstream(w: Walker, node: yaml.Node, path: str, v: dict[str, Any], items: Items) -> None:
    loaded = Y.secret_source(w, items, path, ("api_key", "api_key_file", "api_key_credential"))
    if loaded is not None:
        v["api_key"] = loaded
    key = v["api_key"]
    if key and (key != key.strip() or "\t" in key):  # sent as is, a provider refuses it
        where = next((items[k][1] for k in ("api_key", "api_key_file", "api_key_credential") if k in items), node)
        w.error(where, Y.join(path, "api_key"), "the key starts or ends with whitespace, or holds a "
                                                "tab (value not shown)")
    auth, given = providers.get(v["provider"]).auth_header.lower(), items.get("headers", (node, node))[1]
    for k, _ in given.value if v["api_key"] and isinstance(given, yaml.MappingNode) else ():
        if k.value.lower() == auth and dict(v["headers"]).get(k.value):  # set_auth's header, not empty
            w.error(k, Y.join(path, f"headers.{k.value}"), f"conflicts with api_key (the key is sent "
                                                           f"in {k.value}): set one of them")


def _upstreams(w: Walker, node: yaml.Node, path: str, default: Any) -> Mapping[str, Upstream]:
    items = w.mapping(node, path, None)
    if items is None:
        return MappingProxyType({})
    if not items:
        w.error(node, path, "no upstreams defined")
    w.ctx["declared"] = set(items)
    out = {name: w.build(Upstream, v, Y.join(path, name), extra={"name": name}, finish=_finish_upstream,
                         at=k) for name, (k, v) in items.items()}
    return MappingProxyType(out)


def _route_path(w: Walker, node: yaml.Node, path: str, default: Any) -> str | None:
    ok, prefix = w.text(node, path)
    if not ok or prefix is None:
        return None
    if not prefix.startswith("/"):
        w.error(node, path, f"route path must start with '/', got {w.hold(node, prefix)}")
    elif "?" in prefix or "#" in prefix or " " in prefix:
        w.error(node, path, "route path must not contain '?', '#' or spaces")
    elif not prefix.isascii() or not prefix.isprintable():
        # Requests are matched on their raw, percent-encoded path: '/ü' could never match.
        w.error(node, path, "route path must be printable ASCII: percent-encode it"
                + (f" ({w.hold(node, quote(prefix, safe=_PATH_SAFE))})" if prefix.isprintable() else ""))
    elif any(seg.replace("%2e", ".").replace("%2E", ".") in (".", "..") for seg in prefix.split("/")):
        # Requests are matched after their dot segments are resolved: no path reaches it.
        w.error(node, path, "route path must not contain '.' or '..' segments (or %2e forms)")
    elif re.search(r"%2[fF]|%5[cC]|\\", prefix):
        # A request under it reads as another path once its encoded slashes are read as
        # slashes (``routes.separators_read``), and is refused: no request could use it.
        w.error(node, path, "route path must not contain an encoded slash (%2F, %5C) or '\\': no "
                "request could reach it (a path that leaves its route when these read as '/' is refused)")
    prefix = prefix.rstrip("/") or "/"
    seen: dict[str, int] = w.ctx.setdefault("route_lines", {})
    if prefix in seen:
        w.error(node, path, f"duplicate route path {w.hold(node, prefix)} (first at line {seen[prefix]})")
    else:
        seen[prefix] = w.line_of(node.start_mark)
    return prefix


def _route_upstreams(w: Walker, node: yaml.Node, path: str, default: Any) -> tuple[str, ...]:
    declared: set[str] = w.ctx.get("declared", set())
    names: list[str] = []
    entries = w.sequence(node, path) if isinstance(node, yaml.SequenceNode) else [(path, node)]
    if entries == []:
        w.error(node, path, "needs at least one upstream")
    for sub, n in entries or []:
        ok, name = w.text(n, sub)
        if not ok or name is None:
            continue
        if name not in declared:
            w.error(n, sub, f"unknown upstream {w.hold(n, name)}{Y.suggest(name, declared)}")
        elif name in names:
            w.error(n, sub, f"upstream {name!r} listed twice")
        else:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class Route:
    path: str = setting(REQUIRED, _route_path, "prefix starting with '/'")
    upstreams: tuple[str, ...] = setting(REQUIRED, _route_upstreams, "a name or a failover list",
                                     name="upstream")
    strip_prefix: bool = setting(True, Y.boolean, "remove the prefix before forwarding")
    timeouts: Timeouts = setting(Timeouts(), Y.nested(Timeouts), "overrides defaults.timeouts")
    heartbeat: float = setting(15.0, Y.duration, "overrides defaults.heartbeat")


@dataclass(frozen=True)
class Defaults:
    timeouts: Timeouts = setting(Timeouts(), Y.nested(Timeouts), "connect, first_byte, idle, total, send")
    heartbeat: float = setting(15.0, Y.duration, "upstream silence before an SSE comment; 0 = off")


def _routes(w: Walker, node: yaml.Node, path: str, default: Any) -> tuple[Route, ...]:
    if not isinstance(node, yaml.SequenceNode):
        w.error(node, path, f"expected a list of routes, got a {Y.kind(node)}")
        return ()
    if not node.value:
        w.error(node, path, "no routes defined")
    d: Defaults = w.ctx.get("defaults") or Defaults()
    base = {"timeouts": d.timeouts, "heartbeat": d.heartbeat}
    return tuple(w.build(Route, n, sub, base=base) for sub, n in w.sequence(node, path) or [])


def _finish_limits(w: Walker, node: yaml.Node, path: str, v: dict[str, Any], items: Items) -> None:
    if v["replay_body"] > v["replay_memory"]:
        w.error(items.get("replay_body", (node, node))[1], Y.join(path, "replay_body"),
                "must not be larger than replay_memory")


@dataclass(frozen=True)
class Limits:
    client_header: float = setting(60.0, Y.duration, "time a client gets to send its request headers")
    client_keepalive: float = setting(75.0, Y.duration, "idle client connection lifetime")
    max_request_headers: int = setting(64 << 10, Y.size(1024, 1 << 30), "total request header bytes")
    replay_body: int = setting(8 << 20, Y.size(), "request body buffered for failover, per request")
    replay_memory: int = setting(256 << 20, Y.size(), "all failover buffers of the process")


def _finish_listener_tls(w: Walker, node: yaml.Node, path: str, v: dict[str, Any], items: Items) -> None:
    def no_password() -> str:
        raise ValueError("the key is encrypted (relayd needs an unencrypted key file)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(v["cert"], v["key"], password=no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, ssl.SSLError) else getattr(exc, "strerror", None)
        why = str(exc) if isinstance(exc, ValueError) else {
            "KEY_VALUES_MISMATCH": "the key does not belong to the certificate"}.get(
            str(reason), "not a PEM certificate chain and its private key" + (f" ({reason})" if reason else ""))
        w.error(node, path, f"cannot load cert and key: {why}")


@dataclass(frozen=True)
class ListenerTLS:
    cert: str = setting(REQUIRED, Y.string(check=Y.existing_file), "PEM certificate chain")
    key: str = setting(REQUIRED, Y.string(check=Y.existing_file), "PEM private key (unencrypted)")


@dataclass(frozen=True)
class Client:
    name: str
    key: str | None = setting(None, Y.string(empty_is_none=True, secret=True), "the client's key", repr=False)
    key_sha256: bytes = setting(b"", Y.sha256_hex, "sha256 of the key, 64 hex digits", repr=False)
    routes: tuple[str, ...] | None = setting(None, Y.listof(Y.string()), "route paths; default: all")
    key_file: str | None = setting(None, Y.string(empty_is_none=True), "file holding the key", repr=False)
    key_credential: str | None = setting(None, Y.string(empty_is_none=True, check=Y.file_name),
                                     "systemd LoadCredential= name", repr=False)


def _finish_client(w: Walker, node: yaml.Node, path: str, v: dict[str, Any], items: Items) -> None:
    reported = len(w.problems)
    loaded = Y.secret_source(w, items, path, ("key", "key_file", "key_credential"))
    if len(w.problems) > reported:
        return  # the file or credential could not be read: one message says so, not two
    if loaded is not None:
        v["key"] = loaded
    if v["key"] is not None:
        if v["key"] != v["key"].strip():  # a presented key is stripped: this one could never match
            w.error(node, path, "the key starts or ends with whitespace: no request can carry it")
        if "key_sha256" in items:
            w.error(items["key_sha256"][0], Y.join(path, "key_sha256"), "set either a key or key_sha256")
        v["key_sha256"] = Y.digest(v["key"])
    elif not v["key_sha256"] and not [n for n in ("key", "key_file", "key_credential") if n in items]:
        w.error(node, path, "needs one of key, key_file, key_credential, key_sha256")
    elif not v["key_sha256"]:
        w.error(node, path, "the key is empty")
    if v["routes"] is not None:
        v["routes"] = tuple(p.rstrip("/") or "/" for p in v["routes"])


def _clients(w: Walker, node: yaml.Node, path: str, default: Any) -> tuple[Client, ...]:
    items = w.mapping(node, path, None) or {}
    out = [w.build(Client, v, Y.join(path, n), extra={"name": n}, finish=_finish_client, at=k)
           for n, (k, v) in items.items()]
    w.ctx["client_nodes"] = {n: v for n, (_, v) in items.items()}
    return tuple(out)


def _workers(v: Any) -> int | None:
    if v == "auto":
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 256:
        raise ValueError(f"expected auto or an integer between 1 and 256, got {Y.show(v)}")
    return v


def _admin_listen(v: Any) -> Listen | None:
    return None if v == "" else parse_listen(v)


@dataclass(frozen=True, kw_only=True)
class Config:
    listen: Listen = setting(Listen("127.0.0.1", 8080), Y.listen, "host:port")
    admin_listen: Listen | None = setting(None, Y.typed(_admin_listen, nullable=True), "health and metrics")
    workers: int | None = setting(None, Y.typed(_workers), "auto (None) or 1-256 processes")
    shutdown_grace: float = setting(30.0, Y.duration, "seconds in-flight requests get on SIGTERM")
    log_level: str = setting("info", Y.choice(LOG_LEVELS, "log level", fold=True), " | ".join(LOG_LEVELS))
    access_log: bool = setting(True, Y.boolean, "one JSON line per request")
    defaults: Defaults = setting(Defaults(), Y.remember("defaults", Y.nested(Defaults)), "timeouts, heartbeat")
    limits: Limits = setting(Limits(), Y.nested(Limits, _finish_limits), "client-side limits")
    tls: ListenerTLS | None = setting(None, Y.nested(ListenerTLS, _finish_listener_tls), "serve HTTPS")
    allow: tuple[_NETWORK, ...] = setting((), Y.listof(Y.network), "client networks; empty: all")
    admin_allow: tuple[_NETWORK, ...] = setting((), Y.listof(Y.network), "admin networks; empty: all")
    upstreams: Mapping[str, Upstream] = setting(REQUIRED, _upstreams, "name: {url, provider, ...}")
    routes: tuple[Route, ...] = setting(REQUIRED, _routes, "list of {path, upstream, ...}")
    clients: tuple[Client, ...] = setting((), _clients, "name: {key | key_file | ..., routes}")
    # A ``clients:`` section, even an empty one, means client keys are required: revoking
    # the last client must refuse everyone, not turn the check off (nginx's empty htpasswd).
    client_keys: bool = False
    secrets: frozenset[str] = field(default=frozenset(), repr=False)  # for log scrubbing
    warnings: tuple[str, ...] = ()

    @property
    def timeouts(self) -> Timeouts:
        return self.defaults.timeouts

    @property
    def heartbeat(self) -> float:
        return self.defaults.heartbeat


def _loopback(listen: Listen) -> bool:
    if listen.host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(listen.host)
    except ValueError:
        try:  # (127.1: a form the resolver takes)
            ip = ipaddress.ip_address(socket.inet_ntoa(socket.inet_aton(listen.host)))
        except OSError:
            return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # (::ffff:127.0.0.1 too)


_SHORT_KEY = 16  # client keys shorter than this get a warning


def listen_warnings(listen: Listen, admin: Listen | None, clients: bool, upstreams: Any) -> list[str]:
    """What the listeners expose (``clients``: are client keys required).  Also asked again
    when a reload keeps the running listeners: the file's addresses are then not the ones
    that serve."""
    out = []
    if admin is not None and not admin.overlaps(listen) and not _loopback(admin):
        out.append(f"admin_listen {admin} is not a loopback address: /metrics and "
                   f"/readyz are reachable from the network (restrict with admin_allow)")
    if not _loopback(listen) and not clients and any(u.api_key for u in upstreams):
        out.append(f"listen {listen} is not a loopback address, upstreams have API keys and there "
                   f"is no clients: section: anyone who can reach {listen} spends your keys")
    return out


def key_warnings(path: str) -> list[str]:
    """A private key any local user can read (review 81): nginx does not say it either,
    but sshd refuses such a key, and relayd's unit runs with other services' users around."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []  # (loading it is checked elsewhere)
    if mode & 0o004:
        return [f"tls.key: {path} is readable by every user of this machine: chmod 600 it "
                f"(or 640 with group relayd)"]
    return []


def cert_warnings(path: str, now: float | None = None) -> list[str]:
    """An expired (or not yet valid) listener certificate loads and serves, and every
    client that verifies it refuses the connection: said at check, start and reload."""
    try:
        cert = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]  # the first in the file
        begins, ends = (ssl.cert_time_to_seconds(cert[k]) for k in ("notBefore", "notAfter"))
    except (AttributeError, KeyError, ValueError, ssl.SSLError, OSError):
        return []  # (not decodable here: loading it is checked elsewhere)
    now = time.time() if now is None else now
    day = time.strftime("%Y-%m-%d", time.gmtime(ends))
    if ends < now:
        return [f"tls.cert: the certificate expired on {day}: clients that verify it refuse "
                f"every connection"]
    if begins > now:
        return [f"tls.cert: the certificate is not valid before "
                f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(begins))} UTC"]
    if ends - now < 14 * 86400:
        return [f"tls.cert: the certificate expires on {day}; renew it and reload"]
    return []


def _finish_config(w: Walker, node: yaml.Node, path: str, v: dict[str, Any], items: Items) -> None:
    listen, admin = v["listen"], v["admin_listen"]
    if admin is not None and admin.overlaps(listen):
        w.error(items["admin_listen"][1], "admin_listen", f"{admin} overlaps listen ({listen}): "
                                                          f"give the admin endpoints their own port")
    v["client_keys"] = keys_on = "clients" in items
    warnings = listen_warnings(listen, admin, keys_on, v["upstreams"].values())
    if v["tls"] is not None:
        warnings += cert_warnings(v["tls"].cert) + key_warnings(v["tls"].key)
    if keys_on and not v["clients"]:
        warnings.append("clients: lists no client: every request is refused (401) until one is "
                        "added; remove the section to serve without client keys")
    routes = {r.path for r in v["routes"]}
    owners: dict[bytes, str] = {}
    for c in v["clients"]:
        cnode = w.ctx["client_nodes"][c.name]
        for p in c.routes or ():
            if p not in routes:
                w.error(cnode, f"clients.{c.name}.routes", f"no route with path {Y.show(p)}"
                                                           f"{Y.suggest(p, routes)}")
        if c.key_sha256 in owners:
            w.error(cnode, f"clients.{c.name}", f"same key as client {owners[c.key_sha256]!r}")
        owners.setdefault(c.key_sha256, c.name)
        if c.key:
            w.secrets.add(c.key)
            if len(c.key) < _SHORT_KEY:  # a warning, not an error: configs that run today keep running
                warnings.append(f"clients.{c.name}: the key is {len(c.key)} characters long and can be "
                                f"guessed; use a long random one (openssl rand -hex 24)")
    w.secrets.update(u.api_key for u in v["upstreams"].values() if u.api_key)
    v["secrets"] = frozenset(s for s in w.secrets if s)
    v["warnings"] = tuple(warnings)


def parse(text: str, file: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate config text; raise ConfigError listing every problem."""
    return Walker(file, os.environ if env is None else env).run(
        text, lambda w, root: w.build(Config, root, "", finish=_finish_config))


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    return parse(Y.read_file(path), path, env)

"""Config loading and validation.

The YAML is composed into nodes (not loaded into dicts) so that every problem can be
reported as ``FILE:LINE: field.path: why``; the walker collects *all* problems of a file
before failing, because an operator fixing a config wants the whole list at once.
``${VAR}`` / ``${VAR:-default}`` work anywhere, even inside flow mappings such as
``{Org: ${ORG:-}}``: before composing, each one is swapped for an inert placeholder, and
placeholders are expanded per scalar afterwards, so line numbers stay true and a value
can never change the document's structure.

The result is a tree of frozen dataclasses: a reload builds a new tree and swaps one
reference, so nothing may mutate a config another request is still using.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import yaml
from yarl import URL

PROVIDERS = ("openai", "anthropic", "gemini", "azure", "generic")
LOG_LEVELS = ("debug", "info", "warning", "error")
TIMEOUT_KEYS = ("connect", "first_byte", "idle", "total")
DEFAULT_TIMEOUTS = {"connect": 10.0, "first_byte": 300.0, "idle": 120.0, "total": 3600.0}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}\n]*))?\}")
_PLACEHOLDER = re.compile(r"__relayd_var_(\d+)__")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    path: str
    why: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.why}"


class ConfigError(Exception):
    """Every problem found in one config file."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Timeouts:
    """Seconds; 0 disables a timeout."""

    connect: float = DEFAULT_TIMEOUTS["connect"]
    first_byte: float = DEFAULT_TIMEOUTS["first_byte"]
    idle: float = DEFAULT_TIMEOUTS["idle"]
    total: float = DEFAULT_TIMEOUTS["total"]


@dataclass(frozen=True)
class TLS:
    verify: bool = True
    ca_file: str | None = None


@dataclass(frozen=True)
class Breaker:
    failures: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True)
class Upstream:
    name: str
    url: URL
    provider: str
    api_key: str | None = field(default=None, repr=False)
    max_connections: int = 100
    keepalive: float = 60.0
    headers: tuple[tuple[str, str], ...] = ()
    tls: TLS = TLS()
    proxy: str | None = None
    breaker: Breaker = Breaker()

    @cached_property
    def origin(self) -> str:
        """scheme://host[:port], computed once: every request joins its path onto it."""
        return str(self.url.origin())

    @property
    def pool_key(self) -> tuple[Any, ...]:
        """What decides whether a warm pool can be kept across a reload."""
        return (self.name, str(self.url.origin()), self.max_connections, self.keepalive,
                self.tls, self.proxy)


@dataclass(frozen=True)
class Route:
    path: str
    upstreams: tuple[str, ...]
    strip_prefix: bool
    timeouts: Timeouts
    heartbeat: float


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    listen: Listen
    admin_listen: Listen | None
    shutdown_grace: float
    log_level: str
    access_log: bool
    timeouts: Timeouts
    heartbeat: float
    upstreams: Mapping[str, Upstream]
    routes: tuple[Route, ...]


# --------------------------------------------------------------------------- walking


class _Walker:
    """Turns composed YAML nodes into typed values, recording problems instead of raising."""

    def __init__(self, file: str, env: Mapping[str, str]):
        self.file = file
        self.env = env
        self.problems: list[Problem] = []
        self.vars: list[tuple[str | None, str | None]] = []
        self._ctor = yaml.SafeLoader("")

    def error(self, node: yaml.Node | None, path: str, why: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(Problem(self.file, line, path, why))

    # -- interpolation

    def expand(self, node: yaml.ScalarNode, path: str) -> str | None:
        text = node.value
        if "__relayd_var_" not in text:
            return text
        missing: list[str] = []

        def sub(m: re.Match[str]) -> str:
            name, default = self.vars[int(m.group(1))]
            if name is None:  # "$$"
                return "$"
            value = self.env.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    missing.append(name)
                    return ""
                return default
            return value

        out = _PLACEHOLDER.sub(sub, text)
        for name in missing:
            self.error(node, path, f"environment variable {name} is not set "
                                   f"(write ${{{name}:-}} for an optional value)")
        return None if missing else out

    def scalar(self, node: yaml.Node, path: str) -> tuple[bool, Any]:
        """(ok, python value) of a scalar node after interpolation."""
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, path, f"expected a single value, got a {_kind(node)}")
            return False, None
        text = self.expand(node, path)
        if text is None:
            return False, None
        if text != node.value:
            if not node.style:  # plain scalar (None or '' depending on the loader): type it again
                tag = self._ctor.resolve(yaml.ScalarNode, text, (True, False))
            else:
                tag = "tag:yaml.org,2002:str"
            node = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark, node.style)
        try:
            return True, self._ctor.construct_object(node)
        except Exception as exc:  # YAML's constructors fail in many ways on bad tagged values
            if isinstance(exc, yaml.YAMLError):
                problem = getattr(exc, "problem", None) or str(exc).split("\n")[0]
            else:
                problem = f"not a valid !!{node.tag.rsplit(':', 1)[-1]}"
            self.error(node, path, f"cannot read value: {problem}")
            return False, None

    def mapping(self, node: yaml.Node, path: str, allowed: Iterable[str] | None
                ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping, got a {_kind(node)}")
            return None
        allowed_set = set(allowed) if allowed is not None else None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            ok, key = self.scalar(knode, path)
            if not ok:
                continue
            key = str(key)
            sub = _join(path, key)
            if allowed_set is not None and key not in allowed_set:
                self.error(knode, sub, f"unknown key (allowed: {', '.join(sorted(allowed_set))})")
                continue
            if key in out:
                self.error(knode, sub, "duplicate key")
                continue
            out[key] = (knode, vnode)
        return out

    def typed(self, node: yaml.Node, path: str, check: Callable[[Any], Any], what: str) -> Any:
        ok, value = self.scalar(node, path)
        if not ok:
            return None
        try:
            return check(value)
        except (TypeError, ValueError) as exc:
            reason = str(exc) or f"expected {what}, got {value!r}"
            self.error(node, path, reason)
            return None

    def string(self, node: yaml.Node, path: str, nullable: bool = False) -> Any:
        def check(v: Any) -> Any:
            if v is None and nullable:
                return None
            if isinstance(v, bool) or v is None or isinstance(v, (list, dict)):
                raise ValueError(f"expected a string, got {_show(v)}")
            return str(v)
        return self.typed(node, path, check, "a string")

    def boolean(self, node: yaml.Node, path: str) -> Any:
        def check(v: Any) -> bool:
            if not isinstance(v, bool):
                raise ValueError(f"expected true or false, got {_show(v)}")
            return v
        return self.typed(node, path, check, "a boolean")

    def integer(self, node: yaml.Node, path: str, lo: int, hi: int) -> Any:
        def check(v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected an integer, got {_show(v)}")
            if not lo <= v <= hi:
                raise ValueError(f"must be between {lo} and {hi}, got {v}")
            return v
        return self.typed(node, path, check, "an integer")

    def duration(self, node: yaml.Node, path: str) -> Any:
        return self.typed(node, path, parse_duration, "a duration")


def parse_duration(v: Any) -> float:
    """Seconds as a number, or a string with a unit: ``500ms``, ``30s``, ``5m``, ``1h``."""
    if isinstance(v, bool) or v is None:
        raise ValueError(f"expected a duration (seconds, or '500ms' '30s' '5m' '1h'), got {_show(v)}")
    if isinstance(v, (int, float)):
        seconds = float(v)
    elif isinstance(v, str):
        m = _DURATION.match(v)
        if not m:
            raise ValueError(f"bad duration {v!r} (use seconds, or '500ms' '30s' '5m' '1h')")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    else:
        raise ValueError(f"expected a duration, got {_show(v)}")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"duration must be a finite number >= 0, got {v!r}")
    return seconds


def parse_listen(v: Any) -> Listen:
    if not isinstance(v, str):
        raise ValueError(f"expected host:port, got {_show(v)}")
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", v.strip())
    if not m:
        raise ValueError(f"bad listen address {v!r} (use host:port, or [::1]:port for IPv6)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r} in {v!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return Listen(host, port)


def parse_url(v: Any) -> URL:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a URL, got {_show(v)}")
    try:
        url = URL(v)
    except (ValueError, TypeError):
        raise ValueError(f"bad URL {v!r}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"bad URL {v!r}: scheme must be http or https")
    if not url.host:
        raise ValueError(f"bad URL {v!r}: no host")
    if url.raw_query_string or url.raw_fragment:
        raise ValueError(f"bad URL {v!r}: must not carry a query or fragment")
    if url.user or url.password:
        raise ValueError("bad URL: credentials in the URL are not allowed (use api_key or headers)")
    try:
        url.port
    except ValueError:
        raise ValueError(f"bad URL {v!r}: bad port") from None
    return url


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "value"


def _show(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (list, dict)):
        return "a list" if isinstance(v, list) else "a mapping"
    return repr(v)


# --------------------------------------------------------------------------- sections


def _timeouts(w: _Walker, node: yaml.Node, path: str, base: Timeouts) -> Timeouts:
    items = w.mapping(node, path, TIMEOUT_KEYS)
    if items is None:
        return base
    values = {k: getattr(base, k) for k in TIMEOUT_KEYS}
    for key, (_, vnode) in items.items():
        d = w.duration(vnode, _join(path, key))
        if d is not None:
            values[key] = d
    return Timeouts(**values)


def _upstream(w: _Walker, name: str, knode: yaml.Node, node: yaml.Node) -> Upstream | None:
    path = f"upstreams.{name}"
    items = w.mapping(node, path, ("url", "provider", "api_key", "max_connections", "keepalive",
                                   "headers", "tls", "proxy", "breaker"))
    if items is None:
        return None
    before = len(w.problems)
    if "url" not in items:
        w.error(knode, path, "missing required key 'url'")
    if "provider" not in items:
        w.error(knode, path, f"missing required key 'provider' ({' | '.join(PROVIDERS)})")
    args: dict[str, Any] = {"name": name}
    for key, (k, v) in items.items():
        sub = _join(path, key)
        if key == "url":
            args["url"] = w.typed(v, sub, parse_url, "a URL")
        elif key == "provider":
            p = w.string(v, sub)
            if p is not None and p not in PROVIDERS:
                w.error(v, sub, f"unknown provider {p!r} (use {' | '.join(PROVIDERS)})")
            args["provider"] = p
        elif key == "api_key":
            key_value = w.string(v, sub, nullable=True)
            args["api_key"] = key_value or None
        elif key == "max_connections":
            args["max_connections"] = w.integer(v, sub, 1, 100_000)
        elif key == "keepalive":
            args["keepalive"] = w.duration(v, sub)
        elif key == "headers":
            args["headers"] = _headers(w, v, sub)
        elif key == "tls":
            args["tls"] = _tls(w, v, sub)
        elif key == "proxy":
            proxy = w.string(v, sub, nullable=True)
            if proxy:
                try:
                    parse_url(proxy)
                except ValueError as exc:
                    w.error(v, sub, str(exc))
            args["proxy"] = proxy or None
        elif key == "breaker":
            args["breaker"] = _breaker(w, v, sub)
    if len(w.problems) != before:
        return None
    return Upstream(**{k: v for k, v in args.items() if v is not None})


def _headers(w: _Walker, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...]:
    items = w.mapping(node, path, None)
    out: list[tuple[str, str]] = []
    for key, (k, v) in (items or {}).items():
        sub = _join(path, key)
        if not _HEADER_NAME.match(key):
            w.error(k, sub, "not a valid HTTP header name")
            continue
        value = w.string(v, sub, nullable=True)
        if value is None or value == "":
            continue  # a header that interpolates to empty is simply not set
        if "\r" in value or "\n" in value:
            w.error(v, sub, "header value must not contain line breaks")
            continue
        out.append((key, value))
    return tuple(out)


def _tls(w: _Walker, node: yaml.Node, path: str) -> TLS:
    items = w.mapping(node, path, ("verify", "ca_file"))
    verify, ca_file = True, None
    for key, (_, v) in (items or {}).items():
        if key == "verify":
            verify = w.boolean(v, _join(path, key))
        else:
            ca_file = w.string(v, _join(path, key), nullable=True) or None
            if ca_file and not os.path.isfile(ca_file):
                w.error(v, _join(path, key), f"file not found: {ca_file}")
    return TLS(verify=bool(verify) if verify is not None else True, ca_file=ca_file)


def _breaker(w: _Walker, node: yaml.Node, path: str) -> Breaker:
    items = w.mapping(node, path, ("failures", "cooldown"))
    values: dict[str, Any] = {}
    for key, (_, v) in (items or {}).items():
        sub = _join(path, key)
        values[key] = w.integer(v, sub, 1, 1_000_000) if key == "failures" else w.duration(v, sub)
    return Breaker(**{k: v for k, v in values.items() if v is not None})


def _route(w: _Walker, i: int, node: yaml.Node, upstreams: Mapping[str, Any],
           timeouts: Timeouts, heartbeat: float, seen: dict[str, int]) -> Route | None:
    path = f"routes[{i}]"
    items = w.mapping(node, path, ("path", "upstream", "strip_prefix", "timeouts", "heartbeat"))
    if items is None:
        return None
    before = len(w.problems)
    for required in ("path", "upstream"):
        if required not in items:
            w.error(node, path, f"missing required key '{required}'")
    prefix, names, strip = None, (), True
    for key, (_, v) in items.items():
        sub = _join(path, key)
        if key == "path":
            prefix = w.string(v, sub)
            if prefix is not None:
                if not prefix.startswith("/"):
                    w.error(v, sub, f"route path must start with '/', got {prefix!r}")
                elif "?" in prefix or "#" in prefix or " " in prefix:
                    w.error(v, sub, "route path must not contain '?', '#' or spaces")
                prefix = prefix.rstrip("/") or "/"
                if prefix in seen:
                    w.error(v, sub, f"duplicate route path {prefix!r} (first at line {seen[prefix]})")
                else:
                    seen[prefix] = v.start_mark.line + 1
        elif key == "upstream":
            names = _route_upstreams(w, v, sub, upstreams)
        elif key == "strip_prefix":
            strip = w.boolean(v, sub)
        elif key == "timeouts":
            timeouts = _timeouts(w, v, sub, timeouts)
        elif key == "heartbeat":
            hb = w.duration(v, sub)
            heartbeat = heartbeat if hb is None else hb
    if len(w.problems) != before or prefix is None:
        return None
    return Route(prefix, names, bool(strip), timeouts, heartbeat)


def _route_upstreams(w: _Walker, node: yaml.Node, path: str, upstreams: Mapping[str, Any]
                     ) -> tuple[str, ...]:
    entries = list(enumerate(node.value)) if isinstance(node, yaml.SequenceNode) else [(None, node)]
    if not entries:
        w.error(node, path, "needs at least one upstream")
    names: list[str] = []
    for j, n in entries:
        sub = path if j is None else f"{path}[{j}]"
        name = w.string(n, sub)
        if name is None:
            continue
        if name not in upstreams:
            w.error(n, sub, f"unknown upstream {name!r}")
        elif name in names:
            w.error(n, sub, f"upstream {name!r} listed twice")
        else:
            names.append(name)
    return tuple(names)


def _build(w: _Walker, root: yaml.Node) -> Config | None:
    top = w.mapping(root, "", ("listen", "admin_listen", "shutdown_grace", "log_level",
                               "access_log", "defaults", "upstreams", "routes"))
    if top is None:
        return None
    listen = Listen("127.0.0.1", 8080)
    admin: Listen | None = None
    grace, level, access = 30.0, "info", True
    timeouts, heartbeat = Timeouts(), 15.0
    for key, (_, v) in top.items():
        if key == "listen":
            listen = w.typed(v, key, parse_listen, "host:port") or listen
        elif key == "admin_listen":
            ok, raw = w.scalar(v, key)
            if ok and raw not in (None, ""):
                admin = w.typed(v, key, parse_listen, "host:port")
        elif key == "shutdown_grace":
            g = w.duration(v, key)
            grace = grace if g is None else g
        elif key == "log_level":
            lv = w.string(v, key)
            if lv is not None and lv.lower() not in LOG_LEVELS:
                w.error(v, key, f"unknown log level {lv!r} (use {' | '.join(LOG_LEVELS)})")
            elif lv is not None:
                level = lv.lower()
        elif key == "access_log":
            a = w.boolean(v, key)
            access = access if a is None else a
    if "defaults" in top:
        d = w.mapping(top["defaults"][1], "defaults", ("timeouts", "heartbeat"))
        for key, (_, v) in (d or {}).items():
            if key == "timeouts":
                timeouts = _timeouts(w, v, "defaults.timeouts", timeouts)
            else:
                hb = w.duration(v, "defaults.heartbeat")
                heartbeat = heartbeat if hb is None else hb

    upstreams: dict[str, Upstream] = {}
    declared: set[str] = set()
    if "upstreams" not in top:
        w.error(root, "upstreams", "missing required section")
    else:
        items = w.mapping(top["upstreams"][1], "upstreams", None) or {}
        if not items and isinstance(top["upstreams"][1], (yaml.MappingNode, yaml.ScalarNode)):
            w.error(top["upstreams"][1], "upstreams", "no upstreams defined")
        for name, (k, v) in items.items():
            declared.add(name)
            up = _upstream(w, name, k, v)
            if up is not None:
                upstreams[name] = up

    routes: list[Route] = []
    if "routes" not in top:
        w.error(root, "routes", "missing required section")
    else:
        rnode = top["routes"][1]
        if not isinstance(rnode, yaml.SequenceNode):
            w.error(rnode, "routes", f"expected a list of routes, got a {_kind(rnode)}")
        else:
            if not rnode.value:
                w.error(rnode, "routes", "no routes defined")
            seen: dict[str, int] = {}
            for i, n in enumerate(rnode.value):
                r = _route(w, i, n, dict.fromkeys(declared), timeouts, heartbeat, seen)
                if r is not None:
                    routes.append(r)
    if w.problems:
        return None
    return Config(listen=listen, admin_listen=admin, shutdown_grace=grace,
                  log_level=level, access_log=access, timeouts=timeouts, heartbeat=heartbeat,
                  upstreams=MappingProxyType(upstreams), routes=tuple(routes))


def parse(text: str, file: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate config text; raise ConfigError listing every problem."""
    w = _Walker(file, os.environ if env is None else env)

    def hide(m: re.Match[str]) -> str:
        w.vars.append((m.group(1), m.group(2)) if m.group(0) != "$$" else (None, None))
        return f"__relayd_var_{len(w.vars) - 1}__"

    text = _VAR.sub(hide, text)
    try:
        docs = list(yaml.compose_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        why = " ".join(x for x in (exc.context, exc.problem) if x)
        raise ConfigError([Problem(file, line, "", f"YAML syntax error: {why}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(file, 1, "", f"YAML error: {exc}")]) from None
    docs = [d for d in docs if d is not None]
    if not docs:
        raise ConfigError([Problem(file, 1, "", "config is empty")])
    if len(docs) > 1:
        raise ConfigError([Problem(file, docs[1].start_mark.line + 1, "",
                                   "more than one YAML document in the file")])
    config = _build(w, docs[0])
    if config is None:
        w.problems.sort(key=lambda p: p.line)
        raise ConfigError(w.problems)
    return config


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError([Problem(path, 0, "", f"cannot read config: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem(path, line, "", "config is not valid UTF-8")]) from None
    return parse(text, path, env)

"""Typed values and readers for schemas built on the walker.

A reader is ``read(walker, node, path, default) -> value``: it records problems on the
walker instead of raising, so one pass finds every mistake in a file.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import yaml

from .walker import (ConfigError, Finish, Items, Problem, Reader, Walker, controls, is_null, join, redact_url,
                     show, suggest)

__all__ = ["parse_duration", "parse_size", "Listen", "parse_listen", "parse_url", "typed", "string",
           "integer", "size", "boolean", "duration", "listen", "url", "choice", "nested", "listof",
           "remember", "existing_file", "file_name", "network", "sha256_hex", "secret_source", "digest",
           "read_file", "read_bounded", "CONFIG_MAX", "KEY_MAX"]

CONFIG_MAX, KEY_MAX = 4 << 20, 64 << 10  # bytes: a config file, a key file

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B|B)?\s*$", re.I)
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_duration(v: Any) -> float:
    """Seconds as a number, or a string with a unit: ``500ms``, ``30s``, ``5m``, ``1h``."""
    m = _DURATION.match(v) if isinstance(v, str) else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            seconds = float(v)
        except OverflowError:  # an int past float's range
            raise ValueError("duration too large") from None
    elif m:
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    elif isinstance(v, str):
        raise ValueError(f"bad duration {show(v)} (use seconds, or '500ms' '30s' '5m' '1h')")
    else:
        raise ValueError(f"expected a duration (seconds, or '500ms' '30s' '5m' '1h'), got {show(v)}")
    if seconds == float("inf") and isinstance(v, str):  # '1000...0s': digits past float's range
        raise ValueError("duration too large")
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"duration must be a finite number >= 0, got {show(v)}")
    return seconds


def parse_size(v: Any) -> int:
    """Bytes as an integer, or a string with a binary unit: ``512B``, ``64KiB``, ``8MiB``, ``1GiB``."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    m = _SIZE.match(v) if isinstance(v, str) else None
    if not m or (m.group(2) and m.group(2).lower() not in _UNITS):
        raise ValueError(f"bad size {show(v)} (bytes, or a number with a binary unit B, KiB, MiB, "
                         f"GiB; 1 KiB = 1024 bytes; KB/MB/GB are not accepted)")
    if len(m.group(1)) > 30:  # int() refuses over 4300 digits with advice meant for programmers
        raise ValueError(f"size too large: {show(v)}")
    return int(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def overlaps(self, other: Listen) -> bool:
        """Whether the two cannot both be bound: one port, and one address or a wildcard.

        Addresses are compared as addresses, not as text: ``::ffff:127.0.0.1`` is
        ``127.0.0.1``, ``0:0::1`` is ``::1``, and ``localhost`` is both loopbacks."""
        mine, theirs = _addresses(self.host), _addresses(other.host)
        return self.port == other.port and (mine is None or theirs is None or bool(mine & theirs))


def _addresses(host: str) -> frozenset[Any] | None:
    """The addresses a listen host binds; None for a wildcard; a name other than localhost
    is compared as written (it is resolved only when bound)."""
    if host.lower() == "localhost":
        return frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return frozenset({host.lower()})
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return None if ip.is_unspecified else frozenset({ip})


def parse_listen(v: Any) -> Listen:
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", v.strip()) if isinstance(v, str) else None
    if not m:
        raise ValueError(f"bad listen address {show(v)} (use host:port, or [::1]:port for IPv6)")
    host, digits = m.group(1) or m.group(3), m.group(2) or m.group(4)
    digits = digits.lstrip("0") or "0"  # int() of 4300+ digits raises advice meant for programmers
    port = int(digits) if len(digits) <= 5 else None
    try:
        if m.group(1):
            ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"bad IPv6 address {show(host)} in {show(v)}") from None
    if not m.group(1) and not _bindable_name(host):
        raise ValueError(f"bad listen host {show(host)} in {show(v)} (an IPv4 address such as "
                         f"127.0.0.1, a host name, or [::1] for IPv6)")
    if port is None or not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {'a number too large' if port is None else port}")
    return Listen(host, port)


_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


def _bindable_name(host: str) -> bool:
    """An IPv4 address in any form the resolver takes (``127.1`` too), or a host name to
    resolve when binding: ``256.1.1.1`` or ``host name`` passed ``check`` and failed at start."""
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        pass
    labels = host.removesuffix(".").split(".")
    return (_HOST_NAME.fullmatch(host) is not None and not all(label.isdigit() for label in labels)
            and len(host) <= 253)


def parse_url(v: Any, origin_only: bool = False) -> Any:
    """An http(s) yarl.URL without credentials, query or fragment; errors never echo those
    (nor the path, with origin_only).

    yarl takes what no request can use: control characters (a NUL went into the upstream's
    request line; tab and newline were dropped without a word), hosts like ``a b`` or ``%zz``,
    port 0 or an empty port."""
    from yarl import URL
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a URL, got {show(v)}")
    safe = show(redact_url(v, origin_only))
    if (bad := next((ord(c) for c in v if c < " " or c == "\x7f"), None)) is not None:
        raise ValueError(f"bad URL {safe}: contains control character 0x{bad:02x}")
    try:
        url = URL(v)
        url.port  # noqa: B018 - a bad port only shows when asked for
    except (ValueError, TypeError):
        raise ValueError(f"bad URL {safe}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"bad URL {safe}: scheme must be http or https")
    if not url.host:
        raise ValueError(f"bad URL {safe}: no host")
    try:
        ok_host = ipaddress.IPv6Address(url.raw_host) if ":" in url.raw_host else _HOST_NAME.fullmatch(url.raw_host)
    except ValueError:
        ok_host = None
    if not ok_host:
        raise ValueError(f"bad URL {safe}: invalid host")
    if url.explicit_port == 0 or re.split(r"[/?#]", v.partition("://")[2], 1)[0].endswith(":"):
        raise ValueError(f"bad URL {safe}: port must be between 1 and 65535")
    if url.user or url.password or "@" in v:
        hint = "relayd does not authenticate to a proxy" if origin_only else "use api_key or headers"
        raise ValueError(f"bad URL {safe}: credentials in the URL are not allowed ({hint})")
    if url.raw_query_string or url.raw_fragment or "?" in v or "#" in v:
        raise ValueError(f"bad URL {safe}: must not carry a query or fragment")
    written = v.partition("://")[2].split("/", 1)[1:]  # the path as written
    if written:
        path = "/" + written[0]
        if origin_only and path != "/":
            raise ValueError(f"bad URL {safe}: a proxy URL has no path")
        # yarl rewrites these (/a/../b sent /b, a space %20, /%zz /%25zz): the upstream
        # would get another path than the one written, so they are refused, as in route paths
        if " " in path or re.search(r"%(?![0-9A-Fa-f]{2})", path) or \
                any(seg in (".", "..") for seg in path.split("/")):
            raise ValueError(f"bad URL {safe}: the path must not hold spaces, dot segments or a "
                             f"'%' that starts no escape")
    return url


# --------------------------------------------------------------------------- readers


def typed(check: Callable[[Any], Any], nullable: bool = False) -> Reader:
    """A YAML-typed scalar passed through check (a parse_* function, say)."""
    def read(w: Walker, node: yaml.Node, path: str, default: Any) -> Any:
        return None if nullable and is_null(node) else w.typed(node, path, check)
    return read


def string(nullable: bool = False, secret: bool = False, empty_is_none: bool = False,
           check: Callable[[str], Any] | None = None) -> Reader:
    """A string as written. secret: never printed, no control characters."""
    def read(w: Walker, node: yaml.Node, path: str, default: Any) -> Any:
        ok, v = w.text(node, path, nullable or empty_is_none, secret)
        if secret:
            # Its variables are secret even when the value does not read (``!!int ${KEY}``):
            # the same variable quoted by another field's error was printed (review 80).
            w.mark_secret(node, v if ok else None)
        if secret and ok:
            if (bad := controls(v or "")) is not None:
                w.error(node, path, f"contains control character 0x{bad:02x} (not allowed; value not shown)")
                return None
        if not ok or (empty_is_none and not v) or v is None:
            return None
        try:
            check and check(v)
        except ValueError as exc:
            w.error(node, path, str(exc).replace(show(v), w.hold(node, v)))
        return v
    return read


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {show(v)}")
    return v


def integer(lo: int, hi: int) -> Reader:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {show(v)}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {v}")
        return v
    return typed(check)


def size(lo: int = 0, hi: int = 1 << 40) -> Reader:
    def check(v: Any) -> int:
        if not lo <= (n := parse_size(v)) <= hi:
            raise ValueError(f"must be between {lo} and {hi} bytes, got {show(v)}")
        return n
    return typed(check)


boolean, duration, listen, url = typed(_bool), typed(parse_duration), typed(parse_listen), typed(parse_url)


def choice(options: Iterable[str], what: str = "value", fold: bool = False) -> Reader:
    """One of a fixed set of words, with a 'did you mean' when it is close to one."""
    opts = tuple(options)

    def read(w: Walker, node: yaml.Node, path: str, default: Any) -> Any:
        ok, v = w.text(node, path)
        if ok and v is not None and (v.lower() if fold else v) in opts:
            return v.lower() if fold else v
        if ok and v is not None:
            w.error(node, path, f"unknown {what} {w.hold(node, v)}{suggest(v, opts)} (use {' | '.join(opts)})")
        return None
    return read


def nested(cls: type, finish: Finish | None = None) -> Reader:
    """A sub-mapping built as cls; keys left out keep the inherited (default) values; null: default."""
    def read(w: Walker, node: yaml.Node, path: str, default: Any) -> Any:
        if is_null(node):
            return default
        base = {f.name: getattr(default, f.name) for f in dataclasses.fields(cls)} \
            if isinstance(default, cls) else None
        return w.build(cls, node, path, base=base, finish=finish)
    return read


def listof(item: Reader) -> Reader:
    """A list (a single value counts as a list of one) read into a tuple."""
    def read(w: Walker, node: yaml.Node, path: str, default: Any) -> Any:
        if is_null(node):  # (as everywhere: null is the default, not an empty list)
            return default
        single = isinstance(node, yaml.ScalarNode)
        entries = [(path, node)] if single else w.sequence(node, path)
        return None if entries is None else tuple(item(w, n, p, None) for p, n in entries)
    return read


def remember(name: str, read: Reader) -> Reader:
    """A reader whose result later sections may look at, as ``w.ctx[name]``."""
    def wrapped(w: Walker, node: yaml.Node, path: str, default: Any) -> Any:
        w.ctx[name] = read(w, node, path, default)
        return w.ctx[name]
    return wrapped


def existing_file(path: str) -> None:
    """A check for string(): the file must exist now (not only when first used), and be a
    regular file: OpenSSL reading a FIFO would hang ``check`` and every reload."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as exc:
        raise ValueError(f"file not found: {show(path)}" if exc.errno == errno.ENOENT
                         else f"cannot read {show(path)}: {exc.strerror}") from None
    if not regular:
        raise ValueError(f"not a regular file: {show(path)}")


def file_name(v: str) -> None:
    """A check for string(): a bare file name, no directory part."""
    if not v or "/" in v or v in (".", ".."):
        raise ValueError(f"bad credential name {show(v)} (a file name in $CREDENTIALS_DIRECTORY, no '/')")


def network(w: Walker, node: yaml.Node, path: str, default: Any) -> Any:
    """An IP network in CIDR form (a bare address is a /32 or /128)."""
    ok, text = w.text(node, path)
    if not ok or text is None:
        return None
    try:
        net = ipaddress.ip_network(text.strip())
        mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
        if mapped is not None and net.prefixlen >= 96:
            # Peers are matched as IPv4 (a dual-stack socket's ::ffff:a.b.c.d is a.b.c.d),
            # so an entry written in the mapped form means its IPv4 network.
            return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
        return net
    except ValueError:
        try:
            fixed = ipaddress.ip_network(text.strip(), strict=False)
            w.error(node, path, f"{w.hold(node, text)} has host bits set; did you mean '{fixed}'?")
        except ValueError:
            w.error(node, path, f"bad address or CIDR {w.hold(node, text)} (e.g. 10.0.0.0/8, ::1)")
    return None


def sha256_hex(w: Walker, node: yaml.Node, path: str, default: Any) -> bytes:
    """A sha256 digest written as 64 hex digits (never printed: it names a key)."""
    ok, text = w.text(node, path, nullable=True)
    if ok and text and re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    if ok and text:
        w.error(node, path, "expected 64 hex digits (the sha256 of the key, e.g. from sha256sum)")
    return b""


def secret_source(w: Walker, items: Items, path: str, names: tuple[str, str, str]) -> str | None:
    """A secret from whichever of (literal, FILE, systemd credential NAME) keys is set.

    Files are read now, so a reload re-reads them; one trailing newline is dropped. The
    literal key is read by its own reader: None here means "not from a file".
    """
    given = [n for n in names if n in items and not is_null(items[n][1])]
    if len(given) > 1:
        w.error(items[given[1]][0], join(path, given[1]),
                f"set at most one of {', '.join(names)} (also set: {given[0]})")
    if len(given) != 1 or given[0] == names[0]:
        return None
    sub, node = join(path, given[0]), items[given[0]][1]
    ok, ref = w.text(node, sub)
    if not ok or not ref:
        return None
    if given[0] == names[2]:
        if not w.env.get("CREDENTIALS_DIRECTORY"):
            w.error(node, sub, "$CREDENTIALS_DIRECTORY is not set (systemd sets it for "
                               "LoadCredential=; set it yourself to run by hand)")
            return None
        ref = os.path.join(w.env["CREDENTIALS_DIRECTORY"], ref)
    try:
        value = read_bounded(ref, KEY_MAX).decode("utf-8").removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not UTF-8 text"
        w.error(node, sub, f"cannot read {ref}: {why}")
        return None
    w.secrets.add(value)
    w.outside_secrets.add(value)  # not in the file: hidden wherever a message quotes it
    if not value or (bad := controls(value)) is not None:
        w.error(node, sub, f"{ref} is empty" if not value else
                f"{ref} contains control character 0x{bad:02x} (value not shown)")
        return None
    return value


def digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def read_bounded(path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, else OSError saying why.

    Opened non-blocking, so opening a FIFO cannot hang; anything but a regular file (a FIFO,
    /dev/zero, a directory) is refused, and reading stops past the limit, so a file that keeps
    growing cannot take memory without bound."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = bytearray()
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
        if len(data) > limit:
            unit = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"
            raise OSError(errno.EFBIG, f"larger than {unit} (the limit)")
        return bytes(data)
    finally:
        os.close(fd)


def read_file(path: str) -> str:
    """The UTF-8 text of a config file, or ConfigError naming the file (and line)."""
    try:
        raw = read_bounded(path, CONFIG_MAX)
    except OSError as exc:
        raise ConfigError([Problem(path, 0, "", f"cannot read config: {exc.strerror or exc}")]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(path, raw[: exc.start].count(b"\n") + 1, "",
                                   "config is not valid UTF-8")]) from None

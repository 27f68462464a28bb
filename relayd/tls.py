"""TLS on the main listener: a new SSLContext per certificate, under the listener's.

asyncio's server keeps the context it was given.  Loading a renewed pair into that context
(``load_cert_chain``) replaced the old pair only where the key type was the same: OpenSSL
keeps a certificate per key type, so an ECDSA pair loaded over an RSA one left the RSA
certificate serving every client that prefers RSA, until a restart (review 81; certbot
2.0 makes ECDSA keys by default).  Each pair therefore gets a context of its own, and the
listener's context picks the current one for every handshake from its SNI callback, which
OpenSSL calls for every ClientHello, with a server name or without.  Connections already
up keep theirs (``ListenerCert.reload``).

The files are read once per load and their bytes go into a scratch context first: a bad
certificate, a key that does not match, or a half-written renewal fails there, as a reload
failure, and the live context keeps serving the old pair.  The live context then loads
the same bytes, never the files again, so a renewal that lands in between cannot slip in
unchecked.  The last pair that passed (``check``) is kept, and with workers the main process
sends those bytes with each config: every worker, and one forked later (a restart),
serves the pair the main process checked, never whatever the files hold by then (a
half-written renewal on disk crashed a restarted worker at start).

OpenSSL loads a chain only from a file, so the bytes are handed to it through memfds
(``/proc/self/fd/N``), which never touch the disk.
"""

from __future__ import annotations

import os
import ssl

from .config import Config, ConfigError, ListenerTLS, Problem

Pem = tuple[bytes, bytes]  # the certificate chain and the key, as read
_checked: dict[tuple[str, str], Pem] = {}  # the last pair that passed ``check``, by its files


def _no_password() -> str:
    raise ValueError("the key is encrypted (relayd needs an unencrypted key file)")


def _read(cfg: ListenerTLS) -> Pem:
    with open(cfg.cert, "rb") as f:
        cert = f.read()
    with open(cfg.key, "rb") as f:
        key = f.read()
    return cert, key


def _load(ctx: ssl.SSLContext, pem: Pem) -> None:
    fds: list[int] = []
    try:
        for data in pem:
            fd = os.memfd_create("relayd-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}",
                            password=_no_password)
    finally:
        for fd in fds:
            os.close(fd)


def new_context(cfg: ListenerTLS, pem: Pem | None = None) -> ssl.SSLContext:
    """A server context: TLS 1.2 or newer, the system's default ciphers, HTTP/1.1 by ALPN;
    the pair from ``pem``, else from the files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])
    _load(ctx, pem if pem is not None else _read(cfg))
    return ctx


def kept(cfg: ListenerTLS | None) -> Pem | None:
    """The bytes of the last pair that passed ``check`` (or that the main process sent), if
    they are ``cfg``'s files."""
    return _checked.get((cfg.cert, cfg.key)) if cfg is not None else None


def keep(cfg: ListenerTLS | None, pem: Pem | None) -> None:
    """Make ``pem`` the pair of ``cfg`` that reloads and forked workers load: a worker keeps
    what its main process checked, and a rolled-back reload the pair it rolled back to."""
    _checked.clear()
    if cfg is not None and pem is not None:
        _checked[(cfg.cert, cfg.key)] = pem


class ListenerCert:
    """The listener's TLS context (None: plain HTTP), the context of the pair it serves
    now (``current``), and the files that pair came from."""

    def __init__(self, cfg: ListenerTLS | None) -> None:
        self.config = cfg
        self.context = (new_context(cfg, _checked.get((cfg.cert, cfg.key)))
                        if cfg is not None else None)
        self.current = self.context
        if self.context is not None:
            self.context.sni_callback = self._pick

    def _pick(self, conn: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self.current
        if current is not ctx and current is not None:
            conn.context = current  # this handshake serves the current pair

    def reload(self, new: Config, file: str) -> None:
        """Serve the new pair from the next handshake on.  Raises ConfigError (the reload
        fails, the old certificate keeps serving) if it does not load.  Turning TLS on
        or off needs a new listener, so it waits for a restart, like ``listen``."""
        if self.context is None or new.tls is None:
            return  # (on or off stays as it started: ``lifecycle.load_for_reload``)
        # Bytes that passed ``check`` (here, or in the main process for this reload).
        pem = kept(new.tls) or check(new.tls, file)
        try:
            self.current = new_context(new.tls, pem)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise _problem(file, exc) from None
        self.config = new.tls


def check(cfg: ListenerTLS, file: str) -> Pem:
    """Read the pair and load it into a scratch context: ConfigError if it would not serve.
    The bytes that passed are returned and kept for processes forked from this one."""
    try:
        pem = _read(cfg)
        new_context(cfg, pem)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise _problem(file, exc) from None
    _checked.clear()
    _checked[(cfg.cert, cfg.key)] = pem
    return pem


def _problem(file: str, exc: Exception) -> ConfigError:
    why = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else (
        getattr(exc, "strerror", None) or str(exc))
    return ConfigError([Problem(file, 0, "tls", f"cannot load cert and key: {why}")])

"""TLS on the main listener: one SSLContext for the life of the process.

asyncio's server keeps the context it was given, so a renewed certificate cannot come in
through a new context without a new listener.  It does not need one: ``load_cert_chain``
on the same context replaces its certificate and key for every handshake after it, while
connections already up keep theirs.  A reload therefore re-reads the files into the
context the listener already has (``ListenerCert.reload``).

The files are first loaded into a scratch context: a bad certificate, a key that does not
match, or a half-written renewal fails there, as a reload failure, and the live context
keeps serving the old pair.  (A file replaced again in the instant between the two loads
is the one case this cannot catch; the live load then fails the reload the same way.)
"""

from __future__ import annotations

import ssl

from . import logs
from .config import Config, ConfigError, ListenerTLS, Problem


def _no_password() -> str:
    raise ValueError("the key is encrypted (relayd needs an unencrypted key file)")


def new_context(cfg: ListenerTLS) -> ssl.SSLContext:
    """A server context: TLS 1.2 or newer, the system's default ciphers, HTTP/1.1 by ALPN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(cfg.cert, cfg.key, password=_no_password)
    return ctx


class ListenerCert:
    """The listener's TLS context (None: plain HTTP) and the files it was loaded from."""

    def __init__(self, cfg: ListenerTLS | None) -> None:
        self.config = cfg
        self.context = new_context(cfg) if cfg is not None else None

    def reload(self, new: Config, file: str) -> None:
        """Re-read the certificate into the live context.  Raises ConfigError (the reload
        fails, the old certificate keeps serving) if the new files do not load.  Turning
        TLS on or off needs a new listener, so it waits for a restart, like ``listen``."""
        if (self.context is None) != (new.tls is None):
            logs.get().warning("turning tls on or off needs a restart; keeping the listener as it is",
                               tls="on" if self.context is not None else "off")
            return
        if self.context is None or new.tls is None:
            return
        check(new.tls, file)  # scratch: the live context is touched only by a good pair
        try:
            self.context.load_cert_chain(new.tls.cert, new.tls.key, password=_no_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise _problem(file, exc) from None
        self.config = new.tls


def check(cfg: ListenerTLS, file: str) -> None:
    """Load the pair into a scratch context: ConfigError if it would not serve."""
    try:
        new_context(cfg)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise _problem(file, exc) from None


def _problem(file: str, exc: Exception) -> ConfigError:
    why = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else (
        getattr(exc, "strerror", None) or str(exc))
    return ConfigError([Problem(file, 0, "tls", f"cannot load cert and key: {why}")])

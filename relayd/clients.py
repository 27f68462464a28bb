"""Client keys: who may spend the upstream keys, and on which routes.

With a ``clients:`` section every request on the main listener carries a relayd key
exactly where its SDK would put the provider key (``Provider.presented_key`` says where),
so no client needs to know relayd exists beyond its base URL and key.  The presented key
is hashed and looked up by digest, then the digests are compared with
``hmac.compare_digest``: how long a check takes depends on the sha256 of the key, never
on how many of its leading characters were right.

The key never goes further.  ``Forwardable`` is the request as ``forward`` should see it:
every credential header gone and, for a provider that accepts the key as a query
parameter, that parameter gone from the raw query, as is any parameter that carries the
key under another name (the rest keeps its bytes).  An
upstream with an ``api_key`` gets its own key set as always; one without gets no
credential at all — with clients configured, a client's key is relayd's business only.

A ``ClientTable`` belongs to one config generation, like the route table: a request
checks against the clients of the config it started with.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .config import Client
from .providers import CLIENT_CREDENTIALS, Provider, drop_params
from .routes import split_target


@dataclass(frozen=True)
class Refusal:
    """Why a request may not pass: the status and a client-facing sentence (no key in it)."""

    status: int
    message: str
    code: str


class ClientTable:
    """The configured clients of one generation, indexed by the sha256 of their key."""

    def __init__(self, clients: tuple[Client, ...], required: bool = False) -> None:
        # ``required``: the config has a clients: section, even an empty one (then every
        # request is refused: revoking the last client must not open relayd to everyone).
        self.active = required or bool(clients)
        self._by_digest: dict[bytes, Client] = {c.key_sha256: c for c in clients}
        self._routes: dict[str, frozenset[str] | None] = {
            c.name: None if c.routes is None else frozenset(c.routes) for c in clients}

    def identify(self, provider: Provider, headers: Mapping[str, str], query: str
                 ) -> Client | None:
        """The client whose key the request carries, or None."""
        key = provider.presented_key(headers, query)
        if key is None:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        client = self._by_digest.get(digest)
        if client is None or not hmac.compare_digest(client.key_sha256, digest):
            return None
        return client

    def check(self, provider: Provider, headers: Mapping[str, str], query: str,
              route: str) -> tuple[Client | None, Refusal | None]:
        """(the client, None) when the request may use ``route``; else who it was, and why not."""
        client = self.identify(provider, headers, query)
        where = _where(provider)
        if client is None:
            sent = provider.presented_key(headers, query) is not None
            why = "invalid client key" if sent else "missing client key"
            return None, Refusal(401, f"relayd: {why}: send your relayd client key as the API key "
                                      f"({where})", "invalid_api_key")
        allowed = self._routes.get(client.name)
        if allowed is not None and route not in allowed:
            return client, Refusal(403, f"relayd: client '{client.name}' may not use route {route}",
                                   "route_not_allowed")
        return client, None


def _where(provider: Provider) -> str:
    spot = " or ".join(f"{h}: {p}<key>" for h, p in provider.key_spots)
    if provider.key_param:
        spot += f" or ?{provider.key_param}=<key>"
    return spot


def _without_value(query: str, key: str | None) -> str:
    """The raw query minus any parameter whose value is the client's key, whatever its name
    (``?key=`` on an OpenAI route, ``?api_key=``): sent in the wrong place, it is still
    relayd's key, not the upstream's business."""
    if not key or not query:
        return query
    return drop_params(query, lambda p: unquote(p.partition("=")[2]) == key)


class Forwardable:
    """The request minus the client's relayd key, as ``forward`` reads it.

    ``forward`` takes the request's ``headers`` and the query of its ``raw_path``; this
    view overrides those two and passes everything else (body, writer, transport) through
    to the real request, so nothing is copied or re-encoded but the headers mapping.
    """

    __slots__ = ("_request", "headers", "raw_path")

    def __init__(self, request: web.BaseRequest, provider: Provider,
                 speakers: Iterable[Provider] = ()) -> None:
        """``provider``: whose spots the client's key was read from; ``speakers``: every
        provider the route may send to, whose credential parameters all go (a failover
        route from OpenAI to Gemini carried a client's own ``?key=`` to Gemini: review 78)."""
        self._request = request
        headers = CIMultiDict(request.headers)
        for name in CLIENT_CREDENTIALS:
            headers.popall(name, None)
        self.headers = CIMultiDictProxy(headers)
        path, q, query = split_target(request.raw_path)
        if q:
            key = provider.presented_key(request.headers, query)
            query = provider.without_key_param(query)
            for other in speakers:
                if other is not provider:
                    query = other.without_key_param(query)
            query = _without_value(query, key)
            self.raw_path = f"{path}?{query}" if query else path
        else:
            self.raw_path = request.raw_path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def preflight(request: web.BaseRequest) -> bool:
    """A CORS preflight: browsers send it without credentials (the Fetch standard), so it
    cannot carry a client key."""
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


def preflight_answer(request: web.BaseRequest, request_id: str) -> web.Response:
    """With client keys relayd is the gate, so it answers a preflight itself: forwarded,
    a request nobody authenticated went upstream on the operator's key (with any body, a
    slot of the pool held, the breaker charged by the upstream's answer).  CORS grants no
    access (each real request still needs its key): the page may send what it asked."""
    h = request.headers
    out = {"Access-Control-Allow-Origin": h["Origin"], "Vary": "Origin",
           "Access-Control-Allow-Methods": h["Access-Control-Request-Method"],
           "Access-Control-Max-Age": "600", "X-Request-Id": request_id}
    if "Access-Control-Request-Headers" in h:
        out["Access-Control-Allow-Headers"] = h["Access-Control-Request-Headers"]
    return web.Response(status=204, headers=out)

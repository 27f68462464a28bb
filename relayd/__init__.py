"""relayd — a streaming reverse proxy for AI provider APIs.

One request flows one way:

    request → route match → upstream pick → pipe → response

Modules, in that order:

- ``config``     YAML → validated, immutable ``Config`` (every error as FILE:LINE: path: why)
- ``routes``     ``RouteTable``: longest-prefix match, upstream URL joining; one per generation
- ``upstreams``  per-upstream aiohttp pools, kept across reloads; passive circuit breaker
- ``pipe``       the relay: headers, auth, failover before the first byte, body pump,
                 timeouts, heartbeats, one provider-format error event on failure
- ``sse``        sans-I/O SSE block-boundary tracker (bytes in, boundaries out)
- ``providers``  per-provider rules: auth headers, error bodies/events, end markers
- ``usage``      passive token accounting read on the side of the stream
- ``app``        wiring: the one swappable table reference, request ids, admin endpoints
- ``lifecycle``  listen, sd_notify, SIGHUP reload, SIGTERM drain, watchdog
- ``cli``        ``relayd run | check | --version``
- ``logs``, ``metrics``  structlog JSON lines, Prometheus metrics

A reload builds a new ``RouteTable`` and swaps ``App.table``; a request keeps the table
it started with, so nothing in flight changes under it.
"""

__version__ = "0.1.0"

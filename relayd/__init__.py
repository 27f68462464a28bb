"""relayd — a streaming reverse proxy for AI provider APIs.

One request flows one way:

    request → route match → upstream pick → [commit] → stream → response

Modules, in that order:

- ``config``     YAML → validated, immutable ``Config`` (every error as FILE:LINE: path: why)
- ``routes``     ``RouteTable``: longest-prefix match, upstream URL joining; one per
                 generation, held by each request that uses it
- ``upstreams``  per-upstream aiohttp pools, kept across reloads; passive circuit breaker
- ``forward``    before commit: request body (buffered for failover), upstream order,
                 send, failure classification, failover → open response or error response
- ``stream``     after commit: the one stream clock, the copy loop, the one error event
                 → how the stream ended
- ``sse``        sans-I/O SSE block-boundary tracker (bytes in, boundaries out)
- ``providers``  one record per provider: auth header, error body, error events, and the
                 endpoint table of natural stream ends; no other module names a provider
- ``headers``    end-to-end header copying, media types
- ``exchange``   ``Exchange`` (what one request did) and ``End`` (how it ended)
- ``usage``      passive token accounting read on the side of the stream
- ``app``        the handler (the one writer of ``Exchange``), the one swappable table
                 reference, request ids, admin endpoints
- ``lifecycle``  listen, sd_notify, SIGHUP reload, SIGTERM drain, watchdog
- ``cli``        ``relayd run | check | --version``
- ``logs``, ``metrics``  structlog JSON lines, Prometheus metrics

A reload builds a new ``RouteTable`` and swaps ``App.table``; a request keeps the table
it started with (and that table's pools stay open for it), so nothing in flight changes
under it.
"""

__version__ = "0.1.0"

"""relayd — a streaming reverse proxy for AI provider APIs.

One request flows one way:

    request → route match → upstream pick → [commit] → stream → response

Modules, in that order:

- ``allow``      allow lists, checked when a connection is accepted (client and admin
                 listeners)
- ``server``     client connections: head and keep-alive deadlines, head size cap (431),
                 JSON 400 for malformed requests, ``Server: relayd``
- ``config``     relayd's schema, each key declared once with its default → validated,
                 immutable ``Config``; ``yamlconf`` is the generic YAML-with-lines walker
                 under it (every error as FILE:LINE: path: why)
- ``routes``     ``RouteTable``: dot-segment resolution (and the path as an upstream that
                 decodes ``%2F`` reads it), longest-prefix match, upstream URL joining; one per generation (with its ``clients``), held by each
                 request that uses it
- ``clients``    client keys: where each provider's SDK sends a key, constant-time check,
                 401/403, the key removed before forwarding; CORS preflights answered
- ``upstreams``  per-upstream aiohttp pools, kept across reloads; passive circuit breaker
- ``upstream_conn``  the protocol of one pooled connection: closed when it speaks out of
                 turn, an answer junk follows still relayed, each read of a streamed body
                 handed to its stream
- ``upstream_http``  one request on a pooled connection for a body in memory: head and
                 body in one write, the answer from aiohttp's parser (others: aiohttp)
- ``forward``    before commit: upstream order, send, failure classification, failover
                 → open response or error response
- ``body``       the request body: buffered for failover or streamed, the process's
                 replay budget, a client that resets a paused upload noticed
- ``stream``     after commit: the body pushed from the upstream connection's reads to the
                 client transport, backpressure, the one error event → how the stream ended
- ``clock``      each stream's deadlines and heartbeats, lazily re-armed; every stream's
                 next wake in one heap under one loop timer
- ``sse``        sans-I/O SSE block-boundary tracker (bytes in, boundaries out)
- ``providers``  one record per provider: auth header, error body, error events, and the
                 endpoint table of natural stream ends; no other module names a provider
- ``headers``    end-to-end header copying, media types; the upstream's URLs in answer
                 headers (``Location``, Google's upload URL) pointed back through relayd
- ``exchange``   ``Exchange`` (what one request did) and ``End`` (how it ended)
- ``usage``      passive token accounting read on the side of the stream
- ``app``        the handler (the one writer of ``Exchange``), the one swappable table
                 reference, set-up turns under a burst, request ids, access lines, admin
                 endpoints
- ``lean``       smaller stand-ins for aiohttp's per-connection containers (memory per
                 held stream)
- ``lifecycle``  one process: listen, sd_notify, SIGHUP reload, SIGTERM drain, watchdog,
                 uvloop and GC set-up
- ``listeners``  binding listening sockets; the workers' ``SO_REUSEPORT`` listening group
- ``supervisor``, ``workers``  ``workers: N``: the main process binds a socket per worker,
                 validates reloads once, forks and restarts workers, serves the admin
                 listener with summed metrics (``mainadmin``), pings the workers and
                 kills a hung one (``heartbeat``)
- ``tls``        the listener's certificate, re-read on reload
- ``cli``        ``relayd run | check | --version``
- ``demo``       a fake provider for ``make demo``
- ``logs``, ``metrics``  structlog JSON lines (a line that cannot be written is dropped
                 and counted; on the journal's stream each carries its syslog priority), Prometheus metrics (with workers: shared files, space
                 reserved before use, exited workers' counts added into one)

A reload builds a new ``RouteTable`` and swaps ``App.table``; a request keeps the table
it started with (and that table's pools stay open for it), so nothing in flight changes
under it.
"""

__version__ = "0.1.0"

"""Smaller stand-ins for aiohttp's per-connection containers: memory per held stream.

An LLM stream can stay open for minutes with nothing moving, and a busy relay holds
thousands of them, so what each one keeps is what the operator pays for (issue 10's
held-stream figure; bench/PROFILE.md attributes it).  aiohttp gives every queue a
``collections.deque``, and an empty deque is 760 bytes: it allocates a 64-slot block when
made.  Per held stream there are up to four: the client connection's queue of pipelined
requests, the upstream connection's queue of responses, and the buffers of the request
and response body readers.  The queues hold a few items at most and a body reader that
is read to its end, or taken over by ``stream._Pushed``, never buffers again.
"""

from __future__ import annotations

from typing import Any


class SmallQueue(list):  # type: ignore[type-arg]
    """A list that answers what aiohttp asks of these deques: ``append``, ``popleft``,
    ``len`` and truth.  An empty one is 56 bytes.  ``popleft`` is O(n) on a list; the
    queues it stands for hold at most a handful of items (32 pipelined requests at most)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def drop_buffer(reader: Any) -> None:
    """Free a body reader's buffers once nothing can ever be buffered in it again.

    aiohttp's ``StreamReader`` tests its buffer only for emptiness after the end of the
    body (``is_eof``, ``readany``, ``read_nowait``), so an empty tuple serves.
    """
    reader._buffer = ()
    reader._http_chunk_splits = None

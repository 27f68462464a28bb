"""SSE block-boundary tracking, sans-I/O: bytes in, "release this much" out.

relayd never parses or rewrites events; it only needs to know where a block ends (just
after a blank line, WHATWG §9.2.6) so that it can forward complete blocks at once, hold
back the torn tail, and put its own bytes (a heartbeat comment, one error event) only
where no client parser can merge them into an upstream event.

Line ends are CRLF, lone LF or lone CR, in any mix, split anywhere across reads; one
leading BOM is transparent.  Each byte is scanned once: the held tail is never rescanned,
so a 16 MiB event arriving in small reads costs O(n).  The common case (LF-only streams,
OpenAI and Anthropic) runs entirely in ``bytes.rfind``/``count``, and so do mixed and lone-CR
line ends (a few more of them).
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"
MAX_EVENT = 16 * 1024 * 1024


class BoundaryTracker:
    """Splits an SSE byte stream into "complete blocks, release now" and "torn tail, hold".

    ``feed(data)`` returns the bytes that end on a block boundary (possibly ``b""``); the
    rest is held until a later read completes it.  Concatenating every return value and
    the final ``tail`` gives back the input exactly (less a BOM dropped after
    ``interject``).  Once the held tail grows beyond ``max_event`` bytes the tracker gives
    up alignment (``aligned`` turns False) and passes bytes straight through, still
    scanning them: bounded memory matters more than alignment.  At the first block
    boundary after that it is aligned again, so one oversized event costs alignment only
    while it lasts.
    """

    __slots__ = ("_held", "_line_start", "_cr", "_cr_blank", "_content", "_fresh", "_drop_bom",
                 "aligned", "blocks", "max_event")

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._held = bytearray()
        self._line_start = True   # the next unscanned byte starts a line
        self._cr = False          # last scanned byte was a CR: an LF next belongs to it
        self._cr_blank = False    # ... and that CR ended a blank line
        self._content = False     # CR path: the open block has a non-empty line
        self._fresh = True        # nothing seen yet: a BOM may still come
        self._drop_bom = False    # relayd wrote first: a BOM would no longer lead the stream
        self.aligned = True
        self.blocks = 0           # blocks ended (exact for regular streams; extra blank lines may count)
        self.max_event = max_event

    @property
    def tail(self) -> bytes:
        """The held bytes after the last boundary: an incomplete block."""
        return bytes(self._held)

    @property
    def at_boundary(self) -> bool:
        """True when bytes written now start a new block and split nothing.

        A released blank line may end in the CR of a CRLF whose LF has not come yet.  A
        heartbeat still goes there: it is only due after a whole period of upstream silence,
        when a split CRLF has long been completed, and a late LF is one more blank line,
        which dispatches nothing.  Waiting for an LF would starve CR-only streams of
        heartbeats.
        """
        return self.aligned and not self._held

    def interject(self) -> None:
        """relayd wrote bytes of its own (a heartbeat) where the upstream's first bytes
        would go: a BOM arriving now no longer leads the stream, and a client would read
        it as part of the first field's name and lose the first event.  It is dropped."""
        if self._fresh and not self._held:
            self._drop_bom = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""  # (an empty read must not clear a pending CR in _scan)
        if not self.aligned:
            end = self._scan(data, 0)
            if end < 0:
                return data
            self.aligned = True  # the oversized event ended here: hold torn tails again
            self._held += data[end:]
            return data[:end]
        held = self._held
        if not held:
            # The common case in one line: a run of LF-only blocks read whole, after a
            # boundary (so nothing held, no CR pending, no BOM to come).
            # (``find``, not ``in``: on 3.11 ``in`` first tries the needle as an int and
            # makes and clears a TypeError, which doubled the test's cost per event.)
            if (data[-2:] == b"\n\n" and not self._fresh and not self._cr
                    and data.find(b"\r") < 0):
                self.blocks += data.count(b"\n\n")
                return data
            start = 0
            if self._fresh:
                if len(data) < 3 and _BOM.startswith(data):
                    held += data
                    return b""
                self._fresh = False
                if data.startswith(_BOM):
                    if self._drop_bom:
                        data = data[3:]
                    else:
                        start = 3
            end = self._scan(data, start)
            if end == len(data):
                return data
            if end > 0:
                held += data[end:]
                return data[:end]
            held += data
        else:
            scanned = len(held)
            held += data
            start = scanned
            if self._fresh:
                if len(held) < 3 and _BOM.startswith(held):
                    return b""
                self._fresh = False
                if held.startswith(_BOM):
                    if self._drop_bom:
                        del held[:3]
                        start = 0
                    else:
                        start = 3
                else:
                    start = 0  # held back as a would-be BOM, never scanned
            end = self._scan(held, start)
            if end > 0:
                out = bytes(held[:end])
                del held[:end]
                return out
        if len(held) > self.max_event:
            self.aligned = False
            out = bytes(held)
            held.clear()
            return out
        return b""

    def _scan(self, buf: bytes | bytearray, i: int) -> int:
        """Scan buf[i:]; return the offset just after the last blank line in it, or -1."""
        n = len(buf)
        last = -1
        if self._cr:
            self._cr = False
            if i < n and buf[i] == 0x0A:   # second half of a CRLF split across reads
                i += 1
                if self._cr_blank:
                    last = i
        if i >= n:
            return last
        cr = buf.count(b"\r", i)
        if not cr:
            pair, eol = b"\n\n", b"\n"
        elif buf[n - 1] != 0x0D and cr == buf.count(b"\n", i) == buf.count(b"\r\n", i):
            pair, eol = b"\r\n\r\n", b"\r\n"  # CRLF only (Gemini): the same shortcut on pairs
        else:
            pair = eol = b""
        if pair:
            if self._line_start and buf.startswith(eol, i):  # a blank line right at the start
                last = i + len(eol)
                if self._content:
                    self.blocks += 1
            j = buf.rfind(pair, i)
            if j >= 0:
                last = j + len(pair)
                self.blocks += buf.count(pair, i)
            self._content = last < n
            self._line_start = buf.endswith(eol)
            return last
        # Mixed or lone-CR line ends.  A blank line is a line end right after another; at
        # their junction stands "\n\n", "\n\r" or "\r\r" ("\r\n" is one CRLF), so the
        # last one and a count are found by rfind/count in C, like the fast path: a Python
        # step per line end made 1-byte events with lone CRs 150x slower than LF ones (a
        # 9 MB stream held a worker's loop for seconds).
        if self._line_start and (buf[i] == 0x0A or buf[i] == 0x0D):  # a blank line at the start
            last = i + 2 if buf.startswith(b"\r\n", i) else i + 1
            if self._content:
                self.blocks += 1
        for junction in (b"\n\n", b"\n\r", b"\r\r"):
            p = buf.rfind(junction, i)
            if p >= 0:
                end = p + 2
                if end < n and buf[end - 1] == 0x0D and buf[end] == 0x0A:
                    end += 1  # the blank line's CR begins a CRLF
                if end > last:
                    last = end
                self.blocks += buf.count(junction, i)
        self._content = last < n
        self._line_start = buf[n - 1] == 0x0A or buf[n - 1] == 0x0D
        if buf[n - 1] == 0x0D:
            self._cr = True
            self._cr_blank = last == n
        return last

"""A raw TCP byte pipe on uvloop, for bench/floor.py: the floor for any Python relay.

It parses and rewrites nothing; each read is written to the other side from
``data_received``.  Usage: python bench/tcppipe.py LISTEN_PORT UPSTREAM_PORT (127.0.0.1)."""
import asyncio, sys, uvloop

class Up(asyncio.Protocol):
    def __init__(self, down): self.down = down; self.t = None
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.down.t.write(d)
    def connection_lost(self, e): self.down.t.close()

class Down(asyncio.Protocol):
    def __init__(self, port): self.port = port; self.up = None; self.buf = []
    def connection_made(self, t):
        self.t = t
        asyncio.get_running_loop().create_task(self.open())
    async def open(self):
        _, self.up = await asyncio.get_running_loop().create_connection(lambda: Up(self), "127.0.0.1", self.port)
        for b in self.buf: self.up.t.write(b)
        self.buf = None
    def data_received(self, d):
        if self.buf is not None: self.buf.append(d)
        else: self.up.t.write(d)
    def connection_lost(self, e):
        if self.up and self.up.t: self.up.t.close()

async def main():
    port, up = int(sys.argv[1]), int(sys.argv[2])
    srv = await asyncio.get_running_loop().create_server(lambda: Down(up), "127.0.0.1", port, backlog=4096)
    await asyncio.sleep(3600)
uvloop.run(main())

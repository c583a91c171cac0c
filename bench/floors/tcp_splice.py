"""Physical floor: raw uvloop TCP splice (no HTTP parsing), one upstream connection per
inbound connection, with write flow control in both directions.

python -m bench.floors.tcp_splice --port 18100 --upstream 127.0.0.1:18000
"""
import argparse
import asyncio
import os


class _Side(asyncio.Protocol):
    def __init__(self):
        self.transport = None
        self.peer = None  # the other _Side
        self.pending = []  # data received before the peer connected

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        p = self.peer
        if p is None or p.transport is None:
            self.pending.append(data)
        else:
            p.transport.write(data)

    def eof_received(self):
        p = self.peer
        if p is not None and p.transport is not None and p.transport.can_write_eof():
            p.transport.write_eof()
        return True

    def connection_lost(self, exc):
        p = self.peer
        if p is not None and p.transport is not None:
            p.transport.close()

    # the peer writes into us: when our write buffer is full, stop reading from the peer
    def pause_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Inbound(_Side):
    upstream = ("127.0.0.1", 18000)

    def connection_made(self, transport):
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self):
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(_Side, *self.upstream)
        except OSError:
            self.transport.close()
            return
        up.peer = self
        self.peer = up
        for d in self.pending:
            up.transport.write(d)
        self.pending = []


async def serve(port, upstream):
    h, p = upstream.rsplit(":", 1)
    Inbound.upstream = (h, int(p))
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(Inbound, "127.0.0.1", port, backlog=4096, reuse_address=True)
    print(f"tcp splice on 127.0.0.1:{port} -> {upstream} pid={os.getpid()}", flush=True)
    async with srv:
        await srv.serve_forever()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=18100)
    ap.add_argument("--upstream", default=os.environ.get("SG_UPSTREAM", "127.0.0.1:18000"))
    a = ap.parse_args()
    import uvloop

    uvloop.run(serve(a.port, a.upstream))


if __name__ == "__main__":
    main()

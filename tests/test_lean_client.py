"""Tests of gateway/upstream.py against scripted loopback servers (uvloop)."""
from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from gateway.upstream import ConnectTimeout, Pool, UpstreamClosed


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 10))


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":", 1)[1])
    body = await reader.readexactly(n) if n else b""
    return head, body


class Server:
    """Loopback server; `script(reader, writer, state)` handles one connection."""

    def __init__(self, script):
        self.script = script
        self.conns = 0
        self.closed = 0  # connections the client closed (EOF/reset seen)
        self.requests: list[tuple[bytes, bytes]] = []
        self.events: dict[str, asyncio.Event] = {}
        self.port = 0

    def event(self, name):
        return self.events.setdefault(name, asyncio.Event())

    async def __aenter__(self):
        async def handle(reader, writer):
            self.conns += 1
            try:
                await self.script(self, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.srv.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.srv.close()

    async def wait_client_close(self, reader):
        """Wait until the client closes its side."""
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.closed += 1
        self.event("client_closed").set()


def json_reply(body: bytes, extra=b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keepalive_json(srv, reader, writer):
    while True:
        req = await read_request(reader)
        if req is None:
            return
        srv.requests.append(req)
        writer.write(json_reply(b'{"ok":true,"n":%d}' % len(srv.requests), b"X-Raw-Case: KeepMe\r\n"))
        await writer.drain()


def hdrs():
    return [(b"content-type", b"application/json")]


# ------------------------------------------------------------------------------- bodies


def test_content_length_and_raw_headers():
    async def main():
        async with Server(keepalive_json) as s:
            pool = Pool()
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/v1/x?a=1", hdrs(), b'{"q":1}')
            assert r.status == 200
            assert (b"X-Raw-Case", b"KeepMe") in r.headers
            assert await r.read_all() == b'{"ok":true,"n":1}'
            head, body = s.requests[0]
            assert head.startswith(b"POST /v1/x?a=1 HTTP/1.1\r\n")
            assert b"content-length: 7\r\n" in head and b"host: 127.0.0.1:%d\r\n" % s.port in head
            assert body == b'{"q":1}'
            await pool.aclose()

    run(main())


def test_chunked_streaming():
    parts = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]

    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for p in parts:
            writer.write(b"%x\r\n%s\r\n" % (len(p), p))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await srv.wait_client_close(reader)

    async def main():
        async with Server(script) as s:
            pool = Pool()
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            got = []
            while c := await r.read_chunk():
                got.append(c)
            assert b"".join(got) == b"".join(parts)
            assert len(got) >= 2  # delivered as they arrived, not buffered to the end
            assert pool.stats()[("http", "127.0.0.1", s.port)] == (1, 1, 0)  # back in the pool
            await pool.aclose()

    run(main())


def test_read_until_eof_body_not_reused():
    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello ")
        await writer.drain()
        writer.write(b"world")
        await writer.drain()
        writer.close()

    async def main():
        async with Server(script) as s:
            pool = Pool()
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"")
            assert await r.read_all() == b"hello world"
            await asyncio.sleep(0.05)
            assert pool.stats()[("http", "127.0.0.1", s.port)] == (0, 0, 0)
            await pool.aclose()

    run(main())


# ------------------------------------------------------------------------------- pool


def test_keepalive_reuse():
    async def main():
        async with Server(keepalive_json) as s:
            pool = Pool()
            for i in range(5):
                r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
                assert await r.read_all() == b'{"ok":true,"n":%d}' % (i + 1)
            assert s.conns == 1
            assert pool.stats()[("http", "127.0.0.1", s.port)] == (1, 1, 0)
            await pool.aclose()

    run(main())


def test_max_per_host_waiters_and_cancelled_waiter():
    async def script(srv, reader, writer):
        while True:
            req = await read_request(reader)
            if req is None:
                return
            await asyncio.sleep(0.05)
            writer.write(json_reply(b"{}"))
            await writer.drain()

    async def main():
        async with Server(script) as s:
            pool = Pool(max_per_host=2)
            key = ("http", "127.0.0.1", s.port)

            async def one():
                r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
                return await r.read_all()

            tasks = [asyncio.create_task(one()) for _ in range(6)]
            await asyncio.sleep(0.01)
            assert pool.stats()[key] == (2, 0, 4)
            tasks[5].cancel()  # cancelled while waiting for a slot
            res = await asyncio.gather(*tasks, return_exceptions=True)
            assert res[:5] == [b"{}"] * 5 and isinstance(res[5], asyncio.CancelledError)
            assert s.conns == 2
            assert pool.stats()[key] == (2, 2, 0)
            await pool.aclose()

    run(main())


def test_cancel_mid_connect_frees_slot():
    async def main():
        async with Server(keepalive_json) as s:
            pool = Pool(max_per_host=1)
            key = ("http", "127.0.0.1", s.port)
            loop = asyncio.get_running_loop()
            real = loop.create_connection
            gate = asyncio.Event()

            async def slow_connect(*a, **kw):
                await gate.wait()
                return await real(*a, **kw)

            loop.create_connection = slow_connect
            t = asyncio.create_task(pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}"))
            await asyncio.sleep(0.02)
            assert pool.stats()[key] == (1, 0, 0)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            assert pool.stats()[key] == (0, 0, 0)
            loop.create_connection = real
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            assert await r.read_all() == b'{"ok":true,"n":1}'
            await pool.aclose()

    run(main())


def test_stale_keepalive_connection_is_retried_once():
    async def script(srv, reader, writer):
        req = await read_request(reader)
        srv.requests.append(req)
        writer.write(json_reply(b"{}"))  # keep-alive implied, then the server drops it
        await writer.drain()

    async def main():
        async with Server(script) as s:
            pool = Pool()
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            await r.read_all()
            await asyncio.sleep(0)  # do not give the pool time to see the close
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            assert await r.read_all() == b"{}"
            assert s.conns == 2
            await pool.aclose()

    run(main())


# ------------------------------------------------------------------------------- failures


def test_cancel_mid_body_closes_connection():
    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        await srv.wait_client_close(reader)

    async def main():
        async with Server(script) as s:
            pool = Pool()
            key = ("http", "127.0.0.1", s.port)
            got = []

            async def reader_task():
                r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
                while c := await r.read_chunk():
                    got.append(c)

            t = asyncio.create_task(reader_task())
            await asyncio.sleep(0.05)
            assert got == [b"x" * 100]
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            await asyncio.wait_for(s.event("client_closed").wait(), 2)
            assert pool.stats()[key] == (0, 0, 0)
            await pool.aclose()

    run(main())


def test_close_after_full_read_keeps_connection_pooled():
    async def script(srv, reader, writer):
        while True:
            req = await read_request(reader)
            if req is None:
                return
            writer.write(json_reply(b"y" * 5000))
            await writer.drain()

    async def main():
        async with Server(script) as s:
            pool = Pool()
            key = ("http", "127.0.0.1", s.port)
            for _ in range(2):
                r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
                assert await r.read_all() == b"y" * 5000
                r.close()  # fully read: stays pooled
                assert pool.stats()[key] == (1, 1, 0)
            assert s.conns == 1
            await pool.aclose()

    run(main())


def test_abandon_unfinished_response_closes_connection():
    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"z" * 10)
        await writer.drain()
        await srv.wait_client_close(reader)

    async def main():
        async with Server(script) as s:
            pool = Pool()
            key = ("http", "127.0.0.1", s.port)
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            assert await r.read_chunk() == b"z" * 10
            r.close()
            assert pool.stats()[key] == (0, 0, 0)
            await asyncio.wait_for(s.event("client_closed").wait(), 2)
            await pool.aclose()

    run(main())


def stall_after(chunk: bytes):
    """A server script: a chunked 200 with one chunk, then silence until the client leaves."""
    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        await srv.wait_client_close(reader)
    return script


def test_idle_read_timeout():
    async def main():
        async with Server(stall_after(b"hello")) as s:
            pool = Pool(read_timeout=0.2)
            key = ("http", "127.0.0.1", s.port)
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            assert await r.read_chunk() == b"hello"
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                await r.read_chunk()
            assert 0.15 < loop.time() - t0 < 1.0
            assert pool.stats()[key] == (0, 0, 0)
            await asyncio.wait_for(s.event("client_closed").wait(), 2)
            with pytest.raises(asyncio.TimeoutError):
                await r.read_chunk()  # stays dead
            await pool.aclose()

    run(main())


def test_header_timeout_and_total_deadline():
    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:  # one byte every 50 ms: never idle, but never ends
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def main():
        async with Server(script) as s:
            pool = Pool(read_timeout=5)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}", total_timeout=0.3)
            with pytest.raises(asyncio.TimeoutError):
                while await r.read_chunk():
                    pass
            assert loop.time() - t0 < 1.0
            await pool.aclose()

    run(main())


def test_connection_refused():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]  # bound, not listening: refused

        async def main():
            pool = Pool()
            with pytest.raises(ConnectionRefusedError):
                await pool.request("POST", "http", "127.0.0.1", port, "/", hdrs(), b"{}")
            assert pool.stats()[("http", "127.0.0.1", port)] == (0, 0, 0)
            await pool.aclose()

        run(main())


def test_connect_timeout():
    async def main():
        pool = Pool(connect_timeout=0.1)
        loop = asyncio.get_running_loop()

        async def never(*a, **kw):
            await asyncio.sleep(10)

        loop.create_connection = never
        with pytest.raises(ConnectTimeout):
            await pool.request("POST", "http", "127.0.0.1", 9, "/", hdrs(), b"{}")
        assert pool.stats()[("http", "127.0.0.1", 9)] == (0, 0, 0)
        await pool.aclose()

    run(main())


def test_upstream_reset_mid_body():
    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"a" * 100)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()  # RST / close mid-body

    async def main():
        async with Server(script) as s:
            pool = Pool()
            key = ("http", "127.0.0.1", s.port)
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            got = b""
            with pytest.raises(UpstreamClosed) as ei:
                while c := await r.read_chunk():
                    got += c
            assert isinstance(ei.value, ConnectionError)
            assert got == b"a" * 100
            assert pool.stats()[key] == (0, 0, 0)
            await pool.aclose()

    run(main())


def test_read_flow_control_pauses_and_resumes():
    total = 8 * 1024 * 1024

    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        sent = 0
        blk = b"b" * 65536
        while sent < total:
            writer.write(blk)
            sent += len(blk)
            await writer.drain()
            srv.sent = sent
        await srv.wait_client_close(reader)

    async def main():
        async with Server(script) as s:
            s.sent = 0
            pool = Pool()
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            await asyncio.sleep(0.3)  # consumer not reading
            assert r._size < 64 * 1024 + 300_000  # bounded: ~high water + one socket read
            assert r._conn is not None and r._conn.paused
            assert s.sent < total  # the server is blocked by TCP
            n = 0
            while c := await r.read_chunk():
                n += len(c)
            assert n == total
            await pool.aclose()

    run(main())


def test_rejects_header_injection():
    async def main():
        pool = Pool()
        with pytest.raises(ValueError):
            await pool.request("POST", "http", "127.0.0.1", 9, "/", [(b"x-a", b"1\r\nx-b: 2")], b"")
        await pool.aclose()

    run(main())


def test_dropped_response_without_close_frees_slot():
    import gc

    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"q" * 200_000)
        await writer.drain()
        await srv.wait_client_close(reader)

    async def main():
        async with Server(script) as s:
            pool = Pool()
            key = ("http", "127.0.0.1", s.port)
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            await r.read_chunk()
            assert pool.stats()[key] == (1, 0, 0)
            del r  # forgotten: no close(), body unfinished
            gc.collect()
            assert pool.stats()[key] == (0, 0, 0)
            await asyncio.wait_for(s.event("client_closed").wait(), 2)
            await pool.aclose()

    run(main())


def test_read_timeout_is_per_read_across_a_long_stream():
    """One timer per response, armed again while reads go on: a stream whose gaps are each
    under the read timeout runs well past it, and the first longer gap times out."""
    async def script(srv, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(8):  # 8 x 0.1 s: four read timeouts long in all
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        await srv.wait_client_close(reader)  # then silence

    async def main():
        async with Server(script) as s:
            pool = Pool(read_timeout=0.2)
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            loop = asyncio.get_running_loop()
            got, t0 = b"", loop.time()
            with pytest.raises(asyncio.TimeoutError):
                while True:
                    got += await r.read_chunk()
            assert got == b"x" * 8
            assert 0.7 + 0.15 < loop.time() - t0 < 0.7 + 1.0  # the last byte came at ~0.7 s
            assert r._timer is None  # stopped with the response
            await pool.aclose()

    run(main())


def test_read_timer_stops_when_the_response_ends():
    async def main():
        async with Server(keepalive_json) as s:
            pool = Pool(read_timeout=30)
            for _ in range(3):
                r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
                await r.read_all()
                assert r._timer is None
            await pool.aclose()
        async with Server(stall_after(b"x")) as s:
            pool = Pool(read_timeout=30)
            r = await pool.request("POST", "http", "127.0.0.1", s.port, "/", hdrs(), b"{}")
            assert await r.read_chunk() == b"x"
            assert r._timer is not None  # armed by the reads, still running
            r.close()
            assert r._timer is None
            await pool.aclose()

    run(main())

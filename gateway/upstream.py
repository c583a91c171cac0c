"""Upstream client: a lean keep-alive HTTP/1.1 pool on asyncio Protocols + httptools.

Chosen by measurement over aiohttp's client and httpcore (bench/RESULTS.md): at the same
granian relay it cost 35-60% less CPU per request than aiohttp and 3-10x less than
httpcore, and its cancel-safe pool does not leak slots (encode/httpcore#1093).

    pool = Pool(max_per_host=100, connect_timeout=10, read_timeout=300, keepalive_expiry=30)
    resp = await pool.request("POST", "http", "127.0.0.1", 8000, "/v1/chat/completions",
                              [(b"content-type", b"application/json")], body, total_timeout=600)
    try:
        while chunk := await resp.read_chunk():
            ...
    finally:
        resp.close()

Semantics
* Bodies: Content-Length, chunked, and read-until-EOF (that connection is not reused).
  HEAD requests and 204/304 have no body.
* Timeouts: `connect_timeout` per new connection; `read_timeout` is an idle timeout for
  every wait for response bytes (headers and body); `total_timeout` is a deadline over
  acquire + connect + headers + body. Both raise `UpstreamTimeout` (a TimeoutError;
  connect timeouts raise its subclass `ConnectTimeout`). A timed-out response is dead:
  its connection is closed.
* Errors: `UpstreamClosed` (ConnectionError) when the connection dies before the
  response is complete; `UpstreamProtocolError` (ConnectionError) on unparseable bytes;
  connect failures raise the OSError from the loop (ConnectionRefusedError, ...).
* Pool: at most `max_per_host` connections per (scheme, host, port), idle LIFO, waiters FIFO
  (a released connection or a freed slot is handed directly to the oldest waiter).
  Cancel-safe: cancellation during acquire, connect, request write, header wait or
  `read_chunk` frees the slot and closes the connection when a response was in flight.
  A connection returns to the pool only when its response was completely received
  (the remaining buffered body stays with the Response object) and the server allows
  keep-alive; otherwise it is closed. `Response.close()` abandons; a Response that is
  garbage-collected without being finished closes its connection too (the connection
  holds it only weakly).
* Stale keep-alive: if a *reused* connection dies before a single response byte arrived,
  the request is retried once on a new connection (`retry_stale=True`, the usual
  server-closed-idle-connection race; set False to never resend a body).
* Read flow control: `transport.pause_reading()` when more than `high_water` (64 KiB)
  of body is buffered and not yet taken by `read_chunk`; resumed once drained.
* Request headers: caller's list is sent as given, minus Content-Length /
  Transfer-Encoding (recomputed from `body`); Host is added if absent. CR/LF/NUL in
  names or values raise ValueError (no header injection).
"""
from __future__ import annotations

import asyncio
import collections
import socket
import ssl as _ssl
import weakref

import httptools

__all__ = ["Pool", "Response", "UpstreamError", "UpstreamClosed", "UpstreamProtocolError", "UpstreamTimeout",
           "ConnectTimeout"]

HIGH_WATER = 64 * 1024


class UpstreamError(Exception):
    """Base of the failures the relay maps to 502 / 504 / an in-band stream error."""


class UpstreamClosed(UpstreamError, ConnectionError):
    """The upstream connection closed (or reset) before the response was complete."""


class UpstreamProtocolError(UpstreamError, ConnectionError):
    """The upstream sent bytes that are not valid HTTP/1.1."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Idle-read timeout or total deadline (a TimeoutError, so asyncio code sees one)."""


class ConnectTimeout(UpstreamTimeout):
    """Connecting to the upstream took longer than connect_timeout."""


class _ReadTimeout(TimeoutError):
    pass


def _timeout_cb(fut):
    if not fut.done():
        fut.set_exception(_ReadTimeout("upstream read timeout"))


def _check_timeout(ref) -> None:
    """A response's read timer: times out the pending read when it is due, else (reads
    went on meanwhile) is armed again for the current read's due time."""
    r = ref()
    if r is None:
        return
    r._timer = None
    fut = r._waiter
    if fut is None or fut.done():
        return  # no read pending: the next one arms the timer
    due = r._due()
    loop = r._loop
    if loop.time() >= due - 0.001:  # (the loop's timers have millisecond resolution)
        fut.set_exception(_ReadTimeout("upstream read timeout"))
    else:
        r._timer = loop.call_at(due, _check_timeout, ref)


_SKIP_REQ_HEADERS = frozenset((b"content-length", b"transfer-encoding"))
_SPECIAL_LENS = frozenset((4, 14, 17))  # len(b"host"), len(b"content-length"), len(b"transfer-encoding")


def _check_header(n: bytes, v: bytes) -> None:
    if b"\r" in n or b"\n" in n or b"\x00" in n or b":" in n or b"\r" in v or b"\n" in v or b"\x00" in v:
        raise ValueError(f"invalid header {n!r}")


class Response:
    """An upstream response. status and headers are set when `Pool.request` returns."""

    __slots__ = (
        "status",
        "headers",
        "_conn",
        "_loop",
        "_buf",
        "_size",
        "_waiter",
        "_headers_done",
        "_complete",
        "_exc",
        "_finished",
        "_read_timeout",
        "_deadline",
        "_got_bytes",
        "_until_eof",
        "_no_body",
        "_high",
        "_timer",
        "_since",
        "__weakref__",
    )

    def __init__(self, conn, loop, read_timeout, deadline, no_body, high):
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._conn = conn  # attached _Conn while the message is being received
        self._loop = loop
        self._buf: list[bytes] = []
        self._size = 0
        self._waiter = None
        self._headers_done = False
        self._complete = False
        self._exc = None
        self._finished = False  # consumer saw the end (or abandoned)
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._got_bytes = False
        self._until_eof = False
        self._no_body = no_body
        self._high = high
        # One timer per response, not one per read (a uvloop call_later + cancel costs ~2 us,
        # once per streamed event): it checks the pending read's start (`_since`) when it
        # fires and is armed again while reads go on; stopped when the response ends.
        self._timer = None
        self._since = 0.0

    # ---- called by the connection protocol
    def _wake(self):
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _took(self, size: int):
        """The connection appended `size` body bytes to `_buf` (one network read's worth:
        httptools calls back once per HTTP chunk, an SSE event each, so the accounting and
        the wake-up are done once per read, not per chunk)."""
        self._size += size
        if self._size > self._high:
            c = self._conn
            if c is not None:
                c.pause()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc):
        if self._exc is None and not self._complete:
            self._exc = exc
        self._stop_timer()
        self._wake()

    # ---- waiting
    def _due(self) -> float:
        due = self._since + self._read_timeout
        d = self._deadline
        return due if d is None or d > due else d

    def _stop_timer(self) -> None:
        t = self._timer
        if t is not None:
            self._timer = None
            t.cancel()

    async def _wait(self):
        loop = self._loop
        self._since = loop.time()
        if self._due() <= self._since:
            raise _ReadTimeout("upstream total deadline exceeded")
        fut = loop.create_future()
        self._waiter = fut
        if self._timer is None:
            self._timer = loop.call_at(self._due(), _check_timeout, weakref.ref(self))
        try:
            await fut
        finally:
            self._waiter = None

    async def _wait_headers(self):
        while not self._headers_done:
            if self._exc is not None:
                raise self._exc
            try:
                await self._wait()
            except BaseException as e:
                self._abandon()
                if isinstance(e, _ReadTimeout):
                    raise UpstreamTimeout(str(e)) from None
                raise

    # ---- public API
    async def read_chunk(self) -> bytes:
        """Next body bytes as they arrive (everything buffered so far); b"" at the end."""
        while True:
            buf = self._buf
            if buf:
                data = buf[0] if len(buf) == 1 else b"".join(buf)
                buf.clear()
                self._size = 0
                c = self._conn
                if c is not None and c.paused:
                    c.resume()
                return data
            if self._complete:
                self._finished = True
                return b""
            if self._exc is not None:
                self._abandon()
                raise self._exc
            if self._finished:
                raise UpstreamClosed("response was closed")
            try:
                await self._wait()
            except BaseException as e:
                # timeout or cancellation mid-body: the response is abandoned
                self._abandon()
                if isinstance(e, _ReadTimeout):
                    self._exc = UpstreamTimeout(str(e))
                    raise self._exc from None
                raise

    @property
    def at_end(self) -> bool:
        """The whole body has arrived and been read: read_chunk() would return b"" now."""
        return self._complete and not self._buf

    async def read_all(self) -> bytes:
        parts = []
        while True:
            c = await self.read_chunk()
            if not c:
                break
            parts.append(c)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Abandon the response: closes the connection unless the body was fully received
        (then the connection is already back in the pool)."""
        self._abandon()
        self._buf.clear()
        self._size = 0

    def _abandon(self):
        self._finished = True
        self._stop_timer()
        c = self._conn
        if c is not None:
            self._conn = None
            c.wr = None
            c.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


class _Conn(asyncio.Protocol):
    __slots__ = ("pool", "host", "transport", "parser", "wr", "paused", "closed", "idle_since", "nreq", "slot_held",
                 "_sink", "_fed")

    def __init__(self, pool, host):
        self.pool = pool
        self.host = host  # _Host
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        # weak: a Response dropped without close() is collected, and _resp_gone closes the connection
        self.wr: weakref.ref | None = None
        self.paused = False
        self.closed = False
        self.idle_since = 0.0
        self.nreq = 0
        self.slot_held = True
        self._sink = None  # while a read is parsed: the response's _buf.append (on_body)
        self._fed = 0  # body bytes on_body appended during that read

    def _r(self):
        wr = self.wr
        return wr() if wr is not None else None

    def attach(self, resp):
        self.wr = weakref.ref(resp, self._resp_gone)

    def _resp_gone(self, wr):
        # the caller dropped an unfinished Response without close(): do not leak the slot
        if self.wr is wr:
            self.wr = None
            self.close()

    # ---- asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data):
        r = self._r()
        if r is None:
            # bytes while idle (or after an abandoned response): not reusable
            self.close()
            return
        r._got_bytes = True
        self._sink = r._buf.append
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as e:
            if self.wr is None and r._complete:
                # garbage after a complete response; the response itself is fine
                self.close()
            else:
                self._fail(UpstreamProtocolError(f"bad upstream response: {e}"))
        finally:
            self._sink = None
        if self._fed:
            fed, self._fed = self._fed, 0
            r._took(fed)

    def eof_received(self):
        r = self._r()
        if r is not None and r._until_eof and r._headers_done:
            self._complete_resp(r, reusable=False)
        return False  # close the transport

    def connection_lost(self, exc):
        self.closed = True
        r = self._r()
        if r is not None:
            if r._until_eof and r._headers_done and exc is None:
                self._complete_resp(r, reusable=False)
            else:
                self.wr = None
                r._conn = None
                r._fail(UpstreamClosed(f"upstream connection closed: {exc}" if exc else "upstream connection closed"))
        self.pool._discard(self)

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    # ---- httptools callbacks
    def on_message_begin(self):
        if self.wr is None:
            # a second response with no request outstanding: poison the connection
            self.close()

    def on_header(self, name, value):
        r = self._r()
        if r is not None:
            r.headers.append((name, value))

    def on_headers_complete(self):
        r = self._r()
        if r is None:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            r.headers = []  # interim response: keep waiting for the final one
            return
        r.status = status
        r._headers_done = True
        if r._no_body:
            # HEAD: no body follows, but httptools cannot be told; do not reuse
            self._complete_resp(r, reusable=False)
            return
        if status not in (204, 304):
            te = cl = False
            for n, v in r.headers:
                ln = len(n)
                if ln == 14 and n.lower() == b"content-length":
                    cl = True
                elif ln == 17 and n.lower() == b"transfer-encoding":
                    te = True
            if not te and not cl:
                r._until_eof = True
        r._wake()

    def on_body(self, body):
        self._sink(body)  # (httptools calls back only from feed_data, in data_received)
        self._fed += len(body)

    def on_message_complete(self):
        r = self._r()
        if r is None:
            return
        if not r._headers_done:  # end of an interim 1xx response
            return
        self._complete_resp(r, reusable=self.parser.should_keep_alive() and not r._until_eof)

    # ---- helpers
    def _complete_resp(self, r, reusable):
        if r._complete:
            return
        r._complete = True
        r._stop_timer()
        self.wr = None
        r._conn = None
        if self.paused:
            self.resume()
        r._wake()
        if reusable and not self.closed:
            self.pool._release(self)
        else:
            self.close()

    def _fail(self, exc):
        r = self._r()
        self.wr = None
        if r is not None:
            r._conn = None
            r._fail(exc)
        self.close()

    def pause(self):
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self):
        if self.paused:
            self.paused = False
            if not self.closed:
                self.transport.resume_reading()

    def close(self):
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        self.pool._discard(self)


class _Host:
    __slots__ = ("key", "idle", "active", "waiters")

    def __init__(self, key):
        self.key = key
        self.idle: collections.deque[_Conn] = collections.deque()
        self.active = 0  # connections that exist or are being connected (slots held)
        self.waiters: collections.deque[asyncio.Future] = collections.deque()


class Pool:
    def __init__(
        self,
        *,
        max_per_host: int = 100,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        keepalive_expiry: float = 30.0,
        retry_stale: bool = True,
        ssl_context: _ssl.SSLContext | None = None,
        high_water: int = HIGH_WATER,
    ):
        self.max_per_host = max_per_host
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_expiry = keepalive_expiry
        self.retry_stale = retry_stale
        self._ssl = ssl_context
        self._high = high_water
        self._hosts: dict[tuple, _Host] = {}
        self._closed = False
        self._sweeper = None
        self._loop = None
        self._host_lines: dict[tuple, bytes] = {}

    # ---- slot / connection bookkeeping
    def _discard(self, conn: _Conn):
        """Connection is gone: free its slot (idempotent)."""
        if conn.slot_held:
            conn.slot_held = False
            h = conn.host
            h.active -= 1
            self._hand_slot(h)

    def _hand_slot(self, h: _Host):
        while h.waiters:
            w = h.waiters.popleft()
            if not w.done():
                h.active += 1  # slot transferred to the waiter
                w.set_result(None)
                return

    def _release(self, conn: _Conn):
        """Connection finished a response and is reusable."""
        h = conn.host
        if self._closed:
            conn.close()
            return
        while h.waiters:
            w = h.waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return
        conn.idle_since = self._loop.time()
        h.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self.keepalive_expiry, self._sweep)

    def _sweep(self):
        self._sweeper = None
        now = self._loop.time()
        exp = self.keepalive_expiry
        any_idle = False
        for h in self._hosts.values():
            idle = h.idle
            while idle and (idle[0].closed or now - idle[0].idle_since > exp):
                idle.popleft().close()
            if idle:
                any_idle = True
        if any_idle and not self._closed:
            self._sweeper = self._loop.call_later(exp / 2, self._sweep)

    async def _acquire(self, key, deadline) -> _Conn:
        h = self._hosts.get(key)
        if h is None:
            h = self._hosts[key] = _Host(key)
        loop = self._loop
        while True:
            if self._closed:
                raise RuntimeError("pool is closed")
            idle = h.idle
            if idle:
                now = loop.time()
                exp = self.keepalive_expiry
                while idle:
                    c = idle.pop()
                    if not c.closed and now - c.idle_since <= exp and not c.transport.is_closing():
                        return c
                    c.close()
            if h.active < self.max_per_host:
                h.active += 1
                return await self._connect(h, deadline)
            fut = loop.create_future()
            h.waiters.append(fut)
            th = None
            if deadline is not None:
                th = loop.call_at(deadline, _timeout_cb, fut)
            try:
                res = await fut
            except BaseException as e:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    # got a connection/slot but were cancelled before running: give it back
                    r = fut.result()
                    if r is None:
                        h.active -= 1
                        self._hand_slot(h)
                    else:
                        self._release(r)
                else:
                    try:
                        h.waiters.remove(fut)
                    except ValueError:
                        pass
                if isinstance(e, _ReadTimeout):
                    raise UpstreamTimeout("pool acquire: total deadline exceeded") from None
                raise
            finally:
                if th is not None:
                    th.cancel()
            if res is None:
                return await self._connect(h, deadline)
            if not res.closed:
                return res
            # handed a connection that died meanwhile (its slot is already freed): retry

    async def _connect(self, h: _Host, deadline) -> _Conn:
        """Holds one slot of h on entry; frees it on failure."""
        loop = self._loop
        scheme, host, port = h.key
        timeout = self.connect_timeout
        if deadline is not None:
            timeout = min(timeout, deadline - loop.time())
        try:
            if timeout <= 0:
                raise ConnectTimeout(f"connect to {host}:{port}: deadline exceeded")
            if scheme == "https":
                ctx = self._ssl
                if ctx is None:
                    ctx = self._ssl = _ssl.create_default_context()
                kw = {"ssl": ctx, "server_hostname": host}
            elif scheme == "http":
                kw = {}
            else:
                raise ValueError(f"unsupported scheme {scheme!r}")
            try:
                async with asyncio.timeout(timeout):
                    _, conn = await loop.create_connection(lambda: _Conn(self, h), host, port, **kw)
            except TimeoutError as e:
                if isinstance(e, ConnectTimeout):
                    raise
                raise ConnectTimeout(f"connect to {host}:{port} timed out after {timeout:.3g}s") from None
        except BaseException:
            h.active -= 1
            self._hand_slot(h)
            raise
        if self._closed:
            conn.close()
            raise RuntimeError("pool is closed")
        return conn

    def _head(self, method, scheme, host, port, target, headers, body):
        """The request head (plus the body when small), serialised once; (head, body left to write)."""
        parts = [method.encode("ascii"), b" ", target.encode("latin-1"), b" HTTP/1.1\r\n"]
        if b"\r" in parts[2] or b"\n" in parts[2] or b" " in parts[2]:
            raise ValueError("invalid request target")
        have_host = False
        lines = 0
        for n, v in headers:
            if b":" in n:
                raise ValueError(f"invalid header {n!r}")
            if len(n) in _SPECIAL_LENS:
                ln = n.lower()
                if ln in _SKIP_REQ_HEADERS:
                    _check_header(n, v)  # not sent, but refused as before
                    continue
                if ln == b"host":
                    have_host = True
            parts += (n, b": ", v, b"\r\n")
            lines += 1
        if lines:
            # One scan of the joined header lines instead of one per name and value: each line
            # added exactly one CR and one LF, so any other CR or LF (or a NUL) came from a
            # name or a value (header injection).
            block = b"".join(parts[4:])
            if block.count(b"\n") != lines or block.count(b"\r") != lines or b"\x00" in block:
                for n, v in headers:
                    _check_header(n, v)
                raise ValueError("invalid header")
        if not have_host:
            line = self._host_lines.get((scheme, host, port))
            if line is None:
                default_port = 443 if scheme == "https" else 80
                hb = host.encode("idna")
                line = self._host_lines[(scheme, host, port)] = \
                    b"host: %s\r\n" % (hb if port == default_port else b"%s:%d" % (hb, port))
            parts.append(line)
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            parts.append(b"content-length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        if len(body) <= 65536:
            parts.append(body)
            body = b""
        return b"".join(parts), body

    # ---- public API
    async def request(
        self,
        method: str,
        scheme: str,
        host: str,
        port: int,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        total_timeout: float | None = None,
    ) -> Response:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + total_timeout if total_timeout is not None else None

        head, body = self._head(method, scheme, host, port, target, headers, body)
        key = (scheme, host, port)
        no_body = method == "HEAD"
        attempt = 0
        while True:
            if deadline is not None and loop.time() >= deadline:
                raise UpstreamTimeout("total deadline exceeded")
            conn = await self._acquire(key, deadline)
            reused = conn.nreq > 0
            conn.nreq += 1
            resp = Response(conn, loop, self.read_timeout, deadline, no_body, self._high)
            conn.attach(resp)
            tr = conn.transport
            tr.write(head)
            if body:
                tr.write(body)
            try:
                await resp._wait_headers()
            except UpstreamClosed:
                if reused and not resp._got_bytes and self.retry_stale and attempt == 0:
                    attempt += 1
                    continue
                raise
            return resp

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for h in self._hosts.values():
            while h.idle:
                h.idle.pop().close()
            while h.waiters:
                w = h.waiters.popleft()
                if not w.done():
                    w.set_exception(RuntimeError("pool is closed"))
        await asyncio.sleep(0)

    def stats(self) -> dict:
        """{(scheme, host, port): (active, idle, waiters)} for tests and metrics."""
        return {k: (h.active, len(h.idle), len(h.waiters)) for k, h in self._hosts.items()}

"""A fake LLM provider upstream with byte-level control over replies and faults.

The gateway under test relays to ``FakeUpstream().start().url``. The fake is a raw
asyncio HTTP/1.1 server (``asyncio.Protocol`` + ``httptools.HttpRequestParser``)
running its own event loop in a daemon thread, so plain synchronous pytest tests can
use it::

    up = FakeUpstream().start()
    up.enqueue(Reply.fixture("openai-chat/oai-finish-length.sse", chunk_sizes="random"))
    ...  # drive the gateway
    req, = up.wait_requests(1)
    assert req.header("authorization") == "Bearer x"
    up.stop()

Replies are served FIFO, one per completed request (across all connections, in
order of request arrival). When the queue is empty the default reply is served;
with no default a 500 JSON error "fake upstream: no reply queued" is sent.

A client FIN is treated as the client going away: the connection is closed at once,
ending any reply in progress, so ``active_connections`` drops (use
``wait_active_connections(n)``: the count changes asynchronously).

Wire behaviour of a ``Reply``:

* The head is written on its own (``HTTP/1.1 <status> <reason>`` + ``headers``).
  A framing header (``transfer-encoding: chunked`` or ``content-length``) is added
  unless ``headers`` already holds ``content-length`` or ``transfer-encoding`` (so a
  test can send lying framing). ``connection: close`` is added when the
  connection will be closed after the reply (client asked for it, or
  ``keep_alive=False``).
* The body is split into writes by ``chunk_sizes`` (``None``: one write; a list:
  sizes used cyclically; ``"random"``: sizes 1..64 from ``random.Random(seed)``,
  fresh per serve so the split is reproducible). In chunked mode every write is
  exactly one HTTP chunk, then ``0\\r\\n\\r\\n``.
* Faults (``fault_at`` counts *body payload* bytes, not chunk framing; the split
  of the body does not depend on the fault):

  - ``"reset_after_bytes"``: send the head and ``fault_at`` body bytes, wait until
    the kernel send queue is empty (the peer has the bytes), then close with
    ``SO_LINGER 0`` -> TCP RST.
  - ``"close_after_bytes"``: send head + ``fault_at`` body bytes then FIN, without
    the terminating chunk / before content-length is reached.
  - ``"hang_after_bytes"``: send head + ``fault_at`` body bytes, then send nothing
    more; the socket stays open (reads are drained) until the client closes it
    or the fake stops.
  - ``"refuse"``: after ``delay_before_headers``, reset the connection (RST)
    without sending a single byte. (For a real ECONNREFUSED use ``unused_port()``.)
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import random
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Callable, Literal, Union

import httptools

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures"

NO_REPLY_MESSAGE = "fake upstream: no reply queued"

Fault = Literal["reset_after_bytes", "close_after_bytes", "hang_after_bytes", "refuse"]
FAULTS = ("reset_after_bytes", "close_after_bytes", "hang_after_bytes", "refuse")


# --------------------------------------------------------------------------- fixtures


def _fixture_path(relpath: str) -> Path:
    p = (FIXTURES_DIR / relpath).resolve()
    if FIXTURES_DIR.resolve() not in p.parents:
        raise ValueError(f"fixture path escapes tests/fixtures: {relpath!r}")
    return p


def _meta_path(body: Path) -> Path:
    return body.with_name(body.name.rsplit(".", 1)[0] + ".meta.json")


def load_fixture(relpath: str) -> bytes:
    """Raw bytes of ``tests/fixtures/<relpath>``."""
    return _fixture_path(relpath).read_bytes()


def load_meta(relpath: str) -> dict:
    """The sibling ``.meta.json`` of a body file (or the meta file itself)."""
    p = _fixture_path(relpath)
    if not p.name.endswith(".meta.json"):
        p = _meta_path(p)
    return json.loads(p.read_text(encoding="utf-8"))


_VECTOR_NAMES = ("eventstream-vectors", "aws-eventstream")


def all_fixtures(
    dialect: str | None = None, stream: bool | None = None, *, include_vectors: bool = False
) -> list[str]:
    """Sorted relpaths (``"<dir>/<file>"``) of body files that have a meta.json.

    ``dialect`` matches either the directory name (``"anthropic"``) or the meta
    ``dialect`` (``"anthropic-messages"``). ``stream`` filters on meta ``stream``.
    ``eventstream-vectors/`` is skipped unless ``include_vectors`` or asked for by
    ``dialect``.
    """
    want_vectors = include_vectors or dialect in _VECTOR_NAMES
    out = []
    for p in sorted(FIXTURES_DIR.glob("*/*")):
        name = p.name
        if not p.is_file() or name.endswith(".meta.json") or name.endswith(".orig.chunks.txt"):
            continue
        if name.startswith(".") or "." not in name:
            continue
        mp = _meta_path(p)
        if not mp.is_file():
            continue
        if p.parent.name == "eventstream-vectors" and not want_vectors:
            continue
        meta = json.loads(mp.read_text(encoding="utf-8"))
        if dialect is not None and dialect not in (p.parent.name, meta.get("dialect")):
            continue
        if stream is not None and bool(meta.get("stream")) != stream:
            continue
        out.append(f"{p.parent.name}/{name}")
    return out


def unused_port() -> int:
    """A loopback port with (very likely) nothing listening: connecting gives ECONNREFUSED."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------- data types


@dataclass
class Recorded:
    method: str
    target: str  # path + query exactly as received
    path: str
    query: str  # without the "?"; "" if none
    headers: list[tuple[str, str]]  # lower-cased names, in order received
    body: bytes  # de-chunked request payload
    http_version: str = "1.1"
    conn_id: int = 0  # which client connection (1-based, in accept order)
    index: int = 0  # position in FakeUpstream.requests
    received_at: float = 0.0  # time.monotonic() when the request completed

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(
        default_factory=lambda: [("content-type", "application/json")]
    )
    body: bytes = b""
    chunked: bool = True
    chunk_sizes: Union[Literal["random"], list[int], None] = None
    delay_between_chunks: float = 0.0
    delay_before_headers: float = 0.0
    fault: Fault | None = None
    fault_at: int = 0
    seed: int = 0
    keep_alive: bool = True  # False: add "connection: close" and close after the reply
    reason: str | None = None  # status reason phrase (default: the standard one)

    def __post_init__(self):
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {FAULTS}")
        if isinstance(self.body, str):
            self.body = self.body.encode("utf-8")
        if isinstance(self.chunk_sizes, list) and (
            not self.chunk_sizes or any(int(n) <= 0 for n in self.chunk_sizes)
        ):
            raise ValueError("chunk_sizes must be a non-empty list of positive ints")
        if self.fault_at < 0:
            raise ValueError("fault_at must be >= 0")

    @classmethod
    def fixture(cls, relpath: str, **kw) -> "Reply":
        """Body from ``tests/fixtures/<relpath>``, content-type from its meta, status 200."""
        body = load_fixture(relpath)
        if "headers" not in kw:
            ctype = load_meta(relpath).get("content_type") or "application/octet-stream"
            kw["headers"] = [("content-type", ctype)]
        return cls(body=body, **kw)

    @classmethod
    def json_body(cls, obj, status: int = 200, **kw) -> "Reply":
        return cls(status=status, body=json.dumps(obj).encode(), **kw)

    def pieces(self) -> list[bytes]:
        """The body split into writes (independent of any fault)."""
        body = self.body
        if not body:
            return []
        if self.chunk_sizes is None:
            return [body]
        if self.chunk_sizes == "random":
            rng = random.Random(self.seed)
            sizes = iter(lambda: rng.randint(1, 64), None)
        else:
            sizes = itertools.cycle(int(n) for n in self.chunk_sizes)
        out, i = [], 0
        while i < len(body):
            n = next(sizes)
            out.append(body[i : i + n])
            i += n
        return out


def _default_no_reply() -> Reply:
    return Reply(
        status=500,
        body=json.dumps(
            {"error": {"message": NO_REPLY_MESSAGE, "type": "fake_upstream_error"}}
        ).encode(),
        chunked=False,
    )


ReplySource = Union[Reply, Callable[[Recorded], Reply]]


# --------------------------------------------------------------------------- protocol


class _Closed(Exception):
    pass


def _unsent_bytes(sock) -> int:
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


class _Conn(asyncio.Protocol):
    def __init__(self, server: "FakeUpstream"):
        self.server = server
        self.loop = server._loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.conn_id = 0
        self.pending: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None
        self.lost = asyncio.Event()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.dead = False  # no more input processing (fault / parse error)
        self._reset_message()

    def _reset_message(self):
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._keep_alive = True

    # asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        self.conn_id = self.server._conn_opened(self)
        self.worker = self.loop.create_task(self._serve())

    def connection_lost(self, exc):
        self.lost.set()
        self.can_write.set()
        if self.worker is not None and not self.worker.done():
            self.worker.cancel()
        self.server._conn_closed(self)

    def pause_writing(self):
        self.can_write.clear()

    def resume_writing(self):
        self.can_write.set()

    def data_received(self, data):
        if self.dead:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.dead = True
            self.pending.put_nowait(None)
        except httptools.HttpParserError as e:
            self.dead = True
            self.pending.put_nowait(("bad", str(e)))

    def eof_received(self):
        # Client FIN = client gone (like uvicorn & co): asyncio closes the transport,
        # which ends any reply in progress (delay, hang, slow chunks).
        return False

    # httptools callbacks
    def on_message_begin(self):
        self._reset_message()

    def on_url(self, url: bytes):
        self._url += url

    def on_header(self, name: bytes, value: bytes):
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self):
        self._keep_alive = self.parser.should_keep_alive()
        for k, v in self._headers:
            if k == "expect" and v.lower() == "100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes):
        self._body += body

    def on_message_complete(self):
        target = self._url.decode("latin-1")
        path, _, query = target.partition("?")
        rec = Recorded(
            method=self.parser.get_method().decode("latin-1"),
            target=target,
            path=path,
            query=query,
            headers=self._headers,
            body=bytes(self._body),
            http_version=self.parser.get_http_version(),
            conn_id=self.conn_id,
            received_at=time.monotonic(),
        )
        reply = self.server._record_and_pick(rec)
        self.pending.put_nowait(("req", rec, reply, self._keep_alive))

    # serving
    async def _write(self, data: bytes):
        if self.lost.is_set():
            raise _Closed
        self.transport.write(data)
        if not self.can_write.is_set():
            await self.can_write.wait()
        if self.lost.is_set():
            raise _Closed

    async def _flush(self, timeout: float = 2.0):
        """Wait until asyncio's buffer and the kernel's send queue are empty."""
        deadline = time.monotonic() + timeout
        sock = self.transport.get_extra_info("socket")
        while time.monotonic() < deadline and not self.lost.is_set():
            if self.transport.get_write_buffer_size() == 0 and (
                sock is None or _unsent_bytes(sock) == 0
            ):
                return
            await asyncio.sleep(0.001)

    async def _reset(self):
        await self._flush()
        if self.lost.is_set():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    async def _serve(self):
        try:
            while True:
                item = await self.pending.get()
                if item is None:
                    break
                if item[0] == "bad":
                    body = json.dumps({"error": {"message": f"fake upstream: bad request: {item[1]}"}})
                    await self._send_reply(Reply(status=400, body=body.encode(), chunked=False, keep_alive=False), "GET", False)
                    return
                _, rec, reply, keep_alive = item
                if not await self._send_reply(reply, rec.method, keep_alive):
                    return
            self.transport.close()
        except (_Closed, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass

    async def _send_reply(self, reply: Reply, method: str, keep_alive: bool) -> bool:
        """Serve one reply. Returns False if the connection is done."""
        if reply.delay_before_headers:
            await asyncio.sleep(reply.delay_before_headers)
        if reply.fault == "refuse":
            self.dead = True
            await self._reset()
            return False
        keep_alive = keep_alive and reply.keep_alive
        no_body = method == "HEAD" or reply.status in (204, 304) or 100 <= reply.status < 200
        names = {k.lower() for k, _ in reply.headers}
        head = [f"HTTP/1.1 {reply.status} {reply.reason if reply.reason is not None else _reason(reply.status)}"]
        head += [f"{k}: {v}" for k, v in reply.headers]
        if not no_body and not names & {"content-length", "transfer-encoding"}:
            if reply.chunked:
                head.append("transfer-encoding: chunked")
            else:
                head.append(f"content-length: {len(reply.body)}")
        if not keep_alive and "connection" not in names:
            head.append("connection: close")
        await self._write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))

        pieces = [] if no_body else reply.pieces()
        if reply.fault is not None:
            out, left = [], reply.fault_at
            for p in pieces:
                if left <= 0:
                    break
                out.append(p[:left])
                left -= len(out[-1])
            pieces = out
        for i, p in enumerate(pieces):
            if i and reply.delay_between_chunks:
                await asyncio.sleep(reply.delay_between_chunks)
            if reply.chunked:
                await self._write(b"%x\r\n%b\r\n" % (len(p), p))
            else:
                await self._write(p)
            if not reply.delay_between_chunks:
                await asyncio.sleep(0)  # let each piece go out as its own send()

        if reply.fault is None:
            if reply.chunked and not no_body:
                await self._write(b"0\r\n\r\n")
            if not keep_alive:
                self.dead = True
                self.transport.close()
                return False
            return True

        self.dead = True
        if reply.fault == "reset_after_bytes":
            await self._reset()
        elif reply.fault == "close_after_bytes":
            self.transport.close()  # flushes, then FIN
        elif reply.fault == "hang_after_bytes":
            await self.lost.wait()
        return False


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# --------------------------------------------------------------------------- server


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port: int = 0
        self.requests: list[Recorded] = []
        self._queue: list[ReplySource] = []
        self._default: ReplySource | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._conns: set[_Conn] = set()
        self._active = 0
        self._total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "FakeUpstream":
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        err: list[BaseException] = []

        def run():
            loop = asyncio.SelectorEventLoop()  # plain asyncio, whatever the global policy
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: _Conn(self), self.host, 0, backlog=128)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # pragma: no cover
                err.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        if err:
            raise err[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown():
            self._server.close()
            for c in list(self._conns):
                if c.transport is not None:
                    c.transport.abort()
            await asyncio.sleep(0)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        if not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), loop)
            except RuntimeError:
                pass
        thread.join(5)
        self._thread = None
        self._loop = None

    def __enter__(self) -> "FakeUpstream":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # replies
    def enqueue(self, reply: ReplySource) -> None:
        """Queue a reply (or a callable ``Recorded -> Reply``) for the next request."""
        with self._lock:
            self._queue.append(reply)

    def set_default(self, reply: ReplySource | None) -> None:
        with self._lock:
            self._default = reply

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._default = None
            self.requests.clear()

    # observations
    @property
    def active_connections(self) -> int:
        with self._lock:
            return self._active

    @property
    def total_connections(self) -> int:
        with self._lock:
            return self._total

    def wait_requests(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Block until at least ``n`` requests were received; returns a copy of ``requests``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"fake upstream: wanted {n} requests, got {len(self.requests)} in {timeout}s"
                    )
                self._cond.wait(left)
            return list(self.requests)

    def wait_active_connections(self, n: int, timeout: float = 5.0) -> int:
        """Block until ``active_connections == n``; returns the final count (check it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._active != n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._active

    # called on the loop thread
    def _record_and_pick(self, rec: Recorded) -> Reply:
        with self._cond:
            rec.index = len(self.requests)
            self.requests.append(rec)
            src = self._queue.pop(0) if self._queue else self._default
            self._cond.notify_all()
        if src is None:
            return _default_no_reply()
        if callable(src) and not isinstance(src, Reply):
            try:
                return src(rec)
            except Exception as e:  # surface test bugs as a visible 500
                return Reply(status=500, body=json.dumps(
                    {"error": {"message": f"fake upstream: reply callable raised {e!r}"}}).encode(),
                    chunked=False)
        return src

    def _conn_opened(self, conn: _Conn) -> int:
        with self._cond:
            self._conns.add(conn)
            self._active += 1
            self._total += 1
            self._cond.notify_all()
            return self._total

    def _conn_closed(self, conn: _Conn) -> None:
        with self._cond:
            if conn in self._conns:
                self._conns.discard(conn)
                self._active -= 1
            self._cond.notify_all()

"""A raw HTTP/1.1 client over a plain socket, for byte-exact and misbehaving-client tests.

    c = RawClient("127.0.0.1", port).connect()
    c.send(build_request("POST", "/v1/chat/completions", [("content-type", "application/json")], b"{}"))
    head = c.read_head()
    body = c.read_body(head)           # exact payload bytes (de-chunked if chunked)

Stalled / slow clients::

    c = RawClient(host, port, rcvbuf=4096).connect()   # small receive buffer: stalls back-pressure fast
    c.send(req); head = c.read_head()
    ...                                                 # don't read: the server sees a stalled client
    SlowReader(c, rate=1000).read(head, duration=1.0)   # or trickle-read at ~1000 B/s

Disconnect mid-body::

    c.send(req); head = c.read_head()
    got = c.read_body(head, max_bytes=100)   # at least 100 payload bytes, stops there
    c.abort()                                # RST (SO_LINGER 0); c.close() sends FIN instead

Body reads raise ``IncompleteBody`` (``kind`` = ``"eof" | "reset" | "timeout"``,
``partial`` = payload received so far) when the message does not complete.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field


class IncompleteBody(Exception):
    def __init__(self, kind: str, partial: bytes, detail: str = ""):
        super().__init__(f"incomplete body ({kind}) after {len(partial)} bytes {detail}".strip())
        self.kind = kind  # "eof" | "reset" | "timeout"
        self.partial = partial


class ProtocolError(Exception):
    pass


@dataclass
class ResponseHead:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]  # lower-cased names, in order
    raw: bytes  # the head bytes as received, including the final CRLFCRLF

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def chunked(self) -> bool:
        te = self.header("transfer-encoding")
        return te is not None and te.lower().split(",")[-1].strip() == "chunked"

    @property
    def content_length(self) -> int | None:
        cl = self.header("content-length")
        return int(cl) if cl is not None else None


@dataclass
class Response:
    head: ResponseHead
    body: bytes  # payload, de-chunked
    chunk_sizes: list[int] = field(default_factory=list)  # sizes of the HTTP chunks (chunked only)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    wire: bytes = b""  # body bytes exactly as they came off the socket (with chunk framing)

    @property
    def status(self) -> int:
        return self.head.status

    def header(self, name: str) -> str | None:
        return self.head.header(name)


def build_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    host: str = "127.0.0.1",
    chunked: bool = False,
    chunk_size: int = 16,
) -> bytes:
    """Raw HTTP/1.1 request bytes. Adds Host and Content-Length/Transfer-Encoding if absent."""
    headers = list(headers or [])
    names = {k.lower() for k, _ in headers}
    if "host" not in names:
        headers.insert(0, ("Host", host))
    if chunked:
        if "transfer-encoding" not in names:
            headers.append(("Transfer-Encoding", "chunked"))
        payload = b"".join(
            b"%x\r\n%b\r\n" % (len(body[i : i + chunk_size]), body[i : i + chunk_size])
            for i in range(0, len(body), chunk_size)
        ) + b"0\r\n\r\n"
    else:
        if "content-length" not in names and (body or method.upper() in ("POST", "PUT", "PATCH")):
            headers.append(("Content-Length", str(len(body))))
        payload = body
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + payload


class RawClient:
    def __init__(self, host: str, port: int, timeout: float = 5.0, rcvbuf: int | None = None):
        self.host, self.port, self.timeout, self.rcvbuf = host, port, timeout, rcvbuf
        self.sock: socket.socket | None = None
        self._buf = bytearray()
        self._eof = False
        self.wire = bytearray()  # every byte received after the current response head

    # connection
    def connect(self) -> "RawClient":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(self.timeout)
        s.connect((self.host, self.port))
        self.sock = s
        return self

    def __enter__(self) -> "RawClient":
        return self if self.sock is not None else self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        """Orderly close (FIN)."""
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def abort(self) -> None:
        """Abrupt close: SO_LINGER 0 -> RST."""
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close()

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    # low level reads
    def _fill(self, max_read: int = 65536) -> bool:
        """Read once into the buffer. False on EOF. Raises ConnectionResetError / socket.timeout."""
        if self._eof:
            return False
        data = self.sock.recv(max_read)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def recv_raw(self, max_read: int = 65536) -> bytes:
        """Whatever bytes are buffered, or one recv() (b"" on EOF)."""
        if not self._buf:
            self._fill(max_read)
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def read_until_closed(self) -> bytes:
        """Everything until EOF (raises ConnectionResetError on RST)."""
        while self._fill():
            pass
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.wire += out
        return out

    # HTTP
    def read_head(self, skip_1xx: bool = True) -> ResponseHead:
        while True:
            while (i := self._buf.find(b"\r\n\r\n")) < 0:
                if not self._fill():
                    raise ProtocolError(f"connection closed before response head ({bytes(self._buf)!r})")
            raw = bytes(self._buf[: i + 4])
            del self._buf[: i + 4]
            lines = raw[:-4].decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code, _, reason = rest.partition(" ")
            headers = []
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers.append((k.strip().lower(), v.strip()))
            head = ResponseHead(int(code), reason, version, headers, raw)
            if skip_1xx and 100 <= head.status < 200 and head.status != 101:
                continue
            self.wire = bytearray()
            return head

    def read_body(self, head: ResponseHead, max_bytes: int | None = None, method: str = "GET") -> bytes:
        """Payload bytes of the response (de-chunked).

        With ``max_bytes``: return as soon as at least that many payload bytes arrived
        (possibly a little more; the rest stays unread on the socket).
        """
        return self.read_response_body(head, max_bytes=max_bytes, method=method).body

    def read_response_body(
        self, head: ResponseHead, max_bytes: int | None = None, method: str = "GET"
    ) -> Response:
        body = bytearray()
        resp = Response(head=head, body=b"")
        try:
            if method == "HEAD" or head.status in (204, 304):
                pass
            elif head.chunked:
                self._read_chunked(body, resp, max_bytes)
            elif head.content_length is not None:
                want = head.content_length if max_bytes is None else min(max_bytes, head.content_length)
                while len(body) < want:
                    if self._buf:
                        body += self._take(min(len(self._buf), want - len(body)))
                    elif not self._fill():
                        raise IncompleteBody("eof", bytes(body))
            else:  # read to EOF
                while True:
                    if self._buf:
                        body += self._take(len(self._buf))
                    if max_bytes is not None and len(body) >= max_bytes:
                        break
                    if not self._fill():
                        break
        except ConnectionResetError as e:
            body += self._salvage(head)
            raise IncompleteBody("reset", bytes(body), str(e)) from e
        except (socket.timeout, TimeoutError) as e:
            raise IncompleteBody("timeout", bytes(body)) from e
        except IncompleteBody as e:
            e.partial = bytes(body)
            raise
        resp.body = bytes(body)
        resp.wire = bytes(self.wire)
        return resp

    def _salvage(self, head: ResponseHead) -> bytes:
        return b"" if head.chunked else self._take(len(self._buf))

    def _need(self, n: int, body: bytearray):
        while len(self._buf) < n:
            if not self._fill():
                raise IncompleteBody("eof", bytes(body))

    def _line(self, body: bytearray) -> bytes:
        while (i := self._buf.find(b"\r\n")) < 0:
            if not self._fill():
                raise IncompleteBody("eof", bytes(body))
        return self._take(i + 2)[:-2]

    def _read_chunked(self, body: bytearray, resp: Response, max_bytes: int | None):
        while True:
            line = self._line(body)
            size_s = line.split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line {line!r}") from None
            if size == 0:
                while (t := self._line(body)) != b"":
                    k, _, v = t.decode("latin-1").partition(":")
                    resp.trailers.append((k.strip().lower(), v.strip()))
                return
            self._need(size + 2, body)
            body += self._take(size)
            if self._take(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            resp.chunk_sizes.append(size)
            if max_bytes is not None and len(body) >= max_bytes:
                return

    def request(
        self, method: str, target: str, headers=None, body: bytes = b"", **kw
    ) -> Response:
        """Send one request and read the whole response."""
        self.send(build_request(method, target, headers, body, host=f"{self.host}:{self.port}", **kw))
        head = self.read_head()
        return self.read_response_body(head, method=method)


class SlowReader:
    """Read a response body at roughly ``rate`` bytes/second (``read_size`` per recv)."""

    def __init__(self, client: RawClient, rate: float, read_size: int = 64):
        self.client, self.rate, self.read_size = client, rate, read_size

    def read(self, duration: float | None = None, max_bytes: int | None = None) -> bytes:
        """Raw bytes (framing included) read until EOF, ``duration`` elapsed or ``max_bytes``."""
        c = self.client
        out = bytearray(c._buf)
        c._buf.clear()
        start = time.monotonic()
        while True:
            if duration is not None and time.monotonic() - start >= duration:
                break
            if max_bytes is not None and len(out) >= max_bytes:
                break
            try:
                data = c.sock.recv(self.read_size)
            except (socket.timeout, TimeoutError):
                break
            if not data:
                c._eof = True
                break
            out += data
            time.sleep(len(data) / self.rate)
        return bytes(out)


def stall(seconds: float) -> None:
    """Readability helper: a stalled client simply doesn't read."""
    time.sleep(seconds)

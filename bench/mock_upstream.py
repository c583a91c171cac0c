"""Very fast mock LLM upstream: raw uvloop asyncio.Protocol + httptools, HTTP/1.1 keep-alive.

Run:  python -m bench.mock_upstream --port 18000 [--host 127.0.0.1]

Dialects are registered in ROUTES: (method, path) -> handler(req) -> Reply.
A handler returns either a whole body (Content-Length) or an SSE event source
(chunked transfer-encoding). Add a dialect by writing one handler and one ROUTES line.

OpenAI chat completions, POST /v1/chat/completions:
  * body without `"stream": true` -> ~551-byte chat.completion JSON.
  * body with `"stream": true` (cheap byte test, no JSON parse) -> SSE:
      role chunk, N content deltas, finish chunk, usage chunk, `data: [DONE]`.
    Controls (request header or query parameter of the same name without the x-mock- prefix):
      x-mock-events: N        content deltas (default 64)
      x-mock-pace-ms: MS      delay between events (default 0: all events written at once,
                              one transport.write per event)
      x-mock-bytes: TOTAL     big stream: content deltas sized so the whole SSE body is ~TOTAL
                              bytes (e.g. 200000000); written with write flow control
                              (the mock never buffers more than ~1 MiB per connection).
      x-mock-status: CODE     reply with this status and a small JSON error body.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from urllib.parse import parse_qsl

import httptools

# --------------------------------------------------------------------------------------
# payloads

CHAT_COMPLETION = (
    b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion",'
    b'"created":1741569952,"model":"gpt-4.1-2025-04-14","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"Hello! How can I assist you today?",'
    b'"refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,'
    b'"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}},'
    b'"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}'
)

_CHUNK_PREFIX = (
    b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk",'
    b'"created":1741569952,"model":"gpt-4.1-2025-04-14","system_fingerprint":"fp_fc9f1d7035",'
    b'"choices":[{"index":0,"delta":'
)


def _sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_ROLE = _sse(_CHUNK_PREFIX + b'{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}')
SSE_FINISH = _sse(_CHUNK_PREFIX + b'{},"logprobs":null,"finish_reason":"stop"}],"usage":null}')
SSE_USAGE = _sse(
    b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk",'
    b'"created":1741569952,"model":"gpt-4.1-2025-04-14","system_fingerprint":"fp_fc9f1d7035",'
    b'"choices":[],"usage":{"prompt_tokens":19,"completion_tokens":64,"total_tokens":83}}'
)
SSE_DONE = _sse(b"[DONE]")


def sse_content(text: bytes) -> bytes:
    return _sse(_CHUNK_PREFIX + b'{"content":"' + text + b'"},"logprobs":null,"finish_reason":null}],"usage":null}')


_WORDS = [b" Hello", b" there", b",", b" how", b" can", b" I", b" help", b" you", b" today", b"?"]
_STREAM_CACHE: dict[int, list[bytes]] = {}


def openai_events(n: int) -> list[bytes]:
    """Chunk-encoded SSE events (cached per n)."""
    ev = _STREAM_CACHE.get(n)
    if ev is None:
        raw = [SSE_ROLE] + [sse_content(_WORDS[i % len(_WORDS)]) for i in range(n)] + [SSE_FINISH, SSE_USAGE, SSE_DONE]
        ev = [_chunked(e) for e in raw]
        if len(_STREAM_CACHE) < 64:
            _STREAM_CACHE[n] = ev
    return ev


# --------------------------------------------------------------------------------------
# request/reply model


class Request:
    __slots__ = ("method", "path", "query", "headers", "body")

    def __init__(self, method: bytes, path: bytes, query: bytes, headers: dict[bytes, bytes], body: bytes):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-case names
        self.body = body

    def opt(self, name: str) -> bytes | None:
        """x-mock-<name> header, else query parameter <name>."""
        v = self.headers.get(b"x-mock-" + name.encode())
        if v is not None:
            return v
        if self.query:
            for k, qv in parse_qsl(self.query.decode("latin-1")):
                if k == name:
                    return qv.encode()
        return None


class Reply:
    """Either `body` (whole) or `events` (list of already chunk-encoded pieces) or
    `big` (total bytes of a large SSE stream) with optional pacing."""

    __slots__ = ("status", "content_type", "body", "events", "pace", "big", "extra_headers")

    def __init__(self, status=200, content_type=b"application/json", body=None, events=None, pace=0.0, big=0, extra_headers=b""):
        self.status = status
        self.content_type = content_type
        self.body = body
        self.events = events
        self.pace = pace
        self.big = big
        self.extra_headers = extra_headers


def openai_chat(req: Request) -> Reply:
    st = req.opt("status")
    if st is not None and int(st) != 200:
        return Reply(status=int(st), body=b'{"error":{"message":"mock error","type":"mock","code":null}}')
    b = req.body
    if b'"stream": true' in b or b'"stream":true' in b:
        pace = req.opt("pace-ms")
        pace_s = float(pace) / 1000.0 if pace else 0.0
        big = req.opt("bytes")
        if big:
            return Reply(content_type=b"text/event-stream", big=int(big), pace=pace_s)
        n = req.opt("events")
        return Reply(content_type=b"text/event-stream", events=openai_events(int(n) if n else 64), pace=pace_s)
    return Reply(body=CHAT_COMPLETION)


def not_found(req: Request) -> Reply:
    return Reply(status=404, body=b'{"error":"not found"}')


ROUTES = {
    (b"POST", b"/v1/chat/completions"): openai_chat,
    # later: (b"POST", b"/v1/messages"): anthropic_messages, bedrock, gemini ...
}

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 429: b"Too Many Requests", 500: b"Internal Server Error", 503: b"Service Unavailable"}

# precomputed whole response for the hot path
_DEFAULT_JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(CHAT_COMPLETION)
) + CHAT_COMPLETION


# --------------------------------------------------------------------------------------
# server protocol


class MockProtocol(asyncio.Protocol):
    def __init__(self):
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.queue: list[Request] = []  # pipelined requests waiting for a streaming reply to finish
        self.busy = False  # a streaming reply task is running
        self.paused = False
        self.drain_waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self):
        if self.paused and not self.closed:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            await self.drain_waiter
            self.drain_waiter = None

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    # parser callbacks
    def on_message_begin(self):
        self.url = b""
        self.headers = {}
        self.body = []

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers[name.lower()] = value

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        url = self.url
        q = url.find(b"?")
        if q >= 0:
            path, query = url[:q], url[q + 1 :]
        else:
            path, query = url, b""
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        req = Request(self.parser.get_method(), path, query, self.headers, body)
        if self.busy:
            self.queue.append(req)
        else:
            self.dispatch(req)

    def dispatch(self, req: Request):
        # hot path: plain chat completion
        if req.path == b"/v1/chat/completions" and not req.query and b'"stream' not in req.body and b"x-mock-status" not in req.headers:
            self.transport.write(_DEFAULT_JSON_RESPONSE)
            return
        handler = ROUTES.get((req.method, req.path), not_found)
        rep = handler(req)
        if rep.body is not None:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
                % (rep.status, _REASONS.get(rep.status, b"X"), rep.content_type, len(rep.body), rep.extra_headers)
                + rep.body
            )
            return
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n%s\r\n" % (
            rep.status,
            _REASONS.get(rep.status, b"X"),
            rep.content_type,
            rep.extra_headers,
        )
        if rep.events is not None and rep.pace == 0.0:
            w = self.transport.write
            w(head)
            for e in rep.events:
                w(e)
            w(b"0\r\n\r\n")
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self.stream(head, rep))

    async def stream(self, head: bytes, rep: Reply):
        w = self.transport.write
        try:
            w(head)
            if rep.big:
                chunk_text = b"x" * 4000
                ev = _chunked(sse_content(chunk_text))
                n = max(1, rep.big // len(ev))
                w(openai_events(0)[0])
                for i in range(n):
                    if self.closed:
                        return
                    w(ev)
                    if self.paused:
                        await self.drain()
                    if rep.pace:
                        await asyncio.sleep(rep.pace)
                for e in openai_events(0)[1:]:
                    w(e)
            else:
                for e in rep.events:
                    if self.closed:
                        return
                    w(e)
                    if self.paused:
                        await self.drain()
                    await asyncio.sleep(rep.pace)
            w(b"0\r\n\r\n")
        finally:
            self.busy = False
        while self.queue and not self.busy and not self.closed:
            self.dispatch(self.queue.pop(0))


async def serve(host: str, port: int):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, backlog=4096, reuse_address=True)
    print(f"mock upstream listening on http://{host}:{port} pid={os.getpid()}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18000)
    a = ap.parse_args(argv)
    import uvloop

    uvloop.run(serve(a.host, a.port))


if __name__ == "__main__":
    main()

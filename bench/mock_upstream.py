"""Very fast mock LLM upstream: raw uvloop asyncio.Protocol + httptools, HTTP/1.1 keep-alive.

Run:  python -m bench.mock_upstream --port 18000 [--host 127.0.0.1]

Four wire dialects, non-streaming and streaming, one shape of answer:

  dialect    streaming request                                  non-streaming request
  openai     POST /v1/chat/completions  {"stream": true}       same path, no "stream": true
  anthropic  POST /v1/messages          {"stream": true}       same path, no "stream": true
  bedrock    POST /model/{id}/converse-stream (event-stream)   POST /model/{id}/converse
  gemini     POST /v1beta/models/{m}:streamGenerateContent?alt=sse   ...:generateContent
             (without alt=sse: one streamed JSON array, as Gemini does)

A stream is HEAD events (OpenAI: the role chunk; Anthropic: message_start +
content_block_start; Bedrock: messageStart; Gemini: the first text chunk), N content deltas,
then TAIL events (an optional tool call, finish, usage, end marker).

Controls (request header, or query parameter of the same name without the x-mock- prefix):
  x-mock-events: N      content deltas (default 64)
  x-mock-pace-ms: MS    paced stream: HEAD at once, then one delta every MS ms, then the TAIL
                        (default 0 = unpaced)
  x-mock-batch: 0|1     unpaced streams only: 1 (default) writes the whole response in ONE
                        write (events arrive batched); 0 writes one transport.write per event
  x-mock-tool: NAME     end with a tool call to NAME (arguments {"path":"/etc","force":true})
  x-mock-bytes: TOTAL   OpenAI only: big stream of ~TOTAL bytes with write flow control
  x-mock-status: CODE   reply with this status and a small JSON error body

Paced streams are driven by one 1 ms timer wheel for the whole process (not a task and a
timer per stream), so 1000 concurrent paced streams cost the mock little; each stream keeps
its own phase (the time its request arrived).

`expected_events(dialect, n, tool)` says how many events a stream carries (loadgen checks it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
from urllib.parse import parse_qsl

import httptools

try:  # the AWS event-stream encoder of the project (bench runs from the repo root)
    from sidegate_codecs.eventstream import encode_message as _es_encode
except ImportError:  # pragma: no cover - codecs not installed: Bedrock unavailable
    _es_encode = None

TOOL_ARGS = '{"path":"/etc","force":true}'
TOOL_ARG_PARTS = ('{"path":"/e', 'tc","force":true}')
_WORDS = [b" Hello", b" there", b",", b" how", b" can", b" I", b" help", b" you", b" today", b"?"]


def _word(i: int) -> bytes:
    return _WORDS[i % len(_WORDS)]


# ======================================================================================
# OpenAI chat completions

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


def chat_completion_tool(name: str) -> bytes:
    return (
        b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion",'
        b'"created":1741569952,"model":"gpt-4.1-2025-04-14","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"Let me look.","refusal":null,"annotations":[],'
        b'"tool_calls":[{"id":"call_mock1","type":"function","function":{"name":' + json.dumps(name).encode()
        + b',"arguments":' + json.dumps(TOOL_ARGS).encode() + b'}}]},"logprobs":null,"finish_reason":"tool_calls"}],'
        b'"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29},'
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
SSE_FINISH_TOOL = _sse(_CHUNK_PREFIX + b'{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}')
SSE_USAGE = _sse(
    b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk",'
    b'"created":1741569952,"model":"gpt-4.1-2025-04-14","system_fingerprint":"fp_fc9f1d7035",'
    b'"choices":[],"usage":{"prompt_tokens":19,"completion_tokens":64,"total_tokens":83}}'
)
SSE_DONE = _sse(b"[DONE]")


def sse_content(text: bytes) -> bytes:
    return _sse(_CHUNK_PREFIX + b'{"content":"' + text + b'"},"logprobs":null,"finish_reason":null}],"usage":null}')


def _openai_tool_events(name: str) -> list[bytes]:
    first = (b'{"tool_calls":[{"index":0,"id":"call_mock1","type":"function","function":{"name":'
             + json.dumps(name).encode() + b',"arguments":""}}]},"logprobs":null,"finish_reason":null}],"usage":null}')
    out = [_sse(_CHUNK_PREFIX + first)]
    for part in TOOL_ARG_PARTS:
        out.append(_sse(_CHUNK_PREFIX + b'{"tool_calls":[{"index":0,"function":{"arguments":'
                        + json.dumps(part).encode() + b'}}]},"logprobs":null,"finish_reason":null}],"usage":null}'))
    return out


def openai_stream(n: int, tool: str | None) -> tuple[list[bytes], list[bytes], list[bytes]]:
    head = [SSE_ROLE]
    deltas = [sse_content(_word(i)) for i in range(n)]
    tail = (_openai_tool_events(tool) + [SSE_FINISH_TOOL] if tool else [SSE_FINISH]) + [SSE_USAGE, SSE_DONE]
    return head, deltas, tail


# ======================================================================================
# Anthropic messages


def _anth(event: bytes, data: bytes) -> bytes:
    return b"event: " + event + b"\ndata: " + data + b"\n\n"


ANTHROPIC_MESSAGE = (
    b'{"id":"msg_01Mock","type":"message","role":"assistant","model":"claude-sonnet-4-20250514",'
    b'"content":[{"type":"text","text":"Hello! How can I assist you today?"}],"stop_reason":"end_turn",'
    b'"stop_sequence":null,"usage":{"input_tokens":19,"output_tokens":10}}'
)


def anthropic_message_tool(name: str) -> bytes:
    return (
        b'{"id":"msg_01Mock","type":"message","role":"assistant","model":"claude-sonnet-4-20250514",'
        b'"content":[{"type":"text","text":"Let me look."},{"type":"tool_use","id":"toolu_mock1","name":'
        + json.dumps(name).encode() + b',"input":' + TOOL_ARGS.encode() + b'}],"stop_reason":"tool_use",'
        b'"stop_sequence":null,"usage":{"input_tokens":19,"output_tokens":10}}'
    )


def anthropic_stream(n: int, tool: str | None):
    head = [
        _anth(b"message_start", b'{"type":"message_start","message":{"id":"msg_01Mock","type":"message",'
              b'"role":"assistant","model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,'
              b'"stop_sequence":null,"usage":{"input_tokens":19,"output_tokens":1}}}'),
        _anth(b"content_block_start", b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'),
    ]
    deltas = [_anth(b"content_block_delta", b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"'
                    + _word(i) + b'"}}') for i in range(n)]
    tail = [_anth(b"content_block_stop", b'{"type":"content_block_stop","index":0}')]
    if tool:
        tail.append(_anth(b"content_block_start", b'{"type":"content_block_start","index":1,"content_block":'
                          b'{"type":"tool_use","id":"toolu_mock1","name":' + json.dumps(tool).encode() + b',"input":{}}}'))
        for part in TOOL_ARG_PARTS:
            tail.append(_anth(b"content_block_delta", b'{"type":"content_block_delta","index":1,"delta":'
                              b'{"type":"input_json_delta","partial_json":' + json.dumps(part).encode() + b'}}'))
        tail.append(_anth(b"content_block_stop", b'{"type":"content_block_stop","index":1}'))
    stop = b"tool_use" if tool else b"end_turn"
    tail.append(_anth(b"message_delta", b'{"type":"message_delta","delta":{"stop_reason":"' + stop
                      + b'","stop_sequence":null},"usage":{"output_tokens":%d}}' % n))
    tail.append(_anth(b"message_stop", b'{"type":"message_stop"}'))
    return head, deltas, tail


# ======================================================================================
# Bedrock Converse (AWS event-stream frames)


def _frame(event_type: str, payload: dict) -> bytes:
    if _es_encode is None:
        raise RuntimeError("sidegate_codecs is needed for Bedrock event-stream frames")
    return _es_encode([(":event-type", event_type), (":content-type", "application/json"),
                       (":message-type", "event")], json.dumps(payload, separators=(",", ":")).encode())


def bedrock_stream(n: int, tool: str | None):
    head = [_frame("messageStart", {"role": "assistant"})]
    deltas = [_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": _word(i).decode()}}) for i in range(n)]
    tail = [_frame("contentBlockStop", {"contentBlockIndex": 0})]
    if tool:
        tail += [
            _frame("contentBlockStart", {"contentBlockIndex": 1, "start": {"toolUse": {"name": tool, "toolUseId": "tooluse_mock1"}}}),
            _frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": TOOL_ARG_PARTS[0]}}}),
            _frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": TOOL_ARG_PARTS[1]}}}),
            _frame("contentBlockStop", {"contentBlockIndex": 1}),
        ]
    tail += [
        _frame("messageStop", {"stopReason": "tool_use" if tool else "end_turn"}),
        _frame("metadata", {"usage": {"inputTokens": 19, "outputTokens": n, "totalTokens": 19 + n}, "metrics": {"latencyMs": 1}}),
    ]
    return head, deltas, tail


def bedrock_converse(tool: str | None) -> bytes:
    content: list = [{"text": "Hello! How can I assist you today?"}]
    if tool:
        content.append({"toolUse": {"toolUseId": "tooluse_mock1", "name": tool, "input": json.loads(TOOL_ARGS)}})
    return json.dumps({"output": {"message": {"role": "assistant", "content": content}},
                       "stopReason": "tool_use" if tool else "end_turn",
                       "usage": {"inputTokens": 19, "outputTokens": 10, "totalTokens": 29},
                       "metrics": {"latencyMs": 1}}, separators=(",", ":")).encode()


# ======================================================================================
# Gemini (SSE with alt=sse, else a streamed JSON array)

_GEM_USAGE = {"promptTokenCount": 19, "candidatesTokenCount": 64, "totalTokenCount": 83}


def _gem_chunk(parts: list, finish: bool) -> bytes:
    cand: dict = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = "STOP"
    doc = {"candidates": [cand], "usageMetadata": _GEM_USAGE, "modelVersion": "gemini-2.0-flash", "responseId": "mockResp1"}
    return json.dumps(doc, separators=(",", ":")).encode()


def gemini_objects(n: int, tool: str | None) -> tuple[list[bytes], list[bytes], list[bytes]]:
    head = [_gem_chunk([{"text": "Hello"}], False)]
    deltas = [_gem_chunk([{"text": _word(i).decode()}], False) for i in range(n)]
    last = [{"functionCall": {"name": tool, "args": json.loads(TOOL_ARGS)}}] if tool else [{"text": "."}]
    tail = [_gem_chunk(last, True)]
    return head, deltas, tail


def gemini_generate(tool: str | None) -> bytes:
    parts: list = [{"text": "Hello! How can I assist you today?"}]
    if tool:
        parts.append({"functionCall": {"name": tool, "args": json.loads(TOOL_ARGS)}})
    return _gem_chunk(parts, True)


def _gem_sse(objs):
    return [b"data: " + o + b"\r\n\r\n" for o in objs]


def _gem_array(head, deltas, tail):
    """JSON-array framing: '[' + obj, ',\\r\\n' + obj ..., ']'."""
    allobjs = head + deltas + tail
    out = [b"[" + o if i == 0 else b",\r\n" + o for i, o in enumerate(allobjs)]
    out[-1] += b"]"
    h, d = len(head), len(deltas)
    return out[:h], out[h:h + d], out[h + d:]


# ======================================================================================
# shared

DIALECTS = ("openai", "anthropic", "bedrock", "gemini")


def expected_events(dialect: str, n: int, tool: bool) -> int:
    """Events (SSE events / event-stream frames) a stream carries."""
    if dialect == "openai":
        return 1 + n + (3 if tool else 0) + 3
    if dialect == "anthropic":
        return 2 + n + (4 if tool else 0) + 3
    if dialect == "bedrock":
        return 1 + n + (4 if tool else 0) + 3
    if dialect == "gemini":
        return 1 + n + 1
    raise ValueError(dialect)


_STREAM_CACHE: dict[tuple, tuple[list[bytes], list[bytes], list[bytes]]] = {}


def stream_events(dialect: str, n: int, tool: str | None, sse: bool = True):
    """(head, deltas, tail) as HTTP-chunk-encoded pieces, one per event (cached)."""
    key = (dialect, n, tool, sse)
    ev = _STREAM_CACHE.get(key)
    if ev is None:
        if dialect == "openai":
            parts = openai_stream(n, tool)
        elif dialect == "anthropic":
            parts = anthropic_stream(n, tool)
        elif dialect == "bedrock":
            parts = bedrock_stream(n, tool)
        else:
            h, d, t = gemini_objects(n, tool)
            parts = (_gem_sse(h), _gem_sse(d), _gem_sse(t)) if sse else _gem_array(h, d, t)
        ev = tuple([_chunked(e) for e in p] for p in parts)
        if len(_STREAM_CACHE) < 256:
            _STREAM_CACHE[key] = ev
    return ev


def openai_events(n: int) -> list[bytes]:
    """Chunk-encoded OpenAI SSE events, no tool call (kept for bench.measure_clients)."""
    h, d, t = stream_events("openai", n, None)
    return h + d + t


STREAM_CT = {"openai": b"text/event-stream", "anthropic": b"text/event-stream",
             "bedrock": b"application/vnd.amazon.eventstream", "gemini": b"text/event-stream"}


# ======================================================================================
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
    """`body` (whole, Content-Length), or a chunked stream: `head`/`deltas`/`tail` lists of
    chunk-encoded pieces (paced when `pace` > 0), or `big` bytes (OpenAI flow-control test)."""

    __slots__ = ("status", "content_type", "body", "head", "deltas", "tail", "pace", "batch", "big")

    def __init__(self, status=200, content_type=b"application/json", body=None, head=None, deltas=None, tail=None,
                 pace=0.0, batch=True, big=0):
        self.status = status
        self.content_type = content_type
        self.body = body
        self.head = head
        self.deltas = deltas
        self.tail = tail
        self.pace = pace
        self.batch = batch
        self.big = big


_ERROR_BODY = b'{"error":{"message":"mock error","type":"mock","code":null}}'


def _stream_reply(req: Request, dialect: str, sse: bool = True) -> Reply:
    pace = req.opt("pace-ms")
    n = req.opt("events")
    tool = req.opt("tool")
    head, deltas, tail = stream_events(dialect, int(n) if n else 64, tool.decode() if tool else None, sse)
    return Reply(content_type=STREAM_CT[dialect] if sse else b"application/json", head=head, deltas=deltas, tail=tail,
                 pace=float(pace) / 1000.0 if pace else 0.0, batch=req.opt("batch") != b"0")


def _status_reply(req: Request) -> Reply | None:
    st = req.opt("status")
    if st is not None and int(st) != 200:
        return Reply(status=int(st), body=_ERROR_BODY)
    return None


def _wants_stream(body: bytes) -> bool:
    return b'"stream": true' in body or b'"stream":true' in body


def openai_chat(req: Request) -> Reply:
    r = _status_reply(req)
    if r is not None:
        return r
    if _wants_stream(req.body):
        big = req.opt("bytes")
        if big:
            pace = req.opt("pace-ms")
            return Reply(content_type=b"text/event-stream", big=int(big), pace=float(pace) / 1000.0 if pace else 0.0)
        return _stream_reply(req, "openai")
    tool = req.opt("tool")
    return Reply(body=chat_completion_tool(tool.decode()) if tool else CHAT_COMPLETION)


def anthropic_messages(req: Request) -> Reply:
    r = _status_reply(req)
    if r is not None:
        return r
    if _wants_stream(req.body):
        return _stream_reply(req, "anthropic")
    tool = req.opt("tool")
    return Reply(body=anthropic_message_tool(tool.decode()) if tool else ANTHROPIC_MESSAGE)


def bedrock(req: Request) -> Reply:
    r = _status_reply(req)
    if r is not None:
        return r
    if req.path.endswith(b"/converse-stream"):
        return _stream_reply(req, "bedrock")
    tool = req.opt("tool")
    return Reply(body=bedrock_converse(tool.decode() if tool else None))


def gemini(req: Request) -> Reply:
    r = _status_reply(req)
    if r is not None:
        return r
    if req.path.endswith(b":streamGenerateContent"):
        return _stream_reply(req, "gemini", sse=req.opt("alt") == b"sse")
    tool = req.opt("tool")
    return Reply(body=gemini_generate(tool.decode() if tool else None))


def not_found(req: Request) -> Reply:
    return Reply(status=404, body=b'{"error":"not found"}')


ROUTES = {
    (b"POST", b"/v1/chat/completions"): openai_chat,
    (b"POST", b"/v1/messages"): anthropic_messages,
}


def route(req: Request):
    h = ROUTES.get((req.method, req.path))
    if h is not None:
        return h
    if req.method == b"POST":
        if req.path.startswith(b"/model/") and req.path.endswith((b"/converse", b"/converse-stream")):
            return bedrock
        if req.path.startswith((b"/v1beta/models/", b"/v1/models/")) and req.path.endswith((b":generateContent", b":streamGenerateContent")):
            return gemini
    return not_found


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 429: b"Too Many Requests", 500: b"Internal Server Error", 503: b"Service Unavailable"}

# precomputed whole response for the hot path
_DEFAULT_JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(CHAT_COMPLETION)
) + CHAT_COMPLETION
_BATCH_CACHE: dict[tuple, bytes] = {}


# ======================================================================================
# paced streams: one timer wheel per process


class Pacer:
    """Writes the next delta of every due paced stream once per 1 ms tick."""

    TICK = 0.001

    def __init__(self, loop):
        self.loop = loop
        self.slots: dict[int, list] = {}
        self.t0 = loop.time()
        self.done_tick = int((loop.time() - self.t0) / self.TICK)
        self.active = 0
        self.handle = None

    def add(self, proto, rep: Reply):
        """HEAD was written; schedule the deltas and tail of this stream."""
        step = max(1, round(rep.pace / self.TICK))
        st = [proto, rep, 0, step]
        due = int((self.loop.time() - self.t0) / self.TICK) + step
        self.slots.setdefault(due, []).append(st)
        self.active += 1
        if self.handle is None:
            self.done_tick = due - step
            self._arm()

    def _arm(self):
        self.handle = self.loop.call_at(self.t0 + (self.done_tick + 1) * self.TICK, self._tick)

    def _tick(self):
        self.handle = None
        now_tick = int((self.loop.time() - self.t0) / self.TICK)
        slots = self.slots
        for t in range(self.done_tick + 1, now_tick + 1):
            due = slots.pop(t, None)
            if not due:
                continue
            for st in due:
                proto, rep, i, step = st
                if proto.closed:
                    self.active -= 1
                    proto.stream_done()
                    continue
                w = proto.transport.write
                w(rep.deltas[i])
                i += 1
                if i < len(rep.deltas):
                    st[2] = i
                    slots.setdefault(t + step, []).append(st)
                else:
                    w(b"".join(rep.tail) + b"0\r\n\r\n")
                    self.active -= 1
                    proto.stream_done()
        self.done_tick = now_tick
        if self.active > 0:
            self._arm()


_PACER: Pacer | None = None


def _pacer() -> Pacer:
    global _PACER
    if _PACER is None:
        _PACER = Pacer(asyncio.get_running_loop())
    return _PACER


# ======================================================================================
# server protocol


class MockProtocol(asyncio.Protocol):
    def __init__(self):
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.queue: list[Request] = []  # pipelined requests waiting for a streaming reply to finish
        self.busy = False  # a paced or big reply is in progress
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

    def stream_done(self):
        self.busy = False
        while self.queue and not self.busy and not self.closed:
            self.dispatch(self.queue.pop(0))

    def dispatch(self, req: Request):
        # hot path: plain chat completion
        if req.path == b"/v1/chat/completions" and not req.query and b'"stream' not in req.body and not any(
                k.startswith(b"x-mock-") for k in req.headers):
            self.transport.write(_DEFAULT_JSON_RESPONSE)
            return
        rep = route(req)(req)
        if rep.body is not None:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
                % (rep.status, _REASONS.get(rep.status, b"X"), rep.content_type, len(rep.body))
                + rep.body
            )
            return
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n" % (
            rep.status, _REASONS.get(rep.status, b"X"), rep.content_type)
        if rep.big:
            self.busy = True
            asyncio.get_running_loop().create_task(self.big_stream(head, rep))
            return
        if rep.pace == 0.0:
            if rep.batch:
                key = (head, id(rep.head), id(rep.deltas), id(rep.tail))
                whole = _BATCH_CACHE.get(key)
                if whole is None:
                    whole = head + b"".join(rep.head + rep.deltas + rep.tail) + b"0\r\n\r\n"
                    if len(_BATCH_CACHE) < 256:
                        _BATCH_CACHE[key] = whole
                self.transport.write(whole)
                return
            w = self.transport.write
            w(head)
            for e in rep.head:
                w(e)
            for e in rep.deltas:
                w(e)
            for e in rep.tail:
                w(e)
            w(b"0\r\n\r\n")
            return
        # paced: HEAD now, deltas from the timer wheel
        self.busy = True
        self.transport.write(head + b"".join(rep.head))
        if rep.deltas:
            _pacer().add(self, rep)
        else:
            self.transport.write(b"".join(rep.tail) + b"0\r\n\r\n")
            self.stream_done()

    async def big_stream(self, head: bytes, rep: Reply):
        w = self.transport.write
        try:
            w(head)
            chunk_text = b"x" * 4000
            ev = _chunked(sse_content(chunk_text))
            n = max(1, rep.big // len(ev))
            h, _, t = stream_events("openai", 0, None)
            for e in h:
                w(e)
            for _i in range(n):
                if self.closed:
                    return
                w(ev)
                if self.paused:
                    await self.drain()
                if rep.pace:
                    await asyncio.sleep(rep.pace)
            for e in t:
                w(e)
            w(b"0\r\n\r\n")
        finally:
            self.stream_done()


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

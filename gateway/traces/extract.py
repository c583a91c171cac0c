"""Pure extraction from recorded traffic: token usage, response text and tool calls,
request messages and tools offered, per provider dialect.

`usage_of` runs in the trace writer thread for every record and is built to be cheap:
it finds the provider's own usage object with a byte search (from the end, where the
cumulative totals are) and decodes only that object, never the whole stream. The
readable views (`response_view`, `request_view`) decode everything and run at read
time only: `sidegate traces show/export`, and OTel content capture when it is on.

Token accounting (the same for every dialect, as the GenAI semantic conventions ask):
`input` is every prompt token, cached ones included (Anthropic and Bedrock report cache
reads and writes beside `input_tokens`, so they are added); `cached` is the part of
`input` read from the provider's prompt cache; `output` is every generated token,
reasoning/thinking included (Gemini's `thoughtsTokenCount` is added to
`candidatesTokenCount`).
"""

from __future__ import annotations

import base64
import json
from typing import Iterable, NamedTuple

import msgspec

from ..governance.openai_responses import call_of as responses_call_of

__all__ = ["Usage", "usage_of", "find_usage", "response_view", "request_view", "Reply", "Request",
           "is_stream", "model_in_body"]


class Usage(NamedTuple):
    input: int = 0
    output: int = 0
    cached: int = 0


ZERO = Usage()
_scan = json.JSONDecoder().raw_decode
_WINDOW_SMALL = 640  # usage objects are a few hundred bytes
_WINDOW = 16384


def _join(body_or_chunks) -> bytes:
    if isinstance(body_or_chunks, (bytes, bytearray, memoryview)):
        return bytes(body_or_chunks)
    if len(body_or_chunks) == 1:
        return body_or_chunks[0]
    return b"".join(body_or_chunks)


def is_stream(content_type: str, data: bytes = b"") -> bool:
    ct = content_type or ""
    return ct.startswith(("text/event-stream", "application/vnd.amazon.eventstream")) or (
        not ct and data[:5] == b"data:")


# -- byte-search decoding --------------------------------------------------------------------

def _value_at(data: bytes, i: int, klen: int):
    """The JSON value after the key that starts at data[i] (`"key"` of klen bytes)."""
    j = i + klen
    for size in (_WINDOW_SMALL, _WINDOW):
        window = data[j:j + size].decode("utf-8", "replace")
        k = window.find(":")
        if k < 0 or window[:k].strip():
            return None
        k += 1
        while k < len(window) and window[k] in " \t\r\n":
            k += 1
        try:
            return _scan(window, k)[0]
        except ValueError:
            if j + size >= len(data):
                return None
    return None


def _dicts(data: bytes, key: bytes, last: bool = True, start: int = 0, end: int | None = None):
    """JSON objects that follow `"key":` in data (last first unless last=False)."""
    pat = b'"' + key + b'"'
    lo, hi = start, len(data) if end is None else end
    while True:
        i = data.rfind(pat, lo, hi) if last else data.find(pat, lo, hi)
        if i < 0:
            return
        if last:
            hi = i
        else:
            lo = i + 1
        if i and data[i - 1] == 0x5C:  # \"key\": inside a JSON string, not a key
            continue
        v = _value_at(data, i, len(pat))
        if isinstance(v, dict):
            yield v


def _int(d: dict, *keys: str) -> int:
    for k in keys:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return 0


def _has(d: dict, keys: tuple) -> bool:
    return any(isinstance(d.get(k), int) for k in keys)


# -- per dialect: the usage object and its normalisation ---------------------------------------

_OPENAI_KEYS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")
_ANTHROPIC_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
_CONVERSE_KEYS = ("inputTokens", "outputTokens")
_GEMINI_KEYS = ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "totalTokenCount")
_METRICS_KEY = b"amazon-bedrock-invocationMetrics"


def _openai_usage(d: dict) -> Usage:
    details = d.get("prompt_tokens_details") or d.get("input_tokens_details") or {}
    cached = _int(details, "cached_tokens") if isinstance(details, dict) else 0
    return Usage(_int(d, "prompt_tokens", "input_tokens"), _int(d, "completion_tokens", "output_tokens"), cached)


def _anthropic_usage(d: dict) -> Usage:
    read = _int(d, "cache_read_input_tokens")
    write = _int(d, "cache_creation_input_tokens")
    return Usage(_int(d, "input_tokens") + read + write, _int(d, "output_tokens"), read)


def _converse_usage(d: dict) -> Usage:
    read = _int(d, "cacheReadInputTokens", "cacheReadInputTokenCount")
    write = _int(d, "cacheWriteInputTokens", "cacheWriteInputTokenCount")
    return Usage(_int(d, "inputTokens") + read + write, _int(d, "outputTokens"), read)


def _metrics_usage(d: dict) -> Usage:
    read = _int(d, "cacheReadInputTokenCount")
    write = _int(d, "cacheWriteInputTokenCount")
    return Usage(_int(d, "inputTokenCount") + read + write, _int(d, "outputTokenCount"), read)


def _gemini_usage(d: dict) -> Usage:
    return Usage(_int(d, "promptTokenCount") + _int(d, "toolUsePromptTokenCount"),
                 _int(d, "candidatesTokenCount") + _int(d, "thoughtsTokenCount"),
                 _int(d, "cachedContentTokenCount"))


def _first(gen):
    for v in gen:
        return v
    return None


def _openai(data: bytes) -> Usage | None:
    # Chat: the usage chunk (or a usage field on the last chunk); Responses: the usage of
    # response.completed / .incomplete / .failed. Earlier chunks carry "usage": null.
    for d in _dicts(data, b"usage"):
        if _has(d, _OPENAI_KEYS):
            return _openai_usage(d)
    return None


def _anthropic_events(data: bytes, stream: bool) -> Usage | None:
    if not stream:
        d = _first(d for d in _dicts(data, b"usage") if _has(d, _ANTHROPIC_KEYS))
        return _anthropic_usage(d) if d is not None else None
    # message_start carries the input side; message_delta the cumulative output (and, on
    # newer API versions, cumulative input fields too): later values win.
    s = data.find(b'"message_start"')
    start = _first(d for d in _dicts(data, b"usage", last=False, start=max(s, 0)) if _has(d, _ANTHROPIC_KEYS))
    if start is None:
        return None
    m = data.rfind(b'"message_delta"')
    final = None
    if m > s:
        final = _first(d for d in _dicts(data, b"usage", start=m) if _has(d, _ANTHROPIC_KEYS))
    merged = dict(start)
    if final:
        merged.update({k: v for k, v in final.items() if v is not None})
    return _anthropic_usage(merged)


def _gemini(data: bytes) -> Usage | None:
    # usageMetadata is cumulative: the last one is the total.
    for d in _dicts(data, b"usageMetadata"):
        if _has(d, _GEMINI_KEYS):
            return _gemini_usage(d)
    return None


# AWS event-stream: frames are total_len u32 | headers_len u32 | prelude crc | headers | payload | crc
def _payloads(buf: bytes) -> list[bytes] | None:
    out = []
    off, n = 0, len(buf)
    while off < n:
        if off + 16 > n:
            return out if out else None
        total = int.from_bytes(buf[off:off + 4], "big")
        hlen = int.from_bytes(buf[off + 4:off + 8], "big")
        if total < 16 or off + total > n or 12 + hlen > total - 4:
            return out if out else None
        out.append(buf[off + 12 + hlen:off + total - 4])
        off += total
    return out


class _B64Chunk(msgspec.Struct):
    bytes: str = ""


_chunk_dec = msgspec.json.Decoder(_B64Chunk)


def _invoke_event(payload: bytes) -> bytes:
    """The model's own JSON carried by an InvokeModelWithResponseStream chunk frame."""
    if b'"bytes"' not in payload:
        return b""
    try:
        return base64.b64decode(_chunk_dec.decode(payload).bytes)
    except (msgspec.DecodeError, ValueError):
        return b""


def _bedrock_invoke_stream(chunks) -> Usage | None:
    # Frames are relayed whole, so each sent chunk holds whole frames: look at the first
    # chunk (message_start) and the last few (message_delta, invocation metrics) only.
    if isinstance(chunks, (bytes, bytearray)):
        chunks = [bytes(chunks)]
    head = tail = None
    if len(chunks) > 1:
        head = _payloads(chunks[0])
        tail = []
        for c in chunks[-4:] if len(chunks) > 4 else chunks[1:]:
            p = _payloads(c)
            if p is None:
                head = None
                break
            tail.extend(p)
    if head is None:
        tail = _payloads(_join(chunks)) or []
        head = tail[:2]
    events_tail = []
    for p in reversed(tail):  # the metrics ride on the last chunk; stop at message_delta
        ev = _invoke_event(p)
        if _METRICS_KEY in ev:
            d = _first(_dicts(ev, _METRICS_KEY))
            if d is not None and _has(d, ("inputTokenCount", "outputTokenCount")):
                return _metrics_usage(d)
        events_tail.append(ev)
        if b'"message_delta"' in ev:
            break
    # Anthropic models: their own message_start / message_delta usage
    first = b""
    for p in head:
        first = _invoke_event(p)
        if b'"message_start"' in first:
            break
    return _anthropic_events(first + b"\n" + b"\n".join(reversed(events_tail)), True)


def _bedrock_invoke_body(data: bytes) -> Usage | None:
    d = _first(x for x in _dicts(data, b"usage") if _has(x, _ANTHROPIC_KEYS + _CONVERSE_KEYS + _OPENAI_KEYS))
    if d is not None:
        if "inputTokens" in d or "outputTokens" in d:
            return _converse_usage(d)
        if "prompt_tokens" in d:
            return _openai_usage(d)
        return _anthropic_usage(d)
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    if "prompt_token_count" in doc or "generation_token_count" in doc:  # Meta Llama
        return Usage(_int(doc, "prompt_token_count"), _int(doc, "generation_token_count"), 0)
    if "inputTextTokenCount" in doc:  # Amazon Titan
        out = sum(_int(r, "tokenCount") for r in doc.get("results") or [] if isinstance(r, dict))
        return Usage(_int(doc, "inputTextTokenCount"), out, 0)
    return None


def _model_at(body: bytes, i: int):
    """The value after the `"model"` key at body[i]: a plain string in the two spellings
    JSON encoders write (`: "` and `:"`, no escape, at most 256 bytes) is sliced out;
    anything else goes to `_value_at`."""
    j = i + 7
    k = j + 3 if body.startswith(b': "', j) else j + 2 if body.startswith(b':"', j) else 0
    if k:
        e = body.find(b'"', k, k + 257)
        if e >= 0 and body.find(b"\\", k, e) < 0:
            return body[k:e].decode("utf-8", "replace")
    return _value_at(body, i, 7)


def model_in_body(body: bytes) -> str:
    """The top-level `model` of a request body, found without decoding the body: near the
    start (hand-written JSON, most SDKs' key order) or else the last `"model": "..."`
    (OpenAI and Anthropic SDKs put it after the messages; a tool schema's `model`
    property is an object, not a string, and is skipped)."""
    if not body:
        return ""
    head = body.find(b'"model"', 0, 256)
    if head >= 0:
        v = _model_at(body, head)
        if isinstance(v, str):
            return v[:256]
    end = len(body)
    for _ in range(8):
        i = body.rfind(b'"model"', 0, end)
        if i < 0:
            break
        end = i
        if i and body[i - 1] == 0x5C:
            continue
        v = _model_at(body, i)
        if isinstance(v, str):
            return v[:256]
    return ""


# -- fast paths: msgspec Structs with only the usage fields, on the one event that has them --

class _Cached(msgspec.Struct):
    cached_tokens: int | None = None


class _OAUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    prompt_tokens_details: _Cached | None = None
    input_tokens_details: _Cached | None = None


class _OADoc(msgspec.Struct):
    usage: _OAUsage | None = None
    response: "_OADoc | None" = None  # Responses events carry the response object


class _AnthUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _AnthMessage(msgspec.Struct):
    usage: _AnthUsage | None = None


class _AnthEvent(msgspec.Struct):
    usage: _AnthUsage | None = None
    message: _AnthMessage | None = None


class _GemUsage(msgspec.Struct):
    promptTokenCount: int | None = None
    candidatesTokenCount: int | None = None
    thoughtsTokenCount: int | None = None
    cachedContentTokenCount: int | None = None
    toolUsePromptTokenCount: int | None = None


class _GemDoc(msgspec.Struct):
    usageMetadata: _GemUsage | None = None


_oa_dec = msgspec.json.Decoder(_OADoc)
_anth_dec = msgspec.json.Decoder(_AnthEvent)
_gem_dec = msgspec.json.Decoder(_GemDoc)
_FAST_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


def _line_at(data: bytes, i: int) -> bytes:
    """The SSE `data:` line around offset i (single-line JSON events)."""
    s = data.rfind(b"data:", 0, i)
    e = data.find(b"\n", i)
    return data[s + 5:e if e >= 0 else len(data)] if s >= 0 else b""


def _n(v: int | None) -> int:
    return v or 0


def _oa_fast(data: bytes, stream: bool) -> Usage | None:
    if stream:
        i = data.rfind(b'"usage"')
        if i < 0:
            return None
        doc = _oa_dec.decode(_line_at(data, i))
    else:
        doc = _oa_dec.decode(data)
    u = doc.usage or (doc.response.usage if doc.response is not None else None)
    if u is None or (u.prompt_tokens is None and u.input_tokens is None and u.completion_tokens is None
                     and u.output_tokens is None):
        raise ValueError("usage not on the last usage event")  # fall back to the full search
    det = u.prompt_tokens_details or u.input_tokens_details
    return Usage(_n(u.prompt_tokens if u.prompt_tokens is not None else u.input_tokens),
                 _n(u.completion_tokens if u.completion_tokens is not None else u.output_tokens),
                 _n(det.cached_tokens) if det is not None else 0)


def _anth_fast(data: bytes) -> Usage | None:
    s = data.find(b'"message_start"')
    m = data.rfind(b'"message_delta"')
    if s < 0:
        raise ValueError("no message_start")
    start = _anth_dec.decode(_line_at(data, s))
    u = start.message.usage if start.message is not None else None
    if u is None:
        raise ValueError("no usage in message_start")
    read, write, inp, out = u.cache_read_input_tokens, u.cache_creation_input_tokens, u.input_tokens, u.output_tokens
    if m > s:
        d = _anth_dec.decode(_line_at(data, m)).usage
        if d is not None:  # cumulative: later values win
            read = d.cache_read_input_tokens if d.cache_read_input_tokens is not None else read
            write = d.cache_creation_input_tokens if d.cache_creation_input_tokens is not None else write
            inp = d.input_tokens if d.input_tokens is not None else inp
            out = d.output_tokens if d.output_tokens is not None else out
    return Usage(_n(inp) + _n(read) + _n(write), _n(out), _n(read))


def _gem_fast(data: bytes) -> Usage | None:
    i = data.rfind(b'"usageMetadata"')
    if i < 0:
        return None
    u = _gem_dec.decode(_line_at(data, i)).usageMetadata
    if u is None or (u.promptTokenCount is None and u.candidatesTokenCount is None):
        raise ValueError("no counts on the last usageMetadata")
    return Usage(_n(u.promptTokenCount) + _n(u.toolUsePromptTokenCount),
                 _n(u.candidatesTokenCount) + _n(u.thoughtsTokenCount), _n(u.cachedContentTokenCount))


def find_usage(dialect: str, path: str, content_type: str, body_or_chunks) -> Usage | None:
    """The call's token usage as the provider reported it, or None when it reported none."""
    if not body_or_chunks:
        return None
    if dialect != "bedrock":
        data = _join(body_or_chunks)
        stream = is_stream(content_type, data)
        try:  # the usual shapes, decoding only the event that carries the usage
            if dialect == "openai":
                return _oa_fast(data, stream)
            if dialect == "anthropic" and stream:
                return _anth_fast(data)
            if dialect == "gemini" and stream:
                return _gem_fast(data)
        except (ValueError, *_FAST_ERRORS):
            pass
    return _find_usage(dialect, path, content_type, body_or_chunks)


def _find_usage(dialect: str, path: str, content_type: str, body_or_chunks) -> Usage | None:
    """The call's token usage as the provider reported it, or None when it reported none."""
    if dialect == "bedrock":
        if content_type.startswith("application/vnd.amazon.eventstream"):
            if path.endswith("/invoke-with-response-stream") or "/converse" not in path:
                return _bedrock_invoke_stream(body_or_chunks)
            data = _join(body_or_chunks)
            d = _first(x for x in _dicts(data, b"usage") if _has(x, _CONVERSE_KEYS))
            return _converse_usage(d) if d is not None else None
        data = _join(body_or_chunks)
        if "/converse" in path:
            d = _first(x for x in _dicts(data, b"usage") if _has(x, _CONVERSE_KEYS))
            return _converse_usage(d) if d is not None else None
        return _bedrock_invoke_body(data)
    data = _join(body_or_chunks)
    if dialect == "openai":
        return _openai(data)
    if dialect == "anthropic":
        return _anthropic_events(data, is_stream(content_type, data))
    if dialect == "gemini":
        return _gemini(data)
    return None


def usage_of(dialect: str, path: str, content_type: str, body_or_chunks) -> Usage:
    """Usage(input, output, cached) of one call; zeros when the provider reported none."""
    try:
        return find_usage(dialect, path, content_type, body_or_chunks) or ZERO
    except Exception:  # recorded traffic can be anything: never raise into the writer
        return ZERO


# == readable views (read time) ===============================================================

class Reply(msgspec.Struct):
    text: str = ""
    tool_calls: list[dict] = msgspec.field(default_factory=list)  # {name, arguments (JSON text), call_id}
    stop_reason: str | None = None
    error: str | None = None
    model: str | None = None


class Request(msgspec.Struct):
    system: str = ""
    messages: list[dict] = msgspec.field(default_factory=list)  # {role, text, tool_calls?, tool_call_id?}
    tools: list[str] = msgspec.field(default_factory=list)
    model: str | None = None
    parsed: bool = True


def _loads(b):
    try:
        return json.loads(b)
    except (ValueError, TypeError):
        return None


def _sse_objs(data: bytes) -> list[tuple[str | None, object]]:
    from sidegate_codecs import CodecError, SSEDecoder

    dec = SSEDecoder()
    try:
        events = dec.feed(data)
        events += dec.close()
    except CodecError as e:
        events = list(getattr(e, "events", None) or [])
    out = []
    for ev in events:
        d = ev.data
        if not d or d.strip() == b"[DONE]":
            continue
        obj = _loads(d)
        if obj is not None:
            out.append((ev.event, obj))
    return out


def _eventstream_frames(data: bytes) -> list[tuple[str | None, str | None, bytes]]:
    from sidegate_codecs import CodecError, EventStreamDecoder

    dec = EventStreamDecoder()
    try:
        msgs = dec.feed(data)
        msgs += dec.close()
    except CodecError as e:
        msgs = list(getattr(e, "events", None) or [])
    return [(m.message_type, m.event_type or m.headers.get(":exception-type"), m.payload) for m in msgs]


def _args_text(v) -> str:
    if v is None:
        return "{}"
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


# -- OpenAI ---------------------------------------------------------------------------------

def _openai_chat_reply(objs: list, stream: bool) -> Reply:
    r = Reply()
    if not stream:
        doc = objs[0] if objs else {}
        r.model = doc.get("model")
        if "error" in doc:
            r.error = _err_text(doc["error"])
        ch = (doc.get("choices") or [{}])[0]
        msg = ch.get("message") or {}
        r.text = msg.get("content") or ""
        if isinstance(r.text, list):
            r.text = "".join(p.get("text", "") for p in r.text if isinstance(p, dict))
        for c in msg.get("tool_calls") or []:
            fn = c.get("function") or c.get("custom") or {}  # (a custom tool's call: free-form input)
            r.tool_calls.append({"name": fn.get("name", ""), "arguments": fn.get("arguments") or fn.get("input") or "{}",
                                 "call_id": c.get("id")})
        r.stop_reason = ch.get("finish_reason")
        return r
    text, calls = [], {}
    for _, obj in objs:
        if not isinstance(obj, dict):
            continue
        if "error" in obj and not obj.get("choices"):
            r.error = _err_text(obj["error"])
            continue
        r.model = r.model or obj.get("model")
        for ch in obj.get("choices") or []:
            if ch.get("index", 0) != 0:
                continue
            delta = ch.get("delta") or {}
            if delta.get("content"):
                text.append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                c = calls.setdefault(tc.get("index", 0), {"name": "", "arguments": "", "call_id": None})
                if tc.get("id"):
                    c["call_id"] = tc["id"]
                fn = tc.get("function") or tc.get("custom") or {}
                if fn.get("name"):
                    c["name"] += fn["name"]
                args = fn.get("arguments") or fn.get("input")
                if args:
                    c["arguments"] += args
            if ch.get("finish_reason"):
                r.stop_reason = ch["finish_reason"]
    r.text = "".join(text)
    r.tool_calls = [dict(c, arguments=c["arguments"] or "{}") for _, c in sorted(calls.items())]
    return r


def _responses_output(resp: dict, r: Reply) -> None:
    text = []
    for item in resp.get("output") or []:
        t = item.get("type")
        if t == "message":
            for part in item.get("content") or []:
                if part.get("type") == "output_text":
                    text.append(part.get("text", ""))
        elif (call := _responses_call(item)) is not None:
            r.tool_calls.append(call)
    r.text = "".join(text)
    r.stop_reason = resp.get("status")
    r.model = resp.get("model")
    if resp.get("error"):
        r.error = _err_text(resp["error"])


def _responses_call(item: dict) -> dict | None:
    """A function, custom or built-in tool (shell, apply_patch, ...) call item, as governance names it."""
    call = responses_call_of(item) if isinstance(item, dict) else None
    if call is None:
        return None
    return {"name": call[0], "arguments": call[1] or "{}", "call_id": item.get("call_id")}


def _responses_reply(objs: list, stream: bool) -> Reply:
    r = Reply()
    if not stream:
        _responses_output(objs[0] if objs else {}, r)
        return r
    text, items = [], []
    for _, obj in objs:
        t = obj.get("type") if isinstance(obj, dict) else None
        if t in ("response.completed", "response.incomplete", "response.failed"):
            _responses_output(obj.get("response") or {}, r)
            return r
        if t == "response.output_text.delta":
            text.append(obj.get("delta", ""))
        elif t == "response.output_item.done" and (call := _responses_call(obj.get("item") or {})) is not None:
            items.append(call)
        elif t == "error" or (t is None and isinstance(obj, dict) and "error" in obj):
            r.error = _err_text(obj.get("error") or obj)
            r.stop_reason = "failed"
    r.text = "".join(text)
    r.tool_calls = items
    return r


def _err_text(e) -> str:
    if isinstance(e, dict):
        return str(e.get("message") or e.get("type") or e.get("code") or e)
    return str(e)


# -- Anthropic (also inside Bedrock InvokeModel) ------------------------------------------------

def _anthropic_message(doc: dict, r: Reply) -> None:
    text = []
    for b in doc.get("content") or []:
        t = b.get("type")
        if t == "text":
            text.append(b.get("text", ""))
        elif t == "tool_use":
            r.tool_calls.append({"name": b.get("name", ""), "arguments": _args_text(b.get("input")),
                                 "call_id": b.get("id")})
    r.text = "".join(text)
    r.stop_reason = doc.get("stop_reason")
    r.model = doc.get("model")
    if doc.get("type") == "error":
        r.error = _err_text(doc.get("error"))


def _anthropic_stream(events: Iterable[dict], r: Reply) -> None:
    text, blocks = [], {}
    for ev in events:
        if not isinstance(ev, dict):
            continue
        t = ev.get("type")
        if t == "message_start":
            r.model = (ev.get("message") or {}).get("model")
        elif t == "content_block_start":
            cb = ev.get("content_block") or {}
            if cb.get("type") == "tool_use":
                inp = cb.get("input")
                blocks[ev.get("index", 0)] = {"name": cb.get("name", ""), "call_id": cb.get("id"), "parts": [],
                                              "initial": inp if inp else None}
            elif cb.get("type") == "text" and cb.get("text"):
                text.append(cb["text"])
        elif t == "content_block_delta":
            d = ev.get("delta") or {}
            if d.get("type") == "text_delta":
                text.append(d.get("text", ""))
            elif d.get("type") == "input_json_delta" and ev.get("index", 0) in blocks:
                blocks[ev.get("index", 0)]["parts"].append(d.get("partial_json", ""))
        elif t == "message_delta":
            sr = (ev.get("delta") or {}).get("stop_reason")
            if sr:
                r.stop_reason = sr
        elif t == "error":
            r.error = _err_text(ev.get("error"))
    r.text = "".join(text)
    for _, b in sorted(blocks.items()):
        args = "".join(b["parts"])
        if not args:
            args = _args_text(b["initial"]) if b["initial"] else "{}"
        r.tool_calls.append({"name": b["name"], "arguments": args, "call_id": b["call_id"]})


# -- Bedrock Converse -------------------------------------------------------------------------

def _converse_message(doc: dict, r: Reply) -> None:
    msg = ((doc.get("output") or {}).get("message")) or {}
    text = []
    for b in msg.get("content") or []:
        if "text" in b:
            text.append(b["text"])
        elif "toolUse" in b:
            tu = b["toolUse"]
            r.tool_calls.append({"name": tu.get("name", ""), "arguments": _args_text(tu.get("input")),
                                 "call_id": tu.get("toolUseId")})
    r.text = "".join(text)
    r.stop_reason = doc.get("stopReason")
    if "message" in doc and not msg:
        r.error = str(doc["message"])


def _converse_stream(frames, r: Reply) -> None:
    text, blocks = [], {}
    for mtype, etype, payload in frames:
        obj = _loads(payload) or {}
        if mtype in ("exception", "error"):
            r.error = f"{etype}: {obj.get('message', '')}" if isinstance(obj, dict) else str(etype)
            continue
        if etype == "contentBlockStart":
            tu = ((obj.get("start") or {}).get("toolUse"))
            if tu:
                blocks[obj.get("contentBlockIndex", 0)] = {"name": tu.get("name", ""),
                                                          "call_id": tu.get("toolUseId"), "parts": []}
        elif etype == "contentBlockDelta":
            d = obj.get("delta") or {}
            if "text" in d:
                text.append(d["text"])
            elif "toolUse" in d:
                i = obj.get("contentBlockIndex", 0)
                if i in blocks:
                    blocks[i]["parts"].append((d["toolUse"] or {}).get("input", ""))
        elif etype == "messageStop":
            r.stop_reason = obj.get("stopReason")
    r.text = "".join(text)
    for _, b in sorted(blocks.items()):
        r.tool_calls.append({"name": b["name"], "arguments": "".join(b["parts"]) or "{}", "call_id": b["call_id"]})


# -- Gemini -----------------------------------------------------------------------------------

def _path_tokens(path: str) -> list:
    out = []
    p = path[1:] if path.startswith("$") else path
    i = 0
    while i < len(p):
        c = p[i]
        if c == ".":
            j = i + 1
            while j < len(p) and p[j] not in ".[":
                j += 1
            out.append(p[i + 1:j])
            i = j
        elif c == "[":
            j = p.index("]", i)
            inner = p[i + 1:j].strip("'\"")
            out.append(int(inner) if inner.isdigit() else inner)
            i = j + 1
        else:
            j = i
            while j < len(p) and p[j] not in ".[":
                j += 1
            out.append(p[i:j])
            i = j
    return out


def _assign(root: dict, path: str, value, concat: bool) -> None:
    toks = _path_tokens(path)
    if not toks:
        return
    node = root
    for tok, nxt in zip(toks, toks[1:]):
        empty = [] if isinstance(nxt, int) else {}
        if isinstance(tok, int):
            while len(node) <= tok:
                node.append(None)
            if node[tok] is None:
                node[tok] = empty
            node = node[tok]
        else:
            if node.get(tok) is None:
                node[tok] = empty
            node = node[tok]
    last = toks[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
        cur = node[last]
        node[last] = cur + value if concat and isinstance(cur, str) and isinstance(value, str) else value
    else:
        cur = node.get(last)
        node[last] = cur + value if concat and isinstance(cur, str) and isinstance(value, str) else value


_PARTIAL_VALUES = (("stringValue", True), ("numberValue", False), ("boolValue", False), ("nullValue", False))


def _gemini_reply(objs: list) -> Reply:
    r = Reply()
    text, calls = [], []
    partial: dict | None = None
    for obj in objs:
        if not isinstance(obj, dict):
            continue
        if "error" in obj:
            r.error = _err_text(obj["error"])
            continue
        r.model = r.model or obj.get("modelVersion")
        for cand in obj.get("candidates") or []:
            if cand.get("index", 0) != 0:
                continue
            for part in ((cand.get("content") or {}).get("parts")) or []:
                if "text" in part and not part.get("thought"):
                    text.append(part["text"])
                fc = part.get("functionCall")
                if fc is None:
                    continue
                if fc.get("name"):
                    call = {"name": fc["name"], "arguments": None, "call_id": fc.get("id"), "_args": {}}
                    calls.append(call)
                    if "args" in fc:
                        call["arguments"] = _args_text(fc.get("args"))
                    partial = call if fc.get("willContinue") else None
                for pa in fc.get("partialArgs") or []:
                    target = partial if partial is not None else (calls[-1] if calls else None)
                    if target is None:
                        continue
                    for key, concat in _PARTIAL_VALUES:
                        if key in pa:
                            _assign(target["_args"], pa.get("jsonPath", "$"), None if key == "nullValue"
                                    else pa[key], concat)
                            break
                if not fc.get("willContinue") and not fc.get("name"):
                    partial = None
            if cand.get("finishReason"):
                r.stop_reason = cand["finishReason"]
    r.text = "".join(text)
    for c in calls:
        args = c.pop("_args")
        if c["arguments"] is None:
            c["arguments"] = _args_text(args)
    r.tool_calls = calls
    return r


def _json_array_objs(data: bytes) -> list:
    doc = _loads(data)
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        return [doc]
    from sidegate_codecs import CodecError, JSONArrayStreamDecoder

    dec = JSONArrayStreamDecoder()
    try:
        chunks = dec.feed(data)
    except CodecError as e:
        chunks = list(getattr(e, "events", None) or [])
    return [o for o in (_loads(c.obj) for c in chunks if c.obj) if o is not None]


def response_view(dialect: str, path: str, content_type: str, body_or_chunks) -> Reply:
    """Text, tool calls and stop reason a client ends up with (choice/candidate 0)."""
    data = _join(body_or_chunks)
    ct = content_type or ""
    try:
        if dialect == "openai":
            stream = is_stream(ct, data)
            objs = _sse_objs(data) if stream else [_loads(data) or {}]
            if path.endswith("/responses"):
                return _responses_reply(objs, stream)
            return _openai_chat_reply(objs, stream)
        if dialect == "anthropic":
            r = Reply()
            if is_stream(ct, data):
                _anthropic_stream((o for _, o in _sse_objs(data)), r)
            else:
                _anthropic_message(_loads(data) or {}, r)
            return r
        if dialect == "bedrock":
            r = Reply()
            if ct.startswith("application/vnd.amazon.eventstream"):
                frames = _eventstream_frames(data)
                if "/converse" in path:
                    _converse_stream(frames, r)
                else:
                    events = []
                    for mtype, etype, payload in frames:
                        if mtype in ("exception", "error"):
                            obj = _loads(payload)
                            r.error = f"{etype}: {obj.get('message', '') if isinstance(obj, dict) else ''}"
                            continue
                        ev = _loads(_invoke_event(payload))
                        if ev is not None:
                            events.append(ev)
                    err = r.error
                    _anthropic_stream(events, r)
                    r.error = r.error or err
                return r
            doc = _loads(data) or {}
            if "/converse" in path:
                _converse_message(doc, r)
            elif isinstance(doc, dict) and "content" in doc:
                _anthropic_message(doc, r)
            elif isinstance(doc, dict):
                r.text = str(doc.get("generation") or doc.get("completion") or
                             ((doc.get("results") or [{}])[0].get("outputText", "")) or
                             (doc.get("outputs") or [{}])[0].get("text", "") or "")
                if "message" in doc and not r.text:
                    r.error = str(doc["message"])
            return r
        if dialect == "gemini":
            if is_stream(ct, data):
                objs = [o for _, o in _sse_objs(data)]
            else:
                objs = _json_array_objs(data)
            return _gemini_reply(objs)
    except Exception as e:  # a view must never fail on odd traffic
        return Reply(error=f"could not read the response ({type(e).__name__})")
    return Reply()


# -- requests -------------------------------------------------------------------------------

def _text_of(content) -> str:
    """Text of a message content in any dialect's shape (string, list of parts/blocks)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    out = []
    for p in content:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, dict):
            if isinstance(p.get("text"), str):
                out.append(p["text"])
            elif "json" in p:
                out.append(_args_text(p["json"]))
            elif p.get("type") in ("image", "image_url", "input_image") or "image" in p or "inlineData" in p:
                out.append("[image]")
            elif p.get("type") in ("document", "file", "input_file") or "document" in p:
                out.append("[file]")
    return "\n".join(x for x in out if x)


def _openai_chat_request(doc: dict, q: Request) -> None:
    for m in doc.get("messages") or []:
        role = m.get("role", "")
        if role in ("system", "developer"):
            q.system = (q.system + "\n" if q.system else "") + _text_of(m.get("content"))
            continue
        e = {"role": role, "text": _text_of(m.get("content"))}
        if m.get("tool_calls"):
            e["tool_calls"] = [{"name": (c.get("function") or {}).get("name", ""),
                                "arguments": (c.get("function") or {}).get("arguments", ""),
                                "call_id": c.get("id")} for c in m["tool_calls"]]
        if m.get("tool_call_id"):
            e["tool_call_id"] = m["tool_call_id"]
        q.messages.append(e)
    for t in doc.get("tools") or []:
        name = (t.get("function") or {}).get("name") or t.get("name") or t.get("type")
        if name:
            q.tools.append(name)


def _responses_request(doc: dict, q: Request) -> None:
    q.system = doc.get("instructions") or ""
    inp = doc.get("input")
    if isinstance(inp, str):
        q.messages.append({"role": "user", "text": inp})
    for item in inp if isinstance(inp, list) else []:
        t = item.get("type")
        if t == "function_call":
            q.messages.append({"role": "assistant", "text": "", "tool_calls": [
                {"name": item.get("name", ""), "arguments": item.get("arguments", ""), "call_id": item.get("call_id")}]})
        elif t == "function_call_output":
            q.messages.append({"role": "tool", "text": _text_of(item.get("output")), "tool_call_id": item.get("call_id")})
        elif "role" in item:
            role = item["role"]
            if role in ("system", "developer"):
                q.system = (q.system + "\n" if q.system else "") + _text_of(item.get("content"))
            else:
                q.messages.append({"role": role, "text": _text_of(item.get("content"))})
    for t in doc.get("tools") or []:
        name = t.get("name") or t.get("type")
        if name:
            q.tools.append(name)


def _anthropic_request(doc: dict, q: Request) -> None:
    q.system = _text_of(doc.get("system"))
    for m in doc.get("messages") or []:
        content = m.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        e = {"role": m.get("role", ""), "text": _text_of([b for b in blocks if b.get("type") == "text"])}
        calls = [{"name": b.get("name", ""), "arguments": _args_text(b.get("input")), "call_id": b.get("id")}
                 for b in blocks if b.get("type") == "tool_use"]
        if calls:
            e["tool_calls"] = calls
        results = [b for b in blocks if b.get("type") == "tool_result"]
        if results and not e["text"] and not calls:
            for res in results:
                q.messages.append({"role": "tool", "text": _text_of(res.get("content")),
                                   "tool_call_id": res.get("tool_use_id")})
            continue
        for res in results:
            e["text"] = (e["text"] + "\n" if e["text"] else "") + "[tool result] " + _text_of(res.get("content"))
        q.messages.append(e)
    for t in doc.get("tools") or []:
        name = t.get("name") or t.get("type")
        if name:
            q.tools.append(name)


def _converse_request(doc: dict, q: Request) -> None:
    q.system = _text_of([s for s in doc.get("system") or [] if isinstance(s, dict)])
    for m in doc.get("messages") or []:
        blocks = m.get("content") or []
        e = {"role": m.get("role", ""), "text": _text_of([b for b in blocks if "text" in b])}
        calls = [{"name": b["toolUse"].get("name", ""), "arguments": _args_text(b["toolUse"].get("input")),
                  "call_id": b["toolUse"].get("toolUseId")} for b in blocks if "toolUse" in b]
        if calls:
            e["tool_calls"] = calls
        results = [b["toolResult"] for b in blocks if "toolResult" in b]
        if results and not e["text"] and not calls:
            for res in results:
                q.messages.append({"role": "tool", "text": _text_of(res.get("content")),
                                   "tool_call_id": res.get("toolUseId")})
            continue
        q.messages.append(e)
    for t in ((doc.get("toolConfig") or {}).get("tools")) or []:
        spec = t.get("toolSpec") or t.get("systemTool") or {}
        if spec.get("name"):
            q.tools.append(spec["name"])


def _gemini_request(doc: dict, q: Request) -> None:
    si = doc.get("systemInstruction") or doc.get("system_instruction")
    if si:
        q.system = _text_of((si.get("parts") if isinstance(si, dict) else si) or [])
    for c in doc.get("contents") or []:
        parts = c.get("parts") or []
        role = {"model": "assistant"}.get(c.get("role", "user"), c.get("role", "user"))
        e = {"role": role, "text": _text_of([p for p in parts if "text" in p and not p.get("thought")])}
        calls = [{"name": p["functionCall"].get("name", ""), "arguments": _args_text(p["functionCall"].get("args")),
                  "call_id": p["functionCall"].get("id")} for p in parts if "functionCall" in p]
        if calls:
            e["tool_calls"] = calls
        results = [p["functionResponse"] for p in parts if "functionResponse" in p]
        if results and not e["text"] and not calls:
            for res in results:
                q.messages.append({"role": "tool", "text": _args_text(res.get("response")),
                                   "tool_call_id": res.get("id") or res.get("name")})
            continue
        q.messages.append(e)
    for t in doc.get("tools") or []:
        for fd in t.get("functionDeclarations") or t.get("function_declarations") or []:
            if fd.get("name"):
                q.tools.append(fd["name"])
        for k in t:
            if k not in ("functionDeclarations", "function_declarations"):
                q.tools.append(k)


def request_view(dialect: str, path: str, body: bytes) -> Request:
    """System prompt, messages and tools offered of a request body."""
    doc = _loads(body) if body else None
    if not isinstance(doc, dict):
        return Request(parsed=False)
    q = Request(model=doc.get("model") if isinstance(doc.get("model"), str) else None)
    try:
        if dialect == "openai":
            if "input" in doc and "messages" not in doc:
                _responses_request(doc, q)
            else:
                _openai_chat_request(doc, q)
        elif dialect == "anthropic":
            _anthropic_request(doc, q)
        elif dialect == "bedrock":
            if "/converse" in path:
                _converse_request(doc, q)
            elif "messages" in doc:
                _anthropic_request(doc, q)
            elif "prompt" in doc or "inputText" in doc:
                q.messages.append({"role": "user", "text": str(doc.get("prompt") or doc.get("inputText"))})
        elif dialect == "gemini":
            _gemini_request(doc, q)
    except Exception:
        q.parsed = False
    return q

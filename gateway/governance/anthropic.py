"""Tool-call governance for Anthropic Messages (`.../v1/messages`).

Streaming: a client tool call is one content block -- `content_block_start` with a
`tool_use` block, `input_json_delta` fragments, `content_block_stop`. Those frames are
held; everything else flows. The call is complete at its `content_block_stop`, or at
the first event that cannot belong to the block (a stream cut by `max_tokens` has no
stop: the call is decided on the fragments that arrived), or at the end of the stream.

A denied / escalated call becomes a `text` block at the same index (start with empty
text, one `text_delta` with the marker, stop), so indices stay dense. When no tool_use
block is left in the message, `message_delta.delta.stop_reason` `tool_use` becomes
`end_turn` (only those bytes change; the rest of the event is kept as it came).

Server-side tools (`server_tool_use`, `mcp_tool_use`, their results), thinking blocks,
`ping` and `error` events are not client tool calls and pass untouched.

The block logic lives in `AnthropicEventGovernor` and works on the *inner* Anthropic
event JSON, so the Bedrock InvokeModelWithResponseStream governor (bedrock_invoke.py),
whose frames wrap the same events in base64, reuses it with its own framing hooks.

Cheap test: an event can only start a tool block or carry a `tool_use` stop reason if
the bytes `"tool_use"` occur in it (inside a JSON string the quotes would be escaped,
and `"server_tool_use"` does not contain them); other events are not parsed at all.
"""

from __future__ import annotations

import logging
import re

import msgspec
from sidegate_codecs.sse import SSEDecoder

from ..dialects.anthropic import stream_error
from .base import ALLOW, ESCAPED, EventGovernor, ToolCall, Verdict, first_hint, may_call

__all__ = ["AnthropicEventGovernor", "Governor", "extract", "rewrite"]

log = logging.getLogger("sidegate.governance")

NEEDLE = b'"tool_use"'
_STOP_RE = re.compile(rb'("stop_reason"\s*:\s*)"tool_use"')
_STOP_SUB = rb'\1"end_turn"'


# -- the few fields governance reads (msgspec ignores the rest) ---------------------------

class _Block(msgspec.Struct):
    type: str = ""
    id: str | None = None
    name: str = ""
    input: msgspec.Raw = msgspec.Raw(b"")


class _Delta(msgspec.Struct):
    type: str = ""
    partial_json: str = ""
    stop_reason: str | None = None


class _Message(msgspec.Struct):
    type: str = ""
    content: list[_Block] = []
    stop_reason: str | None = None


class _Event(msgspec.Struct):
    type: str = ""
    index: int = -1
    content_block: _Block | None = None
    delta: _Delta | None = None
    message: _Message | None = None  # message_start's (its content is normally empty)


_event_dec = msgspec.json.Decoder(_Event)
_message_dec = msgspec.json.Decoder(_Message)
_json_dec = msgspec.json.Decoder()
_json_enc = msgspec.json.Encoder()


def decode_event(inner: bytes | None) -> _Event | None:
    if inner is None:
        return None
    try:
        return _event_dec.decode(inner)
    except (msgspec.DecodeError, ValueError):
        return None


def stop_to_end_turn(inner: bytes) -> bytes:
    """`"stop_reason":"tool_use"` -> `"stop_reason":"end_turn"`, every other byte kept."""
    return _STOP_RE.sub(_STOP_SUB, inner, count=1)


def text_block_events(index: int, text: str) -> tuple[bytes, bytes, bytes]:
    """Inner JSON of the three events of a text block carrying `text` at `index`."""
    idx = str(index).encode()
    return (
        b'{"type":"content_block_start","index":' + idx + b',"content_block":{"type":"text","text":""}}',
        b'{"type":"content_block_delta","index":' + idx + b',"delta":{"type":"text_delta","text":'
        + _json_enc.encode(text) + b'}}',
        b'{"type":"content_block_stop","index":' + idx + b'}',
    )


class AnthropicEventGovernor(EventGovernor):
    """Anthropic Messages event logic, independent of the outer framing.

    Subclasses implement `on_event` (the cheap test, then `_outside` / `_inside` with the
    inner event JSON), `_frame(name, inner, like)` (wrap inner JSON into one outgoing
    frame shaped like the frame `like`) and `_restop(ev, inner)` (the frame `ev` with its
    stop reason turned into `end_turn`).
    """

    __slots__ = ("_frames", "_held", "_kept", "_open", "_parts", "_pings")

    def __init__(self, decoder, enforce: bool, error_frame) -> None:
        super().__init__(decoder, enforce, error_frame)
        self._open: ToolCall | None = None  # the tool_use block being read
        self._frames: list = []  # its frames so far, in order ([0] is the start)
        self._pings: list = []  # pings held among them
        self._parts: list[str] = []  # its input_json_delta fragments
        self._held: list[tuple] = []  # (call, frames, pings) of completed calls awaiting a verdict
        self._kept = 0  # allowed tool calls (tool_use blocks left in the message)

    # -- framing hooks -------------------------------------------------------------------
    def _frame(self, name: bytes, inner: bytes, like) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _restop(self, ev, inner: bytes) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- event logic ---------------------------------------------------------------------
    def _outside(self, ev, inner: bytes) -> bytes:
        """An event outside any tool block whose JSON mentions "tool_use"."""
        e = decode_event(inner)
        if e is None:
            return ev.raw
        t = e.type
        if t == "content_block_start":
            cb = e.content_block
            if cb is not None and cb.type == "tool_use":
                # The start's `input` (normally {}) stands unless deltas rebuild it,
                # as the SDK's accumulator does.
                args = bytes(cb.input).decode("utf-8", "replace") or "{}"
                self._open = ToolCall(cb.name, args, cb.id, e.index)
                self._frames = [ev]
                self._pings = []
                self._parts = []
                return b"" if self.enforce else ev.raw
        elif t == "message_start" and e.message is not None and any(b.type == "tool_use" for b in e.message.content):
            # The SDKs' accumulators start the message from this one: a tool_use block in it
            # would be a call with no events of its own. No provider sends one; refused.
            if self.enforce:
                return self._stop("sidegate: the upstream put a tool_use block in message_start, "
                                  "which is not governed; the stream was stopped")
            log.warning("anthropic: a tool_use block in message_start passed ungoverned (observe mode)")
        elif t == "message_delta":
            d = e.delta
            if (self.enforce and d is not None and d.stop_reason == "tool_use" and self.calls
                    and not self._kept):
                return self._restop(ev, inner)
        return ev.raw

    def _inside(self, ev, inner: bytes | None) -> bytes:
        """An event while a tool_use block is open."""
        call = self._open
        e = decode_event(inner)
        if e is not None:
            t = e.type
            if e.index == call.index:
                if t == "content_block_delta":
                    d = e.delta
                    if d is not None and d.type == "input_json_delta" and d.partial_json:
                        self._parts.append(d.partial_json)
                    self._frames.append(ev)
                    return b"" if self.enforce else ev.raw
                if t == "content_block_stop":
                    self._frames.append(ev)
                    self._complete()
                    return b"" if self.enforce else ev.raw
            elif t == "ping":
                # Held in place so an allowed call's stretch of the stream stays byte-exact.
                self._frames.append(ev)
                self._pings.append(ev)
                return b"" if self.enforce else ev.raw
        # Anything else ends the block (a stream cut by max_tokens has no stop): decide
        # the call on what arrived, then handle this event behind it.
        self._complete()
        if self.enforce:
            self.requeue(ev)
            return b""
        return self.on_event(ev)

    def _complete(self) -> None:
        call = self._open
        self._open = None
        if self._parts:
            call.arguments = "".join(self._parts)
        self._held.append((call, self._frames, self._pings))
        self._frames = []
        self._pings = []
        self.calls.append(call)
        self.pending.append(call)
        if not self.enforce:
            self._held.clear()

    def on_verdicts(self, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
        out = []
        for call, verdict in zip(calls, verdicts):
            for i, (held_call, frames, pings) in enumerate(self._held):
                if held_call is call:
                    del self._held[i]
                    break
            else:  # pragma: no cover - resolve() only hands back our own pending calls
                continue
            if verdict.outcome == ALLOW:
                self._kept += 1
                out.extend(ev.raw for ev in frames)
            else:
                like = frames[0]
                start, delta, stop = text_block_events(call.index, verdict.text(call.name))
                out.append(self._frame(b"content_block_start", start, like))
                out.append(self._frame(b"content_block_delta", delta, like))
                out.append(self._frame(b"content_block_stop", stop, like))
                out.extend(ev.raw for ev in pings)
        return b"".join(out)

    def on_close(self) -> bytes:
        if self._open is not None:  # the stream ended inside a tool block
            self._complete()
        return b""

    def error(self, message: str) -> bytes:
        self._open = None
        self._frames = []
        self._pings = []
        self._held.clear()
        return EventGovernor.error(self, message)


def sse_data(ev) -> bytes | None:
    """The data of an SSE event (None when it has none). Fast path for the usual
    `event: <type>\ndata: <json>\n\n` shape; anything else goes to the SSE parser."""
    raw = ev.raw
    i = raw.find(b"data:")
    if i >= 0 and (i == 0 or raw[i - 1] == 10) and raw.endswith(b"\n\n") and b"\r" not in raw \
            and raw.find(b"\n", i) == len(raw) - 2:
        i += 5
        if raw[i:i + 1] == b" ":
            i += 1
        return raw[i:-2]
    return ev.data if ev.dispatches else None


class Governor(AnthropicEventGovernor):
    """Anthropic Messages SSE (`event: <type>\\ndata: <json>\\n\\n`)."""

    __slots__ = ()

    def __init__(self, path: str = "", content_type: str = "text/event-stream", enforce: bool = True) -> None:
        super().__init__(SSEDecoder(), enforce, stream_error)

    def feed(self, chunk: bytes) -> bytes:
        # Fast path: outside a tool block, the whole events before the first "tool_use" are
        # what `on_event` would pass event by event; the decoder only counts their bytes
        # (the stream's first event among them). Only the rest is decoded.
        if self._open is None and not self._queue and not self.pending and not self._closed and not self._dead:
            out = self._pass_sse_events(chunk, first_hint(chunk, NEEDLE), EventGovernor.feed)
            if out is not None:
                return out
        return EventGovernor.feed(self, chunk)

    def on_event(self, ev) -> bytes:
        if self._open is None:
            raw = ev.raw
            if NEEDLE not in raw and (b"\\" not in raw or ESCAPED not in raw):
                return raw
            return self._outside(ev, sse_data(ev))
        return self._inside(ev, sse_data(ev))

    def _frame(self, name: bytes, inner: bytes, like) -> bytes:
        eol = b"\r\n" if like.raw.endswith(b"\r\n") else b"\n"
        return b"event: " + name + eol + b"data: " + inner + eol + eol

    def _restop(self, ev, inner: bytes) -> bytes:
        return stop_to_end_turn(ev.raw)


# -- non-streaming: the `message` JSON body ----------------------------------------------

def extract(path: str, body: bytes) -> list[ToolCall]:
    if not may_call(body, NEEDLE):
        return []
    try:
        msg = _message_dec.decode(body)
    except (msgspec.DecodeError, ValueError):
        return []
    calls = []
    for i, block in enumerate(msg.content):
        if block.type == "tool_use":
            args = bytes(block.input).decode("utf-8", "replace") or "{}"
            calls.append(ToolCall(block.name, args, block.id, i))
    return calls


def rewrite(path: str, body: bytes, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
    """Denied / escalated tool_use blocks become text blocks; stop_reason `tool_use` ->
    `end_turn` when no tool_use block is left."""
    if all(v.outcome == ALLOW for v in verdicts):
        return body
    doc = _json_dec.decode(body)
    content = doc.get("content") or []
    for call, verdict in zip(calls, verdicts):
        if verdict.outcome == ALLOW:
            continue
        i = call.index
        if 0 <= i < len(content) and isinstance(content[i], dict) and content[i].get("type") == "tool_use" \
                and content[i].get("id") == call.call_id:
            content[i] = {"type": "text", "text": verdict.text(call.name)}
    if doc.get("stop_reason") == "tool_use" and not any(
            isinstance(b, dict) and b.get("type") == "tool_use" for b in content):
        doc["stop_reason"] = "end_turn"
    return _json_enc.encode(doc)

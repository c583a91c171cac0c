"""Tool-call governance for Bedrock Converse (`.../converse`) and ConverseStream
(`.../converse-stream`, AWS event-stream frames).

Stream shape: messageStart, then per content block (addressed by `contentBlockIndex`)
an optional contentBlockStart (`start.toolUse` {toolUseId, name} for a tool call; text
and reasoning blocks have none), contentBlockDelta frames (`delta.toolUse.input` string
fragments, `delta.text`, `delta.reasoningContent`), contentBlockStop; then messageStop
(`stopReason`) and metadata.

A tool call's frames (start, deltas, stop) are held from its contentBlockStart to its
contentBlockStop. Frames are only decoded when they can belong to a tool call (their
bytes contain `"toolUse"`, or a call is open); text frames pass through untouched.
A denied / escalated call becomes a text block at the same contentBlockIndex: one
contentBlockDelta `{"delta": {"text": marker}}` (Converse text blocks have no
contentBlockStart), then the call's own contentBlockStop frame byte for byte. New frames
are built with the original frames' headers and correct CRCs. When no tool call is
left in the message, messageStop's `stopReason` `tool_use` becomes `end_turn`.
"""

from __future__ import annotations

from struct import Struct
from types import MappingProxyType

import msgspec
from sidegate_codecs.errors import CodecError
from sidegate_codecs.eventstream import EventStreamDecoder, HeaderValue, encode_message

from .base import ALLOW, ESCAPED, EventGovernor, ToolCall, Verdict, first_hint, may_call

__all__ = ["Governor", "extract", "rewrite"]

EVENTSTREAM = "application/vnd.amazon.eventstream"

_CALL = b'"toolUse"'  # (a call's key; escaped spellings: `may_call`)


# -- msgspec views with just the fields governance needs -------------------------------


class _ToolStart(msgspec.Struct):
    name: str = ""
    toolUseId: str | None = None


class _Start(msgspec.Struct):
    toolUse: _ToolStart | None = None


class _ToolDelta(msgspec.Struct):
    input: str = ""


class _Delta(msgspec.Struct):
    toolUse: _ToolDelta | None = None


class _Frame(msgspec.Struct):
    contentBlockIndex: int = 0
    start: _Start | None = None
    delta: _Delta | None = None


_decode_frame = msgspec.json.Decoder(_Frame).decode


class _ToolUse(msgspec.Struct):
    name: str = ""
    toolUseId: str | None = None
    input: msgspec.Raw = msgspec.Raw()


class _Block(msgspec.Struct):
    toolUse: _ToolUse | None = None


class _Message(msgspec.Struct):
    content: list[_Block] = []


class _Output(msgspec.Struct):
    message: _Message | None = None


class _Response(msgspec.Struct):
    output: _Output | None = None


_decode_response = msgspec.json.Decoder(_Response).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.encode

_START, _DELTA, _STOP, _OTHER = range(4)
_unpack_u32 = Struct("!I").unpack_from
_MAX_FRAME = 16 + 128 * 1024 + 24 * 1024 * 1024  # botocore's header and payload limits


def _error_frame(message: str) -> bytes:
    from ..dialects.bedrock import exception_frame

    return exception_frame(message)


class _Open:
    """A tool call whose block is still streaming."""

    __slots__ = ("call", "frags", "start")

    def __init__(self, call: ToolCall, start) -> None:
        self.call = call
        self.frags: list[str] = []
        self.start = start  # the contentBlockStart frame (its headers are reused)


class _RawDecoder:
    """Not an event stream (an error body, say): one event per chunk, nothing held."""

    __slots__ = ()
    buffered = 0

    def feed(self, chunk: bytes) -> list:
        return [_RawEvent(chunk)] if chunk else []

    def close(self) -> list:
        return []


class _RawEvent:
    __slots__ = ("raw",)
    headers = MappingProxyType({})

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


class Governor(EventGovernor):
    """ConverseStream governor (see the module docstring)."""

    __slots__ = (
        "_allowed",
        "_broken",
        "_denied",
        "_done",
        "_framed",
        "_group",
        "_need",
        "_open",
        "_slowpath",
        "_tail",
    )

    def __init__(self, path: str, content_type: str, enforce: bool) -> None:
        ct = (content_type or "").lower()
        decoder = EventStreamDecoder() if (not ct or ct.startswith(EVENTSTREAM)) else _RawDecoder()
        super().__init__(decoder, enforce, _error_frame)
        self._open: dict[int, _Open] = {}
        self._group: list | None = None  # held frames: (event, _Open | None, role)
        self._done: list[ToolCall] = []  # calls completed in the open group
        self._allowed = 0
        self._denied = 0
        self._broken = False
        self._slowpath = False  # a call is open / held, or one was denied: no fast path
        self._framed = isinstance(decoder, EventStreamDecoder)
        self._tail = bytearray()  # bytes of a partial frame
        self._need = 0  # length of the partial frame (or of its prelude) once known

    # -- hot path -------------------------------------------------------------------
    def on_event(self, ev) -> bytes:
        raw = ev.raw
        if not self._slowpath and _CALL not in raw and (b"\\" not in raw or ESCAPED not in raw):
            return raw
        out = self._slow(ev)
        self._slowpath = bool(self._group is not None or self._open or self._denied)
        return out

    def _slow(self, ev) -> bytes:
        raw = ev.raw
        et = ev.headers.get(":event-type")
        role = _OTHER
        rec = None
        if et == "contentBlockStart":
            if may_call(raw, _CALL):
                f = self._frame(ev)
                tu = f.start.toolUse if f is not None and f.start is not None else None
                if tu is not None:
                    idx = f.contentBlockIndex
                    old = self._open.pop(idx, None)
                    if old is not None:  # a second start on the same index: close the first
                        self._complete(old)
                    rec = self._open[idx] = _Open(ToolCall(tu.name, "", tu.toolUseId, idx), ev)
                    role = _START
        elif et == "contentBlockDelta":
            if self._open and may_call(raw, _CALL):
                f = self._frame(ev)
                if f is not None and f.delta is not None and f.delta.toolUse is not None:
                    rec = self._open.get(f.contentBlockIndex)
                    if rec is not None:
                        rec.frags.append(f.delta.toolUse.input)
                        role = _DELTA
        elif et == "contentBlockStop":
            if self._open:
                f = self._frame(ev)
                if f is not None:
                    rec = self._open.pop(f.contentBlockIndex, None)
                    if rec is not None:
                        self._complete(rec)
                        role = _STOP
        elif et == "messageStop":
            # The message ends: a call still open (no contentBlockStop) is complete as is.
            for r in list(self._open.values()):
                self._complete(r)
            self._open.clear()
        if not self.enforce:
            self._flush_done()
            return raw
        if self._group is None:
            if role != _START:
                return self._fix_stop(ev) if et == "messageStop" else raw
            self._group = []
        self._group.append((ev, rec, role))
        if not self._open:
            self._flush_done()
        return b""

    def _frame(self, ev):
        try:
            return _decode_frame(ev.payload)
        except (msgspec.DecodeError, AttributeError):
            return None

    def _complete(self, rec: _Open) -> None:
        rec.call.arguments = "".join(rec.frags)
        self._done.append(rec.call)

    def _flush_done(self) -> None:
        if self._done:
            self.calls.extend(self._done)
            self.pending.extend(self._done)
            self._done = []

    # -- verdicts -------------------------------------------------------------------
    def on_verdicts(self, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
        for v in verdicts:
            if v.outcome == ALLOW:
                self._allowed += 1
            else:
                self._denied += 1
        group, self._group = self._group, None
        self._slowpath = bool(self._open or self._denied)
        if not group:
            return b""
        out = []
        for ev, rec, role in group:
            if rec is None or role == _OTHER:
                if self._denied and ev.headers.get(":event-type") == "messageStop":
                    out.append(self._fix_stop(ev))
                else:
                    out.append(ev.raw)
                continue
            verdict = rec.call.verdict
            if verdict is None or verdict.outcome == ALLOW:
                out.append(ev.raw)
            elif role == _START:
                out.append(_text_delta(ev, rec.call.index, verdict.text(rec.call.name)))
            elif role == _STOP:
                out.append(ev.raw)
            # _DELTA of a denied call: dropped
        return b"".join(out)

    def _fix_stop(self, ev) -> bytes:
        """messageStop: `tool_use` -> `end_turn` when every call was denied / escalated."""
        raw = ev.raw
        if not self._denied or self._allowed or not may_call(raw, b'"tool_use"'):
            return raw
        try:
            body = _decode_any(ev.payload)
        except msgspec.DecodeError:
            return raw
        if not isinstance(body, dict) or body.get("stopReason") != "tool_use":
            return raw
        body["stopReason"] = "end_turn"
        return encode_message(_headers(ev), _encode(body))

    # -- framing and end of stream --------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        """Whole frames are cut here by their length prefix (as the plain framer does);
        only when some frame in them can be part of a tool call (or a call is open or
        held) do they go through the decoder (CRCs checked) and `on_event`. Otherwise
        they go out as they came."""
        if self._broken:
            return b""
        if not self._framed:
            return self._decode(chunk)
        tail = self._tail
        if tail:
            tail += chunk
            if len(tail) < self._need:
                return b""
            buf = bytes(tail)
            tail.clear()
        else:
            buf = chunk if type(chunk) is bytes else bytes(chunk)
        n = len(buf)
        off = 0
        need = 4
        while off + 4 <= n:
            total = _unpack_u32(buf, off)[0]
            if total < 16 or total > _MAX_FRAME:
                return self._decode(buf)  # not a frame: the decoder names the error
            if off + total > n:
                need = total
                break
            off += total
        if off < n:
            tail += buf[off:]
            self._need = need
            if not off:
                return b""
            buf = buf[:off]
        if not self._slowpath and not self._queue and not self.pending:
            p = first_hint(buf, _CALL)
            if p < 0:
                return buf
            # The whole frames before the one that may start a call go out as they came, as
            # this fast path passes them in a chunk of their own; the decoder checks their
            # CRCs without building them (a bad one: all of it is decoded, and it names the
            # error). Only the rest is decoded.
            head = 0
            while True:
                total = _unpack_u32(buf, head)[0]
                if head + total > p:
                    break
                head += total
            if head and self.decoder.skip(buf[:head]):
                return buf[:head] + self._decode(buf[head:])
        return self._decode(buf)

    def _decode(self, whole: bytes) -> bytes:
        try:
            return super().feed(whole)
        except CodecError as e:
            return self._break(f"sidegate: malformed upstream event stream: {e}")

    def close(self) -> bytes:
        if self._broken:
            return b""
        out = b""
        if self._tail:  # a partial frame at the end: the decoder reports it
            rest = bytes(self._tail)
            self._tail.clear()
            out = self._decode(rest)
            if self._broken:
                return out
        try:
            return out + super().close()
        except CodecError as e:
            return out + self._break(f"sidegate: malformed upstream event stream: {e}")

    def on_close(self) -> bytes:
        # Truncated stream: calls still open are complete with what arrived.
        for r in list(self._open.values()):
            self._complete(r)
        self._open.clear()
        self._flush_done()
        if self._group and not self.pending:  # held frames that no call claims any more
            group, self._group = self._group, None
            return b"".join(ev.raw for ev, _, _ in group)
        return b""

    def error(self, message: str) -> bytes:
        self._tail.clear()
        self._group = None
        self._open.clear()
        self._done = []
        self.pending = []
        return super().error(message)

    def _break(self, message: str) -> bytes:
        """The upstream sent bytes that are not a valid event stream: end with an error
        (a tool call cannot be governed in frames that cannot be read)."""
        self._broken = True
        self._slowpath = True  # no fast path either: nothing more goes out
        return self.error(message)


def _headers(ev):
    """The headers of `ev` to encode a new frame with, in wire order and wire types: the
    decoded dict when every value is a string (type 7, as encode_message writes a str; the
    encoder caches such dicts), else the typed list."""
    headers = ev.headers
    for v in headers.values():
        if type(v) is not str:
            return ev.typed_headers
    return headers


def _text_delta(start_ev, index: int, text: str) -> bytes:
    """A contentBlockDelta frame carrying `text`, with the headers of `start_ev`."""
    headers = _headers(start_ev)
    if type(headers) is dict:
        if ":event-type" in headers:
            headers = {**headers, ":event-type": "contentBlockDelta"}
    else:
        headers = [(name, HeaderValue(7, "contentBlockDelta") if name == ":event-type" else value)
                   for name, value in headers]
    return encode_message(headers, _encode({"contentBlockIndex": index, "delta": {"text": text}}))


# -- non-streaming Converse -----------------------------------------------------------

def extract(path: str, body: bytes) -> list[ToolCall]:
    if not may_call(body, _CALL):
        return []
    try:
        resp = _decode_response(body)
    except msgspec.DecodeError:
        return []
    if resp.output is None or resp.output.message is None:
        return []
    calls = []
    for i, block in enumerate(resp.output.message.content):
        tu = block.toolUse
        if tu is not None:
            args = bytes(tu.input)
            calls.append(ToolCall(tu.name, args.decode("utf-8") if args else "{}", tu.toolUseId, i))
    return calls


def rewrite(path: str, body: bytes, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
    """Denied / escalated toolUse blocks become `{"text": marker}` (a server tool's paired
    toolResult block goes with it); `stopReason` `tool_use` -> `end_turn` when no toolUse
    block is left."""
    try:
        doc = _decode_any(body)
        content = doc["output"]["message"]["content"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return body
    if not isinstance(content, list):
        return body
    vit = iter(verdicts)
    denied_ids = set()
    remaining = 0
    new = []
    for block in content:
        tu = block.get("toolUse") if isinstance(block, dict) else None
        if not isinstance(tu, dict):
            new.append(block)
            continue
        v = next(vit, None)
        if v is None or v.outcome == ALLOW:
            remaining += 1
            new.append(block)
            continue
        denied_ids.add(tu.get("toolUseId"))
        new.append({"text": v.text(tu.get("name", ""))})
    if denied_ids:
        new = [b for b in new if not (isinstance(b, dict) and isinstance(b.get("toolResult"), dict)
                                      and b["toolResult"].get("toolUseId") in denied_ids)]
    doc["output"]["message"]["content"] = new
    if not remaining and doc.get("stopReason") == "tool_use":
        doc["stopReason"] = "end_turn"
    return _encode(doc)

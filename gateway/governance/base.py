"""Types shared by the dialect governors and the decision step."""

from __future__ import annotations

import msgspec
from sidegate_codecs.errors import CodecError

from ..bytesearch import find, has
from ..dialects._shared import last_event_end

ALLOW, DENY, ESCALATE = "allow", "deny", "escalate"


class ToolCall:
    """One tool call the model emitted, as the dialect saw it."""

    __slots__ = ("name", "arguments", "call_id", "index", "verdict")

    def __init__(self, name: str, arguments: str, call_id: str | None = None, index: int = 0) -> None:
        self.name = name
        self.arguments = arguments  # the raw JSON text the model produced (fragments joined)
        self.call_id = call_id
        self.index = index  # dialect position: tool_call index, content block, part number
        self.verdict: Verdict | None = None

    def canonical_arguments(self) -> str:
        """Sorted-key compact JSON, so rules and permits see one spelling of the arguments."""
        return canonical_json(self.arguments)

    def __repr__(self) -> str:
        return f"ToolCall({self.name!r}, {self.arguments!r}, id={self.call_id!r}, index={self.index})"


class Verdict:
    __slots__ = ("outcome", "reason", "rule", "escalation_id")

    def __init__(self, outcome: str, reason: str = "", rule: str | None = None,
                 escalation_id: str | None = None) -> None:
        self.outcome = outcome
        self.reason = reason
        self.rule = rule
        self.escalation_id = escalation_id

    @property
    def allowed(self) -> bool:
        return self.outcome == ALLOW

    def text(self, tool: str) -> str:
        """The marker text the agent reads in place of a denied or escalated call."""
        if self.outcome == DENY:
            return f"[SIDEGATE DENIED] tool={tool} reason={self.reason}"
        if self.outcome == ESCALATE:
            return f"[SIDEGATE ESCALATED] escalation={self.escalation_id} tool={tool} reason={self.reason}"
        return ""

    def __repr__(self) -> str:
        return f"Verdict({self.outcome!r}, {self.reason!r})"


_decoder = msgspec.json.Decoder()

# A JSON escape of an ASCII character. A parser (the agent's SDK) reads "tool\u005fuse" as
# "tool_use"; a byte search for the name does not. Where one may be, the governors decode
# instead of trusting their byte tests: fail closed against a spelling no provider uses.
ESCAPED = b"\\u00"


def may_call(buf: bytes, needle: bytes) -> bool:
    """Whether `buf` may name a call: it holds `needle`, or an escaped ASCII character."""
    if has(buf, needle):
        return True
    i = buf.find(b"\\")  # (memchr: the search for ESCAPED starts there)
    return i >= 0 and find(buf, ESCAPED, i) >= 0


def first_hint(buf: bytes, needle: bytes) -> int:
    """The offset of the first `needle` or escaped ASCII character in `buf`, or -1."""
    p = find(buf, needle)
    end = len(buf) if p < 0 else p
    i = buf.find(b"\\", 0, end)  # (a call's arguments are escaped JSON: mostly after the needle)
    if i >= 0:
        q = find(buf, ESCAPED, i, end)
        if q >= 0:
            return q
    return p


_encoder = msgspec.json.Encoder(order="sorted")


def canonical_json(text: str | bytes) -> str:
    if not text:
        return "{}"
    try:
        return _encoder.encode(_decoder.decode(text)).decode()
    except msgspec.DecodeError:
        return text if isinstance(text, str) else text.decode("utf-8", "replace")


class EventGovernor:
    """Shared machinery of the streaming governors: decode -> per-event handler -> output.

    A dialect subclass implements `on_event(ev) -> bytes` (what to emit for this event
    now: `ev.raw` to pass it through, b"" to hold it as part of a tool call, or rewritten
    bytes) and `on_verdicts(calls, verdicts) -> bytes` (the held frames of those calls,
    original or replaced). When `on_event` completes a call it appends it to
    `self.pending`; in enforce mode the events behind it then wait in the queue until
    `resolve()`. Observe mode never holds: handlers must return `ev.raw` there.
    """

    __slots__ = ("decoder", "enforce", "pending", "calls", "_queue", "_error_frame", "_closed", "_finished",
                 "_dead")

    def __init__(self, decoder, enforce: bool, error_frame) -> None:
        self.decoder = decoder
        self.enforce = enforce
        self.pending: list[ToolCall] = []
        self.calls: list[ToolCall] = []
        self._queue: list = []
        self._error_frame = error_frame
        self._closed = self._finished = self._dead = False

    # -- to implement ---------------------------------------------------------------
    def on_event(self, ev) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_verdicts(self, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:  # pragma: no cover
        raise NotImplementedError

    def on_close(self) -> bytes:
        return b""

    def requeue(self, ev) -> None:
        """Handle `ev` again after the calls now pending are resolved (an event that ends
        an unterminated tool block belongs behind that block's verdict)."""
        self._queue.insert(0, ev)

    def _pass_sse_events(self, chunk: bytes, p: int, rest) -> bytes | None:
        """SSE governors' fast path: the whole events of `chunk` before offset `p` (all of
        it when p < 0) go out as they came, as `on_event` would pass each of them while no
        call is open; the decoder only counts their bytes (the stream's first event among
        them). `rest(self, tail)` governs the bytes after them. None: there are no such
        events, or the decoder cannot skip them; nothing was consumed."""
        n = len(chunk)
        head = n if p < 0 else last_event_end(chunk, p)
        if not head or not self.decoder.skip(chunk if head == n else chunk[:head], True):
            return None
        return chunk if head == n else chunk[:head] + rest(self, chunk[head:])

    # -- driven by the relay ----------------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        if self._dead:
            return b""
        had_partial = self.decoder.buffered
        try:
            events = self.decoder.feed(chunk)
        except CodecError as e:
            return self._fail(e)
        if self._queue or self.pending:
            self._queue.extend(events)
            return self._drain() if not self.pending else b""
        out = []
        untouched = True
        for i, ev in enumerate(events):
            piece = self.on_event(ev)
            if piece is not ev.raw:
                untouched = False
            if piece:
                out.append(piece)
            if self._dead:  # the handler stopped the stream: nothing goes out after its error
                return b"".join(out)
            if self.pending and self.enforce:
                self._queue.extend(events[i + 1:])
                break
        if untouched and not had_partial and not self.decoder.buffered and not self._queue:
            return chunk  # every event passed as it came: the chunk itself goes out
        return b"".join(out)

    def resolve(self, verdicts: list[Verdict]) -> bytes:
        calls, self.pending = self.pending, []
        for call, verdict in zip(calls, verdicts):
            call.verdict = verdict
        if not self.enforce:
            return b""
        head = self.on_verdicts(calls, verdicts)
        return head + self._drain()

    def _drain(self) -> bytes:
        out = []
        while self._queue and not self.pending and not self._dead:
            ev = self._queue.pop(0)
            piece = self.on_event(ev)
            if piece:
                out.append(piece)
        return b"".join(out)

    def close(self) -> bytes:
        """End of stream. If calls are still pending afterwards, the relay resolves them
        and calls close() again; `on_close` runs once, after the last event."""
        if self._dead:
            return b""
        if not self._closed:
            self._closed = True
            try:
                self._queue.extend(self.decoder.close())
            except CodecError as e:
                return self._fail(e)
        out = self._drain()
        if self.pending or self._finished:
            return out
        self._finished = True
        return out + self.on_close()

    def _fail(self, err: CodecError) -> bytes:
        return self._stop(f"sidegate: undecodable upstream stream: {err}")

    def _stop(self, message: str) -> bytes:
        """Fail closed: held tool frames are dropped, nothing undecided reaches the client,
        and nothing goes out after this in-band error."""
        self._dead = True
        self.pending.clear()
        return self.error(message)

    def error(self, message: str) -> bytes:
        self._queue.clear()
        return self._error_frame(message)

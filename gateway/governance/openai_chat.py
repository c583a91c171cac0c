"""Tool-call governance for OpenAI chat completions (also NVIDIA NIM and OpenAI-compatible upstreams).

Stream shape: `data: {chunk}` events; `choices[].delta.tool_calls[]` carries fragments
keyed by `index` (id and name usually in the first fragment, arguments spread over many;
some servers repeat the name in every fragment, some send a whole call in one chunk or
start at index 1), `finish_reason` ends a choice, a usage chunk has `choices: []`, and
`data: [DONE]` ends the stream. Every choice of an n>1 request is its own message and is
governed on its own.

A call is complete when a later chunk of its choice starts a different tool index (and its
arguments so far are a whole JSON value, so an upstream that interleaves fragments of
parallel calls is never decided on half its arguments), when the choice's finish_reason
arrives, or at [DONE] / end of stream.

Holding (enforce mode): the frames of a tool call, and the chunk that completes it, wait
for the verdict. Other frames keep flowing, with one exception: a choice's opening frame
(the one with `role`) never lets a later choice's opening frame, or its own later frames,
overtake it, because the SDK's stream helper numbers choices in the order they appear.

Rewrite: a denied call's fragments are removed (a frame left with nothing in it is
dropped) and a chunk `{"choices":[{"index":i,"delta":{"content":"<marker>"}}]}`, carrying
the stream's id/object/created/model, goes out where the call began. Once a choice has a
denied call, its later allowed calls are renumbered densely; a stream with no denial
keeps its bytes (and its indices, even a first call at index 1). `finish_reason`
`tool_calls` becomes `stop` in a choice with no call left.
"""

from __future__ import annotations

import re

import msgspec
from sidegate_codecs import SSEDecoder, encode_event
from sidegate_codecs.errors import CodecError

from ..bytesearch import find
from ..dialects import openai as _dialect
from .base import ESCAPED, EventGovernor, ToolCall, Verdict, first_hint, may_call

__all__ = ["Governor", "extract", "rewrite"]

_TOOL_CALLS = b'"tool_calls"'
_FUNCTION_CALL = b'"function_call"'  # the legacy `functions` API's one call per message
_NO_TEXT = b'"content":""'
_NULL_TEXT = b'"content":null'
_CONTENT = b'"content"'  # (a JSON string value cannot hold it: its quotes would be escaped)
_FRAGMENT = b'"tool_calls":['  # in every fragment frame (as compact JSON spells it): worth decoding
# the usual spelling of a one-choice chunk with text: {"choices":[{"index":N,"delta":{"content":"x...
_CHOICE_TEXT = re.compile(rb'"choices":\[\{"index":(\d+),"delta":\{(?:"role":"assistant",)?"content":"[^"]')


# -- decoding: only the fields governance reads; everything else is skipped ------------
# (gc=False: decoded JSON cannot form a reference cycle, and held frames keep these alive,
# so the collector need not scan them)

class _Fn(msgspec.Struct, gc=False):
    name: object = None
    arguments: object = None


class _Custom(msgspec.Struct, gc=False):
    name: object = None
    input: object = None


class _TC(msgspec.Struct, gc=False):
    index: object = None
    id: object = None
    function: _Fn | None = None
    custom: _Custom | None = None  # a custom tool's call (`"type": "custom"`): free-form input


class _Delta(msgspec.Struct, gc=False):
    role: object = None
    content: object = None
    tool_calls: list[_TC] | None = None
    function_call: object = None  # the legacy `functions` API's call


class _Choice(msgspec.Struct, gc=False):
    index: object = 0
    delta: _Delta | None = None
    finish_reason: object = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


class _ShapeChoice(msgspec.Struct, gc=False):
    delta: dict | None = None
    finish_reason: object = None


class _Shape(msgspec.Struct, gc=False):
    """Enough of a chunk to see that it carries nothing but one tool-call fragment."""

    choices: list[_ShapeChoice] | None = None
    usage: object = None


_shape_decoder = msgspec.json.Decoder(_Shape)


# The common held frame, decoded once: one choice whose delta is exactly one tool_calls
# list (no other key), no finish_reason, no usage. Anything else fails to decode (or is
# refused below) and goes the general way, so a frame this accepts is both a continuation
# candidate and, in `_only_the_fragment`'s terms, "only the fragment".

class _FragDelta(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    tool_calls: list[_TC]


class _FragChoice(msgspec.Struct, gc=False):
    delta: _FragDelta
    index: object = 0
    finish_reason: object = None


class _Frag(msgspec.Struct, gc=False):
    choices: list[_FragChoice]
    usage: object = None


_frag_decoder = msgspec.json.Decoder(_Frag)
_FRAG_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)
_DEFER_MAX = 256 * 1024  # bulk text kept (by reference) for noting its text choices later
_encode = msgspec.json.encode
_decode = msgspec.json.decode


def _is_json(text: str) -> bool:
    try:
        _decode(text)
    except msgspec.DecodeError:
        return False
    return True


class Frame:
    """A whole event the fast paths cut out of a chunk themselves, with the fields the
    governors read (`raw`, `data`, `event`) as `SSEEvent` parses them."""

    __slots__ = ("data", "name_end", "raw")

    def __init__(self, raw: bytes, data: bytes, name_end: int = 0) -> None:
        self.raw = raw
        self.data = data
        self.name_end = name_end  # raw[7:name_end] is the `event: ` line's value (0: no such line)

    @property
    def event(self) -> str | None:
        end = self.name_end
        return self.raw[7:end].decode("utf-8", "replace") if end else None


def one_event(chunk: bytes) -> Frame | None:
    """`chunk` as a Frame when it is one LF-framed event of the usual spelling,
    `data: D\n\n` or `event: E\ndata: D\n\n` (no CR, no other line), else None.
    Its bytes still have to be counted by the decoder (`SSEDecoder.skip`)."""
    if type(chunk) is not bytes or not chunk.endswith(b"\n\n") or b"\r" in chunk:
        return None
    n = len(chunk)
    i = chunk.find(b"\n")
    if chunk.startswith(b"data: "):
        return Frame(chunk, chunk[6:-2]) if i == n - 2 else None
    if chunk.startswith(b"event: ") and chunk.startswith(b"data: ", i + 1) and chunk.find(b"\n", i + 1) == n - 2:
        return Frame(chunk, chunk[i + 7:-2], i)
    return None


def as_text(value) -> str:
    """A name or arguments field as text (some servers send arguments as a JSON object)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return _encode(value).decode()


# -- per-stream state ------------------------------------------------------------------

class _Call:
    __slots__ = ("choice", "denied", "first", "id", "index", "name", "new_index", "parts", "tc", "verdict")

    def __init__(self, choice: _ChoiceState, index) -> None:
        self.choice = choice
        self.index = index          # the upstream's tool index
        self.id = None
        self.name = ""
        self.parts: list[str] = []
        self.tc: ToolCall | None = None   # set when complete
        self.verdict: Verdict | None = None
        self.first = None           # the held entry of its first frame
        self.new_index = index      # index on the way out (set when its first frame goes out)
        self.denied = False         # decided, and not allowed

    def feed(self, tc: _TC) -> None:
        fn = tc.function
        if tc.id and not self.id:
            self.id = tc.id
        if fn is not None:
            args = fn.arguments
        elif tc.custom is not None:
            fn = tc.custom
            args = fn.input
        else:
            return
        name = fn.name
        if name and isinstance(name, str) and name != self.name:
            # usually once; some servers repeat the whole name in every fragment
            self.name = name if not self.name else self.name + name
        if args is not None:
            self.parts.append(as_text(args))

    def arguments_whole(self) -> bool:
        args = "".join(self.parts)
        return not args.strip() or _is_json(args)


class _ChoiceState:
    __slots__ = ("by_index", "calls", "first_held", "index", "marked", "next_index", "open", "renumber")

    def __init__(self, index) -> None:
        self.index = index
        self.open: list[_Call] = []
        self.calls: list[_Call] = []
        self.by_index: dict = {}
        self.first_held = False   # this choice's opening frame is held
        self.renumber = False     # a call of this choice was denied: indices go dense
        self.next_index = 0
        self.marked = False       # a marker was already written into this choice


class _Entry:
    """A held frame: the event, its decoded chunk, and which call each tool_calls entry is.

    A fragment-only frame taken by the fast path (`only` True) also carries, in `more`, the
    raw bytes of the fragment-only frames of the same call that came right after it: each
    of them would be an entry of its own with the same slots and owners, rendered the same
    way (see `_release`)."""

    __slots__ = ("chunk", "ev", "firsts", "more", "only", "owners", "slots")

    def __init__(self, ev, chunk, slots, owners, only=None) -> None:
        self.ev = ev
        self.chunk = chunk
        self.slots = slots        # [(choice position, tool_calls position, _Call)]
        self.owners = owners      # calls that must be decided before the frame goes out
        self.firsts: list[_ChoiceState] = _NO_FIRSTS
        self.only = only          # the frame is one tool-call fragment and nothing else (None: not known yet)
        self.more: list[bytes] | None = None


class _Legacy:
    """A call of the legacy `functions` API being streamed, and every frame since it began."""

    __slots__ = ("choice", "held", "name", "parts", "tc")

    def __init__(self) -> None:
        self.choice = None
        self.name = ""
        self.parts: list[str] = []
        self.held: list = []
        self.tc: ToolCall | None = None


# Observe mode gave up following a legacy call (a shape the legacy path does not govern):
# the stream's frames go the usual way from then on.
_UNFOLLOWED = _Legacy()

_NO_FIRSTS: list = []  # shared, never appended to: `_hold_or_pass` gives an entry its own list


class Governor(EventGovernor):
    __slots__ = ("_choices", "_deferred", "_deferred_size", "_denials", "_first_held", "_held", "_idle", "_legacy",
                 "_marker_head", "_meta", "_n_open", "_pend", "_texted")

    def __init__(self, path: str = "/chat/completions", content_type: str = "text/event-stream",
                 enforce: bool = True) -> None:
        super().__init__(SSEDecoder(), enforce, _dialect._chat_error)
        self._choices: dict = {}
        self._held: list[_Entry] = []
        self._pend: list[_Call] = []
        self._first_held = 0
        self._n_open = 0  # calls started and not complete
        self._denials = False  # some call was denied or escalated
        self._texted: set = set()  # choices with text: int index, or its digits from the fast path
        # Text events passed in bulk whose text choices are not noted yet (only a marker
        # needs them: noted when one is written, or when they add up to _DEFER_MAX bytes).
        self._deferred: list[bytes] | None = None
        self._deferred_size = 0
        self._idle = True  # no call open and nothing held: frames without "tool_calls" pass untouched
        self._meta: dict | None = None
        self._marker_head: bytes | None = None
        self._legacy: _Legacy | None = None  # a legacy function_call being held (enforce mode)

    # -- events ---------------------------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        # Fast paths for a chunk that is one whole single-line LF-framed event
        # (`data: ...\n\n`), the way the network usually delivers them; each does what
        # `EventGovernor.feed` -> `on_event` would do with it, and the decoder only counts
        # its bytes. Idle and without "tool_calls": it passes, and its text choice is noted
        # only if a marker comes to need it (`_defer`).
        n = len(chunk)
        if chunk.find(b"\n") == n - 2 and chunk.endswith(b"\n\n") and b"\r" not in chunk \
                and not self._queue and not self.pending and not self._closed and not self._dead:
            if self._idle and _TOOL_CALLS not in chunk and _FUNCTION_CALL not in chunk \
                    and (b"\\" not in chunk or ESCAPED not in chunk):
                if type(chunk) is bytes and self.decoder.skip(chunk):
                    if self.enforce:
                        self._defer(chunk)
                    return chunk
            elif n > 2 and type(chunk) is bytes and chunk.startswith(b"data: "):
                # The same kind of event, which may be part of a tool call. Fast path: one
                # more fragment of a held call, and nothing else in the frame.
                if self._n_open and self.enforce and _FRAGMENT in chunk and self._fragment(chunk):
                    return b""
                # Otherwise the event goes to `_slow` (what `on_event` does with it here)
                # without the decoder's and `EventGovernor.feed`'s loops.
                if self.decoder.skip(chunk):
                    return self._slow(Frame(chunk, chunk[6:-2]))
                if not self.decoder.buffered:  # the stream's first event: the decoder must see it
                    try:
                        events = self.decoder.feed(chunk)
                    except CodecError as e:
                        return self._fail(e)
                    if len(events) == 1 and not self.decoder.buffered:
                        ev = events[0]
                        piece = self.on_event(ev)
                        return chunk if piece is ev.raw else piece
                    self._queue.extend(events)  # (not for this kind of chunk; as a queue would)
                    return self._drain()
        if self._idle and n > 2 and type(chunk) is bytes and not self._queue and not self.pending \
                and not self._closed and not self._dead:
            if not self.decoder.buffered:
                out = self._pass_text(chunk)
                if out is not None:
                    return out
            else:
                # The end of the event begun in an earlier chunk goes the usual way, the
                # rest as a chunk of its own (the decoder then holds nothing).
                k = chunk.find(b"\n\n") + 2
                if 2 <= k < n and b"\r" not in chunk:
                    out = EventGovernor.feed(self, chunk[:k])
                    return out + self.feed(chunk[k:])
        return EventGovernor.feed(self, chunk)

    def _pass_text(self, chunk: bytes) -> bytes | None:
        """Several events in one chunk, idle: the whole LF-framed events before the first
        that may carry a tool call go out as one piece, as `on_event` passes each of them,
        and only the rest is decoded event by event. Their text choices (which only a
        denial marker reads) are noted later, from the kept piece: `_has_text`."""
        p = first_hint(chunk, _TOOL_CALLS)
        q = find(chunk, _FUNCTION_CALL, 0, len(chunk) if p < 0 else p)
        if q >= 0:
            p = q
        end = (chunk.rfind(b"\n\n") if p < 0 else chunk.rfind(b"\n\n", 0, p)) + 2
        if end <= 2:
            return None
        n = len(chunk)
        head = chunk if end == n else chunk[:end]
        if b"\r" in head or not self.decoder.skip(head, True):
            return None
        if self.enforce:  # (observe mode writes no marker: nothing to note)
            self._defer(head)
        if end == n:
            return chunk
        return head + EventGovernor.feed(self, chunk[end:])

    def _defer(self, head: bytes) -> None:
        """Keep passed text events (whole LF-framed events, bytes) for noting their text
        choices later: only a marker reads them (`_has_text`), and most streams write none.
        Noted at once when they add up to _DEFER_MAX bytes."""
        d = self._deferred
        if d is None:
            d = self._deferred = []
        d.append(head)
        self._deferred_size += len(head)
        if self._deferred_size > _DEFER_MAX:
            self._note_deferred()

    def _note_deferred(self) -> None:
        """Note the text choices of the deferred bulk text, as `on_event` notes them event by
        event: every `"content":"` an empty one or the start of a match of the pattern (one
        findall), else each event the way `on_event` does."""
        heads, self._deferred, self._deferred_size = self._deferred or (), None, 0
        if len(heads) > 1:  # (events passed one by one: one findall over them all)
            joined = b"".join(heads)
            texts = _CHOICE_TEXT.findall(joined)
            if not _unseen_text(joined, len(texts)):
                self._texted.update(texts)
                return
        for head in heads:
            texts = _CHOICE_TEXT.findall(head)
            if not _unseen_text(head, len(texts)):
                self._texted.update(texts)
                continue
            dec = SSEDecoder()
            for ev in dec.feed(head) + dec.close():
                self._note_event(ev)

    def _has_text(self, index) -> bool:
        """Whether choice `index` had text before now."""
        texted = self._texted
        if index in texted or str(index).encode() in texted:
            return True
        if not self._deferred:
            return False
        if type(index) is int:
            # A match of the pattern for this choice in the deferred text settles it (the
            # usual case: found at the choice's first text event).
            for head in self._deferred:
                for needle in (b'"choices":[{"index":%d,"delta":{"content":"' % index,
                               b'"choices":[{"index":%d,"delta":{"role":"assistant","content":"' % index):
                    p = head.find(needle)
                    while p >= 0:
                        q = p + len(needle)
                        if q < len(head) and head[q] != 0x22:
                            return True
                        p = head.find(needle, q)
        self._note_deferred()
        return index in texted or str(index).encode() in texted

    def _fragment(self, chunk: bytes) -> bool:
        """Take `chunk` as one more fragment of a held call, if that is all it is (what
        `_slow` does with such a frame, one decode)."""
        data = chunk[6:-2]
        try:
            frag = _frag_decoder.decode(data)
        except _FRAG_ERRORS:
            return False
        chs = frag.choices
        if len(chs) != 1 or frag.usage is not None:
            return False
        ch = chs[0]
        tcs = ch.delta.tool_calls
        if ch.finish_reason is not None or len(tcs) != 1:
            return False
        tc = tcs[0]
        if tc.index is None:
            return False
        st = self._choices.get(ch.index)
        call = st.by_index.get(tc.index) if st is not None else None
        if call is None or call.tc is not None or call.first is None or not self.decoder.skip(chunk):
            return False
        fn = tc.function
        if tc.id is None and fn is not None and fn.name is None and type(fn.arguments) is str:
            call.parts.append(fn.arguments)  # what `call.feed` does with a bare arguments fragment
        else:
            call.feed(tc)
        last = self._held[-1]
        if last.more is not None and last.owners[0] is call:
            last.more.append(chunk)  # the run of fragment frames of this call goes on
        else:
            # No decoded chunk is kept: `_render` only reads it for a finish_reason and a
            # choice count, and this frame has no finish_reason and one choice.
            entry = _Entry(Frame(chunk, data), None, [(0, 0, call)], [call], True)
            entry.more = []
            self._held.append(entry)
        return True

    def on_event(self, ev) -> bytes:
        raw = ev.raw
        if self._idle and _TOOL_CALLS not in raw and _FUNCTION_CALL not in raw \
                and (b"\\" not in raw or ESCAPED not in raw):
            self._note_event(ev)  # a marker then starts on a new line
            return raw
        return self._slow(ev)

    def _note_event(self, ev) -> None:
        """Note the text choices of one event without a call: by the pattern, or by decoding
        the event when the pattern does not account for every "content" key in it."""
        raw = ev.raw
        m = _CHOICE_TEXT.search(raw)
        if m is not None:
            self._texted.add(m.group(1))
        if _unseen_text(raw, m is not None):
            self._note_text(ev)

    def _note_text(self, ev) -> None:
        """What the pattern notes, for a chunk it does not fully account for (another
        spelling, several choices in one chunk)."""
        try:
            chunk = _chunk_decoder.decode(ev.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        for ch in chunk.choices or ():
            if ch.delta is not None and isinstance(ch.delta.content, str) and ch.delta.content:
                self._texted.add(ch.index)

    def _slow(self, ev) -> bytes:
        if self._dead:
            return b""
        lg = self._legacy
        if lg is not None and lg is not _UNFOLLOWED:
            return self._legacy_event(ev)
        data = ev.data
        chunk = None
        done = False
        if data == b"[DONE]":
            done = True
        elif data:
            try:
                chunk = _chunk_decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                chunk = None
        if lg is None and chunk is not None and _legacy_delta(chunk):
            # A call of the legacy `functions` API (one per message): from here every frame
            # is held until the call's choice finishes; then it is decided (`_legacy_release`).
            if self.enforce and (self._held or self._n_open):
                return self._legacy_stop("alongside tool calls")
            self._legacy = _Legacy()
            if self.enforce:
                self._idle = False
            return self._legacy_event(ev)
        if chunk is None and not done:
            return self._hold_or_pass(ev, None, (), (), ())
        if chunk is not None and self.enforce:
            call = self._continuation(chunk)
            if call is not None:  # the common frame: one more fragment of a held call
                call.feed(chunk.choices[0].delta.tool_calls[0])
                self._held.append(_Entry(ev, chunk, [(0, 0, call)], [call]))
                return b""

        slots: list = []
        touched: list[_Call] = []
        completed: list[_Call] = []
        roles: list[_ChoiceState] = []
        if done:
            for st in self._choices.values():
                completed.extend(st.open)
                st.open = []
        for cp, ch in enumerate(chunk.choices or () if chunk is not None else ()):
            st = self._choices.get(ch.index)
            if st is None:
                st = self._choices[ch.index] = _ChoiceState(ch.index)
            delta = ch.delta
            if delta is not None:
                if delta.role is not None:
                    roles.append(st)
                if isinstance(delta.content, str) and delta.content:
                    self._texted.add(ch.index)
                for tp, frag in enumerate(delta.tool_calls or ()):
                    call = self._call_for(st, frag, tp, completed)
                    slots.append((cp, tp, call))
                    if call not in touched:
                        touched.append(call)
            if ch.finish_reason and st.open:
                completed.extend(st.open)
                st.open = []
        if completed:
            for call in completed:
                self._complete(call)
            owners = touched + [c for c in completed if c not in touched]
        else:
            owners = touched
        return self._hold_or_pass(ev, chunk, slots, owners, roles)

    # -- the legacy `functions` API -----------------------------------------------------
    def _legacy_event(self, ev) -> bytes:
        """Hold one frame of a stream with a legacy call open; complete the call when its
        choice finishes (or the stream ends)."""
        lg = self._legacy
        if self.enforce:
            lg.held.append(ev)
            passed = b""
        else:
            passed = ev.raw  # observe mode never holds: the call is only noted
        data = ev.data
        if data == b"[DONE]":
            self._legacy_complete()
            return passed
        try:
            obj = _decode(data) if data else None
        except msgspec.DecodeError:
            obj = None
        for ch in (obj.get("choices") or ()) if isinstance(obj, dict) else ():
            if not isinstance(ch, dict):
                continue
            index = ch.get("index", 0)
            delta = ch.get("delta")
            if isinstance(delta, dict):
                if delta.get("tool_calls"):
                    return self._legacy_stop("alongside tool calls", ev)
                fc = delta.get("function_call")
                if isinstance(fc, dict):
                    if lg.choice is None:
                        lg.choice = index
                    elif index != lg.choice or lg.tc is not None:
                        return self._legacy_stop("in two choices", ev)
                    name = fc.get("name")
                    if isinstance(name, str) and name and name != lg.name:
                        lg.name += name
                    if fc.get("arguments") is not None:
                        lg.parts.append(as_text(fc.get("arguments")))
            if index == lg.choice and ch.get("finish_reason"):
                self._legacy_complete()
                return passed
        return passed

    def _legacy_complete(self) -> bytes:
        lg = self._legacy
        if lg.tc is None:
            lg.tc = ToolCall(lg.name, "".join(lg.parts), None, 0)
            self.calls.append(lg.tc)
            self.pending.append(lg.tc)  # (observe mode: decided beside the stream)
        if not self.enforce:
            self._legacy = None
        return b""

    def _legacy_stop(self, why: str, ev=None) -> bytes:
        if not self.enforce:  # observe: the legacy call is no longer followed; the frame goes the usual way
            self._legacy = _UNFOLLOWED
            return self._slow(ev) if ev is not None else b""
        # a shape the legacy path does not govern: stop rather than pass it undecided
        self._held.clear()
        self._legacy = None
        return self._stop(f"sidegate: the answer holds a legacy function_call {why}, which is not governed; "
                          "the stream was stopped")

    def _legacy_release(self, verdict: Verdict) -> bytes:
        """The held frames: as they came when the call is allowed; else without the call,
        the marker in its place and `function_call` finishes turned into `stop`."""
        lg, self._legacy = self._legacy, None
        self._update_idle()
        if verdict.allowed:
            return b"".join(ev.raw for ev in lg.held)
        self._denials = True
        st = self._choices.get(lg.choice)
        if st is None:
            st = self._choices[lg.choice] = _ChoiceState(lg.choice)
        call = _Call(st, 0)
        call.name, call.verdict = lg.name, verdict
        out = []
        marked = False
        for ev in lg.held:
            try:
                obj = _decode(ev.data) if ev.data and ev.data != b"[DONE]" else None
            except msgspec.DecodeError:
                obj = None
            chs = obj.get("choices") if isinstance(obj, dict) else None
            changed = False
            for ch in chs or ():
                if not isinstance(ch, dict) or ch.get("index", 0) != lg.choice:
                    continue
                delta = ch.get("delta")
                if isinstance(delta, dict) and "function_call" in delta:
                    del delta["function_call"]
                    changed = True
                if ch.get("finish_reason") == "function_call":
                    ch["finish_reason"] = "stop"
                    changed = True
            if not changed:
                out.append(ev.raw)
                continue
            if self._meta is None:
                self._meta = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
            only = len(chs) == 1 and not chs[0].get("delta") and not chs[0].get("finish_reason") and not obj.get("usage")
            if not only:  # (a frame that carried nothing but the call's fragment goes)
                out.append(sse_frame(ev, _encode(obj)))
            if not marked:
                out.append(self._marker(ev, call))
                marked = True
        return b"".join(out)

    def _continuation(self, chunk: _Chunk):
        """The open call whose next fragment is all this chunk carries, if that is all."""
        chs = chunk.choices
        if not chs or len(chs) != 1:
            return None
        ch = chs[0]
        delta = ch.delta
        if ch.finish_reason or delta is None or delta.role is not None or delta.content is not None:
            return None
        tcs = delta.tool_calls
        if not tcs or len(tcs) != 1 or tcs[0].index is None:
            return None
        st = self._choices.get(ch.index)
        call = st.by_index.get(tcs[0].index) if st is not None else None
        if call is None or call.tc is not None or call.first is None:
            return None
        return call

    def _call_for(self, st: _ChoiceState, frag: _TC, pos: int, completed: list) -> _Call:
        # Keyed by index alone, as clients accumulate (an id that changes between fragments
        # does not start a new call): the verdict is on the call the client will rebuild.
        index = frag.index if frag.index is not None else pos
        call = st.by_index.get(index)
        if call is None:
            # a new call: the open ones of this choice are complete (unless their arguments
            # are not a whole JSON value yet: an upstream interleaving parallel calls)
            if st.open:
                keep = []
                for other in st.open:
                    if other.arguments_whole():
                        completed.append(other)
                    else:
                        keep.append(other)
                st.open = keep
            call = _Call(st, index)
            st.by_index[index] = call
            st.calls.append(call)
            st.open.append(call)
            self._n_open += 1
        if call.tc is None:
            call.feed(frag)
        # else: a late fragment of a decided call; it follows the call's verdict
        return call

    def _complete(self, call: _Call) -> None:
        self._n_open -= 1
        call.tc = ToolCall(call.name, "".join(call.parts), call.id, call.index if isinstance(call.index, int) else 0)
        self.calls.append(call.tc)
        self.pending.append(call.tc)
        if self.enforce:
            self._pend.append(call)
        self._idle = False

    def _hold_or_pass(self, ev, chunk, slots, owners, roles) -> bytes:
        if not self.enforce:
            self._update_idle()
            return ev.raw
        hold = bool(owners)
        if not hold and chunk is not None:
            for ch in chunk.choices or ():
                st = self._choices.get(ch.index)
                if st is not None and (st.first_held or (self._first_held and st in roles)):
                    hold = True
                    break
        if not hold:
            if chunk is None or not self._finish_to_rewrite(chunk):
                self._update_idle()
                return ev.raw
            entry = _Entry(ev, chunk, slots, owners)
            return self._render(entry)
        entry = _Entry(ev, chunk, slots, owners)
        for st in roles:
            if not st.first_held:
                st.first_held = True
                self._first_held += 1
                if entry.firsts is _NO_FIRSTS:
                    entry.firsts = []
                entry.firsts.append(st)
        for call in owners:
            if call.first is None:
                call.first = entry
        held = self._held
        held.append(entry)
        self._idle = False
        if len(held) == 1 and not self.pending and _decided(owners):
            return self._release()  # e.g. a late fragment of a call already decided
        return b""

    def _update_idle(self) -> None:
        self._idle = not self._held and not self._n_open

    # -- verdicts -------------------------------------------------------------------------
    def on_verdicts(self, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
        lg = self._legacy
        if lg is not None and lg.tc is not None and calls and calls[0] is lg.tc:
            return self._legacy_release(verdicts[0])
        mine, self._pend = self._pend, []
        for call, verdict in zip(mine, verdicts):
            call.verdict = verdict
            if not verdict.allowed:
                call.denied = self._denials = True
        return self._release()

    def on_close(self) -> bytes:
        if self._legacy is not None and self._legacy is not _UNFOLLOWED:  # the stream ended inside the legacy call
            return self._legacy_complete()
        for st in self._choices.values():
            for call in st.open:
                self._complete(call)
            st.open = []
        if self.pending:
            return b""
        return self._release()

    def _release(self) -> bytes:
        out = []
        held = self._held
        n = 0
        plain = not self._denials  # no denial yet: every frame goes out as it came
        for entry in held:
            owners = entry.owners
            if len(owners) == 1:
                if owners[0].verdict is None:
                    break
            elif owners and not _decided(owners):
                break
            n += 1
            if entry.firsts is _NO_FIRSTS:
                if plain:
                    out.append(entry.ev.raw)
                    if entry.more:
                        out.extend(entry.more)
                    continue
                if entry.only:
                    call = owners[0]
                    if call.denied and call.first is not entry:
                        continue  # later fragments of a denied call, and nothing else (as `_render`)
            piece = self._render(entry)
            if piece:
                out.append(piece)
            if entry.more:
                out.append(self._render_more(entry))
        if n:
            del held[:n]
        self._update_idle()
        return b"".join(out)

    # -- rewriting --------------------------------------------------------------------------
    def _finish_to_rewrite(self, chunk: _Chunk) -> bool:
        for ch in chunk.choices or ():
            if ch.finish_reason == "tool_calls":
                st = self._choices.get(ch.index)
                if st is not None and _none_left(st):
                    return True
        return False

    def _render_more(self, entry: _Entry) -> bytes:
        """The frames in `entry.more`, as `_render` renders each (it has rendered `entry`)."""
        call = entry.owners[0]
        if not self._denials or call.new_index == call.index:
            return b"".join(entry.more)  # what `_render` returns for each: its raw bytes
        return b"".join(self._render(_Entry(Frame(raw, raw[6:-2]), None, entry.slots, entry.owners, True))
                        for raw in entry.more)

    def _render(self, entry: _Entry) -> bytes:
        firsts = entry.firsts
        if firsts is not _NO_FIRSTS:
            for st in firsts:
                st.first_held = False
                self._first_held -= 1
        if not self._denials:
            return entry.ev.raw  # no denial yet: nothing is renumbered, removed or rewritten
        slots = entry.slots
        if len(slots) == 1:
            call = slots[0][2]
            if call.denied and call.first is not entry and entry.owners[0] is call:
                only = entry.only
                if only is None:
                    only = entry.only = _only_the_fragment(entry.ev.data)
                if only:
                    return b""  # a later fragment of a denied call, and nothing else
            elif call.first is entry and call.denied and entry.chunk is not None \
                    and len(entry.chunk.choices) == 1:
                return self._deny_opening(entry, call)
            calls = (call,)
        else:
            calls = []
            for _, _, call in slots:
                if call not in calls:
                    calls.append(call)
        denied = None
        change = False
        for call in calls:
            if call.verdict is None:
                continue
            if call.first is entry:
                st = call.choice
                if call.denied:
                    st.renumber = True
                    if denied is None:
                        denied = [call]
                    else:
                        denied.append(call)
                else:
                    call.new_index = st.next_index if st.renumber else call.index
                    st.next_index = (call.new_index + 1) if isinstance(call.new_index, int) else st.next_index
            if call.denied or call.new_index != call.index:
                change = True
        chunk = entry.chunk
        if not change and (chunk is None or not self._finish_to_rewrite(chunk)):
            return entry.ev.raw
        ev = entry.ev
        obj = _decode(ev.data)
        if self._meta is None:
            self._meta = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        choices = obj.get("choices") or []
        emptied = None
        removed = None
        for cp, tp, call in slots:
            if call.verdict is None:
                continue
            if call.denied:
                if removed is None:
                    removed = set()
                removed.add((cp, tp))
            elif call.new_index != call.index:
                choices[cp]["delta"]["tool_calls"][tp]["index"] = call.new_index
        if removed is not None:
            for cp, ch in enumerate(choices):
                delta = ch.get("delta") or {}
                tcs = delta.get("tool_calls")
                if not tcs:
                    continue
                kept = [tc for tp, tc in enumerate(tcs) if (cp, tp) not in removed]
                if len(kept) != len(tcs):
                    if kept:
                        delta["tool_calls"] = kept
                    else:
                        del delta["tool_calls"]
                        if emptied is None:
                            emptied = set()
                        emptied.add(cp)
        finished = set()
        for ch in choices:
            finish = ch.get("finish_reason")
            if finish is not None:
                finished.add(ch.get("index"))
                if finish == "tool_calls":
                    st = self._choices.get(ch.get("index"))
                    if st is not None and _none_left(st):
                        ch["finish_reason"] = "stop"
        if emptied is not None:
            obj["choices"] = choices = [ch for cp, ch in enumerate(choices)
                                        if not (cp in emptied and not ch.get("delta")
                                                and ch.get("finish_reason") is None)]
        drop = not choices and (chunk is not None and chunk.choices) and obj.get("usage") is None
        frame = b"" if drop else sse_frame(ev, _encode(obj))
        if denied is None:
            return frame
        before, after = [], []
        for call in denied:
            marker = self._marker(ev, call)
            (before if call.choice.index in finished else after).append(marker)
        return b"".join(before) + frame + b"".join(after)

    def _deny_opening(self, entry: _Entry, call: _Call) -> bytes:
        """What the general part of `_render` does with the usual first frame of a denied
        call: one choice, and in it one tool_calls entry, this call's."""
        call.choice.renumber = True
        ev = entry.ev
        obj = _decode(ev.data)
        if self._meta is None:
            self._meta = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        ch = obj["choices"][0]
        delta = ch["delta"]
        del delta["tool_calls"]  # its only entry
        finish = ch.get("finish_reason")
        before = False  # the marker goes before the frame when the frame ends the choice
        if finish is not None:
            index = ch.get("index")
            before = call.choice.index == index
            if finish == "tool_calls":
                st = self._choices.get(index)
                if st is not None and _none_left(st):
                    ch["finish_reason"] = "stop"
        if not delta and ch.get("finish_reason") is None:
            obj["choices"] = []  # nothing left in the choice: it goes, and the frame if nothing else is in it
            frame = b"" if obj.get("usage") is None else sse_frame(ev, _encode(obj))
        else:
            frame = sse_frame(ev, _encode(obj))
        marker = self._marker(ev, call)
        return marker + frame if before else frame + marker

    def _marker(self, ev, call: _Call) -> bytes:
        st = call.choice
        text = call.verdict.text(call.name)
        if st.marked or self._has_text(st.index):
            text = "\n" + text
        st.marked = True
        head = self._marker_head
        if head is None:
            # the chunk's fields before "choices", encoded once: the stream's id/object/created/model
            meta = dict(self._meta or {})
            meta.setdefault("object", "chat.completion.chunk")
            head = self._marker_head = _encode(meta)[:-1] + b',"choices":[{"index":'
        # = _encode({**meta, "choices": [{"index": i, "delta": {"content": text}, "finish_reason": None}]})
        return sse_frame(ev, head + _encode(st.index) + b',"delta":{"content":' + _encode(text)
                         + b'},"finish_reason":null}]}')


def _only_the_fragment(data: bytes) -> bool:
    try:
        shape = _shape_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    chs = shape.choices
    return (shape.usage is None and chs is not None and len(chs) == 1 and chs[0].finish_reason is None
            and chs[0].delta is not None and list(chs[0].delta) == ["tool_calls"])


def _decided(calls) -> bool:
    for c in calls:
        if c.verdict is None:
            return False
    return True


def _unseen_text(buf: bytes, matched: int) -> bool:
    """Whether `buf` may hold text that `matched` matches of _CHOICE_TEXT did not see: a
    "content" key that is none of them, nor an empty or null content, compactly spelled
    (`"content": "..."` with a space, a second choice in the chunk, logprobs' "content")."""
    return buf.count(_CONTENT) != matched + buf.count(_NO_TEXT) + buf.count(_NULL_TEXT)


def _none_left(st: _ChoiceState) -> bool:
    """Every call of the choice is decided and none was allowed."""
    calls = st.calls
    if not calls:
        return False
    for c in calls:
        if not c.denied:
            return False
    return True


def sse_frame(ev, data: bytes, event: str | None = None) -> bytes:
    """A rewritten or added event, with the line ends and `event:` name of the one it stands for."""
    raw = ev.raw
    event = event or ev.event
    if b"\r" not in raw:
        if event is None and b"\n" not in data and b"\r" not in data:
            return b"data: " + data + b"\n\n"  # what encode_event writes for it
        return encode_event(data, event=event)
    line_end = b"\r\n" if b"\r\n" in raw else (b"\r" if b"\n" not in raw else b"\n")
    return encode_event(data, event=event, line_end=line_end)


# -- non-streaming ----------------------------------------------------------------------

def _body_calls(obj) -> list[tuple[dict, int, dict]]:
    """(choice, position, tool call) for every tool call of a chat.completion body."""
    out = []
    if not isinstance(obj, dict):
        return out
    for ch in obj.get("choices") or ():
        if not isinstance(ch, dict):
            continue
        msg = ch.get("message")
        if not isinstance(msg, dict):
            continue
        for pos, tc in enumerate(msg.get("tool_calls") or ()):
            if isinstance(tc, dict):
                out.append((ch, pos, tc))
    return out


def load_body(body: bytes, needle: bytes):
    """The decoded JSON body, or None when the cheap byte test or the decoding says no call."""
    if not may_call(body, needle):
        return None
    try:
        return _decode(body)
    except msgspec.DecodeError:
        return None


def body_to_rewrite(body: bytes, needle: bytes, body_calls, calls: list, verdicts: list):
    """(decoded body, its calls) when some verdict is not allow, else None."""
    if all(v.allowed for v in verdicts):
        return None
    obj = load_body(body, needle)
    if obj is None:
        return None
    found = body_calls(obj)
    if not len(found) == len(calls) == len(verdicts):
        raise ValueError("rewrite: the verdicts do not match the body's tool calls")
    return obj, found


def _legacy_delta(chunk: _Chunk) -> bool:
    """Whether a decoded chunk's delta carries a legacy `function_call`."""
    for ch in chunk.choices or ():
        if ch.delta is not None and ch.delta.function_call is not None:
            return True
    return False


def _legacy_calls(obj) -> list[tuple[dict, dict]]:
    """(choice, function_call) for every message with a legacy `function_call`."""
    out = []
    for ch in (obj.get("choices") or ()) if isinstance(obj, dict) else ():
        msg = ch.get("message") if isinstance(ch, dict) else None
        fc = msg.get("function_call") if isinstance(msg, dict) else None
        if isinstance(fc, dict):
            out.append((ch, fc))
    return out


def _add_text(msg: dict, text: str) -> None:
    """The marker text into a message's content: on a new line after text it already has."""
    content = msg.get("content")
    msg["content"] = content + "\n" + text if isinstance(content, str) and content else text


def _load_chat(body: bytes):
    """`load_body` for tool calls or legacy function calls."""
    return load_body(body, _FUNCTION_CALL if _FUNCTION_CALL in body else _TOOL_CALLS)


def extract(path: str, body: bytes) -> list[ToolCall]:
    """The body's tool calls, then its legacy function calls (`rewrite` takes them so)."""
    obj = _load_chat(body)
    if obj is None:
        return []
    calls = []
    for _, pos, tc in _body_calls(obj):
        fn = tc.get("function")
        if isinstance(fn, dict):
            args = fn.get("arguments")
        else:
            fn = tc.get("custom") if isinstance(tc.get("custom"), dict) else {}
            args = fn.get("input")
        calls.append(ToolCall(as_text(fn.get("name")), as_text(args), tc.get("id"), pos))
    for _, fc in _legacy_calls(obj):
        calls.append(ToolCall(as_text(fc.get("name")), as_text(fc.get("arguments")), None, 0))
    return calls


def rewrite(path: str, body: bytes, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
    if all(v.allowed for v in verdicts):
        return body
    obj = _load_chat(body)
    if obj is None:
        return body
    found, legacy = _body_calls(obj), _legacy_calls(obj)
    if not len(found) + len(legacy) == len(calls) == len(verdicts):
        raise ValueError("rewrite: the verdicts do not match the body's tool calls")
    k = len(found)
    for (ch, _), call, verdict in zip(legacy, calls[k:], verdicts[k:]):
        if verdict.allowed:
            continue
        msg = ch["message"]
        del msg["function_call"]
        _add_text(msg, verdict.text(call.name))
        if ch.get("finish_reason") == "function_call":
            ch["finish_reason"] = "stop"
    if legacy:
        calls, verdicts = calls[:k], verdicts[:k]
    by_choice: dict[int, list] = {}
    for (ch, _, tc), call, verdict in zip(found, calls, verdicts):
        by_choice.setdefault(id(ch), [ch, []])[1].append((tc, call, verdict))
    for ch, items in by_choice.values():
        if all(v.allowed for _, _, v in items):
            continue
        msg = ch["message"]
        kept, markers = [], []
        for tc, call, verdict in items:
            if verdict.allowed:
                kept.append(tc)
            else:
                markers.append(verdict.text(call.name))
        for n, tc in enumerate(kept):
            if "index" in tc:
                tc["index"] = n
        _add_text(msg, "\n".join(markers))
        if kept:
            msg["tool_calls"] = kept
        else:
            msg.pop("tool_calls", None)
            if ch.get("finish_reason") == "tool_calls":
                ch["finish_reason"] = "stop"
    return _encode(obj)

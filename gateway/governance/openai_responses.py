"""Tool-call governance for the OpenAI Responses API (`POST .../responses`).

Stream shape: `event: response.*` + `data: {...}`. A client tool call is an output item of
type `function_call`: `response.output_item.added` (name, call_id), then
`response.function_call_arguments.delta`* and `.done`, then `response.output_item.done`
(the complete item), and the aggregate `response.completed.response.output` repeats it.
A `custom_tool_call` (free-form input) is governed the same way, through its
`response.custom_tool_call_input.delta` / `.done` events; its raw input is the arguments.
The built-in tools the agent itself runs are tool calls too: `shell_call`,
`local_shell_call`, `apply_patch_call` and `computer_call` items carry no name, so the call
is named after its tool (`shell`, `local_shell`, `apply_patch`, `computer`) and its
arguments are the item's `action` (`actions`) or `operation` object as compact JSON. Their
own events (`response.shell_call_command.*`, `response.apply_patch_call_operation_diff.*`)
are the call's frames: held with it, and gone with it when it is denied; the arguments are
read from the complete item (`response.output_item.done`), or from the item as it was
added when the stream ends first.
Recent servers number every event (`sequence_number`, dense, from 0 or from the resume
point).

A call is complete at its `response.output_item.done` (or, if that never comes, at a
terminal event or the end of the stream). The SDKs take the final output from the terminal
event's aggregate, so a call that only the aggregate carries (or only an
`output_item.done`) is a call too: decided there, and patched out of it when denied.
Output items stream one after the other, so in enforce mode every event from a call's
`output_item.added` on is held until its verdict: that keeps the stream's order, and its
sequence numbers, exactly as they came when the call is allowed.

A denied call's item becomes a `message` item with one `output_text` part carrying the
marker, at the same `output_index`, told with the event sequence the SDK's accumulator
expects: output_item.added, content_part.added, output_text.delta, output_text.done,
content_part.done, output_item.done. Every later `sequence_number` is shifted so the
numbering stays dense, and `response.completed` (or `.incomplete` / `.failed`) gets the
same message item in its `response.output`; its status is left as it came.
"""

from __future__ import annotations

import re

import msgspec
from sidegate_codecs import SSEDecoder

from ..dialects import openai as _dialect
from .base import ESCAPED, EventGovernor, ToolCall, Verdict, first_hint
from .openai_chat import as_text as _text
from .openai_chat import body_to_rewrite, load_body, one_event
from .openai_chat import sse_frame as _frame

__all__ = ["Governor", "call_of", "extract", "rewrite"]

# Client-side tool calls: item type -> the item field with the arguments, and the events
# that stream it. (Server-side tools, e.g. web_search_call or mcp_call, are not the agent's.)
_KINDS = {
    "function_call": ("arguments", "response.function_call_arguments.delta", "response.function_call_arguments.done"),
    "custom_tool_call": ("input", "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done"),
}
# The built-in tools the agent runs: item type -> (the item field with the arguments, the
# call's name, the event kinds of the item's own frames).
_BUILTIN = {
    "shell_call": ("action", "shell", ("response.shell_call_command.added", "response.shell_call_command.delta",
                                       "response.shell_call_command.done")),
    "local_shell_call": ("action", "local_shell", ()),
    "apply_patch_call": ("operation", "apply_patch", ("response.apply_patch_call_operation_diff.delta",
                                                      "response.apply_patch_call_operation_diff.done")),
    "computer_call": ("action", "computer", ()),
}
_GOVERNED = frozenset(_KINDS) | frozenset(_BUILTIN)
_DELTAS = frozenset(k[1] for k in _KINDS.values())
_DONES = frozenset(k[2] for k in _KINDS.values())
_CALL_EVENTS = _DELTAS | _DONES | {"response.output_item.done"} | {e for b in _BUILTIN.values() for e in b[2]}
# Cheap test: a governed item's type ends in `_call"` (function_call, shell_call, ...), and
# a `"` inside a JSON string is escaped, so text deltas never match.
_MAYBE_CALL = b'_call"'
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
_AGGREGATE = frozenset({"response.completed", "response.incomplete", "response.failed",
                        "response.created", "response.in_progress", "response.queued"})
_SEQ = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


class _Item(msgspec.Struct, gc=False):
    type: object = None
    id: object = None
    call_id: object = None
    name: object = None
    arguments: object = None
    input: object = None
    action: object = None
    actions: object = None
    operation: object = None

    def args(self) -> object:
        return item_args(self.type, self)

    def tool_name(self) -> object:
        builtin = _BUILTIN.get(self.type)
        return builtin[1] if builtin is not None else self.name


def item_args(kind, item):
    """A call item's arguments: a field of a decoded `_Item`, or a key of a body's item dict."""
    spec = _KINDS.get(kind) or _BUILTIN.get(kind)
    if spec is None:
        return None
    get = item.get if isinstance(item, dict) else item.__getattribute__
    value = get(spec[0])
    if value is None and kind == "computer_call":  # a batch of actions (the GA computer tool)
        value = get("actions")
    return value


class _Aggregate(msgspec.Struct, gc=False):
    output: list[_Item] | None = None


class _Event(msgspec.Struct, gc=False):
    """The top-level fields governance reads (of `response`, the output items only)."""

    type: object = None
    sequence_number: object = None
    output_index: object = None
    item_id: object = None
    item: _Item | None = None
    delta: object = None
    arguments: object = None
    input: object = None
    response: _Aggregate | None = None


_event_decoder = msgspec.json.Decoder(_Event)
_encode = msgspec.json.encode
_decode = msgspec.json.decode


def message_item(mid: str, text: str, status: str = "completed") -> dict:
    """The `message` output item a denied call turns into."""
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": content}


def _message_id(item_id, call_id, position) -> str:
    """A stable id for the replacement message, unique in the response. The Responses API
    wants assistant message ids that start with "msg"."""
    for ref in (item_id, call_id):
        if isinstance(ref, str) and ref:
            return "msg_sidegate_" + ref.split("_", 1)[-1]
    return f"msg_sidegate_{position}"


def _item_keys(item_id, call_id, position) -> list:
    """How a call's item is found again in the aggregate `output`: by its id or its call_id
    (either: a server may spell one only in the item events or only in the aggregate), by its
    place only when it has neither."""
    keys = [k for k in (item_id, ("call_id", call_id) if call_id else None) if k]
    return keys or [("position", position)]


class _Call:
    __slots__ = (
        "arguments",
        "call_id",
        "denied",
        "item_id",
        "message",
        "name",
        "output_index",
        "parts",
        "started",
        "tc",
        "type",
        "verdict",
    )

    def __init__(self, output_index, item: _Item) -> None:
        self.type = item.type
        self.output_index = output_index
        self.item_id = item.id
        self.call_id = item.call_id
        self.name = _text(item.tool_name())
        args = item.args()
        self.parts = [_text(args)] if args else []
        self.arguments: str | None = None  # the final arguments once known
        self.tc: ToolCall | None = None
        self.verdict: Verdict | None = None
        self.denied = False  # decided, and not allowed
        self.message: dict | None = None  # the replacement item, once denied
        self.started = False  # its replacement went out (denied) / its first frame went out


class Governor(EventGovernor):
    __slots__ = ("_calls", "_denied", "_held", "_open", "_pend", "_shift")

    def __init__(self, path: str = "/responses", content_type: str = "text/event-stream",
                 enforce: bool = True) -> None:
        super().__init__(SSEDecoder(), enforce, _dialect._responses_error)
        self._open: dict = {}       # output_index -> open _Call
        self._calls: dict = {}      # item id / output_index -> every _Call seen
        self._held: list = []       # [ev, decoded _Event | None, _Call | None]
        self._pend: list[_Call] = []
        self._shift = 0             # added to every later sequence_number
        self._denied: dict = {}     # _item_keys of a denied call -> its replacement message item

    # -- events -------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        if not self._queue and not self.pending and not self._closed and not self._dead:
            idle = not self._open and not self._held and not self._shift and not self._denied
            # Fast path: the test `on_event` starts with, on the whole events before the
            # first that may carry a call (all of the chunk when none may).
            p = first_hint(chunk, _MAYBE_CALL) if idle else 0
            out = self._pass_sse_events(chunk, p, EventGovernor.feed)
            if out is not None:
                return out
            if p >= 0:
                # One whole event of the usual spelling: straight to `on_event`, without the
                # decoder's and `EventGovernor.feed`'s loops (what they would do with it).
                ev = one_event(chunk)
                if ev is not None and self.decoder.skip(chunk):
                    return self.on_event(ev)
        return EventGovernor.feed(self, chunk)

    def on_event(self, ev) -> bytes:
        raw = ev.raw
        if not self._open and not self._held and not self._shift and not self._denied \
                and _MAYBE_CALL not in raw and (b"\\" not in raw or ESCAPED not in raw):
            return raw
        data = ev.data
        head = None
        if data and data != b"[DONE]":
            try:
                head = _event_decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                head = None
        call = None
        trigger = False
        if head is not None:
            kind = head.type
            if kind == "response.output_item.added" and head.item is not None and head.item.type in _GOVERNED:
                call = self._add(head.output_index, head.item)
            elif kind in _CALL_EVENTS:
                call = self._find(head)
                if call is None and kind == "response.output_item.done" and head.item is not None \
                        and head.item.type in _GOVERNED:
                    call = self._add(head.output_index, head.item)  # a call first seen complete
                if call is not None and call.tc is None:
                    if kind in _DELTAS:
                        call.parts.append(_text(head.delta))
                    elif kind in _DONES:
                        done = head.input if kind == "response.custom_tool_call_input.done" else head.arguments
                        if done is not None:
                            call.arguments = _text(done)
                    elif kind == "response.output_item.done" and head.item is not None:
                        item = head.item
                        args = item.args()
                        if args is not None:
                            call.arguments = _text(args)
                        if item.name and call.type in _KINDS:
                            call.name = _text(item.name)
                        if item.call_id and not call.call_id:
                            call.call_id = item.call_id
                        self._complete(call)
            elif kind in _TERMINAL:
                if self._open:
                    trigger = True
                    for open_call in list(self._open.values()):
                        self._complete(open_call)
                # The SDKs take the final output from this aggregate: a call only it carries
                # (no item events of its own) is decided here, and patched in it when denied.
                output = head.response.output if head.response is not None else None
                for n, item in enumerate(output or ()):
                    if item.type in _GOVERNED and not self._seen(n, item):
                        unseen = self._add(n, item)
                        unseen.arguments = _text(item.args())
                        self._complete(unseen)
                        trigger = True
        if not self.enforce:
            return raw
        if call is None and not trigger and not self._held:
            return self._render(ev, head, None)
        held = self._held
        held.append((ev, head, call))
        if self.pending:
            return b""
        first = held[0][2]
        if first is not None and first.verdict is None:
            return b""  # still waiting for the verdict on the call at the head (as `_release`)
        return self._release()

    def _add(self, output_index, item: _Item) -> _Call:
        call = self._open[output_index] = self._calls[output_index] = _Call(output_index, item)
        if item.id:
            self._calls[item.id] = call
        if item.call_id:
            self._calls[("call_id", item.call_id)] = call
        return call

    def _seen(self, position: int, item: _Item) -> bool:
        """An aggregate's item is a call already governed: by id, call_id, or its place (when
        no id of the two says it is another call)."""
        calls = self._calls
        if (item.id and item.id in calls) or (item.call_id and ("call_id", item.call_id) in calls):
            return True
        call = calls.get(position)
        return call is not None and call.type == item.type and not (item.id and call.item_id) \
            and not (item.call_id and call.call_id)

    def _find(self, head: _Event):
        call = self._calls.get(head.item_id) if head.item_id else None
        if call is None and head.item is not None and head.item.id:
            call = self._calls.get(head.item.id)
        if call is None and head.output_index is not None:
            call = self._calls.get(head.output_index)
            if call is not None and head.item is not None and head.item.type not in (None, call.type):
                call = None
        return call

    def _complete(self, call: _Call) -> None:
        self._open.pop(call.output_index, None)
        args = call.arguments if call.arguments is not None else "".join(call.parts)
        index = call.output_index if isinstance(call.output_index, int) else 0
        call.tc = ToolCall(call.name, args, call.call_id, index)
        self.calls.append(call.tc)
        self.pending.append(call.tc)
        if self.enforce:
            self._pend.append(call)

    # -- verdicts -------------------------------------------------------------------------
    def on_verdicts(self, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
        mine, self._pend = self._pend, []
        for call, verdict in zip(mine, verdicts):
            call.verdict = verdict
            if not verdict.allowed:
                call.denied = True
                mid = _message_id(call.item_id, call.call_id, call.output_index)
                call.message = message_item(mid, verdict.text(call.name))
                for key in _item_keys(call.item_id, call.call_id, call.output_index):
                    self._denied[key] = call.message
        return self._release()

    def on_close(self) -> bytes:
        for call in list(self._open.values()):
            self._complete(call)
        if self.pending:
            return b""
        return self._release()

    def _release(self) -> bytes:
        out = []
        held = self._held
        n = 0
        for ev, head, call in held:
            if call is not None:
                if call.verdict is None:
                    break
                if call.denied and call.started:
                    n += 1
                    self._shift -= 1  # the rest of a denied call's frames: gone (as `_render`)
                    continue
            n += 1
            if not self._shift and not self._denied:
                out.append(ev.raw)  # nothing to renumber or patch (as `_render`)
                continue
            piece = self._render(ev, head, call)
            if piece:
                out.append(piece)
        if n:
            del held[:n]
        return b"".join(out)

    # -- rewriting --------------------------------------------------------------------------
    def _render(self, ev, head: _Event | None, call: _Call | None) -> bytes:
        if call is not None and call.denied:
            if call.started:
                self._shift -= 1  # the rest of a denied call's frames: gone
                return b""
            call.started = True
            return self._replacement(ev, head, call)
        seq = head.sequence_number if head is not None else None
        shift = self._shift if isinstance(seq, int) else 0
        if head is not None and head.type in _AGGREGATE and self._denied:
            obj = _decode(ev.data)
            response = obj.get("response")
            if isinstance(response, dict) and _patch_output(response, self._denied):
                if shift:
                    obj["sequence_number"] = seq + shift
                return _frame(ev, _encode(obj))
        if not shift:
            return ev.raw
        data = ev.data
        m = _SEQ.search(data)
        if m is not None and int(m.group(1)) == seq:
            data = data[:m.start(1)] + str(seq + shift).encode() + data[m.end(1):]
        else:  # the first "sequence_number" in the text is not the event's own: re-encode
            obj = _decode(data)
            obj["sequence_number"] = seq + shift
            data = _encode(obj)
        return _frame(ev, data)

    def _replacement(self, ev, head: _Event, call: _Call) -> bytes:
        """The six events of the replacement message, as `_encode` would write these dicts
        (keys in this order, "sequence_number" second when the event had one):
        output_item.added {output_index, item: message_item(in_progress)},
        content_part.added {item_id, output_index, content_index: 0, part: empty output_text},
        output_text.delta {item_id, output_index, content_index: 0, delta: text, logprobs: []},
        output_text.done {item_id, output_index, content_index: 0, text, logprobs: []},
        content_part.done {item_id, output_index, content_index: 0, part: output_text with text},
        output_item.done {output_index, item: the message item}."""
        item = call.message
        text = _encode(call.verdict.text(call.name))
        mid = _encode(item["id"])
        idx = _encode(call.output_index)
        at = b',"output_index":' + idx
        ids = b',"item_id":' + mid + at + b',"content_index":0'
        bodies = (
            at + b',"item":{"id":' + mid + b',"type":"message","status":"in_progress","role":"assistant","content":[]}}',
            ids + b',"part":{"type":"output_text","text":"","annotations":[]}}',
            ids + b',"delta":' + text + b',"logprobs":[]}',
            ids + b',"text":' + text + b',"logprobs":[]}',
            ids + b',"part":{"type":"output_text","text":' + text + b',"annotations":[]}}',
            at + b',"item":' + _encode(item) + b'}',
        )
        seq = head.sequence_number if head is not None else None
        numbered = isinstance(seq, int)
        raw = ev.raw
        if b"\r" not in raw:
            end = b"\n"
        else:
            end = b"\r\n" if b"\r\n" in raw else (b"\r" if b"\n" not in raw else b"\n")
        named = ev.event is not None
        leads = _REPLACEMENT_LEADS.get((named, end))
        if leads is None:  # each event's `event:` line (when the stream names events) and its JSON up to the type
            leads = _REPLACEMENT_LEADS[(named, end)] = tuple(
                (b"event: " + kind + end if named else b"") + b'data: {"type":"' + kind for kind in _REPLACEMENT_TYPES)
        end += end  # the data line's end and the blank line
        if numbered:
            first = seq + self._shift
            out = [lead + b'","sequence_number":' + _encode(first + n) + body + end
                   for n, (lead, body) in enumerate(zip(leads, bodies))]
        else:
            out = [lead + b'"' + body + end for lead, body in zip(leads, bodies)]
        self._shift += len(bodies) - 1
        return b"".join(out)


_REPLACEMENT_TYPES = (b"response.output_item.added", b"response.content_part.added", b"response.output_text.delta",
                      b"response.output_text.done", b"response.content_part.done", b"response.output_item.done")
_REPLACEMENT_LEADS: dict = {}


def _patch_output(response: dict, denied: dict) -> bool:
    output = response.get("output")
    if not isinstance(output, list):
        return False
    changed = False
    for n, item in enumerate(output):
        if isinstance(item, dict) and item.get("type") in _GOVERNED:
            keys = _item_keys(item.get("id"), item.get("call_id"), n)
            message = next((denied[k] for k in keys + [("position", n)] if k in denied), None)
            if message is not None:
                output[n] = message
                changed = True
    return changed


# -- non-streaming ----------------------------------------------------------------------

def _body_calls(obj) -> list[tuple[list, int, dict]]:
    out = []
    output = obj.get("output") if isinstance(obj, dict) else None
    if not isinstance(output, list):
        return out
    for n, item in enumerate(output):
        if isinstance(item, dict) and item.get("type") in _GOVERNED:
            out.append((output, n, item))
    return out


def extract(path: str, body: bytes) -> list[ToolCall]:
    obj = load_body(body, _MAYBE_CALL)
    if obj is None:
        return []
    return [ToolCall(*call_of(item), item.get("call_id"), n) for _, n, item in _body_calls(obj)]


def call_of(item: dict) -> tuple[str, str] | None:
    """An output item (a dict) as (tool name, arguments), when it is a call the agent runs."""
    kind = item.get("type")
    if kind not in _GOVERNED:
        return None
    builtin = _BUILTIN.get(kind)
    return _text(builtin[1] if builtin is not None else item.get("name")), _text(item_args(kind, item))


def rewrite(path: str, body: bytes, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
    todo = body_to_rewrite(body, _MAYBE_CALL, _body_calls, calls, verdicts)
    if todo is None:
        return body
    obj, found = todo
    for (output, n, item), call, verdict in zip(found, calls, verdicts):
        if not verdict.allowed:
            output[n] = message_item(_message_id(item.get("id"), item.get("call_id"), n), verdict.text(call.name))
    if "output_text" in obj and isinstance(obj["output_text"], str):  # some servers precompute it
        obj["output_text"] = "".join(
            part.get("text", "") for item in obj["output"] if isinstance(item, dict) and item.get("type") == "message"
            for part in item.get("content") or () if isinstance(part, dict) and part.get("type") == "output_text")
    return _encode(obj)

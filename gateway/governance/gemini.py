"""Tool-call governance for Google Gemini and Vertex AI Gemini.

Paths: `...:generateContent` (one JSON body), `...:streamGenerateContent?alt=sse` (SSE,
one GenerateContentResponse per event) and `...:streamGenerateContent` without alt=sse
(one JSON array written element by element).

A tool call is a `functionCall` part of `candidates[i].content.parts`. Usually the part
is whole (`{name, args}`; parallel calls are several parts of one chunk, each its own
call). Vertex can also stream the arguments (`streamFunctionCallArguments`): a part
`{name, willContinue: true}` opens the call, parts `{partialArgs: [{jsonPath,
stringValue|numberValue|boolValue|nullValue, willContinue}], willContinue: true}` carry
the values in later chunks, and a part without `willContinue` (often `{}`) closes it.
The arguments are assembled from the jsonPath assignments (string fragments of one
path concatenate).

Chunks are only decoded when their bytes contain `"function` (or a call is open).
From the chunk that opens a call to the chunk that closes it every chunk is held, in
order. A denied / escalated call's opening part becomes `{"text": marker}` in the same
chunk position, its continuation parts are removed (a chunk left with nothing but its
envelope is dropped; only the array's first element, which carries the "[", is kept). Gemini says `STOP` for tool calls and end of turn alike, so
the finish reason stays; a `finishMessage` about function calls is dropped when none
is left. A `thoughtSignature` on a denied part moves to the next call of the candidate
that is kept (Gemini 3 wants it on the first function call of a step), else it stays on
the text part; a kept call that only arrives in a later chunk gets a copy.
"""

from __future__ import annotations

import logging
import re
from itertools import pairwise

import msgspec
from sidegate_codecs.errors import CodecError
from sidegate_codecs.jsonstream import JSONArrayStreamDecoder
from sidegate_codecs.sse import SSEDecoder, encode_event

from ..bytesearch import has
from ..dialects._shared import last_event_end
from ..dialects.gemini import sse_error
from .base import ALLOW, ESCAPED, EventGovernor, ToolCall, Verdict, first_hint, may_call

log = logging.getLogger("sidegate.governance")

__all__ = ["Governor", "assemble_partial_args", "extract", "rewrite"]

# -- msgspec views with just the fields governance needs -------------------------------


class _PartialArg(msgspec.Struct):
    jsonPath: str = ""
    stringValue: str | None = None
    numberValue: int | float | None = None
    boolValue: bool | None = None
    nullValue: msgspec.Raw = msgspec.Raw()
    willContinue: bool = False


class _FunctionCall(msgspec.Struct):
    name: str | None = None
    id: str | None = None
    args: msgspec.Raw = msgspec.Raw()
    partialArgs: list[_PartialArg] | None = None
    willContinue: bool = False


class _Part(msgspec.Struct):
    functionCall: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] | None = None


class _Candidate(msgspec.Struct):
    content: _Content | None = None
    index: int = 0
    finishReason: str | None = None


class _Response(msgspec.Struct):
    candidates: list[_Candidate] | None = None


_decode_response = msgspec.json.Decoder(_Response).decode


# The same, refusing any other field: a chunk that decodes with these carries nothing but
# function-call parts and the envelope (a continuation chunk of streamed arguments).
class _StrictFunctionCall(msgspec.Struct, forbid_unknown_fields=True):
    name: str | None = None
    id: str | None = None
    args: msgspec.Raw = msgspec.Raw()
    partialArgs: list[_PartialArg] | None = None
    willContinue: bool = False


class _StrictPart(msgspec.Struct, forbid_unknown_fields=True):
    functionCall: _StrictFunctionCall


class _StrictContent(msgspec.Struct, forbid_unknown_fields=True):
    parts: list[_StrictPart]
    role: str | None = None


class _StrictCandidate(msgspec.Struct, forbid_unknown_fields=True):
    content: _StrictContent
    index: int = 0
    finishReason: None = None


class _StrictResponse(msgspec.Struct, forbid_unknown_fields=True):
    candidates: list[_StrictCandidate]
    usageMetadata: msgspec.Raw = msgspec.Raw()
    modelVersion: str | None = None
    createTime: str | None = None
    responseId: str | None = None


_decode_strict = msgspec.json.Decoder(_StrictResponse).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.encode

_WHOLE, _FIRST, _CONT = range(3)
# Top-level fields a chunk left without parts can be dropped with (usage is cumulative).
_ENVELOPE = {"candidates", "usageMetadata", "modelVersion", "createTime", "responseId"}
# A chunk ending so ends on an SSE event boundary (a line end, then an empty line).
_BLOCK_ENDS = (b"\n\n", b"\n\r\n")
# A part's call key: functionCall, or function_call (protobuf's own JSON name, which the
# google-genai SDK reads as a call too: `_snake_call`); escaped spellings: `may_call`.
_CALL = b'"function'
_BLOCK_END = re.compile(rb"\n\n|\r\r|\r\n\r\n|\n\r\n|\r\n\n")  # the ends last_event_end knows


# -- partialArgs assembly ---------------------------------------------------------------

_PATH_TOKEN = re.compile(r"""\.([^.\[\]]+)|\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]|\["((?:[^"\\]|\\.)*)"\]""")


_PATHS: dict[str, list] = {}


def _path(json_path: str) -> list:
    keys = _PATHS.get(json_path)
    if keys is None:
        if len(_PATHS) > 4096:
            _PATHS.clear()
        keys = _PATHS[json_path] = _parse_path(json_path)
    return keys


def _parse_path(json_path: str) -> list:
    p = json_path.removeprefix("$")
    keys: list = []
    pos = 0
    while pos < len(p):
        m = _PATH_TOKEN.match(p, pos)
        if m is None:  # not a path we understand: treat the rest as one key
            keys.append(p[pos:].lstrip("."))
            break
        name, idx, q1, q2 = m.groups()
        keys.append(int(idx) if idx is not None else (name if name is not None else (q1 if q1 is not None else q2)))
        pos = m.end()
    return keys


def _assign(root: dict, keys: list, value, append_str: bool):
    if not keys:
        return root
    node = root
    for k, nxt in pairwise(keys):
        child_type = list if isinstance(nxt, int) else dict
        if isinstance(node, list):
            while len(node) <= k:
                node.append(None)
            if not isinstance(node[k], (dict, list)):
                node[k] = child_type()
            node = node[k]
        else:
            child = node.get(k)
            if not isinstance(child, (dict, list)):
                child = node[k] = child_type()
            node = child
    last = keys[-1]
    if isinstance(node, list):
        if not isinstance(last, int):
            return root
        while len(node) <= last:
            node.append(None)
        old = node[last]
        node[last] = old + value if append_str and isinstance(old, str) else value
    else:
        old = node.get(last)
        node[last] = old + value if append_str and isinstance(old, str) else value
    return root


def assemble_partial_args(fragments) -> dict:
    """The arguments object built from partialArgs entries (in stream order)."""
    root: dict = {}
    for pa in fragments:
        keys = _path(pa.jsonPath)
        if not keys:
            continue
        if pa.stringValue is not None:
            _assign(root, keys, pa.stringValue, True)
        elif pa.numberValue is not None:
            _assign(root, keys, pa.numberValue, False)
        elif pa.boolValue is not None:
            _assign(root, keys, pa.boolValue, False)
        elif len(pa.nullValue):
            _assign(root, keys, None, False)
    return root


class _Partial:
    """A call whose arguments are still streaming."""

    __slots__ = ("call", "frags")

    def __init__(self, call: ToolCall) -> None:
        self.call = call
        self.frags: list[_PartialArg] = []

    def finish(self) -> ToolCall:
        self.call.arguments = _encode(assemble_partial_args(self.frags)).decode("utf-8")
        return self.call


def _whole_args(fc: _FunctionCall) -> str:
    raw = bytes(fc.args)
    return raw.decode("utf-8") if raw and raw != b"null" else "{}"


# -- error frames -----------------------------------------------------------------------

def _error_json(message: str) -> bytes:
    from ..dialects.gemini import _error

    return _error(502, message)


# -- streaming --------------------------------------------------------------------------

class Governor(EventGovernor):
    """Gemini stream governor. `Governor(path, content_type, enforce)` returns the SSE
    or the JSON-array variant, by `alt=sse` / the content type."""

    __slots__ = ("_broken", "_carry", "_done", "_group", "_kept", "_lost", "_open", "_primed", "_slowpath")

    def __new__(cls, path: str = "", content_type: str = "", enforce: bool = True):
        if cls is not Governor:
            return object.__new__(cls)
        sse = "alt=sse" in (path or "") or (content_type or "").lower().startswith("text/event-stream")
        return object.__new__(_SSEGovernor if sse else _ArrayGovernor)

    def _setup(self, decoder, enforce: bool, error_frame) -> None:
        EventGovernor.__init__(self, decoder, enforce, error_frame)
        self._open: dict[int, _Partial] = {}  # candidate index -> call being streamed
        self._group: list | None = None  # held chunks: [event, refs]
        self._done: list[ToolCall] = []
        self._slowpath = False  # a call is open / held, or one was denied: no fast path
        self._carry: dict[int, str] = {}  # candidate -> thoughtSignature of a denied call
        self._kept: dict[int, int] = {}  # candidate -> calls allowed
        self._lost: dict[int, int] = {}  # candidate -> calls denied / escalated
        self._broken = False
        self._primed = False  # the decoder has seen the stream's start (BOM, first event)

    # -- per dialect variant ----------------------------------------------------------
    def _data(self, ev) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _replace(self, ev, obj: dict | None) -> bytes:  # pragma: no cover - abstract
        """The event with its JSON replaced by `obj` (None: drop the chunk if possible)."""
        raise NotImplementedError

    def _drop(self, ev) -> bytes | None:  # pragma: no cover - abstract
        """What replaces a chunk that is dropped whole (None: it cannot be)."""
        raise NotImplementedError

    # -- hot path -------------------------------------------------------------------
    def on_event(self, ev) -> bytes:
        raw = ev.raw
        if not self._slowpath and _CALL not in raw and (b"\\" not in raw or ESCAPED not in raw):
            return raw
        out = self._slow(ev)
        self._slowpath = bool(self._group is not None or self._open or self._lost)
        return out

    def _slow(self, ev) -> bytes:
        raw = ev.raw
        if may_call(raw, _CALL) or (self._open and b'"finishReason"' in raw):
            data = self._data(ev)
            if data and _snake_call(data):
                if self.enforce:
                    return self._break("sidegate: the upstream spelled a function call function_call, "
                                       "which is not governed; the stream was stopped")
                log.warning("gemini: a function_call part passed ungoverned (observe mode)")
            refs, pure = self._scan(data) if data else (None, False)
        else:
            refs, pure = None, False
        if not self.enforce:
            if not self._open:
                self._flush_done()
            return raw
        if self._group is None:
            if not refs:
                return self._fix_finish(ev)
            self._group = []
        self._group.append((ev, refs, pure))
        if not self._open:
            self._flush_done()
        return b""

    def _scan(self, data: bytes):
        """Track the calls in one chunk: (list of (candidate pos, part pos, call, role,
        candidate index), whether the chunk holds nothing but continuation parts)."""
        try:
            resp = _decode_strict(data)
            strict = True
        except msgspec.DecodeError:
            try:
                resp = _decode_response(data)
            except msgspec.DecodeError:
                return None, False
            strict = False
        refs = []
        for ci, cand in enumerate(resp.candidates or ()):
            cidx = cand.index
            parts = cand.content.parts if cand.content is not None else None
            for pi, part in enumerate(parts or ()):
                fc = part.functionCall
                if fc is None:
                    continue
                cur = self._open.get(cidx)
                if fc.name:
                    if cur is not None:  # a new call starts: the open one is complete
                        self._done.append(cur.finish())
                        del self._open[cidx]
                    call = ToolCall(fc.name, "", fc.id, pi)
                    if fc.willContinue or fc.partialArgs:
                        rec = _Partial(call)
                        if fc.partialArgs:
                            rec.frags.extend(fc.partialArgs)
                        if fc.willContinue:
                            self._open[cidx] = rec
                        else:
                            self._done.append(rec.finish())
                        refs.append((ci, pi, call, _FIRST, cidx))
                    else:
                        call.arguments = _whole_args(fc)
                        self._done.append(call)
                        refs.append((ci, pi, call, _WHOLE, cidx))
                elif cur is not None:
                    if fc.partialArgs:
                        cur.frags.extend(fc.partialArgs)
                    refs.append((ci, pi, cur.call, _CONT, cidx))
                    if not fc.willContinue:
                        self._done.append(cur.finish())
                        del self._open[cidx]
            if cand.finishReason and cidx in self._open:
                self._done.append(self._open.pop(cidx).finish())
        return refs, strict and bool(refs) and all(r[3] == _CONT for r in refs)

    def _flush_done(self) -> None:
        if self._done:
            self.calls.extend(self._done)
            self.pending.extend(self._done)
            self._done = []

    # -- verdicts -------------------------------------------------------------------
    def on_verdicts(self, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
        group, self._group = self._group, None
        if not group:
            return b""
        # which candidate keeps a call after each position (for moving thoughtSignatures)
        firsts = [(gi, r) for gi, (_, refs, _) in enumerate(group) for r in (refs or ()) if r[3] != _CONT]
        any_lost = False
        for _, r in firsts:
            cidx = r[4]
            if r[2].verdict is None or r[2].verdict.outcome == ALLOW:
                self._kept[cidx] = self._kept.get(cidx, 0) + 1
            else:
                self._lost[cidx] = self._lost.get(cidx, 0) + 1
                any_lost = True
        self._slowpath = bool(self._open or self._lost)
        if not any_lost and not self._carry:
            return b"".join(ev.raw for ev, _, _ in group)
        out = []
        moving: dict[int, str] = {}  # candidate -> signature waiting for the next kept call
        for gi, (ev, refs, pure) in enumerate(group):
            if not refs:
                out.append(self._fix_finish(ev))
                continue
            if pure and all(r[2].verdict is not None and r[2].verdict.outcome != ALLOW for r in refs):
                dropped = self._drop(ev)  # a continuation of denied calls only: no decoding
                if dropped is not None:
                    out.append(dropped)
                    continue
            touch = False
            for r in refs:
                v = r[2].verdict
                if (v is not None and v.outcome != ALLOW) or (r[3] != _CONT and (self._carry or moving)):
                    touch = True
                    break
            if not touch:
                out.append(self._fix_finish(ev) if b'"finishMessage"' in ev.raw else ev.raw)
                continue
            try:
                doc = _decode_any(self._data(ev))
                cands = doc["candidates"]
            except (msgspec.DecodeError, KeyError, TypeError):
                out.append(ev.raw)
                continue
            drop: list[tuple[int, int]] = []
            changed = False
            for ci, pi, call, role, cidx in refs:
                try:
                    part = cands[ci]["content"]["parts"][pi]
                except (KeyError, IndexError, TypeError):
                    continue
                v = call.verdict
                if v is None or v.outcome == ALLOW:
                    if role == _CONT:
                        continue
                    sig = moving.pop(cidx, None) or self._carry.pop(cidx, None)
                    if sig is not None and "thoughtSignature" not in part:
                        part["thoughtSignature"] = sig
                        changed = True
                    self._carry.pop(cidx, None)
                    continue
                changed = True
                if role == _CONT:
                    drop.append((ci, pi))
                    continue
                text: dict = {"text": v.text(call.name)}
                sig = part.get("thoughtSignature")
                if sig is not None:
                    later = any(k > gi or (k == gi and rr[1] > pi and rr[0] == ci)
                                for k, rr in firsts
                                if rr[4] == cidx and (rr[2].verdict is None or rr[2].verdict.outcome == ALLOW))
                    if later:
                        moving[cidx] = sig
                    else:
                        text["thoughtSignature"] = sig
                        self._carry[cidx] = sig
                cands[ci]["content"]["parts"][pi] = text
            for ci, pi in sorted(drop, reverse=True):
                del cands[ci]["content"]["parts"][pi]
            if self._fix_finish_doc(cands):
                changed = True
            if not changed:
                out.append(ev.raw)
                continue
            empty = set(doc) <= _ENVELOPE and all(
                isinstance(c, dict) and set(c) <= {"content", "index"}
                and not (c.get("content") or {}).get("parts") for c in cands)
            out.append(self._replace(ev, None if empty else doc))
        return b"".join(out)

    def _fix_finish_doc(self, cands) -> bool:
        changed = False
        for c in cands:
            if not isinstance(c, dict) or "finishMessage" not in c:
                continue
            cidx = c.get("index", 0)
            fm = c["finishMessage"]
            if self._lost.get(cidx) and not self._kept.get(cidx) and isinstance(fm, str) \
                    and "function call" in fm.lower():
                del c["finishMessage"]
                changed = True
        return changed

    def _fix_finish(self, ev) -> bytes:
        raw = ev.raw
        if b'"finishMessage"' not in raw or not self._lost:
            return raw
        try:
            doc = _decode_any(self._data(ev))
            cands = doc["candidates"]
        except (msgspec.DecodeError, KeyError, TypeError):
            return raw
        if not self._fix_finish_doc(cands):
            return raw
        return self._replace(ev, doc)

    # -- end of stream --------------------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        if self._broken:
            return b""
        try:
            out = super().feed(chunk)
        except CodecError as e:
            return self._break(f"sidegate: malformed upstream stream: {e}")
        if not self._primed:
            self._primed = self.decoder.offset > 0
        return out

    def close(self) -> bytes:
        if self._broken:
            return b""
        try:
            return super().close()
        except CodecError as e:
            return self._break(f"sidegate: malformed upstream stream: {e}")

    def on_close(self) -> bytes:
        for cidx in list(self._open):
            self._done.append(self._open.pop(cidx).finish())
        self._flush_done()
        if self._group and not self.pending:
            group, self._group = self._group, None
            return b"".join(ev.raw for ev, _, _ in group)
        return b""

    def error(self, message: str) -> bytes:
        frame = self._error_frame_for(message)
        self._group = None
        self._open.clear()
        self._done = []
        self.pending = []
        self._queue.clear()
        return frame

    def _error_frame_for(self, message: str) -> bytes:
        return self._error_frame(message)

    def _break(self, message: str) -> bytes:
        self._broken = True
        self._slowpath = True  # no fast path either: nothing more goes out
        return self.error(message)


class _SSEGovernor(Governor):
    __slots__ = ("_tail",)

    def feed(self, chunk: bytes) -> bytes:
        """Whole events are cut here (as the plain SSE framer does); only when an event in
        them can carry a call (or a call is open or held) do they go through the decoder
        and `on_event`. Otherwise they go out as they came, the chunk itself when it ends
        on an event boundary."""
        if self._broken:
            return b""
        tail = self._tail
        if tail:
            old = len(tail)
            tail += chunk
            # a big event arriving in small pieces: look for its end in the new bytes only
            if old > 65536 and _BLOCK_END.search(tail, old - 3) is None:
                return b""
            buf = bytes(tail)
            tail.clear()
        else:
            if chunk.endswith(_BLOCK_ENDS) and self._primed and not self._slowpath and not self._queue \
                    and not self.pending and not has(chunk, _CALL) and (b"\\" not in chunk or not has(chunk, ESCAPED)):
                return chunk
            buf = chunk if type(chunk) is bytes else bytes(chunk)
        end = last_event_end(buf)
        if end < len(buf):
            tail += buf[end:]
            if not end:
                return b""
            buf = buf[:end]
        if not self._slowpath and not self._queue and not self.pending:
            p = first_hint(buf, _CALL)
            if p < 0 and self._primed:
                return buf
            # The whole events before the first that may carry a call go out as one piece,
            # as `on_event` would pass each of them; the decoder only counts their bytes
            # (the stream's first event among them). A whole stream in one chunk then costs
            # one search, not a decode of every event.
            out = self._pass_sse_events(buf, p, Governor.feed)
            if out is not None:
                self._primed = True
                return out
        return Governor.feed(self, buf)

    def close(self) -> bytes:
        if self._tail and not self._broken:  # a last event without its blank line
            rest = bytes(self._tail)
            self._tail.clear()
            out = Governor.feed(self, rest)
            return out + Governor.close(self)
        return Governor.close(self)

    def error(self, message: str) -> bytes:
        self._tail.clear()
        return Governor.error(self, message)

    def __init__(self, path: str, content_type: str, enforce: bool) -> None:
        self._setup(SSEDecoder(), enforce, sse_error)
        self._tail = bytearray()  # bytes of a partial event

    def _data(self, ev) -> bytes:
        return ev.data

    def _drop(self, ev) -> bytes | None:
        return b""

    def _replace(self, ev, obj) -> bytes:
        if obj is None:
            return b""
        raw = ev.raw
        data = ev.data
        new = _encode(obj)
        i = raw.find(data) if data else -1
        if i >= 0 and b"\n" not in data:
            return raw[:i] + new + raw[i + len(data):]
        end = b"\r\n" if raw.endswith(b"\r\n\r\n") else (b"\r" if raw.endswith(b"\r\r") else b"\n")
        return encode_event(new, line_end=end)


class _ArrayGovernor(Governor):
    __slots__ = ()

    def __init__(self, path: str, content_type: str, enforce: bool) -> None:
        self._setup(JSONArrayStreamDecoder(), enforce, None)

    def _data(self, ev) -> bytes:
        return ev.obj

    def _drop(self, ev) -> bytes | None:
        # a later element goes with its ",": dropping it keeps the array valid
        return None if b"[" in ev.raw[:len(ev.raw) - len(ev.obj)] else b""

    def _replace(self, ev, obj) -> bytes:
        if obj is None:
            if b"[" not in ev.raw[:len(ev.raw) - len(ev.obj)]:
                return b""
            obj = _decode_any(ev.obj)
            for c in obj.get("candidates") or ():
                if isinstance(c, dict) and isinstance(c.get("content"), dict):
                    c["content"]["parts"] = []
        return ev.replace_obj(_encode(obj))

    def _error_frame_for(self, message: str) -> bytes:
        err = _error_json(message)
        # Was the "[" sent? It is in the first element's raw, unless that one is held.
        held_first = bool(self._group) and self._group[0][0].raw.lstrip(b" \t\r\n")[:1] == b"["
        opened = self.decoder.offset > 0 and not held_first
        if self.decoder.done and not self._group:
            return b""  # the array is complete: nothing can follow it
        return (b",\r\n" + err + b"]") if opened else (b"[" + err + b"]")


# -- non-streaming generateContent -----------------------------------------------------

def _snake_call(data: bytes) -> bool:
    """Whether a part of the response names a call `function_call`. The views above read
    only functionCall (what Gemini and Vertex send); the SDK reads either, so such a part
    is refused rather than passed undecided."""
    if not may_call(data, b"function_call"):
        return False
    try:
        doc = _decode_any(data)
    except msgspec.DecodeError:
        return False
    for cand in (doc.get("candidates") or ()) if isinstance(doc, dict) else ():
        content = cand.get("content") if isinstance(cand, dict) else None
        for part in (content.get("parts") or ()) if isinstance(content, dict) else ():
            if isinstance(part, dict) and "function_call" in part:
                return True
    return False


def extract(path: str, body: bytes) -> list[ToolCall]:
    if not may_call(body, _CALL):
        return []
    if _snake_call(body):
        raise ValueError("a function call spelled function_call, which is not governed")
    try:
        resp = _decode_response(body)
    except msgspec.DecodeError:
        return []
    calls = []
    for cand in resp.candidates or ():
        parts = cand.content.parts if cand.content is not None else None
        for pi, part in enumerate(parts or ()):
            fc = part.functionCall
            if fc is None or not fc.name:
                continue
            if fc.partialArgs:
                rec = _Partial(ToolCall(fc.name, "", fc.id, pi))
                rec.frags.extend(fc.partialArgs)
                calls.append(rec.finish())
            else:
                calls.append(ToolCall(fc.name, _whole_args(fc), fc.id, pi))
    return calls


def rewrite(path: str, body: bytes, calls: list[ToolCall], verdicts: list[Verdict]) -> bytes:
    """Denied / escalated functionCall parts become `{"text": marker}` parts (verdicts in
    the order `extract` returned the calls)."""
    try:
        doc = _decode_any(body)
        cands = doc["candidates"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return body
    vit = iter(verdicts)
    for c in cands or ():
        if not isinstance(c, dict) or not isinstance(c.get("content"), dict):
            continue
        parts = c["content"].get("parts")
        if not isinstance(parts, list):
            continue
        slots = [(pi, p) for pi, p in enumerate(parts)
                 if isinstance(p, dict) and isinstance(p.get("functionCall"), dict) and p["functionCall"].get("name")]
        marks = [(pi, p, next(vit, None)) for pi, p in slots]
        kept = [pi for pi, _, v in marks if v is None or v.outcome == ALLOW]
        lost = False
        moving = None
        for pi, p, v in marks:
            if v is None or v.outcome == ALLOW:
                if moving is not None and "thoughtSignature" not in p:
                    p["thoughtSignature"] = moving
                moving = None
                continue
            lost = True
            text: dict = {"text": v.text(p["functionCall"].get("name", ""))}
            sig = p.get("thoughtSignature")
            if sig is not None:
                if any(k > pi for k in kept):
                    moving = sig
                else:
                    text["thoughtSignature"] = sig
            parts[pi] = text
        fm = c.get("finishMessage")
        if lost and not kept and isinstance(fm, str) and "function call" in fm.lower():
            del c["finishMessage"]
    return _encode(doc)

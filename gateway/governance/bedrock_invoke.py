"""Tool-call governance for Bedrock InvokeModel / InvokeModelWithResponseStream (Claude).

Streaming (`.../invoke-with-response-stream`, application/vnd.amazon.eventstream): each
`chunk` frame's payload is `{"bytes": "<base64 of one Anthropic event JSON>"}` (real
Bedrock adds a `"p"` padding field). The Anthropic block logic (anthropic.py) runs on the
decoded inner events. Untouched frames go out byte for byte; a rewritten event is
re-base64'd into a new frame with the original frame's headers (encode_message computes
both CRCs). Bodies of other model families (inner JSON without an Anthropic `type`) are
never changed.

Cheap test: the base64 text of `"tool_use"` is one of three fixed strings depending on
its alignment, so a frame is only decoded (JSON + base64) when its payload contains one
of them -- or a backslash, in case a JSON encoder escaped the `/` of the base64 text.

Non-streaming (`.../invoke`): the body is an Anthropic Messages `message`: the Anthropic
extract / rewrite apply as they are.
"""

from __future__ import annotations

import base64
import binascii
import re

import msgspec
from sidegate_codecs.eventstream import EventStreamDecoder, encode_message

from ..bytesearch import has
from ..dialects.bedrock import exception_frame
from .anthropic import (
    NEEDLE,
    AnthropicEventGovernor,
    extract,
    rewrite,
    stop_to_end_turn,
)
from .base import EventGovernor, may_call

__all__ = ["Governor", "extract", "rewrite"]


def _b64_needles(s: bytes) -> tuple[bytes, ...]:
    """Base64 text that every occurrence of `s` in the encoded bytes must contain, one per
    alignment (the whole 3-byte groups of `s`, whose encoding does not depend on context)."""
    out = []
    for k in range(3):
        g = (len(s) - k) // 3
        out.append(base64.b64encode(s[k:k + 3 * g]))
    return tuple(out)


_N0, _N1, _N2 = _b64_needles(NEEDLE)
# An escaped ASCII character (`\u00XX`, XX < 80) in the base64 of the event, at each alignment: `\u0`,
# `u00`, or `00` and the first hex digit (see base.ESCAPED).
_ESC = (base64.b64encode(b"\\u0"), base64.b64encode(b"u00")) + tuple(base64.b64encode(b"00" + bytes([d])) for d in b"01234567")
# The last eight share their first three characters: one search for those, and the pattern
# only where they occur (each search of base64 text costs ~0.5 ns a byte; ten of them, ~5).
_ESC0, _ESC1, _ESC00 = _ESC[0], _ESC[1], _ESC[2][:3]
assert all(e.startswith(_ESC00) for e in _ESC[2:])
_ESC00_ANY = re.compile(re.escape(_ESC00) + b"[" + bytes(e[3] for e in _ESC[2:]) + b"]")


def _escaped(b64: bytes) -> bool:
    """Whether any of `_ESC` is in `b64`."""
    return has(b64, _ESC0) or has(b64, _ESC1) or (has(b64, _ESC00) and _ESC00_ANY.search(b64) is not None)


class _Chunk(msgspec.Struct):
    b64: str = msgspec.field(name="bytes", default="")


_chunk_dec = msgspec.json.Decoder(_Chunk)


def _inner(ev) -> bytes | None:
    """The Anthropic event JSON inside a `chunk` frame, or None."""
    if ev.headers.get(":event-type") != "chunk":
        return None
    try:
        return binascii.a2b_base64(_chunk_dec.decode(ev.payload).b64, strict_mode=True)
    except (msgspec.DecodeError, binascii.Error, ValueError):
        return None


class Governor(AnthropicEventGovernor):
    __slots__ = ()

    def __init__(self, path: str = "", content_type: str = "application/vnd.amazon.eventstream",
                 enforce: bool = True) -> None:
        super().__init__(EventStreamDecoder(), enforce, exception_frame)

    def feed(self, chunk: bytes) -> bytes:
        # Fast path: outside a tool block, whole valid frames none of whose bytes hold a
        # needle are what `on_event` would pass frame by frame; the decoder checks them
        # (lengths, CRCs, known header blocks) and counts their bytes without building them.
        if self._open is None and not has(chunk, _N0) and not has(chunk, _N1) and not has(chunk, _N2) \
                and b"\\" not in chunk and not _escaped(chunk) and not self._queue and not self.pending \
                and not self._closed and not self._dead and self.decoder.skip(chunk):
            return chunk
        return EventGovernor.feed(self, chunk)

    def on_event(self, ev) -> bytes:
        if self._open is None:
            p = ev.payload
            if _N0 not in p and _N1 not in p and _N2 not in p and b"\\" not in p and not _escaped(p):
                return ev.raw
            inner = _inner(ev)
            if inner is None or not may_call(inner, NEEDLE):
                return ev.raw
            return self._outside(ev, inner)
        return self._inside(ev, _inner(ev))

    def _frame(self, name: bytes, inner: bytes, like) -> bytes:
        headers = like.headers
        for v in headers.values():
            if type(v) is not str:  # keep exact wire types (int8 vs int32, ...)
                headers = like.typed_headers
                break
        # (a dict of strings is encoded in wire order, and encode_headers caches it)
        return encode_message(headers, b'{"bytes":"' + binascii.b2a_base64(inner, newline=False) + b'"}')

    def _restop(self, ev, inner: bytes) -> bytes:
        return self._frame(b"message_delta", stop_to_end_turn(inner), ev)

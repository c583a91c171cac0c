"""Incremental, I/O-free splitters for streamed JSON bodies.

* :class:`JSONArrayStreamDecoder` -- one JSON array written incrementally
  (Gemini / Vertex ``streamGenerateContent`` without ``alt=sse``):
  ``[`` element ``,`` element ... ``]`` with any JSON whitespace around.
* :class:`NDJSONDecoder` -- one JSON value per line.

No JSON parsing happens: elements are cut out by tracking strings, escapes
and bracket nesting with C-level regular expressions (possessive, so linear
time) and ``bytes.find``.  Only the framing is validated: the array's own
brackets and commas, that each element starts with ``{`` or ``[`` and ends
with the matching bracket.  Whether the inside of an element is valid JSON
is the consumer's business (mismatched bracket *types* inside an element are
not detected; nesting depth is).

Every chunk's ``raw`` carries the exact bytes attributed to it, so
``b"".join(c.raw for c in chunks)`` reproduces the input exactly:

* an element chunk's ``raw`` is everything since the previous chunk (the
  ``[`` or ``,`` and whitespace before the element) plus the element itself;
  ``obj`` is the element alone and always ends ``raw``;
* the closing chunk's ``raw`` is the whitespace plus ``]``; ``obj == b""``
  and ``end`` is True;
* whitespace after the ``]`` is held and returned by ``close()`` as one
  chunk with ``obj == b""`` (so chunking never depends on how the input was
  split into feeds).

Errors (``MalformedFrame`` for framing, ``EventTooLarge`` when one chunk or
the buffered part of one exceeds ``max_object_size``) name the stream offset
of the offending byte.  Errors are sticky: the decoder stays failed, every
later ``feed()``/``close()`` re-raises, and the bytes from the start of the
unfinished chunk on are never returned (``err.offset`` and the decoder's
``offset`` say where delivery stopped).  ``close()`` on a stream that was
fed something but is not complete (no final ``]``) raises ``MalformedFrame``.
"""

from __future__ import annotations

import re

from .errors import CodecError, EventTooLarge, MalformedFrame

__all__ = [
    "JSONChunk",
    "JSONArrayStreamDecoder",
    "NDJSONDecoder",
    "encode_array_item",
    "encode_array_start",
    "encode_array_end",
    "encode_ndjson_line",
]

_NS = rb'[^"{}\[\]]'
# Non-structural bytes and complete strings, as an "unrolled loop":
# normal* ("string" normal*)*, possessive so the match is linear time.
_FLAT = _NS + rb'*+(?:"[^"\\]*+(?:\\.[^"\\]*+)*+"' + _NS + rb"*+)*+"


def _body(k: int) -> bytes:
    """Regex for the inside of a container: non-structural bytes, complete
    strings and complete containers nested up to ``k`` levels."""
    if k == 0:
        return _FLAT
    return _FLAT + rb"(?:[{\[]" + _body(k - 1) + rb"[}\]]" + _FLAT + rb")*+"


_DEPTH = 20
_BODY = re.compile(_body(_DEPTH), re.S)
_ELEM_RX = rb"[{\[]" + _body(_DEPTH) + rb"[}\]]"
_ELEM = re.compile(_ELEM_RX, re.S)
# fast path after an element: separator, then a complete next element
_SEP_ELEM = re.compile(rb"[ \t\r\n]*+,[ \t\r\n]*+" + _ELEM_RX, re.S)
_STR_TAIL = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.S)
_WS = re.compile(rb"[ \t\r\n]*+")
_WS_BYTES = b" \t\r\n"
_CLOSE_OF = {123: 125, 91: 93}

# parser states
_START, _FIRST, _SEP, _NEXT, _ELEMENT, _DONE = range(6)


class JSONChunk:
    """A piece of a JSON stream: ``raw`` (exact bytes), ``obj`` (the element's
    own bytes, ``b""`` for a closing ``]`` / whitespace / blank line)."""

    __slots__ = ("raw", "obj", "_ostart")

    def __init__(self, raw: bytes, obj: bytes = b"", ostart: int = -1):
        self.raw = raw
        self.obj = obj
        self._ostart = ostart if ostart >= 0 else len(raw) - len(obj)

    @property
    def end(self) -> bool:
        """True for a chunk that carries no element (``]``, whitespace, blank line)."""
        return not self.obj

    def replace_obj(self, new_obj: bytes) -> bytes:
        """``raw`` with ``obj`` replaced by ``new_obj`` (separators kept)."""
        raw = self.raw
        s = self._ostart
        return raw[:s] + new_obj + raw[s + len(self.obj):]

    def __repr__(self) -> str:
        return f"JSONChunk(raw={self.raw!r}, obj={self.obj!r})"


class JSONArrayStreamDecoder:
    """Incremental splitter of one streamed JSON array into its elements."""

    __slots__ = ("max_object_size", "_buf", "_base", "_state", "_pos", "_ostart", "_depth", "_in_str",
                 "_open", "_error", "_closed", "_fed")

    def __init__(self, max_object_size: int = 16 * 1024 * 1024):
        self.max_object_size = max_object_size
        self._buf = bytearray()  # unreturned bytes; _buf[0] starts the current chunk
        self._base = 0  # stream offset of _buf[0]
        self._state = _START
        self._pos = 0  # scan position in _buf
        self._ostart = 0  # start of the element being scanned, in _buf
        self._depth = 0
        self._in_str = False
        self._open = 0
        self._error: CodecError | None = None
        self._closed = False
        self._fed = False

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet returned in a chunk."""
        return self._base

    @property
    def buffered(self) -> int:
        """Bytes held back: the part of an element (or the tail) not yet returned."""
        return len(self._buf)

    @property
    def done(self) -> bool:
        """The closing ``]`` has been seen."""
        return self._state == _DONE

    def feed(self, data: bytes) -> list[JSONChunk]:
        if self._error is not None:
            raise self._error.again()
        if self._closed:
            raise CodecError("feed() after close()", self._base)
        if not data:
            return []
        self._fed = True
        buf = self._buf
        if buf:
            if len(buf) < 65536:  # small leftover: work on one bytes object
                b = bytes(buf) + data
                buf.clear()
            else:  # large unfinished element: append in place, never rescan
                buf += data
                b = buf
        else:
            b = data if type(data) is bytes else bytes(data)
        chunks: list[JSONChunk] = []
        n = len(b)
        cs = 0  # chunk start
        pos = self._pos
        state = self._state
        base = self._base
        maxsize = self.max_object_size
        ws = _WS.match
        sep_elem = _SEP_ELEM.match
        append = chunks.append
        isbytes = type(b) is bytes
        elem_failed = False
        try:
            while True:
                if state == _ELEMENT:
                    end = self._scan(b, pos, n)
                    if end < 0:
                        pos = self._pos
                        break
                    if b[end - 1] != _CLOSE_OF[self._open]:
                        raise MalformedFrame(
                            f"element opened with {chr(self._open)!r} closed with {chr(b[end - 1])!r}", base + end - 1)
                    if end - cs > maxsize:
                        raise EventTooLarge(
                            f"JSON element chunk of {end - cs} bytes exceeds max_object_size={maxsize}", base + cs)
                    os_ = self._ostart
                    chunks.append(JSONChunk(bytes(b[cs:end]), bytes(b[os_:end]), os_ - cs))
                    cs = pos = end
                    state = _SEP
                    continue
                pos = ws(b, pos).end()
                if state == _DONE:  # trailing whitespace is held until close()
                    if pos < n:
                        raise MalformedFrame(f"unexpected byte {bytes(b[pos:pos + 1])!r} after the closing ']'", base + pos)
                    break
                if pos >= n:
                    break
                c = b[pos]
                if state == _SEP:
                    if c == 44:  # ,
                        # fast path: consecutive complete ", {...}" pieces
                        m = sep_elem(b, pos)
                        while m is not None:
                            end = m.end()
                            os_ = ws(b, b.find(b",", pos) + 1).end()
                            if b[end - 1] != _CLOSE_OF[b[os_]]:
                                raise MalformedFrame(f"element opened with {chr(b[os_])!r} closed with "
                                                     f"{chr(b[end - 1])!r}", base + end - 1)
                            if end - cs > maxsize:
                                raise EventTooLarge(
                                    f"JSON element chunk of {end - cs} bytes exceeds max_object_size={maxsize}",
                                    base + cs)
                            if isbytes:
                                append(JSONChunk(b[cs:end], b[os_:end], os_ - cs))
                            else:
                                append(JSONChunk(bytes(b[cs:end]), bytes(b[os_:end]), os_ - cs))
                            cs = pos = end
                            m = sep_elem(b, pos)
                        pos = ws(b, pos).end()
                        if pos >= n:
                            break
                        if b[pos] != 44:
                            continue
                        state = _NEXT
                        pos += 1
                        elem_failed = True  # sep_elem just failed: _ELEM would fail too
                        continue
                    if c == 93:  # ]
                        pos += 1
                        chunks.append(JSONChunk(bytes(b[cs:pos])))
                        cs = pos
                        state = _DONE
                        continue
                    raise MalformedFrame(
                        f"expected ',' or ']' after an array element, got {bytes(b[pos:pos + 1])!r}", base + pos)
                if state == _START:
                    if c == 91:
                        state = _FIRST
                        pos += 1
                        continue
                    raise MalformedFrame(f"expected '[' to open the JSON array, got {bytes(b[pos:pos + 1])!r}",
                                         base + pos)
                # _FIRST or _NEXT: an element (or ']' right after '[')
                if c == 123 or c == 91:
                    if elem_failed:
                        m = None
                        elem_failed = False
                    else:
                        m = _ELEM.match(b, pos)
                    if m is not None:
                        end = m.end()
                        if b[end - 1] != _CLOSE_OF[c]:
                            raise MalformedFrame(
                                f"element opened with {chr(c)!r} closed with {chr(b[end - 1])!r}", base + end - 1)
                        if end - cs > maxsize:
                            raise EventTooLarge(
                                f"JSON element chunk of {end - cs} bytes exceeds max_object_size={maxsize}",
                                base + cs)
                        chunks.append(JSONChunk(bytes(b[cs:end]), bytes(b[pos:end]), pos - cs))
                        cs = pos = end
                        state = _SEP
                        continue
                    # incomplete (or nested deeper than the regex): resumable scan
                    self._ostart = pos
                    self._open = c
                    self._depth = 1
                    self._in_str = False
                    pos += 1
                    state = _ELEMENT
                    continue
                if c == 93 and state == _FIRST:  # empty array
                    pos += 1
                    chunks.append(JSONChunk(bytes(b[cs:pos])))
                    cs = pos
                    state = _DONE
                    continue
                if c == 93:
                    raise MalformedFrame("trailing ',' before ']'", base + pos)
                raise MalformedFrame(
                    f"expected '{{' or '[' to start an array element, got {bytes(b[pos:pos + 1])!r}", base + pos)
            if n - cs > maxsize:
                raise EventTooLarge(
                    f"JSON element exceeds max_object_size={maxsize} bytes ({n - cs} bytes buffered)", base + cs)
        except CodecError as err:
            err.events = chunks
            self._error = err
            self._finish(b, buf, cs, pos, state)
            raise
        self._finish(b, buf, cs, pos, state)
        return chunks

    def _finish(self, b, buf, cs, pos, state):
        if b is buf:
            if cs:
                del buf[:cs]
        elif cs < len(b):
            buf += b[cs:]
        self._base += cs
        self._pos = pos - cs
        self._ostart -= cs
        self._state = state

    def _scan(self, b, pos: int, n: int) -> int:
        """Resume scanning the element; end index, or -1 (state saved)."""
        depth = self._depth
        in_str = self._in_str
        body = _BODY.match
        while True:
            if in_str:
                e = _STR_TAIL.match(b, pos).end()
                if e >= n or b[e] != 34:  # unterminated string (maybe ends in a lone backslash)
                    pos = e
                    break
                pos = e + 1
                in_str = False
            pos = body(b, pos).end()
            if pos >= n:
                break
            c = b[pos]
            pos += 1
            if c == 34:
                in_str = True
            elif c == 123 or c == 91:
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return pos
        self._depth = depth
        self._in_str = in_str
        self._pos = pos
        return -1

    def close(self) -> list[JSONChunk]:
        """End of stream.  Raises ``MalformedFrame`` if the array is not complete."""
        if self._error is not None:
            raise self._error.again()
        if self._closed:
            return []
        self._closed = True
        if self._state == _DONE or not self._fed:
            if self._buf:
                raw = bytes(self._buf)
                self._buf.clear()
                self._base += len(raw)
                return [JSONChunk(raw)]
            return []
        what = "inside an array element" if self._state == _ELEMENT else "before the closing ']'"
        err = MalformedFrame(f"JSON array stream ended {what} ({len(self._buf)} bytes not delivered)", self._base)
        self._error = err
        raise err


class NDJSONDecoder:
    """Incremental newline-delimited JSON splitter: one chunk per line.

    ``raw`` is the line with its ``\\n``; ``obj`` is the line without
    surrounding whitespace (``b""`` for a blank line).  ``close()`` returns a
    last line that has no newline.  Only line framing and size are checked.
    """

    __slots__ = ("max_object_size", "_buf", "_base", "_error", "_closed")

    def __init__(self, max_object_size: int = 16 * 1024 * 1024):
        self.max_object_size = max_object_size
        self._buf = bytearray()
        self._base = 0
        self._error: CodecError | None = None
        self._closed = False

    @property
    def offset(self) -> int:
        return self._base

    def feed(self, data: bytes) -> list[JSONChunk]:
        if self._error is not None:
            raise self._error.again()
        if self._closed:
            raise CodecError("feed() after close()", self._base)
        buf = self._buf
        maxsize = self.max_object_size
        if buf:
            old = len(buf)
            buf += data
            if buf.find(b"\n", old) < 0:
                if len(buf) > maxsize:
                    self._fail(EventTooLarge(
                        f"NDJSON line exceeds max_object_size={maxsize} bytes ({len(buf)} bytes buffered)",
                        self._base), [])
                return []
            b = bytes(buf)
            buf.clear()
        else:
            b = data if type(data) is bytes else bytes(data)
        out: list[JSONChunk] = []
        pos = 0
        find = b.find
        while True:
            i = find(b"\n", pos)
            if i < 0:
                break
            end = i + 1
            if end - pos > maxsize:
                self._base += pos
                self._fail(EventTooLarge(
                    f"NDJSON line of {end - pos} bytes exceeds max_object_size={maxsize}", self._base), out)
            out.append(_line_chunk(b[pos:end]))
            pos = end
        if pos < len(b):
            if len(b) - pos > maxsize:
                self._base += pos
                self._fail(EventTooLarge(
                    f"NDJSON line exceeds max_object_size={maxsize} bytes ({len(b) - pos} bytes buffered)",
                    self._base), out)
            buf += b[pos:]
        self._base += pos
        return out

    def _fail(self, err: CodecError, events: list):
        err.events = events
        self._error = err
        raise err

    def close(self) -> list[JSONChunk]:
        if self._error is not None:
            raise self._error.again()
        if self._closed:
            return []
        self._closed = True
        if not self._buf:
            return []
        raw = bytes(self._buf)
        self._buf.clear()
        self._base += len(raw)
        return [_line_chunk(raw)]


def _line_chunk(raw: bytes) -> JSONChunk:
    lead = raw.lstrip(_WS_BYTES)
    obj = lead.rstrip(_WS_BYTES)
    return JSONChunk(raw, obj, len(raw) - len(lead))


# ---------------------------------------------------------------------------
# Encoders

def encode_array_start() -> bytes:
    return b"["


def encode_array_item(obj: bytes, first: bool, sep: bytes = b"") -> bytes:
    """One element with its leading separator: ``[obj`` for the first element,
    else ``,obj`` (``sep``, e.g. ``b"\\r\\n"``, goes between the comma and
    the element)."""
    return (b"[" if first else b"," + sep) + obj


def encode_array_end(empty: bool = False) -> bytes:
    """The closing bracket (``[]`` when no element was written)."""
    return b"[]" if empty else b"]"


def encode_ndjson_line(obj: bytes) -> bytes:
    if b"\n" in obj:
        raise ValueError("an NDJSON value must not contain a newline")
    return obj + b"\n"

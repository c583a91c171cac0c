"""Incremental, I/O-free AWS ``application/vnd.amazon.eventstream`` codec.

Frame layout (all integers big-endian)::

    total_length:u32  headers_length:u32  prelude_crc:u32
    headers[headers_length]  payload[...]  message_crc:u32

``prelude_crc`` is the CRC32 of the first 8 bytes and ``message_crc`` the
CRC32 of everything before it.  A header is ``name_len:u8 name type:u8
value``; value types 0..9 are bool true, bool false, int8, int16, int32,
int64, bytes (u16 length), string (u16 length, UTF-8), timestamp (int64
milliseconds) and uuid (16 bytes).  Decoded header values are the same Python
values botocore's ``EventStreamBuffer`` produces (bool, int, bytes, str).

The decoder checks what botocore checks, in the same order (prelude CRC,
headers length <= 128 KiB, payload length <= 24 MiB, message CRC, duplicate
headers) and raises the botocore-named error classes from
:mod:`sidegate_codecs.errors`.  Unlike botocore it also rejects a frame whose
``total_length`` is too small to hold its headers, truncated or unknown-type
headers (:class:`InvalidHeaderValue`) and a partial frame left at ``close()``.
"""

from __future__ import annotations

import datetime as _dt
import uuid as _uuid
from struct import Struct
from typing import Any, Iterable, NamedTuple
from zlib import crc32

from .errors import (
    ChecksumMismatch,
    CodecError,
    DuplicateHeader,
    InvalidHeadersLength,
    InvalidHeaderValue,
    InvalidPayloadLength,
    MalformedFrame,
)

__all__ = [
    "EventStreamMessage",
    "EventStreamDecoder",
    "HeaderValue",
    "encode_message",
    "encode_headers",
    "decode_headers",
    "peek_headers",
    "BOOL_TRUE", "BOOL_FALSE", "BYTE", "SHORT", "INTEGER", "LONG", "BYTE_ARRAY", "STRING", "TIMESTAMP", "UUID",
]

BOOL_TRUE, BOOL_FALSE, BYTE, SHORT, INTEGER, LONG, BYTE_ARRAY, STRING, TIMESTAMP, UUID = range(10)

PRELUDE_LENGTH = 12
MIN_FRAME_LENGTH = 16
MAX_HEADERS_LENGTH = 128 * 1024  # botocore _MAX_HEADERS_LENGTH
MAX_PAYLOAD_LENGTH = 24 * 1024 * 1024  # botocore _MAX_PAYLOAD_LENGTH

_PRELUDE = Struct("!III")
_U32 = Struct("!I")
_U16 = Struct("!H")
_I8 = Struct("!b")
_I16 = Struct("!h")
_I32 = Struct("!i")
_I64 = Struct("!q")
_unpack_prelude = _PRELUDE.unpack_from
_unpack_u32 = _U32.unpack_from
_unpack_u16 = _U16.unpack_from


class HeaderValue(NamedTuple):
    """A header value with its explicit wire type (0..9), for exact encoding."""

    type: int
    value: Any


class EventStreamMessage:
    """One decoded frame: ``raw`` (the whole frame), ``headers`` (dict) and
    ``payload`` (bytes)."""

    __slots__ = ("raw", "headers", "payload")

    def __init__(self, raw: bytes, headers: dict, payload: bytes):
        self.raw = raw
        self.headers = headers
        self.payload = payload

    @property
    def event_type(self) -> str | None:
        return self.headers.get(":event-type")

    @property
    def message_type(self) -> str | None:
        return self.headers.get(":message-type")

    @property
    def typed_headers(self) -> list[tuple[str, HeaderValue]]:
        """Headers in wire order with wire types: ``encode_message(m.typed_headers,
        m.payload) == m.raw``."""
        (hlen,) = _unpack_u32(self.raw, 4)
        return _parse_headers(self.raw[12:12 + hlen], 12, typed=True)

    def __repr__(self) -> str:
        return f"EventStreamMessage(headers={self.headers!r}, payload={self.payload!r})"


def _parse_headers(hb: bytes, base: int = 0, typed: bool = False):
    """Parse a header block.  ``base`` is the stream offset of ``hb[0]``."""
    out: Any = [] if typed else {}
    n = len(hb)
    i = 0
    try:
        while i < n:
            start = i
            nlen = hb[i]
            i += 1
            name_b = hb[i:i + nlen]
            i += nlen
            t = hb[i]  # IndexError if truncated
            i += 1
            name = name_b.decode("utf-8")
            if len(name_b) != nlen:
                raise IndexError
            if t == 7:
                (vlen,) = _unpack_u16(hb, i)
                i += 2
                vb = hb[i:i + vlen]
                if len(vb) != vlen:
                    raise IndexError
                i += vlen
                value = vb.decode("utf-8")
            elif t == 0:
                value = True
            elif t == 1:
                value = False
            elif t == 6:
                (vlen,) = _unpack_u16(hb, i)
                i += 2
                value = hb[i:i + vlen]
                if len(value) != vlen:
                    raise IndexError
                i += vlen
            elif t == 4:
                (value,) = _I32.unpack_from(hb, i)
                i += 4
            elif t == 5 or t == 8:
                (value,) = _I64.unpack_from(hb, i)
                i += 8
            elif t == 2:
                (value,) = _I8.unpack_from(hb, i)
                i += 1
            elif t == 3:
                (value,) = _I16.unpack_from(hb, i)
                i += 2
            elif t == 9:
                value = hb[i:i + 16]
                if len(value) != 16:
                    raise IndexError
                i += 16
            else:
                raise InvalidHeaderValue(f"header {name!r} has unknown value type {t}", base + i - 1)
            if typed:
                out.append((name, HeaderValue(t, value)))
            else:
                if name in out:
                    raise DuplicateHeader(f"Duplicate header present: {name!r}", base + start)
                out[name] = value
    except Exception as exc:  # struct.error, IndexError, UnicodeDecodeError
        if isinstance(exc, CodecError):
            raise
        if isinstance(exc, UnicodeDecodeError):
            raise InvalidHeaderValue(f"header name or string value is not valid UTF-8: {exc}", base + start) from None
        raise InvalidHeaderValue("header block is truncated", base + start) from None
    return out


_HEADER_CACHE: dict[bytes, dict] = {}
_HEADER_CACHE_MAX = 512


def decode_headers(header_block: bytes) -> dict:
    """Parse a header block (the bytes between prelude and payload)."""
    cached = _HEADER_CACHE.get(header_block)
    if cached is not None:
        return cached.copy()
    headers = _parse_headers(header_block)
    if len(header_block) <= 1024:
        if len(_HEADER_CACHE) >= _HEADER_CACHE_MAX:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[header_block] = headers.copy()
    return headers


def peek_headers(raw: bytes) -> dict:
    """Headers of one complete, already validated frame ``raw`` (no CRC
    check; header blocks are cached, so repeated event types are cheap)."""
    (hlen,) = _unpack_u32(raw, 4)
    return decode_headers(raw[12:12 + hlen])


class EventStreamDecoder:
    """Incremental decoder: ``feed(bytes) -> list[EventStreamMessage]``.

    ``close()`` raises :class:`MalformedFrame` if a partial frame is left
    over.  Errors are sticky (see :mod:`sidegate_codecs.errors`).
    """

    __slots__ = ("max_headers", "max_payload", "_buf", "_need", "_base", "_error", "_closed")

    def __init__(self, max_headers: int = MAX_HEADERS_LENGTH, max_payload: int = MAX_PAYLOAD_LENGTH):
        self.max_headers = max_headers
        self.max_payload = max_payload
        self._buf = bytearray()
        self._need = PRELUDE_LENGTH  # bytes needed in _buf before parsing again
        self._base = 0  # stream offset of _buf[0]
        self._error: CodecError | None = None
        self._closed = False

    @property
    def offset(self) -> int:
        return self._base

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[EventStreamMessage]:
        if self._error is not None:
            raise self._error.again()
        if self._closed:
            raise CodecError("feed() after close()", self._base)
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            b = bytes(buf)
            buf.clear()
        else:
            b = data if type(data) is bytes else bytes(data)
        events: list[EventStreamMessage] = []
        n = len(b)
        pos = 0
        append = events.append
        max_headers = self.max_headers
        max_payload = self.max_payload
        cache = _HEADER_CACHE
        try:
            while n - pos >= 12:
                total, hlen, pcrc = _unpack_prelude(b, pos)
                if crc32(b[pos:pos + 8]) != pcrc:
                    raise ChecksumMismatch(
                        f"Checksum mismatch: expected 0x{pcrc:08x}, calculated 0x{crc32(b[pos:pos + 8]):08x} (prelude)",
                        self._base + pos)
                if hlen > max_headers:
                    raise InvalidHeadersLength(
                        f"Header length of {hlen} exceeded the maximum of {max_headers}", self._base + pos)
                plen = total - hlen - 16
                if plen > max_payload:
                    raise InvalidPayloadLength(
                        f"Payload length of {plen} exceeded the maximum of {max_payload}", self._base + pos)
                if plen < 0:
                    raise MalformedFrame(
                        f"total_length {total} is too small for headers_length {hlen}", self._base + pos)
                end = pos + total
                if end > n:
                    self._need = total
                    break
                frame = b[pos:end] if (pos or end != n) else b
                (mcrc,) = _unpack_u32(frame, total - 4)
                calc = crc32(frame[8:total - 4], pcrc)
                if calc != mcrc:
                    raise ChecksumMismatch(
                        f"Checksum mismatch: expected 0x{mcrc:08x}, calculated 0x{calc:08x} (message)",
                        self._base + pos)
                hb = frame[12:12 + hlen]
                headers = cache.get(hb)
                if headers is None:
                    headers = decode_headers_at(hb, self._base + pos + 12)
                else:
                    headers = headers.copy()
                append(EventStreamMessage(frame, headers, frame[12 + hlen:total - 4]))
                pos = end
            else:
                self._need = PRELUDE_LENGTH
            if pos < n:
                buf += b[pos:] if pos else b
            self._base += pos
            return events
        except CodecError as err:
            self._base += pos
            err.events = events
            self._error = err
            raise

    def skip(self, data: bytes) -> bool:
        """Fast path for a caller that relays whole frames it need not look at.

        When nothing is buffered and ``data`` is whole frames that ``feed()``
        would decode without error (lengths and both CRCs checked, each header
        block one a decoder has already parsed), they are counted as decoded
        (``offset`` moves on) without being built, and True is returned.
        Otherwise nothing is consumed and False is returned (``feed()`` it).
        """
        if self._buf or self._error is not None or self._closed or type(data) is not bytes:
            return False
        n = len(data)
        pos = 0
        cache = _HEADER_CACHE
        while pos < n:
            if n - pos < PRELUDE_LENGTH:
                return False
            total, hlen, pcrc = _unpack_prelude(data, pos)
            end = pos + total
            if end > n or hlen > self.max_headers or total - hlen - 16 > self.max_payload or total < hlen + 16:
                return False
            if crc32(data[pos:pos + 8]) != pcrc or crc32(data[pos + 8:end - 4], pcrc) != _unpack_u32(data, end - 4)[0]:
                return False
            if data[pos + 12:pos + 12 + hlen] not in cache:
                return False
            pos = end
        self._base += n
        return True

    def close(self) -> list[EventStreamMessage]:
        """End of stream; raises :class:`MalformedFrame` if bytes of an
        unfinished frame are left over."""
        if self._error is not None:
            raise self._error.again()
        self._closed = True
        if self._buf:
            left = len(self._buf)
            detail = f"need {self._need} bytes" if left >= PRELUDE_LENGTH else "prelude incomplete"
            err = MalformedFrame(f"stream ended inside a frame ({left} bytes left over, {detail})", self._base)
            self._error = err
            raise err
        return []


def decode_headers_at(hb: bytes, base: int) -> dict:
    headers = _parse_headers(hb, base)
    if len(hb) <= 1024:
        if len(_HEADER_CACHE) >= _HEADER_CACHE_MAX:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[hb] = headers.copy()
    return headers


# ---------------------------------------------------------------------------
# Encoding

def _encode_value(name: str, value: Any) -> bytes:
    if type(value) is str:
        vb = value.encode("utf-8")
        return b"\x07" + _U16.pack(len(vb)) + vb
    if isinstance(value, HeaderValue) or (type(value) is tuple and len(value) == 2 and type(value[0]) is int):
        t, v = value
    elif value is True:
        return b"\x00"
    elif value is False:
        return b"\x01"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        t, v = BYTE_ARRAY, value
    elif isinstance(value, int):
        t, v = (INTEGER if -(2 ** 31) <= value < 2 ** 31 else LONG), value
    elif isinstance(value, _uuid.UUID):
        t, v = UUID, value.bytes
    elif isinstance(value, _dt.datetime):
        t, v = TIMESTAMP, int(value.timestamp() * 1000)
    else:
        raise TypeError(f"cannot encode header {name!r} value of type {type(value).__name__}")
    if t == 0:
        return b"\x00"
    if t == 1:
        return b"\x01"
    if t == 2:
        return b"\x02" + _I8.pack(v)
    if t == 3:
        return b"\x03" + _I16.pack(v)
    if t == 4:
        return b"\x04" + _I32.pack(v)
    if t == 5 or t == 8:
        if isinstance(v, _dt.datetime):
            v = int(v.timestamp() * 1000)
        return bytes((t,)) + _I64.pack(v)
    if t == 6 or t == 7:
        vb = v.encode("utf-8") if type(v) is str else bytes(v)
        if len(vb) > 0xFFFF:
            raise ValueError(f"header {name!r} value longer than 65535 bytes")
        return bytes((t,)) + _U16.pack(len(vb)) + vb
    if t == 9:
        vb = v.bytes if isinstance(v, _uuid.UUID) else bytes(v)
        if len(vb) != 16:
            raise ValueError(f"uuid header {name!r} must be 16 bytes")
        return b"\x09" + vb
    raise ValueError(f"unknown header type {t} for {name!r}")


_ENC_CACHE: dict = {}


def encode_headers(headers: dict | Iterable[tuple[str, Any]]) -> bytes:
    """Encode headers (dict or iterable of ``(name, value)``).  Plain values:
    str -> string (7), bool -> 0/1, bytes -> byte array (6), int -> int32 (4)
    or int64 (5) if it does not fit, uuid.UUID -> 9, datetime -> timestamp
    (8).  Use ``HeaderValue(type, value)`` (or a ``(type, value)`` tuple) for
    an explicit type."""
    if isinstance(headers, dict):
        items = headers.items()
        key = None
        for v in headers.values():
            if type(v) is not str:
                break
        else:  # only plain strings: cacheable (True == 1 would collide otherwise)
            key = tuple(items)
            hit = _ENC_CACHE.get(key)
            if hit is not None:
                return hit
    else:
        items = headers
        key = None
    parts = []
    seen = set()
    for name, value in items:
        if name in seen:
            raise ValueError(f"duplicate header {name!r}")
        seen.add(name)
        nb = name.encode("utf-8")
        if len(nb) > 255:
            raise ValueError(f"header name {name!r} longer than 255 bytes")
        parts.append(bytes((len(nb),)) + nb + _encode_value(name, value))
    out = b"".join(parts)
    if key is not None and len(out) <= 1024:
        if len(_ENC_CACHE) >= 512:
            _ENC_CACHE.clear()
        _ENC_CACHE[key] = out
    return out


def encode_message(headers: dict | Iterable[tuple[str, Any]], payload: bytes) -> bytes:
    """Build one frame with correct prelude and message CRCs."""
    hb = encode_headers(headers)
    total = 16 + len(hb) + len(payload)
    p8 = _U32.pack(total) + _U32.pack(len(hb))
    pcrc = crc32(p8)
    body = p8 + _U32.pack(pcrc) + hb + payload
    return body + _U32.pack(crc32(body))

"""sidegate_codecs: pure, I/O-free incremental decoders/encoders (h11 style).

Feed bytes, get events; the caller owns the socket.  Every event keeps its
exact raw bytes (``raw``) so untouched events can be forwarded byte for byte.

* :mod:`.sse` -- ``text/event-stream``: :class:`SSEDecoder`, :class:`SSEEvent`, :func:`encode_event`
* :mod:`.eventstream` -- AWS ``application/vnd.amazon.eventstream``:
  :class:`EventStreamDecoder`, :class:`EventStreamMessage`, :func:`encode_message`, :func:`peek_headers`
* :mod:`.jsonstream` -- streamed JSON array (Gemini without ``alt=sse``) and NDJSON:
  :class:`JSONArrayStreamDecoder`, :class:`NDJSONDecoder`, :class:`JSONChunk`, ``encode_*`` helpers
* :mod:`.errors` -- :class:`CodecError` and its subclasses (sticky, carry ``offset`` and ``events``)
"""

from .errors import (
    ChecksumMismatch,
    CodecError,
    DuplicateHeader,
    EventTooLarge,
    InvalidHeadersLength,
    InvalidHeaderValue,
    InvalidPayloadLength,
    MalformedFrame,
)
from .eventstream import EventStreamDecoder, EventStreamMessage, HeaderValue, encode_message, peek_headers
from .jsonstream import (
    JSONArrayStreamDecoder,
    JSONChunk,
    NDJSONDecoder,
    encode_array_end,
    encode_array_item,
    encode_array_start,
    encode_ndjson_line,
)
from .sse import SSEDecoder, SSEEvent, encode_event

__all__ = [
    "CodecError", "EventTooLarge", "MalformedFrame", "ChecksumMismatch", "InvalidHeadersLength",
    "InvalidPayloadLength", "DuplicateHeader", "InvalidHeaderValue",
    "SSEDecoder", "SSEEvent", "encode_event",
    "EventStreamDecoder", "EventStreamMessage", "HeaderValue", "encode_message", "peek_headers",
    "JSONArrayStreamDecoder", "NDJSONDecoder", "JSONChunk",
    "encode_array_start", "encode_array_item", "encode_array_end", "encode_ndjson_line",
]

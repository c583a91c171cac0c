"""Typed errors raised by the sidegate codecs.

Every error is a :class:`CodecError` (itself a ``ValueError``) and carries:

* ``offset`` -- the stream offset (0-based, counted over every byte ever fed
  to the decoder) where the problem is: the start of the offending event /
  frame / element, or the offending byte for framing errors;
* ``events`` -- the events that the failing ``feed()``/``close()`` call had
  already decoded *before* the error (so a caller can still forward them).
  Only the first raise carries them; re-raises of a sticky error carry ``[]``.

Decoders are *sticky*: after an error every later ``feed()``/``close()``
raises an error of the same class, message and offset again (without
``events``) and consumes nothing.

Class names follow botocore's ``botocore.eventstream`` errors where botocore
has one (``ChecksumMismatch``, ``InvalidHeadersLength``,
``InvalidPayloadLength``, ``DuplicateHeader``).
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "EventTooLarge",
    "MalformedFrame",
    "ChecksumMismatch",
    "InvalidHeadersLength",
    "InvalidPayloadLength",
    "DuplicateHeader",
    "InvalidHeaderValue",
]


class CodecError(ValueError):
    """Base class of every codec error."""

    def __init__(self, message: str, offset: int = -1, events: list | None = None):
        self.message = message
        self.offset = offset
        self.events = events if events is not None else []
        super().__init__(f"{message} (at stream offset {offset})")

    def again(self) -> "CodecError":
        """A copy for re-raising from a failed (sticky) decoder: no events."""
        err = self.__class__.__new__(self.__class__)
        err.__dict__.update(self.__dict__)
        err.args = self.args
        err.events = []
        return err


class EventTooLarge(CodecError):
    """An event/frame/element (or the buffered part of one) exceeds the limit."""


class MalformedFrame(CodecError):
    """The byte stream does not follow the framing of the format (also used
    for a partial frame / element left over at ``close()``)."""


class ChecksumMismatch(MalformedFrame):
    """AWS event-stream prelude or message CRC32 does not match."""


class InvalidHeadersLength(MalformedFrame):
    """AWS event-stream headers length exceeds the maximum (128 KiB)."""


class InvalidPayloadLength(MalformedFrame):
    """AWS event-stream payload length exceeds the maximum (24 MiB)."""


class DuplicateHeader(MalformedFrame):
    """AWS event-stream message has the same header name twice."""


class InvalidHeaderValue(MalformedFrame):
    """AWS event-stream header is truncated, of unknown type, or not UTF-8."""

"""Framing shared by the SSE dialects.

A framer forwards each upstream chunk up to its last complete event at once, and holds
back only a partial event until its end arrives. The client cannot use half an event
anyway, and an upstream break then never leaves half an event in front of the error.
When chunks end on event boundaries (the usual case) the chunk object itself goes out.
"""

from __future__ import annotations

# Blank-line endings of an SSE event (WHATWG: a line end followed by an empty line), the
# usual ones first.
_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r", b"\n\r\n", b"\r\n\n")


def last_event_end(buf: bytes, stop: int | None = None) -> int:
    """Offset just past the last complete SSE event in `buf[:stop]`, or 0."""
    if stop is None:
        stop = len(buf)
    end = 0
    for sep in _ENDS:
        # Only an end past the one found can change the answer: the endings a stream does
        # not use are looked for in its last bytes, not in the whole buffer.
        i = buf.rfind(sep, max(0, end - len(sep) + 1), stop)
        if i >= 0:
            end = i + len(sep)
    return end


class SSEFramer:
    __slots__ = ("_partial", "_error")
    pending = calls = ()  # plain framers see no tool calls

    def __init__(self, error_event) -> None:
        self._partial = b""
        self._error = error_event

    def feed(self, chunk: bytes) -> bytes:
        if not self._partial and chunk.endswith((b"\n\n", b"\r\n\r\n")):
            return chunk
        buf = self._partial + chunk if self._partial else chunk
        end = last_event_end(buf)
        if end == len(buf):
            self._partial = b""
            return buf
        self._partial = buf[end:]
        return buf[:end]

    def close(self) -> bytes:
        """Clean end of stream: a final event without a blank line goes out as it came."""
        out, self._partial = self._partial, b""
        return out

    def error(self, message: str) -> bytes:
        """The upstream broke: drop the partial event, end with the dialect's error event."""
        self._partial = b""
        return self._error(message)

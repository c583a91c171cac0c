"""Google Gemini API and Vertex AI Gemini: SSE with alt=sse, else one streamed JSON array."""

from __future__ import annotations

import msgspec

from ._shared import SSEFramer

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 502: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def _error(status: int, message: str) -> bytes:
    return msgspec.json.encode({"error": {"code": status, "message": message,
                                          "status": _STATUS.get(status, "INTERNAL")}})


def error_response(status: int, message: str) -> tuple[list[tuple[str, str]], bytes]:
    return [("content-type", "application/json")], _error(status, message)


def sse_error(message: str) -> bytes:
    return b"data: " + _error(502, message) + b"\r\n\r\n"


class JSONArrayFramer:
    """The stream without alt=sse: one JSON array written incrementally.

    Whole elements go out as they complete (cut by the codec, not parsed); on a break,
    one more element carries the error and the array is closed, so the body stays JSON.
    """

    __slots__ = ("decoder", "sent")
    pending = calls = ()  # plain framers see no tool calls

    def __init__(self) -> None:
        from sidegate_codecs.jsonstream import JSONArrayStreamDecoder

        self.decoder = JSONArrayStreamDecoder()
        self.sent = False

    def feed(self, chunk: bytes) -> bytes:
        from sidegate_codecs.errors import CodecError

        try:
            pieces = self.decoder.feed(chunk)
        except CodecError:
            # Not an array stream after all (or corrupt): relay it untouched.
            return chunk
        if not pieces:
            return b""
        self.sent = True
        return pieces[0].raw if len(pieces) == 1 else b"".join(p.raw for p in pieces)

    def close(self) -> bytes:
        from sidegate_codecs.errors import CodecError

        try:
            return b"".join(p.raw for p in self.decoder.close())
        except CodecError:
            return b""

    def error(self, message: str) -> bytes:
        err = _error(502, message)
        return (b",\r\n" + err + b"]") if self.sent else (b"[" + err + b"]")


def framer(path: str, content_type: str):
    if "alt=sse" in path or content_type.startswith("text/event-stream"):
        return SSEFramer(sse_error)
    return JSONArrayFramer()

"""AWS Bedrock runtime: InvokeModel*, Converse* (rest-json errors, binary event-stream)."""

from __future__ import annotations

import msgspec

_CODES = {400: "ValidationException", 401: "AccessDeniedException", 403: "AccessDeniedException",
          404: "ResourceNotFoundException", 413: "ValidationException",
          502: "ServiceUnavailableException", 504: "ModelTimeoutException"}

EVENTSTREAM = "application/vnd.amazon.eventstream"


def error_response(status: int, message: str) -> tuple[list[tuple[str, str]], bytes]:
    code = _CODES.get(status, "InternalServerException")
    return ([("content-type", "application/json"), ("x-amzn-errortype", code)],
            msgspec.json.encode({"message": message}))


def exception_frame(message: str) -> bytes:
    from sidegate_codecs.eventstream import encode_message

    return encode_message(
        {":message-type": "exception", ":exception-type": "serviceUnavailableException",
         ":content-type": "application/json"},
        msgspec.json.encode({"message": message}),
    )


class FrameFramer:
    """Forwards whole event-stream frames, found by their length prefix without copying.

    Only the 4-byte total length of each frame is read; a frame split across chunks is
    held until complete, so a break never leaves half a frame before the exception frame.
    """

    __slots__ = ("_partial", "need")
    pending = calls = ()  # plain framers see no tool calls

    def __init__(self) -> None:
        self._partial = b""
        self.need = 0  # bytes of the current frame not yet seen

    def feed(self, chunk: bytes) -> bytes:
        buf = self._partial + chunk if self._partial else chunk
        n = len(buf)
        off = len(self._partial) + self.need if self.need else 0
        if self.need and off > n:
            self.need = off - n
            self._partial = buf
            return b""
        # walk frame headers from the first frame start not yet accounted for
        while off + 4 <= n:
            total = int.from_bytes(buf[off:off + 4], "big")
            if total < 16:  # not a frame: relay the rest untouched rather than stall
                self._partial, self.need = b"", 0
                return buf
            if off + total > n:
                break
            off += total
        self.need = 0
        if off == n:
            self._partial = b""
            return buf
        self._partial = buf[off:]
        if len(self._partial) >= 4:
            self.need = int.from_bytes(self._partial[:4], "big") - len(self._partial)
        return buf[:off]

    def close(self) -> bytes:
        out, self._partial = self._partial, b""
        return out

    def error(self, message: str) -> bytes:
        self._partial = b""
        return exception_frame(message)


class RawFramer:
    """Non-stream bodies relayed as they come (the relay buffers those anyway)."""

    __slots__ = ()
    pending = calls = ()

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def close(self) -> bytes:
        return b""

    def error(self, message: str) -> bytes:
        return b""


def framer(path: str, content_type: str):
    if content_type.startswith(EVENTSTREAM):
        return FrameFramer()
    return RawFramer()

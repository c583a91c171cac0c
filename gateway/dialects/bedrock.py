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


def _exception_frame(message: str) -> bytes:
    from sidegate_codecs.eventstream import encode_message

    return encode_message(
        {":message-type": "exception", ":exception-type": "serviceUnavailableException",
         ":content-type": "application/json"},
        msgspec.json.encode({"message": message}),
    )


def stream_error(message: str, last: bytes, path: str, tracker: "FrameTracker | None" = None) -> bytes:
    # A frame cut short is completed with zeros: its CRC then fails in the client's parser,
    # which raises rather than dropping the frame as a clean end.
    pad = tracker.padding() if tracker is not None else b""
    return pad + _exception_frame(message)


class FrameTracker:
    """Follows event-stream frame boundaries by their length prefix, without copying.

    Only the 4-byte total-length prefix of each frame is read, so the cost is one
    int.from_bytes per frame; the chunk itself is returned untouched.
    """

    __slots__ = ("need", "head")

    def __init__(self) -> None:
        self.need = 0  # bytes still owed by the current frame
        self.head = b""  # a length prefix split across chunks

    def feed(self, chunk: bytes) -> bytes:
        i, n = 0, len(chunk)
        while i < n:
            if self.need:
                take = min(self.need, n - i)
                self.need -= take
                i += take
                continue
            want = 4 - len(self.head)
            self.head += chunk[i:i + want]
            i += want
            if len(self.head) == 4:
                total = int.from_bytes(self.head, "big")
                self.head = b""
                self.need = max(total - 4, 0)
        return chunk

    def padding(self) -> bytes:
        if self.head:
            return b"\x00" * (4 - len(self.head)) + b"\x00" * 12
        return b"\x00" * self.need


def processor(path: str, content_type: str):
    if content_type.startswith(EVENTSTREAM):
        return FrameTracker()
    return None

"""Google Gemini API and Vertex AI Gemini: SSE with alt=sse, else one streamed JSON array."""

from __future__ import annotations

import msgspec

from ._shared import sse_boundary_pad

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 502: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def _error(status: int, message: str) -> bytes:
    return msgspec.json.encode({"error": {"code": status, "message": message,
                                          "status": _STATUS.get(status, "INTERNAL")}})


def error_response(status: int, message: str) -> tuple[list[tuple[str, str]], bytes]:
    return [("content-type", "application/json")], _error(status, message)


def stream_error(message: str, last: bytes, path: str) -> bytes:
    err = _error(502, message)
    if "alt=sse" in path:
        return sse_boundary_pad(last) + b"data: " + err + b"\r\n\r\n"
    # JSON array stream: append one more element, then close the array.
    tail = last.rstrip()
    if not tail:
        return b"[" + err + b"]"
    if tail.endswith(b"["):
        return err + b"]"
    return b",\r\n" + err + b"]"


def processor(path: str, content_type: str):
    return None

"""Anthropic Messages."""

from __future__ import annotations

import msgspec

from ._shared import SSEFramer

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 502: "api_error", 504: "timeout_error"}


def error_response(status: int, message: str) -> tuple[list[tuple[str, str]], bytes]:
    body = {"type": "error", "error": {"type": _TYPES.get(status, "api_error"), "message": message}}
    return [("content-type", "application/json")], msgspec.json.encode(body)


def stream_error(message: str) -> bytes:
    body = msgspec.json.encode({"type": "error", "error": {"type": "api_error", "message": message}})
    return b"event: error\ndata: " + body + b"\n\n"


def framer(path: str, content_type: str) -> SSEFramer:
    return SSEFramer(stream_error)

"""OpenAI chat completions and Responses (also NVIDIA NIM and OpenAI-compatible upstreams)."""

from __future__ import annotations

import msgspec

from ._shared import SSEFramer

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 502: "upstream_error",
          504: "timeout_error"}
_CODES = {401: "invalid_gateway_key", 413: "request_too_large", 502: "upstream_unreachable",
          504: "upstream_timeout"}


def _error(status: int, message: str) -> dict:
    return {"message": message, "type": _TYPES.get(status, "api_error"), "param": None,
            "code": _CODES.get(status)}


def error_response(status: int, message: str) -> tuple[list[tuple[str, str]], bytes]:
    return [("content-type", "application/json")], msgspec.json.encode({"error": _error(status, message)})


def _chat_error(message: str) -> bytes:
    return b"data: " + msgspec.json.encode({"error": _error(502, message)}) + b"\n\n"


def _responses_error(message: str) -> bytes:
    # the SDK raises on any event whose data carries an "error" object
    err = _error(502, message)
    body = msgspec.json.encode({"type": "error", "code": err["code"], "message": message,
                                "param": None, "error": err})
    return b"event: error\ndata: " + body + b"\n\n"


def framer(path: str, content_type: str) -> SSEFramer:
    return SSEFramer(_responses_error if "/responses" in path else _chat_error)

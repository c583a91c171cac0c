"""OpenAI chat completions and Responses (also NVIDIA NIM and OpenAI-compatible upstreams)."""

from __future__ import annotations

import msgspec

from ._shared import sse_boundary_pad

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


def stream_error(message: str, last: bytes, path: str) -> bytes:
    err = _error(502, message)
    if "/responses" in path:
        # the SDK raises on any event whose data carries an "error" object
        body = msgspec.json.encode({"type": "error", "code": err["code"], "message": message,
                                    "param": None, "error": err})
        return sse_boundary_pad(last) + b"event: error\ndata: " + body + b"\n\n"
    return sse_boundary_pad(last) + b"data: " + msgspec.json.encode({"error": err}) + b"\n\n"


def processor(path: str, content_type: str):
    return None

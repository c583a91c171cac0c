"""Framing helpers shared by the SSE dialects."""

from __future__ import annotations

def sse_boundary_pad(last: bytes) -> bytes:
    """Line ends that close whatever SSE event `last` left open, so the next event parses."""
    if last.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")) or not last:
        return b""
    if last.endswith((b"\n", b"\r")):
        return last[-1:]
    return b"\n\n"

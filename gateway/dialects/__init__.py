"""Provider dialects: one module per wire family.

Each module offers the same small surface, so the relay stays dialect-free:
- `error_response(status, message) -> (headers, body)`: an error in the provider's own
  envelope, so the official SDK raises its usual exception;
- `stream_error(message, last, tail) -> bytes`: an in-band error that ends a stream the
  upstream broke, framed so the client sees an error rather than a clean end;
- `processor(path, content_type)`: the per-stream frame processor seam, or None for a
  plain pass-through.
"""

from __future__ import annotations

from types import ModuleType

from . import anthropic, bedrock, gemini, openai

BY_NAME: dict[str, ModuleType] = {
    "openai": openai,
    "anthropic": anthropic,
    "bedrock": bedrock,
    "gemini": gemini,
}

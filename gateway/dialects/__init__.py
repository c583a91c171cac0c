"""Provider dialects: one module per wire family.

Each module offers the same small surface, so the relay stays dialect-free:
- `error_response(status, message) -> (headers, body)`: an error in the provider's own
  envelope, so the official SDK raises its usual exception;
- `framer(path, content_type)`: a per-stream object with `feed(chunk) -> bytes` (whole
  events or frames, the same bytes object when the chunk ends on a boundary),
  `close() -> bytes` and `error(message) -> bytes`, the in-band error that ends a stream
  the upstream broke, so the client sees an error rather than a clean end. This is the
  seam where the tool-call processor plugs in: it receives whole events only.
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

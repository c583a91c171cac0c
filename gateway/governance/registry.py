"""Which governance module handles a response, by dialect and request path."""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("sidegate.governance")

_cache: dict[str, object] = {}


def _module(name: str):
    try:
        return _cache[name]
    except KeyError:
        pass
    try:
        mod = importlib.import_module(f"gateway.governance.{name}")
    except (ImportError, SyntaxError) as e:
        log.error("governance module %s unavailable (%s): its responses are relayed ungoverned", name, e)
        mod = None
    _cache[name] = mod
    return mod


def module_for(dialect: str, target: str):
    """The dialect module that governs this response, or None (not a model call)."""
    path = target.partition("?")[0]
    if dialect == "openai":
        if path.endswith("/chat/completions"):
            return _module("openai_chat")
        if path.endswith("/responses"):
            return _module("openai_responses")
    elif dialect == "anthropic":
        if path.endswith("/messages"):
            return _module("anthropic")
    elif dialect == "bedrock":
        if path.endswith(("/invoke-with-response-stream", "/invoke")):
            return _module("bedrock_invoke")
        if path.endswith(("/converse-stream", "/converse")):
            return _module("bedrock_converse")
    elif dialect == "gemini":
        if path.endswith((":streamGenerateContent", ":generateContent")):
            return _module("gemini")
    return None

"""Which governance module handles a response, by dialect and request path.

Every module is imported when this one is: a governor that cannot load stops the
worker at start-up rather than letting responses through ungoverned.
"""

from __future__ import annotations

from . import anthropic, bedrock_converse, bedrock_invoke, gemini, openai_chat, openai_responses


def module_for(dialect: str, target: str):
    """The dialect module that governs this response, or None (not a model call)."""
    path = target.partition("?")[0]
    if dialect == "openai":
        if path.endswith("/chat/completions"):
            return openai_chat
        tail = path.rpartition("/responses")[2]
        # POST /responses, and GET /responses/{id} (a stored or background response,
        # streamed with ?stream=true); not /responses/{id}/input_items and the like.
        if "/responses" in path and (tail == "" or tail.count("/") == 1):
            return openai_responses
        if "/chat/completions/" in path and path.rpartition("/chat/completions/")[2].count("/") == 0:
            return openai_chat  # GET a stored chat completion
    elif dialect == "anthropic":
        if path.endswith("/messages"):
            return anthropic
    elif dialect == "bedrock":
        if path.endswith(("/invoke-with-response-stream", "/invoke")):
            return bedrock_invoke
        if path.endswith(("/converse-stream", "/converse")):
            return bedrock_converse
    elif dialect == "gemini":
        if path.endswith((":streamGenerateContent", ":generateContent")):
            return gemini
    return None

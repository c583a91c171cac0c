"""Drive the gateway with each provider's official SDK and normalise what the SDK ends up with.

Every driver returns `Outcome(tool_calls=[{"name", "arguments"}], text, stop_reason)`,
the same shape as a fixture's meta file, so tests compare SDK results with the meta.
"""

from __future__ import annotations

import base64
import json
from itertools import pairwise
from dataclasses import dataclass, field


@dataclass
class Outcome:
    tool_calls: list[dict] = field(default_factory=list)
    text: str = ""
    stop_reason: str | None = None


def _args(raw):
    if isinstance(raw, (dict, list)):
        return raw
    if raw is None or raw == "":
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def expected(meta: dict) -> Outcome:
    return Outcome([{"name": t["name"], "arguments": t["arguments"]} for t in meta["tool_calls"]],
                   meta["text"] or "", meta["stop_reason"])


# -- OpenAI ---------------------------------------------------------------------------

def openai_client(base: str, api_key: str = "sk-test", **kw):
    import openai

    return openai.OpenAI(base_url=base + "/v1/openai", api_key=api_key, max_retries=0, timeout=20, **kw)


def openai_chat(base: str, stream: bool, helper: bool = False, client=None, route: str = "openai") -> Outcome:
    import openai

    client = client or openai.OpenAI(base_url=f"{base}/v1/{route}", api_key="sk-test", max_retries=0, timeout=20)
    args = dict(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    if not stream:
        r = client.chat.completions.create(**args)
        msg = r.choices[0].message
        calls = [{"name": c.function.name, "arguments": _args(c.function.arguments)} for c in msg.tool_calls or []]
        return Outcome(calls, msg.content or "", r.choices[0].finish_reason)
    if helper:
        with client.chat.completions.stream(**args) as s:
            final = s.get_final_completion()
        msg = final.choices[0].message
        calls = [{"name": c.function.name, "arguments": _args(c.function.arguments)} for c in msg.tool_calls or []]
        return Outcome(calls, msg.content or "", final.choices[0].finish_reason)
    calls: dict[int, dict] = {}
    text, stop = [], None
    for chunk in client.chat.completions.create(stream=True, **args):
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            d = choice.delta
            if d.content:
                text.append(d.content)
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
            if choice.finish_reason:
                stop = choice.finish_reason
    out = [{"name": c["name"], "arguments": _args(c["arguments"])} for _, c in sorted(calls.items())]
    return Outcome(out, "".join(text), stop)


def openai_responses(base: str, client=None) -> Outcome:
    client = client or openai_client(base)
    final = None
    with client.responses.stream(model="gpt-4o", input="hi") as s:
        for _ in s:
            pass
        final = s.get_final_response()
    calls = [{"name": o.name, "arguments": _args(o.arguments)} for o in final.output if o.type == "function_call"]
    return Outcome(calls, final.output_text or "", final.status)


# -- Anthropic ------------------------------------------------------------------------

def anthropic_client(base: str, api_key: str = "sk-ant-test", **kw):
    import anthropic

    return anthropic.Anthropic(base_url=base + "/v1/anthropic", api_key=api_key, max_retries=0, timeout=20, **kw)


def _anthropic_outcome(msg) -> Outcome:
    calls = [{"name": b.name, "arguments": b.input} for b in msg.content if b.type == "tool_use"]
    text = "".join(b.text for b in msg.content if b.type == "text")
    return Outcome(calls, text, msg.stop_reason)


def anthropic_messages(base: str, stream: bool, client=None) -> Outcome:
    client = client or anthropic_client(base)
    args = dict(model="claude-test-model", max_tokens=1024, messages=[{"role": "user", "content": "hi"}])
    if not stream:
        return _anthropic_outcome(client.messages.create(**args))
    with client.messages.stream(**args) as s:
        for _ in s:
            pass
        return _anthropic_outcome(s.get_final_message())


# -- Bedrock --------------------------------------------------------------------------

def bedrock_client(base: str, route: str = "bedrock", **kw):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "bedrock-runtime", endpoint_url=f"{base}/v1/{route}", region_name="us-east-1",
        aws_access_key_id="AKIDCLIENTTEST", aws_secret_access_key="client-secret-test",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=20, connect_timeout=5), **kw)


MODEL = "us.anthropic.claude-sonnet-4-5-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "hi"}]}]


def bedrock_converse(base: str, stream: bool, client=None) -> Outcome:
    client = client or bedrock_client(base)
    if not stream:
        r = client.converse(modelId=MODEL, messages=MESSAGES)
        content = r["output"]["message"]["content"]
        calls = [{"name": c["toolUse"]["name"], "arguments": c["toolUse"]["input"]} for c in content if "toolUse" in c]
        text = "".join(c.get("text", "") for c in content)
        return Outcome(calls, text, r["stopReason"])
    r = client.converse_stream(modelId=MODEL, messages=MESSAGES)
    blocks: dict[int, dict] = {}
    text, stop = [], None
    for ev in r["stream"]:
        if "contentBlockStart" in ev:
            start = ev["contentBlockStart"]["start"]
            if "toolUse" in start:
                blocks[ev["contentBlockStart"]["contentBlockIndex"]] = {"name": start["toolUse"]["name"], "arguments": ""}
        elif "contentBlockDelta" in ev:
            d = ev["contentBlockDelta"]["delta"]
            if "text" in d:
                text.append(d["text"])
            if "toolUse" in d:
                blocks[ev["contentBlockDelta"]["contentBlockIndex"]]["arguments"] += d["toolUse"]["input"]
        elif "messageStop" in ev:
            stop = ev["messageStop"]["stopReason"]
    calls = [{"name": b["name"], "arguments": _args(b["arguments"])} for _, b in sorted(blocks.items())]
    return Outcome(calls, "".join(text), stop)


def bedrock_invoke(base: str, stream: bool, client=None, route: str = "bedrock") -> Outcome:
    """InvokeModel(*WithResponseStream) carrying Anthropic Messages events."""
    client = client or bedrock_client(base, route=route)
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 256,
                       "messages": [{"role": "user", "content": "hi"}]})
    if not stream:
        r = client.invoke_model(modelId=MODEL, body=body)
        msg = json.loads(r["body"].read())
        calls = [{"name": b["name"], "arguments": b["input"]} for b in msg["content"] if b["type"] == "tool_use"]
        text = "".join(b.get("text", "") for b in msg["content"] if b["type"] == "text")
        return Outcome(calls, text, msg["stop_reason"])
    r = client.invoke_model_with_response_stream(modelId=MODEL, body=body)
    return anthropic_events([json.loads(ev["chunk"]["bytes"]) for ev in r["body"] if "chunk" in ev])


def anthropic_events(events: list[dict]) -> Outcome:
    blocks: dict[int, dict] = {}
    stop = None
    for e in events:
        t = e["type"]
        if t == "content_block_start":
            cb = e["content_block"]
            blocks[e["index"]] = {"type": cb["type"], "name": cb.get("name"), "text": cb.get("text", ""), "json": ""}
        elif t == "content_block_delta":
            d = e["delta"]
            if d["type"] == "text_delta":
                blocks[e["index"]]["text"] += d["text"]
            elif d["type"] == "input_json_delta":
                blocks[e["index"]]["json"] += d["partial_json"]
        elif t == "message_delta":
            stop = e["delta"].get("stop_reason") or stop
    calls = [{"name": b["name"], "arguments": _args(b["json"])} for _, b in sorted(blocks.items()) if b["type"] == "tool_use"]
    text = "".join(b["text"] for _, b in sorted(blocks.items()) if b["type"] == "text")
    return Outcome(calls, text, stop)


# -- Gemini / Vertex ------------------------------------------------------------------

def genai_client(base: str, route: str = "gemini", api_key: str = "AIza-test-key"):
    from google import genai
    from google.genai import types

    opts = types.HttpOptions(base_url=f"{base}/v1/{route}", timeout=20_000,
                             retry_options=types.HttpRetryOptions(attempts=1))
    if route == "vertex-gemini":
        return genai.Client(vertexai=True, api_key=api_key, http_options=opts)
    return genai.Client(api_key=api_key, http_options=opts)


def gemini_generate(base: str, stream: bool, route: str = "gemini", client=None) -> Outcome:
    client = client or genai_client(base, route)
    model = "gemini-2.5-flash"
    responses = (list(client.models.generate_content_stream(model=model, contents="hi")) if stream
                 else [client.models.generate_content(model=model, contents="hi")])
    calls, text, stop = [], [], None
    for r in responses:
        for cand in r.candidates or []:
            if cand.index not in (None, 0):
                continue
            for part in (cand.content.parts if cand.content and cand.content.parts else []):
                fc = part.function_call
                if fc is not None:
                    # Vertex streams arguments as partialArgs fragments after a named part
                    if fc.name:
                        calls.append({"name": fc.name, "arguments": dict(fc.args or {})})
                    for pa in fc.partial_args or []:
                        set_partial_arg(calls[-1]["arguments"], pa)
                elif part.text and not part.thought:
                    text.append(part.text)
            if cand.finish_reason:
                stop = cand.finish_reason.value if hasattr(cand.finish_reason, "value") else str(cand.finish_reason)
    return Outcome(calls, "".join(text), stop)


def set_partial_arg(root: dict, pa) -> None:
    """Apply one Vertex partialArgs fragment (a JSON path and a string piece) to `root`;
    independent of the gateway's own assembler, and enough for the recorded paths."""
    keys: list = []
    for seg in pa.json_path.lstrip("$").lstrip(".").split("."):
        name, _, rest = seg.partition("[")
        keys.append(name)
        if rest:
            keys.extend(int(x) for x in rest.rstrip("]").split("]["))
    node = root
    for k, nxt in pairwise(keys):
        if isinstance(node, list):
            while len(node) <= k:
                node.append(None)
            if node[k] is None:
                node[k] = [] if isinstance(nxt, int) else {}
            node = node[k]
        else:
            node = node.setdefault(k, [] if isinstance(nxt, int) else {})
    last = keys[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
        node[last] = (node[last] or "") + pa.string_value if pa.string_value is not None else node[last]
    elif pa.string_value is not None:
        node[last] = node.get(last, "") + pa.string_value


def decode_b64_chunk(payload: bytes) -> dict:
    return json.loads(base64.b64decode(json.loads(payload)["bytes"]))

"""OpenAI tool calls that are not `function` calls: the Responses API's built-in tools the
agent itself runs (shell, local_shell, apply_patch, computer) and Chat Completions' custom
tools (`"type": "custom"`, free-form input). Each is a tool call the model emits and the
agent executes, so each is governed: allowed byte for byte, denied as the marker text, and
the openai SDK reads the rewritten answer.

No recorded stream of these tools is in tests/fixtures: the streams below are the recorded
function-call stream (openai-responses/pai-responses-reasoning-function-call.sse,
openai-chat/pai-openai-tool-call.sse) with the call turned into each shape, as the openai SDK
3.54 types define it (ResponseFunctionShellToolCall, LocalShellCall, ResponseApplyPatchToolCall,
ResponseComputerToolCall, ResponseShellCallCommand*Event; ChatCompletionMessageCustomToolCall).
"""

from __future__ import annotations

import json

import pytest

from gateway.governance import openai_chat as chat
from gateway.governance import openai_responses as resp
from tests.support.fake_upstream import FakeUpstream, load_fixture
from tests.test_gov_openai import (
    ALLOW,
    check_dense,
    client,
    deny,
    events,
    govern,
    sdk_response,
    serve,
)



@pytest.fixture(scope="module")
def fake():
    f = FakeUpstream().start()
    yield f
    f.stop()


SHELL_ACTION = {"commands": ["ls -la", "rm -rf /tmp/work"], "timeout_ms": 120000, "max_output_length": None}
BUILTINS = {
    # item type: (tool name, argument field, its value, the item's own events between added and done)
    "shell_call": ("shell", "action", SHELL_ACTION, [
        ("response.shell_call_command.added", {"command_index": 0, "command": ""}),
        ("response.shell_call_command.delta", {"command_index": 0, "delta": "ls -la"}),
        ("response.shell_call_command.done", {"command_index": 0, "command": "ls -la"}),
        ("response.shell_call_command.added", {"command_index": 1, "command": ""}),
        ("response.shell_call_command.delta", {"command_index": 1, "delta": "rm -rf "}),
        ("response.shell_call_command.delta", {"command_index": 1, "delta": "/tmp/work"}),
        ("response.shell_call_command.done", {"command_index": 1, "command": "rm -rf /tmp/work"}),
    ]),
    "local_shell_call": ("local_shell", "action", {
        "type": "exec", "command": ["bash", "-lc", "rm -rf /tmp/work"], "env": {}, "timeout_ms": None,
        "user": None, "working_directory": "/repo"}, []),
    "apply_patch_call": ("apply_patch", "operation", {
        "type": "update_file", "path": "src/app.py", "diff": "@@\n-rm -rf /tmp/work\n+pass\n"}, [
        ("response.apply_patch_call_operation_diff.delta", {"delta": "@@\n-rm -rf /tmp/work\n"}),
        ("response.apply_patch_call_operation_diff.done", {"diff": "@@\n-rm -rf /tmp/work\n+pass\n"}),
    ]),
    "computer_call": ("computer", "action", {"type": "type", "text": "rm -rf /tmp/work\n"}, []),
}


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def builtin_stream(kind: str) -> bytes:
    """The recorded Responses function-call stream with its call made a built-in tool call."""
    name, field, value, own = BUILTINS[kind]
    out, seq = [], 0

    def put(e):
        nonlocal seq
        e = dict(e, sequence_number=seq)
        seq += 1
        out.append(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n")

    def item(status, done):
        it = {"id": "sh_0050471a34b36ae60068c97bf19d9c8195", "type": kind, "status": status,
              "call_id": "call_CWXgs68YprAjp6t0371hiPOI"}
        if kind == "shell_call" and not done:
            it[field] = dict(value, commands=[])  # the commands stream in their own events
        elif kind == "apply_patch_call" and not done:
            it[field] = dict(value, diff="")
        else:
            it[field] = value
        if kind == "computer_call":
            it["pending_safety_checks"] = []
        return it

    for e in events(load_fixture("openai-responses/pai-responses-reasoning-function-call.sse")):
        if e.get("output_index") == 1:  # the call's events
            if e["type"] == "response.output_item.added":
                put({"type": e["type"], "output_index": 1, "item": item("in_progress", False)})
                for kind_, fields in own:
                    extra = {"item_id": item("", False)["id"]} if "apply_patch" in kind_ else {}
                    put({"type": kind_, "output_index": 1, **extra, **fields})
            elif e["type"] == "response.output_item.done":
                put({"type": e["type"], "output_index": 1, "item": item("completed", True)})
            continue
        if e["type"] == "response.completed":
            e["response"]["output"] = [o if o["type"] != "function_call" else item("completed", True)
                                       for o in e["response"]["output"]]
        put(e)
    return b"".join(out)


@pytest.mark.parametrize("kind", list(BUILTINS))
def test_responses_builtin_call_allowed_passes_byte_for_byte(kind):
    body = builtin_stream(kind)
    name, _, value, _ = BUILTINS[kind]
    out, gov = govern(resp, body, lambda c: ALLOW, seed=7)
    assert out == body
    assert [(c.name, json.loads(c.arguments), c.call_id) for c in gov.calls] == [
        (name, value, "call_CWXgs68YprAjp6t0371hiPOI")]
    assert gov.calls[0].arguments == compact(value)  # compact JSON, whatever the wire's spacing


@pytest.mark.parametrize("kind", list(BUILTINS))
def test_responses_builtin_call_denied_becomes_a_message(fake, kind):
    body = builtin_stream(kind)
    name = BUILTINS[kind][0]
    v = deny("destructive")
    out, gov = govern(resp, body, lambda c: v if "rm -rf" in c.arguments else ALLOW, seed=9)
    assert [c.name for c in gov.calls] == [name]
    check_dense(out, body)
    assert kind.encode() not in out  # the item, its own events and the aggregate's copy: all gone
    assert b"rm -rf" not in out
    final, kinds = sdk_response(fake, out)
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output_text == v.text(name) == f"[SIDEGATE DENIED] tool={name} reason=destructive"
    assert "response.output_text.delta" in kinds


@pytest.mark.parametrize("kind", list(BUILTINS))
def test_responses_builtin_call_observed_is_recorded_and_relayed(kind):
    body = builtin_stream(kind)
    out, gov = govern(resp, body, lambda c: deny(), enforce=False, seed=11)
    assert out == body
    assert [c.name for c in gov.calls] == [BUILTINS[kind][0]]


@pytest.mark.parametrize("kind", list(BUILTINS))
def test_responses_builtin_call_in_a_body(kind):
    name, _, value, _ = BUILTINS[kind]
    done = next(e for e in events(builtin_stream(kind)) if e["type"] == "response.completed")["response"]
    body = json.dumps(done, indent=2).encode()  # the API indents whole bodies: the arguments are compact all the same
    calls = resp.extract("/responses", body)
    assert [(c.name, c.arguments) for c in calls] == [(name, compact(value))]
    out = json.loads(resp.rewrite("/responses", body, calls, [deny("destructive")]))
    assert [o["type"] for o in out["output"]] == ["reasoning", "message"]
    assert out["output"][1]["content"][0]["text"] == f"[SIDEGATE DENIED] tool={name} reason=destructive"
    assert resp.rewrite("/responses", body, calls, [ALLOW]) == body


def test_responses_computer_call_with_a_batch_of_actions():
    actions = [{"type": "click", "x": 10, "y": 20, "button": "left"}, {"type": "type", "text": "rm -rf /"}]
    body = json.dumps({"id": "resp_1", "object": "response", "status": "completed", "output": [
        {"id": "cu_1", "type": "computer_call", "call_id": "call_1", "status": "completed",
         "pending_safety_checks": [], "actions": actions}]}).encode()
    assert [(c.name, json.loads(c.arguments)) for c in resp.extract("/responses", body)] == [("computer", actions)]


def test_responses_builtin_call_cut_before_its_item_is_done():
    """The stream ends inside the call: it is decided on the item as it was added (the
    agent's SDK never sees the call complete either)."""
    body = builtin_stream("local_shell_call")
    cut = body[:body.index(b"event: response.output_item.done\ndata: {\"type\": \"response.output_item.done\", "
                           b"\"output_index\": 1")]
    out, gov = govern(resp, cut, lambda c: deny(), seed=2)
    assert [(c.name, json.loads(c.arguments)) for c in gov.calls] == [("local_shell", BUILTINS["local_shell_call"][2])]
    assert b"local_shell_call" not in out and b"[SIDEGATE DENIED] tool=local_shell" in out


def test_responses_server_side_tools_are_not_governed():
    """web_search_call, mcp_call and the like are run by the provider, not the agent."""
    body = builtin_stream("local_shell_call").replace(b"local_shell_call", b"web_search_call")
    out, gov = govern(resp, body, lambda c: deny(), seed=4)
    assert out == body and gov.calls == []


# -- Chat Completions: custom tools ---------------------------------------------------------

def custom_chat_stream() -> bytes:
    """The recorded chat tool-call stream with its function call made a custom tool call."""
    out = []
    for block in load_fixture("openai-chat/pai-openai-tool-call.sse").split(b"\n\n"):
        if not block.startswith(b"data: {"):
            out.append(block)
            continue
        e = json.loads(block[6:])
        for ch in e.get("choices") or ():
            for t in (ch.get("delta") or {}).get("tool_calls") or ():
                fn = t.pop("function")
                if "type" in t:
                    t["type"] = "custom"
                t["custom"] = {k if k != "arguments" else "input": v for k, v in fn.items()}
        out.append(b"data: " + json.dumps(e, separators=(",", ":")).encode())
    return b"\n\n".join(out)


def test_chat_custom_tool_call_is_governed(fake):
    body = custom_chat_stream()
    assert b'"custom":{"name":"get_capital"' in body
    out, gov = govern(chat, body, lambda c: ALLOW, seed=3)
    assert out == body
    (call,) = gov.calls
    assert call.name == "get_capital" and json.loads(call.arguments) == {"country": "UK"}
    v = deny("no lookups")
    out, gov = govern(chat, body, lambda c: v, seed=3)
    assert b'"custom"' not in out
    serve(fake, out)
    text, finish, calls = "", None, []
    for c in client(fake).chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True):
        for ch in c.choices:
            text += ch.delta.content or ""
            calls += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    assert calls == [] and text.endswith(v.text("get_capital")) and finish == "stop"


def test_chat_custom_tool_call_in_a_body():
    body = json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-5", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin Patch\n"}},
            {"id": "call_2", "type": "function", "function": {"name": "read", "arguments": "{}"}}]}}]}).encode()
    calls = chat.extract("/chat/completions", body)
    assert [(c.name, c.arguments) for c in calls] == [("apply_patch", "*** Begin Patch\n"), ("read", "{}")]
    out = json.loads(chat.rewrite("/chat/completions", body, calls, [deny("no patches"), ALLOW]))
    msg = out["choices"][0]["message"]
    assert [t["id"] for t in msg["tool_calls"]] == ["call_2"]
    assert msg["content"] == "[SIDEGATE DENIED] tool=apply_patch reason=no patches"


# -- the trace view names these calls as governance does --------------------------------------

@pytest.mark.parametrize("kind", list(BUILTINS))
def test_trace_view_shows_builtin_calls(kind):
    from gateway.traces import response_view

    name, _, value, _ = BUILTINS[kind]
    body = builtin_stream(kind)
    done = next(e for e in events(body) if e["type"] == "response.completed")["response"]
    cut = body[:body.index(b"event: response.completed")]  # streamed calls are read from their items too
    for data, ctype in ((body, "text/event-stream"), (cut, "text/event-stream"),
                        (json.dumps(done).encode(), "application/json")):
        r = response_view("openai", "/v1/responses", ctype, data)
        assert [(c["name"], json.loads(c["arguments"]), c["call_id"]) for c in r.tool_calls] == [
            (name, value, "call_CWXgs68YprAjp6t0371hiPOI")]


def test_trace_view_shows_chat_custom_calls():
    from gateway.traces import response_view

    r = response_view("openai", "/v1/chat/completions", "text/event-stream", custom_chat_stream())
    assert [(c["name"], json.loads(c["arguments"])) for c in r.tool_calls] == [("get_capital", {"country": "UK"})]


# -- a call the stream carries only complete, or only in its final aggregate -------------------

def _without_item_events(body: bytes, keep_done: bool) -> bytes:
    """The recorded stream without its call's item events (all of them, or all but the done)."""
    blocks = [b for b in body.split(b"\n\n") if b]
    out = [b for b in blocks if b'"output_index":1' not in b or (keep_done and b"response.output_item.done" in b)]
    return b"".join(b + b"\n\n" for b in out)


@pytest.mark.parametrize("keep_done", [True, False], ids=["only-item-done", "only-aggregate"])
def test_responses_call_without_its_item_events_is_governed(fake, keep_done):
    """The SDKs take the final output from `response.completed`: a call that only it (or
    only an `output_item.done`) carries is a call all the same."""
    body = _without_item_events(load_fixture("openai-responses/pai-responses-reasoning-function-call.sse"), keep_done)
    assert body.count(b'"type":"function_call"') == (2 if keep_done else 1)
    out, gov = govern(resp, body, lambda c: ALLOW, seed=6)
    assert out == body
    assert [(c.name, c.arguments) for c in gov.calls] == [("final_result", '{"result":6666}')]
    out, gov = govern(resp, body, lambda c: deny("no"), enforce=False, seed=6)
    assert out == body and len(gov.calls) == 1
    out, gov = govern(resp, body, lambda c: deny("no"), seed=6)
    assert len(gov.calls) == 1 and b"function_call" not in out
    final, _ = sdk_response(fake, out)
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output_text == "[SIDEGATE DENIED] tool=final_result reason=no"


def test_responses_aggregate_does_not_govern_a_call_twice():
    body = load_fixture("openai-responses/pai-responses-reasoning-function-call.sse")
    for strip in (b'"id":"fc_0050471a34b36ae60068c97bf19d9c819590eaf42c0edc1042",', b'"call_id":"call_CWXgs68YprAjp6t0371hiPOI",'):
        # an id the item events do not carry but the aggregate does (or the other way round)
        blocks = body.split(b"\n\n")
        odd = b"\n\n".join(b.replace(strip, b"") if b"response.completed" not in b else b for b in blocks)
        out, gov = govern(resp, odd, lambda c: deny(), seed=8)
        assert len(gov.calls) == 1 and b"function_call" not in out


def test_responses_aggregate_call_at_a_governed_calls_place_with_other_ids_is_governed():
    """Another call (other id and call_id) at the place of one already decided is decided too."""
    body = load_fixture("openai-responses/pai-responses-reasoning-function-call.sse")
    head, _, tail = body.partition(b"event: response.completed")
    tail = tail.replace(b"fc_0050471a34b36ae60068c97bf19d9c819590eaf42c0edc1042", b"fc_other").replace(
        b"call_CWXgs68YprAjp6t0371hiPOI", b"call_other").replace(b"final_result", b"drop_db")
    out, gov = govern(resp, head + b"event: response.completed" + tail, lambda c: deny(), seed=4)
    assert [c.name for c in gov.calls] == ["final_result", "drop_db"]
    assert b"function_call" not in out and b"drop_db" in out  # (in the marker only)
    assert b"tool=drop_db" in out

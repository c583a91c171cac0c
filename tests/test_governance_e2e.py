"""Tool-call governance through the real server, read by the official SDKs.

For every tool-call fixture: allow (bytes untouched), deny all, deny one of several,
escalate; then the escalation flow through the admin API, observe mode, the
per-request mode override, the external authority, per-tenant rules.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import re2

from tests.support import sdk_drivers as sdk
from tests.support.fake_upstream import Reply, all_fixtures, load_fixture, load_meta
from tests.support.gateway_proc import Gateway
from tests.support.rawclient import RawClient

ADMIN = "admin-token-for-tests"

# fixture folder -> (driver, plain end-of-turn stop reason, tool-use stop reason)
DRIVERS = {
    "openai-chat": (lambda base, stream: sdk.openai_chat(base, stream, helper=stream), "stop", "tool_calls"),
    "openai-responses": (lambda base, stream: sdk.openai_responses(base), "completed", "completed"),
    "anthropic": (lambda base, stream: sdk.anthropic_messages(base, stream), "end_turn", "tool_use"),
    "bedrock-converse": (lambda base, stream: sdk.bedrock_converse(base, stream), "end_turn", "tool_use"),
    "bedrock-invoke": (lambda base, stream: sdk.bedrock_invoke(base, stream), "end_turn", "tool_use"),
    "gemini": (lambda base, stream: sdk.gemini_generate(base, stream), "STOP", "STOP"),
}
RAW_TARGETS = {
    "openai-chat": "/v1/openai/chat/completions",
    "openai-responses": "/v1/openai/responses",
    "anthropic": "/v1/anthropic/v1/messages",
    "bedrock-converse": "/v1/bedrock/model/m/converse-stream",
    "bedrock-invoke": "/v1/bedrock/model/m/invoke-with-response-stream",
    "gemini": "/v1/gemini/v1beta/models/g:streamGenerateContent?alt=sse",
}


def _complete(meta) -> bool:
    return all(c.get("arguments_complete", True) for c in meta["tool_calls"])


TOOL_FIXTURES = [f for f in all_fixtures() if load_meta(f)["tool_calls"] and _complete(load_meta(f))
                 and "tool_call_index_starts_at_1" not in load_meta(f)["features"]]
MULTI = [f for f in TOOL_FIXTURES
         if len({json.dumps(c["arguments"], sort_keys=True) for c in load_meta(f)["tool_calls"]}) > 1]


class PolicyGateway:
    """A gateway whose policy file a test rewrites; workers reload it within a second."""

    def __init__(self, fake, tmp_path_factory, extra_env=None):
        self.dir = tmp_path_factory.mktemp("policy")
        self.policy = self.dir / "sidegate.policy.yaml"
        self.policy.write_text("rules: []\n")
        env = {"SIDEGATE_POLICY": str(self.policy), "SIDEGATE_ADMIN_TOKEN": ADMIN,
               "SIDEGATE_ESCALATIONS": str(self.dir / "esc.sqlite")}
        env.update(extra_env or {})
        self.gw = Gateway(fake.url, env=env).start()

    def set_policy(self, text: str) -> None:
        self.policy.write_text(text)
        req = urllib.request.Request(self.gw.ops_url + "/admin/policy/reload", method="POST",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 200
        time.sleep(1.2)  # workers check the file's stamp once a second

    def admin(self, method: str, path: str, token: str | None = ADMIN):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(self.gw.ops_url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def pgw(fake, tmp_path_factory):
    g = PolicyGateway(fake, tmp_path_factory)
    yield g
    g.gw.stop()


def _run(pgw, upstream, fixture):
    folder = fixture.split("/")[0]
    meta = load_meta(fixture)
    drive, end_turn, tool_stop = DRIVERS[folder]
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    return drive(pgw.gw.url, meta["stream"]), meta, end_turn, tool_stop


def _rule_for(call: dict, decision: str, reason: str) -> str:
    args = json.dumps(call["arguments"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (f"  - tool: '^{re2.escape(call['name'])}$'\n    args: '^{re2.escape(args)}$'\n"
            f"    decision: {decision}\n    reason: {reason}\n")


@pytest.fixture(scope="module")
def allow_policy(pgw):
    pgw.set_policy("rules:\n  - {tool: '^never-matches$', decision: deny}\n")


@pytest.mark.parametrize("fixture", TOOL_FIXTURES)
def test_allow_leaves_bytes_untouched(pgw, upstream, allow_policy, fixture):
    folder = fixture.split("/")[0]
    target = RAW_TARGETS[folder]
    if not load_meta(fixture)["stream"]:
        target = target.replace("converse-stream", "converse").replace("invoke-with-response-stream", "invoke")
        target = target.replace(":streamGenerateContent?alt=sse", ":generateContent")
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    with RawClient("127.0.0.1", pgw.gw.port, timeout=10).connect() as c:
        resp = c.request("POST", target, [("content-type", "application/json")], b'{"model":"m"}')
    assert resp.body == load_fixture(fixture)


@pytest.fixture(scope="module")
def deny_policy(pgw):
    pgw.set_policy("default: deny\nrules: []\n")


@pytest.mark.parametrize("fixture", TOOL_FIXTURES)
def test_deny_all(pgw, upstream, deny_policy, fixture):
    out, meta, end_turn, _ = _run(pgw, upstream, fixture)
    assert out.tool_calls == []
    for call in meta["tool_calls"]:
        assert f"[SIDEGATE DENIED] tool={call['name']} reason=no rule matched" in out.text
    assert out.text.startswith(meta["text"] or "")
    assert out.stop_reason == end_turn


@pytest.mark.parametrize("fixture", MULTI)
def test_deny_one_of_several(pgw, upstream, fixture):
    meta = load_meta(fixture)
    first = meta["tool_calls"][0]
    pgw.set_policy("rules:\n" + _rule_for(first, "deny", "not this one"))
    out, meta, _, tool_stop = _run(pgw, upstream, fixture)
    rest = [{"name": c["name"], "arguments": c["arguments"]} for c in meta["tool_calls"][1:]]
    assert out.tool_calls == rest
    assert f"[SIDEGATE DENIED] tool={first['name']} reason=not this one" in out.text
    assert out.stop_reason == tool_stop


ESCALATE_FIXTURES = [f for f in TOOL_FIXTURES if f.split("/")[0] in DRIVERS][::3]


@pytest.mark.parametrize("fixture", ESCALATE_FIXTURES)
def test_escalate_then_approve_allows_the_retry_once(pgw, upstream, fixture):
    meta = load_meta(fixture)
    call = meta["tool_calls"][0]
    pgw.set_policy("rules:\n" + _rule_for(call, "escalate", "needs a human"))
    out, _, _, _ = _run(pgw, upstream, fixture)
    m = re.search(rf"\[SIDEGATE ESCALATED\] escalation=(esc_[0-9a-f]+) tool={re.escape(call['name'])} reason=needs a human",
                  out.text)
    assert m, out.text
    esc_id = m.group(1)
    status, rows = pgw.admin("GET", "/admin/escalations?status=pending")
    assert status == 200 and esc_id in [r["id"] for r in rows]
    row = next(r for r in rows if r["id"] == esc_id)
    assert row["tool"] == call["name"] and json.loads(row["arguments"]) == call["arguments"]
    status, row = pgw.admin("POST", f"/admin/escalations/{esc_id}/approve")
    assert status == 200 and row["status"] == "approved"
    retry, _, _, _ = _run(pgw, upstream, fixture)  # the agent's retry: allowed once
    assert {"name": call["name"], "arguments": call["arguments"]} in retry.tool_calls
    again, _, _, _ = _run(pgw, upstream, fixture)  # the permit is used up
    assert "[SIDEGATE ESCALATED]" in again.text


def test_escalation_deny_and_admin_errors(pgw, upstream):
    fixture = "anthropic/anth-sdk-tool-use.sse"
    call = load_meta(fixture)["tool_calls"][0]
    pgw.set_policy("rules:\n" + _rule_for(call, "escalate", "needs a human"))
    out, _, _, _ = _run(pgw, upstream, fixture)
    esc_id = re.search(r"escalation=(esc_[0-9a-f]+)", out.text).group(1)
    assert pgw.admin("POST", f"/admin/escalations/{esc_id}/deny")[1]["status"] == "denied"
    assert pgw.admin("POST", f"/admin/escalations/{esc_id}/approve")[0] == 409
    assert pgw.admin("POST", "/admin/escalations/esc_nope/approve")[0] == 404
    again, _, _, _ = _run(pgw, upstream, fixture)
    assert "[SIDEGATE ESCALATED]" in again.text


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_admin_api_refuses_missing_or_wrong_token(pgw, token):
    for method, path in [("GET", "/admin/escalations"), ("POST", "/admin/escalations/x/approve"),
                         ("POST", "/admin/escalations/x/deny"), ("POST", "/admin/policy/reload")]:
        status, body = pgw.admin(method, path, token=token)
        assert status == 401, (method, path)


def test_admin_api_disabled_without_token(gateway):
    req = urllib.request.Request(gateway.ops_url + "/admin/escalations",
                                 headers={"Authorization": "Bearer anything"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 403


def test_policy_reload_refuses_a_bad_file_and_keeps_the_last_good(pgw, upstream):
    fixture = "openai-chat/oai-tool-call-strict.sse"
    pgw.set_policy("default: deny\n")
    pgw.policy.write_text("default: [broken\n")
    status, body = pgw.admin("POST", "/admin/policy/reload")
    assert status == 400 and "invalid YAML" in body["error"]
    time.sleep(1.2)
    out, _, _, _ = _run(pgw, upstream, fixture)
    assert "[SIDEGATE DENIED]" in out.text  # still the last good policy
    assert "policy reload refused" in pgw.gw.log_text()


def test_observe_mode_header_leaves_bytes_untouched(pgw, upstream):
    fixture = "anthropic/anth-sdk-tool-use.sse"
    pgw.set_policy("default: deny\n")
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    with RawClient("127.0.0.1", pgw.gw.port, timeout=10).connect() as c:
        resp = c.request("POST", RAW_TARGETS["anthropic"], [("x-sidegate-mode", "observe")], b"{}")
    assert resp.body == load_fixture(fixture)
    m = re.search(r'^sidegate_tool_calls_total\{decision="deny",provider="anthropic",tenant=""\} (\S+)$',
                  pgw.gw.metrics(), re.M)
    assert m and float(m.group(1)) >= 1  # decided and counted, not enforced


def test_per_tenant_rules(pgw, upstream):
    fixture = "openai-chat/oai-tool-call-strict.sse"
    pgw.set_policy("default: deny\ntenants:\n  relaxed: {default: allow}\n  watcher: {mode: observe}\n")
    for tenant, denied in [("relaxed", False), ("watcher", False), ("other", True)]:
        upstream.enqueue(Reply.fixture(fixture))
        client = sdk.openai_client(pgw.gw.url, default_headers={"X-Sidegate-Tenant": tenant})
        out = sdk.openai_chat(pgw.gw.url, True, client=client)
        assert ("[SIDEGATE DENIED]" in out.text) == denied, tenant
        assert (out.tool_calls == []) == denied


class _Authority(BaseHTTPRequestHandler):
    mode = "deny"
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        _Authority.seen.append(body)
        if _Authority.mode == "slow":
            time.sleep(1.0)
        if _Authority.mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        out = json.dumps({"decision": "deny", "reason": "authority says no"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def authority():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Authority)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/decide"
    srv.shutdown()


@pytest.mark.parametrize("mode,on_error,expect", [
    ("deny", "allow", "authority says no"),
    ("slow", "deny", "authority timeout"),
    ("slow", "allow", None),
    ("error", "deny", "authority error"),
    ("error", "allow", None),
])
def test_external_authority(pgw, upstream, authority, mode, on_error, expect):
    fixture = "openai-chat/oai-tool-call-strict.sse"
    pgw.set_policy(f"authority:\n  url: {authority}\n  timeout_ms: 200\n  on_error: {on_error}\n"
                   "rules:\n  - {tool: '^get_weather$', decision: allow, name: weather}\n")
    _Authority.mode = mode
    _Authority.seen.clear()
    t0 = time.monotonic()
    upstream.enqueue(Reply.fixture(fixture))
    client = sdk.openai_client(pgw.gw.url, default_headers={"X-Sidegate-Actor": "bot-7", "X-Sidegate-Tenant": "t1"})
    out = sdk.openai_chat(pgw.gw.url, True, client=client)
    assert time.monotonic() - t0 < 0.9  # a slow authority costs at most its timeout
    if expect:
        assert f"reason={expect}" in out.text
    else:
        assert out.tool_calls and not out.text
    sent = _Authority.seen[0]
    assert sent["tool"] == "get_weather" and sent["actor"] == "bot-7" and sent["tenant"] == "t1"
    assert sent["rule"] == "weather" and sent["provider"] == "openai"
    assert json.loads(sent["arguments"]) == {"city": "San Francisco", "state": "CA"}


# -- names the SDKs read as calls but no provider sends: never passed undecided ---------------

ESCAPED_NAMES = [
    ("openai-chat/pai-openai-tool-call.sse", b'"tool_calls"', b'"tool\\u005fcalls"'),
    ("openai-chat/pai-openai-tool-call-nonstream.json", b'"tool_calls":', b'"tool\\u005fcalls":'),
    ("anthropic/anth-sdk-tool-use.sse", b'"tool_use"', b'"tool\\u005fuse"'),
    ("anthropic/pai-anthropic-tool-use-nonstream.json", b'"tool_use"', b'"tool\\u005fuse"'),
    ("gemini/pai-gemini-function-call.sse", b'"functionCall"', b'"function\\u0043all"'),
]


@pytest.mark.parametrize("fixture,plain,escaped", ESCAPED_NAMES, ids=[f for f, _, _ in ESCAPED_NAMES])
def test_deny_all_with_escaped_call_names(pgw, upstream, fixture, plain, escaped):
    pgw.set_policy("default: deny\nrules: []\n")  # (other tests of the module set theirs)
    folder = fixture.split("/")[0]
    meta = load_meta(fixture)
    drive, end_turn, _ = DRIVERS[folder]
    body = load_fixture(fixture).replace(plain, escaped)
    ctype = "text/event-stream" if meta["stream"] else "application/json"
    upstream.enqueue(Reply(body=body, headers=[("content-type", ctype)], chunk_sizes="random"))
    out = drive(pgw.gw.url, meta["stream"])
    assert out.tool_calls == []
    for call in meta["tool_calls"]:
        assert f"[SIDEGATE DENIED] tool={call['name']} reason=no rule matched" in out.text


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "body"])
def test_gemini_function_call_spelling_is_refused(pgw, upstream, stream):
    """google-genai reads a `function_call` part as a call; the governor reads functionCall
    only, so in enforce mode such an answer is stopped (in-band) or refused (502)."""
    from google.genai import errors as genai_errors

    pgw.set_policy("default: deny\nrules: []\n")
    fixture = "gemini/pai-gemini-function-call.sse" if stream else "gemini/pai-gemini-function-call-nonstream.json"
    body = load_fixture(fixture).replace(b'"functionCall"', b'"function_call"')
    ctype = "text/event-stream" if stream else "application/json"
    upstream.enqueue(Reply(body=body, headers=[("content-type", ctype)]))
    with pytest.raises(genai_errors.APIError) as e:
        sdk.gemini_generate(pgw.gw.url, stream)
    if stream:  # the in-band error event that stopped the stream
        assert "function_call, which is not governed" in str(e.value)
    else:
        assert e.value.code == 502


def test_legacy_function_call_is_governed(pgw, upstream):
    """The legacy `functions` API through the gateway and the openai SDK: a function_call,
    whole or streamed, is denied like a tool call."""
    import openai

    pgw.set_policy("default: deny\nrules: []\n")
    client = openai.OpenAI(base_url=pgw.gw.url + "/v1/openai/v1", api_key="sk-test", max_retries=0, timeout=20)
    functions = [{"name": "rm_rf", "parameters": {"type": "object"}}]
    marker = "[SIDEGATE DENIED] tool=rm_rf reason=no rule matched"
    body = json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-4o", "choices": [
        {"index": 0, "finish_reason": "function_call", "message": {
            "role": "assistant", "content": None, "function_call": {"name": "rm_rf", "arguments": '{"path":"/"}'}}}]})
    upstream.enqueue(Reply(body=body.encode(), headers=[("content-type", "application/json")]))
    msg = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], functions=functions)
    assert msg.choices[0].message.function_call is None and msg.choices[0].finish_reason == "stop"
    assert msg.choices[0].message.content == marker

    def ev(delta, finish=None):
        return "data: " + json.dumps({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"
    stream = (ev({"role": "assistant", "content": None, "function_call": {"name": "rm_rf", "arguments": ""}})
              + ev({"function_call": {"arguments": '{"path":"/"}'}}) + ev({}, "function_call") + "data: [DONE]\n\n")
    upstream.enqueue(Reply(body=stream.encode(), headers=[("content-type", "text/event-stream")], chunk_sizes="random"))
    calls, text, finish = [], "", None
    for chunk in client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                functions=functions, stream=True):
        for c in chunk.choices:
            calls.append(c.delta.function_call)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert not any(calls) and text == marker and finish == "stop"


# -- OpenAI tool calls that are not functions: built-in tools the agent runs, custom tools ----

@pytest.mark.parametrize("kind", ["shell_call", "local_shell_call", "apply_patch_call", "computer_call"])
def test_responses_builtin_tool_call_is_governed(pgw, upstream, kind):
    """A Responses shell / local_shell / apply_patch / computer call through the gateway and
    the openai SDK: a rule on the tool's name and its arguments denies it, and the SDK reads
    the marker where the call was."""
    import openai

    from tests.test_gov_openai_builtin import BUILTINS, builtin_stream

    name = BUILTINS[kind][0]
    pgw.set_policy(f"default: allow\nrules:\n  - {{name: no-rm, tool: '^{name}$', args: 'rm -rf', decision: deny, "
                   "reason: destructive}\n")
    upstream.enqueue(Reply(body=builtin_stream(kind), headers=[("content-type", "text/event-stream")],
                           chunk_sizes="random"))
    client = openai.OpenAI(base_url=pgw.gw.url + "/v1/openai/v1", api_key="sk-test", max_retries=0, timeout=20)
    with client.responses.stream(model="gpt-5", input="clean up") as s:
        for _ in s:
            pass
        final = s.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output_text == f"[SIDEGATE DENIED] tool={name} reason=destructive"
    # whole answers too
    done = next(json.loads(b[6:]) for b in builtin_stream(kind).split(b"\n") if b.startswith(b'data: {"type": "response.completed"'))
    upstream.enqueue(Reply(body=json.dumps(done["response"]).encode(), headers=[("content-type", "application/json")]))
    got = client.responses.create(model="gpt-5", input="clean up")
    assert [o.type for o in got.output] == ["reasoning", "message"]
    assert got.output_text == f"[SIDEGATE DENIED] tool={name} reason=destructive"


def test_chat_custom_tool_call_is_governed(pgw, upstream):
    import openai

    from tests.test_gov_openai_builtin import custom_chat_stream

    pgw.set_policy("default: allow\nrules:\n  - {name: capitals, tool: '^get_capital$', decision: deny, reason: 'no'}\n")
    client = openai.OpenAI(base_url=pgw.gw.url + "/v1/openai/v1", api_key="sk-test", max_retries=0, timeout=20)
    upstream.enqueue(Reply(body=custom_chat_stream(), headers=[("content-type", "text/event-stream")],
                           chunk_sizes="random"))
    text, calls, finish = "", [], None
    for chunk in client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}], stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert calls == [] and text == "[SIDEGATE DENIED] tool=get_capital reason=no" and finish == "stop"
    body = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-5", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "custom", "custom": {"name": "get_capital", "input": "UK"}}]}}]}
    upstream.enqueue(Reply(body=json.dumps(body).encode(), headers=[("content-type", "application/json")]))
    msg = client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}]).choices[0]
    assert msg.message.tool_calls is None and msg.finish_reason == "stop"
    assert msg.message.content == "[SIDEGATE DENIED] tool=get_capital reason=no"


def test_responses_call_only_in_the_final_aggregate_is_governed(pgw, upstream):
    """A stream whose call has no item events: the SDK still reads it from
    `response.completed`, so the gateway decides it there."""
    from tests.test_gov_openai_builtin import _without_item_events

    pgw.set_policy("default: deny\nrules: []\n")
    body = _without_item_events(load_fixture("openai-responses/pai-responses-reasoning-function-call.sse"), False)
    upstream.enqueue(Reply(body=body, headers=[("content-type", "text/event-stream")], chunk_sizes="random"))
    out = sdk.openai_responses(pgw.gw.url)
    assert out.tool_calls == [] and out.text == "[SIDEGATE DENIED] tool=final_result reason=no rule matched"


def test_anthropic_tool_use_in_message_start_is_refused(pgw, upstream):
    """The anthropic SDK starts its message from message_start, content included: a tool_use
    block there would be a call with no events of its own. The gateway stops the stream."""
    import anthropic

    from tests.test_gov_escapes import _tool_use_in_message_start

    pgw.set_policy("default: deny\nrules: []\n")
    upstream.enqueue(Reply(body=_tool_use_in_message_start(), headers=[("content-type", "text/event-stream")]))
    with pytest.raises(anthropic.APIStatusError, match="tool_use block in message_start"):
        sdk.anthropic_messages(pgw.gw.url, stream=True)

"""A call spelled with JSON escapes is governed like any other (fail closed).

An agent's SDK reads `"tool\\u005fcalls"` as "tool_calls". The governors' fast paths look
for such names as bytes; where an escaped ASCII character may be, they decode instead.
Each case takes a recorded stream or body with a tool call, spells the name that marks the
call (a key, or a type value) with an escape, and checks that every dialect still finds
the same calls and denies them, streamed whole, one event per chunk and in random pieces.
No provider was seen to write such a spelling: this is about not failing open on one.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sidegate_codecs.eventstream import EventStreamDecoder, encode_message
from sidegate_codecs.sse import SSEDecoder

from gateway.governance import anthropic as anth
from gateway.governance import bedrock_converse as conv
from gateway.governance import bedrock_invoke as binv
from gateway.governance import gemini as gem
from gateway.governance import openai_chat as chat
from gateway.governance import openai_responses as resp
from gateway.governance.base import Verdict, first_hint, may_call
from tests.support import sdk_drivers as sdk
from tests.support.fake_upstream import FakeUpstream, Reply, load_fixture
from tests.support.govern import run_governor, split_random

DENY = Verdict("deny", "escaped", rule="r1")
MARKER = b"[SIDEGATE DENIED]"

# (module, path, content type, fixture, the bytes that name the call, their escaped spelling)
SSE_CASES = {
    "openai-chat": (chat, "/v1/openai/chat/completions", "text/event-stream", "openai-chat/pai-openai-tool-call.sse",
                    b'"tool_calls"', b'"tool\\u005fcalls"'),
    "openai-chat, first letter": (chat, "/v1/openai/chat/completions", "text/event-stream",
                                  "openai-chat/oai-parallel-tool-calls.sse", b'"tool_calls"', b'"\\u0074ool_calls"'),
    "openai-responses": (resp, "/v1/openai/responses", "text/event-stream", "openai-responses/pai-responses-function-call.sse",
                         b'"function_call"', b'"function\\u005Fcall"'),
    "anthropic": (anth, "/v1/messages", "text/event-stream", "anthropic/anth-sdk-tool-use.sse",
                  b'"tool_use"', b'"tool\\u005fuse"'),
    "gemini": (gem, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "text/event-stream",
               "gemini/pai-gemini-function-call.sse", b'"functionCall"', b'"function\\u0043all"'),
}
BODY_CASES = {
    "openai-chat": (chat, "/v1/chat/completions", "openai-chat/pai-openai-tool-call-nonstream.json",
                    b'"tool_calls":', b'"tool\\u005fcalls":'),
    "anthropic": (anth, "/v1/messages", "anthropic/pai-anthropic-tool-use-nonstream.json",
                  b'"tool_use"', b'"tool\\u005fuse"'),
    "gemini": (gem, "/v1beta/models/gemini-2.5-flash:generateContent", "gemini/pai-gemini-function-call-nonstream.json",
               b'"functionCall"', b'"function\\u0043all"'),
    "bedrock-converse": (conv, "/model/m/converse", "bedrock-converse/pai-bedrock-converse-tool-use-nonstream.json",
                         b'"toolUse"', b'"tool\\u0055se"'),
}


def sse_events(body: bytes) -> list[bytes]:
    dec = SSEDecoder()
    return [ev.raw for ev in dec.feed(body) + dec.close()]


def calls_of(gov) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in gov.calls]


def govern(mod, path, ctype, pieces):
    gov = mod.Governor(path, ctype, True)
    return run_governor(gov, pieces, lambda call: DENY), gov


def splits(body: bytes, events: list[bytes]):
    yield "whole", [body]
    yield "one event per chunk", events
    for seed in (1, 2, 3):
        yield f"random {seed}", split_random(body, seed, max_size=64)


def test_the_hint_helpers():
    assert may_call(b'{"tool_calls":[]}', b'"tool_calls"')
    assert may_call(b'{"tool\\u005fcalls":[]}', b'"tool_calls"')
    assert may_call(b'{"a":"\\u00e9"}', b'"tool_calls"')  # any escaped Latin-1 or ASCII: decode, to be safe
    assert not may_call(b'{"a":"\\n\\"x\\" \\u4e2d"}', b'"tool_calls"')  # other escapes cannot spell a name
    assert first_hint(b'..."tool_calls"..."x\\u0041"', b'"tool_calls"') == 3
    assert first_hint(b'..."x\\u0041"..."tool_calls"', b'"tool_calls"') == 5
    assert first_hint(b'no call here \\n', b'"tool_calls"') == -1


@pytest.mark.parametrize("case", SSE_CASES)
def test_sse_call_with_escaped_name_is_denied(case):
    mod, path, ctype, fixture, plain, escaped = SSE_CASES[case]
    original = load_fixture(fixture)
    body = original.replace(plain, escaped)
    assert body != original and plain not in body
    _, ref = govern(mod, path, ctype, [original])
    assert ref.calls, "the fixture has a call"
    for how, pieces in splits(body, sse_events(body)):
        out, gov = govern(mod, path, ctype, pieces)
        assert calls_of(gov) == calls_of(ref), (case, how)
        assert MARKER in out, (case, how)


@pytest.mark.parametrize("case", BODY_CASES)
def test_body_call_with_escaped_name_is_denied(case):
    mod, path, fixture, plain, escaped = BODY_CASES[case]
    original = load_fixture(fixture)
    body = original.replace(plain, escaped)
    assert body != original and plain not in body
    want = [(c.name, c.arguments) for c in mod.extract(path, original)]
    calls = mod.extract(path, body)
    assert want and [(c.name, c.arguments) for c in calls] == want
    assert MARKER in mod.rewrite(path, body, calls, [DENY] * len(calls))


def _eventstream_with(original: bytes, edit) -> bytes:
    """The frames of `original`, each payload through `edit` (headers kept, CRCs redone)."""
    dec = EventStreamDecoder()
    return b"".join(encode_message(m.typed_headers, edit(m.payload)) for m in dec.feed(original) + dec.close())


def _frames(body: bytes) -> list[bytes]:
    dec = EventStreamDecoder()
    return [m.raw for m in dec.feed(body) + dec.close()]


def _invoke_edit(plain: bytes, escaped: bytes):
    def edit(payload: bytes) -> bytes:
        obj = json.loads(payload)
        if "bytes" not in obj:
            return payload
        inner = base64.b64decode(obj["bytes"]).replace(plain, escaped)
        return json.dumps({**obj, "bytes": base64.b64encode(inner).decode()}, separators=(",", ":")).encode()
    return edit


EVENTSTREAM_CASES = {
    "bedrock-converse": (conv, "/model/m/converse-stream", "bedrock-converse/pai-bedrock-nova-text-then-tool.bin",
                         lambda p: p.replace(b'"toolUse"', b'"tool\\u0055se"')),
    "bedrock-invoke": (binv, "/model/m/invoke-with-response-stream", "bedrock-invoke/derived-claude-tool-use.bin",
                       _invoke_edit(b'"tool_use"', b'"tool\\u005fuse"')),
}


@pytest.mark.parametrize("case", EVENTSTREAM_CASES)
def test_eventstream_call_with_escaped_name_is_denied(case):
    mod, path, fixture, edit = EVENTSTREAM_CASES[case]
    original = load_fixture(fixture)
    body = _eventstream_with(original, edit)
    assert body != original
    ctype = "application/vnd.amazon.eventstream"
    _, ref = govern(mod, path, ctype, [original])
    assert ref.calls, "the fixture has a call"
    for how, pieces in splits(body, _frames(body)):
        out, gov = govern(mod, path, ctype, pieces)
        assert calls_of(gov) == calls_of(ref), (case, how)
        assert MARKER in out or _marker_in_invoke(out), (case, how)


def _marker_in_invoke(out: bytes) -> bool:
    for payload in (m.payload for m in EventStreamDecoder().feed(out)):
        try:
            inner = base64.b64decode(json.loads(payload).get("bytes", ""))
        except (ValueError, AttributeError):
            continue
        if MARKER in inner:
            return True
    return False


SDK_CASES = {
    "openai-chat": ("openai-chat", lambda url: sdk.openai_chat(url, stream=True)),
    "anthropic": ("anthropic", lambda url: sdk.anthropic_messages(url, stream=True)),
    "gemini": ("gemini", lambda url: sdk.gemini_generate(url, stream=True)),
}


@pytest.fixture(scope="module")
def fake():
    f = FakeUpstream().start()
    yield f
    f.stop()


@pytest.mark.parametrize("case", SDK_CASES)
def test_sdk_reads_the_escaped_call_and_the_governed_denial(fake, case):
    """The official SDK reads the escaped spelling as a tool call (so it matters), and reads
    the governed stream as the denial marker with no call left."""
    mod, path, ctype, fixture, plain, escaped = SSE_CASES[case]
    body = load_fixture(fixture).replace(plain, escaped)
    read = SDK_CASES[case][1]
    headers = [("content-type", "text/event-stream")]
    fake.reset()
    fake.enqueue(Reply(body=body, headers=headers))
    assert read(fake.url).tool_calls, "the SDK sees the escaped call"
    out, _ = govern(mod, path, ctype, sse_events(body))
    fake.reset()
    fake.enqueue(Reply(body=out, headers=headers, chunk_sizes="random", seed=3))
    got = read(fake.url)
    assert got.tool_calls == [] and MARKER.decode() in got.text, got


# -- Gemini: `function_call`, protobuf's own JSON name for the part's call ------------------

GEM_SSE = SSE_CASES["gemini"]


def test_gemini_sdk_reads_function_call_as_a_call(fake):
    body = load_fixture(GEM_SSE[3]).replace(b'"functionCall"', b'"function_call"')
    fake.reset()
    fake.enqueue(Reply(body=body, headers=[("content-type", "text/event-stream")]))
    assert sdk.gemini_generate(fake.url, stream=True).tool_calls  # (why it must not pass undecided)


@pytest.mark.parametrize("spelling", [b'"function_call"', b'"function\\u005fcall"'])
def test_gemini_stream_with_function_call_parts_is_stopped_in_enforce_mode(spelling):
    mod, path, ctype, fixture, plain, _ = GEM_SSE
    original = load_fixture(fixture)
    body = original.replace(plain, spelling)
    for how, pieces in splits(body, sse_events(body)):
        out, gov = govern(mod, path, ctype, pieces)
        assert b"get_capital" not in out and b"France" not in out, how  # the call never reaches the agent
        assert b"function_call, which is not governed" in out, how
        assert gov.calls == []


def test_gemini_stream_with_function_call_parts_passes_in_observe_mode():
    mod, path, ctype, fixture, plain, _ = GEM_SSE
    body = load_fixture(fixture).replace(plain, b'"function_call"')
    gov = mod.Governor(path, ctype, False)
    assert run_governor(gov, [body], lambda call: DENY) == body


def test_gemini_body_with_function_call_parts_is_refused():
    mod, path, fixture, plain, _ = BODY_CASES["gemini"]
    body = load_fixture(fixture).replace(plain, b'"function_call"')
    with pytest.raises(ValueError, match="function_call"):
        mod.extract(path, body)
    # (the relay answers 502 in enforce mode and relays it in observe mode: test_relay_faults)


# -- OpenAI chat: the legacy `functions` API's `function_call` ---------------------------------

def _legacy_body(fc: dict, content=None) -> bytes:
    return json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "function_call": fc},
                                    "finish_reason": "function_call"}]}).encode()


def _legacy_stream() -> list[bytes]:
    def ev(delta, finish=None):
        obj = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return [ev({"role": "assistant", "content": ""}), ev({"content": "Removing it."}),
            ev({"function_call": {"name": "rm_rf", "arguments": ""}}), ev({"function_call": {"arguments": '{"path"'}}),
            ev({"function_call": {"arguments": ':"/"}'}}), ev({}, "function_call"), b"data: [DONE]\n\n"]


@pytest.mark.parametrize("content", [None, "Removing it."])
def test_chat_body_legacy_function_call_is_governed(content):
    body = _legacy_body({"name": "rm_rf", "arguments": '{"path":"/"}'}, content)
    calls = chat.extract("/v1/chat/completions", body)
    assert [(c.name, c.arguments) for c in calls] == [("rm_rf", '{"path":"/"}')]
    out = json.loads(chat.rewrite("/v1/chat/completions", body, calls, [DENY]))
    choice = out["choices"][0]
    assert "function_call" not in choice["message"] and choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == (content + "\n" if content else "") + DENY.text("rm_rf")
    allowed = chat.rewrite("/v1/chat/completions", body, calls, [Verdict("allow")])
    assert allowed == body


def test_chat_body_with_tool_calls_and_legacy_function_call_keeps_their_order():
    obj = json.loads(_legacy_body({"name": "legacy", "arguments": "{}"}))
    obj["choices"].insert(0, {"index": 1, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "tool", "arguments": "{}"}}]}})
    body = json.dumps(obj).encode()
    calls = chat.extract("/v1/chat/completions", body)
    assert [c.name for c in calls] == ["tool", "legacy"]
    out = json.loads(chat.rewrite("/v1/chat/completions", body, calls, [Verdict("allow"), DENY]))
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "tool"
    assert out["choices"][1]["message"]["content"] == DENY.text("legacy")


@pytest.mark.parametrize("how", ["one event per chunk", "whole", "random 1", "random 2"])
def test_chat_stream_legacy_function_call_is_governed(how):
    """A streamed legacy call is held from its first fragment to its choice's finish, then
    decided: allowed, every frame goes out as it came; denied, the call's fragments go,
    the marker (on a new line after the text) takes its place and the finish is `stop`.
    Observe mode relays the stream untouched."""
    frames = _legacy_stream()
    body = b"".join(frames)
    pieces = dict(splits(body, frames))[how]
    out, gov = govern(chat, "/v1/openai/chat/completions", "text/event-stream", pieces)
    assert [(c.name, c.arguments) for c in gov.calls] == [("rm_rf", '{"path":"/"}')]
    assert out.startswith(frames[0] + frames[1])  # the text before it, untouched
    assert b"rm_rf\"" not in out and b"path" not in out and b'"function_call"' not in out
    texts = "".join(c["delta"].get("content") or "" for e in sse_events(out) if e != b"data: [DONE]\n\n"
                    for c in json.loads(e[6:])["choices"])
    assert texts == "Removing it.\n" + DENY.text("rm_rf")
    finishes = [c["finish_reason"] for e in sse_events(out) if e != b"data: [DONE]\n\n" for c in json.loads(e[6:])["choices"]]
    assert finishes[-1] == "stop" and out.endswith(b"data: [DONE]\n\n")
    allowed = chat.Governor("/v1/openai/chat/completions", "text/event-stream", True)
    assert run_governor(allowed, pieces, lambda call: Verdict("allow")) == body
    observe = chat.Governor("/v1/openai/chat/completions", "text/event-stream", False)
    assert run_governor(observe, pieces, lambda call: DENY) == body
    assert [(c.name, c.arguments) for c in observe.calls] == [("rm_rf", '{"path":"/"}')]  # recorded, not held


def test_chat_stream_legacy_function_call_cut_short_is_still_decided():
    """The stream ends inside the call (no finish, no [DONE]): the call is decided at the end."""
    frames = _legacy_stream()[:-2]
    out, gov = govern(chat, "/v1/openai/chat/completions", "text/event-stream", frames)
    assert [c.name for c in gov.calls] == ["rm_rf"] and b"path" not in out and DENY.text("rm_rf").encode() in out


def test_chat_stream_legacy_function_call_beside_tool_calls_is_stopped():
    """A shape the legacy path does not govern (a legacy call and tool calls in one answer)
    stops the stream in enforce mode, before any byte of either call."""
    frames = _legacy_stream()
    tool = json.loads(frames[3][6:])
    tool["choices"][0]["delta"] = {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                   "function": {"name": "other", "arguments": "{}"}}]}
    frames.insert(3, b"data: " + json.dumps(tool).encode() + b"\n\n")
    out, gov = govern(chat, "/v1/openai/chat/completions", "text/event-stream", frames)
    assert b"rm_rf" not in out and b"other" not in out
    assert b"legacy function_call alongside tool calls, which is not governed" in out
    observe = chat.Governor("/v1/openai/chat/completions", "text/event-stream", False)
    assert run_governor(observe, frames, lambda call: DENY) == b"".join(frames)


def test_chat_stream_legacy_call_and_tool_call_in_one_delta():
    """One delta with both a legacy function_call and tool_calls: enforce mode stops the
    stream before either; observe mode stops following the legacy call and relays the stream
    untouched, recording the tool call (it once recursed without end here)."""
    frames = _legacy_stream()
    both = json.loads(frames[2][6:])
    both["choices"][0]["delta"]["tool_calls"] = [{"index": 0, "id": "c1", "type": "function",
                                                  "function": {"name": "other", "arguments": "{}"}}]
    frames[2] = b"data: " + json.dumps(both).encode() + b"\n\n"
    body = b"".join(frames)
    for how, pieces in splits(body, frames):
        out, _ = govern(chat, "/v1/openai/chat/completions", "text/event-stream", pieces)
        assert b"rm_rf" not in out and b"other" not in out and b"not governed" in out, how
        observe = chat.Governor("/v1/openai/chat/completions", "text/event-stream", False)
        assert run_governor(observe, pieces, lambda call: DENY) == body, how
        assert [c.name for c in observe.calls] == ["other"], how


# -- Anthropic: a tool_use block in message_start's content -----------------------------------
# The SDK's accumulator starts the message from message_start, content included: a tool_use
# block there is a call with no events of its own. No provider sends one; it is refused.

def _tool_use_in_message_start() -> bytes:
    body = load_fixture("anthropic/anth-sdk-tool-use.sse")
    block = json.dumps({"type": "tool_use", "id": "toolu_01X", "name": "delete_repo", "input": {"repo": "prod"}})
    return body.replace(b'"content":[]', b'"content":[' + block.encode() + b"]", 1)


def test_anthropic_sdk_reads_a_tool_use_in_message_start(fake):
    body = _tool_use_in_message_start()
    fake.reset()
    fake.enqueue(Reply(body=body, headers=[("content-type", "text/event-stream")]))
    names = [c["name"] for c in sdk.anthropic_messages(fake.url, stream=True).tool_calls]
    assert "delete_repo" in names  # (why it must not pass undecided)


def test_anthropic_stream_with_tool_use_in_message_start_is_stopped_in_enforce_mode():
    body = _tool_use_in_message_start()
    for how, pieces in splits(body, sse_events(body)):
        out, gov = govern(anth, "/v1/messages", "text/event-stream", pieces)
        assert b"delete_repo" not in out, how
        assert b"tool_use block in message_start, which is not governed" in out, how
        assert out.startswith(b"event: error"), how  # nothing of the stream went out before it


def test_anthropic_stream_with_tool_use_in_message_start_passes_in_observe_mode():
    body = _tool_use_in_message_start()
    gov = anth.Governor("/v1/messages", "text/event-stream", False)
    assert run_governor(gov, [body], lambda call: DENY) == body


def test_bedrock_invoke_stream_with_tool_use_in_message_start_is_stopped():
    block = b'{"type":"tool_use","id":"toolu_01X","name":"delete_repo","input":{"repo":"prod"}}'
    ctype = "application/vnd.amazon.eventstream"
    original = load_fixture("bedrock-invoke/derived-claude-tool-use.bin")
    body = _eventstream_with(original, _invoke_edit(b'"content":[]', b'"content":[' + block + b"]"))
    assert body != original

    def inner(out: bytes) -> bytes:  # the Anthropic events the frames carry
        payloads = [json.loads(m.payload) for m in EventStreamDecoder().feed(out)]
        return b"".join(base64.b64decode(p["bytes"]) for p in payloads if "bytes" in p)

    assert b"delete_repo" in inner(body)
    for how, pieces in splits(body, _frames(body)):
        out, gov = govern(binv, "/model/m/invoke-with-response-stream", ctype, pieces)
        assert b"tool_use block in message_start, which is not governed" in out, how
        assert b"delete_repo" not in inner(out), how


@pytest.mark.parametrize("k", range(3))
@pytest.mark.parametrize("digit", b"01234567")
def test_bedrock_invoke_escape_test_sees_every_alignment(k, digit):
    text = b"x" * k + b'{"type":"tool\\u00' + bytes([digit]) + b'5e"}'
    assert binv._escaped(base64.b64encode(text))
    assert not binv._escaped(base64.b64encode(text.replace(b"\\u00", b"\\t")))


@given(st.lists(st.sampled_from([b"\\", b"u", b"0", b"1", b"7", b"8", b"a", b'"', b"\xff"]), max_size=40)
       .map(lambda parts: base64.b64encode(b"".join(parts))))
def test_bedrock_invoke_escape_test_is_its_needles(b64):
    assert binv._escaped(b64) == any(e in b64 for e in binv._ESC)

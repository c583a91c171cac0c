"""Tool-call governance for the OpenAI dialects: chat completions (also NIM and other
OpenAI-compatible upstreams) and the Responses API.

Each governor is driven directly, the way the relay drives it, with fixture bytes split
at random points and scripted verdicts. Every rewritten stream or body is then served by
a fake upstream and read by the official openai SDK (raw chunk iteration, the
`chat.completions.stream()` helper, `responses.stream()`, `create()`), which must end with
the marker text, the remaining calls with their exact arguments and the right stop reason.
"""

from __future__ import annotations

import json

import openai
import pytest

from gateway.governance import openai_chat as chat
from gateway.governance import openai_responses as resp
from gateway.governance.base import Verdict
from tests.support import sdk_drivers as sdk
from tests.support.fake_upstream import (
    FakeUpstream,
    Reply,
    all_fixtures,
    load_fixture,
    load_meta,
)
from tests.support.govern import run_governor, split_bytes, split_random

SSE = [("content-type", "text/event-stream; charset=utf-8")]
JSON = [("content-type", "application/json")]

ALLOW = Verdict("allow")


def deny(reason="not allowed here"):
    return Verdict("deny", reason, rule="r1")


def escalate(reason="needs a human"):
    return Verdict("escalate", reason, rule="r2", escalation_id="esc_123")


def always(verdict):
    return lambda call: verdict


def by_name(**verdicts):
    return lambda call: verdicts.get(call.name, ALLOW)


# -- driving a governor like the relay does ---------------------------------------------

def govern(mod, body: bytes, decide, enforce: bool = True, seed=0, path=None):
    """Feed `body` in random pieces; resolve pending calls after every feed, as the relay does."""
    gov = mod.Governor(path or ("/v1/openai/responses" if mod is resp else "/v1/openai/chat/completions"),
                       "text/event-stream", enforce)
    return run_governor(gov, split_random(body, seed, max_size=64), decide), gov


def chunk(choices, cid="chatcmpl-x", **extra) -> bytes:
    obj = {"id": cid, "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices, **extra}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def delta(index, finish=None, **d):
    return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}


def tc(index, args, name=None, cid=None):
    out = {"index": index}
    if cid is not None:
        out["id"] = cid
        out["type"] = "function"
    fn = {"arguments": args}
    if name is not None:
        fn["name"] = name
    out["function"] = fn
    return out


DONE = b"data: [DONE]\n\n"


def events(body: bytes) -> list[dict]:
    """The JSON data of every SSE event (data lines joined), [DONE] left out."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln[5:].lstrip(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if lines and lines != [b"[DONE]"]:
            out.append(json.loads(b"\n".join(lines)))
    return out


def marker(verdict, name):
    return verdict.text(name)


# -- SDK side -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake():
    f = FakeUpstream().start()
    yield f
    f.stop()


def serve(fake, body: bytes, headers=SSE):
    fake.reset()
    fake.enqueue(Reply(body=body, headers=headers, chunk_sizes="random", seed=7))


def client(fake):
    return openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-test", max_retries=0, timeout=20)


def chat_outcomes(fake, body: bytes, helper: bool = True) -> list[sdk.Outcome]:
    """What the SDK makes of a chat stream: raw iteration, and the stream() helper."""
    serve(fake, body)
    outs = [sdk.openai_chat(fake.url, stream=True)]
    if helper:
        serve(fake, body)
        outs.append(sdk.openai_chat(fake.url, stream=True, helper=True))
    return outs


def expected_text(meta_text: str, *markers: str) -> str:
    parts = ([meta_text] if meta_text else []) + list(markers)
    return "\n".join(parts)


def meta_calls(meta):
    return [{"name": t["name"], "arguments": t["arguments"]} for t in meta["tool_calls"]]


def parsed(calls):
    return [{"name": c.name, "arguments": json.loads(c.arguments) if c.arguments.strip() else {}} for c in calls]


# =====================================================================================
# chat completions, streaming
# =====================================================================================

CHAT_STREAMS = [f for f in all_fixtures("openai-chat", stream=True)]
CHAT_TOOL_STREAMS = [f for f in CHAT_STREAMS if load_meta(f)["tool_calls"]]
INDEX1 = "openai-chat/compat-claude-tool-call-index1.sse"


def dialect(fixture: str):
    return resp if fixture.startswith("openai-responses/") else chat


ALL_STREAMS = CHAT_STREAMS + all_fixtures("openai-responses", stream=True)


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
@pytest.mark.parametrize("fixture", ALL_STREAMS)
def test_allow_all_is_byte_identical(fixture, seed):
    body = load_fixture(fixture)
    meta = load_meta(fixture)
    out, gov = govern(dialect(fixture), body, always(ALLOW), seed=seed)
    assert out == body
    assert parsed(gov.calls) == meta_calls(meta)
    assert [c.call_id for c in gov.calls] == [t.get("id") for t in meta["tool_calls"]]


@pytest.mark.parametrize("fixture", ALL_STREAMS)
def test_observe_mode_forwards_everything_and_collects_calls(fixture):
    body = load_fixture(fixture)
    decided = []

    def decide(call):
        decided.append(call.name)
        return deny()

    out, gov = govern(dialect(fixture), body, decide, enforce=False, seed=5)
    assert out == body
    meta = load_meta(fixture)
    assert parsed(gov.calls) == meta_calls(meta)
    assert decided == [t["name"] for t in meta["tool_calls"]]
    assert all(c.verdict is not None and not c.verdict.allowed for c in gov.calls)


def test_chat_text_chunk_passes_as_the_same_object():
    body = load_fixture("openai-chat/oai-text.sse")
    gov = chat.Governor("/v1/openai/chat/completions", "text/event-stream", True)
    for block in body.split(b"\n\n")[:-1]:
        piece = block + b"\n\n"
        assert gov.feed(piece) is piece


@pytest.mark.parametrize("verdict", [deny(), escalate()], ids=["deny", "escalate"])
@pytest.mark.parametrize("fixture", CHAT_TOOL_STREAMS)
def test_chat_every_call_replaced(fake, fixture, verdict):
    meta = load_meta(fixture)
    out, _ = govern(chat, load_fixture(fixture), always(verdict), seed=11)
    markers = [marker(verdict, t["name"]) for t in meta["tool_calls"]]
    want = sdk.Outcome([], expected_text(meta["text"] or "", *markers), "stop")
    # with no call left the helper reads even the index-1 stream
    for outcome in chat_outcomes(fake, out, helper=True):
        assert outcome == want
    assert not any("tool_calls" in (c.get("delta") or {}) for e in events(out) for c in e.get("choices", []))
    # the marker chunk carries the stream's id/object/created/model
    first = events(load_fixture(fixture))[0]
    mark = next(e for e in events(out) if any(markers[0] in (c["delta"].get("content") or "")
                                             for c in e.get("choices", [])))
    for key in ("id", "object", "created", "model"):
        assert mark[key] == first[key]


PARALLEL = "openai-chat/oai-parallel-tool-calls.sse"


@pytest.mark.parametrize("seed", [None, 4, 9])
def test_chat_deny_first_of_two_renumbers_the_second(fake, seed):
    meta = load_meta(PARALLEL)
    v = deny("no weather")
    out, _ = govern(chat, load_fixture(PARALLEL), by_name(GetWeatherArgs=v), seed=seed)
    indices = {t["index"] for e in events(out) for c in e.get("choices", [])
               for t in (c["delta"].get("tool_calls") or [])}
    assert indices == {0}
    finish = [c["finish_reason"] for e in events(out) for c in e.get("choices", []) if c.get("finish_reason")]
    assert finish == ["tool_calls"]
    want = sdk.Outcome([meta_calls(meta)[1]], marker(v, "GetWeatherArgs"), "tool_calls")
    for outcome in chat_outcomes(fake, out):
        assert outcome == want


def test_chat_deny_second_of_two_keeps_the_first_bytes(fake):
    meta = load_meta(PARALLEL)
    body = load_fixture(PARALLEL)
    v = escalate()
    out, _ = govern(chat, body, by_name(get_stock_price=v), seed=3)
    first_call_frames = [b for b in body.split(b"\n\n") if b'"tool_calls":[{"index":0,' in b]
    assert len(first_call_frames) == 12
    for frame in first_call_frames:
        assert frame + b"\n\n" in out  # the allowed call goes out byte for byte
    want = sdk.Outcome([meta_calls(meta)[0]], marker(v, "get_stock_price"), "tool_calls")
    for outcome in chat_outcomes(fake, out):
        assert outcome == want


def test_chat_index1_stream_allowed_stays_index1_and_denied_goes(fake):
    body = load_fixture(INDEX1)
    out, gov = govern(chat, body, always(ALLOW), seed=2)
    assert out == body
    assert gov.calls[0].index == 1
    # two calls starting at index 1, the first denied: the second becomes index 0 and the
    # stream() helper (which crashes on the original index-1 stream) reads it
    base = events(body)[0]
    frames = [
        chunk([delta(0, role="assistant", content="Sure.")], base["id"]),
        chunk([delta(0, tool_calls=[tc(1, "", "read_file", "toolu_1")])]),
        chunk([delta(0, tool_calls=[tc(1, '{"path": "/etc/shadow"}')])]),
        chunk([delta(0, tool_calls=[tc(2, "", "read_file", "toolu_2")])]),
        chunk([delta(0, tool_calls=[tc(2, '{"path": "a.txt"}')])]),
        chunk([delta(0, "tool_calls")]),
        DONE,
    ]
    v = deny("secrets")
    out, gov = govern(chat, b"".join(frames), lambda c: v if "shadow" in c.arguments else ALLOW, seed=1)
    assert [t["index"] for e in events(out) for c in e["choices"] for t in c["delta"].get("tool_calls") or []] == [0, 0]
    want = sdk.Outcome([{"name": "read_file", "arguments": {"path": "a.txt"}}],
                       "Sure.\n" + marker(v, "read_file"), "tool_calls")
    for outcome in chat_outcomes(fake, out):
        assert outcome == want


def test_chat_single_chunk_call_groq(fake):
    fixture = "openai-chat/groq-tool-call-one-chunk.sse"
    v = deny()
    out, gov = govern(chat, load_fixture(fixture), always(v), seed=None)
    assert gov.calls[0].arguments == '{"response":"no"}'
    finish = [e for e in events(out) if any(c.get("finish_reason") for c in e.get("choices", []))]
    assert finish[0]["choices"][0]["finish_reason"] == "stop"
    assert finish[0]["usage"]["total_tokens"] == 523  # usage on the finish chunk survives
    for outcome in chat_outcomes(fake, out):
        assert outcome == sdk.Outcome([], marker(v, "final_result"), "stop")


def nim_stream(name="run_command") -> bytes:
    """A NIM-style stream: the name (and id) repeated in every fragment."""
    frames = [chunk([delta(0, role="assistant", content=None)], "cmpl-nim")]
    for part in ['{"cmd": ', '"git push ', '--force"}']:
        frames.append(chunk([delta(0, tool_calls=[tc(0, part, name, "call_nim")])], "cmpl-nim"))
    frames += [chunk([delta(0, "tool_calls")], "cmpl-nim"), DONE]
    return b"".join(frames)


def test_chat_name_repeated_in_every_fragment_nim(fake):
    body = nim_stream()
    out, gov = govern(chat, body, always(ALLOW), seed=3)
    assert out == body
    assert gov.calls[0].name == "run_command"
    assert gov.calls[0].arguments == '{"cmd": "git push --force"}'
    v = deny("force push")
    out, gov = govern(chat, body, lambda c: v if "--force" in c.arguments else ALLOW, seed=3)
    serve(fake, out)
    assert sdk.openai_chat(fake.url, stream=True) == sdk.Outcome([], marker(v, "run_command"), "stop")


def n2_stream() -> bytes:
    """n=2: choice 0 calls two tools, choice 1 calls one; both open with role + tool call."""
    return b"".join([
        chunk([delta(0, role="assistant", content=None, tool_calls=[tc(0, "", "get_weather", "call_a")])]),
        chunk([delta(1, role="assistant", content=None, tool_calls=[tc(0, "", "get_weather", "call_b")])]),
        chunk([delta(0, tool_calls=[tc(0, '{"city": "Paris"}')])]),
        chunk([delta(1, tool_calls=[tc(0, '{"city": "Rome"}')])]),
        chunk([delta(0, tool_calls=[tc(1, "", "get_time", "call_c")])]),
        chunk([delta(0, tool_calls=[tc(1, '{"tz": "CET"}')])]),
        chunk([delta(0, "tool_calls")]),
        chunk([delta(1, "tool_calls")]),
        chunk([], usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
        DONE,
    ])


def helper_choices(fake, body: bytes):
    """The choices of an n>1 stream as the chat.completions.stream() helper ends with them."""
    serve(fake, body)
    with client(fake).chat.completions.stream(model="m", messages=[{"role": "user", "content": "hi"}], n=2) as s:
        return s.get_final_completion().choices


def test_chat_n2_choices_are_governed_one_by_one(fake):
    body = n2_stream()
    out, _ = govern(chat, body, always(ALLOW), seed=6)
    assert out == body
    v = deny("no rome")
    out, _ = govern(chat, body, lambda c: v if "Rome" in c.arguments else ALLOW, seed=6)
    c0, c1 = helper_choices(fake, out)
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c0.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert c0.finish_reason == "tool_calls" and not c0.message.content
    assert not c1.message.tool_calls
    assert c1.message.content == marker(v, "get_weather")
    assert c1.finish_reason == "stop"
    # deny in choice 0 only: choice 0's second call goes dense to 0, choice 1 untouched
    v2 = deny("no paris")
    out, _ = govern(chat, body, lambda c: v2 if "Paris" in c.arguments else ALLOW, seed=6)
    c0, c1 = helper_choices(fake, out)
    assert [t.function.name for t in c0.message.tool_calls] == ["get_time"]
    assert c0.message.content == marker(v2, "get_weather") and c0.finish_reason == "tool_calls"
    assert [t.function.arguments for t in c1.message.tool_calls] == ['{"city": "Rome"}']


def test_chat_other_choice_text_flows_while_a_call_is_held():
    frames = [
        chunk([delta(0, role="assistant", content="")]),
        chunk([delta(1, role="assistant", content="")]),
        chunk([delta(0, tool_calls=[tc(0, "", "deploy_prod", "call_d")])]),
        chunk([delta(1, content="Hello")]),
        chunk([delta(0, tool_calls=[tc(0, '{"env": "prod"}')])]),
        chunk([delta(1, content=" there")]),
        chunk([delta(0, "tool_calls")]),
        chunk([delta(1, "stop")]),
        DONE,
    ]
    gov = chat.Governor("/v1/nvidia-nim/chat/completions", "text/event-stream", True)
    outs = []
    for f in frames:
        outs.append(gov.feed(f))
        if gov.pending:
            assert [c.name for c in gov.pending] == ["deploy_prod"]
            assert gov.pending[0].arguments == '{"env": "prod"}'
            outs.append(gov.resolve([escalate()]))
    outs.append(gov.close())
    assert outs[0] == frames[0] and outs[1] == frames[1]
    assert outs[2] == b""             # the call's first frame is held
    assert outs[3] is frames[3]       # text of the other choice is not delayed
    assert outs[4] == b""
    assert outs[5] is frames[5]
    got = events(b"".join(outs))
    assert [c["delta"].get("content") for e in got for c in e["choices"] if c["index"] == 0] == [
        "", escalate().text("deploy_prod"), None]
    assert [c["finish_reason"] for e in got for c in e["choices"] if c["index"] == 0][-1] == "stop"


def test_chat_call_without_finish_or_done_completes_at_end_of_stream(fake):
    frames = [
        chunk([delta(0, role="assistant", tool_calls=[tc(0, "", "bash", "call_1")])]),
        chunk([delta(0, tool_calls=[tc(0, '{"cmd": "rm -rf /"}')])]),
    ]
    body = b"".join(frames)[:-2]  # and the last event has no blank line
    gov = chat.Governor("/v1/openai/chat/completions", "text/event-stream", True)
    assert gov.feed(body) == b""
    assert gov.pending == []
    tail = gov.close()
    assert [c.arguments for c in gov.pending] == ['{"cmd": "rm -rf /"}']
    tail += gov.resolve([deny("no")]) + gov.close()
    got = events(tail)
    assert [c["delta"] for e in got for c in e["choices"]] == [
        {"role": "assistant"}, {"content": deny("no").text("bash")}]


def test_chat_done_completes_an_open_call():
    frames = [chunk([delta(0, tool_calls=[tc(0, '{"a": 1}', "f", "c1")])]), DONE]
    out, gov = govern(chat, b"".join(frames), always(deny()), seed=None)
    assert [c.name for c in gov.calls] == ["f"]
    assert out.endswith(DONE)
    assert events(out)[0]["choices"][0]["delta"] == {"content": deny().text("f")}


def test_chat_interleaved_fragments_are_not_decided_on_half_arguments():
    frames = [
        chunk([delta(0, tool_calls=[tc(0, '{"cmd": "git push', "bash", "c0")])]),
        chunk([delta(0, tool_calls=[tc(1, '{"x": 1}', "other", "c1")])]),
        chunk([delta(0, tool_calls=[tc(0, ' --force"}')])]),
        chunk([delta(0, "tool_calls")]),
        DONE,
    ]
    seen = []
    out, _ = govern(chat, b"".join(frames), lambda c: seen.append(c.arguments) or ALLOW, seed=None)
    assert out == b"".join(frames)
    assert sorted(seen) == sorted(['{"cmd": "git push --force"}', '{"x": 1}'])


def test_chat_a_new_id_at_the_same_index_continues_the_call():
    """Clients accumulate by index, so the verdict is on the merged call they rebuild."""
    frames = [
        chunk([delta(0, tool_calls=[tc(0, '{"cmd": "git push', "bash", "c1")])]),
        chunk([delta(0, tool_calls=[tc(0, ' --force"}', None, "c2")])]),
        chunk([delta(0, "tool_calls")]),
        DONE,
    ]
    v = deny("force push")
    out, gov = govern(chat, b"".join(frames), lambda c: v if "--force" in c.arguments else ALLOW, seed=None)
    assert [(c.name, c.arguments, c.call_id) for c in gov.calls] == [("bash", '{"cmd": "git push --force"}', "c1")]
    assert "tool_calls" not in json.dumps([c["delta"] for e in events(out) for c in e["choices"]])


@pytest.mark.parametrize("bad", [
    b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f"\n\n',  # broken JSON
    b'data: {"choices":"tool_calls"}\n\n',                                                     # wrong shape
    b'data: {"choices":[{"index":0,"delta":{"tool_calls":null}}]}\n\n',                        # null list
    b': comment "tool_calls"\n\n',                                                             # not data
])
def test_chat_frames_that_are_not_tool_calls_pass_untouched(bad):
    out, gov = govern(chat, bad + DONE, always(deny()), seed=None)
    assert out == bad + DONE
    assert gov.calls == []


def test_chat_crlf_stream_keeps_crlf_in_rewritten_frames():
    body = nim_stream().replace(b"\n", b"\r\n")
    out, _ = govern(chat, body, always(ALLOW), seed=8)
    assert out == body
    out, _ = govern(chat, body, always(deny()), seed=8)
    assert b"\n\n" not in out.replace(b"\r\n", b"")  # every line end is still CRLF
    assert out.count(b"\r\n\r\n") == len(events(out)) + 1


def test_chat_error_drops_held_frames_and_ends_in_band():
    gov = chat.Governor("/v1/openai/chat/completions", "text/event-stream", True)
    assert gov.feed(chunk([delta(0, tool_calls=[tc(0, '{"a"', "f", "c1")])])) == b""
    err = gov.error("upstream reset")
    assert err.startswith(b"data: ") and json.loads(err[6:])["error"]["message"] == "upstream reset"


def test_chat_marker_newline_only_after_text():
    frames = [
        chunk([delta(0, role="assistant", content=None, tool_calls=[tc(0, "{}", "a", "c1")])]),
        chunk([delta(0, tool_calls=[tc(1, "{}", "b", "c2")])]),
        chunk([delta(0, "tool_calls")]),
    ]
    out, _ = govern(chat, b"".join(frames), always(deny("x")), seed=None)
    text = "".join(c["delta"].get("content") or "" for e in events(out) for c in e["choices"])
    assert text == deny("x").text("a") + "\n" + deny("x").text("b")


def _denied_texts(pieces) -> tuple[bytes, dict]:
    """A chat stream governed with every call denied: its bytes and each choice's text."""
    out = run_governor(chat.Governor("/v1/openai/chat/completions", "text/event-stream", True), pieces,
                       always(deny("x")))
    texts = {0: "", 1: ""}
    for e in events(out):
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    return out, texts


@pytest.mark.parametrize("split", ["one event per chunk", "whole", "random 1", "random 2", "random 3"])
def test_chat_marker_starts_a_new_line_after_the_choices_text(split):
    """The text events before a denied call pass untouched (one event per chunk, as the
    network delivers them, or several per chunk); the marker written later starts on a new
    line in a choice that had text, and not in one whose content was only empty."""
    frames = [
        chunk([delta(0, role="assistant", content=""), delta(1, role="assistant", content="")]),
        chunk([delta(0, content="Let me check.")]),
        chunk([delta(0, content=" Running it now.")]),
        chunk([delta(1, content="")]),
        chunk([delta(0, tool_calls=[tc(0, '{"x":1}', "a", "c1")]), delta(1, tool_calls=[tc(0, "{}", "b", "c2")])]),
        chunk([delta(0, "tool_calls"), delta(1, "tool_calls")]),
        DONE,
    ]
    body = b"".join(frames)
    pieces = frames if split == "one event per chunk" else split_random(body, None if split == "whole" else int(split[-1]))
    out, texts = _denied_texts(pieces)
    assert texts == {0: "Let me check. Running it now.\n" + deny("x").text("a"), 1: deny("x").text("b")}
    # the text events left as they arrived
    assert out.startswith(b"".join(frames[:4]))


@pytest.mark.parametrize("choice1", ["no text", "spaced", "in choice 0's chunk"])
def test_chat_marker_new_line_after_more_text_than_is_kept_for_noting(choice1):
    """Over chat._DEFER_MAX bytes of text events pass before the denied calls: their text
    choices are noted on the way (all at once while the compact pattern accounts for every
    "content" key, else event by event), and the markers still start where they should,
    also when choice 1's only text is spelled with spaces or shares a chunk with choice 0
    (the pattern sees neither)."""
    frames = [chunk([delta(0, role="assistant", content=""), delta(1, role="assistant", content="")])]
    frames += [chunk([delta(0, content=f"word {i} ")]) for i in range(chat._DEFER_MAX // 150)]
    if choice1 == "spaced":
        obj = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [delta(1, content="odd")]}
        frames.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
    elif choice1 == "in choice 0's chunk":
        frames.append(chunk([delta(0, content="and "), delta(1, content="odd")]))
    frames += [chunk([delta(0, content="last ")])] * 3
    frames += [
        chunk([delta(0, tool_calls=[tc(0, "{}", "a", "c1")]), delta(1, tool_calls=[tc(0, "{}", "b", "c2")])]),
        chunk([delta(0, "tool_calls"), delta(1, "tool_calls")]),
        DONE,
    ]
    assert sum(map(len, frames)) > chat._DEFER_MAX
    _, texts = _denied_texts(frames)
    assert texts[0].endswith("last last last \n" + deny("x").text("a"))
    assert texts[1] == ("" if choice1 == "no text" else "odd\n") + deny("x").text("b")


# =====================================================================================
# chat completions, non-streaming
# =====================================================================================

CHAT_BODIES = all_fixtures("openai-chat", stream=False)


@pytest.mark.parametrize("fixture", CHAT_BODIES)
def test_chat_extract_matches_meta(fixture):
    body = load_fixture(fixture)
    meta = load_meta(fixture)
    calls = chat.extract("/v1/openai/chat/completions", body)
    assert parsed(calls) == meta_calls(meta)
    assert [c.call_id for c in calls] == [t.get("id") for t in meta["tool_calls"]]
    assert chat.rewrite("/chat/completions", body, calls, [ALLOW] * len(calls)) is body


@pytest.mark.parametrize("verdict", [deny(), escalate()], ids=["deny", "escalate"])
@pytest.mark.parametrize("fixture", [f for f in CHAT_BODIES if load_meta(f)["tool_calls"]])
def test_chat_nonstream_every_call_replaced(fake, fixture, verdict):
    body = load_fixture(fixture)
    meta = load_meta(fixture)
    calls = chat.extract("/chat/completions", body)
    out = chat.rewrite("/chat/completions", body, calls, [verdict] * len(calls))
    serve(fake, out, JSON)
    markers = [marker(verdict, t["name"]) for t in meta["tool_calls"]]
    assert sdk.openai_chat(fake.url, stream=False) == sdk.Outcome([], expected_text(meta["text"], *markers), "stop")
    msg = json.loads(out)["choices"][0]["message"]
    assert "tool_calls" not in msg


def test_chat_nonstream_deny_one_of_two(fake):
    fixture = "openai-chat/oai-parallel-tool-calls-nonstream.json"
    body = load_fixture(fixture)
    calls = chat.extract("/chat/completions", body)
    v = deny("no stocks")
    out = chat.rewrite("/chat/completions", body, calls, [ALLOW, v])
    serve(fake, out, JSON)
    want = sdk.Outcome([meta_calls(load_meta(fixture))[0]], marker(v, "get_stock_price"), "tool_calls")
    assert sdk.openai_chat(fake.url, stream=False) == want


def test_chat_nonstream_marker_joins_existing_text_and_renumbers_indexed_calls():
    body = json.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Let me look.",
         "tool_calls": [
             {"index": 0, "id": "a", "type": "function", "function": {"name": "rm", "arguments": "{}"}},
             {"index": 1, "id": "b", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]}},
        {"index": 1, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "rm", "arguments": "{}"}}]}},
    ]}).encode()
    calls = chat.extract("/chat/completions", body)
    assert [(c.name, c.index) for c in calls] == [("rm", 0), ("ls", 1), ("rm", 0)]
    v = deny("no rm")
    obj = json.loads(chat.rewrite("/chat/completions", body, calls, [v if c.name == "rm" else ALLOW for c in calls]))
    c0, c1 = obj["choices"]
    assert c0["message"]["content"] == "Let me look.\n" + v.text("rm")
    assert c0["message"]["tool_calls"] == [
        {"index": 0, "id": "b", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]
    assert c0["finish_reason"] == "tool_calls"
    assert c1["message"]["content"] == v.text("rm") and "tool_calls" not in c1["message"]
    assert c1["finish_reason"] == "stop"


def test_chat_extract_is_empty_without_tool_calls():
    assert chat.extract("/chat/completions", load_fixture("openai-chat/oai-text-nonstream.json")) == []
    assert chat.extract("/chat/completions", b'{"tool_calls": ') == []  # broken JSON
    assert chat.extract("/chat/completions", b'["tool_calls"]') == []


# =====================================================================================
# Responses API
# =====================================================================================

RESP_STREAMS = all_fixtures("openai-responses", stream=True)
RESP_TOOL_STREAMS = [f for f in RESP_STREAMS if load_meta(f)["tool_calls"]]


def check_dense(out: bytes, original: bytes) -> None:
    seqs = [e["sequence_number"] for e in events(out) if "sequence_number" in e]
    if any("sequence_number" in e for e in events(original)):
        first = events(original)[0]["sequence_number"]
        assert seqs == list(range(first, first + len(seqs)))
    else:
        assert seqs == []


def sdk_response(fake, body: bytes):
    serve(fake, body)
    c = client(fake)
    with c.responses.stream(model="gpt-4o", input="hi") as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    return final, kinds


@pytest.mark.parametrize("verdict", [deny(), escalate()], ids=["deny", "escalate"])
@pytest.mark.parametrize("fixture", RESP_TOOL_STREAMS)
def test_responses_call_becomes_a_message(fake, fixture, verdict):
    body = load_fixture(fixture)
    meta = load_meta(fixture)
    out, _ = govern(resp, body, always(verdict), seed=12)
    check_dense(out, body)
    text = marker(verdict, meta["tool_calls"][0]["name"])
    serve(fake, out)
    assert sdk.openai_responses(fake.url) == sdk.Outcome([], text, "completed")
    final, kinds = sdk_response(fake, out)
    msgs = [o for o in final.output if o.type == "message"]
    assert len(msgs) == 1 and msgs[0].id.startswith("msg_") and msgs[0].status == "completed"
    assert msgs[0].content[0].text == text
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    # the message sits where the call was
    pos = next(n for n, o in enumerate(final.output) if o.type == "message")
    orig = next(e for e in events(body) if e["type"] == "response.output_item.added"
                and e["item"]["type"] == "function_call")["output_index"]
    assert pos == orig


def parallel_responses(with_seq=True) -> bytes:
    """A Responses stream with two function calls, built from the recorded one."""
    body = load_fixture("openai-responses/pai-responses-reasoning-function-call.sse")
    evs = events(body)
    head = [e for e in evs if e["type"] in ("response.created", "response.in_progress")]
    reasoning = [e for e in evs if e.get("output_index") == 0 and e["type"].startswith("response.output_item")]
    call = [e for e in evs if e.get("output_index") == 1]
    completed = next(e for e in evs if e["type"] == "response.completed")

    def second(e):
        e = json.loads(json.dumps(e).replace("fc_0050471a", "fc_1111111a").replace("call_CWX", "call_ZZZ")
                       .replace("final_result", "delete_all").replace("6666", "7777"))
        e["output_index"] = 2
        return e

    call2 = [second(e) for e in call]
    done_items = [e["item"] for e in call + call2 if e["type"] == "response.output_item.done"]
    completed["response"]["output"] = completed["response"]["output"][:1] + done_items
    seq = head + reasoning + call + call2 + [completed]
    out = []
    for n, e in enumerate(seq):
        e = dict(e)
        if with_seq:
            e["sequence_number"] = n
        else:
            e.pop("sequence_number", None)
        out.append(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n")
    return b"".join(out)


@pytest.mark.parametrize("with_seq", [True, False])
@pytest.mark.parametrize("denied", ["final_result", "delete_all"])
def test_responses_deny_one_of_two(fake, denied, with_seq):
    body = parallel_responses(with_seq)
    out, _ = govern(resp, body, always(ALLOW), seed=3)
    assert out == body
    v = deny("nope")
    out, _ = govern(resp, body, by_name(**{denied: v}), seed=3)
    check_dense(out, body)
    final, _ = sdk_response(fake, out)
    kinds = [o.type for o in final.output]
    want = {"final_result": ["reasoning", "message", "function_call"],
            "delete_all": ["reasoning", "function_call", "message"]}[denied]
    assert kinds == want
    fc = next(o for o in final.output if o.type == "function_call")
    kept = "delete_all" if denied == "final_result" else "final_result"
    assert fc.name == kept and json.loads(fc.arguments) == {"result": 7777 if kept == "delete_all" else 6666}
    assert final.output_text == v.text(denied)
    assert final.status == "completed"
    # each output_index's events agree with one another
    by_index = {}
    for e in events(out):
        if "output_index" in e:
            by_index.setdefault(e["output_index"], set()).add(
                e.get("item", {}).get("type") or ("message" if "content_index" in e else "function_call"))
    assert all(len(kinds) == 1 for kinds in by_index.values())


def test_responses_call_without_item_done_completes_at_terminal_event(fake):
    evs = [e for e in events(load_fixture("openai-responses/pai-responses-reasoning-function-call.sse"))
           if e["type"] not in ("response.function_call_arguments.done", "response.output_item.done")
           or e.get("output_index") == 0]
    for n, e in enumerate(evs):
        e["sequence_number"] = n
    body = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n" for e in evs)
    seen = []
    out, _ = govern(resp, body, lambda c: seen.append(c.arguments) or deny(), seed=2)
    assert seen == ['{"result":6666}']
    check_dense(out, body)
    assert events(out)[-1]["type"] == "response.completed"
    assert [o["type"] for o in events(out)[-1]["response"]["output"]] == ["reasoning", "message"]


def test_responses_end_of_stream_completes_an_open_call():
    body = load_fixture("openai-responses/pai-responses-function-call.sse")
    cut = body[:body.index(b"event: response.function_call_arguments.done")]
    gov = resp.Governor("/v1/openai/responses", "text/event-stream", True)
    out = gov.feed(cut)
    assert b"function_call" not in out and gov.pending == []
    tail = gov.close()
    assert [c.arguments for c in gov.pending] == ['{"country":"France"}']
    tail += gov.resolve([deny()]) + gov.close()
    assert next(e["type"] for e in events(tail)) == "response.output_item.added"
    assert events(tail)[-1]["item"]["content"][0]["text"] == deny().text("get_capital")


def test_responses_error_event_keeps_flowing():
    body = load_fixture("openai-responses/vercel-responses-error-insufficient-quota.sse")
    out, gov = govern(resp, body, always(deny()), seed=1)
    assert out == body
    gov = resp.Governor("/v1/openai/responses", "text/event-stream", True)
    err = gov.error("upstream timed out")
    assert err.startswith(b"event: error\n") and b"upstream timed out" in err


# -- Responses, non-streaming ---------------------------------------------------------------

def response_body(fixture="openai-responses/pai-responses-reasoning-function-call.sse") -> bytes:
    """The non-streaming Response object: the streamed fixture's response.completed payload."""
    done = next(e for e in events(load_fixture(fixture)) if e["type"] == "response.completed")
    return json.dumps(done["response"]).encode()


@pytest.mark.parametrize("fixture", RESP_TOOL_STREAMS)
def test_responses_nonstream_extract(fixture):
    body = response_body(fixture)
    calls = resp.extract("/v1/openai/responses", body)
    assert parsed(calls) == meta_calls(load_meta(fixture))
    assert resp.rewrite("/responses", body, calls, [ALLOW] * len(calls)) is body
    assert resp.extract("/responses", response_body("openai-responses/pai-responses-text-after-tool.sse")) == []


@pytest.mark.parametrize("verdict", [deny(), escalate()], ids=["deny", "escalate"])
@pytest.mark.parametrize("fixture", RESP_TOOL_STREAMS)
def test_responses_nonstream_rewrite(fake, fixture, verdict):
    body = response_body(fixture)
    calls = resp.extract("/responses", body)
    out = resp.rewrite("/responses", body, calls, [verdict] * len(calls))
    serve(fake, out, JSON)
    r = client(fake).responses.create(model="gpt-4o", input="hi")
    assert r.status == "completed"
    assert [o.type for o in r.output if o.type in ("function_call", "message")] == ["message"]
    assert r.output_text == marker(verdict, calls[0].name)
    assert [o.type for o in r.output] == [o["type"] if o["type"] != "function_call" else "message"
                                          for o in json.loads(body)["output"]]


# -- more shapes and bad input ---------------------------------------------------------------

def test_chat_two_fragments_of_one_call_in_one_frame_give_one_marker(fake):
    frames = [
        chunk([delta(0, role="assistant", content="Let me check.",
                     tool_calls=[tc(0, '{"path": ', "read_file", "c1"), tc(0, '"x"}')])]),
        chunk([delta(0, "tool_calls")]),
        DONE,
    ]
    body = b"".join(frames)
    out, gov = govern(chat, body, always(ALLOW), seed=None)
    assert out == body and gov.calls[0].arguments == '{"path": "x"}'
    v = deny()
    out, gov = govern(chat, body, always(v), seed=None)
    for outcome in chat_outcomes(fake, out):
        assert outcome == sdk.Outcome([], "Let me check.\n" + v.text("read_file"), "stop")


def test_chat_parallel_calls_in_one_chunk_deny_the_first(fake):
    """Groq-style: both calls whole in one delta; the kept one is renumbered to 0."""
    frames = [
        chunk([delta(0, role="assistant", tool_calls=[tc(0, '{"cmd": "rm -rf /"}', "bash", "c1"),
                                                      tc(1, '{"q": "x"}', "search", "c2")])]),
        chunk([delta(0, "tool_calls")], usage={"total_tokens": 3}),
        DONE,
    ]
    v = deny("destructive")
    out, gov = govern(chat, b"".join(frames), by_name(bash=v), seed=2)
    assert [c.name for c in gov.calls] == ["bash", "search"]
    for outcome in chat_outcomes(fake, out):
        assert outcome == sdk.Outcome([{"name": "search", "arguments": {"q": "x"}}], v.text("bash"), "tool_calls")


def test_chat_first_frame_dropped_entirely_still_reads_in_the_helper(fake):
    frames = [chunk([delta(0, tool_calls=[tc(0, '{"a": 1}', "f", "c1")])]),
              chunk([delta(0, "tool_calls")]), DONE]
    v = deny()
    out, _ = govern(chat, b"".join(frames), always(v), seed=None)
    assert events(out)[0]["choices"][0]["delta"] == {"content": v.text("f")}
    for outcome in chat_outcomes(fake, out):
        assert outcome == sdk.Outcome([], v.text("f"), "stop")


def test_chat_arguments_sent_as_an_object_and_missing_tool_index():
    frames = [chunk([{"index": 0, "delta": {"tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}, "finish_reason": None}]),
        chunk([delta(0, "tool_calls")]), DONE]
    out, gov = govern(chat, b"".join(frames), always(deny()), seed=None)
    assert [(c.name, c.arguments, c.index) for c in gov.calls] == [("f", '{"a":1}', 0)]
    assert "tool_calls" not in json.dumps(events(out))


def test_chat_nonstream_verdicts_must_match_the_calls():
    body = load_fixture("openai-chat/oai-parallel-tool-calls-nonstream.json")
    calls = chat.extract("/chat/completions", body)
    with pytest.raises(ValueError):
        chat.rewrite("/chat/completions", body, calls[:1], [deny()])


def custom_tool_stream() -> bytes:
    """The recorded function-call stream, as a custom (free-form input) tool call."""
    out = []
    for e in events(load_fixture("openai-responses/pai-responses-reasoning-function-call.sse")):
        text = json.dumps(e)
        text = text.replace("response.function_call_arguments", "response.custom_tool_call_input")
        e = json.loads(text)
        for item in [e.get("item")] + (e.get("response", {}).get("output") or []):
            if item and item["type"] == "function_call":
                item["type"] = "custom_tool_call"
                item["input"] = "git push --force"
                del item["arguments"], item["status"]
        if e["type"] == "response.custom_tool_call_input.delta":
            e["delta"] = {"{\"": "git ", "result": "push ", "\":": "--force"}.get(e["delta"], "")
        if e["type"] == "response.custom_tool_call_input.done":
            e["input"] = "git push --force"
            del e["arguments"]
        out.append(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n")
    return b"".join(out)


def test_responses_custom_tool_call_is_governed(fake):
    body = custom_tool_stream()
    out, gov = govern(resp, body, always(ALLOW), seed=5)
    assert out == body
    assert [(c.name, c.arguments) for c in gov.calls] == [("final_result", "git push --force")]
    v = deny("force push")
    out, gov = govern(resp, body, lambda c: v if "--force" in c.arguments else ALLOW, seed=5)
    check_dense(out, body)
    final, _ = sdk_response(fake, out)
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output_text == v.text("final_result")
    # non-streaming
    done = next(e for e in events(body) if e["type"] == "response.completed")["response"]
    calls = resp.extract("/responses", json.dumps(done).encode())
    assert [(c.name, c.arguments) for c in calls] == [("final_result", "git push --force")]


def test_responses_sequence_number_elsewhere_in_the_event_is_left_alone():
    evs = events(parallel_responses())
    completed = evs.pop()
    odd = {"type": "response.custom_event", "meta": {"sequence_number": 3}, "sequence_number": len(evs)}
    evs += [odd, dict(completed, sequence_number=len(evs) + 1)]
    body = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n" for e in evs)
    out, _ = govern(resp, body, by_name(final_result=deny()), seed=1)
    check_dense(out, body)
    got = next(e for e in events(out) if e["type"] == "response.custom_event")
    assert got["meta"] == {"sequence_number": 3}


def test_responses_broken_event_in_a_held_call_passes_in_order():
    body = load_fixture("openai-responses/pai-responses-function-call.sse")
    cut = body.index(b"event: response.function_call_arguments.done")
    bad = b"event: response.mystery\ndata: {not json\n\n"
    body = body[:cut] + bad + body[cut:]
    out, _ = govern(resp, body, always(ALLOW), seed=3)
    assert out == body
    out, _ = govern(resp, body, always(deny()), seed=3)
    assert bad in out and out.index(b"response.output_item.added") < out.index(bad)


def test_responses_nonstream_verdicts_must_match_the_calls():
    body = response_body()
    calls = resp.extract("/responses", body)
    with pytest.raises(ValueError):
        resp.rewrite("/responses", body, calls, [deny(), deny()])
    with pytest.raises(ValueError):
        resp.rewrite("/responses", body, [], [deny()])
    assert resp.extract("/responses", b'{"output": "_call\\""}') == []
    assert resp.extract("/responses", b'{"type": "function_call"') == []


def test_responses_items_without_ids_are_matched_by_call_id(fake):
    """A compatible server that leaves item ids out: the denied call is still the one replaced."""
    evs = events(parallel_responses())
    for e in evs:
        e.pop("item_id", None)
        items = [e.get("item")] + (e.get("response", {}).get("output") or [])
        for item in items:
            if item and item["type"] == "function_call":
                item.pop("id")
    body = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n" for e in evs)
    v = deny()
    out, gov = govern(resp, body, by_name(delete_all=v), seed=2)
    assert [c.name for c in gov.calls] == ["final_result", "delete_all"]
    final, _ = sdk_response(fake, out)
    assert [(o.type, getattr(o, "name", None)) for o in final.output] == [
        ("reasoning", None), ("function_call", "final_result"), ("message", None)]
    assert final.output[2].id.startswith("msg_") and final.output_text == v.text("delete_all")


def test_chat_a_later_choice_never_overtakes_a_held_opening_frame(fake):
    """The stream() helper numbers choices in the order they first appear: choice 1's opening
    (text) frame waits behind choice 0's opening frame, which is a held tool call."""
    frames = [
        chunk([delta(0, role="assistant", content=None, tool_calls=[tc(0, "", "get_weather", "call_a")])]),
        chunk([delta(1, role="assistant", content="It is")]),
        chunk([delta(0, tool_calls=[tc(0, '{"city": "Paris"}')])]),
        chunk([delta(1, content=" sunny.")]),
        chunk([delta(0, "tool_calls")]),
        chunk([delta(1, "stop")]),
        DONE,
    ]
    body = b"".join(frames)
    gov = chat.Governor("/v1/openai/chat/completions", "text/event-stream", True)
    assert gov.feed(frames[0]) == b"" and gov.feed(frames[1]) == b""  # held behind it
    for verdict in (ALLOW, deny("no")):
        out, _ = govern(chat, body, always(verdict), seed=None)
        order = [c["index"] for e in events(out) for c in e["choices"]]
        assert sorted(set(order), key=order.index) == [0, 1]  # first appearances in order
        c0, c1 = helper_choices(fake, out)
        assert c1.message.content == "It is sunny." and c1.finish_reason == "stop"
        if verdict.allowed:
            assert c0.message.tool_calls[0].function.arguments == '{"city": "Paris"}'
        else:
            assert c0.message.content == verdict.text("get_weather") and c0.finish_reason == "stop"


@pytest.mark.parametrize("fixture", CHAT_TOOL_STREAMS + RESP_TOOL_STREAMS + ["synthetic/n2", "synthetic/responses-2"])
def test_rewritten_output_does_not_depend_on_chunking(fixture):
    mod = resp if "responses" in fixture else chat
    body = {"synthetic/n2": n2_stream, "synthetic/responses-2": parallel_responses}.get(fixture)
    body = body() if body else load_fixture(fixture)
    decide = lambda c: deny() if c.index % 2 == 0 else escalate()
    whole, _ = govern(mod, body, decide, seed=None)
    for seed in (1, 2):
        assert govern(mod, body, decide, seed=seed)[0] == whole
    gov = mod.Governor("/v1/openai/x", "text/event-stream", True)
    assert run_governor(gov, split_bytes(body), decide) == whole  # one byte at a time

"""Tool-call governance for Bedrock Converse and Gemini / Vertex.

Pure level: the governors are fed fixture bytes split at seeded random points, with
scripted verdicts. SDK level: what they emit is served by a fake upstream and read by
boto3 / google-genai, which must end with the marker text, the remaining calls with
their exact arguments and the right stop reason.
"""

from __future__ import annotations

import base64
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sidegate_codecs.eventstream import EventStreamDecoder, encode_message

from gateway.dialects import bedrock as bedrock_dialect
from gateway.dialects import gemini as gemini_dialect
from gateway.dialects._shared import last_event_end
from gateway.governance import bedrock_converse as conv
from gateway.governance import gemini as gem
from gateway.governance.base import Verdict
from tests.support import sdk_drivers as sdk
from tests.support.fake_upstream import FakeUpstream, Reply, all_fixtures, load_fixture, load_meta
from tests.support.govern import run_governor, split_random

ES = "application/vnd.amazon.eventstream"
SSE = "text/event-stream"
JSON = "application/json; charset=UTF-8"
CONV_STREAM_PATH = "/model/us.amazon.nova-micro-v1:0/converse-stream"
CONV_PATH = "/model/us.amazon.nova-micro-v1:0/converse"
GEM_SSE_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
GEM_ARRAY_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
GEM_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
SEEDS = (0, 1, 2, 3)

ALLOW = Verdict("allow")


def deny(reason: str = "not allowed") -> Verdict:
    return Verdict("deny", reason, rule="r1")


def escalate(reason: str = "needs a human") -> Verdict:
    return Verdict("escalate", reason, rule="r2", escalation_id="esc_123")


# -- fixtures and helpers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def srv():
    f = FakeUpstream().start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def boto(srv):
    return sdk.bedrock_client(srv.url)


@pytest.fixture(scope="module")
def genai(srv):
    return sdk.genai_client(srv.url)


def _split(data: bytes, seed: int | None) -> list[bytes]:
    return split_random(data, seed, max_size=97)


class Script:
    """Verdicts by call position in the stream (default: allow)."""

    def __init__(self, verdicts=None, default=ALLOW):
        self.verdicts = dict(verdicts or {})
        self.default = default
        self.n = 0

    def __call__(self, call) -> Verdict:
        v = self.verdicts.get(self.n, self.default)
        self.n += 1
        return v


def run(gov, data: bytes, decide, seed: int | None = 0) -> bytes:
    """Drive `gov` the way the relay does."""
    return run_governor(gov, _split(data, seed), decide)


def _args(text: str):
    return json.loads(text) if text else {}


def _meta_calls(meta: dict) -> list[dict]:
    return [{"name": c["name"], "arguments": c["arguments"]} for c in meta["tool_calls"]]


def _gov_calls(calls) -> list[dict]:
    return [{"name": c.name, "arguments": _args(c.arguments)} for c in calls]


def _fixtures(folder: str, stream: bool, ext: str = "") -> list[str]:
    return [f for f in all_fixtures(folder, stream) if f.startswith(folder + "/") and f.endswith(ext)]


CONV_STREAMS = _fixtures("bedrock-converse", True)
CONV_BODIES = _fixtures("bedrock-converse", False)
GEM_STREAMS = _fixtures("gemini", True)
GEM_BODIES = _fixtures("gemini", False)
GEM_TOOL_STREAMS = [f for f in GEM_STREAMS if load_meta(f)["tool_calls"]]
CONV_TOOL_STREAMS = [f for f in CONV_STREAMS if load_meta(f)["tool_calls"]]


def _sse_to_array(data: bytes) -> bytes:
    """The same stream as the JSON array Gemini sends without alt=sse."""
    objs = [blk[len(b"data: "):] for blk in data.split(b"\r\n\r\n") if blk.strip()]
    return b"[" + b",\r\n".join(objs) + b"]"


def _array_to_sse(data: bytes) -> bytes:
    return b"".join(b"data: " + msgspec.json.encode(o) + b"\r\n\r\n" for o in json.loads(data))


# -- synthetic streams (shapes no recording covers) ------------------------------------------

_HEADERS = lambda et: [(":event-type", et), (":content-type", "application/json"), (":message-type", "event")]


def _frame(et: str, payload: dict) -> bytes:
    return encode_message(_HEADERS(et), json.dumps(payload, separators=(",", ":")).encode())


def converse_three_calls() -> bytes:
    """Text, then three toolUse blocks (one with no input delta at all), like Claude on Bedrock."""
    f = [_frame("messageStart", {"p": "abc", "role": "assistant"}),
         _frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Let me check "}, "p": "ab"}),
         _frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "that."}, "p": "abcd"}),
         _frame("contentBlockStop", {"contentBlockIndex": 0, "p": "a"}),
         _frame("contentBlockStart", {"contentBlockIndex": 1, "p": "ab",
                                      "start": {"toolUse": {"name": "get_weather", "toolUseId": "tooluse_1"}}}),
         _frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": "{\"city\":"}}, "p": "x"}),
         _frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": " \"Paris\"}"}}}),
         _frame("contentBlockStop", {"contentBlockIndex": 1, "p": "abcdef"}),
         _frame("contentBlockStart", {"contentBlockIndex": 2,
                                      "start": {"toolUse": {"name": "list_files", "toolUseId": "tooluse_2"}}}),
         _frame("contentBlockStop", {"contentBlockIndex": 2}),
         _frame("contentBlockStart", {"contentBlockIndex": 3,
                                      "start": {"toolUse": {"name": "get_time", "toolUseId": "tooluse_3"}}}),
         _frame("contentBlockDelta", {"contentBlockIndex": 3,
                                      "delta": {"toolUse": {"input": "{\"tz\":\"Europe/Paris\",\"n\":[1,2.5]}"}}}),
         _frame("contentBlockStop", {"contentBlockIndex": 3}),
         _frame("messageStop", {"p": "abcdefgh", "stopReason": "tool_use"}),
         _frame("metadata", {"metrics": {"latencyMs": 10}, "usage": {"inputTokens": 1, "outputTokens": 2,
                                                                     "totalTokens": 3}})]
    return b"".join(f)


CONV3_CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}},
               {"name": "list_files", "arguments": {}},
               {"name": "get_time", "arguments": {"tz": "Europe/Paris", "n": [1, 2.5]}}]


def gemini_parallel_stream() -> bytes:
    """A text chunk, then the recorded parallel-call body as one SSE chunk."""
    body = json.loads(load_fixture("gemini/pai-gemini-parallel-function-calls-nonstream.json"))
    text = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Three topics: "}]}, "index": 0}]}
    return b"".join(b"data: " + json.dumps(o).encode() + b"\r\n\r\n" for o in (text, body))


# -- Converse: pure level -----------------------------------------------------------------

@pytest.mark.parametrize("fixture", CONV_STREAMS)
def test_converse_stream_allow_is_byte_exact(fixture):
    data = load_fixture(fixture)
    for seed in (None,) + SEEDS:
        gov = conv.Governor(CONV_STREAM_PATH, ES, True)
        assert run(gov, data, Script(), seed) == data
        assert _gov_calls(gov.calls) == _meta_calls(load_meta(fixture))
        assert [c.call_id for c in gov.calls] == [c["id"] for c in load_meta(fixture)["tool_calls"]]


@pytest.mark.parametrize("fixture", CONV_STREAMS)
def test_converse_stream_observe_changes_nothing(fixture):
    data = load_fixture(fixture)
    for seed in SEEDS:
        gov = conv.Governor(CONV_STREAM_PATH, ES, False)
        # (run_governor checks that every resolve() of an observe-mode governor returns b"")
        assert run(gov, data, lambda call: deny(), seed) == data
        assert _gov_calls(gov.calls) == _meta_calls(load_meta(fixture))
        assert all(c.verdict.outcome == "deny" for c in gov.calls)


def test_converse_stream_text_flows_before_the_call():
    data = load_fixture("bedrock-converse/pai-bedrock-nova-text-then-tool.bin")
    gov = conv.Governor(CONV_STREAM_PATH, ES, True)
    frames = EventStreamDecoder().feed(data)
    first_tool = next(i for i, m in enumerate(frames) if m.headers[":event-type"] == "contentBlockStart")
    head = b"".join(m.raw for m in frames[:first_tool])
    # the text frames come out the moment they arrive; the call's frames are held
    assert gov.feed(head) is head
    assert gov.feed(frames[first_tool].raw) == b""
    assert gov.feed(frames[first_tool + 1].raw) == b"" and not gov.pending
    assert gov.feed(frames[first_tool + 2].raw) == b""  # contentBlockStop: the call is complete
    assert [c.name for c in gov.pending] == ["get_temperature"]
    out = gov.resolve([ALLOW])
    assert out == b"".join(m.raw for m in frames[first_tool:first_tool + 3])


def test_converse_stream_chunk_on_boundaries_is_same_object():
    data = load_fixture("bedrock-converse/pai-bedrock-nova-text.bin")
    gov = conv.Governor(CONV_STREAM_PATH, ES, True)
    for m in EventStreamDecoder().feed(data):
        assert gov.feed(m.raw) is m.raw


def _converse_sdk(srv, boto, body: bytes, stream: bool) -> sdk.Outcome:
    ctype = ES if stream else "application/json"
    srv.enqueue(Reply(body=body, headers=[("content-type", ctype)], chunk_sizes="random"))
    return sdk.bedrock_converse(srv.url, stream, client=boto)


def _expect(meta_calls, meta_text, verdicts, kept_stop, end_stop):
    """Expected SDK outcome: markers in place of the calls that are not allowed."""
    calls, markers = [], []
    for c, v in zip(meta_calls, verdicts):
        if v.allowed:
            calls.append(c)
        else:
            markers.append(v.text(c["name"]))
    return sdk.Outcome(calls, (meta_text or "") + "".join(markers), kept_stop if calls else end_stop)


@pytest.mark.parametrize("verdict", [deny("no weather"), escalate()], ids=["deny", "escalate"])
def test_converse_stream_deny_recorded_call(srv, boto, verdict):
    fixture = "bedrock-converse/pai-bedrock-nova-text-then-tool.bin"
    meta = load_meta(fixture)
    data = load_fixture(fixture)
    for seed in SEEDS:
        gov = conv.Governor(CONV_STREAM_PATH, ES, True)
        out = run(gov, data, Script(default=verdict), seed)
        assert out == run(conv.Governor(CONV_STREAM_PATH, ES, True), data, Script(default=verdict), None)
    frames = EventStreamDecoder().feed(out)  # CRCs checked
    kinds = [m.headers[":event-type"] for m in frames]
    assert "contentBlockStart" not in kinds
    marker = verdict.text("get_temperature")
    if verdict.outcome == "escalate":
        assert marker == "[SIDEGATE ESCALATED] escalation=esc_123 tool=get_temperature reason=needs a human"
    else:
        assert marker == "[SIDEGATE DENIED] tool=get_temperature reason=no weather"
    got = _converse_sdk(srv, boto, out, True)
    assert got == sdk.Outcome([], meta["text"] + marker, "end_turn")
    # untouched frames went out byte for byte
    orig = {m.raw for m in EventStreamDecoder().feed(data)}
    changed = [m for m in frames if m.raw not in orig]
    assert [m.headers[":event-type"] for m in changed] == ["contentBlockDelta", "messageStop"]
    assert [(n, v.type) for n, v in changed[0].typed_headers] == [
        (n, v.type) for n, v in frames[0].typed_headers]


@pytest.mark.parametrize("plan", [(), (0,), (1,), (2,), (0, 2), (0, 1, 2)], ids=lambda p: "deny" + "".join(map(str, p)))
def test_converse_stream_deny_some_of_three(srv, boto, plan):
    data = converse_three_calls()
    verdicts = [deny(f"rule {i}") if i in plan else ALLOW for i in range(3)]
    gov = conv.Governor(CONV_STREAM_PATH, ES, True)
    out = run(gov, data, Script(dict(enumerate(verdicts))), seed=7)
    assert _gov_calls(gov.calls) == CONV3_CALLS
    if not plan:
        assert out == data
    got = _converse_sdk(srv, boto, out, True)
    assert got == _expect(CONV3_CALLS, "Let me check that.", verdicts, "tool_use", "end_turn")
    idx = [json.loads(m.payload).get("contentBlockIndex") for m in EventStreamDecoder().feed(out)]
    assert sorted({i for i in idx if i is not None}) == [0, 1, 2, 3]  # dense, same positions


def test_converse_stream_truncated_call_is_governed():
    data = converse_three_calls()
    frames = EventStreamDecoder().feed(data)
    cut = b"".join(m.raw for m in frames[:6])  # get_weather started, no contentBlockStop
    gov = conv.Governor(CONV_STREAM_PATH, ES, True)
    out = run(gov, cut, Script(default=deny()), seed=3)
    assert [c.name for c in gov.calls] == ["get_weather"] and gov.calls[0].arguments == '{"city":'
    kinds = [m.headers[":event-type"] for m in EventStreamDecoder().feed(out)]
    assert kinds == ["messageStart", "contentBlockDelta", "contentBlockDelta", "contentBlockStop", "contentBlockDelta"]


def test_converse_stream_error_frame(srv, boto):
    data = converse_three_calls()
    gov = conv.Governor(CONV_STREAM_PATH, ES, True)
    out = gov.feed(data[:300])  # inside the first tool call
    out += gov.error("sidegate: upstream broke")
    frames = EventStreamDecoder().feed(out)
    assert frames[-1].headers[":exception-type"] == "serviceUnavailableException"
    assert "contentBlockStart" not in [m.headers.get(":event-type") for m in frames]
    srv.enqueue(Reply(body=out, headers=[("content-type", ES)]))
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.EventStreamError):
        sdk.bedrock_converse(srv.url, True, client=boto)


def test_converse_stream_corrupt_frame_ends_with_error():
    data = bytearray(converse_three_calls())
    data[200] ^= 0xFF
    gov = conv.Governor(CONV_STREAM_PATH, ES, True)
    out = run(gov, bytes(data), Script(), seed=None)
    assert EventStreamDecoder().feed(out)[-1].headers[":message-type"] == "exception"


# -- Converse: non-stream -------------------------------------------------------------------

@pytest.mark.parametrize("fixture", CONV_BODIES)
def test_converse_extract(fixture):
    calls = conv.extract(CONV_PATH, load_fixture(fixture))
    meta = load_meta(fixture)
    assert _gov_calls(calls) == _meta_calls(meta)
    assert [c.call_id for c in calls] == [c["id"] for c in meta["tool_calls"]]
    assert conv.extract(CONV_PATH, b'{"output": {"message": {"content": [{"text": "hi"}]}}}') == []


def _body_plans(fixtures, extract, path, modes):
    out = []
    for f in fixtures:
        n = len(extract(path, load_fixture(f)))
        for mode in modes:
            if mode in ("deny_all", "escalate_all") or n >= (3 if mode == "deny_middle" else 2):
                out.append(pytest.param(f, mode, id=f"{f.split('/')[1]}-{mode}"))
    return out


def _plan(mode: str, n: int) -> list[Verdict]:
    return {"deny_all": [deny()] * n, "escalate_all": [escalate()] * n,
            "deny_first": [deny("first")] + [ALLOW] * (n - 1),
            "deny_last": [ALLOW] * (n - 1) + [deny("last")],
            "deny_middle": [ALLOW, deny("middle")] + [ALLOW] * (n - 2)}[mode]


@pytest.mark.parametrize("fixture,mode", _body_plans(CONV_BODIES, conv.extract, CONV_PATH,
                                                     ("deny_all", "escalate_all", "deny_first", "deny_last")))
def test_converse_rewrite(srv, boto, fixture, mode):
    body = load_fixture(fixture)
    meta = load_meta(fixture)
    calls = conv.extract(CONV_PATH, body)
    verdicts = _plan(mode, len(calls))
    out = conv.rewrite(CONV_PATH, body, calls, verdicts)
    got = _converse_sdk(srv, boto, out, False)
    assert got == _expect(_meta_calls(meta), meta["text"], verdicts, "tool_use", "end_turn")
    doc = json.loads(out)
    ids = {b["toolUse"]["toolUseId"] for b in doc["output"]["message"]["content"] if "toolUse" in b}
    for b in doc["output"]["message"]["content"]:  # no orphan toolResult
        if "toolResult" in b:
            assert b["toolResult"]["toolUseId"] in ids


# -- Gemini: pure level ---------------------------------------------------------------------

def _gem(path=GEM_SSE_PATH, ctype=SSE, enforce=True):
    return gem.Governor(path, ctype, enforce)


@pytest.mark.parametrize("fixture", GEM_STREAMS)
@pytest.mark.parametrize("form", ["sse", "array"])
def test_gemini_stream_allow_is_byte_exact(fixture, form):
    data = load_fixture(fixture)
    path, ctype = (GEM_SSE_PATH, SSE) if form == "sse" else (GEM_ARRAY_PATH, JSON)
    if form == "array":
        data = _sse_to_array(data)
    for seed in (None,) + SEEDS:
        gov = _gem(path, ctype)
        assert type(gov).__name__ == ("_SSEGovernor" if form == "sse" else "_ArrayGovernor")
        assert isinstance(gov, gem.Governor)
        assert run(gov, data, Script(), seed) == data
        assert _gov_calls(gov.calls) == _meta_calls(load_meta(fixture))


@pytest.mark.parametrize("fixture", GEM_STREAMS)
def test_gemini_stream_observe_changes_nothing(fixture):
    data = load_fixture(fixture)
    for seed in SEEDS:
        gov = _gem(enforce=False)
        # (run_governor checks that every resolve() of an observe-mode governor returns b"")
        assert run(gov, data, lambda call: deny(), seed) == data
        assert _gov_calls(gov.calls) == _meta_calls(load_meta(fixture))


def test_gemini_text_chunks_pass_as_is():
    data = load_fixture("gemini/pai-gemini-text.sse")
    gov = _gem()
    for blk in data.split(b"\r\n\r\n")[:-1]:
        ev = blk + b"\r\n\r\n"
        assert gov.feed(ev) is ev


def test_gemini_partial_call_is_held_until_complete():
    data = load_fixture("gemini/vercel-gemini-partial-args-two-calls.sse")
    events = [b + b"\r\n\r\n" for b in data.split(b"\r\n\r\n") if b.strip()]
    gov = _gem()
    for ev in events[:3]:
        assert gov.feed(ev) == b"" and not gov.pending
    assert gov.feed(events[3]) == b""
    assert [(c.name, c.arguments) for c in gov.pending] == [("getWeather", '{"location":"Boston"}')]
    assert gov.resolve([ALLOW]) == b"".join(events[:4])


def test_gemini_assemble_partial_args():
    pa = gem._PartialArg
    frags = [pa("$.a.b[1].c", stringValue="x"), pa("$.a.b[1].c", stringValue="y"), pa("$.n", numberValue=3),
             pa("$.f", numberValue=1.5), pa("$.t", boolValue=False), pa("$['q k']", stringValue="v"),
             pa("$.z", nullValue=msgspec.Raw(b'"NULL_VALUE"')), pa("$.a.b[0]", stringValue="first")]
    assert gem.assemble_partial_args(frags) == {"a": {"b": ["first", {"c": "xy"}]}, "n": 3, "f": 1.5, "t": False,
                                               "q k": "v", "z": None}


# -- Gemini: SDK level ----------------------------------------------------------------------

def _gemini_sdk(srv, genai, body: bytes, stream: bool) -> tuple[sdk.Outcome, list]:
    """google-genai's view: calls assembled from whole parts or partialArgs, text, finish
    reason, and every part (to check thought signatures)."""
    srv.enqueue(Reply(body=body, headers=[("content-type", SSE if stream else JSON)], chunk_sizes="random"))
    model = "gemini-2.5-flash"
    responses = (list(genai.models.generate_content_stream(model=model, contents="hi")) if stream
                 else [genai.models.generate_content(model=model, contents="hi")])
    calls, text, stop, parts = [], [], None, []
    for r in responses:
        for cand in r.candidates or []:
            for part in (cand.content.parts if cand.content and cand.content.parts else []):
                parts.append(part)
                fc = part.function_call
                if fc is not None:
                    if fc.name:
                        calls.append({"name": fc.name, "arguments": dict(fc.args or {})})
                    for pa in fc.partial_args or []:
                        sdk.set_partial_arg(calls[-1]["arguments"], pa)
                elif part.text and not part.thought:
                    text.append(part.text)
            if cand.finish_reason:
                stop = cand.finish_reason.value
    return sdk.Outcome(calls, "".join(text), stop), parts



@pytest.mark.parametrize("fixture", GEM_TOOL_STREAMS)
@pytest.mark.parametrize("verdict", [deny("no"), escalate()], ids=["deny", "escalate"])
def test_gemini_stream_deny_all(srv, genai, fixture, verdict):
    data = load_fixture(fixture)
    meta = load_meta(fixture)
    gov = _gem()
    out = run(gov, data, Script(default=verdict), seed=5)
    assert out == run(_gem(), data, Script(default=verdict), seed=None)
    assert b'"functionCall"' not in out
    got, _ = _gemini_sdk(srv, genai, out, True)
    assert got == _expect(_meta_calls(meta), meta["text"], [verdict] * len(meta["tool_calls"]), "STOP", "STOP")
    # the official driver agrees once no partialArgs are left
    srv.enqueue(Reply(body=out, headers=[("content-type", SSE)], chunk_sizes="random"))
    assert sdk.gemini_generate(srv.url, True, client=genai) == got
    # array form: same result
    arr = run(_gem(GEM_ARRAY_PATH, JSON), _sse_to_array(data), Script(default=verdict), seed=5)
    assert _gemini_sdk(srv, genai, _array_to_sse(arr), True)[0] == got


@pytest.mark.parametrize("plan", [(0,), (1,)], ids=["deny_first", "deny_second"])
@pytest.mark.parametrize("form", ["sse", "array"])
def test_gemini_partial_args_deny_one_of_two(srv, genai, plan, form):
    fixture = "gemini/vercel-gemini-partial-args-two-calls.sse"
    data = load_fixture(fixture)
    meta = load_meta(fixture)
    verdicts = [deny("weather is private") if i in plan else ALLOW for i in range(2)]
    if form == "sse":
        out = run(_gem(), data, Script(dict(enumerate(verdicts))), seed=11)
    else:
        arr = run(_gem(GEM_ARRAY_PATH, JSON), _sse_to_array(data), Script(dict(enumerate(verdicts))), seed=11)
        json.loads(arr)
        out = _array_to_sse(arr)
    got, parts = _gemini_sdk(srv, genai, out, True)
    assert got == _expect(_meta_calls(meta), "", verdicts, "STOP", "STOP")
    sig = [p for p in parts if p.thought_signature]
    kept_call = next(p for p in parts if p.function_call and p.function_call.name)
    if plan == (0,):
        # Gemini 3 wants the step's signature on its first function call: the kept one gets a copy
        assert kept_call.thought_signature == sig[0].thought_signature and sig[0].text
    else:
        assert sig[0] is kept_call


def test_gemini_parallel_stream_deny_first_moves_signature(srv, genai):
    data = gemini_parallel_stream()
    body = json.loads(load_fixture("gemini/pai-gemini-parallel-function-calls-nonstream.json"))
    original_sig = base64.b64decode(body["candidates"][0]["content"]["parts"][0]["thoughtSignature"])
    verdicts = [deny("topic"), ALLOW, ALLOW]
    gov = _gem()
    out = run(gov, data, Script(dict(enumerate(verdicts))), seed=2)
    assert [c.name for c in gov.calls] == ["generate_topic"] * 3
    assert [c.index for c in gov.calls] == [0, 1, 2]
    got, parts = _gemini_sdk(srv, genai, out, True)
    assert got == sdk.Outcome([{"name": "generate_topic", "arguments": {}}] * 2,
                              "Three topics: [SIDEGATE DENIED] tool=generate_topic reason=topic", "STOP")
    assert [bool(p.thought_signature) for p in parts] == [False, False, True, False]
    assert parts[2].thought_signature == original_sig and parts[2].function_call


def test_gemini_stream_error_frames():
    data = load_fixture("gemini/vercel-gemini-partial-args-two-calls.sse")
    gov = _gem()
    out = gov.feed(data[:2500]) + gov.error("sidegate: upstream broke")
    assert out.startswith(b"data: {") and b"functionCall" not in out and out.endswith(b"\r\n\r\n")
    assert json.loads(out[6:])["error"]["code"] == 502
    arr = _sse_to_array(data)
    for cut in (1, 2500, len(arr) // 2, len(arr) - 1):
        gov = _gem(GEM_ARRAY_PATH, JSON)
        out = gov.feed(arr[:cut]) + gov.error("sidegate: upstream broke")
        doc = json.loads(out)
        assert doc[-1]["error"]["status"] == "UNAVAILABLE"
    # text before the break went out: the error continues the array
    arr = _sse_to_array(load_fixture("gemini/pai-gemini-text.sse"))
    gov = _gem(GEM_ARRAY_PATH, JSON)
    out = gov.feed(arr[:-1]) + gov.error("x")
    doc = json.loads(out)
    assert doc[:-1] == json.loads(arr) and doc[-1]["error"]["message"] == "x"


# -- Gemini: non-stream ---------------------------------------------------------------------

@pytest.mark.parametrize("fixture", GEM_BODIES)
def test_gemini_extract(fixture):
    calls = gem.extract(GEM_PATH, load_fixture(fixture))
    assert _gov_calls(calls) == _meta_calls(load_meta(fixture))
    assert gem.extract(GEM_PATH, load_fixture("gemini/pai-gemini-text.sse")[6:].split(b"\r\n")[0]) == []


@pytest.mark.parametrize("fixture,mode", _body_plans(GEM_BODIES, gem.extract, GEM_PATH,
                                                     ("deny_all", "escalate_all", "deny_first", "deny_middle",
                                                      "deny_last")))
def test_gemini_rewrite(srv, genai, fixture, mode):
    body = load_fixture(fixture)
    meta = load_meta(fixture)
    calls = gem.extract(GEM_PATH, body)
    verdicts = _plan(mode, len(calls))
    out = gem.rewrite(GEM_PATH, body, calls, verdicts)
    got, _ = _gemini_sdk(srv, genai, out, False)
    assert got == _expect(_meta_calls(meta), meta["text"], verdicts, "STOP", "STOP")
    srv.enqueue(Reply(body=out, headers=[("content-type", JSON)]))
    assert sdk.gemini_generate(srv.url, False, client=genai) == got
    doc = json.loads(out)
    cand = doc["candidates"][0]
    if all(not v.allowed for v in verdicts):
        assert "finishMessage" not in cand
    elif "finishMessage" in json.loads(body)["candidates"][0]:
        assert cand["finishMessage"] == "Model generated function call(s)."
    had_sig = any("thoughtSignature" in p for p in json.loads(body)["candidates"][0]["content"]["parts"])
    sigs = [p for p in cand["content"]["parts"] if "thoughtSignature" in p]
    assert len(sigs) == (1 if had_sig else 0)
    if had_sig and any(v.allowed for v in verdicts):
        assert "functionCall" in sigs[0]  # the signature stays on the first kept call


# -- framing: the same bytes at the same moments as the plain relay when nothing is held ------

def _text_only(fixtures):
    return [f for f in fixtures if not load_meta(f)["tool_calls"]]


@pytest.mark.parametrize("fixture,enforce",
                         [pytest.param(f, False, id=f"observe-{f}") for f in CONV_STREAMS + GEM_STREAMS]
                         + [pytest.param(f, True, id=f"enforce-{f}") for f in _text_only(CONV_STREAMS + GEM_STREAMS)])
def test_chunk_by_chunk_like_the_plain_framer(fixture, enforce):
    """Observe mode (any stream) and enforce mode (streams without a call) emit exactly
    what the dialect's plain framer emits, chunk by chunk."""
    data = load_fixture(fixture)
    conv_fixture = fixture.startswith("bedrock-converse/")
    for seed in SEEDS:
        if conv_fixture:
            plain, gov = bedrock_dialect.framer(CONV_STREAM_PATH, ES), conv.Governor(CONV_STREAM_PATH, ES, enforce)
        else:
            plain, gov = gemini_dialect.framer(GEM_SSE_PATH, SSE), _gem(enforce=enforce)
        for chunk in _split(data, seed):
            want = plain.feed(chunk)
            got = gov.feed(chunk)
            while gov.pending:
                got += gov.resolve([ALLOW for _ in gov.pending])
            assert got == want
            if want is chunk:
                assert got is chunk
        assert gov.close() == plain.close()


@pytest.mark.parametrize("fixture", GEM_TOOL_STREAMS + CONV_TOOL_STREAMS)
def test_tiny_chunks(fixture):
    data = load_fixture(fixture)
    stream = fixture.endswith(".sse")
    mk = (lambda: _gem()) if stream else (lambda: conv.Governor(CONV_STREAM_PATH, ES, True))
    pieces = split_random(data, 9, max_size=3)
    for decide in (Script(), Script(default=deny())):
        out = run_governor(mk(), pieces, decide)
        whole = run(mk(), data, Script(default=decide.default), seed=None)
        assert out == whole
        if decide.default.allowed:
            assert whole == data


def test_gemini_lf_framing_and_unterminated_last_event(srv, genai):
    fixture = "gemini/vercel-gemini-partial-args-two-calls.sse"
    data = load_fixture(fixture).replace(b"\r\n", b"\n")
    for body in (data, data[:-2]):
        for seed in (None,) + SEEDS:
            gov = _gem()
            assert run(gov, body, Script(), seed) == body
            assert _gov_calls(gov.calls) == _meta_calls(load_meta(fixture))
    out = run(_gem(), data, Script(default=deny("lf")), seed=1)
    assert b"\r" not in out
    got, _ = _gemini_sdk(srv, genai, out, True)
    marker = "[SIDEGATE DENIED] tool=getWeather reason=lf"
    assert got == sdk.Outcome([], marker * 2, "STOP")


def test_gemini_truncated_partial_call_is_governed():
    data = load_fixture("gemini/vercel-vertex-partial-args-nested.sse")
    events = [b + b"\r\n\r\n" for b in data.split(b"\r\n\r\n") if b.strip()]
    cut = b"".join(events[:4])  # cookRecipe opened, ingredients[0] streaming, no end
    gov = _gem()
    out = run(gov, cut, Script(default=deny("cut")), seed=4)
    assert [(c.name, json.loads(c.arguments)) for c in gov.calls] == [
        ("cookRecipe", {"recipe": {"ingredients": [{"amount": "16 oz", "name": "Lasagna noodles"}]}})]
    assert out.count(b"data: ") == 1 and b"[SIDEGATE DENIED] tool=cookRecipe reason=cut" in out
    gov = _gem(enforce=False)
    assert run(gov, cut, Script(default=deny()), seed=4) == cut and len(gov.calls) == 1


def test_vertex_client_reads_denied_partial_call(srv):
    """The nested partialArgs recording is Vertex traffic: google-genai in Vertex mode."""
    fixture = "gemini/vercel-vertex-partial-args-nested.sse"
    gov = _gem("/v1/projects/p/locations/l/publishers/google/models/gemini-3:streamGenerateContent?alt=sse", SSE)
    out = run(gov, load_fixture(fixture), Script(default=escalate("recipes need review")), seed=6)
    assert gov.calls[0].canonical_arguments() == msgspec.json.encode(
        load_meta(fixture)["tool_calls"][0]["arguments"], order="sorted").decode()
    assert out.count(b"data: ") == 2  # the opening chunk as text, the finish chunk
    vertex = sdk.genai_client(srv.url, route="vertex-gemini")
    got, parts = _gemini_sdk(srv, vertex, out, True)
    marker = "[SIDEGATE ESCALATED] escalation=esc_123 tool=cookRecipe reason=recipes need review"
    assert got == sdk.Outcome([], marker, "STOP")
    assert parts[0].thought_signature  # kept on the text part: no other call in the step


# -- framing helper -----------------------------------------------------------------------

def _last_event_end_reference(buf: bytes) -> int:
    """Every blank-line ending, searched over the whole buffer."""
    return max([buf.rfind(sep) + len(sep) for sep in (b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n", b"\r\n\n")
                if buf.rfind(sep) >= 0] or [0])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"data: x"]), max_size=40), st.data())
def test_last_event_end_matches_a_whole_buffer_search(parts, data):
    # It looks for each ending past the best one found so far only: same answer, for any
    # buffer and any stop.
    buf = b"".join(parts)
    stop = data.draw(st.integers(0, len(buf)))
    assert last_event_end(buf) == _last_event_end_reference(buf)
    assert last_event_end(buf, stop) == _last_event_end_reference(buf[:stop])


def test_whole_stream_in_one_chunk_passes_its_text_events_as_one_piece():
    # The events before the first call leave as the chunk's own prefix (the decoder only
    # counts them); the call's event on is governed as when fed event by event.
    data = gemini_parallel_stream()
    cut = data.rfind(b"\r\n\r\n", 0, data.find(b'"functionCall')) + 4
    assert cut > 4
    whole = _gem()
    out = whole.feed(data)
    while whole.pending:
        out += whole.resolve([deny("no") for _ in whole.pending])
    out += whole.close()
    assert out.startswith(data[:cut]) and b'"functionCall"' not in out
    assert out == run(_gem(), data, Script(default=deny("no")), seed=3)

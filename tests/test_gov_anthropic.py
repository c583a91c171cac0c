"""Tool-call governance for Anthropic Messages and Bedrock InvokeModel(*WithResponseStream).

Pure level: the governors are driven with fixture bytes split at random points and
scripted verdicts. Every rewritten output is then served by a fake upstream and read by
the official SDK (anthropic `messages.stream()` / `messages.create()`, boto3's
event-stream parser with CRC checks), which must end with the marker text, the remaining
calls with their exact arguments and the right stop reason.
"""

from __future__ import annotations

import base64
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sidegate_codecs.eventstream import EventStreamDecoder, encode_message
from sidegate_codecs.sse import SSEDecoder

from gateway.governance import anthropic as anth
from gateway.governance import bedrock_invoke as binv
from gateway.governance.base import Verdict
from tests.support import sdk_drivers as sdk
from tests.support.fake_upstream import FakeUpstream, Reply, load_fixture, load_meta
from tests.support.govern import run_governor, split_bytes, split_random, split_sizes

SSE_CTYPE = "text/event-stream; charset=utf-8"
ES_CTYPE = "application/vnd.amazon.eventstream"
MSG_PATH = "/v1/messages"
STREAM_PATH = "/model/us.anthropic.claude-sonnet-4-5-v1:0/invoke-with-response-stream"
INVOKE_PATH = "/model/us.anthropic.claude-sonnet-4-5-v1:0/invoke"
HEADERS = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}


# -- synthesized streams -------------------------------------------------------------------

def _dump(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def events_from_message(msg: dict) -> list[dict]:
    """The Anthropic event sequence that streams `msg` (pings inside tool blocks,
    arguments split into fragments, an empty first fragment as the API sends)."""
    head = {k: v for k, v in msg.items() if k not in ("content", "usage")}
    head.update(content=[], stop_reason=None, stop_sequence=None, usage={"input_tokens": 10, "output_tokens": 1})
    evs = [{"type": "message_start", "message": head}]
    for i, b in enumerate(msg["content"]):
        if b["type"] == "text":
            t = b["text"]
            evs.append({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}})
            for part in (t[: len(t) // 2], t[len(t) // 2:]):
                evs.append({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": part}})
        elif b["type"] == "tool_use":
            evs.append({"type": "content_block_start", "index": i,
                        "content_block": {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}})
            evs.append({"type": "ping"})
            args = json.dumps(b["input"])
            cut = [0, len(args) // 3, 2 * len(args) // 3, len(args)]
            evs.append({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": ""}})
            for a, z in itertools.pairwise(cut):
                evs.append({"type": "content_block_delta", "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": args[a:z]}})
        elif b["type"] == "thinking":
            evs.append({"type": "content_block_start", "index": i,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
            evs.append({"type": "content_block_delta", "index": i,
                        "delta": {"type": "thinking_delta", "thinking": b["thinking"]}})
            evs.append({"type": "content_block_delta", "index": i,
                        "delta": {"type": "signature_delta", "signature": b["signature"]}})
        evs.append({"type": "content_block_stop", "index": i})
    evs.append({"type": "message_delta", "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": 42}})
    evs.append({"type": "message_stop"})
    return evs


def to_sse(events: list[dict]) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + _dump(e) + b"\n\n" for e in events)


def sse_datas(data: bytes) -> list[bytes]:
    d = SSEDecoder()
    return [ev.data for ev in d.feed(data) + d.close() if ev.dispatches]


def to_eventstream(datas: list[bytes], pad: bool = False) -> bytes:
    out = []
    for i, raw in enumerate(datas):
        payload = {"bytes": base64.b64encode(raw).decode()}
        if pad:
            payload["p"] = "abcdefghijklmnopqrstuvwxyz"[: i % 26 + 1]
        out.append(encode_message(HEADERS, _dump(payload)))
    return b"".join(out)


def _meta_outcome(meta: dict) -> sdk.Outcome:
    return sdk.expected(meta)


PARALLEL = "anthropic/pai-anthropic-parallel-tool-use-nonstream.json"
THINK_TOOL = "anthropic/pai-anthropic-thinking-tool-use-nonstream.json"
INCOMPLETE = "anthropic/anth-sdk-incomplete-tool-json-max-tokens.sse"


def _synth_sse(fixture: str) -> bytes:
    return to_sse(events_from_message(json.loads(load_fixture(fixture))))


# (id, module, body, content type, meta-like expectation, SDK can read the allowed stream)
def _cases():
    cases = []
    for name in ("anth-sdk-tool-use", "vercel-anthropic-tool-no-args", "anth-sdk-incomplete-tool-json-max-tokens",
                 "pai-anthropic-server-tool-code-exec", "pai-anthropic-thinking-text", "anth-sdk-text",
                 "anth-sdk-refusal"):
        f = f"anthropic/{name}.sse"
        cases.append((name, anth, load_fixture(f), SSE_CTYPE, load_meta(f)))
    cases.append(("synth-parallel-4", anth, _synth_sse(PARALLEL), SSE_CTYPE, load_meta(PARALLEL)))
    cases.append(("synth-thinking-tool", anth, _synth_sse(THINK_TOOL), SSE_CTYPE, load_meta(THINK_TOOL)))
    for name in ("derived-claude-tool-use", "derived-claude-tool-use-padded", "derived-claude-text"):
        f = f"bedrock-invoke/{name}.bin"
        cases.append((name, binv, load_fixture(f), ES_CTYPE, load_meta(f)))
    cases.append(("bedrock-synth-parallel-4", binv, to_eventstream(sse_datas(_synth_sse(PARALLEL)), pad=True),
                  ES_CTYPE, load_meta(PARALLEL)))
    cases.append(("bedrock-incomplete", binv, to_eventstream(sse_datas(load_fixture(INCOMPLETE))),
                  ES_CTYPE, load_meta(INCOMPLETE)))
    return cases


CASES = _cases()
CASE_IDS = [c[0] for c in CASES]
TOOL_CASES = [c for c in CASES if c[4]["tool_calls"]]
TOOL_IDS = [c[0] for c in TOOL_CASES]


# -- driving -------------------------------------------------------------------------------

def _chunks(data: bytes, split) -> list[bytes]:
    if split == "whole":
        return [data]
    if split == "bytes":
        return split_bytes(data)
    return split_random(data, split, max_size=97)


def drive(mod, data: bytes, decide, enforce: bool = True, split=0, path: str = MSG_PATH, ctype: str = SSE_CTYPE):
    """Run a governor as the relay does; returns (output bytes, governor)."""
    gov = mod.Governor(path, ctype, enforce)
    return run_governor(gov, _chunks(data, split), decide), gov


def allow_all(call):
    return Verdict("allow")


def deny_all(call):
    return Verdict("deny", f"no {call.name}", rule="r1")


def escalate_all(call):
    return Verdict("escalate", "needs a human", escalation_id="esc_123")


def deny_nth(n):
    seen = []

    def decide(call):
        seen.append(call)
        return Verdict("deny", "not this one") if len(seen) - 1 == n else Verdict("allow")
    return decide


SCENARIOS = {"deny_all": lambda: deny_all, "escalate_all": lambda: escalate_all, "deny_second": lambda: deny_nth(1)}


def expected_after(meta: dict, verdicts: list[Verdict]) -> sdk.Outcome:
    """What a client must end up with. In every case here the text blocks come before the
    tool_use blocks, so marker texts follow the model's own text, in call order."""
    want = _meta_outcome(meta)
    kept, markers = [], []
    for call, v in zip(want.tool_calls, verdicts):
        if v.allowed:
            kept.append(call)
        else:
            markers.append(v.text(call["name"]))
    stop = want.stop_reason
    if stop == "tool_use" and not kept and want.tool_calls:
        stop = "end_turn"
    return sdk.Outcome(kept, want.text + "".join(markers), stop)


def inner_events(mod, out: bytes) -> list[dict]:
    if mod is anth:
        return [json.loads(d) for d in sse_datas(out)]
    d = EventStreamDecoder()
    return [sdk.decode_b64_chunk(m.payload) for m in d.feed(out) + d.close()]


def check_structure(events: list[dict]) -> None:
    """Blocks are numbered 0, 1, 2, ... in order; each delta and stop belongs to the open block."""
    nxt, open_ = 0, None
    for e in events:
        t = e["type"]
        if t == "content_block_start":
            assert open_ is None and e["index"] == nxt
            open_, nxt = e["index"], nxt + 1
        elif t == "content_block_delta":
            assert e["index"] == open_
        elif t == "content_block_stop":
            assert e["index"] == open_
            open_ = None


def _args(call) -> object:
    return sdk._args(call.arguments)


# -- pure level: allow / observe -------------------------------------------------------------

@pytest.mark.parametrize("split", ["whole", "bytes", 1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_allow_all_is_byte_exact(case, split):
    _, mod, data, ctype, meta = case
    out, gov = drive(mod, data, allow_all, split=split, ctype=ctype)
    assert out == data
    assert [(c.name, _args(c)) for c in gov.calls] == [(t["name"], t["arguments"]) for t in meta["tool_calls"]]
    assert [c.call_id for c in gov.calls] == [t.get("id") for t in meta["tool_calls"]]
    assert all(c.verdict.allowed for c in gov.calls)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_observe_mode_never_holds(case):
    _, mod, data, ctype, meta = case
    gov = mod.Governor(MSG_PATH, ctype, False)
    sent = []

    def after_feed(chunk, piece):
        sent.append(piece)
        # everything the codec has framed went out at once
        assert sum(map(len, sent)) == gov.decoder.offset

    # (run_governor checks that every resolve() of an observe-mode governor returns b"")
    assert run_governor(gov, _chunks(data, 7), deny_all, after_feed=after_feed) == data
    assert [c.name for c in gov.calls] == [t["name"] for t in meta["tool_calls"]]
    assert all(c.verdict.outcome == "deny" for c in gov.calls)  # recorded, not applied


def test_text_chunks_pass_as_the_same_objects():
    data = load_fixture("anthropic/anth-sdk-text.sse")
    gov = anth.Governor(MSG_PATH, SSE_CTYPE, True)
    events = [ev.raw for ev in SSEDecoder().feed(data)]
    for raw in events:
        assert gov.feed(raw) is raw
    frames = load_fixture("bedrock-invoke/derived-claude-text.bin")
    gov = binv.Governor(STREAM_PATH, ES_CTYPE, True)
    for m in EventStreamDecoder().feed(frames):
        assert gov.feed(m.raw) is m.raw


def test_tool_frames_are_held_text_is_not():
    data = load_fixture("anthropic/anth-sdk-tool-use.sse")
    dec = SSEDecoder()
    raws = [ev.raw for ev in dec.feed(data) + dec.close()]
    assert b'"tool_use"' in raws[6] and b'"content_block_stop","index":1' in raws[12]
    gov = anth.Governor(MSG_PATH, SSE_CTYPE, True)
    outs = [gov.feed(r) for r in raws[:12]]
    assert outs[:6] == raws[:6]  # message_start, text block, ping: straight through
    assert outs[6:] == [b""] * 6  # tool_use start + fragments held
    assert not gov.pending
    assert gov.feed(raws[12]) == b""  # content_block_stop: the call is complete
    assert [(c.name, c.arguments, c.index) for c in gov.pending] == [("get_weather", '{"location": "Paris"}', 1)]
    assert gov.feed(raws[13]) == b""  # behind the pending call
    assert gov.resolve([Verdict("allow")]) == b"".join(raws[6:14])
    assert gov.feed(raws[14]) == b""  # the final event has no blank line: close() flushes it
    assert gov.close() == raws[14]


# -- pure level: deny / escalate -------------------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("case", TOOL_CASES, ids=TOOL_IDS)
def test_rewrite_pure(case, scenario):
    _, mod, data, ctype, meta = case
    outs = set()
    for split in ("whole", "bytes", 11, 12):
        out, gov = drive(mod, data, SCENARIOS[scenario](), split=split, ctype=ctype)
        outs.add(out)
    assert len(outs) == 1  # the rewrite does not depend on how the upstream chunked the stream
    verdicts = [c.verdict for c in gov.calls]
    assert len(verdicts) == len(meta["tool_calls"])
    events = inner_events(mod, out)
    check_structure(events)
    got = sdk.anthropic_events(events)
    want = expected_after(meta, verdicts)
    if meta["tool_calls"][0].get("arguments_complete") is False:
        assert [c["name"] for c in got.tool_calls] == [c["name"] for c in want.tool_calls]
    else:
        assert got.tool_calls == want.tool_calls
    assert got.text == want.text
    assert got.stop_reason == want.stop_reason
    # events that are not part of a denied call went out as they came
    if mod is anth:
        for raw in (ev.raw for ev in SSEDecoder().feed(data)):
            if b'"tool_use"' not in raw and b"input_json_delta" not in raw:
                assert raw in out


@pytest.mark.parametrize("case", [c for c in CASES if not c[4]["tool_calls"]], ids=lambda c: c[0])
def test_no_client_tool_calls_pass_untouched(case):
    """Server tools (code execution), thinking, refusal, text: nothing to decide, even under deny."""
    _, mod, data, ctype, _ = case
    for split in ("whole", 4):
        out, gov = drive(mod, data, deny_all, split=split, ctype=ctype)
        assert out == data and gov.calls == []


def test_escalation_marker_text():
    data = load_fixture("anthropic/anth-sdk-tool-use.sse")
    out, _ = drive(anth, data, escalate_all)
    assert b'"text":"[SIDEGATE ESCALATED] escalation=esc_123 tool=get_weather reason=needs a human"' in out
    assert b'"stop_reason":"end_turn"' in out and b'"stop_reason":"tool_use"' not in out


def test_stop_reason_stays_when_a_call_remains():
    out, gov = drive(anth, _synth_sse(PARALLEL), deny_nth(0))
    assert [c.verdict.outcome for c in gov.calls] == ["deny", "allow", "allow", "allow"]
    assert b'"stop_reason":"tool_use"' in out


def test_start_input_without_deltas_is_the_arguments():
    evs = [{"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [],
                                                  "model": "x", "stop_reason": None, "usage": {}}},
           {"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "run", "input": {"cmd": "ls"}}},
           {"type": "content_block_stop", "index": 0},
           {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 1}},
           {"type": "message_stop"}]
    out, gov = drive(anth, to_sse(evs), deny_all)
    assert [(c.name, json.loads(c.arguments)) for c in gov.calls] == [("run", {"cmd": "ls"})]
    got = sdk.anthropic_events(inner_events(anth, out))
    assert got == sdk.Outcome([], "[SIDEGATE DENIED] tool=run reason=no run", "end_turn")


def test_stream_ending_inside_a_tool_block():
    data = load_fixture("anthropic/anth-sdk-tool-use.sse")
    cut = data.index(b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}")
    out, gov = drive(anth, data[:cut], deny_all, split=5)
    assert [c.name for c in gov.calls] == ["get_weather"]
    assert gov.calls[0].arguments == '{"location": "Paris"}'
    got = sdk.anthropic_events(inner_events(anth, out))
    assert got.text.endswith("[SIDEGATE DENIED] tool=get_weather reason=no get_weather")
    assert got.tool_calls == []


def test_error_drops_held_frames():
    data = load_fixture("anthropic/anth-sdk-tool-use.sse")
    cut = data.index(b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}")
    gov = anth.Governor(MSG_PATH, SSE_CTYPE, True)
    out = gov.feed(data[:cut])
    assert b"tool_use" not in out and b"input_json_delta" not in out
    err = gov.error("sidegate: upstream broke")
    assert err.startswith(b"event: error\ndata: ")
    assert json.loads(err.split(b"data: ", 1)[1])["error"]["message"] == "sidegate: upstream broke"
    assert not gov.pending

    frames = load_fixture("bedrock-invoke/derived-claude-tool-use.bin")
    msgs = EventStreamDecoder().feed(frames)
    gov = binv.Governor(STREAM_PATH, ES_CTYPE, True)
    out = gov.feed(b"".join(m.raw for m in msgs[:9]))
    assert out == b"".join(m.raw for m in msgs[:6])
    err, = EventStreamDecoder().feed(gov.error("sidegate: upstream broke"))
    assert err.headers[":exception-type"] == "serviceUnavailableException"


def test_corrupt_frame_fails_closed():
    frames = bytearray(load_fixture("bedrock-invoke/derived-claude-tool-use.bin"))
    msgs = EventStreamDecoder().feed(bytes(frames))
    off = sum(len(m.raw) for m in msgs[:8])
    frames[off + 30] ^= 0xFF  # inside a held input_json_delta frame
    gov = binv.Governor(STREAM_PATH, ES_CTYPE, True)
    out = gov.feed(bytes(frames[:off + 10])) + gov.feed(bytes(frames[off + 10:]))
    assert gov.feed(b"\0" * 20) == b""
    assert gov.close() == b""
    got = EventStreamDecoder().feed(out)
    assert got[-1].headers[":message-type"] == "exception"
    assert all(b"tool_use" not in base64.b64decode(json.loads(m.payload).get("bytes", "")) for m in got[:-1])


def test_bedrock_non_anthropic_bodies_pass_untouched():
    datas = [_dump({"generation": 'calls "tool_use" and \\"tool_use\\"', "stop_reason": None}),
             _dump({"outputText": "x", "kind": "tool_use", "index": 0}),
             _dump({"generation": "", "stop_reason": "tool_use"})]
    data = to_eventstream(datas) + encode_message(
        {":message-type": "exception", ":exception-type": "throttlingException", ":content-type": "application/json"},
        b'{"message":"slow down"}')
    for split in ("whole", "bytes", 3):
        out, gov = drive(binv, data, deny_all, split=split, path=STREAM_PATH, ctype=ES_CTYPE)
        assert out == data and gov.calls == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=8), st.binary(max_size=8))
def test_bedrock_base64_needles_find_every_alignment(pre, post):
    enc = base64.b64encode(pre + b'"tool_use"' + post)
    assert any(n in enc for n in binv._b64_needles(b'"tool_use"'))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.sampled_from(TOOL_CASES))
def test_any_chunking_same_output(sizes, case):
    _, mod, data, ctype, _ = case
    ref, _ = drive(mod, data, deny_nth(0), ctype=ctype)
    gov = mod.Governor(MSG_PATH, ctype, True)
    assert run_governor(gov, split_sizes(data, sizes), deny_nth(0)) == ref


# -- non-streaming --------------------------------------------------------------------------

NONSTREAM = ["anthropic/pai-anthropic-tool-use-nonstream.json", THINK_TOOL, PARALLEL]


@pytest.mark.parametrize("mod,path", [(anth, MSG_PATH), (binv, INVOKE_PATH)], ids=["anthropic", "bedrock"])
@pytest.mark.parametrize("fixture", NONSTREAM)
def test_extract_nonstream(fixture, mod, path):
    body, meta = load_fixture(fixture), load_meta(fixture)
    calls = mod.extract(path, body)
    assert [(c.name, json.loads(c.arguments), c.call_id) for c in calls] == \
        [(t["name"], t["arguments"], t["id"]) for t in meta["tool_calls"]]
    assert mod.rewrite(path, body, calls, [Verdict("allow")] * len(calls)) is body


def test_extract_nonstream_no_tools():
    body = json.dumps({"type": "message", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"})
    assert anth.extract(MSG_PATH, body.encode()) == []
    assert anth.extract(MSG_PATH, b'{"not":"json"') == []
    assert binv.extract(INVOKE_PATH, b'{"generation":"tool_use","stop_reason":"stop"}') == []


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("fixture", NONSTREAM)
def test_rewrite_nonstream_pure(fixture, scenario):
    body, meta = load_fixture(fixture), load_meta(fixture)
    calls = anth.extract(MSG_PATH, body)
    decide = SCENARIOS[scenario]()
    verdicts = [decide(c) for c in calls]
    out = json.loads(anth.rewrite(MSG_PATH, body, calls, verdicts))
    orig = json.loads(body)
    assert len(out["content"]) == len(orig["content"])
    for i, (a, b) in enumerate(zip(orig["content"], out["content"])):
        denied = [v for c, v in zip(calls, verdicts) if c.index == i and not v.allowed]
        if denied:
            assert b == {"type": "text", "text": denied[0].text(a["name"])}
        else:
            assert a == b
    assert {k: v for k, v in out.items() if k not in ("content", "stop_reason")} == \
        {k: v for k, v in orig.items() if k not in ("content", "stop_reason")}
    assert out["stop_reason"] == expected_after(meta, verdicts).stop_reason


# -- the official SDKs read every rewritten response --------------------------------------

@pytest.fixture(scope="module")
def up():
    f = FakeUpstream().start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def clients(up):
    return {"anthropic": sdk.anthropic_client(up.url), "bedrock": sdk.bedrock_client(up.url)}


def _serve(up, body: bytes, ctype: str, seed: int = 0) -> None:
    up.reset()
    up.enqueue(Reply(body=body, headers=[("content-type", ctype)], chunk_sizes="random", seed=seed))


def _read_stream(up, clients, mod, out: bytes, ctype: str) -> sdk.Outcome:
    _serve(up, out, ctype)
    if mod is anth:
        return sdk.anthropic_messages(up.url, True, client=clients["anthropic"])
    return sdk.bedrock_invoke(up.url, True, client=clients["bedrock"])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("case", TOOL_CASES, ids=TOOL_IDS)
def test_sdk_reads_rewritten_stream(up, clients, case, scenario):
    _, mod, data, ctype, meta = case
    out, gov = drive(mod, data, SCENARIOS[scenario](), split=5, ctype=ctype)
    got = _read_stream(up, clients, mod, out, ctype)
    want = expected_after(meta, [c.verdict for c in gov.calls])
    if meta["tool_calls"][0].get("arguments_complete") is False:
        # the SDK's partial-JSON reading of a truncated input is its own business
        assert [c["name"] for c in got.tool_calls] == [c["name"] for c in want.tool_calls]
    else:
        assert got.tool_calls == want.tool_calls
    assert got.text == want.text
    assert got.stop_reason == want.stop_reason


@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith(("synth", "bedrock-synth", "derived"))],
                         ids=lambda c: c[0])
def test_sdk_reads_allowed_synthesized_stream(up, clients, case):
    """Sanity check of the synthesized streams themselves: allowed, the SDK gets the meta."""
    _, mod, data, ctype, meta = case
    out, _ = drive(mod, data, allow_all, split=3, ctype=ctype)
    got = _read_stream(up, clients, mod, out, ctype)
    assert got == _meta_outcome(meta)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("fixture", NONSTREAM)
def test_sdk_reads_rewritten_nonstream(up, clients, fixture, scenario):
    body, meta = load_fixture(fixture), load_meta(fixture)
    for mod, path in ((anth, MSG_PATH), (binv, INVOKE_PATH)):
        calls = mod.extract(path, body)
        decide = SCENARIOS[scenario]()
        verdicts = [decide(c) for c in calls]
        out = mod.rewrite(path, body, calls, verdicts)
        _serve(up, out, "application/json")
        if mod is anth:
            got = sdk.anthropic_messages(up.url, False, client=clients["anthropic"])
        else:
            got = sdk.bedrock_invoke(up.url, False, client=clients["bedrock"])
        assert got == expected_after(meta, verdicts)

"""Traces: usage extraction per dialect, readable views, the recorder (store, deltas,
retention, queue bound, metrics, audit), the CLI, OTLP export (to an in-test receiver)
and, once the relay submits records, the whole path through the real gateway with a
search for a leaked provider key."""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import os
import random
import re
import sqlite3
import threading
import time
import zlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from gateway.traces import CallRecord, Recorder, find_usage, request_view, response_view, usage_of
from gateway.traces import cli as traces_cli
from gateway.traces import store
from gateway.traces.extract import Usage
from sidegate_codecs import EventStreamDecoder, encode_message
from tests.support.fake_upstream import all_fixtures, load_fixture, load_meta

ROOT = Path(__file__).resolve().parents[1]

# fixture folder -> (dialect, path template by stream)
ROUTES = {
    "openai-chat": ("openai", "/v1/chat/completions", "/v1/chat/completions"),
    "openai-responses": ("openai", "/v1/responses", "/v1/responses"),
    "anthropic": ("anthropic", "/v1/messages", "/v1/messages"),
    "gemini": ("gemini", "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
               "/v1beta/models/gemini-2.5-flash:generateContent"),
    "bedrock-converse": ("bedrock", "/model/amazon.nova-pro-v1:0/converse-stream",
                         "/model/amazon.nova-pro-v1:0/converse"),
    "bedrock-invoke": ("bedrock", "/model/anthropic.claude-3-5-sonnet/invoke-with-response-stream",
                       "/model/anthropic.claude-3-5-sonnet/invoke"),
}
PROVIDER = {"openai": "openai", "anthropic": "anthropic", "gemini": "gemini", "bedrock": "bedrock"}
FIXTURES = all_fixtures()


def route(rel: str, meta: dict) -> tuple[str, str]:
    dialect, stream_path, body_path = ROUTES[rel.split("/")[0]]
    return dialect, stream_path if meta.get("stream") else body_path


def expected_usage(dialect: str, u: dict | None) -> Usage | None:
    """The meta's provider usage object, normalised the documented way."""
    if not u:
        return None
    if dialect == "gemini":
        return Usage(u.get("promptTokenCount", 0) + u.get("toolUsePromptTokenCount", 0),
                     u.get("candidatesTokenCount", 0) + u.get("thoughtsTokenCount", 0),
                     u.get("cachedContentTokenCount", 0))
    if "inputTokens" in u:  # Bedrock Converse
        r, w = u.get("cacheReadInputTokens", 0), u.get("cacheWriteInputTokens", 0)
        return Usage(u["inputTokens"] + r + w, u["outputTokens"], r)
    if "prompt_tokens" in u:  # OpenAI chat
        return Usage(u["prompt_tokens"], u["completion_tokens"],
                     (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    if "input_tokens_details" in u:  # OpenAI Responses
        return Usage(u["input_tokens"], u["output_tokens"], u["input_tokens_details"].get("cached_tokens", 0))
    r, w = u.get("cache_read_input_tokens", 0), u.get("cache_creation_input_tokens", 0)  # Anthropic
    return Usage(u["input_tokens"] + r + w, u["output_tokens"], r)


def frames(body: bytes) -> list[bytes]:
    dec = EventStreamDecoder()
    return [m.raw for m in dec.feed(body) + dec.close()]


def split_random(body: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(body):
        n = rng.randint(1, 700)
        out.append(body[i:i + n])
        i += n
    return out


def sent_chunks(rel: str, body: bytes, seed: int = 1) -> list[bytes]:
    """The chunks the relay would send: whole frames for event-stream, else any split."""
    if rel.endswith(".bin"):
        fs = frames(body)
        rng = random.Random(seed)
        out, i = [], 0
        while i < len(fs):  # several frames per chunk sometimes
            n = rng.randint(1, 3)
            out.append(b"".join(fs[i:i + n]))
            i += n
        return out
    return split_random(body, random.Random(seed))


# -- usage ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", FIXTURES)
def test_usage_equals_the_providers_own_numbers(rel):
    meta, body = load_meta(rel), load_fixture(rel)
    dialect, path = route(rel, meta)
    want = expected_usage(dialect, meta.get("usage"))
    ctype = meta["content_type"]
    assert find_usage(dialect, path, ctype, body) == want
    assert find_usage(dialect, path, ctype, sent_chunks(rel, body)) == want
    assert find_usage(dialect, path, ctype, split_random(body, random.Random(7))) == want
    assert usage_of(dialect, path, ctype, body) == (want or Usage())


def test_every_dialect_and_both_modes_are_covered():
    seen = set()
    for rel in FIXTURES:
        meta = load_meta(rel)
        if meta.get("usage"):
            seen.add((rel.split("/")[0], bool(meta.get("stream"))))
    for folder in ("openai-chat", "anthropic", "gemini", "bedrock-converse"):
        assert (folder, True) in seen and (folder, False) in seen, folder
    assert ("openai-responses", True) in seen and ("bedrock-invoke", True) in seen


def _invoke_stream(events: list[dict], metrics: dict | None) -> list[bytes]:
    import base64

    out = []
    for i, ev in enumerate(events):
        ev = dict(ev)
        if metrics and i == len(events) - 1:
            ev["amazon-bedrock-invocationMetrics"] = metrics
        payload = json.dumps({"bytes": base64.b64encode(json.dumps(ev).encode()).decode()}).encode()
        out.append(encode_message({":event-type": "chunk", ":content-type": "application/json",
                                   ":message-type": "event"}, payload))
    return out


def test_bedrock_invoke_metrics_take_precedence():
    events = [{"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
              {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
              {"type": "message_stop"}]
    path, ct = "/model/x/invoke-with-response-stream", "application/vnd.amazon.eventstream"
    metrics = {"inputTokenCount": 1200, "outputTokenCount": 33, "cacheReadInputTokenCount": 1000,
               "invocationLatency": 900, "firstByteLatency": 200}
    assert find_usage("bedrock", path, ct, _invoke_stream(events, metrics)) == Usage(2200, 33, 1000)
    assert find_usage("bedrock", path, ct, b"".join(_invoke_stream(events, metrics))) == Usage(2200, 33, 1000)
    assert find_usage("bedrock", path, ct, _invoke_stream(events, None)) == Usage(5, 3, 0)
    # non-stream InvokeModel of other model families
    assert find_usage("bedrock", "/model/meta.llama3/invoke", "application/json",
                      b'{"generation":"x","prompt_token_count":7,"generation_token_count":9}') == Usage(7, 9, 0)
    assert find_usage("bedrock", "/model/amazon.nova/invoke", "application/json",
                      b'{"output":{},"usage":{"inputTokens":4,"outputTokens":2,"cacheReadInputTokenCount":1}}') \
        == Usage(5, 2, 1)


@pytest.mark.parametrize("dialect,path,ctype,body,want", [
    ("openai", "/v1/chat/completions", "text/event-stream",
     b'data: {"choices":[],"usage":null}\n\ndata: {"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":7,'
     b'"prompt_tokens_details":{"cached_tokens":64}}}\n\ndata: [DONE]\n\n', Usage(100, 7, 64)),
    ("openai", "/v1/responses", "text/event-stream",
     b'event: response.created\ndata: {"type":"response.created","response":{"usage":null}}\n\n'
     b'event: response.completed\ndata: {"type":"response.completed","response":{"tools":[{"parameters":'
     b'{"properties":{"usage":{"type":"string"}}}}],"usage":{"input_tokens":50,"input_tokens_details":'
     b'{"cached_tokens":20},"output_tokens":5}}}\n\n', Usage(50, 5, 20)),
    ("anthropic", "/v1/messages", "text/event-stream",
     b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":10,'
     b'"cache_read_input_tokens":300,"cache_creation_input_tokens":40,"output_tokens":1}}}\n\n'
     b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta",'
     b'"text":"say \\"usage\\": {\\"input_tokens\\": 99}"}}\n\n'
     b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":12}}\n\n', Usage(350, 12, 300)),
    ("anthropic", "/v1/messages", "application/json",
     b'{"content":[{"type":"tool_use","input":{"usage":{"x":1}}}],"usage":{"input_tokens":3,"output_tokens":4,'
     b'"cache_read_input_tokens":2}}', Usage(5, 4, 2)),
    ("bedrock", "/model/x/converse", "application/json",
     b'{"output":{},"usage":{"inputTokens":10,"outputTokens":2,"cacheReadInputTokens":90,'
     b'"cacheWriteInputTokens":5}}', Usage(105, 2, 90)),
    ("gemini", "/v1beta/models/x:generateContent", "application/json",
     b'{"candidates":[],"usageMetadata":{"promptTokenCount":1000,"cachedContentTokenCount":800,'
     b'"candidatesTokenCount":10,"thoughtsTokenCount":30}}', Usage(1000, 40, 800)),
    ("gemini", "/v1beta/models/x:streamGenerateContent", "application/json",  # JSON-array stream
     b'[{"candidates":[],"usageMetadata":{"promptTokenCount":9}}\r\n,{"candidates":[],"usageMetadata":'
     b'{"promptTokenCount":9,"candidatesTokenCount":4}}]', Usage(9, 4, 0)),
    ("openai", "/v1/chat/completions", "application/json", b'{"error":{"message":"bad"}}', None),
    ("anthropic", "/v1/messages", "text/event-stream", b"", None),
])
def test_usage_cases(dialect, path, ctype, body, want):
    assert find_usage(dialect, path, ctype, body) == want


def test_usage_never_raises_on_garbage():
    rng = random.Random(3)
    for _ in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        junk = junk.replace(b"X", b'"usage":{') if rng.random() < 0.5 else junk
        for dialect, path, ct in (("openai", "/v1/chat/completions", "text/event-stream"),
                                  ("anthropic", "/v1/messages", "text/event-stream"),
                                  ("bedrock", "/model/x/invoke-with-response-stream", "application/vnd.amazon.eventstream"),
                                  ("bedrock", "/model/x/converse", "application/json"),
                                  ("gemini", "/m:generateContent", "application/json")):
            assert isinstance(usage_of(dialect, path, ct, junk), Usage)
            response_view(dialect, path, ct, junk)


# -- readable views ----------------------------------------------------------------------------

def _args(v):
    try:
        return json.loads(v)
    except ValueError:
        return v


@pytest.mark.parametrize("rel", FIXTURES)
def test_response_view_matches_what_the_sdk_ends_up_with(rel):
    meta, body = load_meta(rel), load_fixture(rel)
    dialect, path = route(rel, meta)
    r = response_view(dialect, path, meta["content_type"], body)
    assert r.text == (meta["text"] or "")
    assert [(c["name"], _args(c["arguments"])) for c in r.tool_calls] == \
        [(t["name"], t["arguments"]) for t in meta["tool_calls"]]
    assert r.stop_reason == meta["stop_reason"]


@pytest.mark.parametrize("rel", [r for r in FIXTURES if load_meta(r).get("request")])
def test_request_view_reads_messages_and_tools(rel):
    meta = load_meta(rel)
    dialect, path = route(rel, meta)
    req = meta["request"]
    q = request_view(dialect, path, json.dumps(req).encode())
    assert q.parsed and q.messages
    assert any(m["role"] == "user" for m in q.messages)
    n_tools = len(req.get("tools") or []) + len((req.get("toolConfig") or {}).get("tools") or [])
    if dialect != "gemini":
        assert len(q.tools) == n_tools
    elif n_tools:
        assert q.tools


# -- recorder helpers ----------------------------------------------------------------------------

def _request_for(rel: str, meta: dict) -> bytes:
    if meta.get("request"):
        return json.dumps(meta["request"]).encode()
    dialect = route(rel, meta)[0]
    if dialect == "gemini":
        return b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}'
    if "converse" in rel:
        return b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    return b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'


def record_for(rel: str, **kw) -> CallRecord:
    meta, body = load_meta(rel), load_fixture(rel)
    dialect, path = route(rel, meta)
    fields = dict(started=time.time(), ttfb_ms=12.5, duration_ms=40.0, provider=PROVIDER[dialect], dialect=dialect,
                  path=path, model="model-x", tenant="acme", actor="bot-7", session="", status=200,
                  traceparent=f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01",
                  request_body=_request_for(rel, meta), response_content_type=meta["content_type"],
                  response_chunks=sent_chunks(rel, body),
                  tool_calls=[{"name": t["name"], "arguments": json.dumps(t["arguments"]), "call_id": t.get("id"),
                               "decision": "allow", "reason": "", "rule": None, "escalation_id": None}
                              for t in meta["tool_calls"]],
                  error=None)
    fields.update(kw)
    return CallRecord(**fields)


def sample(name: str, labels: dict) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def handover(rec: CallRecord) -> CallRecord:
    """A copy to submit: submit takes the record's bytes (it empties them), and the tests
    compare what was stored with the original."""
    return msgspec.structs.replace(rec)


@pytest.fixture
def tmp_store(tmp_path):
    return str(tmp_path / "data" / "traces.sqlite")


# -- recorder ----------------------------------------------------------------------------------------

def test_recorder_stores_every_fixture_and_counts_tokens(tmp_store):
    tenant = f"t{os.getpid()}x"
    recs = [record_for(rel, tenant=tenant, session=f"s-{i % 4}") for i, rel in enumerate(FIXTURES)]
    before = {}
    for rec in recs:
        for kind in ("input", "output", "cached"):
            key = (rec.provider, kind)
            before.setdefault(key, sample("sidegate_tokens_total", {"provider": rec.provider, "tenant": tenant,
                                                                    "model": "model-x", "kind": kind}))
    dur_before = sample("sidegate_request_duration_ms_count", {"provider": "openai"})
    r = Recorder(tmp_store)
    for rec in recs:
        r.submit(handover(rec))
    assert r.flush(20)
    r.close()
    assert r.written == len(recs) and r.failed == 0 and r.dropped_full == 0
    assert oct(os.stat(tmp_store).st_mode & 0o777) == "0o600"

    want = {}
    for rel, rec in zip(FIXTURES, recs):
        u = expected_usage(rec.dialect, load_meta(rel).get("usage")) or Usage()
        for kind, n in zip(("input", "output", "cached"), u):
            want[(rec.provider, kind)] = want.get((rec.provider, kind), 0) + n
    for (provider, kind), n in want.items():
        got = sample("sidegate_tokens_total", {"provider": provider, "tenant": tenant, "model": "model-x",
                                               "kind": kind}) - before[(provider, kind)]
        assert got == n, (provider, kind)
    n_openai = sum(1 for rec in recs if rec.provider == "openai")
    assert sample("sidegate_request_duration_ms_count", {"provider": "openai"}) - dur_before == n_openai

    con = store.open_reader(tmp_store)
    rows = {row["traceparent"]: row for row in store.calls(con)}
    reader = store.Reader(con)
    for rel, rec in zip(FIXTURES, recs):
        row = rows[rec.traceparent]
        req, cut = reader.request(row["id"])
        assert req == rec.request_body and not cut
        assert reader.response(row["id"]) == b"".join(rec.response_chunks)
        u = expected_usage(rec.dialect, load_meta(rel).get("usage"))
        assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"]) == (u or (None, None, None))
        assert row["session"] == rec.session and row["tenant"] == tenant and row["actor"] == "bot-7"
        assert row["n_tool_calls"] == len(rec.tool_calls) and row["tool_calls"] == rec.tool_calls
        assert (row["dialect"], row["path"], row["ttfb_ms"], row["duration_ms"]) == (rec.dialect, rec.path, 12.5, 40.0)
        assert row["response_type"] == rec.response_content_type and row["status"] == 200


def test_session_falls_back_to_the_trace_id(tmp_store):
    r = Recorder(tmp_store)
    tid = os.urandom(16).hex()
    for _ in range(3):
        r.submit(record_for("openai-chat/oai-text.sse", traceparent=f"00-{tid}-{os.urandom(8).hex()}-01"))
    r.submit(record_for("openai-chat/oai-text.sse", session="explicit"))
    r.close()
    con = store.open_reader(tmp_store)
    assert sorted((x["shown"], x["calls"]) for x in store.sessions(con)) == [("explicit", 1), (f"trace:{tid}", 3)]
    assert len(list(store.calls(con, f"trace:{tid}"))) == 3
    assert [x["shown_session"] for x in store.calls(con)] == [f"trace:{tid}"] * 3 + ["explicit"]


def _conversation(n: int, session: str, tools: int = 8) -> list[CallRecord]:
    msgs = [{"role": "system", "content": "You are a careful agent. " * 100}]
    defs = [{"type": "function", "function": {"name": f"tool_{i}", "description": "does a thing " * 30,
                                              "parameters": {"type": "object"}}} for i in range(tools)]
    out = []
    for i in range(n):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "words " * 150})
        if i % 5 == 4:
            msgs.append({"role": "tool", "tool_call_id": f"call_{i}", "content": "result " * 100})
        body = json.dumps({"messages": msgs, "model": "gpt-4o", "tools": defs, "stream": True}).encode()
        out.append(record_for("openai-chat/oai-text.sse", session=session, request_body=body))
    return out


def test_requests_are_stored_as_deltas_and_rebuilt_exactly(tmp_store):
    a, b = _conversation(70, "conv-a"), _conversation(30, "conv-b")
    rng = random.Random(11)
    recs = []
    while a or b:  # interleaved sessions, each in order
        src = a if (a and (not b or rng.random() < 0.7)) else b
        recs.append(src.pop(0))
    r = Recorder(tmp_store, delta_chain_max=20, flush_interval=0.01)
    for i, rec in enumerate(recs):
        r.submit(handover(rec))
        if i % 17 == 0:
            r.flush()  # bases both in earlier batches and in the same batch
    r.close()
    con = store.open_reader(tmp_store)
    total = sum(len(x.request_body) for x in recs)
    stored = store.stored_bytes(con)
    rows = list(store.calls(con))
    deltas = sum(row["req_base"] is not None for row in rows)
    assert deltas > 50
    assert stored < total / 20, (stored, total)
    by_tp = {x.traceparent: x for x in recs}
    reader = store.Reader(con, batches=1, requests=2)
    for row in rows:
        full, _ = reader.request(row["id"])
        assert full == by_tp[row["traceparent"]].request_body
    # chains stay bounded
    base = {row["id"]: row["req_base"] for row in rows}
    chain_max = 0
    for cid in base:
        n, cur = 0, cid
        while cur is not None:
            cur = base[cur]
            n += cur is not None
        chain_max = max(chain_max, n)
    assert chain_max <= 20


def test_full_blocks_go_to_the_writer_at_once(tmp_store):
    """submit seals a block at batch_max calls (or 4 MB of bodies) and the writer takes it
    without waiting out its gather interval; deltas in and across blocks rebuild exactly."""
    conv = _conversation(23, "blocks")
    r = Recorder(tmp_store, batch_max=5, flush_interval=30.0)
    try:
        for rec in conv:
            r.submit(handover(rec))
        deadline = time.monotonic() + 5
        while r._processed < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r._processed >= 20  # four full blocks, long before the 30 s gather ends
        assert r.flush(5)
    finally:
        r.close()
    con = store.open_reader(tmp_store)
    assert con.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 5
    rows = list(store.calls(con))
    assert sum(row["req_base"] is not None for row in rows) >= 18  # all but each block's first, at least
    reader = store.Reader(con)
    for row, rec in zip(rows, conv):
        assert reader.request(row["id"])[0] == rec.request_body


def test_a_delta_never_builds_on_a_block_not_stored_yet(tmp_store):
    """A call whose base sits in a block the writer has taken but not stored (it could still
    fail) is stored whole; the next one builds on it within its own block."""
    conv = _conversation(3, "unstored")
    r, entered, gate = _stuck_recorder(tmp_store, flush_interval=0.0)
    r.submit(handover(conv[0]))
    assert entered.wait(5)  # the writer holds conv[0]'s block, not stored yet
    r.submit(handover(conv[1]))
    r.submit(handover(conv[2]))
    gate.set()
    assert r.flush(10)
    r.close()
    con = store.open_reader(tmp_store)
    rows = list(store.calls(con))
    assert [row["req_base"] is None for row in rows] == [True, True, False]
    assert rows[2]["req_base"] == rows[1]["id"]
    reader = store.Reader(con)
    for row, rec in zip(rows, conv):
        assert reader.request(row["id"])[0] == rec.request_body


def test_bodies_are_capped(tmp_store):
    big_req = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    chunks = [b"data: " + b"y" * 1000 + b"\n\n"] * 10
    r = Recorder(tmp_store, request_cap=2048, body_cap=4500)
    r.submit(record_for("openai-chat/oai-text.sse", request_body=big_req, response_chunks=chunks))
    r.close()
    con = store.open_reader(tmp_store)
    row = next(store.calls(con))
    reader = store.Reader(con)
    req, cut = reader.request(row["id"])
    assert cut and req == big_req[:2048] and row["request_size"] == len(big_req)
    assert reader.response(row["id"]) == b"".join(chunks[:4])  # whole chunks only
    assert row["response_size"] == sum(map(len, chunks)) and row["truncated"] == 3


def _stuck_recorder(path, **kw):
    """A Recorder whose writer, once it holds a batch, waits for `gate` (set it to go on);
    `entered` is set when it got there."""
    gate = threading.Event()
    entered = threading.Event()

    class Slow(Recorder):
        def _process(self, batch):
            entered.set()
            gate.wait(10)
            super()._process(batch)

    return Slow(path, **kw), entered, gate


def test_queue_full_drops_and_counts_without_blocking(tmp_store):
    before = sample("sidegate_trace_records_dropped_total", {"reason": "queue_full"})
    r, entered, gate = _stuck_recorder(tmp_store, max_queue=50, flush_interval=0.0)
    recs = [record_for("openai-chat/oai-text.sse") for _ in range(81)]
    r.submit(recs[0])
    assert entered.wait(5)  # the writer holds one record and is stuck
    worst = 0.0
    for rec in recs[1:]:
        t0 = time.perf_counter()
        r.submit(rec)
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.005
    assert r.dropped_full == 30
    assert sample("sidegate_trace_records_dropped_total", {"reason": "queue_full"}) - before == 30
    gate.set()
    assert r.flush(10)
    r.close()
    assert r.written == 51
    con = store.open_reader(tmp_store)
    assert store.count(con) == 51


def _noise_chunk() -> bytes:
    """1 KB that zstd cannot shrink: what a call holds while it waits is its compressed body."""
    return b"data: " + os.urandom(994) + b"\n\n"


def test_queue_is_bounded_by_bytes_too(tmp_store):
    """Waiting calls hold their compressed bodies: past max_queue_bytes calls are dropped
    and counted, and the room comes back once the writer has taken them."""
    before = sample("sidegate_trace_records_dropped_total", {"reason": "queue_full"})
    r, entered, gate = _stuck_recorder(tmp_store, max_queue=10000, max_queue_bytes=64 * 1024, flush_interval=0.0)
    first = record_for("openai-chat/oai-text.sse", request_body=b"{}", response_chunks=[_noise_chunk()])
    r.submit(first)
    assert entered.wait(5)  # the writer holds the first record and is stuck
    assert first.queued_bytes > 1000
    recs = [record_for("openai-chat/oai-text.sse", request_body=b"{}", response_chunks=[_noise_chunk() for _ in range(4)])
            for _ in range(40)]  # ~4 KB each: 16 reach 64 KB
    for rec in recs:
        r.submit(rec)
    fit = 40 - r.dropped_full
    held = r._bytes_in - r._bytes_out
    assert 64 * 1024 <= held < 64 * 1024 + 4300  # the bound, passed by at most the call that reached it
    assert 15 <= fit <= 17
    assert sample("sidegate_trace_records_dropped_total", {"reason": "queue_full"}) - before == 40 - fit
    gate.set()
    assert r.flush(10)
    assert r._bytes_in - r._bytes_out == 0
    r.submit(record_for("openai-chat/oai-text.sse", request_body=b"{}", response_chunks=[_noise_chunk()]))  # room again
    assert r.flush(10)
    r.close()
    assert r.written == 1 + fit + 1

def test_writer_takes_a_batch_early_when_bodies_pile_up(tmp_store):
    """The writer gathers a batch for flush_interval, but not while a quarter of
    max_queue_bytes (compressed bodies) waits: then it takes the batch at once (else big requests at a high
    rate would fill the byte cap within one interval and be dropped)."""
    r = Recorder(tmp_store, max_queue_bytes=64 * 1024, flush_interval=30.0)
    try:
        r.submit(record_for("openai-chat/oai-text.sse", request_body=b"{}", response_chunks=[_noise_chunk()]))
        time.sleep(0.2)  # the writer is now gathering for 30 s
        assert r._processed == 0
        for _ in range(20):  # 20 KB > 64 KB / 4
            r.submit(record_for("openai-chat/oai-text.sse", request_body=b"{}", response_chunks=[_noise_chunk()]))
        deadline = time.monotonic() + 5
        while r._processed == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        # the 17th record crossed 16 KB: at least those 17 went early (later ones may wait
        # for the next gather, which flush() ends)
        time.sleep(0.1)
        assert r._processed >= 17 and r.dropped_full == 0
        assert r.flush(5) and r._processed == 21
    finally:
        r.close()


def test_malformed_record_is_counted_not_raised(tmp_store):
    """A record submit cannot read (here a response chunk that is not bytes) is dropped and
    counted as record_error; the relay's call does not raise and the next call is stored."""
    before = sample("sidegate_trace_records_dropped_total", {"reason": "record_error"})
    r = Recorder(tmp_store)
    r.submit(record_for("openai-chat/oai-text.sse", response_chunks=[None]))
    r.submit(record_for("openai-chat/oai-text.sse"))
    assert r.flush(5)
    r.close()
    assert r.failed == 1 and r.submitted == 1 and r.written == 1
    assert sample("sidegate_trace_records_dropped_total", {"reason": "record_error"}) - before == 1
    assert store.count(store.open_reader(tmp_store)) == 1


def test_store_errors_are_counted_not_raised(tmp_path):
    path = tmp_path / "not-a-db.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    before = sample("sidegate_trace_records_dropped_total", {"reason": "store_error"})
    r = Recorder(str(path))
    r.submit(record_for("openai-chat/oai-text.sse"))
    assert r.flush(5)
    r.close()
    # either the store never opened (calls only counted) or the insert failed and was counted
    assert r.written == 0
    assert sample("sidegate_trace_records_dropped_total", {"reason": "store_error"}) - before in (0, 1)


# -- retention ------------------------------------------------------------------------------------

def test_retention_by_age_keeps_dependants_readable(tmp_store):
    now = time.time()
    conv = _conversation(6, "long-run")
    for i, rec in enumerate(conv):
        rec.started = now - 10 * 86400 + i * 3600 * 48  # days -10, -8, -6, -4, -2, 0
    r = Recorder(tmp_store, retention_days=365)
    for rec in conv:
        r.submit(handover(rec))
    r.close()
    con = store.open_writer(tmp_store)
    assert sum(row["req_base"] is not None for row in store.calls(con)) == 5
    deleted = store.enforce_retention(con, 7 * 86400, 0, now=now)
    assert deleted == 2
    rcon = store.open_reader(tmp_store)
    rows = list(store.calls(rcon))
    assert len(rows) == 4
    assert rows[0]["req_base"] is None  # rewritten whole before its base went
    reader = store.Reader(rcon)
    for row, rec in zip(rows, conv[2:]):
        assert reader.request(row["id"])[0] == rec.request_body
        assert reader.response(row["id"]) == b"".join(rec.response_chunks)


def test_retention_keeps_the_bases_of_calls_not_stored_yet(tmp_store):
    """The writer passes the batches that calls still on their way build on: retention by
    age or by size leaves them."""
    r = Recorder(tmp_store, retention_days=365)
    for age in (30, 20, 10):
        r.submit(record_for("openai-chat/oai-text.sse", started=time.time() - age * 86400))
        assert r.flush()
    r.close()
    con = store.open_writer(tmp_store)
    oldest, middle, newest = [b for (b,) in con.execute("SELECT id FROM batches ORDER BY id")]
    assert store.enforce_retention(con, 7 * 86400, 0, keep={middle}) == 2
    assert [b for (b,) in con.execute("SELECT id FROM batches")] == [middle]
    assert store.enforce_retention(con, 0, 1, keep={middle}) == 0  # by size: kept too
    assert store.count(con) == 1


def test_retention_by_age_runs_at_writer_start(tmp_store):
    r = Recorder(tmp_store)
    r.submit(record_for("openai-chat/oai-text.sse", started=time.time() - 30 * 86400))
    r.submit(record_for("openai-chat/oai-text.sse"))
    r.close()
    r = Recorder(tmp_store, retention_days=7)
    r.flush()
    time.sleep(0.2)
    r.close()
    con = store.open_reader(tmp_store)
    assert store.count(con) == 1


def test_retention_by_size(tmp_store):
    rng = random.Random(5)
    r = Recorder(tmp_store, retention_days=0, max_bytes=0)
    recs = []
    for i in range(300):
        noise = bytes(rng.randrange(256) for _ in range(3000)).hex().encode()  # incompressible-ish
        rec = record_for("openai-chat/oai-text.sse", session=f"s{i % 3}",
                         request_body=b'{"messages":[{"role":"user","content":"' + noise + b'"}]}')
        recs.append(rec)
        r.submit(handover(rec))
        if i % 10 == 9:
            # the writer stores a batch's bodies together, so retention frees whole batches:
            # flush to get many of them, whatever the thread timing
            assert r.flush()
    r.close()
    con = store.open_writer(tmp_store)
    before = store.used_bytes(con)
    limit = before // 3
    deleted = store.enforce_retention(con, 0, limit)
    assert deleted > 100
    assert store.used_bytes(con) <= limit
    rcon = store.open_reader(tmp_store)
    by_tp = {x.traceparent: x for x in recs}
    rows = list(store.calls(rcon))
    assert rows and all(by_tp[row["traceparent"]] is recs[-len(rows) + k] for k, row in enumerate(rows))
    reader = store.Reader(rcon)
    for row in rows:
        assert reader.request(row["id"])[0] == by_tp[row["traceparent"]].request_body
    assert os.path.getsize(tmp_store) < before  # pages handed back (incremental vacuum)



def test_retention_by_size_never_decodes_the_heads_of_the_batches_it_deletes(tmp_store, monkeypatch):
    """A size pass drops whole batches by id. Decoding their heads (hundreds of thousands of
    calls per pass on a busy sidecar) left tens of MiB in the worker's allocator after
    every pass: the 30-minute soak's memory growth."""
    rng = random.Random(7)
    r = Recorder(tmp_store, retention_days=0, max_bytes=0)
    for i in range(40):
        noise = bytes(rng.randrange(256) for _ in range(3000)).hex().encode()  # batches outweigh SQLite's pages
        r.submit(record_for("openai-chat/oai-text.sse", session=f"s{i}",
                            request_body=b'{"messages":[{"role":"user","content":"' + noise + b'"}]}'))
        if i % 4 == 3:
            assert r.flush()
    r.close()
    con = store.open_writer(tmp_store)
    decoded = []
    real = store.Reader.heads
    monkeypatch.setattr(store.Reader, "heads", lambda self, bid: decoded.append(bid) or real(self, bid))
    ids = [b for (b,) in con.execute("SELECT id FROM batches ORDER BY id")]
    assert len(ids) >= 5
    deleted = store.enforce_retention(con, 0, store.used_bytes(con) // 2)
    kept = {b for (b,) in con.execute("SELECT id FROM batches")}
    assert deleted >= 4 and kept and set(ids) - kept
    assert not set(decoded) - kept, "heads of deleted batches were decoded"
    assert store.count(con) == 40 - deleted


class _SqlSeen(sqlite3.Connection):
    """A connection that notes the text of every statement it runs."""

    seen: list[str]

    def execute(self, sql, *args):
        self.seen.append(sql)
        return super().execute(sql, *args)


def test_retention_statements_have_fixed_text_whatever_the_number_of_ids(tmp_store):
    """The connection caches prepared statements by their text: one `?` per id made each
    pass's id count a new statement, ~80 KiB each, and the writer's memory grew pass by pass."""
    rng = random.Random(9)
    r = Recorder(tmp_store, retention_days=0, max_bytes=0)
    for i in range(60):
        noise = bytes(rng.randrange(256) for _ in range(2000)).hex().encode()
        r.submit(record_for("openai-chat/oai-text.sse", session=f"s{i % 5}",
                            request_body=b'{"messages":[{"role":"user","content":"' + noise + b'"}]}'))
        if i % 3 == 2:
            assert r.flush()
    r.close()
    con = sqlite3.connect(tmp_store, isolation_level=None, factory=_SqlSeen)
    con.seen = []
    total = store.count(con)
    deleted = 0
    for frac in (0.8, 0.7):  # passes deleting different numbers of batches
        deleted += store.enforce_retention(con, 0, int(store.used_bytes(con) * frac))
    assert 0 < deleted < total and store.count(con) == total - deleted
    assert con.seen and max(sql.count("?") for sql in con.seen) <= 2, [sql for sql in con.seen if sql.count("?") > 2][:1]


# -- audit log ------------------------------------------------------------------------------------------

def test_audit_log_one_line_per_decision(tmp_path, tmp_store):
    audit = tmp_path / "audit" / "decisions.jsonl"
    calls = [{"name": "read_file", "arguments": '{"path":"/etc/shadow"}', "call_id": "c1", "decision": "deny",
              "reason": "secrets", "rule": "no-secrets", "escalation_id": None},
             {"name": "deploy", "arguments": '{"env":"prod"}', "call_id": "c2", "decision": "escalate",
              "reason": "needs a human", "rule": "prod", "escalation_id": "esc_1"}]
    r = Recorder(tmp_store, audit=str(audit))
    r.submit(record_for("openai-chat/oai-text.sse", tool_calls=calls, session="run-9"))
    r.submit(record_for("openai-chat/oai-text.sse", tool_calls=[]))
    r.close()
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [(x["tool"], x["decision"], x["reason"], x["rule"], x["escalation_id"]) for x in lines] == \
        [("read_file", "deny", "secrets", "no-secrets", None), ("deploy", "escalate", "needs a human", "prod", "esc_1")]
    assert all(x["session"] == "run-9" and x["tenant"] == "acme" and x["event"] == "tool_call_decision" for x in lines)
    assert "arguments" not in lines[0] and "/etc/shadow" not in audit.read_text()  # no content by default
    assert oct(audit.stat().st_mode & 0o777) == "0o600"

    audit2 = tmp_path / "audit2.jsonl"
    r = Recorder(tmp_store, audit=str(audit2), audit_content=True)
    r.submit(record_for("openai-chat/oai-text.sse", tool_calls=calls))
    r.close()
    assert json.loads(audit2.read_text().splitlines()[0])["arguments"] == '{"path":"/etc/shadow"}'


def test_env_settings():
    from gateway.traces import env_settings

    assert env_settings({}) == {}
    s = env_settings({"SIDEGATE_OTLP_ENDPOINT": "http://127.0.0.1:4318", "SIDEGATE_AUDIT": "stdout",
                      "SIDEGATE_TRACES_RETENTION_DAYS": "3", "SIDEGATE_TRACES_MAX_BYTES": "1000",
                      "SIDEGATE_AUDIT_CONTENT": "true"})
    assert s == {"otlp_endpoint": "http://127.0.0.1:4318", "audit": "stdout", "retention_days": 3.0,
                 "max_bytes": 1000, "audit_content": True}
    assert env_settings({"SIDEGATE_AUDIT": "off"}) == {"audit": None}


# -- CLI ------------------------------------------------------------------------------------------------

def _cli(args: list[str]) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    traces_cli.add_parser(sub)
    return traces_cli.run(ap.parse_args(["traces", *args]))


@pytest.fixture
def recorded_session(tmp_store):
    m1 = load_meta("openai-chat/pai-openai-tool-call.sse")
    m2 = load_meta("openai-chat/pai-openai-text-after-tool.sse")
    r = Recorder(tmp_store)
    t = time.time()
    r.submit(record_for("openai-chat/pai-openai-tool-call.sse", session="run-42", started=t,
                        request_body=json.dumps(m1["request"]).encode(),
                        tool_calls=[{"name": "get_capital", "arguments": '{"country": "UK"}', "call_id": "call_1",
                                     "decision": "deny", "reason": "geography is off limits", "rule": "no-geo",
                                     "escalation_id": None}]))
    r.submit(record_for("openai-chat/pai-openai-text-after-tool.sse", session="run-42", started=t + 1,
                        request_body=json.dumps(m2["request"]).encode(), tool_calls=[]))
    r.submit(record_for("anthropic/anth-sdk-text.sse", session="other", tenant="beta", started=t - 5))
    r.close()
    return tmp_store


def test_cli_sessions(recorded_session, capsys):
    assert _cli(["--traces", recorded_session, "sessions"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["LAST", "(UTC)", "SESSION", "CALLS"]
    assert out[1].split()[2:4] == ["run-42", "2"] and out[2].split()[2:4] == ["other", "1"]
    assert _cli(["--traces", recorded_session, "sessions", "--json", "--tenant", "beta"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["session"], x["calls"], x["input_tokens"], x["output_tokens"]) for x in rows] == [("other", 1, 11, 6)]


def test_cli_show_reads_as_a_conversation(recorded_session, capsys):
    assert _cli(["--traces", recorded_session, "show", "run-42"]) == 0
    out = capsys.readouterr().out
    assert "Session run-42 · tenant acme · actor bot-7 · 2 call(s)" in out
    assert "tokens in 131 (cached 0) / out 24 · tool calls 1 (1 blocked)" in out
    assert "user: What is the capital of the UK?" in out
    assert "tools offered: get_capital" in out
    assert '→ tool call get_capital {"country": "UK"}' in out
    assert "[DENY — rule no-geo — geography is off limits]" in out
    assert "tool result call_" in out and ": London" in out
    assert "assistant: The capital of the UK is London." in out
    assert out.count("user: What is the capital") == 1  # the history is not repeated
    assert _cli(["--traces", recorded_session, "show", "nope"]) == 1


def test_cli_export_jsonl(recorded_session, tmp_path, capsys):
    out_file = tmp_path / "run.jsonl"
    assert _cli(["--traces", recorded_session, "export", "--session", "run-42", "--out", str(out_file)]) == 0
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [x["session"] for x in lines] == ["run-42", "run-42"]
    assert lines[0]["usage"] == {"input": 53, "output": 15, "cached": 0}
    assert lines[0]["tool_calls"][0]["decision"] == "deny"
    assert lines[0]["response"]["tool_calls"][0]["name"] == "get_capital"
    assert lines[1]["response"]["text"] == "The capital of the UK is London."
    assert lines[1]["request"]["messages"][-1] == {"role": "tool", "text": "London",
                                                   "tool_call_id": lines[1]["request"]["messages"][-1]["tool_call_id"]}
    assert _cli(["--traces", recorded_session, "export", "--raw"]) == 0
    every = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(every) == 3 and all("request_body" in x and "response_body" in x for x in every)


def test_cli_reads_the_configured_path(recorded_session, monkeypatch, capsys):
    monkeypatch.setenv("SIDEGATE_TRACES", recorded_session)
    assert _cli(["sessions"]) == 0
    assert "run-42" in capsys.readouterr().out
    monkeypatch.setenv("SIDEGATE_TRACES", recorded_session + ".missing")
    assert _cli(["sessions"]) == 1


# -- OTLP export to an in-test receiver ---------------------------------------------------------------

class OTLPReceiver:
    """A minimal OTLP/HTTP (protobuf) traces receiver."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    data = gzip.decompress(data)
                elif self.headers.get("content-encoding") == "deflate":
                    data = zlib.decompress(data)
                receiver.bodies.append(data)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        out = []
        for body in self.bodies:
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    out.extend(ss.spans)
        return out

    def close(self) -> None:
        self.server.shutdown()


def attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


def test_otlp_spans_carry_the_genai_attributes(tmp_store):
    rx = OTLPReceiver()
    try:
        tid, sid = os.urandom(16).hex(), os.urandom(8).hex()
        own_tid, own_sid = os.urandom(16).hex(), os.urandom(8).hex()
        recs = [
            record_for("anthropic/anth-sdk-tool-use.sse", session="run-otel", model="claude-x",
                       traceparent=f"00-{tid}-{sid}-01",
                       tool_calls=[{"name": "get_weather", "arguments": '{"location":"SF"}', "call_id": "toolu_1",
                                    "decision": "deny", "reason": "no weather", "rule": "r1", "escalation_id": None}]),
            record_for("gemini/pai-gemini-text.sse", model="gemini-2.5", traceparent=f"00-{own_tid}-{own_sid}-01",
                       traceparent_created=True),
            record_for("openai-chat/oai-text.sse", status=504, error="upstream timeout", response_chunks=[b"{}"],
                       response_content_type="application/json"),
        ]
        r = Recorder(tmp_store, otlp_endpoint=rx.url)
        for rec in recs:
            r.submit(rec)
        r.close(timeout=10)
        deadline = time.time() + 10
        while len(rx.spans()) < 3 and time.time() < deadline:
            time.sleep(0.05)
        spans = {s.name: s for s in rx.spans()}
        assert set(spans) == {"chat claude-x", "generate_content gemini-2.5", "chat model-x"}
        a = spans["chat claude-x"]
        at = attrs(a)
        assert at["gen_ai.provider.name"] == at["gen_ai.system"] == "anthropic"
        assert at["gen_ai.operation.name"] == "chat" and at["gen_ai.request.model"] == "claude-x"
        assert (at["gen_ai.usage.input_tokens"], at["gen_ai.usage.output_tokens"]) == (377, 65)
        assert at["gen_ai.conversation.id"] == at["sidegate.session"] == "run-otel"
        assert at["sidegate.tenant"] == "acme" and at["sidegate.actor"] == "bot-7"
        assert "gen_ai.input.messages" not in at  # content is opt-in
        assert a.kind == 3  # CLIENT
        assert a.trace_id.hex() == tid and a.parent_span_id.hex() == sid and a.span_id.hex() != sid
        assert a.end_time_unix_nano - a.start_time_unix_nano == 40_000_000
        ev = [(e.name, attrs(e)) for e in a.events]
        assert ev == [("sidegate.tool_call", {"gen_ai.tool.name": "get_weather", "gen_ai.tool.call.id": "toolu_1",
                                              "sidegate.decision": "deny", "sidegate.decision.reason": "no weather",
                                              "sidegate.decision.rule": "r1"})]
        g = spans["generate_content gemini-2.5"]
        assert attrs(g)["gen_ai.provider.name"] == "gcp.gemini"
        assert g.trace_id.hex() == own_tid and g.span_id.hex() == own_sid and not g.parent_span_id
        e = spans["chat model-x"]
        assert attrs(e)["error.type"] == "upstream timeout" and e.status.code == 2
    finally:
        rx.close()


def test_otlp_content_capture_is_opt_in(tmp_store):
    rx = OTLPReceiver()
    try:
        meta = load_meta("openai-chat/pai-openai-tool-call.sse")
        r = Recorder(tmp_store, otlp_endpoint=rx.url + "/v1/traces", otlp_content=True)
        r.submit(record_for("openai-chat/pai-openai-tool-call.sse", request_body=json.dumps(meta["request"]).encode()))
        r.close(timeout=10)
        deadline = time.time() + 10
        while not rx.spans() and time.time() < deadline:
            time.sleep(0.05)
        at = attrs(rx.spans()[0])
        msgs = json.loads(at["gen_ai.input.messages"])
        assert msgs[0] == {"role": "user", "parts": [{"type": "text", "content": meta["request"]["messages"][0]["content"]}]}
        out = json.loads(at["gen_ai.output.messages"])
        assert out[0]["parts"][0]["type"] == "tool_call" and out[0]["parts"][0]["name"] == "get_capital"
        assert json.loads(at["gen_ai.tool.definitions"]) == [{"type": "function", "name": "get_capital"}]
    finally:
        rx.close()


# -- end to end: the real gateway -----------------------------------------------------------------------

FAKE_KEY = "sk-LEAKCANARY-7f3a9c1e5b2d4f60a8b7c6d5e4f3a2b1"


def stored_calls(traces_path: str, session: str, n: int, timeout: float = 10.0) -> list:
    """The calls of `session` in a live gateway's store, once there are `n` of them (or
    whatever is there at the timeout): the writer stores a batch every 100 ms."""
    deadline = time.time() + timeout
    rows: list = []
    while True:
        try:
            rows = list(store.calls(store.open_reader(traces_path), session))
        except sqlite3.Error:  # (the writer may not have made the file yet)
            rows = []
        if len(rows) >= n or time.time() >= deadline:
            return rows
        time.sleep(0.1)


def test_end_to_end_records_calls_and_never_stores_the_key(tmp_path):
    import urllib.request

    from tests.support import sdk_drivers as sdk
    from tests.support.fake_upstream import FakeUpstream, Reply
    from tests.support.gateway_proc import Gateway

    rx = OTLPReceiver()
    audit = tmp_path / "audit.jsonl"
    up = FakeUpstream().start()
    try:
        env = {"SIDEGATE_OTLP_ENDPOINT": rx.url, "SIDEGATE_AUDIT": str(audit), "SIDEGATE_LOG_LEVEL": "debug"}
        with Gateway(up.url, env=env) as gw:
            traces_path = gw.env["SIDEGATE_TRACES"]
            # 1. key in the Authorization header, session header
            up.enqueue(Reply.fixture("openai-chat/oai-tool-call-strict.sse", chunk_sizes="random"))
            client = sdk.openai_client(gw.url, api_key=FAKE_KEY,
                                       default_headers={"X-Sidegate-Session": "e2e-run", "X-Sidegate-Actor": "bot-1",
                                                        "X-Sidegate-Tenant": "acme"})
            sdk.openai_chat(gw.url, stream=True, client=client)
            # 2. key in the key suffix (anthropic x-api-key)
            up.enqueue(Reply.fixture("anthropic/anth-sdk-tool-use.sse", chunk_sizes="random"))
            aclient = sdk.anthropic_client(gw.url, api_key=f"{FAKE_KEY}|sidegate: session=e2e-run;actor=bot-2")
            sdk.anthropic_messages(gw.url, stream=True, client=aclient)
            # 3. key in the query (?key=) and in x-goog-api-key, Gemini
            up.enqueue(Reply.fixture("gemini/pai-gemini-text.sse", chunk_sizes="random"))
            req = urllib.request.Request(
                f"{gw.url}/v1/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key={FAKE_KEY}",
                data=b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}',
                headers={"content-type": "application/json", "x-sidegate-session": "e2e-run"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
            up.enqueue(Reply.fixture("gemini/pai-gemini-function-call-nonstream.json"))
            gclient = sdk.genai_client(gw.url, api_key=f"{FAKE_KEY}|sidegate: session=e2e-run")
            sdk.gemini_generate(gw.url, stream=False, client=gclient)
            # the upstream did get the key (so it was really sent)
            assert any(FAKE_KEY in (r.header("authorization") or "") + (r.header("x-api-key") or "")
                       + r.query + (r.header("x-goog-api-key") or "") for r in up.requests)
            assert len(stored_calls(traces_path, "e2e-run", 4)) == 4
            metrics_text = gw.metrics()
            assert 'sidegate_tokens_total{' in metrics_text
            assert 'model="gpt-4o"' in metrics_text  # the model read from the request body
            gw.stop()  # everything flushed; the files stay until the context ends
            haystack = {"log": gw.log_path.read_bytes() if gw.log_path.exists() else b"",
                        "metrics": metrics_text.encode(), "audit": audit.read_bytes() if audit.exists() else b""}
            for suffix in ("", "-wal", "-shm"):
                p = Path(traces_path + suffix)
                if p.exists():
                    haystack["store" + suffix] = p.read_bytes()
            con = store.open_reader(traces_path)
            reader = store.Reader(con)
            export = "".join(json.dumps(traces_cli.call_json(reader, row, raw=True)) + "\n"
                             for row in store.calls(con))
            haystack["export"] = export.encode()
            con.close()
        deadline = time.time() + 10
        while len(rx.spans()) < 4 and time.time() < deadline:
            time.sleep(0.1)
        haystack["otlp"] = b"".join(rx.bodies)
        assert len(rx.spans()) >= 4
        for where, data in haystack.items():
            for form in (FAKE_KEY.encode(), FAKE_KEY.encode().hex().encode(), FAKE_KEY[3:30].encode()):
                assert form not in data, f"provider key found in {where}"
        rows = [json.loads(x) for x in export.splitlines() if json.loads(x)["session"] == "e2e-run"]
        assert {r["actor"] for r in rows} >= {"bot-1", "bot-2"}
        assert all(r["usage"] for r in rows)
        # every field the relay hands over (by position: relay._record) lands in its column
        assert sorted(r["provider"] for r in rows) == ["anthropic", "gemini", "gemini", "openai"]
        assert sorted(r["dialect"] for r in rows) == ["anthropic", "gemini", "gemini", "openai"]
        assert all(r["status"] == 200 and r["error"] is None for r in rows)
        assert all(0 < r["ttfb_ms"] <= r["duration_ms"] < 10_000 for r in rows)
        assert all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", r["traceparent"]) for r in rows)
        assert all(r["path"].startswith("/") and "?" not in r["path"] for r in rows)
        by = {r["provider"]: r for r in rows}
        assert by["openai"]["tenant"] == "acme" and by["openai"]["actor"] == "bot-1"
        assert by["openai"]["response_content_type"].startswith("text/event-stream")
        assert "gemini-2.5-flash" in {r["model"] for r in rows if r["provider"] == "gemini"}  # from the path
        assert all(r["request_body"] for r in rows) and all(r["response_body"] for r in rows)
    finally:
        up.stop()
        rx.close()


def test_relay_hands_over_every_field_in_its_place():
    """relay._record builds the CallRecord by position: one call whose provider differs
    from its dialect (NIM speaks OpenAI), with every header the record keeps, lands with
    each value in its own column."""
    import openai

    from tests.support.fake_upstream import FakeUpstream, Reply
    from tests.support.gateway_proc import Gateway

    up = FakeUpstream().start()
    try:
        with Gateway(up.url) as gw:
            up.enqueue(Reply.fixture("openai-chat/oai-text.sse"))
            tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            client = openai.OpenAI(base_url=f"{gw.url}/v1/nvidia-nim", api_key="nvapi-test", max_retries=0, timeout=20,
                                   default_headers={"X-Sidegate-Session": "fields-run", "X-Sidegate-Actor": "bot-f",
                                                    "X-Sidegate-Tenant": "t-f", "traceparent": tp})
            for _ in client.chat.completions.create(model="meta/llama-3.1-8b-instruct", stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]):
                pass
            rows = stored_calls(gw.env["SIDEGATE_TRACES"], "fields-run", 1)
        assert len(rows) == 1
        r = rows[0]
        assert (r["provider"], r["dialect"], r["model"]) == ("nvidia-nim", "openai", "meta/llama-3.1-8b-instruct")
        assert (r["tenant"], r["actor"], r["status"], r["error"], r["traceparent"]) == ("t-f", "bot-f", 200, None, tp)
        assert r["path"].endswith("/chat/completions") and r["response_type"].startswith("text/event-stream")
        assert 0 < r["ttfb_ms"] <= r["duration_ms"] < 10_000 and r["request_size"] > 0 and r["response_size"] > 0
    finally:
        up.stop()


def test_traces_off_still_counts_tokens_end_to_end():
    """SIDEGATE_TRACES=off through the real server: no store file, and /metrics still has
    the token counters, TTFB and duration of the call."""
    import openai

    from tests.support.fake_upstream import FakeUpstream, Reply
    from tests.support.gateway_proc import Gateway

    rel = "openai-chat/oai-text.sse"
    want = usage_of("openai", "/chat/completions", "text/event-stream", load_fixture(rel))
    assert want.output > 0
    up = FakeUpstream().start()
    try:
        with Gateway(up.url, env={"SIDEGATE_TRACES": "off"}) as gw:
            up.enqueue(Reply.fixture(rel))
            client = openai.OpenAI(base_url=f"{gw.url}/v1/openai", api_key="sk-test", max_retries=0, timeout=20,
                                   default_headers={"X-Sidegate-Tenant": "t-off"})
            for _ in client.chat.completions.create(model="gpt-4o", stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]):
                pass
            line = 'sidegate_tokens_total{kind="output",model="gpt-4o",provider="openai",tenant="t-off"}'
            deadline = time.time() + 10
            text = gw.metrics()
            while line not in text and time.time() < deadline:
                time.sleep(0.1)
                text = gw.metrics()
            assert f"{line} {float(want.output)}" in text
            assert 'sidegate_request_duration_ms_count{provider="openai"} 1.0' in text
            assert 'sidegate_ttfb_ms_count{provider="openai"} 1.0' in text
            assert not any(p.name.startswith("traces") for p in Path(gw.tmp.name).iterdir())
    finally:
        up.stop()


def test_governance_tool_calls_are_read_in_the_writer(tmp_store):
    from gateway.governance.base import ToolCall, Verdict

    a = ToolCall("get_weather", '{"city":"Paris"}', "call_1")
    b = ToolCall("rm", '{"path":"/"}', "call_2", index=1)
    rec = record_for("openai-chat/oai-parallel-tool-calls.sse", tool_calls=[a, b])
    # verdicts land after the hand-over (observe mode decides beside the stream)
    a.verdict = Verdict("allow", "fine", "r-ok")
    b.verdict = Verdict("escalate", "dangerous", "r-rm", escalation_id="esc_7")
    r = Recorder(tmp_store)
    r.submit(rec)
    r.close()
    con = store.open_reader(tmp_store)
    row = next(store.calls(con))
    assert row["tool_calls"] == [
        {"name": "get_weather", "arguments": '{"city":"Paris"}', "call_id": "call_1", "decision": "allow",
         "reason": "fine", "rule": "r-ok", "escalation_id": None},
        {"name": "rm", "arguments": '{"path":"/"}', "call_id": "call_2", "decision": "escalate",
         "reason": "dangerous", "rule": "r-rm", "escalation_id": "esc_7"}]
    assert (row["n_tool_calls"], row["n_blocked"]) == (2, 1)


@settings(max_examples=300, deadline=None)
@given(model=st.text(max_size=300), compact=st.booleans(), ascii_only=st.booleans(), first=st.booleans())
def test_model_in_body_reads_any_json_string_the_way_json_does(model, compact, ascii_only, first):
    """The slice fast path (plain strings) and the decoding path (escapes, long names)
    agree with json: the model as JSON encoders write it, cut at 256 characters."""
    from gateway.traces.extract import model_in_body

    doc = {"model": model, "messages": [{"role": "user", "content": "hi"}]} if first else \
        {"messages": [{"role": "user", "content": 'a "model": "fake"'}], "model": model}
    body = json.dumps(doc, ensure_ascii=ascii_only, separators=(",", ":") if compact else None).encode()
    assert model_in_body(body) == model[:256]


def test_model_is_read_from_the_body_when_the_relay_leaves_it_empty(tmp_store):
    from gateway.traces.extract import model_in_body

    assert model_in_body(b'{"model": "claude-x", "messages": []}') == "claude-x"
    body = json.dumps({"messages": [{"role": "user", "content": 'say "model": "fake"'}], "model": "gpt-4o",
                       "tools": [{"parameters": {"properties": {"model": {"type": "string"}}}}]}).encode()
    assert model_in_body(body) == "gpt-4o"
    assert model_in_body(b"") == model_in_body(b"{}") == ""
    tenant = f"m{os.getpid()}"
    before = sample("sidegate_tokens_total", {"provider": "openai", "tenant": tenant, "model": "gpt-4o",
                                              "kind": "input"})
    r = Recorder(tmp_store)
    r.submit(record_for("openai-chat/oai-text.sse", model="", request_body=body, tenant=tenant))
    r.close()
    assert next(store.calls(store.open_reader(tmp_store)))["model"] == "gpt-4o"
    assert sample("sidegate_tokens_total", {"provider": "openai", "tenant": tenant, "model": "gpt-4o",
                                            "kind": "input"}) - before == 14


def test_off_stores_nothing_but_still_counts_tokens(tmp_path, monkeypatch):
    """`off` is the store's switch: token usage is a metric (SPEC 4), counted all the same."""
    monkeypatch.chdir(tmp_path)  # a store opened by mistake would land here (as ./off)
    tenant = "t-off"
    labels = {"provider": "openai", "tenant": tenant, "model": "model-x", "kind": "output"}
    before = sample("sidegate_tokens_total", labels)
    r = Recorder("off")
    assert not r.store_enabled and r._thread.is_alive()
    rec = record_for("openai-chat/oai-text.sse", tenant=tenant)
    want = usage_of(rec.dialect, rec.path, rec.response_content_type, rec.response_chunks)
    assert want.output > 0
    r.submit(rec)
    assert r.flush() and r.submitted == 1 and r.written == 0
    r.close()
    assert sample("sidegate_tokens_total", labels) - before == want.output
    assert list(tmp_path.iterdir()) == []

"""Cost of tool-call governance: per passthrough text event and per tool call.

Run:  pytest bench/bench_governance.py --benchmark-enable
(writes bench/results-governance.md when every benchmark ran with timing on).

For each streaming dialect (OpenAI chat, Responses, Anthropic, Bedrock InvokeModel
stream, Bedrock ConverseStream, Gemini SSE):

* passthrough: a text-only stream (the dialect's recorded text fixture, its token events
  cycled to N events) fed one event per feed(), as the network delivers it, through
  (a) the plain framer `gateway.dialects.<d>.framer(path, ctype)` and (b) the enforce-mode
  governor `Governor(path, ctype, enforce=True)`. Figures are us per event.
* per tool call: a recorded one-call stream. Setup (untimed) primes B governors with the
  events before the call; the timed part feeds the rest (the call's frames and the
  stream's end), one event per feed, resolves every pending call with a fixed ALLOW or DENY
  verdict (no decision, no authority) and closes, as the relay does. The added cost of the
  call = that time minus the same number of text events' enforce passthrough cost.
* decision: `Decider.decide` with a 10-rule policy loaded by `load_policy` from a temp
  file, no authority, no escalation (the coroutine never suspends: it is driven with
  `send(None)`, without an event loop), with prometheus in multiprocess mode as the
  server runs it.
"""

from __future__ import annotations

import base64
import gc
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if "prometheus_client" not in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # as `sidegate serve` runs (gateway/server.py): metrics go through mmap'ed files
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sidegate-bench-prom-")

from sidegate_codecs import EventStreamDecoder, SSEDecoder

from gateway import dialects
from gateway.decision import CallContext, Decider
from gateway.escalations import EscalationStore
from gateway.governance import (
    anthropic,
    bedrock_converse,
    bedrock_invoke,
    gemini,
    openai_chat,
    openai_responses,
)
from gateway.governance.base import ToolCall, Verdict
from gateway.policy import load_policy

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "tests" / "fixtures"
N = 1000            # text events per passthrough round
B = 100             # tool calls (one per governor) per per-call round
ROUNDS_TEXT = 60
ROUNDS_CALL = 40
# Per-event CPU of the whole relay, unpaced: bench/results-clients.md, "Summary", point s16
# (16 concurrent unpaced streams of 68 events), column "relay CPU us/event": rsgi-aiohttp 5.21,
# tcp-splice 5.27, asgi-aiohttp 5.28, rsgi-lean 6.90, asgi-lean 7.16. The floor relays
# measured there (bench/floors/) run no framer at all.
RELAY_US_PER_EVENT = 5.0
RELAY_SOURCE = ("bench/results-clients.md, Summary table, point s16 (16 concurrent unpaced streams), "
                "relay CPU us/event: 5.21 rsgi-aiohttp / 5.27 tcp-splice / 5.28 asgi-aiohttp; "
                "asgi-lean, the stack chosen there, 7.16")
TARGET_EVENT_RATIO = 1.5
TARGET_CALL_US = 50.0

ALLOW = Verdict("allow")
DENY = Verdict("deny", "tool not allowed by policy", rule="rules.3")

SSE_CT = "text/event-stream; charset=utf-8"
ES_CT = "application/vnd.amazon.eventstream"


# -- inputs -------------------------------------------------------------------------------

def _sse_events(rel: str) -> list[bytes]:
    d = SSEDecoder()
    evs = [e.raw for e in d.feed((FIXTURES / rel).read_bytes()) + d.close()]
    if not evs[-1].endswith((b"\n\n", b"\r\n\r\n")):  # a recording cut after the last data line
        evs[-1] += b"\r\n\r\n" if evs[-1].endswith(b"\r\n") else b"\n\n"
    return evs


def _es_frames(rel: str) -> list[bytes]:
    return [m.raw for m in EventStreamDecoder().feed((FIXTURES / rel).read_bytes())]


def _invoke_inner(raw: bytes) -> bytes:
    (m,) = EventStreamDecoder().feed(raw)
    return base64.b64decode(json.loads(m.payload)["bytes"])


class Dialect:
    def __init__(self, key, label, route, module, path, ctype, split, text_fixture, is_token, tool_fixture):
        self.key = key
        self.label = label
        self.route = route          # gateway.dialects.BY_NAME key (the plain framer)
        self.module = module        # gateway.governance module
        self.path = path
        self.ctype = ctype
        self.split = split
        self.text_fixture = text_fixture
        self.is_token = is_token
        self.tool_fixture = tool_fixture

    def plain(self):
        return dialects.BY_NAME[self.route].framer(self.path, self.ctype)

    def governor(self, enforce: bool = True):
        return self.module.Governor(self.path, self.ctype, enforce)

    # a text-only stream: the fixture's head, its token events cycled to N, its tail
    def text_stream(self) -> tuple[list[bytes], int]:
        evs = self.split(self.text_fixture)
        idx = [i for i, e in enumerate(evs) if self.is_token(e)]
        first, last = idx[0], idx[-1]
        tokens = [evs[i] for i in idx]
        body = [bytes(t) for t in itertools.islice(itertools.cycle(tokens), N)]  # distinct objects
        token_bytes = sum(map(len, tokens)) // len(tokens)
        return evs[:first] + body + evs[last + 1:], token_bytes

    # a one-call stream cut where the call starts (the first event the governor holds)
    def call_stream(self) -> tuple[list[bytes], list[bytes]]:
        evs = self.split(self.tool_fixture)
        gov = self.governor()
        for i, e in enumerate(evs):
            if gov.feed(e) is not e:
                return evs[:i], evs[i:]
        raise AssertionError(f"{self.tool_fixture}: no event was held")


DIALECTS = [
    Dialect("chat", "OpenAI chat completions", "openai", openai_chat, "/v1/openai/chat/completions", SSE_CT,
            _sse_events, "openai-chat/oai-text.sse",
            lambda e: b'"delta":{"content":"' in e, "openai-chat/oai-tool-call-strict.sse"),
    Dialect("responses", "OpenAI Responses", "openai", openai_responses, "/v1/openai/responses", SSE_CT,
            _sse_events, "openai-responses/pai-responses-text-after-tool.sse",
            lambda e: e.startswith(b"event: response.output_text.delta\n"),
            "openai-responses/pai-responses-function-call.sse"),
    Dialect("anthropic", "Anthropic Messages", "anthropic", anthropic, "/v1/anthropic/v1/messages", SSE_CT,
            _sse_events, "anthropic/anth-sdk-text.sse",
            lambda e: b'"text_delta"' in e, "anthropic/anth-sdk-tool-use.sse"),
    Dialect("invoke", "Bedrock InvokeModelWithResponseStream (Claude)", "bedrock", bedrock_invoke,
            "/v1/bedrock/model/us.anthropic.claude-sonnet-4-5-v1:0/invoke-with-response-stream", ES_CT,
            _es_frames, "bedrock-invoke/derived-claude-text.bin",
            lambda e: b'"text_delta"' in _invoke_inner(e), "bedrock-invoke/derived-claude-tool-use.bin"),
    Dialect("converse", "Bedrock ConverseStream", "bedrock", bedrock_converse,
            "/v1/bedrock/model/us.amazon.nova-micro-v1:0/converse-stream", ES_CT,
            _es_frames, "bedrock-converse/pai-bedrock-nova-text.bin",
            lambda e: b"contentBlockDelta" in e[:120] and b'"text"' in e,
            "bedrock-converse/pai-bedrock-nova-text-then-tool.bin"),
    Dialect("gemini", "Gemini streamGenerateContent?alt=sse", "gemini", gemini,
            "/v1/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", SSE_CT,
            _sse_events, "gemini/pai-gemini-text.sse",
            lambda e: b'"finishReason"' not in e, "gemini/pai-gemini-function-call.sse"),
]
BY_KEY = {d.key: d for d in DIALECTS}
IDS = [d.key for d in DIALECTS]

RESULTS: dict[str, dict] = {}
INFO: dict[str, dict] = {}


def _record(benchmark, key: str, per: int, **info):
    INFO.setdefault(key, {}).update(info)
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(benchmark, "disabled", False):
        return
    s = stats.stats
    RESULTS[key] = {"median": s.median / per * 1e6, "min": s.min / per * 1e6}


# -- passthrough: one text event per feed() -------------------------------------------------

def _fresh(make, events):
    f = make()
    gc.collect()
    return (f, events), {}


def _relay_text(framer, events):
    feed = framer.feed
    for e in events:
        feed(e)
    framer.close()


@pytest.mark.parametrize("mode", ["plain", "enforce"])
@pytest.mark.parametrize("key", IDS)
def test_passthrough_text_event(benchmark, key, mode):
    d = BY_KEY[key]
    events, token_bytes = d.text_stream()
    make = d.plain if mode == "plain" else d.governor
    # correctness once, untimed: every event goes out at once, as the same object
    f = make()
    for e in events:
        assert f.feed(e) is e
        assert not f.pending
    assert f.close() == b""
    benchmark.pedantic(_relay_text, setup=lambda: _fresh(make, events), rounds=ROUNDS_TEXT,
                       iterations=1, warmup_rounds=2)
    _record(benchmark, f"text/{key}/{mode}", len(events), events=len(events), token_bytes=token_bytes)


# -- per tool call --------------------------------------------------------------------------

def _prime(d: Dialect, head: list[bytes], n: int) -> list:
    govs = []
    for _ in range(n):
        g = d.governor()
        for e in head:
            g.feed(e)
        assert not g.pending
        govs.append(g)
    gc.collect()  # the setup's garbage is not collected inside the timed part
    return govs


def _run_calls(govs, segment, verdict, sink):
    for g in govs:
        out = []
        for e in segment:
            out.append(g.feed(e))
            while g.pending:
                out.append(g.resolve([verdict] * len(g.pending)))
        tail = g.close()
        while g.pending:
            tail += g.resolve([verdict] * len(g.pending))
            tail += g.close()
        out.append(tail)
        sink.append(out)


@pytest.mark.parametrize("verdict", ["allow", "deny"])
@pytest.mark.parametrize("key", IDS)
def test_tool_call(benchmark, key, verdict):
    d = BY_KEY[key]
    head, segment = d.call_stream()
    v = ALLOW if verdict == "allow" else DENY
    sink: list = []
    _run_calls(_prime(d, head, 1), segment, v, sink)
    out = b"".join(sink[0])
    if verdict == "allow":
        assert out == b"".join(segment)
    else:
        assert out != b"".join(segment)
        if d.ctype.startswith("text/"):
            assert b"[SIDEGATE DENIED]" in out
    sink.clear()
    benchmark.pedantic(_run_calls, setup=lambda: ((_prime(d, head, B), segment, v, sink), {}),
                       rounds=ROUNDS_CALL, iterations=1, warmup_rounds=2)
    sink.clear()
    _record(benchmark, f"call/{key}/{verdict}", B, frames=len(segment), head=len(head))


# -- the decision ---------------------------------------------------------------------------

POLICY_YAML = """\
mode: enforce
default: allow
rules:
  - name: no-shell
    tool: '^(bash|shell|exec|run_command)$'
    decision: deny
  - name: no-secrets
    args: '(?i)(password|secret|api[_-]?key|token)'
    decision: deny
  - name: no-prod-writes
    tool: '^(write_file|delete_file|move_file)$'
    args: '"path":"/(etc|prod|var/lib)/'
    decision: escalate
  - name: interns-read-only
    actor: '^intern-'
    tool: '^(write|delete|update|create)_'
    decision: deny
  - name: payments
    tool: '^(transfer_funds|refund|charge_card)$'
    decision: escalate
  - name: no-email-outside
    tool: '^send_email$'
    args: '"to":"[^"]*@(gmail|outlook|proton)\\.'
    decision: deny
  - name: no-dns
    tool: '^(update_dns|delete_dns_record)$'
    decision: deny
  - name: sql-read-only
    tool: '^run_sql$'
    args: '(?i)\\b(insert|update|delete|drop|alter|truncate)\\b'
    decision: deny
  - name: no-k8s-delete
    tool: '^kubectl$'
    args: '"verb":"delete"'
    decision: deny
  - name: no-weather-in-atlantis
    tool: '^get_weather$'
    args: '"city":"Atlantis"'
    decision: deny
"""

CALL_ARGS = '{"state": "CA", "city": "San Francisco", "unit": "celsius"}'


def _policy():
    with tempfile.TemporaryDirectory(prefix="sidegate-bench-policy-") as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(POLICY_YAML)
        return load_policy(path)


def _decide_batch(decider, policy, eff, calls, ctx, out):
    for c in calls:
        coro = decider.decide(policy, eff, c, ctx)
        try:
            coro.send(None)
        except StopIteration as stop:
            out.append(stop.value)
        else:  # pragma: no cover - it would have awaited I/O
            coro.close()
            raise AssertionError("decide() suspended: authority or escalation in the path")


@pytest.mark.parametrize("case", ["no-match-default-allow", "tenth-rule-denies"])
def test_decision(benchmark, case, tmp_path):
    policy = _policy()
    assert len(policy.base.rules) == 10 and policy.authority is None
    eff = policy.for_tenant("acme")
    decider = Decider(EscalationStore(str(tmp_path / "esc.sqlite")))
    ctx = CallContext(provider="openai", tenant="acme", actor="agent-7", model="gpt-4o")
    args = CALL_ARGS if case.startswith("no-match") else CALL_ARGS.replace("San Francisco", "Atlantis")
    calls = [ToolCall("get_weather", args, f"call_{i}", 0) for i in range(B)]
    out: list = []
    _decide_batch(decider, policy, eff, calls[:1], ctx, out)
    assert out[0].outcome == ("allow" if case.startswith("no-match") else "deny")
    benchmark.pedantic(_decide_batch, setup=lambda: ((decider, policy, eff, calls, ctx, out.clear() or out), {}),
                       rounds=ROUNDS_CALL, iterations=1, warmup_rounds=2)
    _record(benchmark, f"decision/{case}", B,
            metrics="multiprocess" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "in-process")


# -- report ---------------------------------------------------------------------------------

def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        load = Path("/proc/loadavg").read_text().strip()
    except (OSError, subprocess.SubprocessError) as exc:  # pragma: no cover
        return f"(lscpu failed: {exc})"
    head = "\n".join(lscpu.splitlines()[:12])
    return head + f"\nload average at the end of the run: {load}"


def _fmt(r: dict) -> str:
    return f"{r['median']:.2f} ({r['min']:.2f})"


def _write_report() -> None:
    dec = RESULTS["decision/no-match-default-allow"]
    dec_deny = RESULTS["decision/tenth-rule-denies"]
    dec_us = {k: max(dec[k], dec_deny[k]) for k in ("median", "min")}
    rows, calls, notes = [], [], []
    for d in DIALECTS:
        p = RESULTS[f"text/{d.key}/plain"]
        e = RESULTS[f"text/{d.key}/enforce"]
        info = INFO[f"text/{d.key}/enforce"]
        ratio = {k: (RELAY_US_PER_EVENT + e[k]) / (RELAY_US_PER_EVENT + p[k]) for k in ("median", "min")}
        added = {}
        for v in ("allow", "deny"):
            c = RESULTS[f"call/{d.key}/{v}"]
            frames = INFO[f"call/{d.key}/{v}"]["frames"]
            added[v] = {k: c[k] - frames * e[k] for k in ("median", "min")}
            calls.append(f"| {d.label} | {v.upper()} | {INFO[f'call/{d.key}/{v}']['head']} | {frames} | "
                         f"{_fmt(c)} | {frames} x {e['median']:.2f} = {frames * e['median']:.1f} | "
                         f"{added[v]['median']:.1f} ({added[v]['min']:.1f}) |")
        worst = {k: max(added["allow"][k], added["deny"][k]) + dec_us[k] for k in ("median", "min")}
        ok_event = ratio["median"] <= TARGET_EVENT_RATIO
        ok_call = worst["median"] <= TARGET_CALL_US
        ok_call_min = worst["min"] <= TARGET_CALL_US
        rows.append(
            f"| {d.label} | {info['token_bytes']} B | {_fmt(p)} | {_fmt(e)} | {e['median'] / p['median']:.1f}x | "
            f"**{ratio['median']:.2f}x** | {added['allow']['median']:.1f} ({added['allow']['min']:.1f}) | "
            f"{added['deny']['median']:.1f} ({added['deny']['min']:.1f}) | {dec_us['median']:.1f} "
            f"({dec_us['min']:.1f}) | **{worst['median']:.1f}** ({worst['min']:.1f}) | "
            f"{'PASS' if ok_event else 'FAIL'} | {'PASS' if ok_call else 'FAIL'} "
            f"(best round: {'pass' if ok_call_min else 'fail'}) |")
        if not ok_event:
            notes.append(f"- {d.label}: per-event ratio against the relay {ratio['median']:.2f}x "
                         f"> {TARGET_EVENT_RATIO}x")
        if not ok_call:
            notes.append(f"- {d.label}: per call {worst['median']:.1f} us (best round {worst['min']:.1f}) "
                         f"> {TARGET_CALL_US:g} us")
    lines = [
        "# sidegate governance: benchmark results",
        "",
        "Generated by `bench/bench_governance.py` (pytest-benchmark). Microseconds, **median** of the "
        "rounds with the best round in brackets; pass/fail is judged on the median.",
        "",
        "## Machine",
        "",
        "```",
        _machine(),
        "```",
        "",
        f"Python {platform.python_version()} ({platform.python_implementation()}), {sys.platform}. "
        "The machine is shared (2 vCPUs; other engineers' load generators and test suites ran during the "
        "run): medians of the per-call rounds (5-10 ms each) vary by up to ~2x between runs, the best rounds "
        "much less.",
        "",
        "## Command",
        "",
        "```",
        "cd /work/main && . .venv/bin/activate && python -m pytest bench/bench_governance.py --benchmark-enable -q",
        "```",
        "",
        "## Results",
        "",
        "Targets (issue 4): per passthrough text event in enforce mode at most "
        f"{TARGET_EVENT_RATIO}x the plain relay's per-event cost; per tool call at most {TARGET_CALL_US:g} us "
        "added (excluding authority I/O).",
        "",
        "| dialect | token event | plain framer us/event | enforce governor us/event | ratio vs framer | "
        f"ratio vs relay ({RELAY_US_PER_EVENT:g} us + framer) | per call ALLOW (added) | per call DENY (added) | "
        "decision | worst call + decision | event target | call target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Decision (`Decider.decide`, 10 rules, metrics {INFO['decision/no-match-default-allow']['metrics']}): "
        f"no rule matches, default allow {_fmt(dec)} us; the 10th rule denies {_fmt(dec_deny)} us. "
        "The table uses the larger of the two.",
        "",
        "Per call, in detail (`added` = total minus the same number of events at the enforce passthrough cost):",
        "",
        "| dialect | verdict | events before the call (untimed) | events timed | total | passthrough share | "
        "added |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *calls,
        "",
        "## How to read it",
        "",
        f"- Passthrough: {N} token events per stream (the dialect's recorded text fixture, token events cycled; "
        "`token event` = their mean size), one event per `feed()`, including `close()`. The plain framer and the "
        "governor both return each event as the same bytes object (checked).",
        "- Ratio vs framer = enforce / plain framer. Ratio vs relay = (relay + governor) / (relay + plain framer) "
        f"with relay = {RELAY_US_PER_EVENT:g} us per event, from {RELAY_SOURCE}. The floor relays behind that "
        "figure ran no framer, and unpaced reads can carry several events per chunk, so 5 us is a low (strict) "
        "figure; with paced events (~28 us per event there) the ratios are closer to 1.",
        "- Per call: the recorded one-call stream is cut where the call's first frame is (the first event the "
        "governor holds); B governors are primed with the events before it (untimed), then the rest (the call's "
        "frames and the stream's closing events) is fed one event per `feed()`, pending calls are resolved with "
        "a fixed verdict after each feed and at `close()`, as the relay does. DENY includes writing the "
        "replacement (marker block, stop-reason rewrite, re-encoded frames with CRCs for Bedrock). The cost grows "
        "with the number of argument fragments (see the analysis below).",
        "- Decision is measured separately (no authority, no escalation, metrics as the server records them) and "
        "added to the worse of ALLOW / DENY for the per-call pass/fail.",
        "",
        "## Verdict",
        "",
        *(notes or ["- All targets met in this run."]),
        "",
    ]
    out = HERE / "results-governance.md"
    kept = ""
    if out.exists():  # hand-written analysis below the marker survives a re-run
        old = out.read_text()
        if KEEP_MARKER in old:
            kept = old[old.index(KEEP_MARKER):]
    out.write_text("\n".join(lines) + "\n" + (kept or KEEP_MARKER + "\n"))


KEEP_MARKER = "<!-- analysis below this line is written by hand and kept when the benchmark re-runs -->"


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    keys = [f"text/{d}/{m}" for d in IDS for m in ("plain", "enforce")] + \
        [f"call/{d}/{v}" for d in IDS for v in ("allow", "deny")] + \
        ["decision/no-match-default-allow", "decision/tenth-rule-denies"]
    if all(k in RESULTS for k in keys):
        _write_report()

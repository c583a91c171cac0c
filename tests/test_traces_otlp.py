"""OpenTelemetry export against a real OTLP receiver: Arize Phoenix, run offline on a
loopback port from its own venv (~/.cache/sidegate-test/phoenix-venv, created on first
use; SIDEGATE_TEST_CACHE moves it). Skipped only when PyPI cannot be reached to build
that venv."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.traces import Recorder
from tests.support.fake_upstream import load_meta
from tests.test_traces import expected_usage, record_for

pytestmark = pytest.mark.slow

PHOENIX = "arize-phoenix==20.26.1"
CACHE = Path(os.environ.get("SIDEGATE_TEST_CACHE", Path.home() / ".cache" / "sidegate-test"))
VENV = CACHE / "phoenix-venv"
MARKER = VENV / (".sidegate-ok-" + PHOENIX.replace("==", "-"))


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/arize-phoenix/", timeout=10) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _phoenix_python() -> str:
    py = VENV / "bin" / "python"
    if MARKER.exists() and py.exists():
        return str(py)
    CACHE.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable, "-m", "venv", str(VENV)],
             [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PHOENIX]]
    for cmd in steps:
        if cmd[1] == "-m" and cmd[2] == "venv" and py.exists():
            continue
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            if not _pypi_reachable():
                pytest.skip(f"PyPI unreachable: cannot install {PHOENIX} into {VENV}")
            pytest.fail(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    MARKER.touch()
    return str(py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory):
    py = _phoenix_python()
    work = tmp_path_factory.mktemp("phoenix")
    port, grpc = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "OTEL_"))}
    env.update({"PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port), "PHOENIX_GRPC_PORT": str(grpc),
                "PHOENIX_WORKING_DIR": str(work), "PHOENIX_TELEMETRY_ENABLED": "false",
                "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false"})
    log = open(work / "phoenix.log", "wb")
    proc = subprocess.Popen([py, "-m", "phoenix.server.main", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"phoenix exited with {proc.returncode}:\n{(work / 'phoenix.log').read_text()[-4000:]}")
            try:
                if _get(url + "/healthz", 2)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"phoenix not up in 120 s:\n{(work / 'phoenix.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _spans(url: str, want: int, timeout: float = 60) -> list[dict]:
    """Spans of the default project (404 until the first span lands)."""
    deadline = time.time() + timeout
    spans: list[dict] = []
    while time.time() < deadline:
        try:
            spans, cursor = [], None
            while True:
                q = "?limit=1000" + (f"&cursor={cursor}" if cursor else "")
                status, body = _get(f"{url}/v1/projects/default/spans{q}")
                doc = json.loads(body)
                spans += doc.get("data") or []
                cursor = doc.get("next_cursor")
                if not cursor:
                    break
            if len(spans) >= want:
                return spans
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        except OSError:
            pass
        time.sleep(0.5)
    return spans


CASES = [  # fixture, model, decision of each tool call
    ("openai-chat/oai-parallel-tool-calls.sse", "gpt-4o", "allow"),
    ("openai-responses/pai-responses-function-call.sse", "gpt-4.1", "escalate"),
    ("anthropic/anth-sdk-tool-use.sse", "claude-sonnet-4", "deny"),
    ("bedrock-converse/pai-bedrock-nova-text-then-tool.bin", "amazon.nova-pro-v1:0", "deny"),
    ("bedrock-invoke/derived-claude-tool-use.bin", "anthropic.claude-3-5-sonnet", "allow"),
    ("gemini/pai-gemini-function-call.sse", "gemini-2.5-flash", "allow"),
    ("gemini/pai-gemini-text.sse", "gemini-2.5-pro", None),
]


def test_spans_reach_phoenix_with_the_genai_attributes(phoenix, tmp_path):
    run = f"phoenix-run-{os.getpid()}"
    recs = []
    for i, (rel, model, decision) in enumerate(CASES):
        meta = load_meta(rel)
        calls = [{"name": t["name"], "arguments": json.dumps(t["arguments"]), "call_id": t.get("id") or f"c{i}",
                  "decision": decision, "reason": f"because {decision}", "rule": f"rule-{decision}",
                  "escalation_id": "esc_9" if decision == "escalate" else None} for t in meta["tool_calls"]]
        recs.append(record_for(rel, model=model, session=run, tool_calls=calls, actor=f"agent-{i}",
                               traceparent=f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01",
                               traceparent_created=i % 2 == 0))
    r = Recorder(str(tmp_path / "traces.sqlite"), otlp_endpoint=phoenix)
    for rec in recs:
        r.submit(rec)
    r.close(timeout=20)
    spans = [s for s in _spans(phoenix, len(recs)) if s["attributes"].get("sidegate.session") == run]
    assert len(spans) == len(recs), f"{len(spans)} of {len(recs)} spans arrived"
    by_trace = {s["context"]["trace_id"]: s for s in spans}
    names = {"openai": "openai", "anthropic": "anthropic", "bedrock": "aws.bedrock", "gemini": "gcp.gemini"}
    for (rel, model, decision), rec in zip(CASES, recs):
        tid, sid = rec.traceparent.split("-")[1:3]
        s = by_trace[tid]
        a = s["attributes"]
        op = "generate_content" if rec.dialect == "gemini" else "chat"
        assert s["name"] == f"{op} {model}"
        assert a["gen_ai.operation.name"] == op
        assert a["gen_ai.provider.name"] == a["gen_ai.system"] == names[rec.provider]
        assert a["gen_ai.request.model"] == model
        u = expected_usage(rec.dialect, load_meta(rel)["usage"])
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (u.input, u.output), rel
        assert a["gen_ai.conversation.id"] == run and a["sidegate.actor"] == rec.actor
        assert a["sidegate.tenant"] == "acme" and a["http.response.status_code"] == 200
        if rec.traceparent_created:
            assert s["context"]["span_id"] == sid and not s.get("parent_id")
        else:
            assert s["parent_id"] == sid
        events = [e for e in s.get("events") or [] if e["name"] == "sidegate.tool_call"]
        assert [(e["attributes"]["gen_ai.tool.name"], e["attributes"]["sidegate.decision"]) for e in events] == \
            [(c["name"], decision) for c in rec.tool_calls]
        if decision == "escalate":
            assert events[0]["attributes"]["sidegate.escalation.id"] == "esc_9"
        for e in events:
            assert e["attributes"]["sidegate.decision.reason"] == f"because {decision}"
            assert "gen_ai.tool.call.arguments" not in e["attributes"]  # content is opt-in


def test_gateway_exports_to_phoenix(phoenix):
    from tests.support import sdk_drivers as sdk
    from tests.support.fake_upstream import FakeUpstream, Reply
    from tests.support.gateway_proc import Gateway

    run = f"gw-phoenix-{os.getpid()}"
    up = FakeUpstream().start()
    try:
        with Gateway(up.url, env={"SIDEGATE_OTLP_ENDPOINT": phoenix}) as gw:
            client = sdk.openai_client(gw.url, default_headers={"X-Sidegate-Session": run})
            for rel in ("openai-chat/oai-text.sse", "openai-chat/oai-tool-call-strict.sse"):
                up.enqueue(Reply.fixture(rel, chunk_sizes="random"))
                sdk.openai_chat(gw.url, stream=True, client=client)
            up.enqueue(Reply.fixture("anthropic/anth-sdk-text.sse", chunk_sizes="random"))
            sdk.anthropic_messages(gw.url, stream=True,
                                   client=sdk.anthropic_client(gw.url, api_key=f"k|sidegate: session={run}"))
        spans = [s for s in _spans(phoenix, 3) if s["attributes"].get("gen_ai.conversation.id") == run]
        deadline = time.time() + 30
        while len(spans) < 3 and time.time() < deadline:
            time.sleep(0.5)
            spans = [s for s in _spans(phoenix, 3) if s["attributes"].get("gen_ai.conversation.id") == run]
        assert len(spans) == 3
        usage = sorted((s["attributes"]["gen_ai.usage.input_tokens"], s["attributes"]["gen_ai.usage.output_tokens"])
                       for s in spans)
        assert usage == [(11, 6), (14, 30), (48, 19)]
        assert {s["attributes"]["gen_ai.provider.name"] for s in spans} == {"openai", "anthropic"}
    finally:
        up.stop()

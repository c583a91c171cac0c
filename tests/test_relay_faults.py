"""Failure behaviour: each case named, each answered in the provider's own format."""

from __future__ import annotations

import json
import time

import pytest

from tests.support import sdk_drivers as sdk
from tests.support.fake_upstream import Reply, load_fixture, unused_port
from tests.support.gateway_proc import Gateway
from tests.support.rawclient import RawClient

SECRETS = ("sk-test", "sk-ant-test", "AIza-test-key", "client-secret-test")


@pytest.fixture(scope="module")
def dead_gateway():
    """A gateway whose every upstream refuses connections."""
    with Gateway(f"http://127.0.0.1:{unused_port()}") as gw:
        yield gw


@pytest.fixture(scope="module")
def patient_gateway(fake):
    """Upstream timeouts far beyond the tests' waits: only the client's leaving can end a call."""
    with Gateway(fake.url, env={"SIDEGATE_READ_TIMEOUT": "60", "SIDEGATE_TOTAL_TIMEOUT": "120"}) as gw:
        yield gw


@pytest.fixture(scope="module")
def fast_timeout_gateway(fake):
    with Gateway(fake.url, env={"SIDEGATE_READ_TIMEOUT": "0.5", "SIDEGATE_TOTAL_TIMEOUT": "10"}) as gw:
        yield gw


def _sdk_calls(base: str):
    """One call per dialect; each must raise the SDK's usual error type."""
    import anthropic
    import botocore.exceptions
    import openai
    from google.genai import errors as genai_errors

    return {
        "openai": (lambda: sdk.openai_chat(base, False), openai.APIStatusError),
        "openai-stream": (lambda: sdk.openai_chat(base, True), openai.APIStatusError),
        "anthropic": (lambda: sdk.anthropic_messages(base, True), anthropic.APIStatusError),
        "bedrock": (lambda: sdk.bedrock_converse(base, True), botocore.exceptions.ClientError),
        "gemini": (lambda: sdk.gemini_generate(base, True), genai_errors.APIError),
        "vertex": (lambda: sdk.gemini_generate(base, True, route="vertex-gemini"), genai_errors.APIError),
    }


def _status_of(exc) -> int:
    for attr in ("status_code", "code"):
        if isinstance(getattr(exc, attr, None), int):
            return getattr(exc, attr)
    return exc.response["ResponseMetadata"]["HTTPStatusCode"]


@pytest.mark.parametrize("dialect", ["openai", "openai-stream", "anthropic", "bedrock", "gemini", "vertex"])
def test_upstream_refused_is_502_in_provider_envelope(dead_gateway, dialect):
    call, err = _sdk_calls(dead_gateway.url)[dialect]
    with pytest.raises(err) as e:
        call()
    assert _status_of(e.value) == 502
    assert "upstream unreachable" in str(e.value)
    if dialect == "bedrock":
        assert e.value.response["Error"]["Code"] == "ServiceUnavailableException"


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "bedrock", "gemini"])
def test_upstream_timeout_is_504_in_provider_envelope(fast_timeout_gateway, upstream, dialect):
    upstream.set_default(Reply(delay_before_headers=3.0, body=b"{}"))
    call, err = _sdk_calls(fast_timeout_gateway.url)[dialect]
    t0 = time.monotonic()
    with pytest.raises(err) as e:
        call()
    assert _status_of(e.value) == 504
    assert time.monotonic() - t0 < 2.0  # the read timeout (0.5 s), not the upstream's 3 s


MIDSTREAM = {
    "openai": ("openai-chat/oai-tool-call-strict.sse", lambda b: sdk.openai_chat(b, True)),
    "responses": ("openai-responses/pai-responses-function-call.sse", lambda b: sdk.openai_responses(b)),
    "anthropic": ("anthropic/anth-sdk-tool-use.sse", lambda b: sdk.anthropic_messages(b, True)),
    "bedrock-converse": ("bedrock-converse/pai-bedrock-nova-text-then-tool.bin", lambda b: sdk.bedrock_converse(b, True)),
    "bedrock-invoke": ("bedrock-invoke/derived-claude-tool-use.bin", lambda b: sdk.bedrock_invoke(b, True)),
    "gemini": ("gemini/pai-gemini-thinking.sse", lambda b: sdk.gemini_generate(b, True)),
}


def _midstream_error_types():
    import anthropic
    import botocore.exceptions
    import openai
    from google.genai import errors as genai_errors

    return (openai.APIError, anthropic.APIError, botocore.exceptions.EventStreamError,
            botocore.exceptions.ClientError, genai_errors.APIError)


@pytest.mark.parametrize("fault", ["reset_after_bytes", "close_after_bytes"])
@pytest.mark.parametrize("dialect", list(MIDSTREAM))
def test_upstream_dies_midstream_gives_inband_error(gateway, upstream, dialect, fault):
    fixture, call = MIDSTREAM[dialect]
    body = load_fixture(fixture)
    # cut at an event boundary a little way in, so the client has already seen events
    cut = _frame_boundary(body, len(body) // 2) if fixture.endswith(".bin") else _event_boundary(body, len(body) // 3)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random", fault=fault, fault_at=cut))
    with pytest.raises(_midstream_error_types()) as e:
        call(gateway.url)
    assert "sidegate" in str(e.value) or "upstream" in str(e.value).lower()


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "gemini"])
def test_upstream_cut_mid_event_still_ends_in_error(gateway, upstream, dialect):
    """A cut inside an event: the partial event is closed and an error follows it."""
    fixture, call = MIDSTREAM[dialect]
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random", fault="close_after_bytes",
                                   fault_at=len(load_fixture(fixture)) // 2 + 3))
    with pytest.raises(_midstream_error_types()):
        call(gateway.url)


def test_bedrock_cut_mid_frame_raises_in_boto3(gateway, upstream):
    fixture, call = MIDSTREAM["bedrock-converse"]
    body = load_fixture(fixture)
    upstream.enqueue(Reply.fixture(fixture, fault="close_after_bytes", fault_at=_frame_boundary(body, len(body) // 2) + 9))
    with pytest.raises(_midstream_error_types()):
        call(gateway.url)


def test_upstream_silent_midstream_hits_idle_read_timeout(fast_timeout_gateway, upstream):
    fixture, call = MIDSTREAM["anthropic"]
    body = load_fixture(fixture)
    upstream.enqueue(Reply.fixture(fixture, fault="hang_after_bytes", fault_at=_event_boundary(body, 200)))
    import anthropic

    t0 = time.monotonic()
    with pytest.raises(anthropic.APIStatusError) as e:
        call(fast_timeout_gateway.url)
    assert "read timeout" in str(e.value)
    assert time.monotonic() - t0 < 3


def _event_boundary(data: bytes, at_least: int) -> int:
    sep = b"\r\n\r\n" if b"\r\n\r\n" in data else b"\n\n"
    return data.find(sep, at_least) + len(sep)


def _frame_boundary(data: bytes, at_least: int) -> int:
    off = 0
    while off < at_least:
        off += int.from_bytes(data[off:off + 4], "big")
    return off


def test_raw_inband_error_bytes_openai(gateway, upstream):
    """The bytes before the break are relayed untouched; the error event follows them."""
    fixture = "openai-chat/oai-text.sse"
    body = load_fixture(fixture)
    cut = _event_boundary(body, 300)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random", fault="reset_after_bytes", fault_at=cut))
    with RawClient("127.0.0.1", gateway.port, timeout=10).connect() as c:
        resp = c.request("POST", "/v1/openai/chat/completions", [("content-type", "application/json")], b"{}")
    assert resp.body.startswith(body[:cut])
    tail = resp.body[cut:]
    assert tail.startswith(b"data: {\"error\":") and tail.endswith(b"\n\n")
    assert json.loads(tail[6:])["error"]["code"] == "upstream_unreachable"


def test_client_disconnect_cancels_upstream_and_pool_stays_healthy(gateway, upstream):
    fixture = "openai-chat/oai-text.sse"
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes=[40], delay_between_chunks=0.1))
    c = RawClient("127.0.0.1", gateway.port, timeout=10).connect()
    c.send(b"POST /v1/openai/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}")
    head = c.read_head()
    c.read_body(head, max_bytes=80)
    c.abort()
    # the gateway drops its upstream connection rather than reading the stream to the end
    assert upstream.wait_active_connections(0, timeout=3) == 0
    assert len(upstream.requests) == 1
    upstream.enqueue(Reply.fixture(fixture))
    out = sdk.openai_chat(gateway.url, True)
    assert out.stop_reason == "stop"


def _post_and_wait(gw, upstream, n: int) -> RawClient:
    c = RawClient("127.0.0.1", gw.port, timeout=10).connect()
    c.send(b"POST /v1/anthropic/v1/messages HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}")
    upstream.wait_requests(n)
    return c


def test_client_disconnect_before_upstream_answers(patient_gateway, upstream):
    # The upstream timeouts cannot end the call here (patient_gateway): only the watcher can.
    # (Other gateways of the session may hold idle pooled connections: counts are relative.)
    base = upstream.active_connections
    upstream.enqueue(Reply(delay_before_headers=30, body=b"{}"))
    c = _post_and_wait(patient_gateway, upstream, 1)
    assert upstream.wait_active_connections(base + 1) == base + 1
    c.abort()
    assert upstream.wait_active_connections(base) == base


def test_client_disconnect_while_other_requests_are_in_flight(patient_gateway, upstream):
    # Two calls waiting on the upstream: each is cancelled by its own client's leaving only.
    base = upstream.active_connections
    upstream.enqueue(Reply(delay_before_headers=30, body=b"{}"))
    upstream.enqueue(Reply(delay_before_headers=30, body=b"{}"))
    first = _post_and_wait(patient_gateway, upstream, 1)
    second = _post_and_wait(patient_gateway, upstream, 2)
    assert upstream.wait_active_connections(base + 2) == base + 2
    second.abort()
    assert upstream.wait_active_connections(base + 1) == base + 1
    time.sleep(0.3)  # (the first call, whose client stays, goes on)
    assert upstream.active_connections == base + 1
    first.abort()
    assert upstream.wait_active_connections(base) == base


def test_request_body_too_large_is_413(fake):
    import openai

    with Gateway(fake.url, env={"SIDEGATE_MAX_REQUEST_BYTES": "2048"}) as gw:
        fake.reset()
        with pytest.raises(openai.APIStatusError) as e:
            sdk.openai_client(gw.url).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x" * 4096}])
        assert e.value.status_code == 413
        # a chunked body with no content-length is counted as it arrives
        with RawClient("127.0.0.1", gw.port, timeout=10).connect() as c:
            resp = c.request("POST", "/v1/anthropic/v1/messages", [("content-type", "application/json")],
                             b"y" * 5000, chunked=True, chunk_size=1000)
        assert resp.status == 413
        assert json.loads(resp.body)["error"]["type"] == "request_too_large"
        assert fake.requests == []


def test_no_secret_in_gateway_logs(gateway, dead_gateway, fast_timeout_gateway):
    for gw in (gateway, dead_gateway, fast_timeout_gateway):
        text = gw.log_text()
        for secret in SECRETS:
            assert secret not in text

"""Byte-exactness: what the gateway does not rewrite reaches the client byte for byte."""

from __future__ import annotations

import pytest

from tests.support.fake_upstream import Reply, all_fixtures, load_fixture, load_meta
from tests.support.rawclient import RawClient

TARGETS = {
    "openai-chat": "/v1/openai/chat/completions",
    "openai-responses": "/v1/openai/responses",
    "anthropic": "/v1/anthropic/v1/messages",
    "bedrock-converse": "/v1/bedrock/model/m/converse-stream",
    "bedrock-invoke": "/v1/bedrock-anthropic/model/m/invoke-with-response-stream",
    "eventstream-vectors": "/v1/bedrock/model/m/invoke-with-response-stream",
    "gemini": "/v1/gemini/v1beta/models/g:streamGenerateContent?alt=sse",
}


def _fetch(gateway, target: str):
    with RawClient("127.0.0.1", gateway.port, timeout=10).connect() as c:
        return c.request("POST", target, [("content-type", "application/json")], b'{"stream": true}')


ALL = [f for f in all_fixtures(include_vectors=True)
       if not f.startswith("eventstream-vectors/err-")]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("fixture", ALL)
def test_random_chunking_byte_exact(gateway, upstream, fixture, seed):
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random", seed=seed))
    resp = _fetch(gateway, TARGETS[fixture.split("/")[0]])
    assert resp.status == 200
    assert resp.body == load_fixture(fixture)
    assert resp.header("content-type") == load_meta(fixture)["content_type"]


@pytest.mark.parametrize("fixture", [f for f in ALL if f.endswith(".json")])
def test_content_length_body_byte_exact(gateway, upstream, fixture):
    upstream.enqueue(Reply.fixture(fixture, chunked=False, chunk_sizes=[7]))
    target = TARGETS[fixture.split("/")[0]].replace(":streamGenerateContent?alt=sse", ":generateContent")
    resp = _fetch(gateway, target)
    assert resp.body == load_fixture(fixture)
    assert resp.header("content-length") == str(len(resp.body))


def test_each_event_goes_out_as_soon_as_it_is_complete(gateway, upstream):
    """No added buffering: an upstream writing one byte at a time still yields one client
    chunk per event, each sent the moment its blank line arrives (not batched)."""
    fixture = "openai-chat/oai-text.sse"
    body = load_fixture(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes=[1], delay_between_chunks=0.0002))
    resp = _fetch(gateway, TARGETS["openai-chat"])
    assert resp.body == body
    assert body.endswith(b"\n\n")
    assert resp.chunk_sizes == [len(e) + 2 for e in body.split(b"\n\n")[:-1]]


def test_chunks_ending_on_event_boundaries_keep_their_chunking(gateway, upstream):
    fixture = "anthropic/anth-sdk-text.sse"
    body = load_fixture(fixture)
    sizes = [len(e) + 2 for e in body.split(b"\n\n")[:-1]]
    sizes.append(len(body) - sum(sizes))  # the final event has no blank line after it
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes=sizes, delay_between_chunks=0.005))
    resp = _fetch(gateway, TARGETS["anthropic"])
    assert resp.body == body
    assert resp.chunk_sizes == sizes


def test_upstream_status_and_headers_relayed(gateway, upstream):
    upstream.enqueue(Reply(status=429, headers=[("content-type", "application/json"), ("x-request-id", "req_1"),
                                                ("retry-after", "7"), ("keep-alive", "timeout=5"),
                                                ("set-cookie", "a=b")],
                           body=b'{"error":{"message":"slow down","type":"rate_limit"}}'))
    resp = _fetch(gateway, TARGETS["openai-chat"])
    assert resp.status == 429
    assert resp.header("x-request-id") == "req_1"
    assert resp.header("retry-after") == "7"
    assert resp.header("keep-alive") is None  # hop-by-hop
    assert resp.body == b'{"error":{"message":"slow down","type":"rate_limit"}}'

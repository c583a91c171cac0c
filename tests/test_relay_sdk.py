"""Every recorded fixture, relayed by the real gateway, read by the provider's official SDK.

The fake upstream writes each body in random chunk sizes; the SDK must end with the
tool calls, text and stop reason that the fixture's meta file records.
"""

from __future__ import annotations

import json

import pytest

from tests.support import sdk_drivers as sdk
from tests.support.fake_upstream import Reply, all_fixtures, load_meta


def _fixtures(folder: str, stream: bool | None = None) -> list[str]:
    return [f for f in all_fixtures(folder, stream) if f.startswith(folder + "/")]


def _check(outcome: sdk.Outcome, meta: dict) -> None:
    want = sdk.expected(meta)
    assert outcome.tool_calls == want.tool_calls
    assert outcome.text == want.text
    assert outcome.stop_reason == want.stop_reason


def _expects_error(meta: dict) -> bool:
    return "midstream_error" in meta.get("features", [])


@pytest.mark.parametrize("fixture", _fixtures("openai-chat"))
def test_openai_chat(gateway, upstream, fixture):
    meta = load_meta(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    if _expects_error(meta):
        import openai

        with pytest.raises(openai.APIError):
            sdk.openai_chat(gateway.url, meta["stream"])
        return
    _check(sdk.openai_chat(gateway.url, meta["stream"]), meta)
    req = upstream.requests[-1]
    assert req.path == "/chat/completions"
    assert req.header("authorization") == "Bearer sk-test"


@pytest.mark.parametrize("fixture", [f for f in _fixtures("openai-chat", stream=True)
                                     if "tool_call_index_starts_at_1" not in load_meta(f)["features"]
                                     and "finish_length" not in load_meta(f)["features"]
                                     and "midstream_error" not in load_meta(f)["features"]])
def test_openai_chat_stream_helper(gateway, upstream, fixture):
    meta = load_meta(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    _check(sdk.openai_chat(gateway.url, True, helper=True), meta)


@pytest.mark.parametrize("fixture", [f for f in _fixtures("openai-chat", stream=True)
                                     if "midstream_error" not in load_meta(f)["features"]][:3])
def test_nvidia_nim_route(gateway, upstream, fixture):
    """NIM speaks the OpenAI dialect on its own route and upstream."""
    meta = load_meta(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    _check(sdk.openai_chat(gateway.url, True, route="nvidia-nim"), meta)


@pytest.mark.parametrize("fixture", _fixtures("openai-responses"))
def test_openai_responses(gateway, upstream, fixture):
    meta = load_meta(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    if _expects_error(meta):
        import openai

        with pytest.raises(openai.APIError):
            sdk.openai_responses(gateway.url)
        return
    _check(sdk.openai_responses(gateway.url), meta)
    assert upstream.requests[-1].path == "/responses"


@pytest.mark.parametrize("fixture", _fixtures("anthropic"))
def test_anthropic(gateway, upstream, fixture):
    meta = load_meta(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    outcome = sdk.anthropic_messages(gateway.url, meta["stream"])
    if meta.get("tool_calls") and meta["tool_calls"][0].get("arguments_complete") is False:
        # a stream cut off by max_tokens: the SDK keeps what it could parse
        assert [c["name"] for c in outcome.tool_calls] == [c["name"] for c in meta["tool_calls"]]
        assert outcome.stop_reason == meta["stop_reason"]
        return
    _check(outcome, meta)
    req = upstream.requests[-1]
    assert req.path == "/v1/messages"
    # the SDK sends its key as x-api-key or as a bearer token, depending on version
    assert "sk-ant-test" in (req.header("x-api-key") or req.header("authorization") or "")
    assert req.header("anthropic-version")


@pytest.mark.parametrize("fixture", _fixtures("bedrock-converse"))
def test_bedrock_converse(gateway, upstream, fixture):
    meta = load_meta(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    _check(sdk.bedrock_converse(gateway.url, meta["stream"]), meta)
    req = upstream.requests[-1]
    suffix = "/converse-stream" if meta["stream"] else "/converse"
    assert req.path.startswith("/model/") and req.path.endswith(suffix)


@pytest.mark.parametrize("route", ["bedrock", "bedrock-anthropic"])
@pytest.mark.parametrize("fixture", _fixtures("bedrock-invoke"))
def test_bedrock_invoke_stream(gateway, upstream, fixture, route):
    meta = load_meta(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    _check(sdk.bedrock_invoke(gateway.url, True, route=route), meta)
    assert upstream.requests[-1].path.endswith("/invoke-with-response-stream")


@pytest.mark.parametrize("fixture", [f for f in _fixtures("anthropic", stream=False)])
def test_bedrock_invoke_nonstream(gateway, upstream, fixture):
    """InvokeModel for Claude returns the Anthropic Messages body."""
    meta = load_meta(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    _check(sdk.bedrock_invoke(gateway.url, False), meta)
    assert upstream.requests[-1].path.endswith("/invoke")


@pytest.mark.parametrize("route", ["gemini", "vertex-gemini"])
@pytest.mark.parametrize("fixture", _fixtures("gemini"))
def test_gemini(gateway, upstream, fixture, route):
    meta = load_meta(fixture)
    upstream.enqueue(Reply.fixture(fixture, chunk_sizes="random"))
    _check(sdk.gemini_generate(gateway.url, meta["stream"], route=route), meta)
    req = upstream.requests[-1]
    assert (":streamGenerateContent" in req.path) == meta["stream"]
    if meta["stream"]:
        assert "alt=sse" in req.query


def test_unknown_route_lists_prefixes(gateway):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(gateway.url + "/v1/nope/chat/completions")
    assert e.value.code == 404
    body = json.loads(e.value.read())
    assert "/v1/openai" in body["error"]["valid_prefixes"]
    assert "/v1/bedrock-anthropic" in body["error"]["valid_prefixes"]

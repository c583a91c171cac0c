"""Gateway metadata, gateway auth, credential injection, Bedrock re-signing, traceparent."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from tests.support import sdk_drivers as sdk
from tests.support.fake_upstream import Reply
from tests.support.gateway_proc import Gateway
from tests.support.rawclient import RawClient

TEXT = "openai-chat/oai-text-nonstream.json"


def test_sidegate_headers_are_stripped(gateway, upstream):
    upstream.enqueue(Reply.fixture(TEXT))
    client = sdk.openai_client(gateway.url, default_headers={
        "X-Sidegate-Tenant": "acme", "X-Sidegate-Actor": "bot-7", "X-Sidegate-Session": "run-42",
        "X-Sidegate-Mode": "observe", "X-Sidegate-Key": "gw-token"})
    sdk.openai_chat(gateway.url, False, client=client)
    req = upstream.wait_requests(1)[0]
    assert not [n for n, _ in req.headers if n.startswith("x-sidegate")]
    assert req.header("authorization") == "Bearer sk-test"


def test_key_suffix_is_stripped_from_bearer_and_x_api_key(gateway, upstream):
    upstream.enqueue(Reply.fixture(TEXT))
    upstream.enqueue(Reply.fixture("anthropic/pai-anthropic-tool-use-nonstream.json"))
    sdk.openai_chat(gateway.url, False, client=sdk.openai_client(
        gateway.url, api_key="sk-real|sidegate: actor=bot-7;session=run-42"))
    import anthropic

    anthropic.Anthropic(base_url=gateway.url + "/v1/anthropic", api_key=None, max_retries=0,
                        default_headers={"x-api-key": "sk-ant-real|sidegate: tenant=acme"}).messages.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    first, second = upstream.wait_requests(2)
    assert first.header("authorization") == "Bearer sk-real"
    assert second.header("x-api-key") == "sk-ant-real"
    assert "sidegate" not in json.dumps(first.headers + second.headers)


def test_key_suffix_is_stripped_from_gemini_query_key(gateway, upstream):
    upstream.enqueue(Reply.fixture("gemini/pai-gemini-function-call-nonstream.json"))
    key = quote("AIza-real|sidegate: actor=bot-7", safe="")
    with RawClient("127.0.0.1", gateway.port).connect() as c:
        resp = c.request("POST", f"/v1/gemini/v1beta/models/g:generateContent?key={key}&x=1", [], b"{}")
    assert resp.status == 200
    req = upstream.wait_requests(1)[0]
    assert req.query == "key=AIza-real&x=1"


@pytest.mark.parametrize("header,value", [("X-Sidegate-Mode", "yolo"), ("X-Sidegate-Unknown", "1"),
                                          ("authorization", "Bearer k|sidegate: color=red")])
def test_bad_gateway_metadata_is_400_in_provider_envelope(gateway, upstream, header, value):
    import openai

    client = sdk.openai_client(gateway.url, default_headers={header: value})
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert "gateway" in str(e.value)
    assert upstream.requests == []


@pytest.fixture(scope="module")
def token_gateway(fake):
    with Gateway(fake.url, env={"SIDEGATE_PROXY_TOKEN": "gw-secret-token"}) as gw:
        yield gw


def test_gateway_key_required_when_configured(token_gateway, upstream):
    import anthropic

    with pytest.raises(anthropic.AuthenticationError):
        sdk.anthropic_messages(token_gateway.url, False)
    with pytest.raises(anthropic.AuthenticationError):
        sdk.anthropic_messages(token_gateway.url, False, client=sdk.anthropic_client(
            token_gateway.url, default_headers={"X-Sidegate-Key": "wrong"}))
    assert upstream.requests == []
    upstream.set_default(Reply.fixture("anthropic/pai-anthropic-tool-use-nonstream.json"))
    sdk.anthropic_messages(token_gateway.url, False, client=sdk.anthropic_client(
        token_gateway.url, default_headers={"X-Sidegate-Key": "gw-secret-token"}))
    sdk.anthropic_messages(token_gateway.url, False, client=sdk.anthropic_client(
        token_gateway.url, api_key="sk-ant-test|sidegate: key=gw-secret-token"))
    reqs = upstream.wait_requests(2)
    assert all("gw-secret-token" not in json.dumps(r.headers) for r in reqs)
    assert "gw-secret-token" not in token_gateway.log_text()


def test_traceparent_forwarded_and_echoed(gateway, upstream):
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    upstream.enqueue(Reply.fixture(TEXT))
    with RawClient("127.0.0.1", gateway.port).connect() as c:
        resp = c.request("POST", "/v1/openai/chat/completions", [("traceparent", tp), ("tracestate", "a=b")], b"{}")
    assert resp.header("traceparent") == tp
    req = upstream.wait_requests(1)[0]
    assert req.header("traceparent") == tp and req.header("tracestate") == "a=b"


def test_traceparent_created_when_absent(gateway, upstream):
    upstream.enqueue(Reply.fixture(TEXT))
    with RawClient("127.0.0.1", gateway.port).connect() as c:
        resp = c.request("POST", "/v1/openai/chat/completions", [], b"{}")
    tp = resp.header("traceparent")
    assert tp and len(tp.split("-")) == 4
    assert upstream.wait_requests(1)[0].header("traceparent") == tp


def test_hop_by_hop_request_headers_not_forwarded(gateway, upstream):
    upstream.enqueue(Reply.fixture(TEXT))
    with RawClient("127.0.0.1", gateway.port).connect() as c:
        c.request("POST", "/v1/openai/chat/completions",
                  [("proxy-authorization", "Basic xyz"), ("te", "trailers"), ("x-custom", "kept")], b"{}")
    req = upstream.wait_requests(1)[0]
    assert req.header("proxy-authorization") is None and req.header("te") is None
    assert req.header("x-custom") == "kept"
    assert req.header("host") == f"127.0.0.1:{upstream.port}"


def test_credential_injection_from_env_and_file(fake, tmp_path):
    secret = tmp_path / "anthropic.key"
    secret.write_text("sk-ant-injected-from-file\n")
    cfg = tmp_path / "sidegate.yaml"
    cfg.write_text(f"""
routes:
  openai:
    upstream: {fake.url}
    credential: {{env: TEST_INJECTED_OPENAI_KEY}}
  anthropic:
    upstream: {fake.url}
    credential: {{file: {secret}}}
""")
    env = {"TEST_INJECTED_OPENAI_KEY": "sk-injected-from-env"}
    with Gateway(None, env=env, args=["--config", str(cfg)]) as gw:
        fake.reset()
        fake.set_default(Reply.fixture(TEXT))
        sdk.openai_chat(gw.url, False, client=sdk.openai_client(gw.url, api_key="placeholder"))
        import anthropic

        anthropic.Anthropic(base_url=gw.url + "/v1/anthropic", api_key="placeholder", max_retries=0).messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        first, second = fake.wait_requests(2)
        assert first.header("authorization") == "Bearer sk-injected-from-env"
        assert second.header("x-api-key") == "sk-ant-injected-from-file"
        assert second.header("authorization") is None
        log = gw.log_text()
        assert "sk-injected-from-env" not in log and "sk-ant-injected-from-file" not in log


def test_bedrock_resigned_with_gateway_credentials(fake):
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    env = {"AWS_ACCESS_KEY_ID": "AKIDGATEWAYTEST", "AWS_SECRET_ACCESS_KEY": "gateway-secret-test",
           "AWS_REGION": "us-west-2"}
    with Gateway(fake.url, env=env) as gw:
        fake.reset()
        fake.enqueue(Reply.fixture("bedrock-converse/pai-bedrock-converse-tool-use-nonstream.json"))
        out = sdk.bedrock_converse(gw.url, False)
        assert out.stop_reason == "tool_use"
        req = fake.wait_requests(1)[0]
        assert req.path.startswith("/model/us.anthropic.claude-sonnet-4-5-v1")
        auth = req.header("authorization")
        assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDGATEWAYTEST/")
        assert "/us-west-2/bedrock/aws4_request" in auth
        assert "AKIDCLIENTTEST" not in json.dumps(req.headers)
        # recompute the signature the upstream would check, over what it actually received
        signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
        headers = {n: v for n, v in req.headers if n in signed}
        check = AWSRequest(method=req.method, url=f"{fake.url}{req.target}", data=req.body, headers=headers)
        check.context["timestamp"] = req.header("x-amz-date")
        SigV4Auth(Credentials("AKIDGATEWAYTEST", "gateway-secret-test"), "bedrock", "us-west-2").add_auth(check)
        assert check.headers["Authorization"] == auth
        assert "gateway-secret-test" not in gw.log_text()


def test_bedrock_api_key_forwarded_untouched(fake):
    env = {"AWS_ACCESS_KEY_ID": "AKIDGATEWAYTEST", "AWS_SECRET_ACCESS_KEY": "gateway-secret-test"}
    with Gateway(fake.url, env=env) as gw:
        fake.reset()
        fake.enqueue(Reply.fixture("bedrock-converse/pai-bedrock-converse-tool-use-nonstream.json"))
        with RawClient("127.0.0.1", gw.port).connect() as c:
            resp = c.request("POST", "/v1/bedrock/model/m/converse",
                             [("authorization", "Bearer ABSKbedrockapikey"), ("content-type", "application/json")], b"{}")
        assert resp.status == 200
        assert fake.wait_requests(1)[0].header("authorization") == "Bearer ABSKbedrockapikey"


def test_bedrock_without_gateway_credentials_forwards_client_signature(gateway, upstream):
    upstream.enqueue(Reply.fixture("bedrock-converse/pai-bedrock-converse-tool-use-nonstream.json"))
    sdk.bedrock_converse(gateway.url, False)
    assert "Credential=AKIDCLIENTTEST/" in upstream.wait_requests(1)[0].header("authorization")


def test_percent_encoded_path_reaches_upstream_encoded(gateway, upstream):
    upstream.enqueue(Reply.fixture("gemini/pai-gemini-function-call-nonstream.json"))
    with RawClient("127.0.0.1", gateway.port).connect() as c:
        c.request("POST", "/v1/gemini/v1beta/models/caf%C3%A9%20x:generateContent?alt=json", [], b"{}")
    req = upstream.wait_requests(1)[0]
    assert req.target == "/v1beta/models/caf%C3%A9%20x:generateContent?alt=json"

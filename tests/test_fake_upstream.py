"""Tests of the fake provider upstream (tests/support/fake_upstream.py) and the raw client."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
import time

import pytest

try:
    from tests.support import fake_upstream as _fu  # noqa: F401  (repo root on sys.path)
except ImportError:  # pytest's rootdir-less "prepend" import mode puts tests/ on sys.path
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fake_upstream import (  # noqa: E402
    NO_REPLY_MESSAGE,
    FakeUpstream,
    Reply,
    all_fixtures,
    load_fixture,
    load_meta,
    unused_port,
)
from tests.support.rawclient import IncompleteBody, RawClient, SlowReader, build_request

SSE = "openai-chat/oai-finish-length.sse"
BIN = "bedrock-converse/pai-bedrock-nova-text.bin"


@pytest.fixture
def up():
    u = FakeUpstream().start()
    yield u
    u.stop()


def raw(up, **kw) -> RawClient:
    return RawClient("127.0.0.1", up.port, **kw).connect()


def http_conn(up, timeout=5.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", up.port, timeout=timeout)


def post(c: RawClient, target="/v1/x", body=b"{}", headers=None):
    c.send(build_request("POST", target, headers or [("content-type", "application/json")], body))
    return c.read_head()


# ----------------------------------------------------------------- fixtures helpers


def test_all_fixtures_lists_bodies_with_meta_and_integrity():
    fx = all_fixtures()
    assert len(fx) > 40
    assert not any(f.startswith("eventstream-vectors/") for f in fx)
    assert not any(f.endswith(".meta.json") or f.endswith(".orig.chunks.txt") for f in fx)
    for f in fx:
        meta = load_meta(f)
        data = load_fixture(f)
        assert meta["bytes"] == len(data), f
        assert meta["sha256"] == hashlib.sha256(data).hexdigest(), f

    assert all_fixtures("anthropic") == all_fixtures("anthropic-messages")
    assert all(f.startswith("anthropic/") for f in all_fixtures("anthropic"))
    streams = all_fixtures(stream=True)
    assert streams and all(load_meta(f)["stream"] for f in streams)
    assert set(streams) | set(all_fixtures(stream=False)) == set(fx)
    vectors = all_fixtures("eventstream-vectors")
    assert vectors and all(f.startswith("eventstream-vectors/") for f in vectors)
    assert set(vectors) <= set(all_fixtures(include_vectors=True))


def test_reply_fixture_uses_meta_content_type():
    r = Reply.fixture(BIN, chunk_sizes="random")
    assert r.status == 200 and r.body == load_fixture(BIN)
    assert r.headers == [("content-type", load_meta(BIN)["content_type"])]
    assert r.chunk_sizes == "random"
    # random split is reproducible per seed and covers the body exactly
    assert r.pieces() == Reply.fixture(BIN, chunk_sizes="random").pieces()
    assert b"".join(r.pieces()) == r.body
    assert all(1 <= len(p) <= 64 for p in r.pieces())
    assert r.pieces() != Reply.fixture(BIN, chunk_sizes="random", seed=1).pieces()
    assert [len(p) for p in Reply(body=b"abcdefg", chunk_sizes=[1, 2]).pieces()] == [1, 2, 1, 2, 1]


# ----------------------------------------------------------------- byte-exact replay


def test_every_fixture_replays_byte_exact_random_chunking_keepalive(up):
    fx = all_fixtures(include_vectors=True)
    c = raw(up)
    for i, f in enumerate(fx):
        reply = Reply.fixture(f, chunk_sizes="random", seed=i)
        up.enqueue(reply)
        resp = c.request("POST", f"/replay/{i}", [("content-type", "application/json")], b"{}")
        assert resp.status == 200
        assert resp.header("content-type") == load_meta(f)["content_type"]
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.body == load_fixture(f), f
        # each write is exactly one HTTP chunk, as split by the seeded RNG
        assert resp.chunk_sizes == [len(p) for p in reply.pieces()]
    c.close()
    assert up.total_connections == 1
    assert [r.path for r in up.wait_requests(len(fx))] == [f"/replay/{i}" for i in range(len(fx))]


@pytest.mark.parametrize("rel", [SSE, BIN, "anthropic/pai-anthropic-tool-use-nonstream.json"])
def test_content_length_mode_byte_exact(up, rel):
    data = load_fixture(rel)
    up.enqueue(Reply.fixture(rel, chunked=False, chunk_sizes=[7, 1, 30]))
    c = raw(up)
    head = post(c)
    assert head.content_length == len(data)
    assert head.header("transfer-encoding") is None
    assert c.read_body(head) == data

    # and with a stdlib client
    up.enqueue(Reply.fixture(rel, chunked=False, chunk_sizes="random"))
    h = http_conn(up)
    h.request("GET", "/x")
    r = h.getresponse()
    assert r.getheader("content-length") == str(len(data))
    assert r.read() == data
    h.close()


def test_stdlib_client_dechunks_random_chunked_reply(up):
    up.enqueue(Reply.fixture(SSE, chunk_sizes="random", seed=7))
    h = http_conn(up)
    h.request("POST", "/v1/chat/completions", body=b"{}")
    r = h.getresponse()
    assert r.status == 200 and r.getheader("content-type") == "text/event-stream"
    assert r.read() == load_fixture(SSE)


def test_delay_between_chunks_paces_writes(up):
    up.enqueue(Reply(body=b"abcd", chunk_sizes=[1], delay_between_chunks=0.05))
    c = raw(up)
    head = post(c)
    t0 = time.monotonic()
    resp = c.read_response_body(head)
    assert resp.body == b"abcd" and resp.chunk_sizes == [1, 1, 1, 1]
    assert time.monotonic() - t0 >= 0.14


def test_delay_before_headers_provokes_client_timeout(up):
    up.enqueue(Reply(body=b"late", delay_before_headers=0.6))
    h = http_conn(up, timeout=0.2)
    h.request("GET", "/slow")
    with pytest.raises((socket.timeout, TimeoutError)):
        h.getresponse()
    h.close()
    assert up.wait_active_connections(0, 2) == 0


def test_status_headers_and_framing_override(up):
    up.enqueue(Reply(status=429, headers=[("content-type", "application/json"), ("retry-after", "3"),
                                          ("x-a", "1"), ("x-a", "2")], body=b'{"e":1}', chunked=False))
    c = raw(up)
    head = post(c)
    assert (head.status, head.reason) == (429, "Too Many Requests")
    assert head.headers[:4] == [("content-type", "application/json"), ("retry-after", "3"),
                                ("x-a", "1"), ("x-a", "2")]
    assert c.read_body(head) == b'{"e":1}'
    # a test-supplied content-length is not corrected (lying framing)
    up.enqueue(Reply(headers=[("content-length", "10")], body=b"abc", chunked=False))
    head = post(c)
    assert [v for k, v in head.headers if k == "content-length"] == ["10"]
    with pytest.raises(IncompleteBody) as ei:
        _read_with_timeout(c, head, 0.3)
    assert ei.value.kind == "timeout" and ei.value.partial == b"abc"


def _read_with_timeout(c: RawClient, head, t):
    c.sock.settimeout(t)
    return c.read_body(head)


# ----------------------------------------------------------------- faults


@pytest.mark.parametrize("chunked", [True, False])
def test_fault_reset_after_bytes(up, chunked):
    data = load_fixture(SSE)
    up.enqueue(Reply.fixture(SSE, chunked=chunked, chunk_sizes="random", fault="reset_after_bytes", fault_at=300))
    c = raw(up)
    head = post(c)
    assert head.status == 200
    with pytest.raises(IncompleteBody) as ei:
        c.read_body(head)
    assert ei.value.kind == "reset"
    assert ei.value.partial == data[:300]
    assert up.wait_active_connections(0, 2) == 0


@pytest.mark.parametrize("chunked", [True, False])
def test_fault_close_after_bytes(up, chunked):
    data = load_fixture(SSE)
    up.enqueue(Reply.fixture(SSE, chunked=chunked, chunk_sizes=[50], fault="close_after_bytes", fault_at=120))
    c = raw(up)
    head = post(c)
    with pytest.raises(IncompleteBody) as ei:
        c.read_body(head)
    assert ei.value.kind == "eof"
    assert ei.value.partial == data[:120]
    if chunked:  # the framing stops cleanly after the last chunk: no terminating 0-chunk
        assert bytes(c.wire) == b"32\r\n" + data[:50] + b"\r\n32\r\n" + data[50:100] + b"\r\n14\r\n" + data[100:120] + b"\r\n"
    # stdlib sees an incomplete read too
    up.enqueue(Reply.fixture(SSE, chunked=chunked, fault="close_after_bytes", fault_at=10))
    h = http_conn(up)
    h.request("GET", "/")
    r = h.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        r.read()


def test_fault_hang_after_bytes_keeps_socket_open(up):
    data = load_fixture(SSE)
    up.enqueue(Reply.fixture(SSE, chunk_sizes="random", fault="hang_after_bytes", fault_at=200))
    c = raw(up, timeout=0.3)
    head = post(c)
    with pytest.raises(IncompleteBody) as ei:
        c.read_body(head)
    assert ei.value.kind == "timeout"
    assert ei.value.partial == data[:200]
    assert up.active_connections == 1
    c.close()
    assert up.wait_active_connections(0, 2) == 0


def test_fault_at_zero_sends_head_only(up):
    up.enqueue(Reply.fixture(SSE, fault="close_after_bytes", fault_at=0))
    c = raw(up)
    head = post(c)
    assert head.status == 200 and head.chunked
    with pytest.raises(IncompleteBody) as ei:
        c.read_body(head)
    assert ei.value.kind == "eof" and ei.value.partial == b""


def test_fault_refuse_resets_without_bytes(up):
    up.enqueue(Reply.fixture(SSE, fault="refuse"))
    c = raw(up)
    c.send(build_request("GET", "/refused"))
    with pytest.raises(ConnectionResetError):
        c.read_until_closed()
    assert c.wire == b"" and not c._buf
    assert up.wait_requests(1)[0].path == "/refused"
    # stdlib view
    up.enqueue(Reply(fault="refuse"))
    h = http_conn(up)
    h.request("GET", "/")
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        h.getresponse()


def test_unused_port_refuses_connections():
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", unused_port()), timeout=1)


# ----------------------------------------------------------------- recording


def test_requests_recorded_with_headers_and_body(up):
    up.set_default(Reply(body=b"ok"))
    c = raw(up)
    body = json.dumps({"model": "m", "stream": True}).encode()
    c.send(build_request("POST", "/v1/chat/completions?api-version=2024&x=1",
                         [("Content-Type", "application/json"), ("Authorization", "Bearer k"),
                          ("X-Dup", "a"), ("X-Dup", "b")], body))
    assert c.read_body(c.read_head()) == b"ok"
    # chunked request body
    c.send(build_request("PUT", "/chunked", [("x-n", "2")], b"0123456789" * 5, chunked=True, chunk_size=7))
    assert c.read_body(c.read_head()) == b"ok"

    r1, r2 = up.wait_requests(2)
    assert (r1.method, r1.target, r1.path, r1.query) == (
        "POST", "/v1/chat/completions?api-version=2024&x=1", "/v1/chat/completions", "api-version=2024&x=1")
    assert [k for k, _ in r1.headers] == ["host", "content-type", "authorization", "x-dup", "x-dup", "content-length"]
    assert r1.header("AUTHORIZATION") == "Bearer k" and r1.header("missing") is None
    assert r1.header_all("x-dup") == ["a", "b"]
    assert r1.body == body and r1.json()["model"] == "m"
    assert (r2.method, r2.path, r2.query) == ("PUT", "/chunked", "")
    assert r2.header("transfer-encoding") == "chunked"
    assert r2.body == b"0123456789" * 5
    assert r1.conn_id == r2.conn_id and (r1.index, r2.index) == (0, 1)


def test_wait_requests_times_out(up):
    with pytest.raises(TimeoutError):
        up.wait_requests(1, timeout=0.1)


def test_concurrent_clients_all_recorded(up):
    up.set_default(lambda rec: Reply(body=rec.body[::-1], chunked=False))
    results = {}

    def worker(i):
        h = http_conn(up)
        h.request("POST", f"/c/{i}", body=f"payload-{i}".encode())
        results[i] = h.getresponse().read()
        h.close()

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(5)
    assert results == {i: f"payload-{i}".encode()[::-1] for i in range(8)}
    assert sorted(r.path for r in up.wait_requests(8)) == sorted(f"/c/{i}" for i in range(8))
    assert up.total_connections == 8


# ----------------------------------------------------------------- queue / default


def test_fifo_default_and_no_reply(up):
    up.enqueue(Reply(body=b"first"))
    up.enqueue(Reply(body=b"second", chunked=False))
    h = http_conn(up)
    for want in (b"first", b"second"):
        h.request("GET", "/")
        assert h.getresponse().read() == want
    h.request("GET", "/")
    r = h.getresponse()
    assert r.status == 500
    assert json.loads(r.read())["error"]["message"] == NO_REPLY_MESSAGE
    up.set_default(Reply(status=201, body=b"dflt"))
    for _ in range(2):
        h.request("GET", "/")
        r = h.getresponse()
        assert (r.status, r.read()) == (201, b"dflt")
    up.enqueue(Reply(body=b"queued wins"))
    h.request("GET", "/")
    assert h.getresponse().read() == b"queued wins"
    up.reset()
    assert up.requests == [] and up.queued == 0
    h.request("GET", "/")
    assert h.getresponse().status == 500
    h.close()


# ----------------------------------------------------------------- connections


def test_keepalive_and_pipelining_on_one_connection(up):
    for i in range(3):
        up.enqueue(Reply(body=f"r{i}".encode(), chunked=bool(i % 2)))
    c = raw(up)
    c.send(b"".join(build_request("GET", f"/p{i}") for i in range(3)))  # pipelined in one write
    assert [c.read_body(c.read_head()) for _ in range(3)] == [b"r0", b"r1", b"r2"]
    reqs = up.wait_requests(3)
    assert [r.path for r in reqs] == ["/p0", "/p1", "/p2"]
    assert len({r.conn_id for r in reqs}) == 1 and up.total_connections == 1
    assert up.active_connections == 1


def test_connection_close_honoured(up):
    up.set_default(Reply(body=b"bye"))
    c = raw(up)
    c.send(build_request("GET", "/", [("Connection", "close")]))
    head = c.read_head()
    assert head.header("connection") == "close"
    assert c.read_body(head) == b"bye"
    assert c.read_until_closed() == b""
    assert up.wait_active_connections(0, 2) == 0

    up.set_default(Reply(body=b"bye", keep_alive=False, chunked=False))
    c = raw(up)
    head = post(c)
    assert head.header("connection") == "close" and c.read_body(head) == b"bye"
    assert c.read_until_closed() == b""


def test_active_connections_drop_when_clients_go_away(up):
    up.set_default(Reply.fixture(SSE, fault="hang_after_bytes", fault_at=100))
    a, b, idle = raw(up), raw(up), raw(up)
    assert up.wait_active_connections(3, 2) == 3
    post(a)
    post(b)
    up.wait_requests(2)
    a.abort()  # RST mid-body
    assert up.wait_active_connections(2, 2) == 2
    b.close()  # FIN mid-body
    assert up.wait_active_connections(1, 2) == 1
    idle.close()
    assert up.wait_active_connections(0, 2) == 0


def test_client_gone_during_delay_before_headers(up):
    up.enqueue(Reply(body=b"x", delay_before_headers=5))
    c = raw(up)
    c.send(build_request("GET", "/"))
    up.wait_requests(1)
    c.abort()
    assert up.wait_active_connections(0, 2) == 0
    # the server is still healthy
    up.enqueue(Reply(body=b"fine"))
    assert raw(up).request("GET", "/").body == b"fine"


def test_slow_reader_and_mid_body_abort(up):
    data = load_fixture(SSE)
    up.enqueue(Reply.fixture(SSE, chunked=False, chunk_sizes=[64]))
    c = raw(up, rcvbuf=4096)
    head = post(c)
    got = SlowReader(c, rate=20000, read_size=100).read(max_bytes=len(data))
    assert got == data
    # abort mid-body: server notices the disconnect
    up.enqueue(Reply.fixture(SSE, chunk_sizes=[10], delay_between_chunks=0.01))
    c = raw(up)
    head = post(c)
    part = c.read_body(head, max_bytes=30)
    assert data.startswith(part) and len(part) >= 30
    c.abort()
    assert up.wait_active_connections(0, 2) == 0


def test_stop_closes_listener_and_connections():
    u = FakeUpstream().start()
    port = u.port
    assert u.url == f"http://127.0.0.1:{port}"
    u.set_default(Reply(fault="hang_after_bytes"))
    c = RawClient("127.0.0.1", port).connect()
    c.send(build_request("GET", "/"))
    u.wait_requests(1)
    u.stop()
    c.read_head()  # head was sent before the hang
    try:
        assert c.read_until_closed() == b""
    except ConnectionResetError:
        pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)

"""Floor relay: granian RSGI inbound + lean_client (asyncio Protocol + httptools) upstream.

granian --interface rsgi --loop uvloop bench.floors.relay_lean:app   (SG_UPSTREAM=127.0.0.1:18000)
"""
import os

from gateway.upstream import Pool
from bench.mock_upstream import CHAT_COMPLETION, SSE_DONE, SSE_FINISH, SSE_ROLE, SSE_USAGE, sse_content

# /null: answer locally with the mock's payloads (same shape: response_stream + send_bytes per
# event), to separate granian's own cost from the upstream client's.
NULL_EVENTS = [SSE_ROLE] + [sse_content(b" tok") for _ in range(64)] + [SSE_FINISH, SSE_USAGE, SSE_DONE]

_h, _p = os.environ.get("SG_UPSTREAM", "127.0.0.1:18000").rsplit(":", 1)
UP_HOST, UP_PORT = _h, int(_p)
POOL_SIZE = int(os.environ.get("SG_POOL", "256"))


def fwd_headers(scope):
    out = []
    for k, v in scope.headers.items():
        if k == "content-type" or k.startswith("x-mock-"):
            out.append((k.encode(), v.encode()))
    return out


class App:
    pool = None

    def __rsgi_init__(self, loop):
        self.pool = Pool(max_per_host=POOL_SIZE)

    def __rsgi_del__(self, loop):
        pass

    async def __rsgi__(self, scope, proto):
        body = await proto()
        if scope.path == "/null":
            if b'"stream": true' in body:
                tr = proto.response_stream(200, [("content-type", "text/event-stream")])
                for e in NULL_EVENTS:
                    await tr.send_bytes(e)
            else:
                tr = proto.response_stream(200, [("content-type", "application/json")])
                await tr.send_bytes(CHAT_COMPLETION)
            return
        target = scope.path + ("?" + scope.query_string if scope.query_string else "")
        try:
            resp = await self.pool.request("POST", "http", UP_HOST, UP_PORT, target, fwd_headers(scope), body)
        except Exception as e:
            proto.response_bytes(502, [("content-type", "text/plain")], f"upstream error: {e!r}".encode())
            return
        try:
            ct = "application/octet-stream"
            for n, v in resp.headers:
                if len(n) == 12 and n.lower() == b"content-type":
                    ct = v.decode("latin-1")
            tr = proto.response_stream(resp.status, [("content-type", ct)])
            while chunk := await resp.read_chunk():
                await tr.send_bytes(chunk)
        finally:
            resp.close()


app = App()

"""Floor relay: granian RSGI inbound + httpcore.AsyncConnectionPool upstream (sniffio installed).

granian --interface rsgi --loop uvloop bench.floors.relay_httpcore:app   (SG_UPSTREAM=127.0.0.1:18000)
"""
import os

import httpcore

UPSTREAM = "http://" + os.environ.get("SG_UPSTREAM", "127.0.0.1:18000")
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
        self.pool = httpcore.AsyncConnectionPool(max_connections=POOL_SIZE, keepalive_expiry=30)

    def __rsgi_del__(self, loop):
        pass

    async def __rsgi__(self, scope, proto):
        body = await proto()
        target = scope.path + ("?" + scope.query_string if scope.query_string else "")
        try:
            async with self.pool.stream("POST", UPSTREAM + target, headers=fwd_headers(scope), content=body,
                                        extensions={"timeout": {"connect": 10, "read": 300}}) as resp:
                ct = "application/octet-stream"
                for n, v in resp.headers:
                    if n.lower() == b"content-type":
                        ct = v.decode("latin-1")
                tr = proto.response_stream(resp.status, [("content-type", ct)])
                async for chunk in resp.aiter_stream():
                    await tr.send_bytes(chunk)
        except Exception as e:
            try:
                proto.response_bytes(502, [("content-type", "text/plain")], f"upstream error: {e!r}".encode())
            except Exception:
                pass


app = App()

"""Floor relay served as ASGI: granian --interface asgi + lean_client upstream.

granian --interface asgi --loop uvloop bench.floors.relay_asgi_lean:app
"""
import os

from gateway.upstream import Pool
from bench.floors.relay_lean import NULL_EVENTS
from bench.mock_upstream import CHAT_COMPLETION

_h, _p = os.environ.get("SG_UPSTREAM", "127.0.0.1:18000").rsplit(":", 1)
UP_HOST, UP_PORT = _h, int(_p)
POOL_SIZE = int(os.environ.get("SG_POOL", "256"))
_pool = None

_START = "http.response.start"
_BODY = "http.response.body"


async def app(scope, receive, send):
    global _pool
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if _pool is None:
        _pool = Pool(max_per_host=POOL_SIZE)
    m = await receive()
    body = m.get("body", b"")
    if m.get("more_body"):
        parts = [body]
        while m.get("more_body"):
            m = await receive()
            parts.append(m.get("body", b""))
        body = b"".join(parts)
    if scope["path"] == "/null":  # answer locally (granian cost only), same shape as relay_lean
        if b'"stream": true' in body:
            await send({"type": _START, "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            for e in NULL_EVENTS:
                await send({"type": _BODY, "body": e, "more_body": True})
        else:
            await send({"type": _START, "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": _BODY, "body": CHAT_COMPLETION, "more_body": True})
        await send({"type": _BODY, "body": b"", "more_body": False})
        return
    hdrs = [(k, v) for k, v in scope["headers"] if k == b"content-type" or k.startswith(b"x-mock-")]
    qs = scope.get("query_string")
    target = scope["path"] + ("?" + qs.decode("latin-1") if qs else "")
    try:
        resp = await _pool.request("POST", "http", UP_HOST, UP_PORT, target, hdrs, body)
    except Exception as e:
        await send({"type": _START, "status": 502, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": _BODY, "body": f"upstream error: {e!r}".encode()})
        return
    try:
        ct = b"application/octet-stream"
        for n, v in resp.headers:
            if len(n) == 12 and n.lower() == b"content-type":
                ct = v
        await send({"type": _START, "status": resp.status, "headers": [(b"content-type", ct)]})
        while chunk := await resp.read_chunk():
            await send({"type": _BODY, "body": chunk, "more_body": True})
        await send({"type": _BODY, "body": b"", "more_body": False})
    finally:
        resp.close()

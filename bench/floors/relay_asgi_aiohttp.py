"""Floor relay served as ASGI: granian --interface asgi + aiohttp.ClientSession upstream.

granian --interface asgi --loop uvloop bench.floors.relay_asgi_aiohttp:app
"""
import os

import aiohttp

UPSTREAM = "http://" + os.environ.get("SG_UPSTREAM", "127.0.0.1:18000")
POOL_SIZE = int(os.environ.get("SG_POOL", "256"))
_session = None

_START = "http.response.start"
_BODY = "http.response.body"


async def app(scope, receive, send):
    global _session
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=POOL_SIZE, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
    m = await receive()
    body = m.get("body", b"")
    if m.get("more_body"):
        parts = [body]
        while m.get("more_body"):
            m = await receive()
            parts.append(m.get("body", b""))
        body = b"".join(parts)
    hdrs = {k.decode(): v.decode() for k, v in scope["headers"] if k == b"content-type" or k.startswith(b"x-mock-")}
    qs = scope.get("query_string")
    target = scope["path"] + ("?" + qs.decode("latin-1") if qs else "")
    try:
        resp = await _session.post(UPSTREAM + target, data=body, headers=hdrs)
    except Exception as e:
        await send({"type": _START, "status": 502, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": _BODY, "body": f"upstream error: {e!r}".encode()})
        return
    try:
        await send({"type": _START, "status": resp.status,
                    "headers": [(b"content-type", resp.headers.get("content-type", "application/octet-stream").encode())]})
        async for chunk in resp.content.iter_any():
            await send({"type": _BODY, "body": chunk, "more_body": True})
        await send({"type": _BODY, "body": b"", "more_body": False})
    finally:
        resp.release()

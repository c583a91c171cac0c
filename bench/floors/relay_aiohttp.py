"""Floor relay: granian RSGI inbound + aiohttp.ClientSession upstream.

granian --interface rsgi --loop uvloop bench.floors.relay_aiohttp:app   (SG_UPSTREAM=127.0.0.1:18000)
"""
import os

import aiohttp

UPSTREAM = "http://" + os.environ.get("SG_UPSTREAM", "127.0.0.1:18000")
POOL_SIZE = int(os.environ.get("SG_POOL", "256"))


def fwd_headers(scope):
    out = {}
    for k, v in scope.headers.items():
        if k == "content-type" or k.startswith("x-mock-"):
            out[k] = v
    return out


class App:
    session = None

    def __rsgi_init__(self, loop):
        pass

    def __rsgi_del__(self, loop):
        pass

    def _session(self):
        s = self.session
        if s is None:
            s = self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=POOL_SIZE, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return s

    async def __rsgi__(self, scope, proto):
        body = await proto()
        target = scope.path + ("?" + scope.query_string if scope.query_string else "")
        try:
            resp = await self._session().post(UPSTREAM + target, data=body, headers=fwd_headers(scope))
        except Exception as e:
            proto.response_bytes(502, [("content-type", "text/plain")], f"upstream error: {e!r}".encode())
            return
        try:
            tr = proto.response_stream(resp.status, [("content-type", resp.headers.get("content-type", "application/octet-stream"))])
            async for chunk in resp.content.iter_any():
                await tr.send_bytes(chunk)
        finally:
            resp.release()


app = App()

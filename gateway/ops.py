"""Ops listener: /healthz, /readyz, /metrics (and, later, the admin API).

Runs in its own process beside the granian proxy workers, so a slow scrape never
competes with the relay, and aggregates every worker's metrics (multiprocess mode).
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from .app import resolved_config
from .config import parse_hostport


async def _proxy_accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def make_app(proxy: tuple[str, int]) -> web.Application:
    async def healthz(request):
        return web.json_response({"status": "ok"})

    async def readyz(request):
        if await _proxy_accepts(*proxy):
            return web.json_response({"status": "ready", "config": "loaded", "proxy": "accepting"})
        return web.json_response({"status": "not ready", "config": "loaded", "proxy": "not accepting"}, status=503)

    async def metrics(request):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def _watch_parent(parent: int) -> None:
    # The ops process lives exactly as long as `sidegate serve`.
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    os._exit(0)


def main() -> None:
    cfg = resolved_config()
    host, port = parse_hostport(cfg.ops_listen, "ops_listen")
    proxy = parse_hostport(cfg.listen, "listen")
    parent = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()

    async def run():
        runner = web.AppRunner(make_app(proxy), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        await _watch_parent(parent)

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()

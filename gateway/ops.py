"""Ops listener: /healthz, /readyz, /metrics (and, later, the admin API).

Runs in its own process beside the granian proxy workers, so a slow scrape never
competes with the relay, and aggregates every worker's metrics (multiprocess mode).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sys

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from .app import resolved_config
from .config import ConfigError, parse_hostport
from .escalations import EscalationStore
from .policy import load_or_default


async def _proxy_accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _admin(handler):
    """Admin endpoints need `Authorization: Bearer $SIDEGATE_ADMIN_TOKEN`, a token agents do not hold."""

    async def wrapped(request):
        token = request.app["admin_token"]
        if not token:
            return web.json_response({"error": "admin API disabled: set SIDEGATE_ADMIN_TOKEN"}, status=403)
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": "missing or wrong admin token"}, status=401)
        return await handler(request)

    return wrapped


def make_app(proxy: tuple[str, int], cfg=None, admin_token: str | None = None) -> web.Application:
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

    @_admin
    async def list_escalations(request):
        status = request.query.get("status")
        rows = await asyncio.to_thread(request.app["escalations"].list, status)
        return web.json_response(rows)

    async def _resolve(request, approve: bool):
        store = request.app["escalations"]
        esc_id = request.match_info["id"]
        try:
            ttl = load_or_default(request.app["cfg"].policy).spec.permit_ttl_s
        except ConfigError:
            ttl = 3600
        row = await asyncio.to_thread(store.resolve, esc_id, approve, ttl)
        if row is None:
            existing = await asyncio.to_thread(store.get, esc_id)
            if existing is None:
                return web.json_response({"error": f"no escalation {esc_id}"}, status=404)
            return web.json_response({"error": f"escalation {esc_id} is {existing['status']}, not pending"}, status=409)
        return web.json_response(row)

    @_admin
    async def approve(request):
        return await _resolve(request, True)

    @_admin
    async def deny(request):
        return await _resolve(request, False)

    @_admin
    async def reload_policy(request):
        path = request.app["cfg"].policy
        if not os.path.exists(path):
            return web.json_response({"error": f"no policy file at {path}"}, status=404)
        try:
            await asyncio.to_thread(load_or_default, path)
        except ConfigError as e:
            return web.json_response({"error": str(e)}, status=400)
        os.utime(path)  # workers reload on a changed stamp, within a second
        return web.json_response({"status": "reloading", "policy": path})

    app = web.Application()
    app["cfg"] = cfg
    app["admin_token"] = admin_token
    app["escalations"] = EscalationStore(cfg.escalations) if cfg is not None else None
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/escalations", list_escalations)
    app.router.add_post("/admin/escalations/{id}/approve", approve)
    app.router.add_post("/admin/escalations/{id}/deny", deny)
    app.router.add_post("/admin/policy/reload", reload_policy)
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
        runner = web.AppRunner(make_app(proxy, cfg, os.environ.get("SIDEGATE_ADMIN_TOKEN")), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        await _watch_parent(parent)

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()

"""The granian ASGI application of one proxy worker.

Each worker reads the resolved configuration that `sidegate serve` put in its
environment, so every worker behaves the same whatever `--workers` says.
"""

from __future__ import annotations

import logging
import os

import msgspec

from . import config as config_mod
from .config import Config

ENV_RESOLVED = "SIDEGATE_RESOLVED_CONFIG"
log = logging.getLogger("sidegate.relay")
_INTERNAL = b'{"error":{"type":"sidegate_internal_error","message":"sidegate: internal error"}}'


def resolved_config() -> Config:
    raw = os.environ.get(ENV_RESOLVED)
    if raw:
        return msgspec.json.decode(raw, type=Config)
    return config_mod.load()


class ProxyApp:
    def __init__(self) -> None:
        self.relay = None

    def _start(self):
        from .logs import setup
        from .relay import Relay

        cfg = resolved_config()
        setup(cfg.log_level)
        self.relay = Relay(cfg)
        self.relay.start()
        return self.relay

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            relay = self.relay or self._start()
            try:
                await relay(scope, receive, send)
            except Exception as e:  # a bug must not leak details (or secrets) to the client
                log.exception("internal error: %s", type(e).__name__)
                try:
                    await send({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": _INTERNAL})
                except Exception:
                    pass  # the response had already started
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    if self.relay is None:
                        self._start()
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    if self.relay is not None:
                        await self.relay.stop()
                    _mark_dead()
                    await send({"type": "lifespan.shutdown.complete"})
                    return


def _mark_dead() -> None:
    """Multiprocess metrics: a worker that exits stops counting in live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


app = ProxyApp()

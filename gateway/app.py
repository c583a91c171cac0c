"""The granian RSGI application of one proxy worker.

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


def resolved_config() -> Config:
    raw = os.environ.get(ENV_RESOLVED)
    if raw:
        return msgspec.json.decode(raw, type=Config)
    return config_mod.load()


class ProxyApp:
    def __init__(self) -> None:
        self.relay = None

    def __rsgi_init__(self, loop) -> None:
        from .logs import setup
        from .relay import Relay

        cfg = resolved_config()
        setup(cfg.log_level)
        self.relay = Relay(cfg)  # the upstream pool starts with the first request's loop

    def __rsgi_del__(self, loop) -> None:
        if self.relay is not None:
            loop.run_until_complete(self.relay.stop())

    async def __rsgi__(self, scope, proto) -> None:
        if scope.proto != "http":
            return
        try:
            await self.relay(scope, proto)
        except Exception as e:  # a bug must not leak details (or secrets) to the client
            logging.getLogger("sidegate.relay").exception("internal error: %s", type(e).__name__)
            try:
                proto.response_bytes(500, [("content-type", "application/json")],
                                     b'{"error":{"type":"sidegate_internal_error","message":"sidegate: internal error"}}')
            except Exception:
                pass  # the response had already started


app = ProxyApp()
logging.getLogger("sidegate").addHandler(logging.NullHandler())

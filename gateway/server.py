"""`sidegate serve`: the granian proxy workers plus the ops listener process."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile

import msgspec

from .app import ENV_RESOLVED
from .config import Config, parse_hostport

log = logging.getLogger("sidegate.server")


def _metrics_dir() -> str:
    """A clean multiprocess directory per start: stale files would double-count."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
        return path
    return tempfile.mkdtemp(prefix="sidegate-metrics-")


def serve(cfg: Config) -> int:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    host, port = parse_hostport(cfg.listen, "listen")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir()
    os.environ[ENV_RESOLVED] = msgspec.json.encode(cfg).decode()
    ops = subprocess.Popen([sys.executable, "-m", "gateway.ops", str(os.getpid())])
    log.info("proxy on http://%s:%d (%d worker(s)), ops on http://%s", host, port, cfg.workers, cfg.ops_listen)
    try:
        Granian(
            "gateway.app:app",
            address=host,
            port=port,
            interface=Interfaces.ASGI,
            loop=Loops.uvloop,
            workers=cfg.workers,
            log_access=False,
            log_level=cfg.log_level if cfg.log_level in ("debug", "info", "warning", "error") else "info",
            respawn_failed_workers=True,
        ).serve()
    finally:
        ops.terminate()
        try:
            ops.wait(5)
        except subprocess.TimeoutExpired:
            ops.kill()
    return 0

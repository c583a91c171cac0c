"""Start the real gateway (`sidegate serve`, granian on loopback) as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROVIDERS = ("OPENAI", "ANTHROPIC", "NVIDIA_NIM", "BEDROCK", "GEMINI", "VERTEX_GEMINI")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    def __init__(self, upstream_url: str | None = None, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.port = free_port()
        self.ops_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ops_url = f"http://127.0.0.1:{self.ops_port}"
        self.tmp = tempfile.TemporaryDirectory(prefix="sidegate-test-")
        self.log_path = Path(self.tmp.name) / "gateway.log"
        e = {k: v for k, v in os.environ.items() if not k.startswith(("SIDEGATE_", "AWS_", "PROMETHEUS_"))}
        e.update({
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "PROMETHEUS_MULTIPROC_DIR": str(Path(self.tmp.name) / "metrics"),
            "SIDEGATE_TRACES": str(Path(self.tmp.name) / "traces.sqlite"),
            "SIDEGATE_POLICY": str(Path(self.tmp.name) / "none.policy.yaml"),
            "SIDEGATE_READ_TIMEOUT": "2",
            "SIDEGATE_CONNECT_TIMEOUT": "2",
        })
        if upstream_url:
            for p in PROVIDERS:
                e[f"SIDEGATE_UPSTREAM_{p}"] = upstream_url
        e.update(env or {})
        self.env = e
        self.args = args or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "Gateway":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--ops-listen", f"127.0.0.1:{self.ops_port}", *self.args],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.ops_url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway not ready in {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def metrics(self) -> str:
        with urllib.request.urlopen(self.ops_url + "/metrics", timeout=5) as r:
            return r.read().decode()

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.tmp.cleanup()

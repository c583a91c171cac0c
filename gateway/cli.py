"""Command line: `sidegate serve`, `sidegate env`."""

from __future__ import annotations

import argparse
import sys

from . import config as config_mod
from . import routes
from .policy import load_or_default
from .config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidegate", description="Sidecar LLM gateway")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the gateway (flags override SIDEGATE_* env vars)")
    s.add_argument("--config", help="config file (SIDEGATE_CONFIG)")
    s.add_argument("--policy", help="policy file (SIDEGATE_POLICY)")
    s.add_argument("--listen", help="proxy HOST:PORT (SIDEGATE_LISTEN), default 127.0.0.1:8005")
    s.add_argument("--ops-listen", help="ops HOST:PORT (SIDEGATE_OPS_LISTEN), default 127.0.0.1:8006")
    s.add_argument("--workers", type=int, help="proxy worker processes (SIDEGATE_WORKERS)")
    s.add_argument("--check", action="store_true", help="validate the configuration and exit")
    # `traces` is parsed by gateway/traces/cli.py, imported only when used: importing the
    # trace writer pulls in the metrics, which must not start before `serve` sets them up.
    sub.add_parser("traces", help="read the local trace store (sessions, show, export)")
    e = sub.add_parser("env", help="print shell exports that point agents and SDKs at the gateway")
    e.add_argument("--config", help="config file (SIDEGATE_CONFIG)")
    e.add_argument("--listen", help="proxy HOST:PORT")
    return p


def env_exports(listen: str) -> str:
    base = f"http://{listen}"
    lines = {
        "OPENAI_BASE_URL": f"{base}/v1/openai",
        "ANTHROPIC_BASE_URL": f"{base}/v1/anthropic",
        "NVIDIA_BASE_URL": f"{base}/v1/nvidia-nim",
        "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": f"{base}/v1/bedrock",
        "GOOGLE_GEMINI_BASE_URL": f"{base}/v1/gemini",
        "GOOGLE_VERTEX_BASE_URL": f"{base}/v1/vertex-gemini",
    }
    return "\n".join(f"export {k}={v}" for k, v in lines.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["traces"]:
        from .traces import cli as traces_cli

        top = argparse.ArgumentParser(prog="sidegate")
        traces_cli.add_parser(top.add_subparsers(dest="cmd", required=True))
        return traces_cli.run(top.parse_args(argv))
    args = _parser().parse_args(argv)
    flags = {k: getattr(args, k, None) for k in ("policy", "listen", "ops_listen", "workers")}
    try:
        cfg = config_mod.load(args.config, flags=flags)
        routes.build(cfg)  # region names and upstream URLs fail here, before any worker starts
        if args.cmd == "serve":
            load_or_default(cfg.policy)  # a bad policy file stops start-up too
    except ConfigError as e:
        print(f"sidegate: configuration error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "env":
        print(env_exports(cfg.listen))
        return 0
    if args.check:
        print("configuration ok")
        return 0
    from .logs import setup
    from .server import serve

    setup(cfg.log_level)
    return serve(cfg)


if __name__ == "__main__":
    sys.exit(main())

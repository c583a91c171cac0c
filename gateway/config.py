"""Gateway configuration: msgspec Structs loaded from YAML, env vars and flags.

Precedence (highest first): command-line flags, SIDEGATE_* env vars, the config file,
embedded defaults. A bad file stops start-up naming the file, line and field.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import yaml

PROVIDERS = ("openai", "anthropic", "nvidia-nim", "bedrock", "gemini", "vertex-gemini")

DEFAULT_UPSTREAMS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "nvidia-nim": "https://integrate.api.nvidia.com/v1",
    "bedrock": "https://bedrock-runtime.{region}.amazonaws.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "vertex-gemini": "https://{region}-aiplatform.googleapis.com",
}


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator (file, line, field)."""


class Credential(msgspec.Struct, forbid_unknown_fields=True):
    """Where the gateway finds a provider key to inject upstream."""

    env: str | None = None
    file: str | None = None


class Route(msgspec.Struct, forbid_unknown_fields=True):
    upstream: str | None = None
    credential: Credential | None = None
    region: str | None = None


class Timeouts(msgspec.Struct, forbid_unknown_fields=True):
    connect: float = 10.0  # seconds to open a TCP/TLS connection
    read: float = 300.0  # longest silence between two upstream reads
    total: float = 1800.0  # whole request, first byte sent to last byte read


class Traces(msgspec.Struct, forbid_unknown_fields=True):
    path: str = "./sidegate-data/traces.sqlite"


class Config(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:8005"
    ops_listen: str = "127.0.0.1:8006"
    workers: int = 1
    policy: str = "./sidegate.policy.yaml"
    max_request_bytes: int = 32 * 1024 * 1024
    upstream_connections: int = 1024  # per upstream host and worker; more requests wait for one
    proxy_token: str | None = None  # X-Sidegate-Key required when set
    allow_public_listen: bool = False
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    traces: Traces = msgspec.field(default_factory=Traces)
    escalations: str = "./sidegate-data/escalations.sqlite"
    routes: dict[str, Route] = msgspec.field(default_factory=dict)
    log_level: str = "info"


# env var -> (config attribute, converter); flags use the same names, lower-cased.
ENV_FIELDS = {
    "SIDEGATE_LISTEN": "listen",
    "SIDEGATE_OPS_LISTEN": "ops_listen",
    "SIDEGATE_WORKERS": "workers",
    "SIDEGATE_POLICY": "policy",
    "SIDEGATE_MAX_REQUEST_BYTES": "max_request_bytes",
    "SIDEGATE_UPSTREAM_CONNECTIONS": "upstream_connections",
    "SIDEGATE_PROXY_TOKEN": "proxy_token",
    "SIDEGATE_CONNECT_TIMEOUT": "timeouts.connect",
    "SIDEGATE_READ_TIMEOUT": "timeouts.read",
    "SIDEGATE_TOTAL_TIMEOUT": "timeouts.total",
    "SIDEGATE_TRACES": "traces.path",
    "SIDEGATE_ESCALATIONS": "escalations",
    "SIDEGATE_LOG_LEVEL": "log_level",
}


def upstream_env_name(provider: str) -> str:
    return "SIDEGATE_UPSTREAM_" + provider.upper().replace("-", "_")


def _find_key(node, name: str, trail: tuple = ()):
    """Depth-first search for a mapping key: (dotted path, 1-based line) or None."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = trail + (str(key.value),)
            if key.value == name:
                return ".".join(here), key.start_mark.line + 1
            found = _find_key(value, name, here)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _find_key(item, name, trail + (str(i),))
            if found:
                return found
    return None


def _yaml_line(text: str, dotted: str) -> int | None:
    """The 1-based line of a dotted field path like `routes.openai.upstream`."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in [p for p in dotted.split(".") if p]:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _located(path: Path, text: str, err: msgspec.ValidationError) -> ConfigError:
    """Phrase a msgspec validation error as `file:line: field a.b.c: problem`."""
    msg = str(err)
    problem, _, at = msg.partition(" - at `")
    at = at.rstrip("`")
    dotted = at.removeprefix("$").replace("[", ".").replace("]", "").strip(".")
    unknown = problem.split("`")[1] if "unknown field `" in problem else None
    line = None
    if unknown:
        try:
            found = _find_key(yaml.compose(text), unknown)
        except yaml.YAMLError:
            found = None
        if found:
            dotted, line = found
    elif "..." not in dotted:
        line = _yaml_line(text, dotted)
    where = f":{line}" if line else ""
    return ConfigError(f"{path}{where}: field {dotted or '(top level)'}: {problem}")


class FieldError(ValueError):
    """A semantic check failed on one field (line looked up by the caller)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


def load_yaml_file(path: Path, kind, build, what: str):
    """Read a YAML file into the Struct `kind`, then `build(struct)` (which may raise
    FieldError); every problem comes out as `file:line: field a.b: problem`."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} file: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: field (top level): expected a mapping")
    try:
        spec = msgspec.convert(raw, kind, str_keys=True)
    except msgspec.ValidationError as e:
        raise _located(path, text, e) from None
    try:
        return build(spec)
    except FieldError as e:
        line = _yaml_line(text, e.field)
        where = f":{line}" if line else ""
        raise ConfigError(f"{path}{where}: field {e.field}: {e}") from None


def _validated(cfg: Config) -> Config:
    validate(cfg)
    return cfg


def _decode_file(path: Path) -> Config:
    return load_yaml_file(path, Config, _validated, "config")


def _set(cfg: Config, dotted: str, value: str, source: str) -> None:
    target = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        target = getattr(target, p)
    current = getattr(target, leaf)
    kind = type(current) if current is not None else str
    try:
        converted = kind(value) if kind in (int, float) else value
    except ValueError:
        raise ConfigError(f"{source}: expected {kind.__name__}, got {value!r}") from None
    setattr(target, leaf, converted)


def load(config_file: str | None = None, env: dict[str, str] | None = None,
         flags: dict[str, str | None] | None = None) -> Config:
    """Resolve the effective configuration and validate it."""
    env = os.environ if env is None else env
    path = config_file or env.get("SIDEGATE_CONFIG")
    cfg = _decode_file(Path(path)) if path else Config()
    for name, dotted in ENV_FIELDS.items():
        if env.get(name):
            _set(cfg, dotted, env[name], name)
    for provider in PROVIDERS:
        url = env.get(upstream_env_name(provider))
        if url:
            route = cfg.routes.setdefault(provider, Route())
            route.upstream = url
    for name, value in (flags or {}).items():
        if value is not None:
            _set(cfg, ENV_FIELDS["SIDEGATE_" + name.upper()], str(value), "--" + name.replace("_", "-"))
    try:
        validate(cfg)
    except FieldError as e:
        raise ConfigError(f"{path or 'settings'}: field {e.field}: {e} (after env vars and flags)") from None
    return cfg


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostport(value: str, field: str) -> tuple[str, int]:
    try:
        return parse_hostport(value, field)
    except ConfigError as e:
        raise FieldError(field, str(e).split(": ", 1)[1]) from None


def validate(cfg: Config) -> None:
    host, _ = _hostport(cfg.listen, "listen")
    _hostport(cfg.ops_listen, "ops_listen")
    if cfg.workers < 1:
        raise FieldError("workers", "must be >= 1")
    if cfg.upstream_connections < 1:
        raise FieldError("upstream_connections", "must be >= 1")
    if cfg.max_request_bytes < 1:
        raise FieldError("max_request_bytes", "must be >= 1")
    for name, route in cfg.routes.items():
        if name not in PROVIDERS:
            raise FieldError(f"routes.{name}", f"unknown route, expected one of {', '.join(PROVIDERS)}")
        if route.upstream:
            parts = urlsplit(route.upstream)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FieldError(f"routes.{name}.upstream", "expected an http:// or https:// base URL")
            if parts.query or parts.fragment or parts.username:
                raise FieldError(f"routes.{name}.upstream", "no query, fragment or user info allowed")
        if route.credential and not (route.credential.env or route.credential.file):
            raise FieldError(f"routes.{name}.credential", "set env or file")
    injecting = any(r.credential for r in cfg.routes.values())
    if not is_loopback(host):
        if injecting:
            raise FieldError("listen", "credential injection is on, so the proxy must listen on loopback")
        if not cfg.allow_public_listen:
            raise FieldError("listen", f"{host} is not loopback; set allow_public_listen: true to expose the proxy")

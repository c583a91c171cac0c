"""Route table: a path prefix picks a provider and its one configured upstream.

The client never names the upstream host: the route's base URL is fixed at start-up and
the request path is only ever appended to it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import DEFAULT_UPSTREAMS, PROVIDERS, Config, ConfigError

# URL segment after /v1/ -> provider name
PREFIXES = {p: p for p in PROVIDERS}
PREFIXES["bedrock-anthropic"] = "bedrock"

# Dialect = the wire family that decides error envelopes and stream framing.
DIALECTS = {
    "openai": "openai",
    "nvidia-nim": "openai",
    "anthropic": "anthropic",
    "bedrock": "bedrock",
    "gemini": "gemini",
    "vertex-gemini": "gemini",
}

# Header that carries an injected credential, per provider.
INJECT_HEADER = {
    "openai": ("authorization", "Bearer {}"),
    "nvidia-nim": ("authorization", "Bearer {}"),
    "anthropic": ("x-api-key", "{}"),
    "bedrock": ("authorization", "Bearer {}"),
    "gemini": ("x-goog-api-key", "{}"),
    "vertex-gemini": ("authorization", "Bearer {}"),
}

# Safe to put in a host name; covers us-east-1, us-central1, europe-west4, global.
_REGION = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")


@dataclass(slots=True)
class Upstream:
    scheme: str
    host: str
    port: int
    base_path: str  # no trailing slash
    host_header: str
    region: str | None = None

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host_header}"


@dataclass(slots=True)
class ProviderRoute:
    provider: str
    dialect: str
    upstream: Upstream
    credential_env: str | None
    credential_file: str | None
    inject_header: tuple[str, str]

    def credential(self) -> str | None:
        """The injected key, read fresh so a rotated secret file is picked up."""
        if self.credential_env:
            return os.environ.get(self.credential_env) or None
        if self.credential_file:
            try:
                with open(self.credential_file) as f:
                    return f.read().strip() or None
            except OSError:
                return None
        return None

    @property
    def injects(self) -> bool:
        return bool(self.credential_env or self.credential_file)


def _region(provider: str, cfg_region: str | None) -> str:
    if provider == "bedrock":
        region = cfg_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    else:
        region = cfg_region or os.environ.get("GOOGLE_CLOUD_LOCATION") or "us-central1"
    if not _REGION.match(region):
        raise ConfigError(f"routes.{provider}.region: {region!r} is not a region name")
    return region


def parse_upstream(url: str, region: str | None = None) -> Upstream:
    parts = urlsplit(url.format(region=region) if "{region}" in url else url)
    scheme = parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    host = parts.hostname or ""
    host_header = host if default_port else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if default_port else f"[{host}]:{port}"
    return Upstream(scheme, host, port, parts.path.rstrip("/"), host_header, region)


def build(cfg: Config) -> dict[str, ProviderRoute]:
    """Resolve every provider route once, at start-up."""
    table: dict[str, ProviderRoute] = {}
    for provider in PROVIDERS:
        rc = cfg.routes.get(provider)
        url = (rc.upstream if rc else None) or DEFAULT_UPSTREAMS[provider]
        region = None
        if "{region}" in url or provider in ("bedrock", "vertex-gemini"):
            region = _region(provider, rc.region if rc else None)
        cred = rc.credential if rc else None
        table[provider] = ProviderRoute(
            provider=provider,
            dialect=DIALECTS[provider],
            upstream=parse_upstream(url, region),
            credential_env=cred.env if cred else None,
            credential_file=cred.file if cred else None,
            inject_header=INJECT_HEADER[provider],
        )
    return table


def prefixes() -> list[str]:
    return [f"/v1/{p}" for p in PREFIXES]

"""Policy file: YAML into msgspec Structs, regexes compiled with RE2 (linear time).

First matching rule wins; `default` applies when none matches. Per-tenant overrides
replace `mode`, `default` and (when given) `rules` for that tenant.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Literal

import msgspec
import re2

from .config import ConfigError, FieldError, load_yaml_file

log = logging.getLogger("sidegate.policy")

Decision = Literal["allow", "deny", "escalate"]
Mode = Literal["observe", "enforce"]


class RuleSpec(msgspec.Struct, forbid_unknown_fields=True):
    decision: Decision
    name: str | None = None
    tool: str | None = None  # regex on the tool name
    args: str | None = None  # regex on the canonical JSON arguments
    actor: str | None = None  # regex on the actor id
    reason: str | None = None


class AuthoritySpec(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    timeout_ms: int = 250
    on_error: Decision = "deny"


class TenantSpec(msgspec.Struct, forbid_unknown_fields=True):
    mode: Mode | None = None
    default: Decision | None = None
    rules: list[RuleSpec] | None = None


class PolicySpec(msgspec.Struct, forbid_unknown_fields=True):
    mode: Mode = "enforce"
    default: Decision = "allow"
    rules: list[RuleSpec] = msgspec.field(default_factory=list)
    authority: AuthoritySpec | None = None
    tenants: dict[str, TenantSpec] = msgspec.field(default_factory=dict)
    permit_ttl_s: int = 3600  # how long an approval stays usable


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # an unsupported pattern must not print to stderr


class Rule:
    __slots__ = ("name", "tool", "args", "actor", "decision", "reason")

    def __init__(self, spec: RuleSpec, where: str) -> None:
        self.name = spec.name or where
        self.decision = spec.decision
        self.reason = spec.reason or f"rule {self.name}"
        self.tool = _compile(spec.tool, f"{where}.tool")
        self.args = _compile(spec.args, f"{where}.args")
        self.actor = _compile(spec.actor, f"{where}.actor")


def _compile(pattern: str | None, field: str):
    if pattern is None:
        return None
    try:
        return re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error as e:
        msg = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise FieldError(field, f"not a valid RE2 regular expression: {msg}") from None


class Outcome(msgspec.Struct, frozen=True):
    decision: str
    reason: str
    rule: str | None


class Effective:
    """The policy as one tenant sees it."""

    __slots__ = ("mode", "default", "rules", "_candidates")

    def __init__(self, mode: str, default: str, rules: list[Rule]) -> None:
        self.mode = mode
        self.default = default
        self.rules = rules
        # (tool, actor) -> rules whose tool and actor patterns match: agents call the same
        # few tools again and again, so only the argument regexes run per call.
        self._candidates: dict[tuple[str, str], list[Rule]] = {}

    def evaluate(self, tool: str, args: str, actor: str) -> Outcome:
        key = (tool, actor)
        rules = self._candidates.get(key)
        if rules is None:
            if len(self._candidates) >= 4096:
                self._candidates.clear()
            rules = self._candidates[key] = [
                r for r in self.rules
                if (r.tool is None or r.tool.search(tool) is not None)
                and (r.actor is None or r.actor.search(actor) is not None)]
        for rule in rules:
            if rule.args is None or rule.args.search(args) is not None:
                return Outcome(rule.decision, rule.reason, rule.name)
        return Outcome(self.default, "no rule matched" if self.default != "allow" else "", None)


class Policy:
    def __init__(self, spec: PolicySpec, source: str = "<embedded>") -> None:
        self.spec = spec
        self.source = source
        rules = [Rule(r, f"rules.{i}") for i, r in enumerate(spec.rules)]
        self.base = Effective(spec.mode, spec.default, rules)
        self.tenants: dict[str, Effective] = {}
        for name, t in spec.tenants.items():
            trules = rules if t.rules is None else [Rule(r, f"tenants.{name}.rules.{i}") for i, r in enumerate(t.rules)]
            self.tenants[name] = Effective(t.mode or spec.mode, t.default or spec.default, trules)
        self.authority = spec.authority

    def for_tenant(self, tenant: str | None) -> Effective:
        return self.tenants.get(tenant, self.base) if tenant else self.base


ALLOW_ALL = Policy(PolicySpec())


def load_policy(path: str | os.PathLike) -> Policy:
    path = Path(path)
    return load_yaml_file(path, PolicySpec, lambda spec: Policy(spec, str(path)), "policy")


def load_or_default(path: str | None) -> Policy:
    """Start-up: a missing default file means allow-all in enforce mode; a bad file stops."""
    if path and Path(path).exists():
        return load_policy(path)
    return ALLOW_ALL


class PolicyStore:
    """The live policy of one worker, reloaded when the file changes.

    A bad file seen on reload is refused and logged; the last good policy stays.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.policy = load_or_default(path)
        self._stamp = self._file_stamp()

    def _file_stamp(self):
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def watch(self, every: float = 1.0) -> None:
        """Poll the file's stamp in the background, so the hot path never stats it."""
        while True:
            await asyncio.sleep(every)
            self.maybe_reload()

    def maybe_reload(self) -> bool:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        if stamp is None:
            log.warning("policy file %s disappeared; keeping the last good policy", self.path)
            return False
        try:
            self.policy = load_policy(self.path)
        except ConfigError as e:
            log.error("policy reload refused, keeping the last good policy: %s", e)
            return False
        log.info("policy reloaded from %s", self.path)
        return True

"""Policy file, rule matching, live reload, escalation permits."""

from __future__ import annotations

import os
import time

import pytest

from gateway.config import ConfigError
from gateway.escalations import EscalationStore
from gateway.governance.base import ToolCall, canonical_json
from gateway.policy import PolicyStore, load_policy

POLICY = r"""
mode: enforce
default: allow
rules:
  - name: no-force-push
    tool: "^(bash|shell|run_command)$"
    args: 'git\s+push\s+.*(--force|-f)\b'
    decision: deny
    reason: force push is not allowed
  - name: deploys
    tool: "^deploy_"
    actor: "^ci-"
    decision: escalate
    reason: deploys need a human
  - name: no-rm
    tool: "^bash$"
    args: '"command":"rm '
    decision: deny
    reason: no rm
tenants:
  acme: {mode: observe}
  strict:
    default: deny
    rules:
      - {tool: "^get_weather$", decision: allow}
"""


@pytest.fixture
def policy_file(tmp_path):
    p = tmp_path / "sidegate.policy.yaml"
    p.write_text(POLICY)
    return p


def test_first_match_wins_and_default(policy_file):
    pol = load_policy(policy_file)
    eff = pol.for_tenant(None)
    out = eff.evaluate("bash", canonical_json('{"command": "git push origin main --force"}'), "bot")
    assert (out.decision, out.reason, out.rule) == ("deny", "force push is not allowed", "no-force-push")
    assert eff.evaluate("bash", canonical_json('{"command":"ls"}'), "bot").decision == "allow"
    assert eff.evaluate("deploy_prod", "{}", "ci-7").decision == "escalate"
    assert eff.evaluate("deploy_prod", "{}", "dev-1").decision == "allow"  # actor does not match


def test_rules_see_canonical_arguments(policy_file):
    eff = load_policy(policy_file).for_tenant(None)
    spaced = ToolCall("bash", '{ "command" :  "rm -rf /tmp/x" }')
    assert spaced.canonical_arguments() == '{"command":"rm -rf /tmp/x"}'
    assert eff.evaluate("bash", spaced.canonical_arguments(), "a").decision == "deny"
    assert canonical_json('{"b":1,"a":{"d":2,"c":3}}') == '{"a":{"c":3,"d":2},"b":1}'


def test_tenant_overrides(policy_file):
    pol = load_policy(policy_file)
    assert pol.for_tenant("acme").mode == "observe"
    assert pol.for_tenant("acme").evaluate("bash", '{"command":"git push -f x"}', "a").decision == "deny"
    strict = pol.for_tenant("strict")
    assert strict.evaluate("get_weather", "{}", "a").decision == "allow"
    assert strict.evaluate("bash", '{"command":"ls"}', "a").decision == "deny"
    assert pol.for_tenant("unknown").mode == "enforce"


@pytest.mark.parametrize("text,where", [
    ("rules:\n  - tool: '(unclosed'\n    decision: deny\n", ":2: field rules.0.tool: not a valid RE2"),
    ("rules:\n  - tool: '(?<=x)y'\n    decision: deny\n", ":2: field rules.0.tool: not a valid RE2"),
    ("rules:\n  - tool: x\n    decision: maybe\n", ":3: field rules.0.decision"),
    ("mode: enforce\ndefualt: deny\n", ":2: field defualt"),
    ("authority:\n  url: http://x\n  on_error: explode\n", ":3: field authority.on_error"),
])
def test_bad_policy_names_file_line_and_field(tmp_path, text, where):
    p = tmp_path / "bad.policy.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_policy(p)
    assert str(e.value).startswith(str(p) + where.split(" field")[0]), str(e.value)
    assert where.split(": ", 1)[1] in str(e.value)


def test_regexes_are_linear_time(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("rules:\n  - args: '(a+)+$'\n    decision: deny\n")
    eff = load_policy(p).for_tenant(None)
    t0 = time.perf_counter()
    assert eff.evaluate("t", "a" * 5000 + "!", "x").decision == "allow"
    assert time.perf_counter() - t0 < 0.5  # a backtracking engine takes years here


def test_live_reload_good_then_bad_file_keeps_last_good(policy_file):
    store = PolicyStore(str(policy_file))
    assert store.policy.for_tenant(None).evaluate("deploy_x", "{}", "ci-1").decision == "escalate"
    policy_file.write_text("default: deny\n")
    os.utime(policy_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store.maybe_reload() is True
    assert store.policy.for_tenant(None).evaluate("anything", "{}", "a").decision == "deny"
    policy_file.write_text("default: [broken\n")
    os.utime(policy_file, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert store.maybe_reload() is False
    assert store.policy.for_tenant(None).evaluate("anything", "{}", "a").decision == "deny"


def test_missing_policy_file_is_allow_all(tmp_path):
    store = PolicyStore(str(tmp_path / "none.yaml"))
    eff = store.policy.for_tenant(None)
    assert eff.mode == "enforce" and eff.default == "allow" and eff.rules == []


def test_permit_is_single_use_and_matches_exactly(tmp_path):
    store = EscalationStore(str(tmp_path / "esc.sqlite"))
    esc = store.open("acme", "ci-1", "deploy_prod", '{"env":"prod"}', "deploys need a human")
    assert store.list("pending")[0]["id"] == esc
    assert store.consume_permit("acme", "ci-1", "deploy_prod", '{"env":"prod"}') is None  # not approved yet
    assert store.resolve(esc, True, ttl_s=60)["status"] == "approved"
    assert store.resolve(esc, True, ttl_s=60) is None  # only pending ones resolve
    assert store.consume_permit("acme", "ci-2", "deploy_prod", '{"env":"prod"}') is None  # other actor
    assert store.consume_permit("acme", "ci-1", "deploy_prod", '{"env":"dev"}') is None  # other arguments
    assert store.consume_permit("acme", "ci-1", "deploy_prod", '{"env":"prod"}') == esc
    assert store.consume_permit("acme", "ci-1", "deploy_prod", '{"env":"prod"}') is None  # used up


def test_permit_expires(tmp_path):
    store = EscalationStore(str(tmp_path / "esc.sqlite"))
    esc = store.open("t", "a", "tool", "{}", "r")
    store.resolve(esc, True, ttl_s=0.05)
    time.sleep(0.1)
    assert store.consume_permit("t", "a", "tool", "{}") is None


def test_denied_escalation_gives_no_permit(tmp_path):
    store = EscalationStore(str(tmp_path / "esc.sqlite"))
    esc = store.open("t", "a", "tool", "{}", "r")
    assert store.resolve(esc, False, ttl_s=60)["status"] == "denied"
    assert store.consume_permit("t", "a", "tool", "{}") is None


def test_example_policy_in_deploy_loads_and_denies():
    from tests.support.gateway_proc import ROOT

    eff = load_policy(ROOT / "deploy" / "policy.example.yaml").for_tenant(None)
    assert eff.evaluate("bash", canonical_json('{"command": "git push -f origin main"}'), "a").decision == "deny"
    assert eff.evaluate("bash", canonical_json('{"command": "ls -la"}'), "a").decision == "allow"

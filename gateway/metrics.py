"""Prometheus metrics: process-wide singletons, label children cached for the hot path.

Several granian workers write through prometheus-client's multiprocess mode; the ops
listener aggregates them. PROMETHEUS_MULTIPROC_DIR must be set before this import.
"""

from __future__ import annotations

import re

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("sidegate_requests", "Proxied requests", ["provider", "tenant", "status"])
UPSTREAM_ERRORS = Counter("sidegate_upstream_errors", "Upstream failures and error statuses",
                          ["provider", "tenant", "status"])
UPSTREAM_LATENCY = Histogram("sidegate_upstream_latency_ms", "Time to the upstream response head, ms",
                             ["provider"], buckets=(5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000))
ACTIVE_STREAMS = Gauge("sidegate_active_streams", "Streams being relayed", ["provider"],
                       multiprocess_mode="livesum")

_SAFE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_children: dict[tuple, object] = {}


def tenant_label(tenant: str | None) -> str:
    """Bound label cardinality and content: tenants come from clients."""
    if not tenant:
        return ""
    return tenant if _SAFE.match(tenant) else "invalid"


def _child(metric, key: tuple):
    child = _children.get((metric, key))
    if child is None:
        child = _children[(metric, key)] = metric.labels(*key)
    return child


def request_done(provider: str, tenant: str, status: int) -> None:
    _child(REQUESTS, (provider, tenant, str(status))).inc()
    if status >= 500 or status == 429:
        _child(UPSTREAM_ERRORS, (provider, tenant, str(status))).inc()


def upstream_latency(provider: str, ms: float) -> None:
    _child(UPSTREAM_LATENCY, (provider,)).observe(ms)


def streams(provider: str):
    return _child(ACTIVE_STREAMS, (provider,))

TOOL_CALLS = Counter("sidegate_tool_calls", "Tool calls decided", ["provider", "tenant", "decision"])
DECISION_LATENCY = Histogram("sidegate_decision_latency_ms", "Time to decide one tool call, ms",
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000))
ESCALATIONS = Counter("sidegate_escalations", "Escalations by event", ["event"])


def decision(provider: str, tenant: str, outcome: str, ms: float) -> None:
    _child(TOOL_CALLS, (provider, tenant_label(tenant), outcome)).inc()
    DECISION_LATENCY.observe(ms)


def escalation(event: str) -> None:
    _child(ESCALATIONS, (event,)).inc()

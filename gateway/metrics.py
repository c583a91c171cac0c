"""Prometheus metrics: process-wide singletons, label children cached for the hot path.

Several granian workers write through prometheus-client's multiprocess mode; the ops
listener aggregates them. PROMETHEUS_MULTIPROC_DIR must be set before this import.

The per-request metrics (requests, upstream errors, upstream latency, active streams) are
counted in plain dicts on the event loop and written to the multiprocess files at most
~every FLUSH_S seconds, from the loop, and by `flush()` at shutdown: each write costs a
lock, a getpid() and an mmap store, so one write per label set and flush replaces one
per request. After a flush the files hold the exact counts.
"""

from __future__ import annotations

import asyncio
import re
from bisect import bisect_left

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


# -- batched on the event loop ------------------------------------------------------------

FLUSH_S = 0.1
_BOUNDS = tuple(UPSTREAM_LATENCY._upper_bounds)  # the histogram's own (float, with +Inf last)
_requests: dict[tuple, int] = {}        # (provider, tenant, status) -> requests since the last flush
_latency: dict[str, list] = {}          # provider -> [sum, count per bucket...]
_streams: dict[str, int] = {}           # provider -> streams started minus ended
_scheduled = False


def request_done(provider: str, tenant: str, status: int) -> None:
    key = (provider, tenant, status)
    _requests[key] = _requests.get(key, 0) + 1
    if not _scheduled:
        _schedule()


def upstream_latency(provider: str, ms: float) -> None:
    acc = _latency.get(provider)
    if acc is None:
        acc = _latency[provider] = _counts(_BOUNDS)
    acc[0] += ms
    acc[1 + bisect_left(_BOUNDS, ms)] += 1  # the first bucket whose bound is >= ms, as observe() picks it
    if not _scheduled:
        _schedule()


class _Streams:
    """The active-streams gauge of one provider: inc() at the start, dec() at the end."""

    __slots__ = ("provider",)

    def __init__(self, provider: str) -> None:
        self.provider = provider

    def inc(self) -> None:
        self._add(1)

    def dec(self) -> None:
        self._add(-1)

    def _add(self, n: int) -> None:
        _streams[self.provider] = _streams.get(self.provider, 0) + n
        if not _scheduled:
            _schedule()


_stream_gauges: dict[str, _Streams] = {}


def streams(provider: str) -> _Streams:
    g = _stream_gauges.get(provider)
    if g is None:
        g = _stream_gauges[provider] = _Streams(provider)
    return g


def _schedule() -> None:
    # (A loop closed with a flush pending leaves _scheduled set: the worker's loop runs
    # until Relay.stop(), which flushes; elsewhere call flush() after the loop is done.)
    global _scheduled
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not on an event loop: write now
        flush()
        return
    _scheduled = True
    loop.call_later(FLUSH_S, flush)


def observe_counts(hist, acc: list) -> None:
    """What `hist.observe()` of many values would have written, from `acc` = [their sum,
    then their count per bucket]: one write for the sum and one per touched bucket instead
    of two per value (each is a lock, a getpid() and an mmap store in multiprocess mode)."""
    hist._sum.inc(acc[0])
    buckets = hist._buckets
    for i in range(len(buckets)):
        n = acc[1 + i]
        if n:
            buckets[i].inc(n)


def _counts(bounds: tuple) -> list:
    """An empty accumulator for observe_counts: [sum, count per bucket...]."""
    return [0.0] + [0] * len(bounds)


def _drain(counts: dict) -> list:
    items = list(counts.items())
    counts.clear()
    return items


def flush() -> None:
    """Write what was counted since the last flush to the multiprocess files."""
    global _scheduled
    _scheduled = False
    if _requests:
        for (provider, tenant, status), n in _drain(_requests):
            key = (provider, tenant, str(status))
            _child(REQUESTS, key).inc(n)
            if status >= 500 or status == 429:
                _child(UPSTREAM_ERRORS, key).inc(n)
    if _latency:
        for provider, acc in _drain(_latency):
            observe_counts(_child(UPSTREAM_LATENCY, (provider,)), acc)
    if _decisions:
        for key, n in _drain(_decisions):
            _child(TOOL_CALLS, key).inc(n)
        acc = _decision_latency[:]
        _decision_latency[:] = _counts(_DECISION_BOUNDS)
        observe_counts(DECISION_LATENCY, acc)
    if _streams:
        for provider, n in _drain(_streams):
            if n:
                _child(ACTIVE_STREAMS, (provider,)).inc(n)


TOOL_CALLS = Counter("sidegate_tool_calls", "Tool calls decided", ["provider", "tenant", "decision"])
DECISION_LATENCY = Histogram("sidegate_decision_latency_ms", "Time to decide one tool call, ms",
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000))
ESCALATIONS = Counter("sidegate_escalations", "Escalations by event", ["event"])
_DECISION_BOUNDS = tuple(DECISION_LATENCY._upper_bounds)
_decisions: dict[tuple, int] = {}       # (provider, tenant label, outcome) -> calls since the last flush
_decision_latency: list = _counts(_DECISION_BOUNDS)


def decision(provider: str, tenant: str, outcome: str, ms: float) -> None:
    """One decided tool call (called on the event loop: `Decider.decide`)."""
    key = (provider, tenant_label(tenant), outcome)
    _decisions[key] = _decisions.get(key, 0) + 1
    acc = _decision_latency
    acc[0] += ms
    acc[1 + bisect_left(_DECISION_BOUNDS, ms)] += 1
    if not _scheduled:
        _schedule()


def escalation(event: str) -> None:
    _child(ESCALATIONS, (event,)).inc()

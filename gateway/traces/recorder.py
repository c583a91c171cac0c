"""The recorder: the relay hands over one CallRecord per request; a background writer
thread does everything else.

Hot path (`submit`, on the relay's event loop): a length check, a deque append and, only
when the writer is idle-sleeping, one Event.set(). No parsing, no locks, no syscalls.

Writer thread (named `sidegate-traces`), every `flush_interval` (0.1 s) while
records flow, sleeping while idle: takes the queue as one batch; per record finds the
token usage (the provider's usage object only, by byte search + a small msgspec
Struct), reads the model from the body when the relay left it empty, builds one small
head (a list) and appends the request (or its delta) and response bytes to the batch's
body; then one batch row (msgpack + zstd, see store.py), the token/latency metrics
(aggregated per batch), the audit lines in one write, OTel spans when configured. It
offers the GIL every 8 records. Retention (age, size) runs at start, then every
`retention_every` seconds.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import msgspec

from . import metrics, store
from .extract import find_usage, model_in_body

log = logging.getLogger("sidegate.traces")

BODY_CAP = 256 * 1024  # bytes of a response kept per call (cut at a chunk boundary)
REQUEST_CAP = 1024 * 1024  # bytes of a request kept per call
BLOCKED = ("deny", "escalate")
_NO_USAGE = (None, None, None)
_encode = msgspec.msgpack.Encoder().encode


class CallRecord(msgspec.Struct, gc=False):
    """Built by the relay at the end of every proxied request. Fields are references to
    what the relay already has; nothing is parsed or copied for it. The relay passes the
    fields by position (relay._record): a new field goes last, with a default."""

    started: float  # time.time() at request start
    ttfb_ms: float | None  # to the first response byte sent to the client
    duration_ms: float
    provider: str  # openai, anthropic, nvidia-nim, bedrock, gemini, vertex-gemini
    dialect: str  # openai, anthropic, bedrock, gemini
    path: str  # upstream target path (no query string)
    model: str
    tenant: str
    actor: str
    session: str
    status: int
    traceparent: str
    request_body: bytes  # raw request JSON as forwarded
    response_content_type: str
    response_chunks: list  # raw response bytes as sent to the client (possibly rewritten by governance)
    tool_calls: list  # [{name, arguments (raw JSON text), call_id, decision, reason, rule, escalation_id}],
    #                   or the governor's ToolCall objects (verdicts read in the writer thread)
    error: str | None = None  # e.g. "upstream timeout" (never contains secrets)
    # True when the gateway created the traceparent (the agent sent none): the exported
    # span then takes that span id, so the upstream's parent is the gateway's span.
    traceparent_created: bool = False
    queued_bytes: int = 0  # set by Recorder.submit: what the record holds while queued


def _name_thread(name: bytes) -> None:
    """Name the OS thread (top -H, /proc/<pid>/task/<tid>/comm) so its CPU can be told apart."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass


def call_dict(c) -> dict:
    """A governance ToolCall (with its Verdict) as the record's dict. The relay may hand
    over the ToolCall objects themselves: they are read here, in the writer thread, after
    observe-mode decisions (made beside the stream) have landed."""
    if isinstance(c, dict):
        return c
    v = getattr(c, "verdict", None)
    return {"name": getattr(c, "name", ""), "arguments": getattr(c, "arguments", ""),
            "call_id": getattr(c, "call_id", None), "decision": getattr(v, "outcome", None),
            "reason": getattr(v, "reason", None), "rule": getattr(v, "rule", None),
            "escalation_id": getattr(v, "escalation_id", None)}


def session_of(rec: CallRecord) -> str:
    """The run a call belongs to: the agent's session id, else its W3C trace id (agents
    that propagate traceparent group their calls by it), else the call alone."""
    if rec.session:
        return rec.session
    parts = rec.traceparent.split("-")
    if len(parts) >= 3 and len(parts[1]) == 32:
        return "trace:" + parts[1]
    return "call:" + os.urandom(8).hex()


def env_settings(env=None) -> dict:
    """Recorder keyword arguments from SIDEGATE_* env vars (see gateway/traces/README.md)."""
    env = os.environ if env is None else env
    out: dict = {}
    if env.get("SIDEGATE_OTLP_ENDPOINT"):
        out["otlp_endpoint"] = env["SIDEGATE_OTLP_ENDPOINT"]
    audit = env.get("SIDEGATE_AUDIT")
    if audit:
        out["audit"] = None if audit.lower() in ("off", "false", "0", "no") else audit
    if env.get("SIDEGATE_TRACES_FLUSH_MS"):
        out["flush_interval"] = float(env["SIDEGATE_TRACES_FLUSH_MS"]) / 1000.0
    for name, key, kind in (("SIDEGATE_TRACES_RETENTION_DAYS", "retention_days", float),
                            ("SIDEGATE_TRACES_MAX_BYTES", "max_bytes", int),
                            ("SIDEGATE_TRACES_QUEUE", "max_queue", int),
                            ("SIDEGATE_TRACES_QUEUE_BYTES", "max_queue_bytes", int)):
        if env.get(name):
            out[key] = kind(env[name])
    flag = lambda v: v is not None and v.lower() in ("1", "true", "yes", "on")  # noqa: E731
    if flag(env.get("SIDEGATE_AUDIT_CONTENT")):
        out["audit_content"] = True
    if flag(env.get("SIDEGATE_OTLP_CAPTURE_CONTENT")):
        out["otlp_content"] = True
    return out


class _Block:
    """One batch row being built: heads (lists in store.Head order), body parts, the
    sessions and earlier batches it refers to, and delta bases within it."""

    __slots__ = ("heads", "parts", "size", "sessions", "bases", "pending")

    def __init__(self) -> None:
        self.heads: list[list] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.sessions: set[str] = set()
        self.bases: set[int] = set()
        self.pending: dict = {}  # delta key -> (index in this block, request bytes, chain length)


class Recorder:
    def __init__(self, traces_path: str, *, max_queue: int = 10000, max_queue_bytes: int = 32 * 1024 * 1024,
                 retention_days: float = 7,
                 max_bytes: int = 512 * 1024 * 1024, otlp_endpoint: str | None = None,
                 audit: str | None = None, audit_content: bool = False, otlp_content: bool = False,
                 flush_interval: float = 0.1, batch_max: int = 2000, body_cap: int = BODY_CAP,
                 request_cap: int = REQUEST_CAP, retention_every: float = 60.0, store_enabled: bool = True,
                 delta_sessions: int = 256, delta_bytes: int = 32 * 1024 * 1024,
                 delta_chain_max: int = 50, delta_min: int = store.DELTA_MIN) -> None:
        self.path = traces_path
        self.max_queue = max_queue
        # Queued records hold their request and response bytes: bound those too (a stalled
        # writer behind long streams would otherwise hold max_queue times their size).
        self.max_queue_bytes = max_queue_bytes
        self._bytes_in = 0  # bytes of records queued, ever (written by submit only)
        self._bytes_out = 0  # bytes of records taken by the writer, ever (written by the writer only)
        self.retention_s = retention_days * 86400.0
        self.max_bytes = max_bytes
        self.otlp_endpoint = otlp_endpoint
        self.otlp_content = otlp_content
        self.audit = None if audit in (None, "", "off") else audit
        self.audit_content = audit_content
        self.flush_interval = flush_interval
        self.batch_max = batch_max
        self.body_cap = body_cap
        self.request_cap = request_cap
        self.delta_sessions = delta_sessions  # sessions (or agents) whose last request is kept for deltas
        self.delta_bytes = delta_bytes
        self.delta_chain_max = delta_chain_max
        self.delta_min = delta_min  # smaller requests are stored whole
        self._last: collections.OrderedDict = collections.OrderedDict()
        self.retention_every = retention_every
        # `off` turns the store off, not the writer: token usage, TTFB and duration are
        # metrics (SPEC 4), read from the same records whether or not they are stored.
        self.store_enabled = store_enabled and bool(traces_path) and traces_path != "off"
        # counters (read by tests and the benchmark)
        self.submitted = 0
        self.dropped_full = 0
        self.written = 0
        self.failed = 0
        self._processed = 0
        self._q: collections.deque = collections.deque()
        self._sleeping = False
        self._urgent = False
        self._closing = False
        self._wake = threading.Event()
        self._full = threading.Event()  # a quarter of max_queue_bytes is queued: take a batch now
        self._hurry = False
        self._done = threading.Condition()
        self._con = None
        self._otel = None
        self._audit_fd: int | None = None
        self._thread = threading.Thread(target=self._run, name="sidegate-traces", daemon=True)
        self._thread.start()

    # -- relay side (event loop) ---------------------------------------------------------------

    def submit(self, rec: CallRecord) -> None:
        """Queue one record. Never blocks; when the queue is full (max_queue records or
        max_queue_bytes of bodies) the record is dropped and counted
        (sidegate_trace_records_dropped_total{reason="queue_full"})."""
        q = self._q
        chunks = rec.response_chunks
        size = len(rec.request_body) + (len(chunks[0]) if len(chunks) == 1 else sum(map(len, chunks)))
        if (len(q) >= self.max_queue or self._bytes_in - self._bytes_out + size > self.max_queue_bytes
                or self._closing):
            self.dropped_full += 1
            metrics.dropped("queue_full")
            return
        rec.queued_bytes = size
        self._bytes_in += size
        q.append(rec)
        self.submitted += 1
        if self._sleeping:
            self._sleeping = False
            self._wake.set()
        elif not self._hurry and self._bytes_in - self._bytes_out > self.max_queue_bytes >> 2:
            # bodies pile up faster than one batch per flush interval takes them: now
            self._hurry = True
            self._full.set()

    # -- control ---------------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record submitted so far is processed (tests, benchmarks)."""
        target = self.submitted
        deadline = time.monotonic() + timeout
        self._urgent = True
        self._wake.set()
        self._full.set()
        with self._done:
            while self._processed < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self._done.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued and stop the writer (worker shutdown)."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        self._full.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("trace writer did not finish in %.1fs: %d record(s) not written", timeout, len(self._q))

    # -- writer thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        # No lower priority: at nice +10 a worker whose core is saturated starved the writer,
        # so the queue filled (hundreds of MiB of bodies) and records were dropped. The
        # writer yields the GIL every 8 records instead, which keeps request latency flat.
        _name_thread(b"sidegate-traces")
        if self.store_enabled:
            try:
                self._con = store.open_writer(self.path)
            except Exception as e:
                log.error("trace store %s unavailable (%s: %s): calls are counted but not stored",
                          self.path, type(e).__name__, e)
        if self.audit:
            self._open_audit()
        if self.otlp_endpoint:
            try:
                from .otel import OtelExporter

                self._otel = OtelExporter(self.otlp_endpoint, capture_content=self.otlp_content)
            except Exception as e:
                log.error("OTLP export to %s disabled: %s: %s", self.otlp_endpoint, type(e).__name__, e)
        next_retention = time.monotonic()
        q = self._q
        while True:
            if not q:
                if self._closing:
                    break
                self._sleeping = True
                if not q and not self._closing:  # re-check after raising the flag (see submit)
                    self._wake.wait(max(0.0, next_retention - time.monotonic()) if self._con else None)
                self._sleeping = False
                self._wake.clear()
            if q and not self._closing and not self._urgent and len(q) < self.batch_max:
                self._full.wait(self.flush_interval)  # let a batch gather (submit ends it early when bytes pile up)
            self._full.clear()
            self._hurry = False
            self._urgent = False
            while q:
                n = min(len(q), self.batch_max)
                batch = [q.popleft() for _ in range(n)]
                self._bytes_out += sum(r.queued_bytes for r in batch)
                self._process(batch)
            if self._con is not None and time.monotonic() >= next_retention:
                self._retention()
                next_retention = time.monotonic() + self.retention_every
        self._shutdown()

    def _process(self, batch: list[CallRecord]) -> None:
        tokens, timing, audit = {}, {}, []
        rcap = self.body_cap
        store_on = self._con is not None
        blk = _Block()
        for n, rec in enumerate(batch, 1):
            if not n & 7:
                # Offer the GIL every 8 records (~50 us of work): a request that arrives
                # meanwhile waits for that, not for the switch interval (5 ms). sched_yield
                # releases the GIL for ~1 us; time.sleep(0) costs ~25 us of CPU (timer set-up).
                os.sched_yield()
            try:
                chunks = rec.response_chunks
                total = rec.queued_bytes - len(rec.request_body)  # the response's size, counted by submit
                if total <= rcap:
                    resp = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                else:
                    keep, size = [], 0
                    for c in chunks:
                        if size + len(c) > rcap:
                            break
                        keep.append(c)
                        size += len(c)
                    resp = b"".join(keep) if keep else chunks[0][:rcap]
                path = rec.path
                if "?" in path:
                    path = path.partition("?")[0]
                try:
                    u = find_usage(rec.dialect, path, rec.response_content_type,
                                   resp if total <= rcap and rec.dialect != "bedrock" else chunks)
                except Exception:
                    u = None
                provider = rec.provider
                if not rec.model:  # in the body for OpenAI and Anthropic: read here, not on the hot path
                    rec.model = model_in_body(rec.request_body)
                if u is not None:
                    key = (provider, rec.tenant, rec.model)
                    acc = tokens.get(key)
                    tokens[key] = u if acc is None else (acc[0] + u[0], acc[1] + u[1], acc[2] + u[2])
                t = timing.get(provider)
                if t is None:
                    t = timing[provider] = ([], [])
                if rec.ttfb_ms is not None:
                    t[0].append(rec.ttfb_ms)
                t[1].append(rec.duration_ms)
                calls = rec.tool_calls
                blocked = 0
                if calls:
                    if not isinstance(calls[0], dict):
                        calls = rec.tool_calls = [call_dict(c) for c in calls]
                    for c in calls:
                        if c.get("decision") in BLOCKED:
                            blocked += 1
                if store_on:
                    if blk.size > store.BODY_BLOCK or len(blk.heads) >= store.MAX_CALLS:
                        self._store(blk)
                        blk = _Block()
                    self._add(blk, rec, path, u, calls, blocked, resp, total)
                if self._audit_fd is not None and calls:
                    audit.extend(self._audit_lines(rec, session_of(rec), path))
                if self._otel is not None:
                    try:
                        self._otel.export(rec, u, session_of(rec), resp)
                    except Exception as e:
                        log.warning("OTel span not exported: %s", type(e).__name__)
            except Exception as e:  # a malformed record must not stop the writer
                self.failed += 1
                metrics.dropped("record_error")
                log.warning("trace record skipped: %s", type(e).__name__)
        for (provider, tenant, model), (i, o, c) in tokens.items():
            metrics.tokens(provider, tenant, model, i, o, c)
        for provider, (ttfb, dur) in timing.items():
            if ttfb:
                metrics.observe_many(metrics.TTFB, provider, ttfb)
            metrics.observe_many(metrics.DURATION, provider, dur)
        if blk.heads:
            self._store(blk)
        if audit:
            self._write_audit(b"".join(audit))
        with self._done:
            self._processed += len(batch)
            self._done.notify_all()

    def _add(self, blk: "_Block", rec, path, u, calls, blocked, resp, total) -> None:
        """The call's head; its request (whole, or a delta's middle) and response go to the
        block's body."""
        req = rec.request_body
        qsize = len(req)
        trunc = 0 if total <= self.body_cap else store.TRUNC_RESPONSE
        base = None
        prefix = suffix = 0
        mid = req
        if qsize > self.request_cap:
            mid = req = req[:self.request_cap]
            trunc |= store.TRUNC_REQUEST
        elif qsize >= self.delta_min:
            # An agent's next call resends the conversation: its session's last request is
            # the delta base (sessionless calls: the same agent/endpoint).
            dkey = rec.session or (rec.tenant, rec.actor, rec.provider, rec.model, path)
            prev = blk.pending.get(dkey)
            in_block = prev is not None
            if not in_block:
                prev = self._last.get(dkey)
            chain = 0
            if prev is not None and prev[2] < self.delta_chain_max:
                p, s = store.split_delta(prev[1], req)
                if p + s >= (qsize >> 1) and p + s >= 256:  # worth it: most of the request is known
                    prefix, suffix, chain = p, s, prev[2]
                    mid = req[p:qsize - s]
                    if in_block:
                        base = -(prev[0] + 1)
                    else:
                        base = prev[0]
                        blk.bases.add(base >> store.ID_SHIFT)
            blk.pending[dkey] = (len(blk.heads), req, chain + 1)
        if rec.session:
            blk.sessions.add(rec.session)
        off = blk.size
        blk.parts.append(mid)
        blk.parts.append(resp)
        blk.size = off + len(mid) + len(resp)
        if u is None:
            u = _NO_USAGE
        blk.heads.append([rec.started, rec.session or "", rec.tenant or "", rec.actor or "", rec.provider,
                          rec.model or "", rec.status, u[0], u[1], u[2], len(calls), blocked, rec.error,
                          rec.traceparent or "", base, rec.dialect, path, rec.ttfb_ms, rec.duration_ms, calls,
                          qsize, total, rec.response_content_type or "", trunc, prefix, suffix, off, len(mid),
                          len(resp)])

    def _store(self, blk: "_Block") -> None:
        last = self._last
        try:
            bid = store.insert_batch(self._con, blk.heads, blk.parts, blk.size, blk.sessions, blk.bases)
        except Exception as e:
            self.failed += len(blk.heads)
            metrics.dropped("store_error", len(blk.heads))
            for dkey in blk.pending:  # no later call may build on these
                last.pop(dkey, None)
            log.warning("%d trace record(s) not stored: %s: %s", len(blk.heads), type(e).__name__, e)
            return
        self.written += len(blk.heads)
        for dkey, (index, req, chain) in blk.pending.items():
            last[dkey] = ((bid << store.ID_SHIFT) | index, req, chain)
            last.move_to_end(dkey)
        if blk.pending:
            self._trim_last()

    def _trim_last(self) -> None:
        last = self._last
        size = sum(len(v[1]) for v in last.values())
        while last and (len(last) > self.delta_sessions or size > self.delta_bytes):
            size -= len(last.popitem(last=False)[1][1])

    def _retention(self) -> None:
        try:
            n = store.enforce_retention(self._con, self.retention_s, self.max_bytes)
            if n:
                log.info("trace retention: %d call(s) removed", n)
                self._last.clear()  # a base may be gone: the next request of each run is stored whole
        except Exception as e:
            log.warning("trace retention failed: %s: %s", type(e).__name__, e)

    # -- audit log ---------------------------------------------------------------------------------

    def _open_audit(self) -> None:
        if self.audit == "stdout":
            self._audit_fd = 1
            return
        try:
            d = os.path.dirname(os.path.abspath(self.audit))
            os.makedirs(d, mode=0o700, exist_ok=True)
            self._audit_fd = os.open(self.audit, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            log.error("audit log %s unavailable: %s", self.audit, e.strerror)

    def _audit_lines(self, rec: CallRecord, session: str, path: str) -> list[bytes]:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.started)) + f".{int(rec.started % 1 * 1000):03d}Z"
        out = []
        for c in rec.tool_calls:
            line = {"ts": ts, "event": "tool_call_decision", "decision": c.get("decision"),
                    "tool": c.get("name"), "reason": c.get("reason"), "rule": c.get("rule"),
                    "escalation_id": c.get("escalation_id"), "call_id": c.get("call_id"),
                    "tenant": rec.tenant, "actor": rec.actor, "session": session, "provider": rec.provider,
                    "model": rec.model, "path": path, "status": rec.status, "traceparent": rec.traceparent}
            if self.audit_content:
                line["arguments"] = c.get("arguments")
            out.append(msgspec.json.encode(line) + b"\n")
        return out

    def _write_audit(self, data: bytes) -> None:
        fd = self._audit_fd
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as e:
            log.warning("audit log write failed: %s", e.strerror)

    def _shutdown(self) -> None:
        if self._otel is not None:
            try:
                self._otel.shutdown()
            except Exception as e:
                log.warning("OTel shutdown: %s", type(e).__name__)
        if self._audit_fd not in (None, 1):
            try:
                os.close(self._audit_fd)
            except OSError:
                pass
        if self._con is not None:
            try:
                self._con.close()
            except Exception:
                pass
        with self._done:
            self._done.notify_all()

"""The recorder: the relay hands over one CallRecord per request.

On the relay's event loop (`submit`), while the call's bytes are still in cache: the
token usage (the provider's usage object only: a byte search from the end and a small
msgspec Struct), the model from the body when the relay left it empty, the request delta
(for requests of 4 KB or more), and the request and response fed into the current
block's zstd stream (a zstd block ends every ~32 KB, so a call costs the loop about its own
bytes' compression, never a 128 KB block's at once); then the bytes are let go. Measured against a writer thread
that held ~100 ms of responses and did this work itself, this costs the loop less in all
(bench/results-traces.md): held responses made every new one land in cold memory.

Writer thread (named `sidegate-traces`), every `flush_interval` (0.1 s) while calls
flow, at once when a block is full, sleeping while idle: takes the blocks; per call
reads the tool calls with their verdicts (observe-mode decisions may land after the
response ended) into the head; then one batch row per block (msgpack heads + the zstd
body, see store.py), the token/latency metrics (aggregated per block), the audit lines in
one write, OTel spans when configured. Retention (age, size) runs at start, then every
`retention_every` seconds.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import msgspec
import zstandard

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
    fields by position (relay._record): a new field goes last, with a default. `submit`
    takes the record: it empties `request_body` and `response_chunks` once they are read
    (kept only for OTel content capture)."""

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
    queued_bytes: int = 0  # set by Recorder.submit: the bytes the call holds until the writer takes it


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
    """One batch row being built on the event loop, then finished by the writer: the calls'
    records and heads (lists in store.Head order; the tool-call fields are filled in by the
    writer, once observe-mode verdicts have landed), their bodies as one zstd stream, the
    sessions in it and the earlier batches its deltas build on."""

    __slots__ = ("recs", "heads", "z", "out", "size", "flushed", "held", "sessions", "bases", "bid")

    def __init__(self, z) -> None:
        self.recs: list[CallRecord] = []
        self.heads: list[list] = []
        self.z = z  # zstd compression stream of the bodies; None when nothing is stored
        self.out: list[bytes] = []  # its output so far
        self.size = 0  # body bytes fed to it
        self.flushed = 0  # body bytes up to the last zstd block end
        self.held = 0  # bytes the block holds: compressed output, plus bodies kept for OTel content
        self.sessions: set[str] = set()
        self.bases: set[int] = set()
        self.bid: int | None = None  # the batch id, once stored


# positions in a head (a list in store.Head order)
_H = {name: i for i, name in enumerate(store.Head.__struct_fields__)}
_IN, _OUT, _CACHED, _BASE, _PATH, _TRUNC = (_H[k] for k in ("input_tokens", "output_tokens", "cached_tokens",
                                                         "req_base", "path", "truncated"))
_PREFIX, _SUFFIX, _REQ_OFF, _REQ_LEN, _RESP_LEN = (_H[k] for k in ("req_prefix", "req_suffix", "req_off", "req_len",
                                                                   "resp_len"))
_N_CALLS, _N_BLOCKED, _CALLS = _H["n_tool_calls"], _H["n_blocked"], _H["tool_calls"]  # filled by the writer
_FLUSH_BLOCK = zstandard.COMPRESSOBJ_FLUSH_BLOCK
FLUSH_EVERY = 32 * 1024


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
        # What waiting calls hold (their compressed bodies; whole bodies only for OTel content
        # capture) is bounded too: a stalled writer must not grow the worker without limit.
        self.max_queue_bytes = max_queue_bytes
        self._bytes_in = 0  # bytes held by calls handed over, ever (written by submit only)
        self._bytes_out = 0  # bytes of those the writer has taken, ever (written by the writer only)
        self._n_in = 0  # calls handed over, ever (submit)
        self._n_out = 0  # calls the writer has taken, ever (writer)
        self.retention_s = retention_days * 86400.0
        self.max_bytes = max_bytes
        self.otlp_endpoint = otlp_endpoint
        self.otlp_content = otlp_content
        self.audit = None if audit in (None, "", "off") else audit
        self.audit_content = audit_content
        self.flush_interval = flush_interval
        self.block_max = min(batch_max, store.MAX_CALLS)  # calls per batch row
        self.body_cap = body_cap
        self.request_cap = request_cap
        self.delta_sessions = delta_sessions  # sessions (or agents) whose last request is kept for deltas
        self.delta_bytes = delta_bytes
        self.delta_chain_max = delta_chain_max
        self.delta_min = delta_min  # smaller requests are stored whole
        # delta key -> (block, index in it, request bytes, chain length); loop side, under _lock
        self._last: collections.OrderedDict = collections.OrderedDict()
        self._last_bytes = 0
        self._retaining = False  # retention is deleting batches: no new delta may build on a stored one
        self.retention_every = retention_every
        # `off` turns the store off, not the writer: token usage, TTFB and duration are
        # metrics (SPEC 4), read from the same records whether or not they are stored.
        self.store_enabled = store_enabled and bool(traces_path) and traces_path != "off"
        self._storing = self.store_enabled  # False once the store failed to open: bodies are not compressed
        self._keep_bodies = bool(otlp_endpoint) and otlp_content  # spans with content read the bodies
        # counters (read by tests and the benchmark)
        self.submitted = 0
        self.dropped_full = 0
        self.written = 0
        self.failed = 0
        self._processed = 0
        # Blocks are built by submit on the event loop and taken by the writer, both under
        # _lock: the loop's zstd context is shared by the blocks in turn, and a block's stream
        # is finished (one small flush) before the next one starts.
        self._lock = threading.Lock()
        self._cur: _Block | None = None
        self._sealed: collections.deque = collections.deque()  # full blocks waiting for the writer
        self._sleeping = False
        self._urgent = False
        self._closing = False
        self._wake = threading.Event()
        self._full = threading.Event()  # a block is full, or a quarter of max_queue_bytes waits: take them now
        self._hurry = False
        self._done = threading.Condition()
        self._con = None
        self._otel = None
        self._audit_fd: int | None = None
        self._thread = threading.Thread(target=self._run, name="sidegate-traces", daemon=True)
        self._thread.start()

    # -- relay side (event loop) ---------------------------------------------------------------

    def submit(self, rec: CallRecord) -> None:
        """Take one call. Never blocks and never raises. What needs the bytes happens here,
        while they are still in cache: the usage object (a byte search from the end), the
        model when the relay left it empty, the request delta, and the bodies fed into the
        block's zstd stream; then the bytes are let go. Holding ~100 ms of responses for a
        writer cost the loop more (every new response landed in cold memory) than compressing
        them here. When the calls waiting hold max_queue records or max_queue_bytes, the call
        is dropped and counted (sidegate_trace_records_dropped_total{reason="queue_full"})."""
        if (self._n_in - self._n_out >= self.max_queue or self._bytes_in - self._bytes_out >= self.max_queue_bytes
                or self._closing):
            self.dropped_full += 1
            metrics.dropped("queue_full")
            return
        try:
            held = self._take_in(rec)
        except Exception as e:  # a malformed record must not reach the relay
            self.failed += 1
            metrics.dropped("record_error")
            log.warning("trace record skipped: %s", type(e).__name__)
            return
        rec.queued_bytes = held
        self._bytes_in += held
        self._n_in += 1
        self.submitted += 1
        if self._sleeping:
            self._sleeping = False
            self._wake.set()
        elif not self._hurry and (self._sealed or self._bytes_in - self._bytes_out > self.max_queue_bytes >> 2):
            self._hurry = True
            self._full.set()

    def _take_in(self, rec: CallRecord) -> int:
        chunks = rec.response_chunks
        rcap = self.body_cap
        total = len(chunks[0]) if len(chunks) == 1 else sum(map(len, chunks))
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
        if not rec.model:  # in the body for OpenAI and Anthropic
            rec.model = model_in_body(rec.request_body)
        if u is None:
            u = _NO_USAGE
        req = rec.request_body
        head = [rec.started, rec.session or "", rec.tenant or "", rec.actor or "", rec.provider,  # store.Head order
                rec.model or "", rec.status, u[0], u[1], u[2], 0, 0, rec.error, rec.traceparent or "", None,
                rec.dialect, path, rec.ttfb_ms, rec.duration_ms, None, len(req), total,
                rec.response_content_type or "", 0 if total <= rcap else store.TRUNC_RESPONSE, 0, 0, 0, 0, 0]
        held = 0
        if self._keep_bodies:
            rec.response_chunks = [resp]
            held = len(req) + len(resp)
        else:
            rec.response_chunks = []
            rec.request_body = b""
        with self._lock:
            blk = self._cur
            if blk is None:
                blk = self._cur = _Block(store.compressor().compressobj() if self._storing else None)
            if blk.z is not None:
                held += self._add_body(blk, rec, head, path, req, resp)
            blk.recs.append(rec)
            blk.heads.append(head)
            blk.held += held
            if len(blk.heads) >= self.block_max or blk.size > store.BODY_BLOCK:
                self._seal(blk)
                self._sealed.append(blk)
                self._cur = None
        return held

    def _add_body(self, blk: _Block, rec: CallRecord, head: list, path: str, req: bytes, resp: bytes) -> int:
        """The call's request (whole, or a delta's middle) and response into the block's
        zstd stream (under _lock); returns the bytes this adds to the block's memory."""
        qsize = len(req)
        mid = req
        if qsize > self.request_cap:
            mid = req = req[:self.request_cap]
            head[_TRUNC] |= store.TRUNC_REQUEST
        elif qsize >= self.delta_min:
            # An agent's next call resends the conversation: its session's last request is
            # the delta base (sessionless calls: the same agent/endpoint). The base is in this
            # block, or in a stored one (not while retention may be deleting it).
            dkey = rec.session or (rec.tenant, rec.actor, rec.provider, rec.model, path)
            last = self._last
            prev = last.get(dkey)
            chain = 0
            if prev is not None and prev[3] < self.delta_chain_max:
                pblk = prev[0]
                if pblk is blk or (pblk.bid is not None and not self._retaining):
                    p, s = store.split_delta(prev[2], req)
                    if p + s >= (qsize >> 1) and p + s >= 256:  # worth it: most of the request is known
                        chain = prev[3]
                        head[_PREFIX], head[_SUFFIX] = p, s
                        mid = req[p:qsize - s]
                        if pblk is blk:
                            head[_BASE] = -(prev[1] + 1)
                        else:
                            head[_BASE] = (pblk.bid << store.ID_SHIFT) | prev[1]
                            blk.bases.add(pblk.bid)
            if prev is not None:
                self._last_bytes -= len(prev[2])
            last[dkey] = (blk, len(blk.heads), req, chain + 1)
            last.move_to_end(dkey)
            self._last_bytes += qsize
            while len(last) > self.delta_sessions or self._last_bytes > self.delta_bytes:
                self._last_bytes -= len(last.popitem(last=False)[1][2])
        if rec.session:
            blk.sessions.add(rec.session)
        head[_REQ_OFF] = blk.size
        head[_REQ_LEN] = len(mid)
        head[_RESP_LEN] = len(resp)
        pending = blk.size - blk.flushed  # fed, still in zstd's buffer
        blk.size += len(mid) + len(resp)
        z, out = blk.z, blk.out
        n = len(out)
        if mid:
            out.append(z.compress(mid))
        if resp:
            out.append(z.compress(resp))
        # zstd compresses when its 128 KB block fills: end a block every ~32 KB instead, so
        # that no call costs the loop much more than its own bytes (a block end costs ~1.5 us:
        # not after every small call)
        if blk.size - blk.flushed >= FLUSH_EVERY:
            out.append(z.flush(_FLUSH_BLOCK))
            blk.flushed = blk.size
        # what the call adds to the block's memory: output, and input zstd still buffers
        return sum(map(len, out[n:])) + (blk.size - blk.flushed) - pending

    @staticmethod
    def _seal(blk: _Block) -> None:
        """End the block's zstd frame (under _lock): small, the calls' blocks are done."""
        if blk.z is not None:
            blk.out.append(blk.z.flush())
            blk.z = None

    def _take(self) -> list[_Block]:
        """The writer takes the full blocks and the one being built."""
        with self._lock:
            blocks = list(self._sealed)
            self._sealed.clear()
            blk = self._cur
            if blk is not None and blk.heads:
                self._seal(blk)
                blocks.append(blk)
                self._cur = None
        return blocks

    def _pending(self) -> bool:
        cur = self._cur  # (one read: submit may swap it meanwhile)
        return bool(self._sealed) or (cur is not None and bool(cur.heads))

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
            log.warning("trace writer did not finish in %.1fs: %d record(s) not written", timeout,
                        self._n_in - self._n_out)

    # -- writer thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        # No lower priority: at nice +10 a worker whose core is saturated starved the writer,
        # so the queue filled and records were dropped.
        _name_thread(b"sidegate-traces")
        if self.store_enabled:
            try:
                self._con = store.open_writer(self.path)
            except Exception as e:
                self._storing = False
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
        while True:
            if not self._pending():
                if self._closing:
                    break
                self._sleeping = True
                if not self._pending() and not self._closing:  # re-check after raising the flag (see submit)
                    self._wake.wait(max(0.0, next_retention - time.monotonic()) if self._con else None)
                self._sleeping = False
                self._wake.clear()
            if self._pending() and not self._closing and not self._urgent and not self._sealed:
                self._full.wait(self.flush_interval)  # let a block gather (submit ends it early)
            self._full.clear()
            self._hurry = False
            self._urgent = False
            self._drain()
            if self._con is not None and time.monotonic() >= next_retention:
                self._retention()
                next_retention = time.monotonic() + self.retention_every
        self._drain()  # (submits that raced the close)
        self._shutdown()

    def _drain(self) -> None:
        for blk in self._take():
            self._n_out += len(blk.heads)
            self._bytes_out += blk.held
            self._process(blk)

    def _process(self, blk: _Block) -> None:
        tokens, timing, audit = {}, {}, []
        heads = blk.heads
        for n, (rec, head) in enumerate(zip(blk.recs, heads), 1):
            if not n & 63:
                os.sched_yield()  # offer the GIL now and then (~1 us; time.sleep(0) costs ~25 us)
            try:
                provider = rec.provider
                u = None if head[_IN] is None else (head[_IN], head[_OUT], head[_CACHED])
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
                head[_N_CALLS] = len(calls)
                head[_N_BLOCKED] = blocked
                head[_CALLS] = calls
                if self._audit_fd is not None and calls:
                    audit.extend(self._audit_lines(rec, session_of(rec), head[_PATH]))
                if self._otel is not None:
                    try:
                        resp = rec.response_chunks[0] if rec.response_chunks else b""
                        self._otel.export(rec, u, session_of(rec), resp)
                    except Exception as e:
                        log.warning("OTel span not exported: %s", type(e).__name__)
            except Exception as e:  # a malformed record must not stop the writer
                self.failed += 1
                metrics.dropped("record_error")
                log.warning("trace record skipped: %s", type(e).__name__)
                head[_CALLS] = head[_CALLS] or []
        for (provider, tenant, model), (i, o, c) in tokens.items():
            metrics.tokens(provider, tenant, model, i, o, c)
        for provider, (ttfb, dur) in timing.items():
            if ttfb:
                metrics.observe_many(metrics.TTFB, provider, ttfb)
            metrics.observe_many(metrics.DURATION, provider, dur)
        if self._con is not None and blk.out:
            self._store(blk)
        if audit:
            self._write_audit(b"".join(audit))
        with self._done:
            self._processed += len(heads)
            self._done.notify_all()

    def _store(self, blk: _Block) -> None:
        n = len(blk.heads)
        try:
            blk.bid = store.insert_batch(self._con, blk.heads, b"z" + b"".join(blk.out), blk.sessions, blk.bases)
        except Exception as e:
            self.failed += n  # (no later call builds on this block: its bid stays None)
            metrics.dropped("store_error", n)
            log.warning("%d trace record(s) not stored: %s: %s", n, type(e).__name__, e)
            return
        self.written += n

    def _retention(self) -> None:
        with self._lock:  # the bases of calls not stored yet stay; no new call builds on a stored one meanwhile
            self._retaining = True
            keep = set()
            for blk in (*self._sealed, self._cur):
                if blk is not None:
                    keep |= blk.bases
        n = 0
        try:
            t0 = time.monotonic()
            n = store.enforce_retention(self._con, self.retention_s, self.max_bytes, keep=keep)
            if n:  # (the time: calls wait in the queue meanwhile)
                log.info("trace retention: %d call(s) removed in %.2f s", n, time.monotonic() - t0)
        except Exception as e:
            log.warning("trace retention failed: %s: %s", type(e).__name__, e)
        finally:
            with self._lock:
                if n:  # a base may be gone: the next request of each run is stored whole
                    self._last.clear()
                    self._last_bytes = 0
                self._retaining = False

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

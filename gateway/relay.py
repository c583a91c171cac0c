"""The proxy pipeline: route -> request filter -> upstream -> response governor -> client.

Served as ASGI by granian: its ASGI `send` waits when the client stops reading, which
bounds memory with a stalled reader (its RSGI `send_bytes` buffers without limit; see
bench/RESULTS.md). The hot path moves bytes: headers stay bytes, and untouched chunks go
to the client as the same bytes objects the upstream pool produced.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import random
import time
from urllib.parse import quote

import msgspec

from . import metrics, routes
from .bedrock_sign import CLIENT_SIGNING_HEADERS, Signer
from .bytesearch import has
from .config import Config
from .decision import CallContext, Decider
from .dialects import BY_NAME as DIALECTS
from .escalations import EscalationStore
from .governance import registry
from .governance.base import Verdict
from .metadata import HEADER_FIELDS, KEY_HEADERS, SUFFIX, Meta, MetadataError, split_key, strip_query_key
from .policy import PolicyStore
from .traces import CallRecord, Recorder, env_settings
from .upstream import Pool, UpstreamError, UpstreamTimeout

log = logging.getLogger("sidegate.relay")

# Never forwarded (RFC 9110 7.6.1), plus what the relay recomputes.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                        b"host", b"content-length", b"accept-encoding"})
RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-connection",
                           b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length",
                           b"traceparent"})
KEY_HEADERS_B = frozenset(h.encode() for h in KEY_HEADERS)
SUFFIX_B = SUFFIX.encode()
SIGNING_B = frozenset(h.encode() for h in CLIENT_SIGNING_HEADERS)
HEADER_FIELDS_B = {k.encode(): v for k, v in HEADER_FIELDS.items()}
STREAM_TYPES = (b"text/event-stream", b"application/vnd.amazon.eventstream")
PATH_SAFE = "/:@!$&'()*+,;=-._~"
IDENTITY = (b"accept-encoding", b"identity")
JSON_CT = [(b"content-type", b"application/json")]
# Non-stream bodies are read whole (the governance step needs them whole); past this
# size the upstream answer is refused with 502 rather than held in memory.
BUFFER_LIMIT = 64 * 1024 * 1024

_randbits = random.getrandbits

START = "http.response.start"
BODY = "http.response.body"


def _new_traceparent() -> bytes:
    # Random ids as OpenTelemetry's SDK makes them (random.getrandbits: no system call per
    # request; the generator is reseeded in every forked worker).
    r = _randbits(192)
    trace_id, span_id = r >> 64, r & 0xFFFFFFFFFFFFFFFF
    if not trace_id or not span_id:  # all zeros is invalid (W3C trace context)
        return _new_traceparent()
    return b"00-%032x-%016x-01" % (trace_id, span_id)


class ClientGone(Exception):
    """The client disconnected while the request body was being read."""


class Relay:
    """Per-worker state: the route table, the upstream pool, policy, decisions."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.table = routes.build(cfg)
        self.prefixes = {seg: self.table[p] for seg, p in routes.PREFIXES.items()}
        self.max_body = cfg.max_request_bytes
        self.token = cfg.proxy_token.encode() if cfg.proxy_token else None
        t = cfg.timeouts
        self.pool = Pool(max_per_host=cfg.upstream_connections, connect_timeout=t.connect, read_timeout=t.read)
        self.total_timeout = t.total
        self.signers: dict[str | None, Signer] = {}
        self.policies = PolicyStore(cfg.policy)
        self.decider = Decider(EscalationStore(cfg.escalations))
        self.recorder = Recorder(cfg.traces.path, **env_settings())
        self._background: set[asyncio.Task] = set()
        self._served = 0  # requests seen (housekeeping tells a quiet worker by it)
        self._ended = 0  # requests answered (none in flight when it equals _served)
        self._inflight: set[_Watch] = set()  # requests whose disconnect watcher has not started
        self._sweeps = 0
        self._sweeping = False
        self._not_found = msgspec.json.encode({
            "error": {"type": "not_found", "message": "sidegate: no route for this path",
                      "valid_prefixes": routes.prefixes()}})

    def start(self) -> None:
        """Background work of the worker; needs the running loop."""
        self._loop = asyncio.get_running_loop()
        _malloc_keep()
        _gc_for_latency()
        self._watcher = asyncio.ensure_future(self.policies.watch())
        self._keeper = asyncio.ensure_future(self._housekeeping())

    async def stop(self) -> None:
        self._watcher.cancel()
        self._keeper.cancel()
        await self.pool.aclose()
        await asyncio.to_thread(self.recorder.close)
        await self.decider.aclose()
        metrics.flush()

    async def _housekeeping(self) -> None:
        """Collect cyclic garbage fully and give freed heap memory back to the OS once the
        worker goes quiet: bursts of requests (bodies, response chunks, trace records) leave
        glibc's arenas grown and their free pages resident. Trimmed ~0.5 s and again ~4 s
        after the last request (the trace writer may still be draining), never under load;
        collected once no request is in flight either."""
        trim = _malloc_trim()
        last, quiet, collected = -1, 0, True
        while True:
            await asyncio.sleep(0.5)
            n = self._served
            if n != last:
                last, quiet, collected = n, 0, False
                continue
            quiet += 1
            if not collected and self._ended == n:  # no stream in flight to pause
                gc.collect()  # (full collections wait for a moment like this: _gc_for_latency)
                collected = True
            if (quiet == 1 or quiet == 8) and trim is not None:
                trim(0)

    # -- request side -------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"]
        end = path.find("/", 4)
        route = self.prefixes.get(path[4:end] if end > 0 else path[4:]) if path.startswith("/v1/") else None
        if route is None:
            await send({"type": START, "status": 404, "headers": JSON_CT})
            await send({"type": BODY, "body": self._not_found})
            return
        self._served += 1
        trace = Trace(Meta())
        started, t0 = time.time(), time.perf_counter()
        try:
            await self._handle(scope, receive, send, route, path, end, trace)
        finally:
            self._ended += 1
            self._record(route, trace, started, t0)

    def _record(self, route, trace: Trace, started: float, t0: float) -> None:
        meta = trace.meta
        path = trace.target.partition("?")[0]
        # Positional, in CallRecord's field order: msgspec builds a 19-field Struct from
        # keywords ~6x slower (560 ns against 90), on every request.
        self.recorder.submit(CallRecord(
            started, (trace.ttfb - t0) * 1000.0 if trace.ttfb else None, (time.perf_counter() - t0) * 1000.0,
            route.provider, route.dialect, path, _model_in_path(route.dialect, path), meta.tenant or "",
            meta.actor or "", meta.session or "", trace.status, trace.traceparent.decode("latin-1"), trace.body,
            trace.ctype, trace.chunks, list(trace.calls), trace.error, trace.tp_created))

    async def _handle(self, scope, receive, send, route, path, end, trace: Trace) -> None:
        dialect = DIALECTS[route.dialect]
        meta = trace.meta
        fwd: list[tuple[bytes, bytes]] = []
        traceparent = clen = None
        sigv4 = False
        bedrock = route.provider == "bedrock"
        try:
            for name, value in scope["headers"]:
                if name in HOP_BY_HOP:
                    if name == b"content-length":
                        clen = value
                    continue
                if name.startswith(b"x-sidegate-"):
                    field = HEADER_FIELDS_B.get(name)
                    if field is None:
                        raise MetadataError(f"unknown gateway header {name.decode('latin-1')!r}")
                    meta.set(field, value.decode("latin-1"))
                    continue
                if name in KEY_HEADERS_B and SUFFIX_B in value:
                    value = split_key(value.decode("latin-1"), meta).encode("latin-1")
                elif name == b"traceparent":
                    traceparent = value
                elif bedrock and name in SIGNING_B:
                    if name == b"authorization" and value.startswith(b"AWS4-"):
                        sigv4 = True
                fwd.append((name, value))
            query = scope["query_string"]
            if query and b"sidegate" in query:
                query = strip_query_key(query.decode("latin-1"), meta).encode("latin-1")
        except MetadataError as e:
            return await self._error(send, dialect, 400, route, trace, str(e))
        if self.token is not None and not (meta.key and hmac.compare_digest(meta.key.encode(), self.token)):
            return await self._error(send, dialect, 401, route, trace,
                                     "sidegate: missing or wrong gateway key (X-Sidegate-Key)")
        if clen is not None and clen.isdigit() and int(clen) > self.max_body:
            return await self._error(send, dialect, 413, route, trace,
                                     f"sidegate: request body exceeds {self.max_body} bytes")
        try:
            body = await self._read_body(receive)
        except ClientGone:
            trace.status, trace.error = 499, "client disconnected"
            return
        if body is None:
            return await self._error(send, dialect, 413, route, trace,
                                     f"sidegate: request body exceeds {self.max_body} bytes")

        up = route.upstream
        rest = path[end:] if end > 0 else ""
        # The ASGI path is percent-decoded: encode it again, keeping the characters
        # RFC 3986 allows in a path segment (the ":" of model ids among them).
        if not rest.isascii() or " " in rest or "%" in rest or "?" in rest or "#" in rest:
            rest = quote(rest, safe=PATH_SAFE)
        target = up.base_path + rest
        if query:
            target = f"{target}?{query.decode('latin-1')}"
        if traceparent is None:
            traceparent = _new_traceparent()
            trace.tp_created = True
            fwd.append((b"traceparent", traceparent))
        trace.target, trace.body, trace.traceparent = target, body, traceparent
        fwd.append(IDENTITY)
        if route.injects:
            fwd = self._inject(route, fwd)
        if sigv4:
            fwd = await self._resign(route, fwd, scope["method"], target, body)

        # The disconnect watcher: a task waiting in receive(). For a streamed answer it
        # starts only when the request is still running after one to two sweeps
        # (WATCH_EVERY apart): most streams are done sooner, and a set entry costs far less
        # than the task and the pending receive() (or a timer per request). A client that
        # left earlier is seen as soon as it starts (receive() then returns the disconnect).
        # A whole-body answer gets it at once: with a receive() pending from the start,
        # granian serves those for less (measured: -4 to -10 us per request at 16
        # connections). At 1 connection the pending receive() costs ~7 thread switches
        # per request (granian resolves it when the answer ends: tokio task, GIL, loop
        # wake) and ~16 us of CPU, but it keeps granian's blocking thread awake for the
        # next request: p50 is ~13 us better with it (bench/RESULTS.md, run K notes).
        loop = self._loop  # (given: asyncio's own lookup of the running loop costs a getpid())
        watch = _Watch(receive, asyncio.current_task(loop), self._sweeps)
        inflight = self._inflight
        if _wants_stream(body, target):
            inflight.add(watch)
            if not self._sweeping:
                self._sweeping = True
                loop.call_later(WATCH_EVERY, self._sweep)
        else:
            watch.watcher = loop.create_task(_cancel_on_disconnect(receive, watch.task))
        try:
            await self._forward(send, route, dialect, trace, scope["method"], target, fwd, body, traceparent)
        except asyncio.CancelledError:
            # The client went away: the upstream response (if any) was closed on the way out.
            watcher = watch.watcher
            if watcher is not None and watcher.done() and watch.task.cancelling():
                watch.task.uncancel()
                trace.status, trace.error = 499, "client disconnected"
                metrics.request_done(route.provider, metrics.tenant_label(meta.tenant), 499)
            else:
                raise
        finally:
            inflight.discard(watch)
            if watch.watcher is not None:
                watch.watcher.cancel()

    def _sweep(self) -> None:
        """Start the disconnect watcher of every request that has run a whole sweep period."""
        self._sweeps += 1
        inflight = self._inflight
        if inflight:
            old = [w for w in inflight if w.sweep < self._sweeps - 1]
            for w in old:
                inflight.discard(w)
                w.watcher = self._loop.create_task(_cancel_on_disconnect(w.receive, w.task))
        if inflight:
            self._loop.call_later(WATCH_EVERY, self._sweep)
        else:
            self._sweeping = False

    async def _read_body(self, receive) -> bytes | None:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        body = msg.get("body", b"")
        if not msg.get("more_body"):
            return body if len(body) <= self.max_body else None
        parts, size = [body], len(body)
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            parts.append(chunk)
            if not msg.get("more_body"):
                return b"".join(parts)

    def _inject(self, route: routes.ProviderRoute, fwd):
        key = route.credential()
        if key is None:
            return fwd
        header, template = route.inject_header
        drop = {header.encode(), b"authorization", b"x-api-key", b"x-goog-api-key"}
        out = [(n, v) for n, v in fwd if n not in drop]
        out.append((header.encode(), template.format(key).encode("latin-1")))
        return out

    async def _resign(self, route, fwd, method, target, body):
        up = route.upstream
        signer = self.signers.get(up.region)
        if signer is None:
            signer = self.signers[up.region] = Signer(up.region)
        creds = await signer.credentials()
        if creds is None:
            return fwd
        unsigned = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in fwd if n not in SIGNING_B]
        signed = signer.sign(creds, method, up.origin + target, unsigned, body)
        return [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in signed]

    # -- response side ------------------------------------------------------------

    async def _forward(self, send, route, dialect, trace: Trace, method, target, fwd, body, traceparent) -> None:
        meta = trace.meta
        provider = route.provider
        tenant = metrics.tenant_label(meta.tenant)
        up = route.upstream
        t0 = time.perf_counter()
        try:
            resp = await self.pool.request(method, up.scheme, up.host, up.port, target, fwd, body,
                                           total_timeout=self.total_timeout)
        except UpstreamTimeout:
            return await self._error(send, dialect, 504, route, trace,
                                     "sidegate: upstream did not answer within the timeout")
        except (UpstreamError, OSError) as e:
            return await self._error(send, dialect, 502, route, trace,
                                     f"sidegate: upstream unreachable ({type(e).__name__})")
        metrics.upstream_latency(provider, (time.perf_counter() - t0) * 1000.0)
        try:
            headers = [(b"traceparent", traceparent)]
            ctype = b""
            for name, value in resp.headers:
                name = name.lower()
                if name in RESPONSE_DROP:
                    continue
                if name == b"content-type":
                    ctype = value
                headers.append((name, value))
            status = trace.status = resp.status
            trace.ctype = ctype.decode("latin-1")
            gmod = registry.module_for(route.dialect, target) if status == 200 else None
            gctx = self._governance(route, meta, target, body) if gmod is not None else None
            if ctype.startswith(STREAM_TYPES) or (route.dialect == "gemini" and ":streamGenerateContent" in target):
                sctype = trace.ctype
                framer = gmod.Governor(target, sctype, gctx[2]) if gmod is not None else dialect.framer(target, sctype)
                trace.calls = framer.calls
                await self._stream(send, resp, route, framer, gctx, status, headers, trace)
            else:
                try:
                    data = await resp.read_all()
                except UpstreamError as e:
                    return await self._error(send, dialect, 502, route, trace,
                                             f"sidegate: upstream broke mid-body ({type(e).__name__})")
                if gmod is not None:
                    try:
                        data = await self._govern_body(gmod, target, data, gctx, trace)
                    except Exception as e:  # fail closed in enforce mode, pass in observe
                        log.exception("%s: governing the body failed: %s", provider, type(e).__name__)
                        if gctx[2]:
                            return await self._error(send, dialect, 502, route, trace,
                                                     "sidegate: internal error while governing the response")
                await send({"type": START, "status": status, "headers": headers})
                trace.ttfb = time.perf_counter()
                await send({"type": BODY, "body": data})
                trace.chunks.append(data)
            metrics.request_done(provider, tenant, status)
        finally:
            resp.close()

    # -- governance -----------------------------------------------------------------

    def _governance(self, route, meta, target, body):
        """(policy, effective policy, enforce?, call context) for one response."""
        policy = self.policies.policy
        eff = policy.for_tenant(meta.tenant)
        mode = meta.mode or eff.mode
        # Nothing can be denied under an allow-all policy: govern in observe mode (no holding).
        trivial = not eff.rules and eff.default == "allow" and policy.authority is None
        enforce = mode == "enforce" and not trivial
        ctx = CallContext(route.provider, meta.tenant or "", meta.actor or "",
                          _model_in_path(route.dialect, target.partition("?")[0]), body)
        return policy, eff, enforce, ctx

    async def _decide_all(self, calls, gctx) -> list[Verdict]:
        policy, eff, enforce, ctx = gctx
        if enforce:
            return [await self.decider.decide(policy, eff, c, ctx) for c in calls]
        # Observe: decisions are recorded beside the stream, never waited for.
        task = asyncio.ensure_future(self._observe(calls, gctx))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return [_OBSERVED] * len(calls)

    async def _observe(self, calls, gctx) -> None:
        policy, eff, _, ctx = gctx
        for c in calls:
            c.verdict = await self.decider.decide(policy, eff, c, ctx, open_escalations=False)

    async def _govern_body(self, gmod, target, data: bytes, gctx, trace: Trace) -> bytes:
        calls = gmod.extract(target, data)
        if not calls:
            return data
        trace.calls = calls
        verdicts = await self._decide_all(calls, gctx)
        if gctx[2] and not all(v.allowed for v in verdicts):
            for c, v in zip(calls, verdicts, strict=True):
                c.verdict = v
            return gmod.rewrite(target, data, calls, verdicts)
        return data

    async def _resolve(self, gov, gctx) -> bytes:
        out = b""
        while gov.pending:
            out += gov.resolve(await self._decide_all(list(gov.pending), gctx))
        return out

    # -- streaming --------------------------------------------------------------------

    async def _stream(self, send, resp, route, framer, gctx, status, headers, trace: Trace) -> None:
        await send({"type": START, "status": status, "headers": headers})
        chunks = trace.chunks
        gauge = metrics.streams(route.provider)
        gauge.inc()
        try:
            while True:
                try:
                    chunk = await resp.read_chunk()
                except UpstreamError as e:
                    log.warning("%s: upstream stream broke: %s", route.provider, type(e).__name__)
                    what = "read timeout" if isinstance(e, UpstreamTimeout) else "connection broke mid-stream"
                    trace.error = f"upstream {what}"
                    await send({"type": BODY, "body": framer.error(f"sidegate: upstream {what}")})
                    return
                if not chunk:
                    return await self._finish(send, framer, gctx, trace, b"")
                try:
                    out = framer.feed(chunk)
                    if framer.pending:
                        out += await self._resolve(framer, gctx)
                except Exception as e:  # a governor bug: fail closed, never relay undecided calls
                    log.exception("%s: stream processing failed: %s", route.provider, type(e).__name__)
                    trace.error = "internal error while governing"
                    await send({"type": BODY, "body": framer.error("sidegate: internal error while governing")})
                    return
                if resp.at_end:
                    # The upstream's last bytes came with this chunk: what the end of the
                    # stream adds goes out with them, in the closing send (one send less).
                    return await self._finish(send, framer, gctx, trace, out)
                if out:
                    if trace.ttfb is None:
                        trace.ttfb = time.perf_counter()
                    await send({"type": BODY, "body": out, "more_body": True})
                    chunks.append(out)
        finally:
            gauge.dec()

    async def _finish(self, send, framer, gctx, trace: Trace, out: bytes) -> None:
        """The stream's closing send: `out` (its last relayed bytes, if any) and what closing
        the framer adds (held events, decided now)."""
        tail = framer.close()
        while framer.pending:
            tail += await self._resolve(framer, gctx)
            tail += framer.close()
        if out:
            if trace.ttfb is None:
                trace.ttfb = time.perf_counter()
            trace.chunks.append(out)
        if tail:
            trace.chunks.append(tail)
        await send({"type": BODY, "body": out + tail if tail else out})

    async def _error(self, send, dialect, status, route, trace: Trace, message: str) -> None:
        trace.status, trace.error = status, message
        headers, body = dialect.error_response(status, message)
        await send({"type": START, "status": status,
                    "headers": [(n.encode(), v.encode()) for n, v in headers]})
        await send({"type": BODY, "body": body})
        metrics.request_done(route.provider, metrics.tenant_label(trace.meta.tenant), status)


_OBSERVED = Verdict("allow", "observe mode")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _malloc_keep(trim_threshold: int = 16 << 20, mmap_threshold: int = 1 << 20) -> None:
    """Let glibc keep freed heap for the next request. By default it hands a free heap top
    back past ~2x the largest freed mmap-sized chunk (256 KB) and serves bodies of 128 KB+
    by mmap, so a worker relaying 100 KB requests faulted their pages in again on every
    request: 195 against 141 us of CPU per request (bench/results-traces.md). Housekeeping
    trims once the worker is quiet."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    except (OSError, AttributeError):
        pass


GC_FULL_EVERY = 1000  # young collections between two automatic full ones (CPython's default: 10)


def _gc_for_latency() -> None:
    """Keep the cyclic GC's full collections out of the streams' way. A full collection
    stops the loop while it walks every tracked object: at 1000 paced streams, 30-85 ms
    per collection, once or twice in each 3-second bench run, each one an inter-event gap
    of that size in every stream. What the worker loaded at start-up (modules, config, policy) is
    frozen out of the walk, and full collections are left to housekeeping's quiet moments,
    or to every GC_FULL_EVERY-th young collection under load without a pause. The young
    collections (~0.1 ms, and ~4 ms for the middle generation) are unchanged."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, GC_FULL_EVERY)


def _malloc_trim():
    """glibc's malloc_trim, or None (another libc)."""
    try:
        import ctypes

        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _model_in_path(dialect: str, path: str) -> str:
    """The model id where the API puts it in the path (Bedrock, Gemini); else "" and the
    body is read for it later, off the hot path, only by whoever needs it."""
    if dialect == "bedrock" and "/model/" in path:
        return path.split("/model/", 1)[1].split("/", 1)[0]
    if dialect == "gemini" and "/models/" in path:
        return path.rsplit("/models/", 1)[1].split(":", 1)[0]
    return ""


class Trace:
    """What one request leaves for the recorder: references, no copies, no parsing."""

    __slots__ = ("chunks", "ttfb", "calls", "status", "error", "ctype", "meta", "target", "body",
                 "traceparent", "tp_created")

    def __init__(self, meta: Meta) -> None:
        self.meta = meta
        self.chunks: list[bytes] = []
        self.ttfb: float | None = None
        self.calls = ()
        self.status = 0
        self.error: str | None = None
        self.ctype = ""
        self.target = ""
        self.body = b""
        self.traceparent = b""
        self.tp_created = False


def _wants_stream(body: bytes, target: str) -> bool:
    """Whether the request asks for a streamed answer, by a cheap look (a wrong guess
    costs a few microseconds, nothing else): `"stream": true` in the body (OpenAI,
    Anthropic), or a streaming path (Bedrock `*-stream`, Gemini `:streamGenerateContent`)."""
    if "stream" in target:
        return True
    if not has(body, b'"stream"'):  # (an agent's request is tens of KB: memmem, not a reverse search through it all)
        return False
    i = body.rfind(b'"stream"')  # from the end: SDKs write it after the messages
    while i >= 0:
        rest = body[i + 8:i + 24].lstrip()
        if rest[:1] == b":":
            return rest[1:].lstrip().startswith(b"true")
        i = body.rfind(b'"stream"', 0, i)
    return False


WATCH_EVERY = 0.05  # seconds between sweeps (a watcher starts 50-100 ms into a request)


class _Watch:
    """A request whose disconnect watcher may have to start: `watcher` once it has."""

    __slots__ = ("receive", "sweep", "task", "watcher")

    def __init__(self, receive, task: asyncio.Task, sweep: int) -> None:
        self.receive = receive
        self.task = task
        self.sweep = sweep  # the sweep count when the request got here
        self.watcher: asyncio.Task | None = None


async def _cancel_on_disconnect(receive, task: asyncio.Task) -> None:
    # The request body is read: the next message can only be the client leaving.
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()

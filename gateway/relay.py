"""The proxy pipeline: route -> request filter -> upstream -> response processor -> client.

Written against granian's RSGI protocol. The hot path moves bytes: untouched chunks go
to the client as the same bytes objects the upstream client produced.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time

from urllib.parse import quote

import msgspec
from granian.rsgi import ProtocolClosed

from . import metrics, routes
from .bedrock_sign import CLIENT_SIGNING_HEADERS, Signer
from .config import Config
from .decision import CallContext, Decider
from .dialects import BY_NAME as DIALECTS
from .escalations import EscalationStore
from .governance import registry
from .governance.base import Verdict
from .policy import PolicyStore
from .metadata import HEADER_FIELDS, KEY_HEADERS, SUFFIX, Meta, MetadataError, split_key, strip_query_key
from .upstream import Pool, UpstreamClosed, UpstreamConnectError, UpstreamError, UpstreamTimeout

log = logging.getLogger("sidegate.relay")

# Never forwarded in either direction (RFC 9110 7.6.1), plus what the relay recomputes.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                        "host", "content-length", "accept-encoding"})
RESPONSE_DROP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-connection",
                           "te", "trailer", "transfer-encoding", "upgrade", "content-length"})
PATH_SAFE = "/:@!$&'()*+,;=-._~"
STREAM_TYPES = ("text/event-stream", "application/vnd.amazon.eventstream")
# Non-stream bodies are read whole (the governance step needs them whole); past this
# size the upstream answer is refused with 502 rather than held in memory.
BUFFER_LIMIT = 64 * 1024 * 1024


def _new_traceparent() -> str:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


class Relay:
    """Per-worker state: the route table, the upstream pool, signers."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.table = routes.build(cfg)
        self.prefixes = {seg: self.table[p] for seg, p in routes.PREFIXES.items()}
        self.max_body = cfg.max_request_bytes
        self.token = cfg.proxy_token.encode() if cfg.proxy_token else None
        self.pool: Pool | None = None
        self.signers = {}
        self.policies = PolicyStore(cfg.policy)
        self.decider = Decider(EscalationStore(cfg.escalations))
        self._background: set[asyncio.Task] = set()
        self._not_found = msgspec.json.encode({
            "error": {"type": "not_found", "message": "sidegate: no route for this path",
                      "valid_prefixes": routes.prefixes()}})

    def start(self) -> None:
        t = self.cfg.timeouts
        self.pool = Pool(connect_timeout=t.connect, read_timeout=t.read, total_timeout=t.total)

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()
        await self.decider.aclose()

    # -- request side -------------------------------------------------------------

    async def __call__(self, scope, proto) -> None:
        path = scope.path
        end = path.find("/", 4)
        route = self.prefixes.get(path[4:end] if end > 0 else path[4:]) if path.startswith("/v1/") else None
        if route is None:
            proto.response_bytes(404, [("content-type", "application/json")], self._not_found)
            return
        dialect = DIALECTS[route.dialect]
        rest = path[end:] if end > 0 else ""
        meta = Meta()
        fwd: list[tuple[str, str]] = []
        traceparent = None
        sigv4 = False
        try:
            for name, value in scope.headers.items():
                if name in HOP_BY_HOP:
                    continue
                if name.startswith("x-sidegate-"):
                    field = HEADER_FIELDS.get(name)
                    if field is None:
                        raise MetadataError(f"unknown gateway header {name!r}")
                    meta.set(field, value)
                    continue
                if name in KEY_HEADERS and SUFFIX in value:
                    value = split_key(value, meta)
                elif name == "traceparent":
                    traceparent = value
                if route.provider == "bedrock" and name in CLIENT_SIGNING_HEADERS:
                    if name == "authorization" and value.startswith("AWS4-"):
                        sigv4 = True
                    elif name != "authorization":
                        fwd.append((name, value))
                        continue
                fwd.append((name, value))
            query = scope.query_string
            if query and "sidegate" in query:
                query = strip_query_key(query, meta)
        except MetadataError as e:
            return self._error(proto, dialect, 400, route, meta, str(e))
        if self.token is not None and not (meta.key and hmac.compare_digest(meta.key.encode(), self.token)):
            return self._error(proto, dialect, 401, route, meta, "sidegate: missing or wrong gateway key (X-Sidegate-Key)")

        clen = scope.headers.get("content-length")
        if clen is not None and clen.isdigit() and int(clen) > self.max_body:
            return self._error(proto, dialect, 413, route, meta,
                               f"sidegate: request body exceeds {self.max_body} bytes")
        body = await self._read_body(proto, clen)
        if body is None:
            return self._error(proto, dialect, 413, route, meta,
                               f"sidegate: request body exceeds {self.max_body} bytes")

        up = route.upstream
        # granian hands over a percent-decoded path: encode it again, keeping the
        # characters that RFC 3986 allows in a path segment (":" of model ids among them)
        target = up.base_path + (rest if rest.isascii() and " " not in rest and "%" not in rest
                                 and "?" not in rest and "#" not in rest else quote(rest, safe=PATH_SAFE))
        if query:
            target = f"{target}?{query}"
        if traceparent is None:
            traceparent = _new_traceparent()
            fwd.append(("traceparent", traceparent))
        fwd.append(("accept-encoding", "identity"))
        if route.injects:
            fwd = self._inject(route, fwd)
        if sigv4:
            fwd = await self._resign(route, fwd, scope.method, target, body)

        task = asyncio.current_task()
        watcher = asyncio.ensure_future(_cancel_on_disconnect(proto, task))
        try:
            await self._forward(proto, route, dialect, meta, scope.method, target, fwd, body, traceparent)
        except asyncio.CancelledError:
            # The client went away: the upstream response (if any) was closed on the way out.
            if task.cancelling() and watcher.done():
                task.uncancel()
                metrics.request_done(route.provider, metrics.tenant_label(meta.tenant), 499)
            else:
                raise
        finally:
            watcher.cancel()

    async def _read_body(self, proto, clen: str | None) -> bytes | None:
        if clen is not None:
            body = await proto()
            return body if len(body) <= self.max_body else None
        parts, size = [], 0
        async for chunk in proto:
            size += len(chunk)
            if size > self.max_body:
                return None
            parts.append(chunk)
        return b"".join(parts)

    def _inject(self, route: routes.ProviderRoute, fwd: list[tuple[str, str]]) -> list[tuple[str, str]]:
        key = route.credential()
        if key is None:
            return fwd
        header, template = route.inject_header
        drop = {header, "authorization", "x-api-key", "x-goog-api-key"}
        out = [(n, v) for n, v in fwd if n not in drop]
        out.append((header, template.format(key)))
        return out

    async def _resign(self, route, fwd, method, target, body):
        up = route.upstream
        signer = self.signers.get(up.region)
        if signer is None:
            signer = self.signers[up.region] = Signer(up.region)
        creds = await signer.credentials()
        if creds is None:
            return fwd
        unsigned = [(n, v) for n, v in fwd if n not in CLIENT_SIGNING_HEADERS]
        return signer.sign(creds, method, up.origin + target, unsigned, body)

    # -- response side ------------------------------------------------------------

    async def _forward(self, proto, route, dialect, meta, method, target, fwd, body, traceparent) -> None:
        provider = route.provider
        tenant = metrics.tenant_label(meta.tenant)
        t0 = time.perf_counter()
        pool = self.pool
        if pool is None:  # aiohttp wants a running loop, which RSGI init does not have yet
            self.start()
            pool = self.pool
        try:
            resp = await pool.request(method, route.upstream, target, fwd, body)
        except UpstreamTimeout as e:
            return self._error(proto, dialect, 504, route, meta, f"sidegate: {e}")
        except UpstreamConnectError as e:
            return self._error(proto, dialect, 502, route, meta, f"sidegate: {e}")
        metrics.upstream_latency(provider, (time.perf_counter() - t0) * 1000.0)
        try:
            headers = [("traceparent", traceparent)]
            ctype = ""
            for name, value in resp.headers:
                lname = name.decode("latin-1").lower()
                if lname in RESPONSE_DROP:
                    continue
                sval = value.decode("latin-1")
                if lname == "content-type":
                    ctype = sval
                elif lname == "traceparent":
                    continue
                headers.append((lname, sval))
            status = resp.status
            gmod = registry.module_for(route.dialect, target) if status == 200 else None
            gctx = self._governance(route, meta, target, body) if gmod is not None else None
            if ctype.startswith(STREAM_TYPES) or (route.dialect == "gemini" and ":streamGenerateContent" in target):
                if gmod is not None:
                    framer = gmod.Governor(target, ctype, gctx[2])
                else:
                    framer = dialect.framer(target, ctype)
                await self._stream(proto, resp, route, framer, gctx, status, headers)
            else:
                try:
                    data = await resp.read_all(BUFFER_LIMIT)
                except UpstreamError as e:
                    return self._error(proto, dialect, 502, route, meta, f"sidegate: {e}")
                if gmod is not None:
                    try:
                        data = await self._govern_body(gmod, target, data, gctx)
                    except Exception as e:  # fail closed in enforce mode, pass in observe
                        log.exception("%s: governing the body failed: %s", provider, type(e).__name__)
                        if gctx[2]:
                            return self._error(proto, dialect, 502, route, meta,
                                               "sidegate: internal error while governing the response")
                proto.response_bytes(status, headers, data)
            metrics.request_done(provider, tenant, status)
        finally:
            resp.close()

    # -- governance -----------------------------------------------------------------

    def _governance(self, route, meta, target, body):
        """(policy, effective policy, enforce?, call context) for one response."""
        policy = self.policies.current(time.monotonic())
        eff = policy.for_tenant(meta.tenant)
        mode = meta.mode or eff.mode
        # Nothing can be denied under an allow-all policy: govern in observe mode (no holding).
        trivial = not eff.rules and eff.default == "allow" and policy.authority is None
        enforce = mode == "enforce" and not trivial
        ctx = CallContext(route.provider, meta.tenant or "", meta.actor or "", _model_of(route.dialect, target, body))
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

    async def _govern_body(self, gmod, target, data: bytes, gctx) -> bytes:
        calls = gmod.extract(target, data)
        if not calls:
            return data
        verdicts = await self._decide_all(calls, gctx)
        if gctx[2] and not all(v.allowed for v in verdicts):
            for c, v in zip(calls, verdicts):
                c.verdict = v
            return gmod.rewrite(target, data, calls, verdicts)
        return data

    async def _resolve(self, gov, gctx) -> bytes:
        out = b""
        while gov.pending:
            out += gov.resolve(await self._decide_all(list(gov.pending), gctx))
        return out

    # -- streaming --------------------------------------------------------------------

    async def _stream(self, proto, resp, route, framer, gctx, status, headers) -> None:
        transport = proto.response_stream(status, headers)
        gauge = metrics.streams(route.provider)
        gauge.inc()
        try:
            while True:
                try:
                    chunk = await resp.read_chunk()
                except (UpstreamClosed, UpstreamTimeout) as e:
                    log.warning("%s: upstream stream broke: %s", route.provider, e)
                    await transport.send_bytes(framer.error(f"sidegate: {e}"))
                    return
                if not chunk:
                    tail = framer.close()
                    while framer.pending:
                        tail += await self._resolve(framer, gctx)
                        tail += framer.close()
                    if tail:
                        await transport.send_bytes(tail)
                    return
                try:
                    out = framer.feed(chunk)
                    if framer.pending:
                        out += await self._resolve(framer, gctx)
                except Exception as e:  # a governor bug: fail closed, never relay undecided calls
                    log.exception("%s: stream processing failed: %s", route.provider, type(e).__name__)
                    await transport.send_bytes(framer.error("sidegate: internal error while governing the stream"))
                    return
                if out:
                    await transport.send_bytes(out)
        except ProtocolClosed:
            # The client disconnected: closing `resp` (caller) aborts the upstream request.
            return
        finally:
            gauge.dec()

    def _error(self, proto, dialect, status, route, meta, message: str) -> None:
        headers, body = dialect.error_response(status, message)
        proto.response_bytes(status, headers, body)
        metrics.request_done(route.provider, metrics.tenant_label(meta.tenant), status)


_OBSERVED = Verdict("allow", "observe mode")


def _model_of(dialect: str, target: str, body: bytes) -> str:
    """The model id, for the authority and traces: from the path where the API puts it
    there, else from the request body (decoding only the `model` field)."""
    path = target.partition("?")[0]
    if dialect == "bedrock" and "/model/" in path:
        return path.split("/model/", 1)[1].split("/", 1)[0]
    if dialect == "gemini" and "/models/" in path:
        return path.rsplit("/models/", 1)[1].split(":", 1)[0]
    try:
        return msgspec.json.decode(body, type=_ModelField).model
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""


class _ModelField(msgspec.Struct):
    model: str = ""


async def _cancel_on_disconnect(proto, task: asyncio.Task) -> None:
    await proto.client_disconnect()
    task.cancel()

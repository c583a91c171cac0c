"""OpenTelemetry export: one CLIENT span per proxied call, GenAI semantic conventions,
OTLP over HTTP (protobuf), batched by the SDK's BatchSpanProcessor in its own thread.

Spans are built in the trace writer thread, never on the relay's event loop. The span
joins the agent's trace: its parent is the `traceparent` the agent sent; when the
gateway created the traceparent itself, the span takes that trace and span id, so the
upstream's parent is this span. Every call is exported (sampler ALWAYS_ON unless
OTEL_TRACES_SAMPLER says otherwise). Prompt and completion content is opt-in
(SIDEGATE_OTLP_CAPTURE_CONTENT=true): gen_ai.input.messages, gen_ai.output.messages,
gen_ai.system_instructions, gen_ai.tool.definitions and tool call arguments.
OTEL_EXPORTER_OTLP_HEADERS / OTEL_EXPORTER_OTLP_TRACES_HEADERS apply (backend auth).
"""

from __future__ import annotations

import json
import os
import random

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .extract import request_view, response_view

# gen_ai.provider.name (and the older gen_ai.system) per route
PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "nvidia-nim": "nvidia_nim",
                  "bedrock": "aws.bedrock", "gemini": "gcp.gemini", "vertex-gemini": "gcp.vertex_ai"}


def traces_url(endpoint: str) -> str:
    """SIDEGATE_OTLP_ENDPOINT is the collector base (http://host:4318) or the full traces URL."""
    e = endpoint.rstrip("/")
    return e if e.endswith("/v1/traces") else e + "/v1/traces"


def operation(dialect: str, path: str) -> str:
    if "embed" in path:
        return "embeddings"
    if dialect == "gemini":
        return "generate_content"
    if path.endswith("/completions") and not path.endswith("/chat/completions"):
        return "text_completion"
    return "chat"


class _Ids(IdGenerator):
    """Random ids, except when the span must take ids the gateway already handed out."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        if self.span_id:
            sid, self.span_id = self.span_id, 0
            return sid
        return random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        if self.trace_id:
            tid, self.trace_id = self.trace_id, 0
            return tid
        return random.getrandbits(128) or 1


def _parse_traceparent(tp: str):
    parts = (tp or "").strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        tid, sid, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not tid or not sid:
        return None
    return tid, sid, flags


def _parts(msg: dict) -> list[dict]:
    out = []
    if msg.get("text"):
        out.append({"type": "text", "content": msg["text"]})
    for c in msg.get("tool_calls") or []:
        out.append({"type": "tool_call", "id": c.get("call_id"), "name": c.get("name"),
                    "arguments": c.get("arguments")})
    if msg.get("tool_call_id") and msg.get("role") == "tool":
        out = [{"type": "tool_call_response", "id": msg["tool_call_id"], "response": msg.get("text", "")}]
    return out


class OtelExporter:
    def __init__(self, endpoint: str, capture_content: bool = False, service_name: str = "sidegate") -> None:
        self.capture_content = capture_content
        self._ids = _Ids()
        sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else ALWAYS_ON
        attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name}
        self.provider = TracerProvider(sampler=sampler, resource=Resource.create(attrs), id_generator=self._ids,
                                       shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
        self.tracer = self.provider.get_tracer("sidegate.traces")

    def export(self, rec, usage, session: str, response: bytes) -> None:
        op = operation(rec.dialect, rec.path)
        pname = PROVIDER_NAMES.get(rec.provider, rec.provider)
        attrs = {
            "gen_ai.operation.name": op,
            "gen_ai.provider.name": pname,
            "gen_ai.system": pname,
            "gen_ai.request.model": rec.model or "",
            "gen_ai.conversation.id": session,
            "http.response.status_code": rec.status,
            "url.path": rec.path.partition("?")[0],
            "sidegate.provider": rec.provider,
            "sidegate.dialect": rec.dialect,
            "sidegate.tenant": rec.tenant or "",
            "sidegate.actor": rec.actor or "",
            "sidegate.session": session,
            "sidegate.duration_ms": rec.duration_ms,
            "sidegate.tool_calls.count": len(rec.tool_calls),
        }
        if rec.ttfb_ms is not None:
            attrs["sidegate.ttfb_ms"] = rec.ttfb_ms
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage[0]
            attrs["gen_ai.usage.output_tokens"] = usage[1]
            attrs["gen_ai.usage.cache_read.input_tokens"] = usage[2]
        if rec.error:
            attrs["error.type"] = rec.error
        elif rec.status >= 400:
            attrs["error.type"] = str(rec.status)
        if self.capture_content:
            self._content(rec, response, attrs)

        tp = _parse_traceparent(rec.traceparent)
        ctx = None
        if tp is not None:
            tid, sid, flags = tp
            if rec.traceparent_created:
                self._ids.trace_id, self._ids.span_id = tid, sid
            else:
                parent = SpanContext(tid, sid, is_remote=True, trace_flags=TraceFlags(flags))
                ctx = trace.set_span_in_context(NonRecordingSpan(parent))
        start = int(rec.started * 1e9)
        span = self.tracer.start_span(f"{op} {rec.model}".strip(), context=ctx, kind=SpanKind.CLIENT,
                                      attributes=attrs, start_time=start)
        self._ids.trace_id = self._ids.span_id = 0
        for c in rec.tool_calls:
            ev = {"gen_ai.tool.name": c.get("name") or "", "gen_ai.tool.call.id": c.get("call_id") or "",
                  "sidegate.decision": c.get("decision") or "", "sidegate.decision.reason": c.get("reason") or ""}
            if c.get("rule"):
                ev["sidegate.decision.rule"] = c["rule"]
            if c.get("escalation_id"):
                ev["sidegate.escalation.id"] = c["escalation_id"]
            if self.capture_content:
                ev["gen_ai.tool.call.arguments"] = c.get("arguments") or ""
            span.add_event("sidegate.tool_call", ev, timestamp=start + int((rec.ttfb_ms or 0) * 1e6))
        if rec.status >= 400 or rec.error:
            span.set_status(Status(StatusCode.ERROR, rec.error or f"HTTP {rec.status}"))
        span.end(end_time=start + int(rec.duration_ms * 1e6))

    def _content(self, rec, response: bytes, attrs: dict) -> None:
        q = request_view(rec.dialect, rec.path, rec.request_body)
        r = response_view(rec.dialect, rec.path, rec.response_content_type, response)
        if q.system:
            attrs["gen_ai.system_instructions"] = json.dumps([{"type": "text", "content": q.system}])
        attrs["gen_ai.input.messages"] = json.dumps(
            [{"role": m.get("role", ""), "parts": _parts(m)} for m in q.messages], ensure_ascii=False)
        if q.tools:
            attrs["gen_ai.tool.definitions"] = json.dumps([{"type": "function", "name": t} for t in q.tools])
        out = {"role": "assistant", "parts": _parts({"text": r.text, "tool_calls": r.tool_calls})}
        if r.stop_reason:
            out["finish_reason"] = r.stop_reason
            attrs["gen_ai.response.finish_reasons"] = [str(r.stop_reason)]
        attrs["gen_ai.output.messages"] = json.dumps([out], ensure_ascii=False)
        if r.model:
            attrs["gen_ai.response.model"] = r.model

    def shutdown(self) -> None:
        self.provider.force_flush(5000)
        self.provider.shutdown()

"""Async HTTP/1.1 load generator: uvloop, raw asyncio.Protocol + httptools, keep-alive,
N connections, closed loop (each connection sends its next request when the previous
response is complete), fixed duration, bounded.

  python -m bench.loadgen --target 127.0.0.1:18000 --conns 16 --duration 5            # JSON replies
  python -m bench.loadgen --target 127.0.0.1:18000 --conns 16 --duration 5 --stream   # SSE streams
      [--dialect openai|anthropic|bedrock|gemini] [--prefix /v1] [--tool NAME] [--marker TEXT]
      [--events 64] [--pace-ms 0] [--warmup 1] [--ramp 1] [--samples-out FILE] [--json]

Non-streaming: per-request latency (send -> complete), req/s, p50/p90/p99/max.
Streaming: time to first body byte, total stream time, largest gap between two body
reads within a stream, events per stream (SSE events, or AWS event-stream frames for
bedrock), end of stream seen.
Only requests *sent* after the warm-up are recorded. `--ramp S` spreads the first request
of each connection over S seconds (paced streams then keep distinct phases).
`--marker TEXT` counts responses whose body contains TEXT (e.g. the gateway's denial marker).
Errors: connect failures, non-200, resets, streams with the wrong event count.
"""
from __future__ import annotations

import argparse
import array
import asyncio
import json
import time

import httptools

_now = time.perf_counter

CHAT_BODY_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. " * 40},
    {"role": "user", "content": "Hello, please summarise the following text. " + "lorem ipsum dolor sit amet " * 40},
]
_USER_TEXT = CHAT_BODY_MESSAGES[1]["content"]
_SYSTEM_TEXT = CHAT_BODY_MESSAGES[0]["content"]

# dialect -> (default path prefix at the mock, model)
DIALECT_DEFAULT_PREFIX = {"openai": "/v1", "anthropic": "/v1", "bedrock": "", "gemini": "/v1beta"}
END_MARKER = {"openai": b"[DONE]", "anthropic": b"message_stop", "bedrock": b"metadata", "gemini": b'"finishReason"'}


def make_body(stream: bool, size: int = 2400, dialect: str = "openai") -> bytes:
    """A ~`size`-byte request body of the dialect (padding in a field the API ignores)."""
    if dialect == "openai":
        doc = {"model": "gpt-4.1", "messages": CHAT_BODY_MESSAGES, "stream": stream}
        pad = "user"
    elif dialect == "anthropic":
        doc = {"model": "claude-sonnet-4-20250514", "max_tokens": 1024, "system": _SYSTEM_TEXT,
               "messages": [{"role": "user", "content": _USER_TEXT}], "stream": stream}
        pad = None
    elif dialect == "bedrock":
        doc = {"system": [{"text": _SYSTEM_TEXT}], "messages": [{"role": "user", "content": [{"text": _USER_TEXT}]}],
               "inferenceConfig": {"maxTokens": 1024}}
        pad = None
    elif dialect == "gemini":
        doc = {"systemInstruction": {"parts": [{"text": _SYSTEM_TEXT}]},
               "contents": [{"role": "user", "parts": [{"text": _USER_TEXT}]}]}
        pad = None
    else:
        raise ValueError(dialect)
    b = json.dumps(doc).encode()
    if len(b) < size:
        if pad:
            doc[pad] = "x" * (size - len(b) - 11)
        else:  # lengthen the user text
            extra = " pad" * ((size - len(b)) // 4)
            if dialect == "anthropic":
                doc["messages"][0]["content"] += extra
            elif dialect == "bedrock":
                doc["messages"][0]["content"][0]["text"] += extra
            else:
                doc["contents"][0]["parts"][0]["text"] += extra
        b = json.dumps(doc).encode()
    # the mock's cheap byte test sees the flag exactly as `"stream": true`
    return b


def request_path(dialect: str, prefix: str | None, stream: bool) -> str:
    p = DIALECT_DEFAULT_PREFIX[dialect] if prefix is None else prefix
    if dialect == "openai":
        return p + "/chat/completions"
    if dialect == "anthropic":
        return p + "/messages"
    if dialect == "bedrock":
        return p + "/model/anthropic.claude-3-5-sonnet-20241022-v2:0/" + ("converse-stream" if stream else "converse")
    return p + "/models/gemini-2.0-flash:" + ("streamGenerateContent?alt=sse" if stream else "generateContent")


def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


class Stats:
    def __init__(self):
        self.lat = []  # seconds, per completed request
        self.ttfb = []
        self.gap = []  # per stream: largest gap between body reads
        self.events = []
        self.errors = 0
        self.bad = 0
        self.marked = 0
        self.err_kinds: dict[str, int] = {}

    def err(self, kind):
        self.errors += 1
        self.err_kinds[kind] = self.err_kinds.get(kind, 0) + 1


class Client(asyncio.Protocol):
    def __init__(self, gen, idx):
        self.gen = gen
        self.idx = idx
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.t0 = 0.0
        self.t_first = 0.0
        self.t_last = 0.0
        self.max_gap = 0.0
        self.nev = 0
        self.tail = b""  # last bytes of the previous body piece (separator / marker spanning)
        self.need = 0  # event-stream: bytes left in the current frame
        self.pre = b""  # event-stream: partial prelude
        self.done_seen = False
        self.marked = False
        self.status = 0
        self.inflight = False
        self.rec = False
        self.round = 0
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.inflight:
            if self.rec and not self.gen.closing:  # (requests cut by our own close are 'unfinished')
                self.gen.stats.err("reset")
            self.inflight = False
        self.gen.conn_lost(self)

    def send(self):
        gen = self.gen
        self.t0 = _now()
        self.rec = gen.recording if not gen.rounds else self.round >= gen.record_from
        if self.rec and gen.t_rec0 is None:
            gen.t_rec0 = self.t0
        self.t_first = 0.0
        self.max_gap = 0.0
        self.nev = 0
        self.tail = b""
        self.need = 0
        self.pre = b""
        self.done_seen = False
        self.marked = False
        self.inflight = True
        gen.sent += 1
        self.transport.write(gen.request_bytes)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.stats.err("parse")
            self.inflight = False
            self.transport.abort()

    def on_headers_complete(self):
        self.status = self.parser.get_status_code()

    def on_body(self, body):
        gen = self.gen
        if gen.stream:
            t = _now()
            if self.t_first == 0.0:
                self.t_first = t
            else:
                g = t - self.t_last
                if g > self.max_gap:
                    self.max_gap = g
            self.t_last = t
            if gen.frames:
                self._count_frames(body)
            else:
                sep = gen.sep
                both = self.tail + body
                # separators wholly inside `tail` were counted before
                self.nev += both.count(sep) - self.tail.count(sep)
                if not self.done_seen and gen.end_marker in both:
                    self.done_seen = True
        if gen.marker is not None and not self.marked:
            if gen.marker in self.tail + body:
                self.marked = True
        self.tail = body[-gen.keep:] if len(body) >= gen.keep else (self.tail + body)[-gen.keep:]

    def _count_frames(self, body):
        """AWS event-stream: 4-byte big-endian total length at the start of each frame."""
        mv = memoryview(body)
        i, n = 0, len(body)
        while i < n:
            if self.need:
                take = min(self.need, n - i)
                self.need -= take
                i += take
                continue
            want = 4 - len(self.pre)
            self.pre += bytes(mv[i:i + want])
            i += min(want, n - i)
            if len(self.pre) == 4:
                total = int.from_bytes(self.pre, "big")
                self.pre = b""
                self.nev += 1
                self.need = total - 4
        if not self.done_seen and self.gen.end_marker in self.tail + body:
            self.done_seen = True

    def on_message_complete(self):
        t = _now()
        self.inflight = False
        gen = self.gen
        st = gen.stats
        gen.completed += 1
        gen.completed_events += self.nev
        self.round += 1
        if self.rec:
            gen.t_rec1 = t
            if self.status != 200:
                st.err(f"status {self.status}")
            else:
                st.lat.append(t - self.t0)
                if self.marked:
                    st.marked += 1
                if gen.stream:
                    st.ttfb.append((self.t_first or t) - self.t0)
                    st.gap.append(self.max_gap)
                    st.events.append(self.nev)
                    if not self.done_seen or (gen.expect_events and self.nev != gen.expect_events):
                        st.bad += 1
        if gen.running and not self.closed and (not gen.rounds or self.round < gen.rounds):
            self.send()
        else:
            gen.conn_idle(self)


class LoadGen:
    def __init__(self, host, port, path, conns, stream, events, pace_ms, body_size, extra_headers,
                 dialect="openai", tool=None, marker=None, check_events=True, model=None, rounds=0, record_from=0):
        self.host, self.port, self.path = host, port, path
        self.nconns = conns
        self.stream = stream
        self.dialect = dialect
        self.frames = dialect == "bedrock"
        self.sep = b"\r\n\r\n" if dialect == "gemini" else b"\n\n"
        self.end_marker = END_MARKER[dialect]
        self.marker = marker.encode() if marker else None
        self.keep = max(len(self.sep), len(self.end_marker), len(self.marker or b"")) + 1
        body = make_body(stream, body_size, dialect)
        if model:
            body = body.replace(b'"model": "gpt-4.1"', b'"model": ' + json.dumps(model).encode(), 1)
        self.rounds = rounds
        self.record_from = record_from
        self.t_rec0 = self.t_rec1 = None
        self.closing = False
        hdrs = [b"POST %s HTTP/1.1" % path.encode(), b"host: %s:%d" % (host.encode(), port),
                b"content-type: application/json", b"content-length: %d" % len(body)]
        if dialect == "anthropic":
            hdrs += [b"anthropic-version: 2023-06-01", b"x-api-key: sk-ant-bench"]
        elif dialect == "openai":
            hdrs.append(b"authorization: Bearer sk-bench")
        elif dialect == "gemini":
            hdrs.append(b"x-goog-api-key: bench")
        if stream:
            hdrs.append(b"x-mock-events: %d" % events)
            if pace_ms:
                hdrs.append(b"x-mock-pace-ms: %s" % str(pace_ms).encode())
        if tool:
            hdrs.append(b"x-mock-tool: %s" % tool.encode())
        for h in extra_headers:
            hdrs.append(h.encode())
        self.request_bytes = b"\r\n".join(hdrs) + b"\r\n\r\n" + body
        from bench.mock_upstream import expected_events

        self.expect_events = expected_events(dialect, events, bool(tool)) if stream and check_events else 0
        self.stats = Stats()
        self.running = False
        self.recording = False
        self.clients: list[Client] = []
        self.idle_fut = None
        self.n_idle = 0
        self.sent = 0
        self.completed = 0  # all completed requests incl. warm-up and drain (for CPU accounting)
        self.completed_events = 0

    def conn_idle(self, c):
        self.n_idle += 1
        if self.idle_fut is not None and self.n_idle >= len(self.clients) and not self.idle_fut.done():
            self.idle_fut.set_result(None)

    def conn_lost(self, c):
        if self.running and not self.closing:
            self.stats.err("closed")
        self.conn_idle(c)

    async def run(self, duration, warmup=0.0, grace=5.0, ramp=0.0):
        loop = asyncio.get_running_loop()
        for i in range(self.nconns):
            try:
                _, c = await loop.create_connection(lambda i=i: Client(self, i), self.host, self.port)
            except OSError:
                self.stats.err("connect")
                continue
            self.clients.append(c)
        if not self.clients:
            raise SystemExit(f"cannot connect to {self.host}:{self.port}")
        self.running = True
        self.recording = warmup <= 0
        t_start = _now()
        if ramp > 0 and len(self.clients) > 1:
            step = ramp / len(self.clients)
            for i, c in enumerate(self.clients):
                loop.call_at(loop.time() + i * step, c.send)
        else:
            for c in self.clients:
                c.send()
        if warmup > 0:
            await asyncio.sleep(warmup)
            self.recording = True
        t0 = _now()
        await asyncio.sleep(duration)
        elapsed = _now() - t0
        self.running = False
        self.recording = False
        self.idle_fut = loop.create_future()
        t_drain = _now()
        if self.n_idle < len(self.clients):
            try:
                await asyncio.wait_for(self.idle_fut, grace)
            except asyncio.TimeoutError:
                unfinished = sum(1 for c in self.clients if c.inflight and c.rec)
                if unfinished:
                    self.stats.errors += unfinished
                    self.stats.err_kinds["unfinished"] = unfinished
        self.drain_s = _now() - t_drain
        self.closing = True
        for c in self.clients:
            c.transport.close()
        self.wall_s = _now() - t_start
        return self.report(elapsed)

    async def run_rounds(self, max_time, ramp=0.0):
        """Every connection sends `rounds` requests back to back (the first spread over
        `ramp` seconds); requests of round `record_from` and later are recorded. Bounded by
        `max_time` seconds: what is still in flight then counts as unfinished."""
        loop = asyncio.get_running_loop()
        t_start = _now()
        for i in range(self.nconns):
            try:
                _, c = await loop.create_connection(lambda i=i: Client(self, i), self.host, self.port)
            except OSError:
                self.stats.err("connect")
                continue
            self.clients.append(c)
        if not self.clients:
            raise SystemExit(f"cannot connect to {self.host}:{self.port}")
        self.running = True
        self.idle_fut = loop.create_future()
        step = ramp / len(self.clients) if ramp > 0 else 0.0
        for i, c in enumerate(self.clients):
            if step:
                loop.call_at(loop.time() + i * step, c.send)
            else:
                c.send()
        try:
            await asyncio.wait_for(asyncio.shield(self.idle_fut), max(0.1, max_time - (_now() - t_start)))
        except asyncio.TimeoutError:
            unfinished = sum(1 for c in self.clients for r in range(c.round, self.rounds) if r >= self.record_from)
            if unfinished:
                self.stats.errors += unfinished
                self.stats.err_kinds["unfinished"] = unfinished
        self.running = False
        self.drain_s = 0.0
        self.closing = True
        for c in self.clients:
            c.transport.close()
        self.wall_s = _now() - t_start
        el = (self.t_rec1 - self.t_rec0) if self.t_rec0 is not None and self.t_rec1 is not None else self.wall_s
        return self.report(max(el, 1e-9))

    def report(self, elapsed):
        st = self.stats
        lat = sorted(st.lat)
        n = len(lat)
        r = {
            "conns": self.nconns,
            "stream": self.stream,
            "dialect": self.dialect,
            "requests": n,
            "elapsed_s": round(elapsed, 3),
            "rps": round(n / elapsed, 1),
            "p50_ms": round(pct(lat, 50) * 1e3, 3),
            "p90_ms": round(pct(lat, 90) * 1e3, 3),
            "p99_ms": round(pct(lat, 99) * 1e3, 3),
            "max_ms": round(lat[-1] * 1e3, 3) if lat else None,
            "completed_all": self.completed,
            "sent_all": self.sent,
            "drain_s": round(self.drain_s, 3),
            "wall_s": round(self.wall_s, 3),
            "errors": st.errors,
            "error_kinds": st.err_kinds,
        }
        if self.marker is not None:
            r["marked"] = st.marked
        if self.stream:
            tt = sorted(st.ttfb)
            gp = sorted(st.gap)
            ev = st.events
            r.update(
                {
                    "ttfb_p50_ms": round(pct(tt, 50) * 1e3, 3),
                    "ttfb_p99_ms": round(pct(tt, 99) * 1e3, 3),
                    "ttfb_max_ms": round(tt[-1] * 1e3, 3) if tt else None,
                    "gap_p50_ms": round(pct(gp, 50) * 1e3, 3),
                    "gap_p99_ms": round(pct(gp, 99) * 1e3, 3),
                    "gap_max_ms": round(gp[-1] * 1e3, 3) if gp else None,
                    "events_min": min(ev) if ev else 0,
                    "events_max": max(ev) if ev else 0,
                    "events_total": sum(ev),
                    "bad_streams": st.bad,
                    "completed_events_all": self.completed_events,
                }
            )
        return r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="127.0.0.1:18000")
    ap.add_argument("--path", default=None, help="full request path (default: from --dialect and --prefix)")
    ap.add_argument("--dialect", default="openai", choices=sorted(DIALECT_DEFAULT_PREFIX))
    ap.add_argument("--prefix", default=None, help="path prefix in front of the dialect's API path (mock default: /v1, '', /v1beta)")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--ramp", type=float, default=0.0)
    ap.add_argument("--grace", type=float, default=5.0, help="seconds to wait for in-flight requests after the window")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--events", type=int, default=64)
    ap.add_argument("--pace-ms", type=float, default=0)
    ap.add_argument("--tool", default=None, help="ask the mock to end with a call to this tool")
    ap.add_argument("--marker", default=None, help="count responses containing this text")
    ap.add_argument("--no-event-check", action="store_true", help="do not require the mock's exact event count")
    ap.add_argument("--body-size", type=int, default=2400)
    ap.add_argument("-H", "--header", action="append", default=[])
    ap.add_argument("--model", default=None, help="model name in the request body (openai dialect)")
    ap.add_argument("--rounds", type=int, default=0, help="each connection sends exactly this many requests (no --duration window)")
    ap.add_argument("--record-from", type=int, default=1, help="with --rounds: first recorded round (0-based)")
    ap.add_argument("--max-time", type=float, default=60.0, help="with --rounds: stop after this many seconds")
    ap.add_argument("--samples-out", default=None, help="write recorded latencies (float64 seconds) to this file")
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    a = ap.parse_args(argv)
    if a.duration > 120:
        raise SystemExit("--duration is capped at 120 s")
    host, port = a.target.rsplit(":", 1)
    path = a.path or request_path(a.dialect, a.prefix, a.stream)
    import uvloop

    gen = LoadGen(host, int(port), path, a.conns, a.stream, a.events, a.pace_ms, a.body_size, a.header,
                  dialect=a.dialect, tool=a.tool, marker=a.marker, check_events=not a.no_event_check,
                  model=a.model, rounds=a.rounds, record_from=a.record_from if a.rounds else 0)
    if a.rounds:
        r = uvloop.run(gen.run_rounds(min(a.max_time, 120.0), ramp=a.ramp))
    else:
        r = uvloop.run(gen.run(a.duration, a.warmup, grace=min(a.grace, 60.0), ramp=a.ramp))
    if a.samples_out:
        with open(a.samples_out, "wb") as f:
            array.array("d", gen.stats.lat).tofile(f)
    if a.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:>14}: {v}")


if __name__ == "__main__":
    main()

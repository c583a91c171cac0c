"""Async HTTP/1.1 load generator: uvloop, raw asyncio.Protocol + httptools, keep-alive,
N connections, closed loop (each connection sends its next request when the previous
response is complete), fixed duration, bounded.

  python -m bench.loadgen --target 127.0.0.1:18000 --conns 16 --duration 5            # JSON replies
  python -m bench.loadgen --target 127.0.0.1:18000 --conns 16 --duration 5 --stream   # SSE streams
      [--events 64] [--pace-ms 0] [--warmup 1] [--json]

Non-streaming: per-request latency (send -> complete), req/s, p50/p90/p99/max.
Streaming: time to first body byte, total stream time, largest gap between two body
reads within a stream, events per stream (counted as SSE "\n\n" separators), [DONE] seen.
Errors: connect failures, non-200, resets, streams with the wrong event count.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import httptools

_now = time.perf_counter

CHAT_BODY_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. " * 40},
    {"role": "user", "content": "Hello, please summarise the following text. " + "lorem ipsum dolor sit amet " * 40},
]


def make_body(stream: bool, size: int = 2400) -> bytes:
    doc = {"model": "gpt-4.1", "messages": CHAT_BODY_MESSAGES, "stream": stream}
    b = json.dumps(doc).encode()
    if len(b) < size:
        doc["user"] = "x" * (size - len(b) - 11)
        b = json.dumps(doc).encode()
    # make sure the mock's cheap byte test sees the flag exactly as `"stream": true`
    return b


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
        self.recording = False
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
        self.last_nl = False
        self.done_seen = False
        self.status = 0
        self.inflight = False
        self.closed = False
        self.lost = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.inflight:
            self.gen.stats.err("reset")
            self.inflight = False
        self.gen.conn_lost(self)

    def send(self):
        self.t0 = _now()
        self.t_first = 0.0
        self.max_gap = 0.0
        self.nev = 0
        self.last_nl = False
        self.done_seen = False
        self.inflight = True
        self.transport.write(self.gen.request_bytes)

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
        if self.gen.stream:
            t = _now()
            if self.t_first == 0.0:
                self.t_first = t
            else:
                g = t - self.t_last
                if g > self.max_gap:
                    self.max_gap = g
            self.t_last = t
            n = body.count(b"\n\n")
            if self.last_nl and body[:1] == b"\n":
                n += 1
            self.last_nl = body[-1:] == b"\n"
            self.nev += n
            if not self.done_seen and b"[DONE]" in body:
                self.done_seen = True

    def on_message_complete(self):
        t = _now()
        self.inflight = False
        gen = self.gen
        st = gen.stats
        gen.completed += 1
        gen.completed_events += self.nev
        if gen.recording:
            if self.status != 200:
                st.err(f"status {self.status}")
            else:
                st.lat.append(t - self.t0)
                if gen.stream:
                    st.ttfb.append((self.t_first or t) - self.t0)
                    st.gap.append(self.max_gap)
                    st.events.append(self.nev)
                    if not self.done_seen or (gen.expect_events and self.nev != gen.expect_events):
                        st.bad += 1
        if gen.running and not self.closed:
            self.send()
        else:
            gen.conn_idle(self)


class LoadGen:
    def __init__(self, host, port, path, conns, stream, events, pace_ms, body_size, extra_headers):
        self.host, self.port, self.path = host, port, path
        self.nconns = conns
        self.stream = stream
        body = make_body(stream, body_size)
        hdrs = [b"POST %s HTTP/1.1" % path.encode(), b"host: %s:%d" % (host.encode(), port), b"content-type: application/json", b"content-length: %d" % len(body)]
        if stream:
            hdrs.append(b"x-mock-events: %d" % events)
            if pace_ms:
                hdrs.append(b"x-mock-pace-ms: %s" % str(pace_ms).encode())
        for h in extra_headers:
            hdrs.append(h.encode())
        self.request_bytes = b"\r\n".join(hdrs) + b"\r\n\r\n" + body
        # SSE events per stream: role + N deltas + finish + usage + [DONE]
        self.expect_events = events + 4 if stream else 0
        self.stats = Stats()
        self.running = False
        self.recording = False
        self.clients: list[Client] = []
        self.idle_fut = None
        self.n_idle = 0
        self.completed = 0  # all completed requests incl. warm-up and drain (for CPU accounting)
        self.completed_events = 0

    def conn_idle(self, c):
        self.n_idle += 1
        if self.idle_fut is not None and self.n_idle >= len(self.clients) and not self.idle_fut.done():
            self.idle_fut.set_result(None)

    def conn_lost(self, c):
        if self.running:
            self.stats.err("closed")
        self.conn_idle(c)

    async def run(self, duration, warmup=0.0, grace=5.0):
        loop = asyncio.get_running_loop()
        for i in range(self.nconns):
            try:
                _, c = await loop.create_connection(lambda i=i: Client(self, i), self.host, self.port)
            except OSError as e:
                self.stats.err("connect")
                continue
            self.clients.append(c)
        if not self.clients:
            raise SystemExit(f"cannot connect to {self.host}:{self.port}")
        self.running = True
        self.recording = warmup <= 0
        for c in self.clients:
            c.send()
        if warmup > 0:
            await asyncio.sleep(warmup)
            self.recording = True
        t0 = _now()
        await asyncio.sleep(duration)
        elapsed = _now() - t0
        self.running = False
        self.idle_fut = loop.create_future()
        if self.n_idle < len(self.clients):
            try:
                await asyncio.wait_for(self.idle_fut, grace)
            except asyncio.TimeoutError:
                self.stats.err("unfinished")
        for c in self.clients:
            c.transport.close()
        return self.report(elapsed)

    def report(self, elapsed):
        st = self.stats
        lat = sorted(st.lat)
        n = len(lat)
        r = {
            "conns": self.nconns,
            "stream": self.stream,
            "requests": n,
            "elapsed_s": round(elapsed, 3),
            "rps": round(n / elapsed, 1),
            "p50_ms": round(pct(lat, 50) * 1e3, 3),
            "p90_ms": round(pct(lat, 90) * 1e3, 3),
            "p99_ms": round(pct(lat, 99) * 1e3, 3),
            "max_ms": round(lat[-1] * 1e3, 3) if lat else None,
            "completed_all": self.completed,
            "errors": st.errors,
            "error_kinds": st.err_kinds,
        }
        if self.stream:
            tt = sorted(st.ttfb)
            gp = sorted(st.gap)
            ev = st.events
            r.update(
                {
                    "ttfb_p50_ms": round(pct(tt, 50) * 1e3, 3),
                    "ttfb_p99_ms": round(pct(tt, 99) * 1e3, 3),
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
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--events", type=int, default=64)
    ap.add_argument("--pace-ms", type=float, default=0)
    ap.add_argument("--body-size", type=int, default=2400)
    ap.add_argument("-H", "--header", action="append", default=[])
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    a = ap.parse_args(argv)
    if a.duration > 120:
        raise SystemExit("--duration is capped at 120 s")
    host, port = a.target.rsplit(":", 1)
    import uvloop

    gen = LoadGen(host, int(port), a.path, a.conns, a.stream, a.events, a.pace_ms, a.body_size, a.header)
    r = uvloop.run(gen.run(a.duration, a.warmup))
    if a.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:>14}: {v}")


if __name__ == "__main__":
    main()

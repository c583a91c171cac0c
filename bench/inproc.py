"""Where a request's CPU goes inside the worker, without granian: the ASGI app is called
in-process, request after request, against the mock upstream on loopback, and the process's
CPU per request is read (best of --rounds). With the server, the kernel and the other core
out of the picture this reads within ~5 us from run to run, where the end-to-end runs move
by tens of microseconds on this box; it is how the split in RESULTS.md's notes was taken.

  python -m bench.inproc                       # json-denied and stream, every variant
  python -m bench.inproc --shape stream --requests 4000 --rounds 5 [--json]
  python -m bench.inproc --shape paced --streams 200 --rounds 3

Shapes: `json-denied` (a whole-body answer whose tool call the policy denies), `stream`
(an unpaced 71-event stream without a call, the whole stream in one network read) and,
only when asked for, `paced` (--streams concurrent streams of 64 deltas 10 ms apart, each
event its own read and send, as under the harness's paced points; CPU per relayed event).
Variants, each in a fresh process pinned to core 0 (the mock on core 1): the floor relay
served as ASGI (bench.floors.relay_asgi_lean), sidegate enforce with traces on (the shipped
configuration), and sidegate with the trace record and/or governance taken out by
replacing one function: an ablation, to read what each step costs in place (each costs
2-3x its hot micro-benchmark: caches are cold).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.procs import ROOT, free_port, start, stop, wait_port

PY = sys.executable
SHAPES = ("json-denied", "stream", "paced")
DEFAULT_SHAPES = ("json-denied", "stream")
PACE_MS = 10
VARIANTS = ("floor", "sidegate", "no-record", "no-governance", "neither")
POLICY = "mode: enforce\ndefault: allow\nrules:\n  - {name: bench, tool: '^delete_repo$', decision: deny, reason: bench}\n"


def _child(variant: str, shape: str, mock: int, requests: int, rounds: int, streams: int = 200) -> dict:
    work = tempfile.mkdtemp(prefix="sidegate-inproc-")
    os.makedirs(f"{work}/metrics")
    with open(f"{work}/policy.yaml", "w") as f:
        f.write(POLICY)
    os.environ.update(SG_UPSTREAM=f"127.0.0.1:{mock}", SIDEGATE_UPSTREAM_OPENAI=f"http://127.0.0.1:{mock}/v1",
                      SIDEGATE_POLICY=f"{work}/policy.yaml", SIDEGATE_TRACES=f"{work}/traces.sqlite",
                      SIDEGATE_ESCALATIONS=f"{work}/escalations.sqlite", PROMETHEUS_MULTIPROC_DIR=f"{work}/metrics",
                      SG_POOL="1024")  # (the floor's pool: every paced stream holds a connection)
    import uvloop

    from bench.loadgen import make_body

    paced = shape == "paced"
    stream = shape == "stream" or paced
    body = make_body(stream)
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (b"authorization", b"Bearer sk-bench"),
               (b"user-agent", b"bench"), (b"accept", b"*/*")]
    if stream:
        headers.append((b"x-mock-events", b"64"))
        if paced:
            headers.append((b"x-mock-pace-ms", str(PACE_MS).encode()))
    else:
        headers.append((b"x-mock-tool", b"delete_repo"))
    if variant == "floor":
        from bench.floors.relay_asgi_lean import app
        path = "/v1/chat/completions"
    else:
        from gateway import relay
        from gateway.app import app
        from gateway.governance import registry
        if variant in ("no-record", "neither"):
            relay.Relay._record = lambda *a: None
        if variant in ("no-governance", "neither"):
            registry.module_for = lambda *a: None
        path = "/v1/openai/chat/completions"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "method": "POST", "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": headers, "scheme": "http", "http_version": "1.1",
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8005)}
    seen = {"bytes": 0, "statuses": set(), "denied": 0, "events": 0}

    async def one():
        sent = []

        async def receive():
            if sent:  # the body was read: the client stays (as under granian, until the answer ends)
                await asyncio.Event().wait()
            sent.append(1)
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(m):
            if m["type"] == "http.response.start":
                seen["statuses"].add(m["status"])
            else:
                b = m.get("body", b"")
                seen["bytes"] += len(b)
                seen["denied"] += b"[SIDEGATE DENIED]" in b
                if paced:  # (counted only here: the other shapes' figures stay comparable)
                    seen["events"] += b.count(b"data: ")

        await app(dict(scope), receive, send)

    async def lifespan(q: asyncio.Queue, done: asyncio.Event):
        async def receive():
            return await q.get()

        async def send(m):
            if m["type"].endswith(".complete"):
                done.set()

        await app({"type": "lifespan"}, receive, send)

    async def main():
        q, up = asyncio.Queue(), asyncio.Event()
        life = None
        if variant != "floor":
            life = asyncio.ensure_future(lifespan(q, up))
            await q.put({"type": "lifespan.startup"})
            await up.wait()
        async def batch(n: int) -> int:
            """n requests: one after the other; paced streams all at once. Returns the count."""
            if not paced:
                for _ in range(n):
                    await one()
                return n
            await asyncio.gather(*(one() for _ in range(streams)))
            return streams

        await batch(min(500, requests))  # warm: connections pooled, caches and the trace store's first block
        await asyncio.sleep(0.3)
        best_cpu = best_loop = float("inf")
        for _ in range(rounds):
            seen["bytes"] = seen["denied"] = seen["events"] = 0
            c0, l0 = time.process_time(), time.thread_time()
            n = await batch(requests)
            c1, l1 = time.process_time(), time.thread_time()
            per = seen["events"] if paced else n  # paced: CPU per relayed event
            best_cpu = min(best_cpu, (c1 - c0) / per * 1e6)
            best_loop = min(best_loop, (l1 - l0) / per * 1e6)
            await asyncio.sleep(0.2)  # the trace writer catches up between rounds, as between slices
        if life is not None:
            up.clear()
            await q.put({"type": "lifespan.shutdown"})
            await up.wait()
        res = {"variant": variant, "shape": shape, "cpu_us": round(best_cpu, 2 if paced else 1),
               "loop_us": round(best_loop, 2 if paced else 1), "statuses": sorted(seen["statuses"]),
               "bytes_per_request": seen["bytes"] // max(1, n), "denied": seen["denied"]}
        if paced:  # (events are counted for this shape only: elsewhere the figure would read 0)
            res["events_per_request"] = round(seen["events"] / max(1, n), 1)
        return res

    try:
        return uvloop.run(main())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(shapes, variants, requests: int, rounds: int, passes: int, log=print, streams: int = 200) -> list[dict]:
    """Every (shape, variant) in `passes` alternating passes; the best of each is kept."""
    mock = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    mp = start([PY, "-m", "bench.mock_upstream", "--port", str(mock)], 1, env)
    best: dict[tuple, dict] = {}
    try:
        if not wait_port(mock, 15):
            raise SystemExit("bench.inproc: the mock upstream did not start")
        for p in range(passes):
            order = list(variants) if p % 2 == 0 else list(variants)[::-1]
            for shape in shapes:
                for v in order:
                    argv = ["taskset", "-c", "0", PY, "-m", "bench.inproc", "--child", v, "--shape", shape,
                            "--mock", str(mock), "--requests", str(requests), "--rounds", str(rounds),
                            "--streams", str(streams)]
                    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
                    if out.returncode != 0:
                        raise SystemExit(f"bench.inproc: {v}/{shape} failed:\n{out.stderr[-3000:]}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    if r["statuses"] != [200]:
                        raise SystemExit(f"bench.inproc: {v}/{shape} answered {r['statuses']}")
                    unit = "event  " if shape == "paced" else "request"
                    log(f"  pass {p + 1} {shape:12} {v:14} cpu {r['cpu_us']:6.1f} us/{unit}  loop {r['loop_us']:6.1f}")
                    k = (shape, v)
                    if k not in best or r["cpu_us"] < best[k]["cpu_us"]:
                        best[k] = r
    finally:
        stop(mp)
    return list(best.values())


def table(results: list[dict]) -> str:
    by = {(r["shape"], r["variant"]): r["cpu_us"] for r in results}

    def cell(v) -> str:
        return "–" if v is None else f"{v:.1f}"

    def diff(a, b):
        return None if a is None or b is None else a - b

    lines = ["| shape | floor | sidegate | − trace record | − governance | − both | record ≈ | governance ≈ | rest of the relay ≈ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        c = {v: by.get((shape, v)) for v in VARIANTS}
        if all(x is None for x in c.values()):
            continue
        label = "paced (per event)" if shape == "paced" else shape
        lines.append("| " + " | ".join([label] + [cell(c[v]) for v in VARIANTS] + [
            cell(diff(c["sidegate"], c["no-record"])), cell(diff(c["sidegate"], c["no-governance"])),
            cell(diff(c["neither"], c["floor"]))]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, action="append", help="default: " + " and ".join(DEFAULT_SHAPES))
    ap.add_argument("--streams", type=int, default=200, help="concurrent streams of the paced shape (default 200)")
    ap.add_argument("--variant", choices=VARIANTS, action="append", help="default: all")
    ap.add_argument("--requests", type=int, default=4000, help="requests per round (default 4000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per process; the best is kept (default 5)")
    ap.add_argument("--passes", type=int, default=2, help="alternating passes over the variants (default 2)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mock", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.shape[0], a.mock, a.requests, a.rounds, a.streams)), flush=True)
        os._exit(0)  # (a pooled connection's finaliser must not outlive the loop)
    log = (lambda *x: print(*x, file=sys.stderr)) if a.json else print
    res = run(a.shape or DEFAULT_SHAPES, a.variant or VARIANTS, a.requests, a.rounds, a.passes, log, a.streams)
    if a.json:
        print(json.dumps(res))
    else:
        print("\nCPU per request (paced: per relayed event), µs (process CPU: loop and trace writer; best of the rounds and passes)\n")
        print(table(res))


if __name__ == "__main__":
    main()

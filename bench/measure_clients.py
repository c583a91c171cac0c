"""Relay upstream-client comparison (Q1) and granian RSGI vs ASGI (Q2), bounded in time.

  python -m bench.measure_clients                       # all targets, 2 interleaved reps
  python -m bench.measure_clients --reps 1 --duration 3 --targets direct,rsgi-aiohttp,rsgi-lean
  python -m bench.measure_clients --only stall          # Q2(ii) stalled reader only

Relay under test pinned to core 0; mock upstream and load generator pinned to core 1.
CPU of the relay = sum over its process tree (granian main + worker, all threads) of
/proc/<pid>/task/<tid>/schedstat run time (ns), before/after each point.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
GRANIAN = os.path.join(os.path.dirname(PY), "granian")

BASE_PORT = 18600
MOCK_PORT = BASE_PORT

GRANIAN_FLAGS = ["--loop", "uvloop", "--http", "1", "--workers", "1", "--runtime-threads", "1", "--no-ws", "--log-level", "warning", "--backlog", "4096"]

TARGETS = {
    # name: (argv or None for direct, port offset)
    "direct": None,
    "tcp-splice": ["-m", "bench.floors.tcp_splice"],
    "rsgi-aiohttp": ("rsgi", "bench.floors.relay_aiohttp:app"),
    "rsgi-httpcore": ("rsgi", "bench.floors.relay_httpcore:app"),
    "rsgi-lean": ("rsgi", "bench.floors.relay_lean:app"),
    "asgi-aiohttp": ("asgi", "bench.floors.relay_asgi_aiohttp:app"),
    "asgi-lean": ("asgi", "bench.floors.relay_asgi_lean:app"),
    # granian alone (no upstream): the relay apps answer /null locally with the same shapes
    "rsgi-null": ("rsgi", "bench.floors.relay_lean:app", ["--path", "/null"]),
    "asgi-null": ("asgi", "bench.floors.relay_asgi_lean:app", ["--path", "/null"]),
}

EVENTS = 64
EVENTS_PER_STREAM = EVENTS + 4  # role + deltas + finish + usage + [DONE]

POINTS = {
    # name: loadgen args
    "c1": ["--conns", "1"],
    "c16": ["--conns", "16"],
    "c64": ["--conns", "64"],
    # one upstream write per event (x-mock-batch: 0), as when these results were taken
    "s16": ["--conns", "16", "--stream", "--events", str(EVENTS), "-H", "x-mock-batch: 0"],
    "s16-paced2ms": ["--conns", "16", "--stream", "--events", str(EVENTS), "--pace-ms", "2"],
}


from bench.procs import (machine_busy, port_free, rss_kib, start, stop, tree_cpu_ns, tree_cpu_ticks_ns,  # noqa: F401
                         tree_pids, tree_rss_kib, wait_port)

# ----------------------------------------------------------------------------- processes


def start_target(name, port, env, logdir):
    spec = TARGETS[name]
    log = open(os.path.join(logdir, f"{name}.log"), "w")
    if isinstance(spec, list):
        argv = [PY] + spec + ["--port", str(port), "--upstream", f"127.0.0.1:{MOCK_PORT}"]
    else:
        iface, app = spec[0], spec[1]
        argv = [GRANIAN, "--interface", iface, *GRANIAN_FLAGS, "--port", str(port), app]
    return start(argv, 0, env, log), argv


def loadgen(port, args, duration, warmup):
    cmd = ["taskset", "-c", "1", PY, "-m", "bench.loadgen", "--target", f"127.0.0.1:{port}", "--duration", str(duration), "--warmup", str(warmup), "--json", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration + warmup + 30)
    if r.returncode != 0:
        return {"error": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- stalled reader (Q2 ii)


def stalled_reader(port, pid, total_bytes, seconds, read_bps, sample=0.25):
    """One client asks for a big fast SSE stream and reads nothing (read_bps=0) or read_bps.
    Returns peak tree RSS, RSS samples, bytes read by the client."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.connect(("127.0.0.1", port))
    body = b'{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}],"stream": true}'
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"x-mock-bytes: %d\r\ncontent-length: %d\r\n\r\n%s" % (total_bytes, len(body), body)
    )
    s.setblocking(False)
    rss0 = tree_rss_kib(pid)
    t0 = time.time()
    got = 0
    samples = []
    next_sample = t0
    while True:
        now = time.time()
        el = now - t0
        if el >= seconds:
            break
        if now >= next_sample:
            samples.append((round(el, 2), tree_rss_kib(pid) // 1024))
            next_sample += sample
        if read_bps:
            allowed = int(el * read_bps) - got
            if allowed > 0:
                try:
                    d = s.recv(min(allowed, 65536))
                    got += len(d)
                except BlockingIOError:
                    pass
        time.sleep(0.01)
    peak = max(m for _, m in samples)
    s.close()
    time.sleep(2.0)
    after = tree_rss_kib(pid) // 1024
    return {"rss_before_mib": rss0 // 1024, "rss_peak_mib": peak, "rss_2s_after_close_mib": after, "client_read_bytes": got, "samples": samples[:: max(1, len(samples) // 10)]}


# ----------------------------------------------------------------------------- one point


def measure_point(t, pid, mock_pid, port, pt, a):
    c0 = tree_cpu_ns(pid) if pid else 0
    m0 = tree_cpu_ns(mock_pid)
    b0 = machine_busy()
    l0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.time()
    spec = TARGETS[t]
    extra = spec[2] if isinstance(spec, tuple) and len(spec) > 2 else []
    r = loadgen(port, POINTS[pt] + extra, a.duration, a.warmup)
    wall = time.time() - w0
    l1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c1 = tree_cpu_ns(pid) if pid else 0
    m1 = tree_cpu_ns(mock_pid)
    b1 = machine_busy()
    r["wall_s"] = round(wall, 3)
    hz = os.sysconf("SC_CLK_TCK")
    busy_s = (b1[0] - b0[0]) / hz
    span_s = (b1[1] - b0[1]) / hz  # summed over both cores
    lg_s = (l1.ru_utime + l1.ru_stime) - (l0.ru_utime + l0.ru_stime)
    relay_s = (c1 - c0) / 1e9
    mock_s = (m1 - m0) / 1e9
    r["loadgen_cpu_s"] = round(lg_s, 3)
    r["mock_cpu_s"] = round(mock_s, 3)
    # 'foreign' = busy CPU on the machine not used by relay + mock + loadgen (other tenants), % of 2 cores
    r["foreign_cpu_pct"] = round(max(0.0, 100.0 * (busy_s - relay_s - mock_s - lg_s) / max(span_s, 1e-9)), 1)
    # CPU is measured over warm-up + run + drain; divide by every request completed in that
    # window (loadgen's completed_all), not only the recorded ones.
    if r.get("requests"):
        served = r["completed_all"]
        r["relay_cpu_s"] = relay_s if pid else None
        r["relay_cpu_us_per_req"] = relay_s * 1e6 / served if pid else None
        if "--stream" in POINTS[pt]:
            r["relay_cpu_us_per_event"] = relay_s * 1e6 / r["completed_events_all"] if pid and r["completed_events_all"] else None
        r["mock_cpu_us_per_req"] = mock_s * 1e6 / served
    if pid:
        r["relay_rss_mib"] = tree_rss_kib(pid) // 1024
    return r


# ----------------------------------------------------------------------------- main


def summarize(results, max_foreign, points=None):
    """Median over the reps where other tenants used <= max_foreign % of the machine
    (falls back to the least-disturbed rep, marked *)."""
    import statistics

    rows = []
    keys = []
    for r in results:
        k = (r["target"], r["point"])
        if k not in keys:
            keys.append(k)
    if points:
        keys.sort(key=lambda k: points.index(k[1]) if k[1] in points else 99)
    else:
        order = list(POINTS)
        keys.sort(key=lambda k: order.index(k[1]) if k[1] in order else 99)
    rows.append("| target | point | clean reps | req/s | p99 ms | relay CPU µs/req | relay CPU µs/event |")
    rows.append("|---|---|---|---|---|---|---|")
    for t, pt in keys:
        rs = [r for r in results if r["target"] == t and r["point"] == pt and "rps" in r]
        clean = [r for r in rs if r.get("foreign_cpu_pct", 0) <= max_foreign]
        mark = ""
        if not clean:
            clean = [min(rs, key=lambda r: r.get("foreign_cpu_pct", 0))]
            mark = "*"

        def med(k, nd):
            v = [r[k] for r in clean if r.get(k) is not None]
            return f"{statistics.median(v):.{nd}f}" if v else "–"

        rows.append(
            f"| {t} | {pt} | {len(clean) if not mark else '0 (least disturbed: ' + str(clean[0].get('foreign_cpu_pct')) + '%)'} | "
            f"{med('rps', 0)} | {med('p99_ms', 2)} | {med('relay_cpu_us_per_req', 0)} | {med('relay_cpu_us_per_event', 2)} |"
        )
    return "\n".join(rows)


def fmt(v, nd=0):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--duration", type=float, default=2.5)
    ap.add_argument("--warmup", type=float, default=0.4)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--only", choices=["clients", "stall", "all"], default="all")
    ap.add_argument("--stall-targets", default="rsgi-lean,asgi-lean")
    ap.add_argument("--stall-bytes", type=int, default=200_000_000)
    ap.add_argument("--stall-seconds", type=float, default=10.0)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--max-foreign", type=float, default=8.0, help="re-run a point when other tenants used more than this %% of the 2 cores")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--budget", type=float, default=280.0, help="no retries after this many seconds")
    ap.add_argument("--logdir", default="/tmp/sidegate-bench-logs")
    ap.add_argument("--summarize", nargs="+", metavar="JSON", help="only print the clean-rep summary of saved --json-out files")
    a = ap.parse_args(argv)
    if a.summarize:
        res = []
        for fn in a.summarize:
            with open(fn) as f:
                res += json.load(f)["results"]
        print(summarize(res, a.max_foreign))
        return
    os.makedirs(a.logdir, exist_ok=True)
    t_start = time.time()

    targets = [t for t in a.targets.split(",") if t]
    points = [p for p in a.points.split(",") if p]
    stall_targets = [t for t in a.stall_targets.split(",") if t] if a.only in ("stall", "all") else []
    if a.only == "stall":
        targets = []
    needed = list(dict.fromkeys([t for t in targets + stall_targets if t != "direct"]))
    ports = {"direct": MOCK_PORT}
    for i, t in enumerate(TARGETS):
        if t != "direct":
            ports[t] = BASE_PORT + 1 + i
    for p in [MOCK_PORT] + [ports[t] for t in needed]:
        if not port_free(p):
            raise SystemExit(f"port {p} busy")

    env = dict(os.environ, SG_UPSTREAM=f"127.0.0.1:{MOCK_PORT}", PYTHONPATH=ROOT)
    procs = {}
    mock = start([PY, "-m", "bench.mock_upstream", "--port", str(MOCK_PORT)], 1, env, open(os.path.join(a.logdir, "mock.log"), "w"))
    results = []
    stall = {}
    try:
        assert wait_port(MOCK_PORT), "mock did not start"
        for t in needed:
            procs[t], _ = start_target(t, ports[t], env, a.logdir)
        for t in needed:
            if not wait_port(ports[t]):
                raise SystemExit(f"{t} did not start, see {a.logdir}/{t}.log")
        time.sleep(0.5)
        idle_rss = {t: tree_rss_kib(procs[t].pid) // 1024 for t in needed}

        for rep in range(a.reps if targets else 0):
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for pt in points:
                for t in order:
                    pid = procs[t].pid if t != "direct" else None
                    best = None
                    for attempt in range(1 + a.retries):
                        r = measure_point(t, pid, mock.pid, ports[t], pt, a)
                        r["attempt"] = attempt + 1
                        if best is None or r.get("foreign_cpu_pct", 0) < best.get("foreign_cpu_pct", 0):
                            best = r
                        if r.get("foreign_cpu_pct", 0) <= a.max_foreign or time.time() - t_start > a.budget:
                            break
                    r = best
                    r.update(target=t, point=pt, rep=rep + 1)
                    results.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k not in ("error_kinds",)}), flush=True)

        for t in stall_targets:
            pid = procs[t].pid
            for mode, bps in (("read-nothing", 0), ("read-10KB/s", 10_000)):
                r = stalled_reader(ports[t], pid, a.stall_bytes, a.stall_seconds, bps)
                r.update(target=t, mode=mode)
                stall.setdefault(t, []).append(r)
                print(json.dumps(r), flush=True)
                time.sleep(1.0)
    finally:
        for p in procs.values():
            stop(p)
        stop(mock)

    # ---------------------------------------------------------------- tables
    out = []
    if results:
        out.append(f"\n## Clients (each cell: rep 1 / rep 2 ...; {a.duration:g} s per point + {a.warmup:g} s warm-up)\n")
        out.append("| target | point | req/s | p50 ms | p99 ms | relay CPU µs/req | relay CPU µs/event | mock CPU µs/req | foreign CPU % | errors | relay RSS MiB |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for pt in points:
            for t in targets:
                rs = [r for r in results if r["target"] == t and r["point"] == pt]
                if not rs:
                    continue

                def col(k, nd=0):
                    return " / ".join(fmt(r.get(k), nd) for r in rs)

                stream = "--stream" in POINTS[pt]
                out.append(
                    f"| {t} | {pt} | {col('rps', 0)} | {col('p50_ms', 2)} | {col('p99_ms', 2)} | {col('relay_cpu_us_per_req', 0)} | "
                    f"{col('relay_cpu_us_per_event', 2) if stream else '–'} | {col('mock_cpu_us_per_req', 1)} | {col('foreign_cpu_pct', 0)} | "
                    f"{' / '.join(str(r.get('errors', r.get('error', '?'))) + ('+' + str(r['bad_streams']) + 'bad' if r.get('bad_streams') else '') for r in rs)} | {col('relay_rss_mib')} |"
                )
        sp = [p for p in points if "--stream" in POINTS[p]]
        if sp:
            out.append("\n### Streams (16 concurrent, 64 deltas = 68 SSE events per stream)\n")
            out.append("| target | point | streams/s | TTFB p50 ms | TTFB p99 ms | total p99 ms | max gap p99 ms | events/stream | bad |")
            out.append("|---|---|---|---|---|---|---|---|---|")
            for pt in sp:
                for t in targets:
                    rs = [r for r in results if r["target"] == t and r["point"] == pt]
                    if not rs:
                        continue

                    def col(k, nd=0):
                        return " / ".join(fmt(r.get(k), nd) for r in rs)

                    out.append(
                        f"| {t} | {pt} | {col('rps', 0)} | {col('ttfb_p50_ms', 2)} | {col('ttfb_p99_ms', 2)} | {col('p99_ms', 2)} | "
                        f"{col('gap_p99_ms', 2)} | {' / '.join(str(r.get('events_min')) + '-' + str(r.get('events_max')) for r in rs)} | {col('bad_streams')} |"
                    )
        out.append(f"\n### Summary: median over reps with foreign CPU <= {a.max_foreign:g} %\n")
        out.append(summarize(results, a.max_foreign, points))
        out.append("\nIdle RSS (MiB, process tree): " + ", ".join(f"{t} {v}" for t, v in idle_rss.items()))
    if stall:
        out.append(f"\n## Stalled reader: {a.stall_bytes/1e6:.0f} MB SSE stream, client SO_RCVBUF 64 KiB, {a.stall_seconds:g} s\n")
        out.append("| target | client reads | RSS before MiB | RSS peak MiB | RSS 2 s after close MiB | client read bytes |")
        out.append("|---|---|---|---|---|---|")
        for t, rs in stall.items():
            for r in rs:
                out.append(f"| {t} | {r['mode']} | {r['rss_before_mib']} | {r['rss_peak_mib']} | {r['rss_2s_after_close_mib']} | {r['client_read_bytes']} |")
    out.append(f"\ntotal wall time {time.time() - t_start:.0f} s")
    print("\n".join(out))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"results": results, "stall": stall}, f, indent=1)


if __name__ == "__main__":
    main()

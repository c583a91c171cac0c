"""Memory soak: one sidegate worker (enforce mode, traces on: the shipped config, but for
the trace store's size limit) under steady load for a fixed time; RSS of the worker and of
the whole process tree sampled between slices. Budget (issue #6): idle RSS at most 60 MiB
per worker, and no growth beyond 5 % after a 10-minute soak at steady load.

The store is limited to 64 MiB (SIDEGATE_TRACES_MAX_BYTES; shipped default 512 MiB) so that
it fills in the soak's fourth minute and size retention deletes batches every minute after
that, as in a sidecar that has run for days: a soak that never reaches the limit missed a
leak there (session 11). `--traces-max-mib 0` keeps the shipped limit.

  python -m bench.soak                   # 600 s, writes bench/results-soak.md
  python -m bench.soak --seconds 60      # a short look (results printed, file untouched)
  python -m bench.soak --seconds 2700 --rest-every 300 --traces-max-mib 0 --out bench/results-soak-long.md
                                         # the shipped 512 MiB limit, reached after ~29 minutes here
  python -m bench.soak --seconds 2100 --rest-every 300 --traces-max-mib 0 --allocator --out bench/results-soak-fill.md
                                         # each rest also splits the heap by allocator: leak or fragmentation

Load: the load generator on core 1 alternates 20-second slices of non-streaming calls
and of 64-event streams (every response ends with a tool call the policy denies), 16
connections, closed loop. Growth = the worker's RSS at rest (load paused 5 s) after the
soak against its RSS at rest after the first minute (allocator arenas, caches and the trace
writer's buffers are warm by then); under-load figures per shape are shown too. The
process tree is stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time

from bench.harness import LOAD_CORE, PY, Point, _base_env, start_targets, worker_pid
from bench.procs import ROOT, free_port, rss_kib, start, status_kib, stop, tree_pids, tree_rss_kib, wait_port

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results-soak.md")
SLICE_S = 20.0
_RETENTION = re.compile(r"trace retention: (\d+) call\(s\) removed(?: in ([\d.]+) s)?")
TRACES_MAX_MIB = 64.0
REST_S = 5.0  # the worker trims freed heap 0.5 s and 4 s after its last request
ALLOCSTATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allocstats")  # a sitecustomize: see there


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def rss_parts(pid: int) -> dict:
    """The worker's RSS and its split as /proc/<pid>/status gives it (MiB), from one read:
    anonymous memory (the heap: Python objects, malloc arenas, SQLite's page cache, zstd),
    file-backed pages (code, and the files it maps: prometheus-client's multiprocess files,
    SQLite's WAL index) and shared memory (those files when they live on tmpfs)."""
    kib = status_kib(pid, "VmRSS", "RssAnon", "RssFile", "RssShmem")
    return {"worker_mib": _mib(kib.get("VmRSS", 0)),
            **{k[3:].lower(): _mib(v) for k, v in kib.items() if k.startswith("Rss")}}


def retention_passes(log_path: str) -> tuple[int, int, float]:
    """Size or age retention passes that deleted calls, the calls deleted and the longest
    pass in seconds, from the gateway's log: a soak that claims to cover retention shows
    that it ran."""
    passes = calls = 0
    longest = 0.0
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                m = _RETENTION.search(line)
                if m:
                    passes += 1
                    calls += int(m.group(1))
                    longest = max(longest, float(m.group(2) or 0))
    except OSError:
        pass
    return passes, calls, longest


def allocator_stats(path: str, since: float) -> dict:
    """The last line that bench/allocstats/sitecustomize.py wrote for the worker at or after
    `since` (time.time()); {} when there is none."""
    last = {}
    try:
        with open(path) as f:
            for line in f:
                try:
                    x = json.loads(line)
                except ValueError:  # (a line being written)
                    continue
                if x.get("t", 0) >= since:
                    last = x
    except OSError:
        pass
    return last


def _loadgen(t, pt: Point, seconds: float) -> dict:
    import subprocess

    args = t.loadgen_args(pt) + ["--duration", str(seconds), "--warmup", "0"]
    cmd = ["taskset", "-c", str(LOAD_CORE), PY, "-m", "bench.loadgen", "--json", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-400:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def soak(seconds: float, log=print, rest_every: float = 0.0, traces_max_mib: float = TRACES_MAX_MIB,
         allocator: bool = False) -> dict:
    work = tempfile.mkdtemp(prefix="sidegate-soak-")
    mock_port = free_port()
    mock = start([PY, "-m", "bench.mock_upstream", "--port", str(mock_port)], LOAD_CORE, _base_env(),
                 open(os.path.join(work, "mock.log"), "w"))
    targets: dict = {}
    try:
        if not wait_port(mock_port, 20):
            raise SystemExit("mock upstream did not start")
        env = {"SIDEGATE_TRACES_MAX_BYTES": str(int(traces_max_mib * 1048576))} if traces_max_mib else {}
        alloc_dir = os.path.join(work, "allocstats")
        if allocator:
            os.makedirs(alloc_dir)
            env.update(PYTHONPATH=os.pathsep.join((ROOT, ALLOCSTATS)), SIDEGATE_BENCH_ALLOCSTATS=alloc_dir)
        start_targets(["sidegate-enforce"], mock_port, work, work, log, targets, sidegate_env=env)
        t = targets["sidegate-enforce"]
        time.sleep(1.0)
        wpid = worker_pid(t)
        out = {"seconds": seconds, "rest_every": rest_every, "traces_max_mib": traces_max_mib, "allocator": allocator,
               "procs": len(tree_pids(t.pid)), "idle_worker_mib": _mib(rss_kib(wpid)),
               "idle_tree_mib": _mib(tree_rss_kib(t.pid)), "samples": []}
        log(f"idle: worker {out['idle_worker_mib']} MiB, tree {out['idle_tree_mib']} MiB ({out['procs']} processes)")
        shapes = [Point("soak-c16", "tput", 16), Point("soak-s16", "tput", 16, stream=True)]
        t0 = time.time()
        k = 0
        requests = errors = 0
        rested = False
        out["rests"] = rests = []

        def rest() -> dict:
            # what the worker keeps at rest (in-flight requests and queued trace records
            # gone, freed heap trimmed when quiet)
            time.sleep(REST_S - 1.0)
            since = time.time()  # (the sampler writes once a second: its next line is from the rest's last second)
            time.sleep(1.0)
            passes, removed, longest = retention_passes(os.path.join(work, f"{t.name}.log"))  # (start_targets' layout)
            store = os.path.join(work, t.name, "traces.sqlite")
            r = {"t": round(time.time() - t0, 1), **rss_parts(wpid), "tree_mib": _mib(tree_rss_kib(t.pid)),
                 "requests": requests, "store_mib": _mib(sum(os.path.getsize(f) // 1024 for f in (store, store + "-wal")
                                                             if os.path.exists(f))),
                 "retention_passes": passes, "retention_calls": removed, "retention_longest_s": longest}
            if allocator:
                time.sleep(0.2)
                r.update({k: v for k, v in allocator_stats(os.path.join(alloc_dir, f"{wpid}.jsonl"), since).items()
                          if k != "t"})
            rests.append(r)
            log(f"  at rest after {r['t']:.0f}s: worker {r['worker_mib']} MiB (anon {r.get('anon')}, "
                f"file {r.get('file')}, shmem {r.get('shmem')}); trace store {r['store_mib']} MiB, "
                f"{passes} retention pass(es) so far"
                + (f"; pymalloc {r.get('py_arenas')} arenas ({r.get('py_in_use_mib')} MiB in use), glibc heaps "
                   f"{r.get('glibc_heap_mib')} MiB ({r.get('glibc_in_use_mib')} in use)" if allocator else ""))
            return r

        next_rest = None
        while time.time() - t0 < seconds:
            if not rested and time.time() - t0 >= min(60.0, seconds / 3) and k % 2 == 0:
                r = rest()  # after the first minute: once warm
                out["rest_warm_worker_mib"], out["rest_warm_tree_mib"] = r["worker_mib"], r["tree_mib"]
                rested = True
                next_rest = time.time() - t0 + rest_every if rest_every else None
            elif next_rest is not None and time.time() - t0 >= next_rest and k % 2 == 0 \
                    and seconds - (time.time() - t0) > SLICE_S:
                rest()  # --rest-every: a leak keeps growing from one rest to the next, warm-up levels off
                next_rest += rest_every
            pt = shapes[k % 2]
            r = _loadgen(t, pt, min(SLICE_S, max(1.0, seconds - (time.time() - t0))))
            k += 1
            requests += r.get("requests", 0) or 0
            errors += (r.get("errors", 0) or 0) + (1 if "error" in r else 0)
            s = {"t": round(time.time() - t0, 1), "shape": pt.name, "worker_mib": _mib(rss_kib(wpid)),
                 "tree_mib": _mib(tree_rss_kib(t.pid)), "rps": r.get("rps"), "errors": r.get("errors", r.get("error"))}
            out["samples"].append(s)
            log(f"  {s['t']:7.1f}s {s['shape']:9} worker {s['worker_mib']:6.1f} MiB  tree {s['tree_mib']:6.1f} MiB  "
                f"{s['rps'] or 0:8.0f} req/s  errors {s['errors']}")
        r = rest()
        out["after_worker_mib"], out["after_tree_mib"] = r["worker_mib"], r["tree_mib"]
        out["requests"], out["errors"] = requests, errors
        warm = out.get("rest_warm_worker_mib") or out["samples"][0]["worker_mib"]
        warm_tree = out.get("rest_warm_tree_mib") or out["samples"][0]["tree_mib"]
        out["warm_worker_mib"], out["end_worker_mib"] = warm, out["after_worker_mib"]
        out["growth_pct"] = round(100.0 * (out["after_worker_mib"] - warm) / warm, 1)
        out["tree_growth_pct"] = round(100.0 * (out["after_tree_mib"] - warm_tree) / warm_tree, 1)
        out["peak_worker_mib"] = max(s["worker_mib"] for s in out["samples"])
        # under load, like against like: each shape's last slice against its first after the first minute
        out["loaded"] = {}
        for shape in {s["shape"] for s in out["samples"]}:
            same = [s for s in out["samples"] if s["shape"] == shape and s["t"] >= min(60.0, seconds / 3)]
            if len(same) >= 2:
                out["loaded"][shape] = (same[0]["worker_mib"], same[-1]["worker_mib"])
        return out
    finally:
        for t in targets.values():
            if t.proc is not None:
                stop(t.proc)
        stop(mock)


def report(r: dict, machine: str) -> str:
    verdict = lambda ok: "**PASS**" if ok else "**FAIL**"  # noqa: E731
    last = (r.get("rests") or [{}])[-1]
    lines = [
        "# Memory soak (bench/soak.py)", "",
        f"{machine}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `python -m bench.soak --seconds {r['seconds']:.0f}"
        + (f" --rest-every {r['rest_every']:.0f}" if r.get("rest_every") else "")
        + (f" --traces-max-mib {r['traces_max_mib']:g}" if r.get("traces_max_mib") else " --traces-max-mib 0")
        + (" --allocator" if r.get("allocator") else "") + "`.",
        (f"Trace store limited to {r['traces_max_mib']:g} MiB (SIDEGATE_TRACES_MAX_BYTES), so size retention "
         "deletes batches every minute once it is reached." if r.get("traces_max_mib") else
         "Trace store at the shipped size limit (512 MiB)."),
        "One sidegate worker, enforce mode, traces on (the embedded store), pinned to core 0; mock upstream and load",
        "generator on core 1; 20 s slices alternating non-streaming calls and 64-event streams, 16 connections, closed",
        "loop, every response ending in a tool call the policy denies.", "",
        "| budget | limit | measured | verdict |", "|---|---|---|---|",
        f"| idle RSS per worker | ≤ 60 MiB | {r['idle_worker_mib']} MiB (whole tree: {r['idle_tree_mib']} MiB, "
        f"{r['procs']} processes) | {verdict(r['idle_worker_mib'] <= 60)} |",
        f"| RSS growth over the soak (worker at rest after the soak vs at rest after its first minute) | ≤ 5 % | "
        f"{r['growth_pct']:+.1f} % ({r['warm_worker_mib']} → {r['end_worker_mib']} MiB; tree "
        f"{r['tree_growth_pct']:+.1f} %) | {verdict(r['growth_pct'] <= 5)} |", "",
        "Under load, each shape's last slice against its first slice after the first minute (in-flight requests "
        "and queued trace records included, so it moves with the load): " + "; ".join(
            f"{k} {a} → {b} MiB ({100.0 * (b - a) / a:+.1f} %)" for k, (a, b) in sorted(r.get("loaded", {}).items()))
        + ".", "",
        f"{r['requests']:,} requests, {r['errors']} errors; {last.get('retention_passes', 0)} retention passes deleted "
        f"{last.get('retention_calls', 0):,} calls, the longest in {last.get('retention_longest_s', 0):.2f} s "
        f"(the store at the end: {last.get('store_mib', 0)} MiB); peak worker RSS {r['peak_worker_mib']} MiB, "
        f"{r['after_worker_mib']} MiB {REST_S:.0f} s after the load stopped.", "",
        "| t (s) | load | worker RSS MiB | tree RSS MiB | req/s |", "|---|---|---|---|---|",
    ]
    for s in r["samples"]:
        lines.append(f"| {s['t']:.0f} | {s['shape']} | {s['worker_mib']} | {s['tree_mib']} | {s['rps'] or 0:,.0f} |")
    rests = r.get("rests") or []
    if rests:
        lines += ["", f"The worker at rest (load paused {REST_S:.0f} s), its RSS split as /proc/<pid>/status gives it: "
                  "anonymous (the heap), file-backed (code and mapped files: the metrics files, SQLite's WAL index), "
                  "shared memory (such files on tmpfs); the trace store's files (the database and its WAL), and the retention passes that had deleted calls "
                  "by then (from the gateway's log).", "",
                  "| t (s) | requests so far | worker RSS MiB | anon | file | shmem | tree RSS MiB | trace store MiB "
                  "| retention passes (calls deleted) |", "|---|---|---|---|---|---|---|---|---|"]
        for x in rests:
            lines.append(f"| {x['t']:.0f} | {x['requests']:,} | {x['worker_mib']} | {x.get('anon', '–')} | {x.get('file', '–')} "
                         f"| {x.get('shmem', '–')} | {x['tree_mib']} | {x.get('store_mib', '–')} "
                         f"| {x.get('retention_passes', '–')} ({x.get('retention_calls', 0):,}) |")
    if r.get("allocator") and rests:
        lines += ["", "The worker's anonymous memory at the same rests, by allocator (bench/allocstats: read in the worker "
                  "in the rest's last second). pymalloc holds Python's objects of up to 512 bytes in 1 MiB arenas, and "
                  "frees an arena only once it is empty. glibc's heaps (all its arenas) hold the larger objects and the "
                  "C libraries' memory: SQLite, zstd, granian. The bytes in use rising means a leak. Arenas or heaps "
                  "growing while the bytes in use stay level means fragmentation: free space the allocator cannot return.", "",
                  "| t (s) | anon MiB | pymalloc arenas | pymalloc in use MiB | glibc heaps MiB | glibc in use MiB "
                  "| glibc free MiB | glibc mmap MiB |", "|---|---|---|---|---|---|---|---|"]
        for x in rests:
            lines.append(f"| {x['t']:.0f} | {x.get('anon_mib', '–')} | {x.get('py_arenas', '–')} | {x.get('py_in_use_mib', '–')} "
                         f"| {x.get('glibc_heap_mib', '–')} | {x.get('glibc_in_use_mib', '–')} | {x.get('glibc_free_mib', '–')} "
                         f"| {x.get('glibc_mmap_mib', '–')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--write", action="store_true", help="write bench/results-soak.md (default when --seconds >= 600)")
    ap.add_argument("--rest-every", type=float, default=0.0, metavar="SECONDS",
                    help="also pause the load and read the worker at rest every SECONDS (a leak grows from rest to rest)")
    ap.add_argument("--traces-max-mib", type=float, default=TRACES_MAX_MIB, metavar="MIB",
                    help=f"the trace store's size limit (default {TRACES_MAX_MIB:g}: retention runs within the soak; "
                         "0: the shipped limit)")
    ap.add_argument("--allocator", action="store_true",
                    help="also split the worker's heap by allocator at each rest (pymalloc and glibc: in use against held)")
    ap.add_argument("--out", default=RESULTS, help="where --write writes the report (default bench/results-soak.md)")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the gateway and mock on the way out
    r = soak(a.seconds, rest_every=a.rest_every, traces_max_mib=a.traces_max_mib, allocator=a.allocator)
    machine = f"{os.cpu_count()} CPU(s), Python {sys.version.split()[0]}"
    text = report(r, machine)
    print(text)
    if a.write or a.seconds >= 600:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench`: sidegate's overhead against the mock upstream directly, two relay
floors and LiteLLM, measured in one run, interleaved, on two cores.

  python -m bench                 # full run (< 10 min): bench/RESULTS.md + bench/chart.png
  python -m bench --quick         # < 2 min: bench/out/<run>/report.md (RESULTS.md untouched)
  python -m bench --no-litellm    # skip the incumbent (no install)
  python -m bench --targets direct,floor-asgi,sidegate-enforce --points c1,c16

Layout: every target under test runs pinned to core 0 (taskset; its children inherit it);
the mock upstream and the load generator run on core 1. CPU of a target = schedstat run
time of its whole process tree (sidegate: `sidegate serve` + granian worker + ops
process), read before and after each point and divided by every request (or streamed
event) completed in that window. "foreign CPU" = machine busy time not used by target +
mock + load generator (other tenants of the box), in % of both cores; a point over
--max-foreign is re-run once while the time budget allows, the least disturbed run kept.
"""
from __future__ import annotations

import argparse
import array
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from bench.procs import (ROOT, cmdline, free_port, machine_busy, pid_cpu_ns, rss_kib, start, stop, tree_cpu_ns,
                         tree_pids, tree_rss_kib, tree_thread_roles, wait_port)

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
GRANIAN = os.path.join(os.path.dirname(PY), "granian")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sidegate-bench")
LITELLM_VENV = os.path.join(CACHE, "litellm-venv")
LITELLM_VERSION = "1.106.2"  # pinned: 1.107.0 on PyPI was a compromised release
PYSPY_VENV = os.path.join(CACHE, "tools-venv")

TOOL = "delete_repo"
MARKER = "[SIDEGATE DENIED]"
EVENTS = 64
LONG_EVENTS = 512  # s16-long: the per-event slope (marginal CPU of one more relayed event)
PACE_MS = 20

TARGET_CORE, LOAD_CORE = 0, 1

ALL_TARGETS = ["direct", "floor-tcp", "floor-asgi", "sidegate-observe", "sidegate-enforce", "sidegate-notrace", "litellm"]
LABELS = {
    "direct": "direct (client to mock)",
    "floor-tcp": "floor: uvloop TCP splice",
    "floor-asgi": "floor: granian ASGI + gateway.upstream.Pool",
    "sidegate-observe": "sidegate, observe mode",
    "sidegate-enforce": "sidegate, enforce mode (denies the tool call)",
    "sidegate-notrace": "sidegate, enforce mode, SIDEGATE_TRACES=off (no trace store; token and latency metrics still counted)",
    "litellm": f"LiteLLM proxy {LITELLM_VERSION}",
}
# name -> (policy mode, traces on)
SIDEGATE = {"sidegate-observe": ("observe", True), "sidegate-enforce": ("enforce", True), "sidegate-notrace": ("enforce", False)}
# targets measured on some points only
TARGET_POINTS = {"sidegate-notrace": {"c1", "c16", "s16", "s16-long"}}
FLOOR = "floor-asgi"

# --------------------------------------------------------------------------------------
# points


class Point:
    """One load shape. kind: 'lat' (interleaved slices at 1 connection), 'tput' (fixed
    window), 'paced' (fixed number of streams per connection, second round recorded)."""

    def __init__(self, name, kind, conns, dialect="openai", stream=False, pace=0, tool=True, desc="", reps=None,
                 events=EVENTS):
        self.name, self.kind, self.conns, self.dialect = name, kind, conns, dialect
        self.stream, self.pace, self.tool, self.desc, self.reps = stream, pace, tool, desc, reps
        self.events = events


POINTS = {
    "c1": Point("c1", "lat", 1, desc="non-streaming, 1 connection (interleaved slices)"),
    "c16": Point("c16", "tput", 16, desc="non-streaming, 16 connections"),
    "c64": Point("c64", "tput", 64, desc="non-streaming, 64 connections", reps=1),
    "s16": Point("s16", "tput", 16, stream=True, desc="unpaced streams (whole stream in one upstream write), 16 concurrent"),
    "s16-long": Point("s16-long", "tput", 16, stream=True, reps=1, events=LONG_EVENTS,
                      desc=f"unpaced streams of {LONG_EVENTS} deltas, 16 concurrent (per-event slope against s16)"),
    "p100": Point("p100", "paced", 100, stream=True, pace=PACE_MS, desc="paced streams (20 ms/delta), 100 concurrent"),
    "p1000": Point("p1000", "paced", 1000, stream=True, pace=PACE_MS, desc="paced streams (20 ms/delta), 1000 concurrent"),
    # no tool call: what governance costs when there is nothing to decide
    "c1-notool": Point("c1-notool", "lat", 1, tool=False, desc="non-streaming, 1 connection, no tool call"),
    "s16-notool": Point("s16-notool", "tput", 16, stream=True, tool=False, desc="unpaced streams, no tool call"),
}
for _d in ("anthropic", "bedrock", "gemini"):
    POINTS[f"c16-{_d}"] = Point(f"c16-{_d}", "tput", 16, dialect=_d, desc=f"{_d}: non-streaming, 16 connections")
    POINTS[f"s16-{_d}"] = Point(f"s16-{_d}", "tput", 16, dialect=_d, stream=True, desc=f"{_d}: unpaced streams, 16 concurrent")

MAIN_POINTS = ["c1", "c16", "c64", "s16", "s16-long", "p100", "p1000"]
NOTOOL_POINTS = ["c1-notool", "s16-notool"]
NOTOOL_TARGETS = ["direct", "floor-asgi", "sidegate-observe", "sidegate-enforce"]
DIALECT_POINTS = [f"{k}-{d}" for d in ("anthropic", "bedrock", "gemini") for k in ("c16", "s16")]
DIALECT_TARGETS = ["direct", "floor-asgi", "sidegate-enforce"]

FULL = dict(slices=5, slice_s=1.0, dur=2.5, warm=0.4, reps=2, dial_dur=1.8, paced=["p100", "p1000"], notool=True,
            dialects=True, profile=True, budget=520.0, paced_max=20.0, retry=True, quiet_wait=45.0)
QUICK = dict(slices=2, slice_s=0.5, dur=1.2, warm=0.3, reps=1, dial_dur=1.0, paced=["p100"], notool=False,
             dialects=False, profile=False, budget=110.0, paced_max=10.0, retry=False, quiet_wait=0.0)


# --------------------------------------------------------------------------------------
# targets


class Target:
    def __init__(self, name):
        self.name = name
        self.port = None
        self.proc = None
        self.pid = None  # root of the process tree whose CPU is counted
        self.prefix = {"openai": "/v1", "anthropic": "/v1", "bedrock": "", "gemini": "/v1beta"}
        self.dialects = ("openai", "anthropic", "bedrock", "gemini")
        self.start_s = None
        self.argv = None
        self.rss = {}  # idle / peak / after, MiB

    def loadgen_args(self, pt: Point):
        a = ["--target", f"127.0.0.1:{self.port}", "--dialect", pt.dialect, "--prefix", self.prefix[pt.dialect],
             "--conns", str(pt.conns)]
        if pt.stream:
            a += ["--stream", "--events", str(pt.events)]
            if pt.pace:
                a += ["--pace-ms", str(pt.pace)]
        if pt.tool:
            a += ["--tool", TOOL, "--marker", MARKER]
        if self.name == "litellm":
            # LiteLLM does not forward client headers: one model entry per mock behaviour
            a += ["--model", "bench-" + ("tool" if pt.tool else "plain") + ("-paced" if pt.pace else ""),
                  "--no-event-check"]  # it re-encodes chunks and drops the usage chunk
        elif self.name in ("sidegate-enforce", "sidegate-notrace") and pt.tool:
            a += ["--no-event-check"]  # the denied call is rewritten into one marker chunk
        return a


def _mkdir(path):
    # `sidegate serve` recreates it, but its CLI imports prometheus_client's multiprocess
    # values first, which fail if the directory does not exist yet
    os.makedirs(path, exist_ok=True)
    return path


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def policy_text(mode: str) -> str:
    return (f"mode: {mode}\ndefault: allow\nrules:\n"
            f"  - {{name: no-repo-deletion, tool: '^{TOOL}$', decision: deny, reason: bench rule}}\n")


def litellm_config(mock_port: int) -> str:
    out = ["model_list:"]
    for name, hdrs in (("bench-plain", {}), ("bench-tool", {"x-mock-tool": TOOL}),
                       ("bench-tool-paced", {"x-mock-tool": TOOL, "x-mock-pace-ms": str(PACE_MS)}),
                       ("bench-plain-paced", {"x-mock-pace-ms": str(PACE_MS)})):
        out += [f"  - model_name: {name}", "    litellm_params:", "      model: openai/gpt-4.1",
                f"      api_base: http://127.0.0.1:{mock_port}/v1", "      api_key: sk-mock"]
        if hdrs:
            out.append("      extra_headers: " + json.dumps(hdrs))
    out += ["litellm_settings:", "  telemetry: false", "general_settings: {}"]
    return "\n".join(out) + "\n"


def ensure_litellm(log) -> str | None:
    """LiteLLM in its own venv under ~/.cache/sidegate-bench (installed once, pinned)."""
    exe = os.path.join(LITELLM_VENV, "bin", "litellm")
    pyexe = os.path.join(LITELLM_VENV, "bin", "python")
    if os.path.exists(exe):
        r = subprocess.run([pyexe, "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                           capture_output=True, text=True)
        if r.stdout.strip() == LITELLM_VERSION:
            return exe
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (once; ~1-2 min)")
    t = time.time()
    os.makedirs(CACHE, exist_ok=True)
    if not os.path.exists(pyexe):
        subprocess.run([sys.executable, "-m", "venv", LITELLM_VENV], check=True)
    r = subprocess.run([pyexe, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"litellm[proxy]=={LITELLM_VERSION}"], capture_output=True, text=True)
    if r.returncode != 0:
        log("litellm install failed:\n" + r.stderr[-2000:])
        return None
    log(f"litellm installed in {time.time() - t:.0f} s")
    return exe


def ensure_pyspy(log) -> str | None:
    exe = shutil.which("py-spy") or os.path.join(PYSPY_VENV, "bin", "py-spy")
    if os.path.exists(exe):
        return exe
    log(f"installing py-spy into {PYSPY_VENV} (once)")
    subprocess.run([sys.executable, "-m", "venv", PYSPY_VENV], check=True)
    r = subprocess.run([os.path.join(PYSPY_VENV, "bin", "pip"), "install", "-q", "--disable-pip-version-check", "py-spy"],
                       capture_output=True, text=True)
    return exe if r.returncode == 0 and os.path.exists(exe) else None


def _http_ok(url, timeout=1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _base_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDEGATE_", "AWS_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = ROOT
    return env


def start_targets(names, mock_port, work, logdir, log, targets, sidegate_env=None):
    """Start every target (registered in `targets` as it starts, so the caller can always stop it);
    `sidegate_env`: settings added to sidegate's environment (the soak's store limit)."""
    waits = []
    for name in names:
        t = Target(name)
        targets[name] = t
        if name == "direct":
            t.port = mock_port
            continue
        t.port = free_port()
        env = _base_env()
        lf = open(os.path.join(logdir, f"{name}.log"), "w")
        if name == "floor-tcp":
            argv = [PY, "-m", "bench.floors.tcp_splice", "--port", str(t.port), "--upstream", f"127.0.0.1:{mock_port}"]
            ready = ("port", t.port)
        elif name == "floor-asgi":
            env.update(SG_UPSTREAM=f"127.0.0.1:{mock_port}", SG_POOL="1024")
            argv = [GRANIAN, "--interface", "asgi", "--loop", "uvloop", "--http", "1", "--workers", "1",
                    "--runtime-threads", "1", "--no-ws", "--log-level", "warning", "--backlog", "4096",
                    "--host", "127.0.0.1", "--port", str(t.port), "bench.floors.relay_asgi_lean:app"]
            ready = ("port", t.port)
        elif name in SIDEGATE:
            mode, traces = SIDEGATE[name]
            d = os.path.join(work, name)
            os.makedirs(d, exist_ok=True)
            ops = free_port()
            env.update({
                "SIDEGATE_UPSTREAM_OPENAI": f"http://127.0.0.1:{mock_port}/v1",
                "SIDEGATE_UPSTREAM_ANTHROPIC": f"http://127.0.0.1:{mock_port}",
                "SIDEGATE_UPSTREAM_BEDROCK": f"http://127.0.0.1:{mock_port}",
                "SIDEGATE_UPSTREAM_GEMINI": f"http://127.0.0.1:{mock_port}",
                "SIDEGATE_POLICY": _write(os.path.join(d, f"{mode}.policy.yaml"), policy_text(mode)),
                "SIDEGATE_TRACES": os.path.join(d, "traces.sqlite") if traces else "off",
                "SIDEGATE_ESCALATIONS": os.path.join(d, "escalations.sqlite"),
                "PROMETHEUS_MULTIPROC_DIR": _mkdir(os.path.join(d, "metrics")),
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            })
            env.update(sidegate_env or {})
            argv = [PY, "-m", "gateway.cli", "serve", "--listen", f"127.0.0.1:{t.port}", "--ops-listen", f"127.0.0.1:{ops}"]
            t.prefix = {"openai": "/v1/openai", "anthropic": "/v1/anthropic/v1", "bedrock": "/v1/bedrock",
                        "gemini": "/v1/gemini/v1beta"}
            ready = ("url", f"http://127.0.0.1:{ops}/readyz")
        elif name == "litellm":
            exe = ensure_litellm(log)
            if exe is None:
                log("litellm unavailable: skipped")
                del targets[name]
                continue
            cfg = _write(os.path.join(work, "litellm.yaml"), litellm_config(mock_port))
            env.update(LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",  # no auth, no DB: its cheapest setup
                       LITELLM_LOCAL_MODEL_COST_MAP="True",  # no cost-map download at start-up
                       LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR")
            env.pop("PYTHONPATH", None)
            env.pop("DATABASE_URL", None)
            argv = [exe, "--config", cfg, "--host", "127.0.0.1", "--port", str(t.port), "--num_workers", "1"]
            t.dialects = ("openai",)
            ready = ("url", f"http://127.0.0.1:{t.port}/health/liveliness")
        else:
            raise SystemExit(f"unknown target {name}")
        t.argv = argv
        t.proc = start(argv, TARGET_CORE, env, lf, cwd=work if name == "litellm" else ROOT)
        t.pid = t.proc.pid
        waits.append((t, ready, time.time()))
    deadline = time.time() + 90
    for t, (kind, what), t0 in waits:
        while True:
            if t.proc.poll() is not None:
                raise SystemExit(f"{t.name} exited with {t.proc.returncode}; see {logdir}/{t.name}.log")
            if (kind == "port" and wait_port(what, 0.1)) or (kind == "url" and _http_ok(what, 0.5)):
                t.start_s = time.time() - t0
                break
            if time.time() > deadline:
                raise SystemExit(f"{t.name} not ready in 90 s; see {logdir}/{t.name}.log")
            time.sleep(0.1)
    return targets


# --------------------------------------------------------------------------------------
# measuring


class RssSampler(threading.Thread):
    """Peak RSS of the process tree under test, sampled every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.pid = None
        self.peak = {}
        self.name = None
        self.stop_ev = threading.Event()

    def watch(self, name, pid):
        self.name, self.pid = name, pid

    def run(self):
        while not self.stop_ev.wait(0.2):
            name, pid = self.name, self.pid
            if pid:
                v = tree_rss_kib(pid)
                if v > self.peak.get(name, 0):
                    self.peak[name] = v


class Runner:
    def __init__(self, a, cfg, mock, targets, outdir, log):
        self.a, self.cfg, self.mock, self.targets, self.outdir, self.log = a, cfg, mock, targets, outdir, log
        self.results: dict[str, dict[str, list]] = {}
        self.t0 = time.time()
        self.sampler = RssSampler()
        self.sampler.start()
        self.retries = 0
        self.quiet_left = cfg.get("quiet_wait", 0.0)

    def elapsed(self):
        return time.time() - self.t0

    def wait_quiet(self, max_wait=1.0, threshold=25.0):
        """Wait (bounded, from a run-wide allowance) until other tenants leave the box: busy CPU
        of the whole machine over 0.2 s, while our processes are idle, under `threshold` %."""
        if self.quiet_left <= 0:
            return None
        t_end = time.time() + min(max_wait, self.quiet_left)
        t0 = time.time()
        while True:
            b0 = machine_busy()
            time.sleep(0.15)
            b1 = machine_busy()
            busy = 100.0 * (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
            if busy < threshold or time.time() >= t_end:
                break
        self.quiet_left = max(0.0, self.quiet_left - (time.time() - t0 - 0.15))
        return busy

    def loadgen(self, args, timeout):
        cmd = ["taskset", "-c", str(LOAD_CORE), PY, "-m", "bench.loadgen", "--json", *args]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            return {"error": (r.stderr or r.stdout)[-800:]}
        return json.loads(r.stdout.strip().splitlines()[-1])

    def measured(self, t: Target, args, timeout):
        """Run one loadgen with CPU accounting around it."""
        pid = t.pid
        self.sampler.watch(t.name, pid)
        roles0 = tree_thread_roles(pid) if pid else {}
        c0 = tree_cpu_ns(pid) if pid else 0
        m0 = tree_cpu_ns(self.mock.pid)
        b0 = machine_busy()
        l0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.time()
        r = self.loadgen(args, timeout)
        wall = time.time() - w0
        l1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        c1 = tree_cpu_ns(pid) if pid else 0
        roles1 = tree_thread_roles(pid) if pid else {}
        m1 = tree_cpu_ns(self.mock.pid)
        b1 = machine_busy()
        self.sampler.watch(None, None)
        hz = os.sysconf("SC_CLK_TCK")
        busy_s = (b1[0] - b0[0]) / hz
        span_s = (b1[1] - b0[1]) / hz
        lg_s = (l1.ru_utime + l1.ru_stime) - (l0.ru_utime + l0.ru_stime)
        tgt_s = (c1 - c0) / 1e9
        mock_s = (m1 - m0) / 1e9
        r.update(wall_total_s=round(wall, 3), target_cpu_s=tgt_s if pid else None, mock_cpu_s=mock_s, loadgen_cpu_s=lg_s,
                 foreign_cpu_pct=round(max(0.0, 100.0 * (busy_s - tgt_s - mock_s - lg_s) / max(span_s, 1e-9)), 1),
                 core1_busy_pct=round(100.0 * (mock_s + lg_s) / max(wall, 1e-9), 1))
        if pid:
            r["rss_mib"] = round(tree_rss_kib(pid) / 1024, 1)
            r["roles_cpu_s"] = {k: (roles1.get(k, 0) - roles0.get(k, 0)) / 1e9 for k in roles1}
        return r

    def add(self, tname, pname, r):
        self.results.setdefault(tname, {}).setdefault(pname, []).append(r)

    def _per_unit(self, r):
        done = r.get("completed_all") or 0
        if r.get("target_cpu_s") is not None and done:
            r["cpu_us_per_req"] = r["target_cpu_s"] * 1e6 / done
            if r.get("roles_cpu_s"):
                r["roles_us_per_req"] = {k: v * 1e6 / done for k, v in r["roles_cpu_s"].items()}
            ev = r.get("completed_events_all")
            if ev:
                r["cpu_us_per_event"] = r["target_cpu_s"] * 1e6 / ev
        if done and r.get("mock_cpu_s") is not None:
            r["mock_us_per_req"] = r["mock_cpu_s"] * 1e6 / done
            r["loadgen_us_per_req"] = r["loadgen_cpu_s"] * 1e6 / done

    # -- one fixed-window or paced point, with a retry when other tenants were busy
    def point(self, t: Target, pt: Point, rep: int, dur: float | None = None):
        cfg = self.cfg
        args = t.loadgen_args(pt)
        if pt.kind == "paced":
            ramp = PACE_MS * (EVENTS + 1) / 1000.0
            # two streams per connection, the second recorded; LiteLLM cannot finish two rounds within
            # the bound, so it gets one (recorded; its upstream connections start cold)
            rounds = ("1", "0") if t.name == "litellm" else ("2", "1")
            args += ["--rounds", rounds[0], "--record-from", rounds[1], "--ramp", f"{ramp:.2f}", "--max-time", str(cfg["paced_max"])]
            timeout = cfg["paced_max"] + 30
        else:
            d = dur or cfg["dur"]
            args += ["--duration", str(d), "--warmup", str(cfg["warm"]), "--grace", "10"]
            timeout = d + cfg["warm"] + 40
        best = None
        for attempt in range(2):
            self.wait_quiet(1.5)
            r = self.measured(t, args, timeout)
            r["attempt"] = attempt + 1
            self._per_unit(r)
            if best is None or r.get("foreign_cpu_pct", 0) < best.get("foreign_cpu_pct", 0):
                best = r
            if (not cfg["retry"] or r.get("foreign_cpu_pct", 0) <= self.a.max_foreign or "error" in r
                    or self.elapsed() > cfg["budget"] * 0.6):
                break
            self.retries += 1
        best.update(target=t.name, point=pt.name, rep=rep)
        self.add(t.name, pt.name, best)
        self.log(_oneline(best))
        return best

    # -- interleaved slices at one connection
    def interleaved(self, names, pt: Point):
        cfg = self.cfg
        acc = {n: [] for n in names}
        for s in range(cfg["slices"]):
            order = names if s % 2 == 0 else list(reversed(names))
            for n in order:
                t = self.targets[n]
                fn = os.path.join(self.outdir, "samples.bin")
                args = t.loadgen_args(pt) + ["--duration", str(cfg["slice_s"]), "--warmup", "0.2", "--samples-out", fn]
                self.wait_quiet(1.0)
                r = self.measured(t, args, cfg["slice_s"] + 40)
                self._per_unit(r)
                if "error" not in r:
                    a = array.array("d")
                    with open(fn, "rb") as f:
                        a.frombytes(f.read())
                    r["_samples"] = a
                acc[n].append(r)
        for n in names:
            rs = [r for r in acc[n] if "error" not in r]
            lat = sorted(x for r in rs for x in r["_samples"])
            merged = {"target": n, "point": pt.name, "rep": 1, "slices": len(acc[n]),
                      "errors": sum(r.get("errors", 0) for r in rs) + (len(acc[n]) - len(rs)),
                      "requests": len(lat)}
            if rs:
                el = sum(r["elapsed_s"] for r in rs)
                merged.update(
                    rps=len(lat) / el if el else None,
                    p50_ms=_pct(lat, 50) * 1e3, p90_ms=_pct(lat, 90) * 1e3, p99_ms=_pct(lat, 99) * 1e3,
                    foreign_cpu_pct=statistics.median(r["foreign_cpu_pct"] for r in rs),
                    core1_busy_pct=statistics.median(r["core1_busy_pct"] for r in rs),
                    marked=sum(r.get("marked", 0) for r in rs),
                    slice_p50_ms=[r["p50_ms"] for r in rs],
                    slice_foreign_cpu_pct=[r["foreign_cpu_pct"] for r in rs],
                )
                quiet = quiet_slices(rs)
                qlat = sorted(x for r in quiet for x in r["_samples"])
                merged.update(p50_ms_quiet=_pct(qlat, 50) * 1e3, p99_ms_quiet=_pct(qlat, 99) * 1e3,
                              foreign_cpu_pct_quiet=statistics.median(r["foreign_cpu_pct"] for r in quiet))
                tgt = [r["target_cpu_s"] for r in rs if r.get("target_cpu_s") is not None]
                done = sum(r["completed_all"] for r in rs)
                if tgt and done:
                    merged["target_cpu_s"] = sum(tgt)
                    merged["cpu_us_per_req"] = sum(tgt) * 1e6 / done
                    roles = {}
                    for r in rs:
                        for k, v in (r.get("roles_cpu_s") or {}).items():
                            roles[k] = roles.get(k, 0.0) + v
                    merged["roles_us_per_req"] = {k: v * 1e6 / done for k, v in roles.items()}
                    qdone = sum(r["completed_all"] for r in quiet)
                    if qdone:
                        merged["cpu_us_per_req_quiet"] = sum(r["target_cpu_s"] for r in quiet) * 1e6 / qdone
                merged["mock_us_per_req"] = sum(r["mock_cpu_s"] for r in rs) * 1e6 / max(done, 1)
                merged["loadgen_us_per_req"] = sum(r["loadgen_cpu_s"] for r in rs) * 1e6 / max(done, 1)
                merged["rss_mib"] = rs[-1].get("rss_mib")
            self.add(n, pt.name, merged)
            self.log(_oneline(merged))


QUIET_MARGIN_PCT = 1.0  # slices this close to the quiet half's worst count as just as quiet


def quiet_slices(rs: list[dict]) -> list[dict]:
    """The slices where other tenants used the box least: the less disturbed half, and with
    it every other slice no more disturbed than that half's worst (+ QUIET_MARGIN_PCT). On
    a quiet box that is all of them: a half picked among equals would only halve the
    samples (and pick by order)."""
    ranked = sorted(rs, key=lambda r: r["foreign_cpu_pct"])
    half = ranked[:max(1, (len(rs) + 1) // 2)]
    worst = half[-1]["foreign_cpu_pct"] + QUIET_MARGIN_PCT
    return half + [r for r in ranked[len(half):] if r["foreign_cpu_pct"] <= worst]


def _pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def _oneline(r):
    keys = ("target", "point", "rep", "rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms", "gap_p99_ms", "gap_max_ms",
            "cpu_us_per_req", "cpu_us_per_event", "errors", "bad_streams", "marked", "foreign_cpu_pct", "core1_busy_pct")
    parts = []
    for k in keys:
        v = r.get(k)
        if v is None:
            continue
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    if r.get("error"):
        parts.append("ERROR " + r["error"][-300:].replace("\n", " | "))
    if r.get("error_kinds"):
        parts.append(f"error_kinds={r['error_kinds']}")
    return "  " + " ".join(parts)


# --------------------------------------------------------------------------------------
# ceiling, warm-up, profile


def ceiling(runner: Runner, mock_port):
    """The mock + load generator alone, both on core 1."""
    t = runner.targets["direct"]
    out = {}
    for name, args in (("c64", ["--conns", "64"]),
                       ("s64", ["--conns", "64", "--stream", "--events", str(EVENTS), "--tool", TOOL])):
        r = runner.measured(t, ["--target", f"127.0.0.1:{mock_port}", *args, "--duration", "1.5", "--warmup", "0.3"], 60)
        runner._per_unit(r)
        out[name] = r
    return out


def warm_up(runner: Runner, names, dialects):
    for n in names:
        t = runner.targets[n]
        for d in [d for d in t.dialects if d in dialects]:
            for stream in (False, True):
                pt = Point("warm", "tput", 4, dialect=d, stream=stream)
                args = t.loadgen_args(pt) + ["--duration", "0.4", "--warmup", "0", "--no-event-check"]
                r = runner.loadgen(args, 60)
                if "error" in r or r.get("errors"):
                    runner.log(f"  warm-up {n} {d} stream={stream}: {r.get('error') or r.get('error_kinds')}")
            if n == "litellm":
                break


def worker_pid(t: Target):
    """The granian worker of a target: the busiest process of its tree below its root (the
    root is granian's supervisor, or a single-process target itself), sidegate's ops listener
    left out. (The busiest of the whole tree was the supervisor now and then, just after
    start-up: its imports had used more CPU than the worker yet.)"""
    best, cpu = t.pid, -1
    for p in tree_pids(t.pid)[1:]:
        if "gateway.ops" in cmdline(p):
            continue
        c = pid_cpu_ns(p)
        if c > cpu:
            best, cpu = p, c
    return best


def profile(runner: Runner, tname, pyspy, seconds=4):
    """py-spy (on core 1) samples the sidegate worker while the load generator drives it."""
    from bench.hotspots import parse_collapsed

    t = runner.targets[tname]
    wpid = worker_pid(t)
    out = {}
    for pname in ("c16", "s16", "p1000"):
        pt = POINTS[pname]
        raw = os.path.join(runner.outdir, f"pyspy-{tname}-{pname}.txt")
        secs = seconds
        if pt.kind == "paced":  # two rounds of 1000 streams (~4 s; the first opens the pool's connections)
            secs += 2
            args = ["--rounds", "2", "--ramp", f"{PACE_MS * (EVENTS + 1) / 1000.0:.2f}", "--max-time", str(secs)]
        else:
            args = ["--duration", str(seconds), "--warmup", "0"]
        spy = subprocess.Popen(["taskset", "-c", str(LOAD_CORE), pyspy, "record", "-p", str(wpid), "-r", "400", "-d",
                                str(int(secs)), "-f", "raw", "-o", raw, "--nonblocking", "--threads"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.8)  # py-spy attaches
        runner.loadgen(t.loadgen_args(pt) + args, secs + 40)
        try:
            _, err = spy.communicate(timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if os.path.exists(raw):
            out[pname] = parse_collapsed(raw)
        else:
            out[pname] = {"error": (err or b"").decode(errors="replace")[-500:]}
    return out


# --------------------------------------------------------------------------------------
# environment facts


def versions(litellm_ok):
    import importlib.metadata as md

    v = {"python": platform.python_version(), "kernel": platform.release()}
    for pkg in ("granian", "uvloop", "httptools", "msgspec", "prometheus-client", "matplotlib"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = "-"
    if litellm_ok:
        r = subprocess.run([os.path.join(LITELLM_VENV, "bin", "python"), "-c",
                            "import importlib.metadata as m; print(m.version('litellm'), m.version('uvicorn'), m.version('fastapi'))"],
                           capture_output=True, text=True)
        parts = r.stdout.split()
        if len(parts) == 3:
            v["litellm"], v["litellm uvicorn"], v["litellm fastapi"] = parts
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = [ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")]
        v["cpu"] = (model[0] if model else "?") + f", {os.cpu_count()} CPUs"
    except OSError:
        v["cpu"] = f"{os.cpu_count()} CPUs"
    try:
        with open("/proc/meminfo") as f:
            v["memory"] = f"{int(f.readline().split()[1]) // 1024 // 1024} GiB"
    except OSError:
        pass
    g = lambda *c: subprocess.run(["git", *c], cwd=ROOT, capture_output=True, text=True).stdout  # noqa: E731
    v["git"] = g("rev-parse", "--short", "HEAD").strip() + " (" + g("log", "-1", "--format=%s").strip()[:80] + ")"
    dirty = [ln[3:] for ln in g("status", "--porcelain").splitlines() if ln[:2] != "??" and not ln[3:].startswith("bench/")]
    v["uncommitted outside bench/"] = ", ".join(dirty) or "none"
    v["tracing wired in relay"] = _tracing_wired()
    return v


def _tracing_wired() -> str:
    try:
        with open(os.path.join(ROOT, "gateway", "relay.py")) as f:
            src = f.read()
    except OSError:
        return "?"
    return "yes" if any(k in src for k in ("from .traces", "from gateway.traces", "import traces", "recorder")) else "no"


# --------------------------------------------------------------------------------------
# main


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (< 2 min); writes bench/out/<run>/report.md only")
    ap.add_argument("--no-litellm", action="store_true", help="do not install or run LiteLLM")
    ap.add_argument("--targets", default=None, help="comma list, default: " + ",".join(ALL_TARGETS))
    ap.add_argument("--points", default=None, help="comma list of main points (default: all of the mode)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--max-foreign", type=float, default=10.0, help="re-run a point once when other tenants used more than this %% of the box")
    ap.add_argument("--write-results", action="store_true", help="also write bench/RESULTS.md + bench/chart.png (default for a full run)")
    ap.add_argument("--no-write-results", action="store_true")
    ap.add_argument("--out", default=None, help="output directory (default bench/out/<timestamp>)")
    ap.add_argument("--report-only", metavar="RUN_JSON", help="re-render the report of a saved run.json")
    a = ap.parse_args(argv)

    from bench import report

    if a.report_only:
        with open(a.report_only) as f:
            run = json.load(f)
        outdir = os.path.dirname(os.path.abspath(a.report_only))
        report.write_all(run, outdir, write_results=a.write_results)
        return 0

    cfg = dict(QUICK if a.quick else FULL)
    mode = "quick" if a.quick else "full"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = a.out or os.path.join(HERE, "out", f"{stamp}-{mode}")
    os.makedirs(outdir, exist_ok=True)
    logf = open(os.path.join(outdir, "log.txt"), "w")

    def log(msg):
        line = f"[{time.time() - t_start:6.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    t_start = time.time()
    names = a.targets.split(",") if a.targets else [n for n in ALL_TARGETS if not (a.quick and n == "sidegate-notrace")]
    if a.no_litellm and "litellm" in names:
        names.remove("litellm")
    if "direct" not in names:
        names.insert(0, "direct")
    main_points = a.points.split(",") if a.points else [p for p in MAIN_POINTS if (POINTS[p].kind != "paced" or p in cfg["paced"])
                                                        and (p != "s16-long" or not a.quick)]
    log(f"python -m bench ({mode}): targets {', '.join(names)}; points {', '.join(main_points)}; output {outdir}")

    work = tempfile.mkdtemp(prefix="sidegate-bench-")
    logdir = os.path.join(outdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    env = _base_env()
    mock_port = free_port()
    mock = start([PY, "-m", "bench.mock_upstream", "--port", str(mock_port)], LOAD_CORE, env,
                 open(os.path.join(logdir, "mock.log"), "w"))
    targets = {}
    run = {"mode": mode, "cfg": cfg, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
           "command": "python -m bench" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")}
    try:
        if not wait_port(mock_port, 10):
            raise SystemExit("mock did not start")
        start_targets(names, mock_port, work, logdir, log, targets)
        names = [n for n in names if n in targets]
        log("started: " + ", ".join(f"{n} {targets[n].start_s:.1f}s" for n in names if targets[n].start_s is not None))
        runner = Runner(a, cfg, mock, targets, outdir, log)

        log("ceiling: load generator -> mock, both on core 1")
        run["ceiling"] = ceiling(runner, mock_port)
        for k, r in run["ceiling"].items():
            log(f"  mock ceiling {k}: {r.get('rps')} /s, p99 {r.get('p99_ms')} ms, core 1 busy {r.get('core1_busy_pct')} %, "
                f"mock {r.get('mock_us_per_req', 0):.1f} us + loadgen {r.get('loadgen_us_per_req', 0):.1f} us per request"
                + (f", {r['rps'] * r['events_min']:.0f} events/s" if r.get("events_min") else ""))

        dialects = {"openai"} | ({"anthropic", "bedrock", "gemini"} if cfg["dialects"] and not a.points else set())
        warm_up(runner, [n for n in names if n != "direct"], dialects)
        time.sleep(0.5)
        for n in names:
            if targets[n].pid:
                targets[n].rss["idle"] = round(tree_rss_kib(targets[n].pid) / 1024, 1)
                targets[n].rss["procs"] = len(tree_pids(targets[n].pid))
                if n in SIDEGATE:  # the budget is per worker: the granian worker process alone
                    targets[n].rss["idle_worker"] = round(rss_kib(worker_pid(targets[n])) / 1024, 1)

        # main matrix
        for pname in main_points:
            pt = POINTS[pname]
            log(f"{pname}: {pt.desc}")
            here = [n for n in names if pname in TARGET_POINTS.get(n, {pname})]
            if pt.kind == "lat":
                runner.interleaved(here, pt)
                continue
            reps = (pt.reps or cfg["reps"]) if pt.kind == "tput" else 1
            for rep in range(reps):
                order = here if rep % 2 == 0 else list(reversed(here))
                for n in order:
                    runner.point(targets[n], pt, rep + 1)
        # governance with nothing to decide
        if cfg["notool"] and not a.points:
            sub = [n for n in NOTOOL_TARGETS if n in names]
            for pname in NOTOOL_POINTS:
                pt = POINTS[pname]
                log(f"{pname}: {pt.desc}")
                if pt.kind == "lat":
                    runner.interleaved(sub, pt)
                else:
                    for n in sub:
                        runner.point(targets[n], pt, 1)
        # the other dialects
        if cfg["dialects"] and not a.points:
            sub = [n for n in DIALECT_TARGETS if n in names]
            for pname in DIALECT_POINTS:
                pt = POINTS[pname]
                log(f"{pname}: {pt.desc}")
                for n in sub:
                    runner.point(targets[n], pt, 1, dur=cfg["dial_dur"])
        # profile
        run["profile"] = {}
        prof_targets = [n for n in ("sidegate-enforce", "sidegate-notrace") if n in names]
        if cfg["profile"] and not a.no_profile and prof_targets:
            pyspy = ensure_pyspy(log)
            for n in prof_targets if pyspy else []:
                log(f"profile: py-spy on the {n} worker (c16, s16, p1000)")
                try:
                    run["profile"][n] = profile(runner, n, pyspy)
                except Exception as e:  # profiling is a bonus: never lose the run for it
                    log(f"  profile failed: {e!r}")
        time.sleep(2.0)
        for n in names:
            t = targets[n]
            if t.pid:
                t.rss["peak"] = round(max(runner.sampler.peak.get(n, 0) / 1024, t.rss.get("idle", 0)), 1)
                t.rss["after"] = round(tree_rss_kib(t.pid) / 1024, 1)
        run["results"] = runner.results
        run["retries"] = runner.retries
    finally:
        for t in targets.values():
            if t.proc is not None:
                stop(t.proc)
        stop(mock)
        shutil.rmtree(work, ignore_errors=True)
    run["targets"] = {n: {"label": LABELS[n], "port": t.port, "start_s": t.start_s, "rss": t.rss,
                          "argv": [os.path.relpath(x, ROOT) if isinstance(x, str) and x.startswith(ROOT) else x for x in (t.argv or [])]}
                      for n, t in targets.items()}
    run["points"] = {k: vars(p) for k, p in POINTS.items()}
    run["versions"] = versions("litellm" in targets)
    run["wall_s"] = round(time.time() - t_start, 1)
    with open(os.path.join(outdir, "run.json"), "w") as f:
        json.dump(run, f, indent=1, default=str)
    write = (a.write_results or not a.quick) and not a.no_write_results
    paths = report.write_all(run, outdir, write_results=write)
    log(f"done in {run['wall_s']:.0f} s: " + ", ".join(paths))
    print(report.summary_text(run))
    return 0

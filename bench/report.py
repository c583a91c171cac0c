"""Render a `python -m bench` run: markdown report, bench/RESULTS.md, chart PNG, console summary."""
from __future__ import annotations

import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
CHART = os.path.join(HERE, "chart.png")
NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"

BUDGET_ADDED_P50_MS = 0.25
BUDGET_CPU_REQ_US = 150.0
BUDGET_CPU_EVENT_US = 5.0
BUDGET_ADDED_P99_MS = 0.6
BUDGET_FLOOR_RATIO_REQ = 1.5
BUDGET_FLOOR_RATIO_EVENT = 1.2
BUDGET_RPS_16 = 6000
BUDGET_ENFORCE_EXTRA_US = 100.0
BUDGET_GAP_MS = 40.0
BUDGET_RSS_MIB = 60.0
SIDEGATE = ("sidegate-observe", "sidegate-enforce", "sidegate-notrace")
FLOOR = "floor-asgi"
ORDER = ["direct", "floor-tcp", "floor-asgi", "sidegate-observe", "sidegate-enforce", "sidegate-notrace", "litellm"]
SHORT = {"direct": "direct", "floor-tcp": "floor TCP splice", "floor-asgi": "floor granian+Pool",
         "sidegate-observe": "sidegate observe", "sidegate-enforce": "sidegate enforce",
         "sidegate-notrace": "sidegate enforce, traces off", "litellm": "LiteLLM"}


# --------------------------------------------------------------------------------------
# access


def cell(run, t, p):
    return run.get("results", {}).get(t, {}).get(p) or []


def med(run, t, p, k):
    vs = [r[k] for r in cell(run, t, p) if isinstance(r.get(k), (int, float))]
    return statistics.median(vs) if vs else None


def allv(run, t, p, k):
    return [r.get(k) for r in cell(run, t, p)]


def total(run, t, p, k):
    vs = [r.get(k) or 0 for r in cell(run, t, p)]
    return sum(vs) if vs else None


def f(v, nd=2, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000 and nd <= 2:
            return f"{v:,.0f}{unit}"
        return f"{v:.{nd}f}{unit}"
    return f"{v}{unit}"


def ratio(a, b, nd=1):
    if a is None or b is None or not b:
        return "–"
    q = a / b
    if q < 0.1:
        return f"{q:.3f}×"
    return f"{q:.{nd}f}×"


def reps(run, t, p, k, nd=0):
    vs = allv(run, t, p, k)
    if len(vs) <= 1:
        return f(vs[0], nd) if vs else "–"
    return " / ".join(f(v, nd) for v in vs)


def targets(run):
    return [t for t in ORDER if t in run.get("results", {})]


# --------------------------------------------------------------------------------------
# budgets


def quiet(run, t, p, k):
    """The value from the least disturbed rep (lowest foreign CPU); for the interleaved c1
    CPU figure, the half of the slices with the least foreign CPU."""
    rs = [r for r in cell(run, t, p) if isinstance(r.get(k), (int, float))]
    if not rs:
        return None
    if k == "cpu_us_per_req" and rs[0].get("cpu_us_per_req_quiet") is not None:
        return rs[0]["cpu_us_per_req_quiet"]
    return min(rs, key=lambda r: r.get("foreign_cpu_pct", 0))[k]


def event_slope(run, t):
    """Marginal CPU per relayed event: (CPU per long stream - CPU per s16 stream) / (event difference)."""
    a, b = quiet(run, t, "s16", "cpu_us_per_req"), quiet(run, t, "s16-long", "cpu_us_per_req")
    ea, eb = med(run, t, "s16", "events_min"), med(run, t, "s16-long", "events_min")
    if None in (a, b, ea, eb) or eb <= ea:
        return None
    return (b - a) / (eb - ea)


def budget_rows(run):
    """[(what, limit text, unit, decimals, {target: value}, limit, higher_is_better), ...]: every
    budget of issue #6 that one run measures (the soak is bench/soak.py)."""
    rows = []
    key = "p50_ms_quiet" if med(run, "direct", "c1", "p50_ms_quiet") is not None else "p50_ms"
    key99 = "p99_ms_quiet" if med(run, "direct", "c1", "p99_ms_quiet") is not None else "p99_ms"
    d50, d99 = med(run, "direct", "c1", key), med(run, "direct", "c1", key99)

    def added(t, k, d):
        v = med(run, t, "c1", k)
        return None if v is None or d is None else v - d

    def over_floor(p, k):
        fv = quiet(run, FLOOR, p, k)
        out = {}
        for t in ORDER:
            v = quiet(run, t, p, k)
            out[t] = None if v is None or not fv or t in ("direct", FLOOR) else v / fv
        return out

    rows.append(("added latency, p50 at 1 connection", f"≤ {BUDGET_ADDED_P50_MS} ms", "ms", 3,
                 {t: added(t, key, d50) for t in ORDER}, BUDGET_ADDED_P50_MS, False))
    rows.append(("added latency, p99 at 1 connection", f"≤ {BUDGET_ADDED_P99_MS} ms", "ms", 3,
                 {t: added(t, key99, d99) for t in ORDER}, BUDGET_ADDED_P99_MS, False))
    rows.append(("CPU per request at 1 connection (not itself a budget: the floor's own cost, for the ratio below)",
                 "–", "µs", 0, {t: quiet(run, t, "c1", "cpu_us_per_req") for t in ORDER}, None, False))
    rows.append(("CPU per request at 1 connection ÷ the floor relay's", f"≤ {BUDGET_FLOOR_RATIO_REQ}×", "×", 2,
                 over_floor("c1", "cpu_us_per_req"), BUDGET_FLOOR_RATIO_REQ, False))
    rows.append(("CPU per request at 16 connections", f"≤ {BUDGET_CPU_REQ_US:.0f} µs", "µs", 0,
                 {t: quiet(run, t, "c16", "cpu_us_per_req") for t in ORDER}, BUDGET_CPU_REQ_US, False))
    rows.append(("CPU per request at 16 connections ÷ the floor relay's", f"≤ {BUDGET_FLOOR_RATIO_REQ}×", "×", 2,
                 over_floor("c16", "cpu_us_per_req"), BUDGET_FLOOR_RATIO_REQ, False))
    rows.append(("requests/s at 16 connections", f"≥ {BUDGET_RPS_16:,}", "req/s", 0,
                 {t: med(run, t, "c16", "rps") for t in ORDER}, BUDGET_RPS_16, True))
    rows.append(("CPU per relayed stream event, all-in (unpaced batched 71-event streams, 16 concurrent; includes each "
                 "stream's request cost)", f"≤ {BUDGET_CPU_EVENT_US:.0f} µs", "µs", 2,
                 {t: quiet(run, t, "s16", "cpu_us_per_event") for t in ORDER}, BUDGET_CPU_EVENT_US, False))
    rows.append(("CPU per relayed stream event ÷ the floor relay's", f"≤ {BUDGET_FLOOR_RATIO_EVENT}×", "×", 2,
                 over_floor("s16", "cpu_us_per_event"), BUDGET_FLOOR_RATIO_EVENT, False))
    if any(cell(run, t, "s16-notool") for t in ORDER):
        rows.append(("CPU per passthrough stream event, all-in (the same streams without a tool call: nothing to "
                     "decide, chunks pass untouched)", f"≤ {BUDGET_CPU_EVENT_US:.0f} µs", "µs", 2,
                     {t: quiet(run, t, "s16-notool", "cpu_us_per_event") for t in ORDER}, BUDGET_CPU_EVENT_US, False))
        rows.append(("CPU per passthrough stream event ÷ the floor relay's", f"≤ {BUDGET_FLOOR_RATIO_EVENT}×", "×", 2,
                     over_floor("s16-notool", "cpu_us_per_event"), BUDGET_FLOOR_RATIO_EVENT, False))
    slope = {t: event_slope(run, t) for t in ORDER}
    if any(v is not None for v in slope.values()):
        rows.append(("CPU per additional relayed event (slope between 71- and 519-event streams)",
                     f"≤ {BUDGET_CPU_EVENT_US:.0f} µs", "µs", 2, slope, BUDGET_CPU_EVENT_US, False))
    obs = quiet(run, "sidegate-observe", "c16", "cpu_us_per_req")
    enf = quiet(run, "sidegate-enforce", "c16", "cpu_us_per_req")
    if obs is not None and enf is not None:
        rows.append(("enforce (tool call denied) minus observe, CPU per request at 16 connections",
                     f"≤ {BUDGET_ENFORCE_EXTRA_US:.0f} µs", "µs", 0, {"sidegate-enforce": enf - obs},
                     BUDGET_ENFORCE_EXTRA_US, False))
    if any(cell(run, t, "p1000") for t in ORDER):
        rows.append(("1000 concurrent paced streams: largest inter-event gap (max over streams)",
                     f"≤ {BUDGET_GAP_MS:.0f} ms", "ms", 1, {t: med(run, t, "p1000", "gap_max_ms") for t in ORDER},
                     BUDGET_GAP_MS, False))
    rss = {t: run.get("targets", {}).get(t, {}).get("rss", {}).get("idle_worker") for t in ORDER}
    if any(v is not None for v in rss.values()):
        rows.append(("idle RSS of the worker process (whole tree in the Memory table)", f"≤ {BUDGET_RSS_MIB:.0f} MiB",
                     "MiB", 1, rss, BUDGET_RSS_MIB, False))
    return rows


def budget_table(run):
    rows = budget_rows(run)
    sg = [t for t in SIDEGATE if t in run.get("results", {})]
    out = ["| budget (one sidegate worker) | limit | " + " | ".join(SHORT[t] for t in sg) + " | floor granian+Pool | LiteLLM |",
           "|---|---|" + "---|" * (len(sg) + 2)]
    for what, limit, unit, nd, vals, lim, higher in rows:
        cells = []
        for t in sg:
            v = vals.get(t)
            if v is None:
                cells.append("–")
            elif lim is None:
                cells.append(f"{f(v, nd)} {unit}")
            else:
                ok = v >= lim if higher else v <= lim
                cells.append(f"{f(v, nd)} {unit} **{'PASS' if ok else 'FAIL'}**")
        for t in (FLOOR, "litellm"):
            v = vals.get(t)
            cells.append("–" if v is None else f"{f(v, nd)} {unit}")
        out.append(f"| {what} | {limit} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Memory growth over a 10-minute soak (≤ 5 %) is measured by `python -m bench.soak` "
               "(bench/results-soak.md).")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# tables


def latency_table(run, point="c1"):
    ts = [t for t in targets(run) if cell(run, t, point)]
    if not ts:
        return ""
    d50, d99 = med(run, "direct", point, "p50_ms"), med(run, "direct", point, "p99_ms")
    f50 = med(run, FLOOR, point, "p50_ms")
    dq50, dq99 = med(run, "direct", point, "p50_ms_quiet"), med(run, "direct", point, "p99_ms_quiet")
    out = ["| target | requests | p50 ms | p99 ms | added p50 ms | added p99 ms | added p50 ÷ floor's | CPU µs/req | foreign CPU % "
           "| quiet half: added p50 / p99 ms | quiet half: CPU µs/req | quiet half: foreign CPU % |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fadd = None if f50 is None or d50 is None else f50 - d50
    for t in ts:
        p50, p99 = med(run, t, point, "p50_ms"), med(run, t, point, "p99_ms")
        a50 = None if t == "direct" or p50 is None else p50 - d50
        a99 = None if t == "direct" or p99 is None else p99 - d99
        q50, q99 = med(run, t, point, "p50_ms_quiet"), med(run, t, point, "p99_ms_quiet")
        qa = "–" if t == "direct" or q50 is None or dq50 is None else f"{q50 - dq50:.3f} / {q99 - dq99:.3f}"
        out.append(f"| {SHORT[t]} | {f(med(run, t, point, 'requests'), 0)} | {f(p50, 3)} | {f(p99, 3)} | {f(a50, 3)} | {f(a99, 3)} | "
                   f"{ratio(a50, fadd) if t not in ('direct', FLOOR) else '–'} | {f(med(run, t, point, 'cpu_us_per_req'), 0)} | "
                   f"{f(med(run, t, point, 'foreign_cpu_pct'), 0)} | {qa} | {f(med(run, t, point, 'cpu_us_per_req_quiet'), 0)} | "
                   f"{f(med(run, t, point, 'foreign_cpu_pct_quiet'), 0)} |")
    return "\n".join(out)


def tput_table(run, points=("c1", "c16", "c64")):
    out = ["| target | conns | req/s | × direct | p50 ms | p99 ms | CPU µs/req | × floor CPU | errors | denied | foreign CPU % |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        d = med(run, "direct", p, "rps")
        fc = med(run, FLOOR, p, "cpu_us_per_req")
        for t in targets(run):
            if not cell(run, t, p):
                continue
            rps = med(run, t, p, "rps")
            cpu = med(run, t, p, "cpu_us_per_req")
            den = total(run, t, p, "marked") if t in ("sidegate-enforce", "sidegate-notrace") else None
            reqs = total(run, t, p, "requests")
            out.append(f"| {SHORT[t]} | {p[1:]} | {reps(run, t, p, 'rps', 0)} | {ratio(rps, d, 2) if t != 'direct' else '1'} | "
                       f"{reps(run, t, p, 'p50_ms', 2)} | {reps(run, t, p, 'p99_ms', 2)} | {reps(run, t, p, 'cpu_us_per_req', 0)} | "
                       f"{ratio(cpu, fc, 2) if t not in ('direct', FLOOR) else '–'} | {total(run, t, p, 'errors')} | "
                       f"{(f'{den}/{reqs}') if den is not None else '–'} | {reps(run, t, p, 'foreign_cpu_pct', 0)} |")
    return "\n".join(out)


def stream_table(run, point="s16"):
    ts = [t for t in targets(run) if cell(run, t, point)]
    if not ts:
        return ""
    d = med(run, "direct", point, "rps")
    fe = med(run, FLOOR, point, "cpu_us_per_event")
    out = ["| target | streams/s | × direct | events/stream | p99 ms | CPU µs/stream | CPU µs/event | × floor CPU | bad streams | denied | foreign CPU % |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in ts:
        ev = med(run, t, point, "cpu_us_per_event")
        den = total(run, t, point, "marked") if t in ("sidegate-enforce", "sidegate-notrace") else None
        emin, emax = med(run, t, point, "events_min"), med(run, t, point, "events_max")
        out.append(f"| {SHORT[t]} | {reps(run, t, point, 'rps', 0)} | {ratio(med(run, t, point, 'rps'), d, 2) if t != 'direct' else '1'} | "
                   f"{f(emin, 0)}{'' if emin == emax else '-' + f(emax, 0)} | {reps(run, t, point, 'p99_ms', 2)} | "
                   f"{reps(run, t, point, 'cpu_us_per_req', 0)} | {reps(run, t, point, 'cpu_us_per_event', 2)} | "
                   f"{ratio(ev, fe, 2) if t not in ('direct', FLOOR) else '–'} | {total(run, t, point, 'bad_streams')} | "
                   f"{(f'{den}/' + str(total(run, t, point, 'requests'))) if den is not None else '–'} | {reps(run, t, point, 'foreign_cpu_pct', 0)} |")
    return "\n".join(out)


def paced_table(run, points=("p100", "p1000")):
    out = ["| target | streams | recorded | TTFB p50 ms | TTFB p99 ms | added TTFB p50 / p99 ms | largest gap p50 ms | largest gap p99 ms | "
           "largest gap max ms | added gap p99 ms | total p99 ms | CPU µs/event | unfinished / errors | foreign CPU % |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    any_ = False
    for p in points:
        dt50, dt99 = med(run, "direct", p, "ttfb_p50_ms"), med(run, "direct", p, "ttfb_p99_ms")
        dg99 = med(run, "direct", p, "gap_p99_ms")
        for t in targets(run):
            if not cell(run, t, p):
                continue
            any_ = True
            t50, t99, g99 = med(run, t, p, "ttfb_p50_ms"), med(run, t, p, "ttfb_p99_ms"), med(run, t, p, "gap_p99_ms")
            add_t = "–" if t == "direct" or t50 is None else f"{t50 - dt50:.2f} / {t99 - dt99:.2f}"
            add_g = "–" if t == "direct" or g99 is None else f"{g99 - dg99:.2f}"
            ek = (cell(run, t, p)[0].get("error_kinds") or {})
            out.append(f"| {SHORT[t]} | {p[1:]} | {f(med(run, t, p, 'requests'), 0)} | {f(t50, 2)} | {f(t99, 2)} | {add_t} | "
                       f"{f(med(run, t, p, 'gap_p50_ms'), 2)} | {f(g99, 2)} | {f(med(run, t, p, 'gap_max_ms'), 2)} | {add_g} | "
                       f"{f(med(run, t, p, 'p99_ms'), 1)} | {f(med(run, t, p, 'cpu_us_per_event'), 1)} | "
                       f"{ek.get('unfinished', 0)} / {total(run, t, p, 'errors')} | {f(med(run, t, p, 'foreign_cpu_pct'), 0)} |")
    return "\n".join(out) if any_ else ""


ROLES = ["loop thread", "granian Rust threads", "other threads", "supervisor", "ops listener"]


def roles_table(run, points=("c1", "c16", "s16")):
    out = ["| target | point | " + " | ".join(ROLES) + " | total µs/req |", "|---|---|" + "---|" * (len(ROLES) + 1)]
    any_ = False
    for p in points:
        for t in targets(run):
            if t == "direct":
                continue
            rs = [r.get("roles_us_per_req") for r in cell(run, t, p) if r.get("roles_us_per_req")]
            if not rs:
                continue
            any_ = True
            vals = {k: statistics.median(r.get(k, 0.0) for r in rs) for k in ROLES}
            out.append(f"| {SHORT[t]} | {p} | " + " | ".join(f(vals[k], 1) if vals[k] >= 0.05 else "–" for k in ROLES)
                       + f" | {f(sum(vals.values()), 0)} |")
    return "\n".join(out) if any_ else ""


def litellm_table(run):
    if "litellm" not in run.get("results", {}):
        return ""
    rows = [("CPU per request, 1 connection (µs)", "c1", "cpu_us_per_req", 0, False),
            ("CPU per request, 16 connections (µs)", "c16", "cpu_us_per_req", 0, False),
            ("requests/s, 16 connections", "c16", "rps", 0, True),
            ("requests/s, 64 connections", "c64", "rps", 0, True),
            ("p99 ms, 64 connections", "c64", "p99_ms", 1, False),
            ("CPU per stream event, unpaced (µs)", "s16", "cpu_us_per_event", 2, False),
            ("streams/s, 16 concurrent unpaced", "s16", "rps", 0, True),
            ("TTFB p50 ms, 100 paced streams", "p100", "ttfb_p50_ms", 2, False),
            ("largest gap p99 ms, 100 paced streams", "p100", "gap_p99_ms", 1, False)]
    out = ["| figure | sidegate enforce | LiteLLM | LiteLLM ÷ sidegate |", "|---|---|---|---|"]
    d50 = med(run, "direct", "c1", "p50_ms")
    s50, l50 = med(run, "sidegate-enforce", "c1", "p50_ms"), med(run, "litellm", "c1", "p50_ms")
    if None not in (d50, s50, l50):
        out.append(f"| added latency p50, 1 connection (ms) | {s50 - d50:.3f} | {l50 - d50:.2f} | {ratio(l50 - d50, s50 - d50, 0)} |")
    for what, p, k, nd, _higher in rows:
        s_, l_ = med(run, "sidegate-enforce", p, k), med(run, "litellm", p, k)
        if s_ is None or l_ is None:
            continue
        out.append(f"| {what} | {f(s_, nd)} | {f(l_, nd)} | {ratio(l_, s_, 1)} |")
    si = run.get("targets", {}).get("sidegate-enforce", {}).get("rss", {})
    li = run.get("targets", {}).get("litellm", {}).get("rss", {})
    if si.get("idle") and li.get("idle"):
        out.append(f"| idle RSS MiB | {si['idle']} | {li['idle']} | {ratio(li['idle'], si['idle'])} |")
    return "\n".join(out)


def memory_table(run):
    out = ["| target | processes | start-up s | idle RSS MiB (after warm-up) | peak RSS under load MiB | RSS after load MiB |",
           "|---|---|---|---|---|---|"]
    for t in targets(run):
        if t == "direct":
            continue
        info = run["targets"].get(t, {})
        rss = info.get("rss", {})
        out.append(f"| {SHORT[t]} | {rss.get('procs', '–')} | {f(info.get('start_s'), 1)} | {f(rss.get('idle'), 1)} | "
                   f"{f(rss.get('peak'), 1)} | {f(rss.get('after'), 1)} |")
    return "\n".join(out)


def notool_table(run):
    ts = [t for t in targets(run) if cell(run, t, "c1-notool") or cell(run, t, "s16-notool")]
    if not ts:
        return ""
    d50 = med(run, "direct", "c1-notool", "p50_ms")
    out = ["| target | c1 p50 ms | added p50 ms | c1 CPU µs/req | s16 streams/s | s16 CPU µs/event | with tool call: c1 CPU µs/req, s16 µs/event |",
           "|---|---|---|---|---|---|---|"]
    for t in ts:
        p50 = med(run, t, "c1-notool", "p50_ms")
        out.append(f"| {SHORT[t]} | {f(p50, 3)} | {f(None if t == 'direct' or p50 is None else p50 - d50, 3)} | "
                   f"{f(med(run, t, 'c1-notool', 'cpu_us_per_req'), 0)} | {f(med(run, t, 's16-notool', 'rps'), 0)} | "
                   f"{f(med(run, t, 's16-notool', 'cpu_us_per_event'), 2)} | "
                   f"{f(med(run, t, 'c1', 'cpu_us_per_req'), 0)}, {f(med(run, t, 's16', 'cpu_us_per_event'), 2)} |")
    return "\n".join(out)


def dialect_table(run):
    rows = []
    for d in ("openai", "anthropic", "bedrock", "gemini"):
        c, s = ("c16", "s16") if d == "openai" else (f"c16-{d}", f"s16-{d}")
        for t in ("direct", FLOOR, "sidegate-enforce"):
            if not (cell(run, t, c) or cell(run, t, s)):
                continue
            den_c = total(run, t, c, "marked") if t == "sidegate-enforce" else None
            den_s = total(run, t, s, "marked") if t == "sidegate-enforce" else None
            den = "–" if den_c is None else f"{den_c}/{total(run, t, c, 'requests')} ; {den_s}/{total(run, t, s, 'requests')}"
            errs = (total(run, t, c, "errors") or 0) + (total(run, t, s, "errors") or 0)
            rows.append(f"| {d} | {SHORT[t]} | {f(med(run, t, c, 'rps'), 0)} | {f(med(run, t, c, 'p99_ms'), 2)} | "
                        f"{f(med(run, t, c, 'cpu_us_per_req'), 0)} | {f(med(run, t, s, 'rps'), 0)} | {f(med(run, t, s, 'events_min'), 0)} | "
                        f"{f(med(run, t, s, 'cpu_us_per_req'), 0)} | {f(med(run, t, s, 'cpu_us_per_event'), 2)} | {den} | {errs} |")
    if len(rows) <= 3:
        return ""
    return "\n".join(["| dialect | target | c16 req/s | c16 p99 ms | c16 CPU µs/req | s16 streams/s | events/stream | s16 CPU µs/stream | "
                      "s16 CPU µs/event | denied (c16 ; s16) | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"] + rows)


def profile_section(run):
    out = []
    for t, prof in (run.get("profile") or {}).items():
        if prof:
            out.append(f"### {SHORT.get(t, t)}\n")
            out.append(_profile_one(prof))
    return "\n".join(out)


def _profile_one(prof):
    out = []
    for pname, title in (("c16", "non-streaming, 16 connections, tool call denied"),
                         ("s16", "unpaced streams, 16 concurrent, tool call denied"),
                         ("p1000", "1000 paced streams, tool call denied")):
        r = prof.get(pname)
        if not r:
            continue
        if r.get("error"):
            out.append(f"{title}: py-spy failed: `{r['error'][-200:]}`\n")
            continue
        thr = ", ".join(f"{k} {v} %" for k, v in r.get("threads", []))
        out.append(f"**{title}** — py-spy samples by thread: {thr}. Table: the {r['samples']} samples of the "
                   f"{r.get('thread_filter') or 'all'} thread (the event loop running the app); "
                   f"{r['in_sidegate_pct']} % of them under a gateway/ or codecs/ frame.\n")
        out.append("| % of worker samples | deepest sidegate function (its own code + the library code it calls) | % | line |")
        out.append("|---|---|---|---|")
        own, lines_ = r["own"][:14], r["own_lines"][:14]
        for i in range(max(len(own), len(lines_))):
            a = own[i] if i < len(own) else ("", "")
            b = lines_[i] if i < len(lines_) else ("", "")
            out.append(f"| {a[1]} | `{a[0]}` | {b[1]} | `{b[0]}` |")
        out.append("")
        out.append("Outside sidegate frames (leaf function): " + ", ".join(f"`{k}` {v} %" for k, v in r["outside"][:6]) + "\n")
    return "\n".join(out)


def ceiling_text(run):
    c = run.get("ceiling") or {}
    lines = []
    for k, r in c.items():
        if "rps" not in r:
            continue
        ev = f", {r['rps'] * r['events_min']:,.0f} events/s" if r.get("events_min") else ""
        what = "non-streaming requests, 64 connections" if k == "c64" else "unpaced streams (71 events), 64 concurrent"
        lines.append(f"- {what}: **{r['rps']:,.0f}/s**{ev}, p99 {r['p99_ms']:.2f} ms; core 1 busy "
                     f"{r.get('core1_busy_pct', 0):.0f} % (mock {r.get('mock_us_per_req', 0):.1f} µs + load generator "
                     f"{r.get('loadgen_us_per_req', 0):.1f} µs per request)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# chart


def chart(run, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ts = targets(run)
    colors = {"direct": "#444444", "floor-tcp": "#8c8c8c", "floor-asgi": "#1f77b4", "sidegate-observe": "#2ca02c",
              "sidegate-enforce": "#d62728", "sidegate-notrace": "#9467bd", "litellm": "#ff7f0e"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    ax = axes[0]
    for t in ts:
        xs, p50, p99 = [], [], []
        for c, p in ((1, "c1"), (16, "c16"), (64, "c64")):
            a, b = med(run, t, p, "p50_ms"), med(run, t, p, "p99_ms")
            if a is not None:
                xs.append(c)
                p50.append(a)
                p99.append(b)
        if xs:
            ax.plot(xs, p50, "o-", color=colors[t], label=SHORT[t])
            ax.plot(xs, p99, "x--", color=colors[t], alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="connections", ylabel="latency ms (— p50, -- p99)",
           title="Non-streaming request latency")
    ax.set_xticks([1, 16, 64], ["1", "16", "64"])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    for t in ts:
        xs, ys = [], []
        for c, p in ((1, "c1"), (16, "c16"), (64, "c64")):
            v = med(run, t, p, "cpu_us_per_req")
            if v is not None:
                xs.append(c)
                ys.append(v)
        if xs:
            ax.plot(xs, ys, "o-", color=colors[t], label=SHORT[t])
    ax.axhline(BUDGET_CPU_REQ_US, color="#d62728", lw=0.8, ls=":")
    ax.text(1.05, BUDGET_CPU_REQ_US * 1.08, "budget 150 µs", fontsize=7, color="#d62728")
    ax.set(xscale="log", yscale="log", xlabel="connections", ylabel="CPU µs per request (process tree)",
           title="CPU per request")
    ax.set_xticks([1, 16, 64], ["1", "16", "64"])
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    for t in ts:
        xs, t50, t99 = [], [], []
        for c, p in ((100, "p100"), (1000, "p1000")):
            a, b = med(run, t, p, "ttfb_p50_ms"), med(run, t, p, "ttfb_p99_ms")
            if a is not None and med(run, t, p, "requests"):
                xs.append(c)
                t50.append(a)
                t99.append(b)
        if xs:
            ax.plot(xs, t50, "o-", color=colors[t], label=SHORT[t])
            ax.plot(xs, t99, "x--", color=colors[t], alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="concurrent paced streams", ylabel="time to first byte ms (— p50, -- p99)",
           title="Paced streams (20 ms/delta): TTFB")
    ax.set_xticks([100, 1000], ["100", "1000"])
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"sidegate bench ({run.get('mode')}, {run.get('started')}): gateway on core 0, mock + load generator on core 1",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# documents


def _existing_notes():
    try:
        with open(RESULTS) as fh:
            s = fh.read()
    except OSError:
        return None
    i, j = s.find(NOTES_BEGIN), s.find(NOTES_END)
    if i < 0 or j < i:
        return None
    return s[i + len(NOTES_BEGIN):j].strip("\n")


def render(run, chart_rel, notes=None):
    v = run.get("versions", {})
    cfg = run.get("cfg", {})
    T = run.get("targets", {})
    lines = [
        "# sidegate overhead: `python -m bench`",
        "",
        f"One run, {run.get('mode')} mode, {run.get('started')}, {run.get('wall_s', 0):.0f} s wall, by `{run.get('command')}`. "
        "Gateway (and each other target) pinned to core 0; mock upstream + load generator pinned to core 1; every target "
        "points at the same mock. Generated by `bench/report.py`; the hand-written notes are kept between runs.",
        "",
        *(["**Quick mode: short windows, one rep, no re-runs. A smoke test of the harness and a rough picture; take "
            "budget verdicts from a full run (`python -m bench`).**", ""] if run.get("mode") == "quick" else []),
        f"![latency, CPU and TTFB against concurrency per target]({chart_rel})",
        "",
        "## Budgets",
        "",
        budget_table(run),
        "",
        "Figures here come from the least disturbed measurement (the rep, or for 1 connection the half of the "
        "interleaved slices, where other tenants of the box used the least CPU); the tables below show every rep "
        "and the all-slice figures. Added latency = p50 through the target minus p50 direct, both from the same "
        "interleaved 1-connection run. "
        "CPU = the target's whole process tree (sidegate: `sidegate serve`, its granian worker and the ops process), "
        "schedstat run time over the window / requests (or events) completed in it. Every request ends with a tool call "
        f"(`{'delete_repo'}`) that the enforce-mode policy denies; observe mode records the decision beside the stream.",
        "",
        NOTES_BEGIN,
        notes if notes is not None else "_(notes: none yet)_",
        NOTES_END,
        "",
        "## sidegate against LiteLLM",
        "",
        litellm_table(run),
        "",
        "## Added latency at one connection (interleaved)",
        "",
        f"{cfg.get('slices')} slices of {cfg.get('slice_s')} s per target, targets interleaved (order reversed every slice); "
        "p50/p99 over all recorded requests of a target. 'quiet half' = the same over the half of each target's slices "
        "in which other tenants of the box used the least CPU, together with any other slice no more disturbed than "
        "that half's worst (+1 point): all slices when the box was quiet (this box is shared: their load on core 0 "
        "doubles the gateway's p50 in a slice).",
        "",
        latency_table(run),
        "",
        "## Throughput, non-streaming (OpenAI chat completion with a tool call, 2.4 KB request)",
        "",
        f"Closed loop, {cfg.get('dur')} s window + {cfg.get('warm')} s warm-up per point, {cfg.get('reps')} interleaved rep(s) "
        "(cells: rep 1 / rep 2; ratios use the median). × floor CPU = the target's CPU per request over the minimal "
        "pass-through relay's (bench/floors/relay_asgi_lean.py). c1 comes from the interleaved run above.",
        "",
        tput_table(run),
        "",
        "## Streams, unpaced (batched)",
        "",
        "16 concurrent streams, 64 content deltas + role, tool call (3 chunks), finish, usage, [DONE]; the mock writes "
        "the whole stream in one write, so events reach the relay batched. CPU/event = target CPU / events the client received.",
        "",
        stream_table(run),
        "",
        "Long streams (512 deltas, ~130 KB each, same shape otherwise) give the marginal cost of one more event: "
        "slope = (CPU per long stream − CPU per 71-event stream) / (events difference). (Here `direct` is slower than "
        "the relays: the mock sends each event as its own HTTP chunk, one parser callback each in the load generator, "
        "while a relay forwards what it read as one large chunk; the targets' CPU figures are unaffected.)",
        "",
        stream_table(run, "s16-long"),
        "",
        "| target | all-in µs/event (s16) | µs/event (s16-long) | slope µs per additional event |",
        "|---|---|---|---|",
        *[f"| {SHORT[t]} | {f(med(run, t, 's16', 'cpu_us_per_event'), 2)} | {f(med(run, t, 's16-long', 'cpu_us_per_event'), 2)} | "
          f"{f(event_slope(run, t), 2)} |" for t in targets(run) if t != "direct" and cell(run, t, "s16-long")],
        "",
        "## Streams, paced (role chunk, 64 deltas every 20 ms, tool call, finish, usage, end)",
        "",
        "Every connection runs two streams back to back, the first ones spread over 1.3 s (so streams keep distinct "
        "phases); the second round is recorded. TTFB = request sent to first body byte; largest gap = the longest "
        "silence between two body reads inside one stream (direct shows the mock's own pacing jitter). "
        f"Bounded: {cfg.get('paced_max')} s per point, what is still running then counts as unfinished.",
        "",
        paced_table(run),
        "",
        "## Where the CPU goes, by thread (µs per request)",
        "",
        "loop thread = the worker's main thread (Python, the asyncio/uvloop loop, the app); granian Rust threads = "
        "its tokio runtime (HTTP parsing, socket I/O); other threads = granian's Python-side bridge thread that hands "
        "requests to the loop (and any helper thread); supervisor = `sidegate serve` / granian's main process; ops "
        "listener = sidegate's aiohttp ops process.",
        "",
        roles_table(run),
        "",
        "## Memory (RSS of the process tree)",
        "",
        memory_table(run),
        "",
    ]
    nt = notool_table(run)
    if nt:
        lines += ["## The same without a tool call", "",
                  "What governance costs when there is nothing to decide (c1: interleaved run of its own).", "", nt, ""]
    dt = dialect_table(run)
    if dt:
        lines += ["## Other dialects (sidegate enforce mode, tool call denied)", "",
                  f"Anthropic Messages, Bedrock ConverseStream (AWS event-stream), Gemini streamGenerateContent?alt=sse; "
                  f"{cfg.get('dial_dur')} s per point. OpenAI = the main run's c16/s16.", "", dt, ""]
    ps = profile_section(run)
    if ps:
        lines += ["## Where the time goes (py-spy on the sidegate worker)", "",
                  "py-spy (400 Hz, non-blocking, run on core 1) samples the granian worker while the load generator "
                  "drives it. A sample is charged to its deepest gateway/ or codecs/ frame, which includes the "
                  "library code that function calls (msgspec, httptools, re2, prometheus_client, asyncio). Coroutine "
                  "stacks are cut where granian resumes them from Rust, so use the 'own' figures, not inclusive "
                  "ones. py-spy counts a thread waiting for the GIL as busy: per-thread CPU is in the by-thread "
                  "table above (schedstat), which is the reliable split.", "", ps, ""]
    lines += [
        "## Mock and load generator ceiling",
        "",
        "Load generator straight to the mock, both on core 1 (no relay):",
        "",
        ceiling_text(run),
        "",
        "Every gateway row above is far below this, and the `direct` rows of each table are the same mock + load "
        "generator under the same load shape: the harness is not the bottleneck. (Paced streams at 1000: see the direct "
        "row's gaps for the mock's own jitter under that load.)",
        "",
        "## Machine, versions, commands",
        "",
        "```",
        *(f"{k}: {val}" for k, val in v.items()),
        "```",
        "",
        "Targets:",
        "",
    ]
    for t in targets(run):
        info = T.get(t, {})
        argv = " ".join(str(x) for x in info.get("argv") or []) or "(load generator straight to the mock)"
        lines.append(f"- **{SHORT[t]}** ({info.get('label', '')}): `{argv}`")
    lines += [
        "",
        "sidegate runs with a policy file whose one rule denies `delete_repo` (mode `observe` or `enforce`), "
        "SIDEGATE_TRACES and SIDEGATE_ESCALATIONS in a temp dir, PROMETHEUS_MULTIPROC_DIR set, default log level. "
        "The asgi floor uses the same `gateway.upstream.Pool` (max 1024 per host; the gateway's Relay uses 256). "
        "LiteLLM: its own venv (`~/.cache/sidegate-bench/litellm-venv`, installed by the harness), one worker, no "
        "database, no callbacks, no master key (`LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true`), "
        "local model cost map; the mock's behaviour is chosen per model entry (`extra_headers`) because LiteLLM does "
        "not forward client headers.",
        "",
        "```",
        "python -m bench              # full (< 10 min): this file + bench/chart.png, raw data in bench/out/<run>/run.json",
        "python -m bench --quick      # < 2 min: bench/out/<run>/report.md",
        "python -m bench --no-litellm --targets direct,floor-asgi,sidegate-enforce --points c1,c16,s16",
        "python -m bench --report-only bench/out/<run>/run.json --write-results   # re-render",
        "python -m bench.hotspots bench/out/<run>/pyspy-sidegate-enforce-c16.txt  # profile detail",
        "python -m bench.mock_upstream --port 18000 ; python -m bench.loadgen --help",
        "```",
        "",
        f"Points re-run because other tenants used the box (> 10 % foreign CPU): {run.get('retries', 0)}. "
        "The 'foreign CPU %' columns show what remained.",
        "",
        "## Other results",
        "",
    ]
    for name, what in (("results-clients.md", "upstream client and granian interface choice (aiohttp / httpcore / lean pool, RSGI vs ASGI, stalled reader)"),
                       ("results-codecs.md", "sans-IO codec microbenchmarks"),
                       ("results-governance.md", "governor microbenchmarks"),
                       ("results-traces.md", "cost of tracing")):
        if os.path.exists(os.path.join(HERE, name)):
            lines.append(f"- [{name}]({name}): {what}")
    return "\n".join(lines) + "\n"


def write_all(run, outdir, write_results=False):
    paths = []
    cp = chart(run, os.path.join(outdir, "chart.png"))
    md = render(run, "chart.png", notes="_(hand-written notes: bench/RESULTS.md)_")
    p = os.path.join(outdir, "report.md")
    with open(p, "w") as fh:
        fh.write(md)
    paths.append(p)
    if cp:
        paths.append(cp)
    if write_results:
        if cp:
            import shutil

            shutil.copyfile(cp, CHART)
            paths.append(CHART)
        text = render(run, "chart.png", notes=_existing_notes())  # read the notes before truncating the file
        with open(RESULTS, "w") as fh:
            fh.write(text)
        paths.append(RESULTS)
    return paths


def summary_text(run):
    out = ["", "Budgets (one sidegate worker):"]
    for what, limit, unit, nd, vals, lim, higher in budget_rows(run):
        parts = []
        for t in (*SIDEGATE, FLOOR, "litellm"):
            v = vals.get(t)
            if v is None:
                continue
            ok = lim is None or (v >= lim if higher else v <= lim)
            verdict = (" PASS" if ok else " FAIL") if t in SIDEGATE and lim is not None else ""
            parts.append(f"{SHORT[t]} {f(v, nd)} {unit}{verdict}")
        out.append(f"  {what} ({limit}): " + "; ".join(parts))
    lc, sc = med(run, "litellm", "c1", "cpu_us_per_req"), med(run, "sidegate-enforce", "c1", "cpu_us_per_req")
    if lc and sc:
        out.append(f"  LiteLLM costs {lc:,.0f} µs CPU per request at 1 connection: {lc / sc:.0f}× sidegate enforce.")
    return "\n".join(out)
